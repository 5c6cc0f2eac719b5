package tests

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// e2e is a real Traefik running the plugin as a local plugin, between real servers on 127.0.0.1.
type e2e struct {
	traefik *harness.Traefik
	primary *harness.Upstream
	mirror  *harness.Upstream
	client  *http.Client
}

// startE2E runs Traefik with example/traefik.yml and the given dynamic configuration (nil:
// example/dynamic.yml as it is); example addresses are replaced with free loopback ports.
func startE2E(t *testing.T, d *harness.Dynamic, routers ...string) *e2e {
	t.Helper()
	return startE2EWith(t, e2eOpts{dynamic: d, routers: routers})
}

// e2eOpts says how startE2EWith runs Traefik.
type e2eOpts struct {
	dynamic *harness.Dynamic
	yaml    string // instead of dynamic
	static  func(cfg map[string]any)
	replace map[string]string // more example addresses replaced
	routers []string          // to wait for (default: api)
	noWait  bool              // do not wait for the routers (the caller does)
}

func startE2EWith(t *testing.T, o e2eOpts) *e2e {
	t.Helper()
	if testing.Short() {
		t.Skip("real Traefik tests are skipped in -short mode")
	}
	e := &e2e{client: harness.Client(64)}
	var err error
	e.primary, err = harness.StartUpstream("127.0.0.1:0", 10000, nil)
	require.NoError(t, err)
	t.Cleanup(e.primary.Close)
	e.mirror, err = harness.StartUpstream("127.0.0.1:0", 10000, nil)
	require.NoError(t, err)
	t.Cleanup(e.mirror.Close)
	addrs, err := harness.FreeAddrs(2)
	require.NoError(t, err)
	replace := map[string]string{
		harness.ExampleWeb: addrs[0], harness.ExampleAPI: addrs[1],
		harness.ExamplePrimary: e.primary.Addr, harness.ExampleMirror: e.mirror.Addr,
	}
	for k, v := range o.replace {
		replace[k] = v
	}
	opts := harness.Options{
		Debug:   true,
		Replace: replace,
		Static: func(cfg map[string]any) {
			cfg["providers"].(map[string]any)["providersThrottleDuration"] = "10ms"
			if o.static != nil {
				o.static(cfg)
			}
		},
		Dynamic: o.yaml,
	}
	if o.dynamic != nil {
		opts.Dynamic = o.dynamic.YAML()
	}
	e.traefik, err = harness.StartTraefik(opts)
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("traefik log:\n%s", e.traefik.Log())
		}
		e.traefik.Stop()
	})
	if !o.noWait {
		routers := o.routers
		if len(routers) == 0 {
			routers = []string{"api"}
		}
		require.NoError(t, e.traefik.WaitRouters("enabled", routers...))
	}
	return e
}

func (e *e2e) request(t *testing.T, method, path string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, e.traefik.WebURL+path, body)
	require.NoError(t, err)
	return req
}

func exampleDynamic(t *testing.T) *harness.Dynamic {
	t.Helper()
	d, err := harness.ExampleDynamic()
	require.NoError(t, err)
	return d
}

