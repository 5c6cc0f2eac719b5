package tests

// Issue #9's acceptance tests in a real Traefik: the filters (methods, pathRegex, matchHeaders),
// the copy's shaping (setHeaders, removeHeaders, preserveHost), retries, TLS to the mirror
// (caFile, insecureSkipVerify, serverName), sampleBy, chained instances, and the options'
// configuration errors.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"math"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// shapingSend sends one request and requires a 200 answer, read in full.
func shapingSend(t *testing.T, client *http.Client, method, url string, header http.Header, body io.Reader) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	require.NoError(t, err)
	for name, values := range header {
		if name == "Host" {
			req.Host = values[0]
			continue
		}
		req.Header[name] = values
	}
	r := harness.Do(client, req)
	require.NoError(t, r.Err, "%s %s", method, url)
	require.Equal(t, http.StatusOK, r.Status, "%s %s", method, url)
}

// awaitCopies waits until a mirror has received a copy for each expected path (a path listed
// twice is expected twice), takes the other copies that came by then, and asserts that they
// are exactly the expected ones. The request sent last is a sentinel whose copy is expected:
// the copies of the requests before it left before those were answered, so a copy that should
// not exist has come by the time the sentinel's has. (Copies may arrive out of order: each
// copy that should exist is waited for, for up to waitLimit.)
func awaitCopies(t *testing.T, mirror *harness.Upstream, expected ...string) []harness.Received {
	t.Helper()
	missing := map[string]int{}
	for _, p := range expected {
		missing[p]++
	}
	var got []harness.Received
	for n := len(expected); n > 0; {
		c, ok := mirror.Next(waitLimit)
		if !ok {
			break // the assertion below tells which are missing
		}
		got = append(got, c)
		if missing[c.Path] > 0 {
			missing[c.Path]--
			n--
		}
	}
	got = append(got, mirror.Drain()...)
	assert.ElementsMatch(t, expected, copyPaths(got), "the copies the mirror got")
	return got
}

func copyPaths(rs []harness.Received) []string {
	out := []string{}
	for _, r := range rs {
		out = append(out, r.Path)
	}
	return out
}

// waitTraefikLine waits for Traefik's log to hold every fragment on one line, and returns that line.
func waitTraefikLine(t *testing.T, tr *harness.Traefik, fragments ...string) string {
	t.Helper()
	var found string
	require.Eventually(t, func() bool {
		for _, line := range strings.Split(tr.Log(), "\n") {
			all := true
			for _, f := range fragments {
				all = all && strings.Contains(line, f)
			}
			if all {
				found = line
				return true
			}
		}
		return false
	}, 15*time.Second, 10*time.Millisecond, "no log line with %q", fragments)
	return found
}

func TestTraefikFilterMethods(t *testing.T) {
	d := exampleDynamic(t)
	delete(d.HTTP.Routers, "api")
	d.Mirror("m-list", map[string]any{"methods": []string{"post", "Put"}})
	d.Mirror("m-comma", map[string]any{"methods": "post,PUT"})
	d.Router("list", "/list/", "primary", "m-list")
	d.Router("comma", "/comma/", "primary", "m-comma")
	e := startE2E(t, d, "list", "comma")

	methods := []string{http.MethodGet, http.MethodHead, http.MethodDelete, http.MethodPatch, http.MethodOptions, http.MethodPost, http.MethodPut}
	sent := 0
	for _, prefix := range []string{"/list/", "/comma/"} {
		for _, method := range methods {
			shapingSend(t, e.client, method, e.traefik.WebURL+prefix+method, nil, strings.NewReader("body of "+method))
			sent++
		}
	}
	shapingSend(t, e.client, http.MethodPut, e.traefik.WebURL+"/list/sentinel", nil, nil)
	shapingSend(t, e.client, http.MethodPost, e.traefik.WebURL+"/comma/sentinel", nil, nil)
	copies := awaitCopies(t, e.mirror, "/list/POST", "/list/PUT", "/comma/POST", "/comma/PUT", "/list/sentinel", "/comma/sentinel")
	for _, c := range copies {
		if strings.HasSuffix(c.Path, "/sentinel") {
			continue
		}
		assert.Equal(t, c.Path[strings.LastIndex(c.Path, "/")+1:], c.Method)
		assert.Equal(t, "body of "+c.Method, string(c.Body))
	}
	// The primary got every request, filtered or not.
	assert.Equal(t, sent+2, e.primary.Count())
	// The first outcome line, written when the first copy (of the POST) ended, counts the five
	// requests before it as filtered.
	for _, name := range []string{"m-list", "m-comma"} {
		waitTraefikLine(t, e.traefik, "mirror "+name+"@file: sent=", " filtered=5")
	}
}

