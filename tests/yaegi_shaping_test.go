package tests

// Issue #9's options under Yaegi, as Traefik runs the plugin: the filters, the copy's shaping,
// sampleBy, retries and a TLS mirror, all interpreted.

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// traefikValues turns a configuration's scalars into strings, as Traefik's file provider
// delivers them, and keeps its maps and lists (asStrings would flatten those).
func traefikValues(v any) any {
	switch v := v.(type) {
	case map[string]any:
		out := map[string]any{}
		for k, x := range v {
			out[k] = traefikValues(x)
		}
		return out
	case []string:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = x
		}
		return out
	default:
		return fmt.Sprint(v)
	}
}

// yaegiShapingFront serves the interpreted middleware in front of a reverse proxy to a
// recording primary, and returns its URL and the primary.
func yaegiShapingFront(t *testing.T, p *interpreted, config map[string]any, name string) (string, *harness.Upstream) {
	t.Helper()
	primary, err := harness.StartUpstream("127.0.0.1:0", 100, nil)
	require.NoError(t, err)
	t.Cleanup(primary.Close)
	pu, err := url.Parse(primary.URL)
	require.NoError(t, err)
	h, err := p.handler(proxyTo(pu), traefikValues(config).(map[string]any), name)
	require.NoError(t, err)
	front := httptest.NewServer(h)
	t.Cleanup(front.Close)
	return front.URL, primary
}

// yaegiWarmUp sends a request that is copied and waits for its copy and its outcome line.
// Yaegi v0.16.1 computes the reflect types of interpreted methods lazily, without a lock: the
// first copies to settle at the same time race there (go test -race says so, inside
// interp.(*itype).refType). Every copy sent after this line happens after the first one.
func yaegiWarmUp(t *testing.T, p *interpreted, front string, mirror *harness.Upstream, name string, header http.Header) {
	t.Helper()
	shapingSend(t, http.DefaultClient, http.MethodGet, front+"/warm-up", header, nil)
	c, ok := mirror.Next(waitLimit)
	require.True(t, ok, "no copy of the warm-up request")
	require.Equal(t, "/warm-up", c.Path)
	waitLine(t, p.stdout, "mirror "+name+": sent=1")
}

func startShapingMirror(t *testing.T, answer http.HandlerFunc) *harness.Upstream {
	t.Helper()
	m, err := harness.StartUpstream("127.0.0.1:0", 100, answer)
	require.NoError(t, err)
	t.Cleanup(m.Close)
	return m
}

func TestYaegiShapingFilters(t *testing.T) {
	p := loadInterpreted(t)
	mirror := startShapingMirror(t, nil)
	front, primary := yaegiShapingFront(t, p, map[string]any{
		"url":          mirror.URL,
		"methods":      "post,PUT",
		"pathRegex":    "/api/[a-z]+$",
		"matchHeaders": map[string]any{"x-tenant": "^acme$", "Content-Type": "json"},
	}, "filters@file")
	acme := http.Header{"X-Tenant": {"acme"}, "Content-Type": {"application/json"}}
	tests := []struct {
		method, target string
		header         http.Header
	}{
		{http.MethodGet, "/api/get", acme},
		{http.MethodDelete, "/api/delete", acme},
		{http.MethodPost, "/other?x=/api/orders", acme},
		{http.MethodPost, "/api/orders/7", acme},
		{http.MethodPost, "/api/globex", http.Header{"X-Tenant": {"globex"}, "Content-Type": {"application/json"}}},
		{http.MethodPost, "/api/text", http.Header{"X-Tenant": {"acme"}, "Content-Type": {"text/plain"}}},
		{http.MethodPost, "/api/notenant", http.Header{"Content-Type": {"application/json"}}},
	}
	for _, test := range tests {
		shapingSend(t, http.DefaultClient, test.method, front+test.target, test.header, strings.NewReader("{}"))
	}
	// The first copy's outcome line counts the requests before it as filtered. (Waiting for it
	// also keeps the first copies apart: see yaegiWarmUp.)
	shapingSend(t, http.DefaultClient, http.MethodPost, front+"/api/orders", acme, strings.NewReader("{}"))
	waitLine(t, p.stdout, "mirror filters@file: sent=1 filtered=7")
	shapingSend(t, http.DefaultClient, http.MethodPut, front+"/v1/api/items?page=2", acme, strings.NewReader("{}"))
	shapingSend(t, http.DefaultClient, http.MethodPost, front+"/api/sentinel", acme, nil)
	methods := map[string]string{"/api/orders": http.MethodPost, "/v1/api/items": http.MethodPut, "/api/sentinel": http.MethodPost}
	for _, c := range awaitCopies(t, mirror, "/api/orders", "/v1/api/items", "/api/sentinel") {
		assert.Equal(t, methods[c.Path], c.Method, c.Path)
	}
	assert.Equal(t, len(tests)+3, primary.Count())
}