// The example configuration, as shipped, mirrors a GET and a JSON POST.
func TestTraefikExampleConfiguration(t *testing.T) {
	e := startE2E(t, nil)
	for _, body := range []string{"", `{"order":42,"items":["a","b"]}`} {
		method := http.MethodGet
		if body != "" {
			method = http.MethodPost
		}
		req := e.request(t, method, "/orders?page=2", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		r := harness.Do(e.client, req)
		require.NoError(t, r.Err)
		assert.Equal(t, http.StatusOK, r.Status)
		p, ok := e.primary.Next(waitLimit)
		require.True(t, ok)
		c, ok := e.mirror.Next(waitLimit)
		require.True(t, ok, "no copy of %s", method)
		assert.Equal(t, method, c.Method)
		assert.Equal(t, "/orders", c.Path)
		assert.Equal(t, "page=2", c.RawQuery)
		assert.Equal(t, body, string(p.Body))
		assert.Equal(t, body, string(c.Body))
		assert.Equal(t, "mirror-api@file", c.Header.Get("X-Mirrored-By"))
	}
	// The outcome line, at DEBUG (one or both copies, depending on when the first one ended).
	require.Eventually(t, func() bool { return strings.Contains(e.traefik.Log(), "mirror mirror-api@file: sent=") }, waitLimit, 10*time.Millisecond)
}

func TestTraefikBodies(t *testing.T) {
	const limit = 64 << 10
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"maxBodySize": limit})
	e := startE2E(t, d)

	const n = 300
	methods := []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete}
	bodies := make([][]byte, n)
	for i := range bodies {
		size := i * (2*limit + 1) / (n - 1) // 0 .. 2*limit
		switch i {
		case 1:
			size = 1
		case 2:
			size = limit
		case 3:
			size = limit + 1
		}
		if i%2 == 0 {
			bodies[i] = randomBytes(t, size)
		} else {
			bodies[i] = []byte(strings.Repeat("text line\n", size/10+1)[:size])
		}
	}
	results := harness.Run(e.client, n, 8, func(i int) *http.Request {
		var body io.Reader = bytes.NewReader(bodies[i])
		if i%3 == 0 {
			body = chunked{body}
		}
		req := e.request(t, methods[i%len(methods)], "/b/"+strconv.Itoa(i), body)
		req.Header.Set("X-Test-Id", strconv.Itoa(i))
		return req
	})
	assert.Equal(t, 0, harness.Failures(results))

	expCopies := 0
	for _, b := range bodies {
		if len(b) <= limit {
			expCopies++
		}
	}
	primaries := map[int]harness.Received{}
	for len(primaries) < n {
		p, ok := e.primary.Next(waitLimit)
		require.True(t, ok, "primary got %d of %d", len(primaries), n)
		id, _ := strconv.Atoi(p.Header.Get("X-Test-Id"))
		primaries[id] = p
	}
	for i, p := range primaries {
		assert.True(t, bytes.Equal(bodies[i], p.Body), "primary body %d (%d bytes) differs", i, len(bodies[i]))
		assert.Equal(t, methods[i%len(methods)], p.Method)
	}
	copies := map[int]int{}
	for got := 0; got < expCopies; got++ {
		c, ok := e.mirror.Next(waitLimit)
		require.True(t, ok, "mirror got %d of %d copies", got, expCopies)
		id, _ := strconv.Atoi(c.Header.Get("X-Test-Id"))
		copies[id]++
		require.LessOrEqual(t, len(bodies[id]), limit, "copy of request %d over the limit arrived", id)
		assert.True(t, bytes.Equal(bodies[id], c.Body), "copy body %d differs", id)
		assert.Equal(t, methods[id%len(methods)], c.Method)
	}
	for id, k := range copies {
		assert.Equal(t, 1, k, "copies of request %d", id)
	}
	assert.Len(t, copies, expCopies)
	assert.Empty(t, e.mirror.Drain(), "no further copies")
}