func TestTraefikFilterPathRegex(t *testing.T) {
	d := exampleDynamic(t)
	// Anchored at the end only: a match on the path and the query together differs both ways.
	d.Mirror("mirror-api", map[string]any{"pathRegex": "/api/[a-z]+$"})
	e := startE2E(t, d)
	targets := map[string]bool{
		"/other?x=/api/orders":  false,
		"/other?/api/orders":    false,
		"/api/Orders":           false,
		"/api/orders/7":         false,
		"/apiorders":            false,
		"/api/orders":           true,
		"/v1/api/orders?page=2": true,
	}
	var want []string
	for target, copied := range targets {
		shapingSend(t, e.client, http.MethodGet, e.traefik.WebURL+target, nil, nil)
		if copied {
			want = append(want, strings.SplitN(target, "?", 2)[0])
		}
	}
	shapingSend(t, e.client, http.MethodGet, e.traefik.WebURL+"/api/sentinel", nil, nil)
	for _, c := range awaitCopies(t, e.mirror, append(want, "/api/sentinel")...) {
		if c.Path == "/v1/api/orders" {
			assert.Equal(t, "page=2", c.RawQuery)
		}
	}
	assert.Equal(t, len(targets)+1, e.primary.Count())
}

func TestTraefikFilterMatchHeaders(t *testing.T) {
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"matchHeaders": map[string]any{
		"x-tenant":     "^(acme|globex)$",
		"Content-Type": "^application/json",
	}})
	d.Mirror("mirror-empty", map[string]any{"matchHeaders": map[string]any{"X-Debug": "^(|on)$"}})
	d.Router("empty", "/empty/", "primary", "mirror-empty")
	e := startE2E(t, d, "api", "empty")
	tests := []struct {
		path   string
		header http.Header
		copied bool
	}{
		{"/both", http.Header{"X-Tenant": {"acme"}, "Content-Type": {"application/json"}}, true},
		{"/both-other-values", http.Header{"X-Tenant": {"globex"}, "Content-Type": {"application/json; charset=utf-8"}}, true},
		{"/tenant-wrong", http.Header{"X-Tenant": {"initech"}, "Content-Type": {"application/json"}}, false},
		{"/tenant-unanchored", http.Header{"X-Tenant": {"acme2"}, "Content-Type": {"application/json"}}, false},
		{"/type-wrong", http.Header{"X-Tenant": {"acme"}, "Content-Type": {"text/plain"}}, false},
		{"/type-missing", http.Header{"X-Tenant": {"acme"}}, false},
		{"/tenant-missing", http.Header{"Content-Type": {"application/json"}}, false},
		{"/tenant-empty", http.Header{"X-Tenant": {""}, "Content-Type": {"application/json"}}, false},
		{"/none", nil, false},
	}
	var want []string
	for _, test := range tests {
		shapingSend(t, e.client, http.MethodPost, e.traefik.WebURL+test.path, test.header, strings.NewReader("{}"))
		if test.copied {
			want = append(want, test.path)
		}
	}
	shapingSend(t, e.client, http.MethodPost, e.traefik.WebURL+"/sentinel",
		http.Header{"X-Tenant": {"acme"}, "Content-Type": {"application/json"}}, strings.NewReader("{}"))
	awaitCopies(t, e.mirror, append(want, "/sentinel")...)

	// A missing header does not match even a regex that matches the empty value.
	for path, header := range map[string]http.Header{
		"/empty/missing": nil, "/empty/empty": {"X-Debug": {""}}, "/empty/on": {"X-Debug": {"on"}}, "/empty/off": {"X-Debug": {"off"}},
	} {
		shapingSend(t, e.client, http.MethodGet, e.traefik.WebURL+path, header, nil)
	}
	shapingSend(t, e.client, http.MethodGet, e.traefik.WebURL+"/empty/sentinel", http.Header{"X-Debug": {"on"}}, nil)
	awaitCopies(t, e.mirror, "/empty/empty", "/empty/on", "/empty/sentinel")
	assert.Equal(t, len(tests)+6, e.primary.Count())
}