func TestYaegiShapingHeaders(t *testing.T) {
	p := loadInterpreted(t)
	mirror := startShapingMirror(t, nil)
	shaped := map[string]any{
		"url":           mirror.URL,
		"setHeaders":    map[string]any{"X-Api-Key": "shadow", "X-Env": "staging"},
		"removeHeaders": "Authorization,cookie", // a comma string, as Docker labels give it
	}
	client := http.Header{
		"Host": {"shop.example"}, "X-Api-Key": {"user"}, "Authorization": {"Bearer secret"}, "Cookie": {"s=1"},
	}
	for _, preserveHost := range []bool{true, false} {
		t.Run(fmt.Sprint("preserveHost=", preserveHost), func(t *testing.T) {
			config := map[string]any{"preserveHost": preserveHost}
			for k, v := range shaped {
				config[k] = v
			}
			name := fmt.Sprintf("shape-%v@file", preserveHost)
			front, primary := yaegiShapingFront(t, p, config, name)
			shapingSend(t, http.DefaultClient, http.MethodPost, front+"/h", client, strings.NewReader("payload"))
			pr, ok := primary.Next(waitLimit)
			require.True(t, ok)
			c, ok := mirror.Next(waitLimit)
			require.True(t, ok)
			waitLine(t, p.stdout, "mirror "+name+": sent=1") // before the next copy: see yaegiWarmUp
			assert.Equal(t, []string{"shadow"}, c.Header["X-Api-Key"])
			assert.Equal(t, []string{"staging"}, c.Header["X-Env"])
			assert.NotContains(t, c.Header, "Authorization")
			assert.NotContains(t, c.Header, "Cookie")
			assert.Equal(t, "payload", string(c.Body))
			expHost := strings.TrimPrefix(mirror.URL, "http://")
			if preserveHost {
				expHost = "shop.example"
			}
			assert.Equal(t, expHost, c.Host)
			assert.Equal(t, "shop.example", pr.Host)
			assert.Equal(t, []string{"user"}, pr.Header["X-Api-Key"])
			assert.Equal(t, []string{"Bearer secret"}, pr.Header["Authorization"])
			assert.Equal(t, []string{"s=1"}, pr.Header["Cookie"])
			assert.NotContains(t, pr.Header, "X-Env")
		})
	}
}

func TestYaegiSampleByFormula(t *testing.T) {
	const percent = 40 // another share than the real-Traefik test's
	p := loadInterpreted(t)
	mirror := startShapingMirror(t, nil)
	front, _ := yaegiShapingFront(t, p, map[string]any{"url": mirror.URL, "sampleBy": "x-user", "percent": percent}, "sample@file")
	sentinel := ""
	for i := 0; sentinel == ""; i++ {
		if v := fmt.Sprintf("sentinel-%d", i); sampledByFormula(v, percent) {
			sentinel = v
		}
	}
	yaegiWarmUp(t, p, front, mirror, "sample@file", http.Header{"X-User": {sentinel}})
	var want []string
	for i := 0; i < 40; i++ {
		user := fmt.Sprintf("user-%d", i)
		shapingSend(t, http.DefaultClient, http.MethodGet, front+"/"+user, http.Header{"X-User": {user}}, nil)
		if sampledByFormula(user, percent) {
			want = append(want, "/"+user)
		}
	}
	require.NotEmpty(t, want)
	require.Less(t, len(want), 40)
	// Only the first value counts.
	in, out := want[0][1:], ""
	for i := 0; out == ""; i++ {
		if v := fmt.Sprintf("user-%d", i); !sampledByFormula(v, percent) {
			out = v
		}
	}
	shapingSend(t, http.DefaultClient, http.MethodGet, front+"/first-in", http.Header{"X-User": {in, out}}, nil)
	shapingSend(t, http.DefaultClient, http.MethodGet, front+"/first-out", http.Header{"X-User": {out, in}}, nil)
	want = append(want, "/first-in")
	shapingSend(t, http.DefaultClient, http.MethodGet, front+"/sentinel", http.Header{"X-User": {sentinel}}, nil)
	awaitCopies(t, mirror, append(want, "/sentinel")...)
}

func TestYaegiRetryAfter503(t *testing.T) {
	p := loadInterpreted(t)
	mirror := flakyMirror(t, 1, answerStatus(http.StatusServiceUnavailable))
	front, _ := yaegiShapingFront(t, p, map[string]any{"url": mirror.URL, "retries": 1}, "retry@file")
	body := randomBytes(t, 4<<10)
	shapingSend(t, http.DefaultClient, http.MethodPost, front+"/r?x=1", nil, bytes.NewReader(body))
	waitLine(t, p.stdout, "mirror retry@file: sent=1 retries=1")
	attempts := mirror.Drain()
	require.Len(t, attempts, 2)
	for _, a := range attempts {
		assert.Equal(t, http.MethodPost, a.Method)
		assert.Equal(t, "/r", a.Path)
		assert.Equal(t, "x=1", a.RawQuery)
		assert.True(t, bytes.Equal(body, a.Body), "attempt's body differs (%d bytes)", len(a.Body))
	}
}

func TestYaegiTLSMirror(t *testing.T) {
	p := loadInterpreted(t)
	pki := newShapingPKI(t)
	mirror := startTLSMirror(t, pki.ipCert)
	trusted, _ := yaegiShapingFront(t, p, map[string]any{"url": mirror.url, "caFile": pki.caFile}, "tls@file")
	shapingSend(t, http.DefaultClient, http.MethodPost, trusted+"/t", nil, strings.NewReader("over tls"))
	c := mirror.next(t)
	assert.Equal(t, "/t", c.path)
	assert.Equal(t, "over tls", string(c.body))
	assert.Equal(t, "tls@file", c.mirroredBy)
	waitLine(t, p.stdout, "mirror tls@file: sent=1") // before the next copy: see yaegiWarmUp

	untrusted, _ := yaegiShapingFront(t, p, map[string]any{"url": mirror.url}, "untrusted@file")
	shapingSend(t, http.DefaultClient, http.MethodPost, untrusted+"/u", nil, strings.NewReader("over tls"))
	waitLine(t, p.stderr, "mirror untrusted@file: failed=1")
	assert.Contains(t, p.stderr.String(), "x509: certificate signed by unknown authority")
	select {
	case c := <-mirror.got:
		t.Fatalf("a copy reached the mirror without its CA trusted: %s", c.path)
	default:
	}
}