func TestTraefikHeaders(t *testing.T) {
	e := startE2E(t, nil)
	req := e.request(t, http.MethodPost, "/h/x%2Fy?a=1;c=3&b=2", strings.NewReader("hello"))
	req.Host = "shop.example"
	req.Header.Add("Accept", "text/html")
	req.Header.Add("Accept", "application/json")
	req.Header.Set("Authorization", "Bearer abc")
	req.Header.Set("Cookie", "s=1; t=2")
	req.Header.Set("X-Custom", "v")
	req.Header.Set("Connection", "keep-alive, X-Hop")
	req.Header.Set("X-Hop", "dropped")
	req.Header.Set("User-Agent", "e2e/1.0")
	req.Header.Set("Proxy-Authorization", "Basic eA==")
	r := harness.Do(e.client, req)
	require.NoError(t, r.Err)
	require.Equal(t, http.StatusOK, r.Status)
	p, ok := e.primary.Next(waitLimit)
	require.True(t, ok)
	c, ok := e.mirror.Next(waitLimit)
	require.True(t, ok)

	assert.Equal(t, "shop.example", p.Host)
	assert.Equal(t, e.mirror.Addr, c.Host)
	assert.Equal(t, "/h/x%2Fy", c.Path)
	assert.Equal(t, p.Path, c.Path)
	assert.Equal(t, "a=1&c=3&b=2", p.RawQuery, "Traefik's entry point rewrites the semicolon")
	assert.Equal(t, p.RawQuery, c.RawQuery)
	assert.Equal(t, "mirror-api@file", c.Header.Get("X-Mirrored-By"))
	assert.Empty(t, c.Header.Get("X-Hop"))
	assert.Empty(t, c.Header.Get("Proxy-Authorization"))
	for _, h := range []string{"X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port", "X-Forwarded-Server", "X-Real-Ip"} {
		assert.NotEmpty(t, p.Header.Get(h), h)
		assert.Equal(t, p.Header.Values(h), c.Header.Values(h), h)
	}
	assert.Equal(t, "shop.example", c.Header.Get("X-Forwarded-Host"))
	// Every end-to-end header the primary got, the copy got too, with the same values.
	for name, values := range p.Header {
		assert.Equal(t, values, c.Header[name], name)
	}
	for name := range c.Header {
		if name != "X-Mirrored-By" && name != "X-Mirror-Loop" {
			assert.Contains(t, p.Header, name, "header only on the copy")
		}
	}
}

func TestTraefikMirrorFaultsDoNotReachThePrimary(t *testing.T) {
	hung, err := harness.StartHung(0)
	require.NoError(t, err)
	t.Cleanup(hung.Close)
	slow, err := harness.StartUpstream("127.0.0.1:0", 1, func(_ http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(time.Second):
		case <-r.Context().Done():
		}
	})
	require.NoError(t, err)
	t.Cleanup(slow.Close)
	failing, err := harness.StartUpstream("127.0.0.1:0", 1, func(rw http.ResponseWriter, _ *http.Request) {
		rw.WriteHeader(http.StatusInternalServerError)
	})
	require.NoError(t, err)
	t.Cleanup(failing.Close)
	resetting, err := harness.StartUpstream("127.0.0.1:0", 1, func(rw http.ResponseWriter, _ *http.Request) {
		if conn, _, err := rw.(http.Hijacker).Hijack(); err == nil {
			_ = conn.(*net.TCPConn).SetLinger(0)
			conn.Close()
		}
	})
	require.NoError(t, err)
	t.Cleanup(resetting.Close)
	down, err := harness.StartRefused()
	require.NoError(t, err)
	t.Cleanup(down.Close)

	mirrors := map[string]string{
		"healthy": "", "down": "http://" + down.Addr, "hung": "http://" + hung.Addr,
		"slow": slow.URL, "failing": failing.URL, "reset": resetting.URL,
	}
	d := exampleDynamic(t)
	var names []string
	for mode, url := range mirrors {
		overrides := map[string]any{}
		if url != "" {
			overrides["url"] = url
		}
		d.Mirror("mirror-"+mode, overrides)
		d.Router(mode, "/"+mode, "primary", "mirror-"+mode)
		names = append(names, mode)
	}
	e := startE2E(t, d, names...)

	// Interleave the modes so that machine noise falls on all of them alike.
	modes := []string{"healthy", "down", "hung", "slow", "failing", "reset"}
	const perMode = 200
	body := randomBytes(t, 1024)
	results := harness.Run(e.client, perMode*len(modes), 8, func(i int) *http.Request {
		return e.request(t, http.MethodPost, "/"+modes[i%len(modes)], bytes.NewReader(body))
	})
	byMode := map[string][]harness.Result{}
	for i, r := range results {
		byMode[modes[i%len(modes)]] = append(byMode[modes[i%len(modes)]], r)
	}
	healthyP99 := harness.Percentile(byMode["healthy"], 99)
	for _, mode := range modes {
		rs := byMode[mode]
		assert.Equal(t, 0, harness.Failures(rs), "%s: primary errors", mode)
		p99 := harness.Percentile(rs, 99)
		t.Logf("%-8s p50 %v p99 %v", mode, harness.Percentile(rs, 50), p99)
		assert.Less(t, p99, healthyP99+50*time.Millisecond, "%s: p99 %v vs healthy %v", mode, p99, healthyP99)
	}
	got := 0
	for got < perMode*len(modes) {
		p, ok := e.primary.Next(waitLimit)
		require.True(t, ok)
		assert.True(t, bytes.Equal(body, p.Body))
		got++
	}
	for _, mode := range []string{"down", "failing", "reset"} {
		require.Eventually(t, func() bool {
			return strings.Contains(e.traefik.Log(), "mirror mirror-"+mode+"@file: failed=")
		}, waitLimit, 10*time.Millisecond, "no ERROR line for %s", mode)
	}
	assert.True(t, e.traefik.Running())
}