func TestTraefikSetAndRemoveHeaders(t *testing.T) {
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{
		"setHeaders":    map[string]any{"X-Api-Key": "shadow", "x-env": "staging"},
		"removeHeaders": []string{"Authorization", "cookie"},
	})
	e := startE2E(t, d)
	client := http.Header{
		"X-Api-Key":     {"user", "user-2"},
		"Authorization": {"Bearer secret"},
		"Cookie":        {"session=1; t=2"},
		"X-Kept":        {"as sent"},
	}
	shapingSend(t, e.client, http.MethodPost, e.traefik.WebURL+"/shaped", client, strings.NewReader("payload"))
	p, ok := e.primary.Next(waitLimit)
	require.True(t, ok)
	c, ok := e.mirror.Next(waitLimit)
	require.True(t, ok)

	assert.Equal(t, []string{"shadow"}, c.Header["X-Api-Key"], "setHeaders replaces every value")
	assert.Equal(t, []string{"staging"}, c.Header["X-Env"])
	assert.NotContains(t, c.Header, "Authorization")
	assert.NotContains(t, c.Header, "Cookie")
	assert.Equal(t, []string{"as sent"}, c.Header["X-Kept"])
	assert.Equal(t, "payload", string(c.Body))
	// The primary gets the client's headers, untouched.
	for name, values := range client {
		assert.Equal(t, values, p.Header[name], name)
	}
	assert.NotContains(t, p.Header, "X-Env")
	assert.Equal(t, "payload", string(p.Body))
}

func TestTraefikPreserveHost(t *testing.T) {
	d := exampleDynamic(t)
	delete(d.HTTP.Routers, "api")
	d.Mirror("m-keep", map[string]any{"preserveHost": true})
	d.Mirror("m-mirror", map[string]any{"preserveHost": false})
	d.Router("keep", "/keep", "primary", "m-keep")
	d.Router("mirror", "/mirror", "primary", "m-mirror")
	e := startE2E(t, d, "keep", "mirror")
	for path, expHost := range map[string]string{"/keep": "shop.example", "/mirror": e.mirror.Addr} {
		shapingSend(t, e.client, http.MethodGet, e.traefik.WebURL+path, http.Header{"Host": {"shop.example"}}, nil)
		p, ok := e.primary.Next(waitLimit)
		require.True(t, ok)
		assert.Equal(t, "shop.example", p.Host, path)
		c, ok := e.mirror.Next(waitLimit)
		require.True(t, ok)
		assert.Equal(t, path, c.Path)
		assert.Equal(t, expHost, c.Host, path)
		assert.Equal(t, "shop.example", c.Header.Get("X-Forwarded-Host"), path)
	}
}

// flakyMirror records every attempt; the first failures ones are answered by fail, the others
// with 200.
func flakyMirror(t *testing.T, failures int64, fail http.HandlerFunc) *harness.Upstream {
	t.Helper()
	var attempts atomic.Int64
	up, err := harness.StartUpstream("127.0.0.1:0", 10, func(rw http.ResponseWriter, r *http.Request) {
		if attempts.Add(1) <= failures {
			fail(rw, r)
			return
		}
		_, _ = io.WriteString(rw, "ok")
	})
	require.NoError(t, err)
	t.Cleanup(up.Close)
	return up
}

func resetConnection(rw http.ResponseWriter, _ *http.Request) {
	if conn, _, err := rw.(http.Hijacker).Hijack(); err == nil {
		_ = conn.(*net.TCPConn).SetLinger(0)
		_ = conn.Close()
	}
}

func answerStatus(code int) http.HandlerFunc {
	return func(rw http.ResponseWriter, _ *http.Request) { rw.WriteHeader(code) }
}

func TestTraefikRetries(t *testing.T) {
	// The 503 mirror holds its first answer until the client has its own: the client's answer
	// cannot wait for the copy, let alone for its retry.
	answered := make(chan struct{})
	gated503 := func(rw http.ResponseWriter, _ *http.Request) {
		select {
		case <-answered:
		case <-time.After(waitLimit):
		}
		rw.WriteHeader(http.StatusServiceUnavailable)
	}
	tests := []struct {
		name     string
		fail     http.HandlerFunc
		failures int64 // how many attempts fail before the mirror answers 200
		retries  int
		timeout  string
		chunked  bool
		attempts int    // 0: as many as the timeout allows, fewer than 1+retries
		expLine  string // what the outcome line starts with, after "mirror <name>@file: "
	}{
		{name: "reset", fail: resetConnection, failures: 1, retries: 1, attempts: 2, expLine: "sent=1 retries=1"},
		{name: "503", fail: gated503, failures: 1, retries: 1, chunked: true, attempts: 2, expLine: "sent=1 retries=1"},
		{name: "502", fail: answerStatus(http.StatusBadGateway), failures: 1, retries: 1, attempts: 2, expLine: "sent=1 retries=1"},
		{name: "504", fail: answerStatus(http.StatusGatewayTimeout), failures: 1, retries: 1, attempts: 2, expLine: "sent=1 retries=1"},
		{name: "deadline", fail: answerStatus(http.StatusServiceUnavailable), failures: 100, retries: 10, timeout: "300ms", expLine: "failed=1 retries="},
		{name: "always-503", fail: answerStatus(http.StatusServiceUnavailable), failures: 100, retries: 2, attempts: 3, expLine: "failed=1 retries=2 lastError="},
		{name: "500", fail: answerStatus(http.StatusInternalServerError), failures: 1, retries: 1, attempts: 1, expLine: "failed=1 lastError="},
		{name: "zero-503", fail: answerStatus(http.StatusServiceUnavailable), failures: 1, retries: 0, attempts: 1, expLine: "failed=1 lastError="},
		{name: "zero-reset", fail: resetConnection, failures: 1, retries: 0, attempts: 1, expLine: "failed=1 lastError="},
	}
	d := exampleDynamic(t)
	delete(d.HTTP.Routers, "api")
	mirrors := map[string]*harness.Upstream{}
	var routers []string
	for _, test := range tests {
		mirrors[test.name] = flakyMirror(t, test.failures, test.fail)
		timeout := "5s"
		if test.timeout != "" {
			timeout = test.timeout
		}
		d.Mirror("r-"+test.name, map[string]any{"url": mirrors[test.name].URL, "retries": test.retries, "timeout": timeout})
		d.Router(test.name, "/retry/"+test.name, "primary", "r-"+test.name)
		routers = append(routers, test.name)
	}
	e := startE2E(t, d, routers...)

	for _, test := range tests {
		t.Run(test.name, func(t *testing.T) {
			body := randomBytes(t, 8<<10)
			var r io.Reader = bytes.NewReader(body)
			if test.chunked {
				r = chunked{r}
			}
			shapingSend(t, e.client, http.MethodPost, e.traefik.WebURL+"/retry/"+test.name+"?n=1", nil, r)
			clientAnswered := time.Now()
			if test.name == "503" {
				close(answered)
			}
			waitTraefikLine(t, e.traefik, "mirror r-"+test.name+"@file: "+test.expLine)
			// The line is written once the copy is settled: every attempt has arrived by then.
			got := mirrors[test.name].Drain()
			if test.attempts == 0 {
				// Every attempt within the one timeout, which ends them before the retries do.
				require.GreaterOrEqual(t, len(got), 2)
				require.Less(t, len(got), 1+test.retries)
				assert.Less(t, got[len(got)-1].At.Sub(got[0].At), 300*time.Millisecond)
			} else {
				require.Len(t, got, test.attempts)
			}
			for _, a := range got {
				assert.Equal(t, http.MethodPost, a.Method)
				assert.Equal(t, "/retry/"+test.name, a.Path)
				assert.Equal(t, "n=1", a.RawQuery)
				assert.True(t, bytes.Equal(body, a.Body), "attempt's body differs (%d bytes)", len(a.Body))
			}
			if test.name == "503" {
				assert.True(t, got[1].At.After(clientAnswered), "the client's answer came after the retry")
			}
		})
	}
	assert.Equal(t, len(tests), e.primary.Count())
}