func TestTraefikSaturationIsBounded(t *testing.T) {
	hung, err := harness.StartHung(0)
	require.NoError(t, err)
	t.Cleanup(hung.Close)
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"url": "http://" + hung.Addr, "maxInflight": 5, "timeout": "60s"})
	e := startE2E(t, d)

	burst := func() []harness.Result {
		return harness.Run(e.client, 200, 200, func(int) *http.Request {
			return e.request(t, http.MethodPost, "/s", strings.NewReader("payload"))
		})
	}
	first := burst()
	assert.Equal(t, 0, harness.Failures(first))
	require.Eventually(t, func() bool { return hung.Open() == 5 }, waitLimit, 10*time.Millisecond, "open: %d", hung.Open())
	before, err := e.traefik.Goroutines()
	require.NoError(t, err)
	for i := 0; i < 3; i++ {
		assert.Equal(t, 0, harness.Failures(burst()))
	}
	after, err := e.traefik.Goroutines()
	require.NoError(t, err)
	t.Logf("goroutines after 200 requests: %d, after 800: %d", before, after)
	assert.Less(t, after-before, 50, "goroutines grow with requests")
	assert.Equal(t, 5, hung.Open(), "copies in flight stay at maxInflight")
	require.Eventually(t, func() bool { return strings.Contains(e.traefik.Log(), "mirror mirror-api@file: dropped=") },
		waitLimit, 10*time.Millisecond)
}

func TestTraefikPercent(t *testing.T) {
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"percent": 30})
	e := startE2E(t, d)
	const n = 2000
	results := harness.Run(e.client, n, 16, func(int) *http.Request { return e.request(t, http.MethodGet, "/p", nil) })
	require.Equal(t, 0, harness.Failures(results))
	require.Eventually(t, func() bool { return e.primary.Count() == n }, waitLimit, 10*time.Millisecond)
	// Copies still on their way when the load ends: wait until the count stops moving.
	var last int
	require.Eventually(t, func() bool {
		c := e.mirror.Count()
		stable := c == last
		last = c
		return stable
	}, waitLimit, 200*time.Millisecond)
	// Binomial(2000, 0.3): mean 600, standard deviation 20.5; allow 5 deviations.
	assert.InDelta(t, 600, e.mirror.Count(), 103)
}

// h2cClient speaks HTTP/2 without TLS, so a request body can stream while the answer comes.
func h2cClient() *http.Client {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{Protocols: p}}
}

func TestTraefikStreamingRequest(t *testing.T) {
	// A primary that answers after the first line of the body, then echoes the rest.
	primary := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		_ = http.NewResponseController(rw).EnableFullDuplex()
		buf := make([]byte, 6)
		if _, err := io.ReadFull(r.Body, buf); err != nil {
			rw.WriteHeader(http.StatusBadRequest)
			return
		}
		_, _ = rw.Write(append([]byte("ack "), buf...))
		rw.(http.Flusher).Flush()
		_, _ = io.Copy(rw, r.Body)
	})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = primary.Serve(l) }()
	t.Cleanup(func() { _ = primary.Close() })

	d := exampleDynamic(t)
	d.Service("duplex", "http://"+l.Addr().String())
	d.Router("plain", "/plain", "duplex")
	d.Router("mirrored", "/mirrored", "duplex", "mirror-api")
	e := startE2E(t, d, "plain", "mirrored")

	client := h2cClient()
	for _, path := range []string{"/plain", "/mirrored"} {
		pr, pw := io.Pipe()
		req := e.request(t, http.MethodPost, path, pr)
		respc := make(chan *http.Response, 1)
		go func() {
			resp, err := client.Do(req) //nolint:bodyclose // closed by the test once read
			if err != nil {
				close(respc)
				return
			}
			respc <- resp
		}()
		_, err := io.WriteString(pw, "hello\n")
		require.NoError(t, err)
		var resp *http.Response
		select {
		case resp = <-respc:
		case <-time.After(waitLimit):
			t.Fatalf("%s: no answer while the body was still open", path)
		}
		require.NotNil(t, resp, path)
		assert.Equal(t, 2, resp.ProtoMajor)
		ack := make([]byte, 10)
		_, err = io.ReadFull(resp.Body, ack)
		require.NoError(t, err)
		assert.Equal(t, "ack hello\n", string(ack))
		_, err = io.WriteString(pw, "world")
		require.NoError(t, err)
		require.NoError(t, pw.Close())
		rest, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, "world", string(rest), path)
	}
	c, ok := e.mirror.Next(waitLimit)
	require.True(t, ok)
	assert.Equal(t, "/mirrored", c.Path)
	assert.Equal(t, "hello\nworld", string(c.Body))
}

func TestTraefikLoopProtection(t *testing.T) {
	d := exampleDynamic(t)
	// The mirror is this same router: the copy comes back through Traefik once, and stops.
	d.Mirror("mirror-api", map[string]any{"url": "http://" + harness.ExampleWeb})
	d.Router("plain", "/plain", "primary")
	e := startE2E(t, d, "api", "plain")
	r := harness.Do(e.client, e.request(t, http.MethodPost, "/loop", strings.NewReader("once")))
	require.NoError(t, r.Err)
	require.Equal(t, http.StatusOK, r.Status)
	first, ok := e.primary.Next(waitLimit)
	require.True(t, ok)
	second, ok := e.primary.Next(waitLimit)
	require.True(t, ok)
	assert.NotEmpty(t, first.Header.Get("X-Mirrored-By")+second.Header.Get("X-Mirrored-By"), "one of them is the copy")
	assert.Equal(t, "once", string(second.Body))
	// A loop would keep sending; a few round trips later nothing else has come.
	for i := 0; i < 5; i++ {
		require.NoError(t, harness.Do(e.client, e.request(t, http.MethodGet, "/plain", nil)).Err)
	}
	assert.Equal(t, 2+5, e.primary.Count())
	require.Eventually(t, func() bool { return strings.Contains(e.traefik.Log(), "skipped=1") }, waitLimit, 10*time.Millisecond)
}

func TestTraefikReloadsUnderTraffic(t *testing.T) {
	d := exampleDynamic(t)
	e := startE2E(t, d)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var sent, failures atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				r := harness.Do(e.client, e.request(t, http.MethodPost, "/r", strings.NewReader("reload")))
				sent.Add(1)
				if r.Err != nil || r.Status != http.StatusOK {
					failures.Add(1)
				}
			}
		}()
	}
	builds := func() int { return strings.Count(e.traefik.Log(), "mirror mirror-api@file: copying to") }
	reload := func(i int) {
		n := builds()
		d.Mirror("mirror-api", map[string]any{"timeout": fmt.Sprintf("%ds", 6+i)})
		require.NoError(t, e.traefik.SetDynamic(d.YAML()))
		require.Eventually(t, func() bool { return builds() > n }, waitLimit, 5*time.Millisecond, "reload %d not applied", i)
	}
	// Two reloads first, so that connections and workers of steady traffic exist before counting.
	reload(100)
	reload(101)
	before, err := e.traefik.Goroutines()
	require.NoError(t, err)
	for i := 0; i < 20; i++ {
		reload(i)
	}
	after, err := e.traefik.Goroutines()
	require.NoError(t, err)
	cancel()
	wg.Wait()
	t.Logf("%d requests over 20 reloads; goroutines %d before, %d after", sent.Load(), before, after)
	assert.Equal(t, int64(0), failures.Load())
	assert.Greater(t, sent.Load(), int64(20))
	assert.Less(t, after-before, 15, "goroutines grow across reloads: a leak of one per reload would show")
}