// shapingPKI is a CA, written as PEM to caFile, and server certificates for https mirrors.
type shapingPKI struct {
	caFile   string
	ipCert   tls.Certificate // by the CA, for 127.0.0.1
	nameCert tls.Certificate // by the CA, for shadow.internal only
	selfCert tls.Certificate // self-signed, for 127.0.0.1
}

func newShapingPKI(t testing.TB) *shapingPKI {
	t.Helper()
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		return k
	}
	serial := int64(0)
	template := func(cn string) *x509.Certificate {
		serial++
		return &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}
	}
	caKey := key()
	caTemplate := template("shaping test CA")
	caTemplate.IsCA, caTemplate.BasicConstraintsValid = true, true
	caTemplate.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	ca, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	leaf := func(tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) tls.Certificate {
		k := key()
		if parentKey == nil {
			parent, parentKey = tmpl, k
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &k.PublicKey, parentKey)
		require.NoError(t, err)
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
	}
	ip := template("127.0.0.1")
	ip.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	name := template("shadow.internal")
	name.DNSNames = []string{"shadow.internal"}
	self := template("127.0.0.1")
	self.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	p := &shapingPKI{
		caFile:   filepath.Join(t.TempDir(), "ca.pem"),
		ipCert:   leaf(ip, ca, caKey),
		nameCert: leaf(name, ca, caKey),
		selfCert: leaf(self, nil, nil),
	}
	require.NoError(t, os.WriteFile(p.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644))
	return p
}

// tlsCopy is a request as an https mirror saw it.
type tlsCopy struct {
	path, serverName, mirroredBy string
	body                         []byte
}

// tlsMirror is an https server on 127.0.0.1 that records what it gets.
type tlsMirror struct {
	url string
	got chan tlsCopy
}

func startTLSMirror(t testing.TB, cert tls.Certificate) *tlsMirror {
	t.Helper()
	m := &tlsMirror{got: make(chan tlsCopy, 100)}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		m.got <- tlsCopy{path: r.URL.Path, serverName: r.TLS.ServerName, mirroredBy: r.Header.Get("X-Mirrored-By"), body: body}
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshakes
	srv.StartTLS()
	t.Cleanup(srv.Close)
	m.url = srv.URL
	return m
}

func (m *tlsMirror) next(t testing.TB) tlsCopy {
	t.Helper()
	select {
	case c := <-m.got:
		return c
	case <-time.After(waitLimit):
		t.Fatalf("no copy reached %s within %s", m.url, waitLimit)
		return tlsCopy{}
	}
}

func TestTraefikTLSMirror(t *testing.T) {
	pki := newShapingPKI(t)
	byCA := startTLSMirror(t, pki.ipCert)
	self := startTLSMirror(t, pki.selfCert)
	named := startTLSMirror(t, pki.nameCert)
	tests := []struct {
		name    string
		options map[string]any
		mirror  *tlsMirror
		expSNI  string
		expErr  string // "": the copy arrives
	}{
		{name: "ca", mirror: byCA, options: map[string]any{"caFile": pki.caFile}},
		{name: "insecure", mirror: self, options: map[string]any{"insecureSkipVerify": true}},
		{name: "servername", mirror: named, options: map[string]any{"caFile": pki.caFile, "serverName": "shadow.internal"}, expSNI: "shadow.internal"},
		{name: "untrusted", mirror: byCA, options: map[string]any{}, expErr: "x509: certificate signed by unknown authority"},
		{name: "wrongname", mirror: named, options: map[string]any{"caFile": pki.caFile}, expErr: "x509: cannot validate certificate for 127.0.0.1"},
	}
	d := exampleDynamic(t)
	delete(d.HTTP.Routers, "api")
	var routers []string
	for _, test := range tests {
		options := map[string]any{"url": test.mirror.url}
		for k, v := range test.options {
			options[k] = v
		}
		d.Mirror("tls-"+test.name, options)
		d.Router(test.name, "/tls/"+test.name, "primary", "tls-"+test.name)
		routers = append(routers, test.name)
	}
	e := startE2E(t, d, routers...)
	for _, test := range tests {
		t.Run(test.name, func(t *testing.T) {
			shapingSend(t, e.client, http.MethodPost, e.traefik.WebURL+"/tls/"+test.name, nil, strings.NewReader("secret "+test.name))
			if test.expErr == "" {
				c := test.mirror.next(t)
				assert.Equal(t, "/tls/"+test.name, c.path)
				assert.Equal(t, "secret "+test.name, string(c.body))
				assert.Equal(t, "tls-"+test.name+"@file", c.mirroredBy)
				assert.Equal(t, test.expSNI, c.serverName)
				return
			}
			line := waitTraefikLine(t, e.traefik, "mirror tls-"+test.name+"@file: failed=1", test.expErr)
			assert.Contains(t, line, "ERR")
			select {
			case c := <-test.mirror.got:
				t.Fatalf("a copy reached the mirror: %s", c.path)
			default:
			}
		})
	}
}

// sampledByFormula is sampleBy's documented decision: the first 8 bytes of the value's SHA-256,
// big-endian, over 2^64, below percent/100.
func sampledByFormula(value string, percent float64) bool {
	sum := sha256.Sum256([]byte(value))
	return float64(binary.BigEndian.Uint64(sum[:8]))/math.Exp2(64) < percent/100
}