// A mistake in a middleware's options turns its mirroring off, said at ERROR (again at most
// every 10 s while requests come), and its router keeps serving the primary; with failClosed: true
// the router is disabled instead, as it is by Traefik's own decoding errors, which come before New.
func TestTraefikBadConfiguration(t *testing.T) {
	dir := t.TempDir()
	d := exampleDynamic(t)
	failOpen := map[string]struct {
		options map[string]any
		msg     string
	}{
		"bad-timeout": {map[string]any{"timeout": "5"}, `invalid timeout "5"`},
		"bad-logfile": {map[string]any{"compare": map[string]any{"enabled": true, "logFile": filepath.Join(dir, "missing", "diff.log")}},
			`invalid compare.logFile "` + filepath.Join(dir, "missing", "diff.log") + `"`},
		"bad-cafile": {map[string]any{"url": "https://" + harness.ExampleMirror, "caFile": filepath.Join(dir, "ca.pem")},
			`invalid caFile "` + filepath.Join(dir, "ca.pem") + `"`},
		"no-url":      {map[string]any{"url": nil}, "option url is required"},
		"bad-percent": {map[string]any{"percent": 150}, "invalid percent 150"},
	}
	for name, c := range failOpen {
		d.Mirror(name, c.options)
		d.Router(name, "/"+name, "primary", name)
	}
	d.Mirror("closed", map[string]any{"timeout": "5", "failClosed": true})
	d.Router("closed", "/closed", "primary", "closed")
	d.Mirror("undecodable", map[string]any{"percent": "abc"})
	d.Router("undecodable", "/undecodable", "primary", "undecodable")
	d.Router("api", "/good", "primary", "mirror-api") // no catch-all for the disabled routers to fall to
	e := startE2EWith(t, e2eOpts{dynamic: d, noWait: true})
	require.NoError(t, e.traefik.WaitRouters("disabled", "closed", "undecodable"))
	routers, err := e.traefik.Routers()
	require.NoError(t, err)
	assert.Equal(t, "enabled", routers["api@file"])

	logLines := func(parts ...string) []string {
		var found []string
		for _, l := range strings.Split(ansiEscape.ReplaceAllString(e.traefik.Log(), ""), "\n") {
			all := true
			for _, p := range parts {
				all = all && strings.Contains(l, p)
			}
			if all {
				found = append(found, l)
			}
		}
		return found
	}
	for name, c := range failOpen {
		assert.Equal(t, "enabled", routers[name+"@file"], "%s: the router", name)
		r := harness.Do(e.client, e.request(t, http.MethodPost, "/"+name, strings.NewReader("body")))
		require.NoError(t, r.Err)
		if !assert.Equal(t, http.StatusOK, r.Status, name) {
			continue
		}
		if p, ok := e.primary.Next(waitLimit); assert.True(t, ok, "%s: the primary", name) {
			assert.Equal(t, "/"+name, p.Path)
			assert.Equal(t, "body", string(p.Body))
		}
		lines := logLines("mirror "+name+"@file: ", c.msg)
		if assert.NotEmpty(t, lines, "%s: no line with %q", name, c.msg) {
			t.Logf("%s", lines[0])
			assert.Contains(t, lines[0], " ERR ", "%s: logged at ERROR", name)
			assert.Contains(t, lines[0], "mirroring is off", name)
		}
	}
	// The metrics say which middlewares mirror nothing (each names the example's metricsAddress).
	s := mustScrape(t, e.traefik.MetricsURL)
	for name := range failOpen {
		v, ok := s.value("traefik_mirror_config_error", map[string]string{"middleware": name + "@file"})
		assert.True(t, ok && v == 1, "%s: traefik_mirror_config_error %v", name, v)
	}
	v, ok := s.value("traefik_mirror_config_error", map[string]string{"middleware": "mirror-api@file"})
	assert.True(t, ok && v == 0, "mirror-api: traefik_mirror_config_error %v", v)
	for _, name := range []string{"closed", "undecodable"} {
		r := harness.Do(e.client, e.request(t, http.MethodGet, "/"+name, nil))
		require.NoError(t, r.Err)
		assert.Equal(t, http.StatusNotFound, r.Status, "%s: the disabled router", name)
	}
	// failClosed: New's error, as Traefik logs it with the router.
	closed := logLines("closed@file", `invalid timeout \"5\"`)
	if assert.NotEmpty(t, closed, "failClosed: Traefik's line with the error") {
		t.Logf("%s", closed[0])
		assert.Contains(t, closed[0], " ERR ")
	}
	assert.Empty(t, logLines("mirror closed@file: "), "failClosed: the plugin's own line")
	// A value Traefik cannot decode fails before New: Traefik's error alone, which the plugin
	// cannot turn into a logged, unmirrored router.
	undecodable := logLines("undecodable@file", "abc")
	if assert.NotEmpty(t, undecodable, "Traefik's decoding error") {
		t.Logf("%s", undecodable[0])
		assert.Contains(t, undecodable[0], " ERR ")
		assert.Contains(t, undecodable[0], "failed to decode configuration")
		assert.NotContains(t, undecodable[0], "mirror:", "the plugin's New never ran")
	}
	assert.Empty(t, logLines("mirror undecodable@file: "))

	// The good router still mirrors; its copy is the first and only one to reach the mirror.
	r := harness.Do(e.client, e.request(t, http.MethodGet, "/good", nil))
	require.NoError(t, r.Err)
	assert.Equal(t, http.StatusOK, r.Status)
	c, ok := e.mirror.Next(waitLimit)
	require.True(t, ok, "the good router still mirrors")
	assert.Equal(t, "/good", c.Path)
	assert.Equal(t, 1, e.mirror.Count(), "copies from misconfigured middlewares")

	// The ERROR line comes again while requests keep coming, but at most once per 10 s.
	repeats := func() []string { return logLines("mirror bad-timeout@file: ", "invalid timeout") }
	n := len(repeats())
	require.NotZero(t, n, "the line when the middleware was built")
	for i := 0; i < 20; i++ {
		e.send(t, http.MethodGet, "/bad-timeout", nil)
	}
	assert.LessOrEqual(t, len(repeats()), n+1, "20 requests in a burst")
	n = len(repeats())
	start := time.Now()
	for deadline := start.Add(12 * time.Second); len(repeats()) == n && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		e.send(t, http.MethodGet, "/bad-timeout", nil)
	}
	lines := repeats()
	require.Len(t, lines, n+1, "the line once more within 12 s of requests")
	t.Logf("repeated after %v of requests", time.Since(start).Round(100*time.Millisecond))
	// Traefik's timestamps are to the second.
	prev, err := time.Parse(time.RFC3339, strings.Fields(lines[n-1])[0])
	require.NoError(t, err)
	last, err := time.Parse(time.RFC3339, strings.Fields(lines[n])[0])
	require.NoError(t, err)
	assert.GreaterOrEqual(t, last.Sub(prev), 9*time.Second, "between the last two lines")
	assert.Zero(t, e.mirror.Count()-1, "copies from misconfigured middlewares")
	assert.True(t, e.traefik.Running())
}