func TestTraefikSampleBy(t *testing.T) {
	const users, percent = 200, 30
	d := exampleDynamic(t)
	delete(d.HTTP.Routers, "api")
	d.Mirror("sample-a", map[string]any{"sampleBy": "x-user", "percent": percent})
	d.Mirror("sample-b", map[string]any{"sampleBy": "x-user", "percent": percent})
	d.Router("a", "/a/", "primary", "sample-a")
	d.Router("b", "/b/", "primary", "sample-b")
	first := startE2E(t, d, "a", "b")
	second := startE2E(t, d, "a", "b")

	sentinel := ""
	for i := 0; sentinel == ""; i++ {
		if v := fmt.Sprintf("sentinel-%d", i); sampledByFormula(v, percent) {
			sentinel = v
		}
	}
	// Each user twice through each router of the first Traefik, once through the second.
	type pass struct {
		e      *e2e
		prefix string
		times  int
	}
	passes := []pass{{first, "/a/", 2}, {first, "/b/", 2}, {second, "/a/", 1}}
	for _, p := range passes {
		results := harness.Run(p.e.client, users*p.times, 4, func(i int) *http.Request {
			req := p.e.request(t, http.MethodGet, fmt.Sprintf("%suser-%d", p.prefix, i%users), nil)
			req.Header.Set("X-User", fmt.Sprintf("user-%d", i%users))
			return req
		})
		require.Equal(t, 0, harness.Failures(results))
		shapingSend(t, p.e.client, http.MethodGet, p.e.traefik.WebURL+p.prefix+"sentinel", http.Header{"X-User": {sentinel}}, nil)
	}
	// copies[pass][user] is how many copies of that user's requests came through that pass. The
	// copies expected by the formula are waited for: they may come after a sentinel's.
	copies := make([]map[string]int, len(passes))
	for _, e := range []*e2e{first, second} {
		var expected []string
		for _, p := range passes {
			if p.e != e {
				continue
			}
			for i := 0; i < users; i++ {
				for k := 0; k < p.times && sampledByFormula(fmt.Sprintf("user-%d", i), percent); k++ {
					expected = append(expected, fmt.Sprintf("%suser-%d", p.prefix, i))
				}
			}
			expected = append(expected, p.prefix+"sentinel")
		}
		got := awaitCopies(t, e.mirror, expected...)
		for k, p := range passes {
			if copies[k] == nil {
				copies[k] = map[string]int{}
			}
			for _, c := range got {
				if p.e == e && strings.HasPrefix(c.Path, p.prefix+"user-") {
					assert.Equal(t, "sample-"+p.prefix[1:2]+"@file", c.Header.Get("X-Mirrored-By"))
					copies[k][c.Header.Get("X-User")]++
				}
			}
		}
	}
	// The same decision for each user in every instance and process (whatever the formula), and
	// the formula's.
	for i := 0; i < users; i++ {
		user := fmt.Sprintf("user-%d", i)
		for k, p := range passes {
			assert.Contains(t, []int{0, p.times}, copies[k][user], "%s: %d copies of %d requests through %s of Traefik %d", user, copies[k][user], p.times, p.prefix, k/2+1)
			assert.Equal(t, copies[0][user] > 0, copies[k][user] > 0, "%s: decisions differ between %s of Traefik 1 and %s of Traefik %d", user, passes[0].prefix, p.prefix, k/2+1)
		}
	}
	sampled := 0
	for i := 0; i < users; i++ {
		user := fmt.Sprintf("user-%d", i)
		exp := sampledByFormula(user, percent)
		if exp {
			sampled++
		}
		assert.Equal(t, exp, copies[0][user] > 0, "%s: the decision is not the formula's", user)
	}
	// Binomial(200, 0.3): mean 60, standard deviation 6.5; 5 deviations either side.
	assert.InDelta(t, 60, sampled, 32, "users in the sample")
	t.Logf("%d of %d users sampled", sampled, users)
}

func TestTraefikChainedInstances(t *testing.T) {
	second, err := harness.StartUpstream("127.0.0.1:0", 100, nil)
	require.NoError(t, err)
	t.Cleanup(second.Close)
	d := exampleDynamic(t)
	d.Mirror("chain-one", map[string]any{"url": "http://" + harness.ExampleMirror})
	d.Mirror("chain-two", map[string]any{"url": second.URL})
	d.Router("api", "/", "primary", "chain-one", "chain-two")
	e := startE2E(t, d)

	bodies := []struct {
		method  string
		body    []byte
		chunked bool
	}{
		{http.MethodGet, nil, false},
		{http.MethodPost, randomBytes(t, 1<<10), false},
		{http.MethodPut, randomBytes(t, 200<<10), false}, // over the read-ahead: copied as the primary reads it
		{http.MethodPatch, randomBytes(t, 100<<10), true},
	}
	for i, b := range bodies {
		path := fmt.Sprintf("/chain/%d", i)
		var body io.Reader = bytes.NewReader(b.body)
		if b.chunked {
			body = chunked{body}
		}
		shapingSend(t, e.client, b.method, e.traefik.WebURL+path+"?i=1", nil, body)
		p, ok := e.primary.Next(waitLimit)
		require.True(t, ok)
		assert.Equal(t, path, p.Path)
		assert.True(t, bytes.Equal(b.body, p.Body), "%s: the primary's body differs", path)
		assert.NotContains(t, p.Header, "X-Mirrored-By")
		assert.NotContains(t, p.Header, "X-Mirror-Loop")
		for mirror, name := range map[*harness.Upstream]string{e.mirror: "chain-one@file", second: "chain-two@file"} {
			c, ok := mirror.Next(waitLimit)
			require.True(t, ok, "%s: no copy from %s", path, name)
			assert.Equal(t, b.method, c.Method, name)
			assert.Equal(t, path, c.Path, name)
			assert.Equal(t, "i=1", c.RawQuery, name)
			assert.True(t, bytes.Equal(b.body, c.Body), "%s: the body from %s differs (%d bytes)", path, name, len(c.Body))
			assert.Equal(t, []string{name}, c.Header["X-Mirrored-By"])
		}
	}
	assert.Empty(t, e.mirror.Drain())
	assert.Empty(t, second.Drain())
}

func TestTraefikBadShapingConfiguration(t *testing.T) {
	notPEM := filepath.Join(t.TempDir(), "not.pem")
	require.NoError(t, os.WriteFile(notPEM, []byte("not a certificate\n"), 0o644))
	missing := filepath.Join(t.TempDir(), "missing.pem")
	tests := []struct {
		name    string
		options map[string]any
		expLog  string
	}{
		{"bad-path-regex", map[string]any{"pathRegex": "^/api/("}, `invalid pathRegex`},
		{"bad-match-headers", map[string]any{"matchHeaders": map[string]any{"X-Canary": "["}}, `invalid matchHeaders`},
		{"bad-retries", map[string]any{"retries": -1}, `invalid retries -1`},
		{"missing-ca-file", map[string]any{"url": "https://127.0.0.1:1", "caFile": missing}, `invalid caFile`},
		{"not-pem-ca-file", map[string]any{"url": "https://127.0.0.1:1", "caFile": notPEM}, `no PEM certificate in it`},
	}
	d := exampleDynamic(t)
	var broken []string
	for _, test := range tests {
		d.Mirror(test.name, test.options)
		d.Router(test.name, "/"+test.name, "primary", test.name)
		broken = append(broken, test.name)
	}
	d.Router("api", "/good", "primary", "mirror-api") // no catch-all for the broken routers to fall to
	e := startE2E(t, d, append(broken, "api")...)
	// Each mistake fails open: the router serves the primary, nothing is mirrored, and the
	// middleware says why.
	for _, test := range tests {
		r := harness.Do(e.client, e.request(t, http.MethodGet, "/"+test.name, nil))
		require.NoError(t, r.Err)
		assert.Equal(t, http.StatusOK, r.Status, test.name)
		waitTraefikLine(t, e.traefik, "mirror "+test.name+"@file: ", test.expLog, "mirroring is off")
	}
	for _, f := range []string{missing, notPEM} {
		waitTraefikLine(t, e.traefik, "invalid caFile", f)
	}
	r := harness.Do(e.client, e.request(t, http.MethodGet, "/good", nil))
	require.NoError(t, r.Err)
	assert.Equal(t, http.StatusOK, r.Status)
	c, ok := e.mirror.Next(waitLimit)
	require.True(t, ok, "the good router still mirrors")
	assert.Equal(t, "/good", c.Path, "the first copy: the broken routers copied nothing")
	assert.Equal(t, len(tests)+1, e.primary.Count())
}

// A stray Upgrade header, without "Connection: upgrade", is no upgrade: the request is copied,
// and the copy loses the header as the primary does.
func TestTraefikStrayUpgradeIsCopied(t *testing.T) {
	e := startE2E(t, nil)
	c := dialRaw(t, e)
	c.send(t, "GET /stray?u=1 HTTP/1.1\r\nHost: shop.example\r\nUpgrade: foo/2\r\nX-Kept: yes\r\n\r\n")
	require.Equal(t, http.StatusOK, c.status(t))
	p, ok := e.primary.Next(waitLimit)
	require.True(t, ok)
	copied, ok := e.mirror.Next(waitLimit)
	require.True(t, ok, "the request with a stray Upgrade was not copied")
	assert.Equal(t, http.MethodGet, copied.Method)
	assert.Equal(t, "/stray", copied.Path)
	assert.Equal(t, "u=1", copied.RawQuery)
	assert.Equal(t, "yes", copied.Header.Get("X-Kept"))
	assert.NotContains(t, copied.Header, "Upgrade")
	assert.Equal(t, p.Header.Values("Upgrade"), copied.Header.Values("Upgrade"))
}
