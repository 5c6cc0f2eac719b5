package mirror

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

const waitLimit = 10 * time.Second

// poll calls cond every interval until it holds or waitLimit has passed, and says whether it
// held.
func poll(interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
	return true
}

// eventually waits until cond holds, checking every millisecond, and fails the test with msg
// if it does not within waitLimit. args are evaluated when eventually is called.
func eventually(t *testing.T, cond func() bool, msg string, args ...any) {
	t.Helper()
	if !poll(time.Millisecond, cond) {
		t.Fatalf("after %s: "+msg, append([]any{waitLimit}, args...)...)
	}
}

// noError stops the test on an unexpected error.
func noError(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("got error %v, want none", err)
	}
}

// equal reports got != want; what names the value.
func equal[T comparable](t *testing.T, got, want T, what string) {
	t.Helper()
	if got != want {
		t.Errorf("%s: got %#v, want %#v", what, got, want)
	}
}

// contains reports a string s that does not contain sub.
func contains(t *testing.T, s, sub string) {
	t.Helper()
	if !strings.Contains(s, sub) {
		t.Errorf("got %q, want it to contain %q", s, sub)
	}
}

// received is one request as an upstream saw it.
type received struct {
	method, path, rawQuery, host string
	header                       http.Header
	body                         []byte
	contentLength                int64
	bodyErr                      error
}

func record(r *http.Request) received {
	body, err := io.ReadAll(r.Body)
	return received{
		method: r.Method, path: r.URL.EscapedPath(), rawQuery: r.URL.RawQuery, host: r.Host,
		header: r.Header.Clone(), body: body, contentLength: r.ContentLength, bodyErr: err,
	}
}

// upstream is a loopback server that records every request it gets.
type upstream struct {
	*httptest.Server
	got chan received
}

func newUpstream(t *testing.T, answer func(http.ResponseWriter, *http.Request)) *upstream {
	t.Helper()
	u := &upstream{got: make(chan received, 4096)}
	u.Server = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		u.got <- record(r)
		if answer != nil {
			answer(rw, r)
		}
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *upstream) next(t *testing.T) received {
	t.Helper()
	select {
	case r := <-u.got:
		return r
	case <-time.After(waitLimit):
		t.Fatalf("%s received nothing within %s", u.URL, waitLimit)
		return received{}
	}
}

func (u *upstream) assertNothing(t *testing.T) {
	t.Helper()
	select {
	case r := <-u.got:
		t.Fatalf("unexpected request %s %s", r.method, r.path)
	default:
	}
}

// proxyTo is a reverse proxy to the primary, as Traefik's, with a transport of its own: tests
// run in parallel, and httptest.Server.Close closes http.DefaultTransport's idle connections,
// which can break another test's request on a shared one.
func proxyTo(u *url.URL) *httputil.ReverseProxy {
	p := httputil.NewSingleHostReverseProxy(u)
	p.Transport = &http.Transport{}
	return p
}

// stack is a client-facing server running the middleware in front of a reverse proxy to the
// primary, as in Traefik.
type stack struct {
	front   *httptest.Server
	primary *upstream
	mirror  *upstream
	m       *mirror
	stderr  *syncBuffer
}

func newStack(t *testing.T, cfg *Config, mirrorAnswer func(http.ResponseWriter, *http.Request)) *stack {
	t.Helper()
	s := &stack{primary: newUpstream(t, nil), stderr: &syncBuffer{}}
	if cfg.URL == "" {
		s.mirror = newUpstream(t, mirrorAnswer)
		cfg.URL = s.mirror.URL
	}
	pu, err := url.Parse(s.primary.URL)
	noError(t, err)
	h, err := New(context.Background(), proxyTo(pu), cfg, testName(t))
	noError(t, err)
	s.m = h.(*mirror)
	s.m.st.error = func(line string) { _, _ = s.stderr.Write([]byte(line + "\n")) }
	s.m.st.debug = func(string) {}
	s.front = httptest.NewServer(h)
	t.Cleanup(s.front.Close)
	return s
}

// do sends req to the front server and returns the status and body of the answer.
func (s *stack) do(t *testing.T, req *http.Request) (int, []byte) {
	t.Helper()
	resp, err := s.front.Client().Do(req)
	noError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	noError(t, err)
	return resp.StatusCode, body
}

// waitOutcome waits until outcome k has been counted n times.
func (s *stack) waitOutcome(t *testing.T, k outcome, n int64) {
	t.Helper()
	if !poll(time.Millisecond, func() bool { return s.m.st.get(k) >= n }) {
		var all []string
		for o := outcome(0); o < numOutcomes; o++ {
			all = append(all, fmt.Sprintf("%s=%d", outcomeNames[o], s.m.st.get(o)))
		}
		t.Fatalf("%s after %s: got %d, want %d (%s; %s)", outcomeNames[k], waitLimit, s.m.st.get(k), n,
			strings.Join(all, " "), s.stderr.String())
	}
	equal(t, s.m.st.get(k), n, outcomeNames[k])
}

func (s *stack) inflight() int { return inflight(s.m) }

func inflight(m *mirror) int { return int(holding(m.st)) }

// testName is a middleware name of the test's own, the same for every call within one run of
// the test (and another with -count): the state of a name is shared by every instance in the
// process.
func testName(t testing.TB) string {
	name, _ := testNames.LoadOrStore(t, fmt.Sprintf("%s-%d@file", t.Name(), testRuns.Add(1)))
	return name.(string)
}

var (
	testNames sync.Map
	testRuns  atomic.Int64
)

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func newRequest(t *testing.T, method, url string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	noError(t, err)
	return req
}

// fullDuplex lets a handler answer while the client is still sending its body, as HTTP/2 does.
func fullDuplex(h http.Handler) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		_ = http.NewResponseController(rw).EnableFullDuplex()
		h.ServeHTTP(rw, r)
	})
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	noError(t, err)
	return b
}

// chunked hides the length of a body so that it is sent with Transfer-Encoding: chunked.
type chunked struct{ r io.Reader }

func (c chunked) Read(p []byte) (int, error) { return c.r.Read(p) }

func TestCreateConfigDefaults(t *testing.T) {
	want := &Config{Percent: 100, MirrorBody: true, MaxBodySize: 1 << 20, BodyBuffer: 1 << 20, StreamStall: "1s", Timeout: "5s", MaxInflight: 100,
		Redis:   RedisConfig{DialTimeout: "5s", ReadTimeout: "3s", WriteTimeout: "3s"},
		Compare: CompareConfig{MaxBodySize: 64 << 10, Percent: 100},
		Record: RecordConfig{What: "copies", MaxSize: 100 << 20, MaxFiles: 10, MaxBodySize: 1 << 20,
			RedactHeaders: []string{"Authorization", "Cookie", "Proxy-Authorization", "Set-Cookie"}}}
	if got := CreateConfig(); !reflect.DeepEqual(got, want) {
		t.Errorf("CreateConfig(): got %+v, want %+v", got, want)
	}
}

func TestNewRejectsBadConfiguration(t *testing.T) {
	tests := []struct {
		desc   string
		change func(*Config)
		expErr string
	}{
		{"missing url", func(c *Config) { c.URL = "" }, "option url is required"},
		{"relative url", func(c *Config) { c.URL = "/mirror" }, `invalid url "/mirror": scheme must be http or https`},
		{"host only", func(c *Config) { c.URL = "mirror:8080" }, `invalid url "mirror:8080": scheme must be http or https`},
		{"ftp scheme", func(c *Config) { c.URL = "ftp://mirror" }, `invalid url "ftp://mirror": scheme must be http or https`},
		{"no host", func(c *Config) { c.URL = "http:///path" }, `invalid url "http:///path": no host`},
		{"query", func(c *Config) { c.URL = "http://mirror/?a=1" }, `invalid url "http://mirror/?a=1": must not have a query`},
		{"fragment", func(c *Config) { c.URL = "http://mirror/#x" }, `invalid url "http://mirror/#x": must not have a fragment`},
		{"user info", func(c *Config) { c.URL = "http://u:p@mirror" }, `invalid url "http://u:p@mirror": user info`},
		{"unparsable url", func(c *Config) { c.URL = "http://mi rror" }, `invalid url "http://mi rror"`},
		{"percent below 0", func(c *Config) { c.Percent = -1 }, "invalid percent -1: must be between 0 and 100"},
		{"percent above 100", func(c *Config) { c.Percent = 150 }, "invalid percent 150: must be between 0 and 100"},
		{"timeout without unit", func(c *Config) { c.Timeout = "5" }, `invalid timeout "5": time: missing unit in duration`},
		{"timeout empty", func(c *Config) { c.Timeout = "" }, `invalid timeout ""`},
		{"timeout zero", func(c *Config) { c.Timeout = "0s" }, `invalid timeout "0s": must be positive`},
		{"timeout negative", func(c *Config) { c.Timeout = "-1s" }, `invalid timeout "-1s": must be positive`},
		{"maxBodySize below -1", func(c *Config) { c.MaxBodySize = -2 }, "invalid maxBodySize -2"},
		{"maxInflight zero", func(c *Config) { c.MaxInflight = 0 }, "invalid maxInflight 0: must be at least 1"},
		{"method with a space", func(c *Config) { c.Methods = []string{"GET", "PO ST"} }, `invalid methods "GET,PO ST": "PO ST" is not an HTTP method`},
		{"pathRegex", func(c *Config) { c.PathRegex = "(" }, `invalid pathRegex "(": error parsing regexp`},
		{"matchHeaders regex", func(c *Config) { c.MatchHeaders = map[string]string{"X-Canary": "["} }, `invalid matchHeaders "X-Canary": "[": error parsing regexp`},
		{"matchHeaders name", func(c *Config) { c.MatchHeaders = map[string]string{"X Canary": "yes"} }, `invalid matchHeaders "X Canary": not a header name`},
		{"sampleBy", func(c *Config) { c.SampleBy = "X:User" }, `invalid sampleBy "X:User": not a header name`},
		{"setHeaders name", func(c *Config) { c.SetHeaders = map[string]string{"": "v"} }, `invalid setHeaders "": not a header name`},
		{"setHeaders value", func(c *Config) { c.SetHeaders = map[string]string{"X-Key": "a\r\nEvil: 1"} }, `invalid setHeaders "X-Key": the value holds a line break`},
		{"removeHeaders", func(c *Config) { c.RemoveHeaders = []string{"Cookie", "Bad Name"} }, `invalid removeHeaders "Cookie,Bad Name": "Bad Name" is not a header name`},
		{"retries below 0", func(c *Config) { c.Retries = -1 }, "invalid retries -1: must be from 0 to 10"},
		{"retries above 10", func(c *Config) { c.Retries = 11 }, "invalid retries 11"},
		{"caFile missing", func(c *Config) { c.URL, c.CAFile = "https://mirror", "/nonexistent/ca.pem" }, `invalid caFile "/nonexistent/ca.pem": stat /nonexistent/ca.pem`},
		{"caFile not PEM", func(c *Config) { c.URL, c.CAFile = "https://mirror", "mirror.go" }, `invalid caFile "mirror.go": no PEM certificate in it`},
		{"TLS option on http", func(c *Config) { c.InsecureSkipVerify = true }, `invalid insecureSkipVerify "true": url "http://127.0.0.1:1" is not https`},
		{"serverName on http", func(c *Config) { c.ServerName = "shadow" }, `invalid serverName "shadow": url "http://127.0.0.1:1" is not https`},
		{"maxRate below 0", func(c *Config) { c.MaxRate = -1 }, "invalid maxRate -1: must be 0 (no cap) or copies per second"},
		{"maxRate NaN", func(c *Config) { c.MaxRate = math.NaN() }, "invalid maxRate NaN"},
		{"metricsAddress without port", func(c *Config) { c.MetricsAddress = "127.0.0.1" }, `invalid metricsAddress "127.0.0.1": address 127.0.0.1: missing port in address`},
		{"metricsAddress port", func(c *Config) { c.MetricsAddress = "127.0.0.1:http" }, `invalid metricsAddress "127.0.0.1:http": port must be a number`},
		{"compare.maxBodySize", func(c *Config) { c.Compare.Enabled, c.Compare.MaxBodySize = true, -1 }, "invalid compare.maxBodySize -1"},
		{"compare.percent", func(c *Config) { c.Compare.Enabled, c.Compare.Percent = true, 101 }, "invalid compare.percent 101"},
		{"compare.ignoreHeaders", func(c *Config) { c.Compare.Enabled, c.Compare.IgnoreHeaders = true, []string{"A B"} }, `invalid compare.ignoreHeaders "A B"`},
		{"compare.ignoreJSONPaths", func(c *Config) { c.Compare.Enabled, c.Compare.IgnoreJSONPaths = true, []string{"a..b"} }, `invalid compare.ignoreJSONPaths "a..b": empty segment`},
		{"compare.logFile", func(c *Config) { c.Compare.Enabled, c.Compare.LogFile = true, "/nonexistent/dir/diff.log" }, `invalid compare.logFile "/nonexistent/dir/diff.log": open`},
		{"maxRate too small", func(c *Config) { c.MaxRate = 1e-10 }, "invalid maxRate 1e-10: must be 0 (no cap) or copies per second from 0.000001 to 1e9"},
		{"maxRate too large", func(c *Config) { c.MaxRate = 1e19 }, "invalid maxRate 1e+19"},
		{"maxRate infinite", func(c *Config) { c.MaxRate = math.Inf(1) }, "invalid maxRate +Inf"},
		{"compare.maxBodySize too large", func(c *Config) { c.Compare.Enabled, c.Compare.MaxBodySize = true, math.MaxInt64 }, "invalid compare.maxBodySize 9223372036854775807: must be a size in bytes, at most 1073741824"},
	}
	for _, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			t.Parallel()
			cfg := CreateConfig()
			cfg.URL = "http://127.0.0.1:1"
			test.change(cfg)
			cfg.FailClosed = true
			h, err := New(context.Background(), http.NotFoundHandler(), cfg, testName(t))
			if err == nil {
				t.Fatalf("failClosed: got no error, want %q", "mirror: "+test.expErr)
			}
			if h != nil {
				t.Errorf("failClosed: got handler %v, want nil", h)
			}
			contains(t, err.Error(), "mirror: "+test.expErr)
		})
	}
}

// The loop header keeps the last maxLoopTokens-1 tokens it arrived with, then this process's,
// and a header of a megabyte of commas costs no more than a few tokens do.
func TestLoopTokens(t *testing.T) {
	var many []string
	for i := 0; i < 20; i++ {
		many = append(many, fmt.Sprintf("t%d", i))
	}
	for _, test := range []struct {
		desc   string
		values []string
		exp    string
	}{
		{"one value", []string{"a, b"}, "a, b, " + processToken},
		{"several values, spaces and empty tokens", []string{" a ,, b", "", "c,"}, "a, b, c, " + processToken},
		{"commas only", []string{",,,"}, processToken},
		{"the last tokens", []string{strings.Join(many, ",")}, strings.Join(many[5:], ", ") + ", " + processToken},
		{"the last values", many, strings.Join(many[5:], ", ") + ", " + processToken},
		{"long tokens left out", []string{"a, " + strings.Repeat("x", 65) + ", b"}, "a, b, " + processToken},
	} {
		equal(t, strings.Join(loopTokens(test.values), "|"), test.exp, test.desc)
	}
	commas := []string{strings.Repeat(",", 1<<20) + "a"}
	allocs := testing.AllocsPerRun(10, func() { loopTokens(commas) })
	if allocs > 4 {
		t.Errorf("a megabyte of commas: %v allocations, want at most 4", allocs)
	}
	spaced := []string{strings.Repeat(", ", 1<<19)}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	loopTokens(spaced)
	runtime.ReadMemStats(&after)
	if grown := after.TotalAlloc - before.TotalAlloc; grown > 64<<10 {
		t.Errorf("a megabyte of commas and spaces allocated %d KiB", grown>>10)
	}
}

// By default a mistake in the options never takes the router down: the middleware says why at
// ERROR, again at most once per logInterval while requests come, and hands every request to
// the next handler, copying nothing.
func TestBadConfigurationFailsOpen(t *testing.T) {
	mirrored := make(chan string, 10)
	shadow := httptest.NewServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { mirrored <- r.URL.Path }))
	t.Cleanup(shadow.Close)
	name := testName(t)
	st := stateFor(name)
	var lines syncBuffer
	st.error = func(line string) { _, _ = lines.Write([]byte(line + "\n")) }
	cfg := CreateConfig()
	cfg.URL = shadow.URL
	cfg.Timeout = "5"
	var served atomic.Int64
	next := http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) { served.Add(1); rw.WriteHeader(http.StatusTeapot) })
	h, err := New(context.Background(), next, cfg, name)
	noError(t, err)
	want := "mirror " + name + `: invalid timeout "5": time: missing unit in duration "5"; mirroring is off`
	equal(t, strings.Count(lines.String(), want), 1, "error lines after New")
	_, err = New(context.Background(), next, cfg, name) // another router, or a reload
	noError(t, err)
	equal(t, strings.Count(lines.String(), want), 1, "error lines after New again")

	serveOne := func() {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/a", strings.NewReader("body")))
		equal(t, rec.Code, http.StatusTeapot, "the client's answer")
	}
	serveOne()
	serveOne()
	equal(t, served.Load(), int64(2), "requests served by the next handler")
	equal(t, strings.Count(lines.String(), want), 1, "error lines within the interval")
	st.nextConfigLine.Store(time.Now().UnixNano()) // as if logInterval had passed
	serveOne()
	equal(t, strings.Count(lines.String(), want), 2, "error lines after the interval")

	// The options fixed: the same name mirrors again, and the old error is not repeated.
	cfg.Timeout = "5s"
	h, err = New(context.Background(), next, cfg, name)
	noError(t, err)
	serveOne()
	select {
	case p := <-mirrored:
		equal(t, p, "/a", "the copy's path")
	case <-time.After(waitLimit):
		t.Fatal("no copy once the options are fixed")
	}
	st.nextConfigLine.Store(0)
	repeatConfigError(st, 0)
	equal(t, strings.Count(lines.String(), want), 2, "error lines once fixed")
}

// A new maxRate applies at once, whatever the budget computed from the old one.
func TestRateChangeAppliesAtOnce(t *testing.T) {
	name := testName(t)
	build := func(rate float64) *mirror {
		cfg := CreateConfig()
		cfg.URL = "http://127.0.0.1:1"
		cfg.MaxRate = rate
		h, err := New(context.Background(), http.NotFoundHandler(), cfg, name)
		noError(t, err)
		return h.(*mirror)
	}
	m := build(0.001)
	equal(t, allow(m.st, m.rateInterval, m.rateTolerance), true, "the first copy at 0.001/s")
	equal(t, allow(m.st, m.rateInterval, m.rateTolerance), false, "the second copy at 0.001/s")
	m = build(0.001) // another router, or a reload with the same rate: the budget is kept
	equal(t, allow(m.st, m.rateInterval, m.rateTolerance), false, "a copy after a rebuild at the same rate")
	m = build(1000)
	allowed := 0
	for i := 0; i < 2000; i++ {
		if allow(m.st, m.rateInterval, m.rateTolerance) {
			allowed++
		}
	}
	if allowed < 1000 || allowed > 1010 { // a burst of one second's worth, and what the loop's time adds
		t.Errorf("copies allowed at once at the new rate of 1000/s: got %d, want 1000", allowed)
	}
}

// Options as Traefik's decoder delivers them: lists from comma strings, any case.
func TestCompiledOptions(t *testing.T) {
	cfg := CreateConfig()
	cfg.URL = "https://shadow.internal:8443/v2/"
	cfg.Methods = []string{"post", "PUT", ""}
	cfg.MatchHeaders = map[string]string{"x-canary": "^yes$", "X-Tenant": "a|b"}
	cfg.SetHeaders = map[string]string{"x-api-key": "shadow"}
	cfg.RemoveHeaders = []string{"authorization", " Cookie"}
	cfg.SampleBy = "x-user"
	cfg.MaxRate = 0.5
	cfg.InsecureSkipVerify = true
	s, err := compile(cfg)
	noError(t, err)
	if !reflect.DeepEqual(s.methods, map[string]bool{"POST": true, "PUT": true}) {
		t.Errorf("methods: got %v", s.methods)
	}
	equal(t, len(s.matchHeaders), 2, "matchHeaders")
	equal(t, s.matchHeaders[0].name, "X-Canary", "matchHeaders[0] (sorted, canonical)")
	equal(t, s.setHeaders.Get("X-Api-Key"), "shadow", "setHeaders")
	equal(t, strings.Join(s.removeHeaders, ","), "Authorization,Cookie", "removeHeaders")
	equal(t, s.sampleBy, "X-User", "sampleBy")
	equal(t, s.basePath, "/v2", "base path")
	equal(t, s.rateInterval, int64(2*time.Second), "rate interval at 0.5/s")
	equal(t, s.rateTolerance, int64(0), "burst of one copy")
	equal(t, s.filter && s.shape, true, "filter and shape")
	equal(t, transportFor(s) != transportFor(s), false, "one transport per TLS setting")
	cfg.InsecureSkipVerify = false
	s2, err := compile(cfg)
	noError(t, err)
	equal(t, transportFor(s2), http.RoundTripper(sharedTransport), "no TLS option: the shared transport")
}

// The rate budget lets a burst of at most one second's worth through, then one copy per
// interval.
func TestRateBudget(t *testing.T) {
	cfg := CreateConfig()
	cfg.URL = "http://127.0.0.1:1"
	cfg.MaxRate = 20
	s, err := compile(cfg)
	noError(t, err)
	st := &state{}
	allowed := 0
	for i := 0; i < 100; i++ {
		if allow(st, s.rateInterval, s.rateTolerance) {
			allowed++
		}
	}
	equal(t, allowed, 20, "copies allowed in a burst at maxRate 20")
	atomic.AddInt64(&st.tat, -int64(time.Second)) // a second later
	allowed = 0
	for i := 0; i < 100; i++ {
		if allow(st, s.rateInterval, s.rateTolerance) {
			allowed++
		}
	}
	equal(t, allowed, 20, "copies allowed a second later")
}

func TestNewAcceptsGoodConfiguration(t *testing.T) {
	for _, u := range []string{"http://127.0.0.1:8080", "https://mirror.example", "http://mirror/base/", "http://[::1]:9000/a%2Fb"} {
		cfg := CreateConfig()
		cfg.URL = u
		cfg.MaxBodySize = -1
		cfg.Percent = 0
		_, err := New(context.Background(), http.NotFoundHandler(), cfg, testName(t))
		if err != nil {
			t.Errorf("%s: got error %v, want none", u, err)
		}
	}
}

func TestBodies(t *testing.T) {
	const limit = 128 << 10
	tests := []struct {
		desc     string
		body     []byte
		chunked  bool
		method   string
		expCopy  bool
		expOutc  outcome
		maxBody  int64
		noMirror bool // mirrorBody false
	}{
		{desc: "no body", method: http.MethodGet, expCopy: true, expOutc: sent},
		{desc: "empty POST", body: []byte{}, method: http.MethodPost, expCopy: true, expOutc: sent},
		{desc: "1 byte", body: []byte("x"), method: http.MethodPost, expCopy: true, expOutc: sent},
		{desc: "64 KiB binary", body: randomBytes(t, 64<<10), method: http.MethodPut, expCopy: true, expOutc: sent},
		{desc: "exactly maxBodySize", body: randomBytes(t, limit), method: http.MethodPost, expCopy: true, expOutc: sent},
		{desc: "maxBodySize+1", body: randomBytes(t, limit+1), method: http.MethodPost, expOutc: tooLarge},
		{desc: "chunked", body: randomBytes(t, 100<<10), chunked: true, method: http.MethodPatch, expCopy: true, expOutc: sent},
		{desc: "chunked exactly maxBodySize", body: randomBytes(t, limit), chunked: true, method: http.MethodPost, expCopy: true, expOutc: sent},
		{desc: "chunked maxBodySize+1", body: randomBytes(t, limit+1), chunked: true, method: http.MethodPost, expOutc: tooLarge},
		{desc: "chunked empty", body: []byte{}, chunked: true, method: http.MethodPost, expCopy: true, expOutc: sent},
		{desc: "no limit", body: randomBytes(t, 3<<20), method: http.MethodPost, maxBody: -1, expCopy: true, expOutc: sent},
		{desc: "mirrorBody false", body: []byte("secret"), method: http.MethodPost, noMirror: true, expCopy: true, expOutc: sent},
		{desc: "mirrorBody false over limit", body: randomBytes(t, limit+1), method: http.MethodDelete, noMirror: true, expCopy: true, expOutc: sent},
	}
	for _, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			t.Parallel()
			cfg := CreateConfig()
			cfg.MaxBodySize = limit
			if test.maxBody != 0 {
				cfg.MaxBodySize = test.maxBody
			}
			cfg.MirrorBody = !test.noMirror
			s := newStack(t, cfg, nil)

			var body io.Reader
			if test.body != nil {
				body = bytes.NewReader(test.body)
				if test.chunked {
					body = chunked{body}
				}
			}
			req, err := http.NewRequest(test.method, s.front.URL+"/upload?x=1", body)
			noError(t, err)
			status, _ := s.do(t, req)
			equal(t, status, http.StatusOK, "status")

			p := s.primary.next(t)
			noError(t, p.bodyErr)
			equal(t, len(p.body), len(test.body), "primary body length")
			if !bytes.Equal(test.body, p.body) { // nil and empty are equal
				t.Errorf("primary body differs")
			}
			if test.chunked && len(test.body) > 0 {
				equal(t, p.contentLength, -1, "primary ContentLength (it should still get a chunked body)")
			}

			s.waitOutcome(t, test.expOutc, 1)
			if !test.expCopy {
				s.mirror.assertNothing(t)
				return
			}
			c := s.mirror.next(t)
			equal(t, c.method, test.method, "copy method")
			equal(t, c.path, "/upload", "copy path")
			if test.noMirror {
				equal(t, len(c.body), 0, "copy body length")
				equal(t, c.contentLength, 0, "copy ContentLength")
			} else {
				equal(t, len(c.body), len(test.body), "copy body length")
				if !bytes.Equal(test.body, c.body) { // nil and empty are equal
					t.Errorf("copy body differs")
				}
			}
			eventually(t, func() bool { return s.inflight() == 0 }, "copies still in flight")
		})
	}
}

func TestCopyHeadersAndURL(t *testing.T) {
	mirrorSrv := newUpstream(t, nil)
	cfg := CreateConfig()
	cfg.URL = mirrorSrv.URL + "/shadow/"
	s := newStack(t, cfg, nil)
	s.mirror = mirrorSrv

	req, err := http.NewRequest(http.MethodPost, s.front.URL+"/api/a%2Fb/items?q=1;r=2&q=3", strings.NewReader(`{"a":1}`))
	noError(t, err)
	req.Host = "shop.example"
	req.Header.Add("Accept", "text/plain")
	req.Header.Add("Accept", "application/json")
	req.Header.Set("Authorization", "Bearer t")
	req.Header.Set("Connection", "X-Hop")
	req.Header.Set("X-Hop", "1")
	req.Header.Set("Proxy-Authorization", "Basic x")
	req.Header.Set("Proxy-Foo", "1")
	req.Header.Set("X-Forwarded-For", "203.0.113.9")
	req.Header.Set("Te", "trailers")
	req.Header.Set("User-Agent", "")
	status, _ := s.do(t, req)
	equal(t, status, http.StatusOK, "status")

	p := s.primary.next(t)
	c := s.mirror.next(t)
	equal(t, c.path, "/shadow/api/a%2Fb/items", "copy path")
	equal(t, c.rawQuery, p.rawQuery, "copy query (the query as the primary gets it)")
	equal(t, c.host, strings.TrimPrefix(mirrorSrv.URL, "http://"), "copy Host")
	equal(t, c.header.Get(markerHeader), testName(t), "copy "+markerHeader)
	if got, want := c.header.Values("Accept"), []string{"text/plain", "application/json"}; !slices.Equal(got, want) {
		t.Errorf("copy Accept: got %q, want %q", got, want)
	}
	equal(t, c.header.Get("Authorization"), "Bearer t", "copy Authorization")
	equal(t, string(c.body), `{"a":1}`, "copy body")
	for _, h := range []string{"X-Hop", "Proxy-Authorization", "Connection", "User-Agent"} {
		if v := c.header.Values(h); len(v) != 0 {
			t.Errorf("copy %s: got %q, want none", h, v)
		}
	}
	// Te is hop-by-hop, but Go's proxy keeps "trailers" for the primary: so does the copy.
	equal(t, c.header.Get("Te"), p.header.Get("Te"), "copy Te, against the primary's")
	equal(t, c.header.Get("Te"), "trailers", "copy Te")
	// Same X-Forwarded-For as the primary got from the reverse proxy.
	equal(t, c.header.Get("X-Forwarded-For"), p.header.Get("X-Forwarded-For"), "copy X-Forwarded-For, against the primary's")
	equal(t, c.header.Get("X-Forwarded-For"), "203.0.113.9, 127.0.0.1", "copy X-Forwarded-For")
	// The primary sees the request unchanged.
	equal(t, p.host, "shop.example", "primary Host")
	equal(t, p.header.Get(markerHeader), "", "primary "+markerHeader)
	// Like the primary's proxy, only the standard Proxy-* headers are hop-by-hop.
	equal(t, p.header.Get("Proxy-Foo"), "1", "primary Proxy-Foo")
	equal(t, c.header.Get("Proxy-Foo"), "1", "copy Proxy-Foo")
}

func TestNotCopied(t *testing.T) {
	tests := []struct {
		desc    string
		prepare func(*http.Request)
		percent float64
		expOutc outcome
		expCopy bool
	}{
		// A client cannot stop its request being copied by sending the marker: only the loop
		// header with this process's token marks a copy of its own.
		{desc: "client X-Mirrored-By is copied", prepare: func(r *http.Request) { r.Header.Set(markerHeader, "other@file") }, percent: 100, expOutc: sent, expCopy: true},
		{desc: "own copy come back", prepare: func(r *http.Request) { r.Header.Set(loopHeader, "abc, "+processToken) }, percent: 100, expOutc: skipped},
		{desc: "websocket upgrade", prepare: func(r *http.Request) {
			r.Header.Set("Connection", "Upgrade")
			r.Header.Set("Upgrade", "websocket")
		}, percent: 100, expOutc: skipped},
		{desc: "sampled out", prepare: func(*http.Request) {}, percent: 1e-9, expOutc: sampledOut},
	}
	for _, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			t.Parallel()
			mirrorSrv := newUpstream(t, nil)
			cfg := CreateConfig()
			cfg.URL = mirrorSrv.URL
			cfg.Percent = test.percent
			var seen *http.Request
			h, err := New(context.Background(), http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { seen = r }), cfg, testName(t))
			noError(t, err)
			req := httptest.NewRequest(http.MethodGet, "/ws", nil)
			test.prepare(req)
			h.ServeHTTP(httptest.NewRecorder(), req)
			if seen != req {
				t.Errorf("the request goes on unchanged: next got %p, want %p", seen, req)
			}
			m := h.(*mirror)
			if test.expCopy {
				c := mirrorSrv.next(t)
				equal(t, c.header.Get(markerHeader), testName(t), "copy "+markerHeader)
				if seen != nil {
					equal(t, seen.Header.Get(markerHeader), "other@file", "next's "+markerHeader)
				}
				eventually(t, func() bool { return m.st.get(test.expOutc) >= 1 }, "%s not counted", outcomeNames[test.expOutc])
			}
			equal(t, m.st.get(test.expOutc), 1, outcomeNames[test.expOutc])
			equal(t, inflight(m), 0, "copies in flight")
			mirrorSrv.assertNothing(t)
		})
	}
}

func TestPercentZeroIsOff(t *testing.T) {
	cfg := CreateConfig()
	cfg.URL = "http://127.0.0.1:1"
	cfg.Percent = 0
	defer func(saved func(string)) { debugLine = saved }(debugLine)
	var lines []string
	debugLine = func(line string) { lines = append(lines, line) }
	next := http.NewServeMux()
	h, err := New(context.Background(), next, cfg, testName(t))
	noError(t, err)
	if h != next {
		t.Errorf("got handler %p, want the next handler itself (%p): nothing runs per request", h, next)
	}
	if want := []string{"mirror " + testName(t) + ": percent=0, mirroring is off"}; !slices.Equal(lines, want) {
		t.Errorf("debug lines: got %q, want %q", lines, want)
	}
}

func TestPercentSamples(t *testing.T) {
	mirrorSrv := newUpstream(t, nil)
	cfg := CreateConfig()
	cfg.URL = mirrorSrv.URL
	cfg.Percent = 30
	cfg.MaxInflight = 4096
	h, err := New(context.Background(), http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}), cfg, testName(t))
	noError(t, err)
	m := h.(*mirror)
	const n = 2000
	for i := 0; i < n; i++ {
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil))
	}
	eventually(t, func() bool { return m.st.get(sent)+m.st.get(sampledOut) == n }, "sent+sampledOut is not %d", n)
	// Binomial(2000, 0.3): mean 600, standard deviation 20.5; allow 5 deviations.
	if got := m.st.get(sent); got < 600-103 || got > 600+103 {
		t.Errorf("sent: got %d, want 600 ± 103", got)
	}
	equal(t, m.st.get(failed)+m.st.get(dropped), 0, "failed+dropped")
}

// The copy goes out with the primary, not after it: the primary answers only once the mirror
// has the copy.
func TestCopyLeavesBeforePrimaryAnswers(t *testing.T) {
	for _, body := range []string{"", "payload"} {
		mirrorGot := make(chan struct{})
		mirrorSrv := newUpstream(t, func(http.ResponseWriter, *http.Request) { close(mirrorGot) })
		primary := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			select {
			case <-mirrorGot:
				rw.WriteHeader(http.StatusOK)
			case <-time.After(waitLimit):
				rw.WriteHeader(http.StatusGatewayTimeout)
			}
		}))
		t.Cleanup(primary.Close)
		cfg := CreateConfig()
		cfg.URL = mirrorSrv.URL
		pu, _ := url.Parse(primary.URL)
		h, err := New(context.Background(), proxyTo(pu), cfg, testName(t))
		noError(t, err)
		front := httptest.NewServer(h)
		t.Cleanup(front.Close)
		resp, err := http.Post(front.URL, "text/plain", strings.NewReader(body))
		noError(t, err)
		resp.Body.Close()
		equal(t, resp.StatusCode, http.StatusOK, fmt.Sprintf("status, body %q", body))
	}
}

// The copy is not cancelled when the primary has answered and the client has gone.
func TestCopyOutlivesClientRequest(t *testing.T) {
	release := make(chan struct{})
	s := newStack(t, CreateConfig(), func(rw http.ResponseWriter, _ *http.Request) {
		<-release
		rw.WriteHeader(http.StatusAccepted)
	})
	status, _ := s.do(t, newRequest(t, http.MethodPost, s.front.URL+"/x", strings.NewReader("abc")))
	equal(t, status, http.StatusOK, "status")
	s.mirror.next(t)
	s.front.CloseClientConnections()
	close(release)
	s.waitOutcome(t, sent, 1)
	equal(t, s.m.st.get(failed), 0, "failed")
}

func TestMirrorFailuresNeverReachThePrimary(t *testing.T) {
	tests := []struct {
		desc   string
		answer func(rw http.ResponseWriter, r *http.Request, hung <-chan struct{})
		down   bool
		expErr string
	}{
		{desc: "down", down: true, expErr: "connection refused"},
		{desc: "slow", answer: func(_ http.ResponseWriter, r *http.Request, _ <-chan struct{}) {
			select { // slower than the primary, within the timeout
			case <-time.After(100 * time.Millisecond):
			case <-r.Context().Done():
			}
		}},
		{desc: "hung", answer: func(_ http.ResponseWriter, _ *http.Request, hung <-chan struct{}) { <-hung }, expErr: "context deadline exceeded"},
		{desc: "500", answer: func(rw http.ResponseWriter, _ *http.Request, _ <-chan struct{}) {
			rw.WriteHeader(http.StatusInternalServerError)
		}, expErr: "mirror answered 500"},
		{desc: "reset", answer: func(rw http.ResponseWriter, _ *http.Request, _ <-chan struct{}) {
			conn, _, err := rw.(http.Hijacker).Hijack()
			if err == nil {
				_ = conn.(*net.TCPConn).SetLinger(0)
				conn.Close()
			}
		}, expErr: "connection reset"},
		{desc: "garbage", answer: func(rw http.ResponseWriter, _ *http.Request, _ <-chan struct{}) {
			conn, buf, err := rw.(http.Hijacker).Hijack()
			if err == nil {
				_, _ = buf.WriteString("NOT HTTP\r\n\r\n")
				_ = buf.Flush()
				conn.Close()
			}
		}, expErr: "malformed HTTP"},
	}
	for _, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			t.Parallel()
			cfg := CreateConfig()
			cfg.Timeout = "1s" // within it, a refusal or a bad answer is seen even on a loaded machine
			if test.expErr == "" {
				cfg.Timeout = "5s"
			}
			if test.down {
				addr, _ := refusedAddr(t)
				cfg.URL = "http://" + addr
			}
			hung := make(chan struct{})
			var answer func(http.ResponseWriter, *http.Request)
			if test.answer != nil {
				answer = func(rw http.ResponseWriter, r *http.Request) { test.answer(rw, r, hung) }
			}
			s := newStack(t, cfg, answer)
			t.Cleanup(func() { close(hung) }) // before the servers close
			const n = 5
			for i := 0; i < n; i++ {
				body := randomBytes(t, 1000*i)
				status, got := s.do(t, newRequest(t, http.MethodPost, s.front.URL+"/p", bytes.NewReader(body)))
				equal(t, status, http.StatusOK, "status")
				if len(got) != 0 {
					t.Errorf("answer body: got %q, want none", got)
				}
				p := s.primary.next(t)
				if !bytes.Equal(body, p.body) {
					t.Errorf("primary body differs: got %d bytes, want %d", len(p.body), len(body))
				}
			}
			if test.expErr == "" {
				s.waitOutcome(t, sent, n)
				eventually(t, func() bool { return s.inflight() == 0 }, "copies still in flight")
				return
			}
			s.waitOutcome(t, failed, n)
			eventually(t, func() bool { return strings.Contains(s.stderr.String(), "failed=") }, "no failed= line on stderr")
			contains(t, s.stderr.String(), "mirror "+testName(t)+": ")
			contains(t, s.stderr.String(), test.expErr)
			eventually(t, func() bool { return s.inflight() == 0 }, "copies still in flight")
		})
	}
}

func TestSaturationDropsAndNeverBlocks(t *testing.T) {
	release := make(chan struct{})
	cfg := CreateConfig()
	cfg.MaxInflight = 2
	s := newStack(t, cfg, func(http.ResponseWriter, *http.Request) { <-release })
	const n = 20
	for i := 0; i < n; i++ {
		status, _ := s.do(t, newRequest(t, http.MethodGet, s.front.URL+"/", nil))
		equal(t, status, http.StatusOK, "status")
	}
	s.waitOutcome(t, dropped, n-2)
	equal(t, s.inflight(), 2, "copies in flight")
	eventually(t, func() bool { return strings.Contains(s.stderr.String(), "dropped=") }, "no dropped= line on stderr")
	close(release)
	s.waitOutcome(t, sent, 2)
	eventually(t, func() bool { return s.inflight() == 0 }, "copies still in flight")
}

// A client that streams its body and waits for the primary's answer before sending the rest
// works as it does without the middleware, and the copy carries the whole body.
func TestStreamingRequestBody(t *testing.T) {
	primary := httptest.NewServer(fullDuplex(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		br := bufio.NewReader(r.Body)
		first, err := br.ReadString('\n')
		if err != nil {
			rw.WriteHeader(http.StatusBadRequest)
			return
		}
		rw.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(rw, "ack "+first)
		rw.(http.Flusher).Flush()
		rest, _ := io.ReadAll(br)
		_, _ = rw.Write(rest)
	})))
	t.Cleanup(primary.Close)
	mirrorSrv := newUpstream(t, nil)
	cfg := CreateConfig()
	cfg.URL = mirrorSrv.URL
	pu, _ := url.Parse(primary.URL)
	h, err := New(context.Background(), proxyTo(pu), cfg, testName(t))
	noError(t, err)
	front := httptest.NewServer(fullDuplex(h))
	t.Cleanup(front.Close)

	pr, pw := io.Pipe()
	req, err := http.NewRequest(http.MethodPost, front.URL+"/stream", pr)
	noError(t, err)
	done := make(chan *http.Response, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req) //nolint:bodyclose // closed by the test once read
		if err != nil {
			pr.CloseWithError(err)
			close(done)
			return
		}
		done <- resp
	}()
	_, err = io.WriteString(pw, "hello\n")
	noError(t, err)
	var resp *http.Response
	select {
	case resp = <-done:
	case <-time.After(waitLimit):
		t.Fatal("the primary's answer did not come before the body ended")
	}
	if resp == nil {
		t.Fatal("got no answer, want the primary's (the request failed)")
	}
	defer resp.Body.Close()
	ack := make([]byte, len("ack hello\n"))
	_, err = io.ReadFull(resp.Body, ack)
	noError(t, err)
	equal(t, string(ack), "ack hello\n", "first part of the answer")
	_, err = io.WriteString(pw, "world")
	noError(t, err)
	noError(t, pw.Close())
	rest, err := io.ReadAll(resp.Body)
	noError(t, err)
	equal(t, string(rest), "world", "rest of the answer")

	c := mirrorSrv.next(t)
	equal(t, string(c.body), "hello\nworld", "copy body")
}

// cutBody gives part of a body, then fails as a client that went away.
type cutBody struct{ r io.Reader }

func (c *cutBody) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if err == io.EOF {
		return n, io.ErrUnexpectedEOF
	}
	return n, err
}
func (c *cutBody) Close() error { return nil }

func TestBodyCutShort(t *testing.T) {
	for _, length := range []int64{100, -1} {
		t.Run(fmt.Sprint("ContentLength ", length), func(t *testing.T) {
			mirrorSrv := newUpstream(t, nil)
			cfg := CreateConfig()
			cfg.URL = mirrorSrv.URL
			var got []byte
			var gotErr error
			h, err := New(context.Background(), http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
				got, gotErr = io.ReadAll(r.Body)
			}), cfg, testName(t))
			noError(t, err)
			req := httptest.NewRequest(http.MethodPost, "/", nil)
			req.Body = &cutBody{strings.NewReader(strings.Repeat("a", 50))}
			req.ContentLength = length
			h.ServeHTTP(httptest.NewRecorder(), req)
			equal(t, string(got), strings.Repeat("a", 50), "body the primary read")
			if !errors.Is(gotErr, io.ErrUnexpectedEOF) {
				t.Errorf("primary's read error: got %v, want %v", gotErr, io.ErrUnexpectedEOF)
			}
			m := h.(*mirror)
			equal(t, m.st.get(skipped), 1, "skipped")
			equal(t, inflight(m), 0, "copies in flight")
			mirrorSrv.assertNothing(t)
		})
	}
}

// A primary that answers without reading the body must not leave the slot taken.
func TestUnreadChunkedBodyReleasesSlot(t *testing.T) {
	mirrorSrv := newUpstream(t, nil)
	cfg := CreateConfig()
	cfg.URL = mirrorSrv.URL
	cfg.MaxInflight = 1
	h, err := New(context.Background(), http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
		rw.WriteHeader(http.StatusForbidden)
	}), cfg, testName(t))
	noError(t, err)
	req := httptest.NewRequest(http.MethodPost, "/", chunked{strings.NewReader("data")})
	req.ContentLength = -1
	h.ServeHTTP(httptest.NewRecorder(), req)
	m := h.(*mirror)
	equal(t, m.st.get(skipped), 1, "skipped")
	equal(t, inflight(m), 0, "copies in flight")
}

func TestOutcomeLogIsRateLimited(t *testing.T) {
	var stdout, stderr syncBuffer
	o := stateFor("api@" + testName(t))
	o.debug = func(line string) { _, _ = stdout.Write([]byte(line + "\n")) }
	o.error = func(line string) { _, _ = stderr.Write([]byte(line + "\n")) }
	count(o, failed, fmt.Errorf("first"))
	equal(t, stderr.String(), "mirror api@"+testName(t)+": failed=1 lastError=\"first\"\n", "stderr")
	for i := 0; i < 4; i++ {
		count(o, failed, fmt.Errorf("boom %d", i))
		count(o, sent, nil)
	}
	count(o, dropped, nil)
	equal(t, strings.Count(stderr.String(), "\n"), 1, "stderr lines (no second line within the interval)")
	// The pending line is written when the interval ends; bring that forward.
	o.flush()
	equal(t, stderr.String(), "mirror api@"+testName(t)+": failed=1 lastError=\"first\"\nmirror api@"+testName(t)+": sent=4 failed=4 dropped=1 lastError=\"boom 3\"\n", "stderr")
	o.flush()
	equal(t, strings.Count(stderr.String(), "\n"), 2, "stderr lines (nothing new, no line)")

	o.nextLine.Store(0)
	o.pending.Store(false)
	count(o, sent, nil)
	equal(t, stdout.String(), "mirror api@"+testName(t)+": sent=1\n", "stdout (successes go to DEBUG)")

	// A line carries the last error of its own interval, never an older one.
	o.nextLine.Store(0)
	o.pending.Store(false)
	count(o, dropped, nil)
	equal(t, stderr.String()[strings.LastIndex(stderr.String()[:len(stderr.String())-1], "\n")+1:],
		"mirror api@"+testName(t)+": dropped=1\n", "the line after an interval without errors")
}

// ERROR lines carry Traefik's timestamp only, not the log package's too.
func TestErrorLineHasNoTimestamp(t *testing.T) {
	defer func(saved io.Writer) { errorOut = saved }(errorOut)
	var buf syncBuffer
	errorOut = &buf
	errorLine("mirror api@file: failed=1")
	equal(t, buf.String(), "mirror api@file: failed=1\n", "the line written")
}

// pipeRequest is a request whose body the test writes, of the given length (-1: unknown).
func pipeRequest(length int64, header http.Header) (*http.Request, *io.PipeWriter) {
	pr, pw := io.Pipe()
	req := httptest.NewRequest(http.MethodPost, "/upload", nil)
	req.Body = pr
	req.ContentLength = length
	for k, v := range header {
		req.Header[k] = v
	}
	return req, pw
}

// Only a small body of known length is read before the primary is called; a larger one, and one
// whose client waits for "100 Continue", are copied as the primary reads them.
func TestBodyNotReadAhead(t *testing.T) {
	tests := []struct {
		desc   string
		size   int
		header http.Header
	}{
		{desc: "over 64 KiB", size: readAhead + 1},
		{desc: "1 MiB", size: 1 << 20},
		{desc: "Expect: 100-continue", size: 100, header: http.Header{"Expect": {"100-continue"}}},
	}
	for _, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			t.Parallel()
			mirrorSrv := newUpstream(t, nil)
			cfg := CreateConfig()
			cfg.URL = mirrorSrv.URL
			entered := make(chan struct{})
			var got []byte
			h, err := New(context.Background(), http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
				close(entered)
				got, _ = io.ReadAll(r.Body)
			}), cfg, testName(t))
			noError(t, err)
			body := randomBytes(t, test.size)
			req, pw := pipeRequest(int64(test.size), test.header)
			done := make(chan struct{})
			go func() {
				defer close(done)
				h.ServeHTTP(httptest.NewRecorder(), req)
			}()
			select {
			case <-entered: // before a byte of the body was sent
			case <-time.After(waitLimit):
				pw.Close()
				t.Fatal("the primary was not called before the body came")
			}
			_, err = pw.Write(body)
			noError(t, err)
			pw.Close()
			<-done
			if !bytes.Equal(got, body) {
				t.Errorf("the primary read %d bytes, want the %d sent", len(got), len(body))
			}
			c := mirrorSrv.next(t)
			if !bytes.Equal(c.body, body) {
				t.Errorf("the copy carries %d bytes, want the %d sent", len(c.body), len(body))
			}
		})
	}
}

// A client that sends its body slowly holds a slot for at most timeout: its copy is abandoned
// and counted as skipped, and other requests are copied while it still sends.
func TestSlowBodyReleasesSlotAtTimeout(t *testing.T) {
	cfg := CreateConfig()
	cfg.Timeout = "200ms"
	cfg.MaxInflight = 1
	s := newStack(t, cfg, nil)
	for _, length := range []int64{-1, 1 << 20} {
		t.Run(fmt.Sprint("ContentLength ", length), func(t *testing.T) {
			eventually(t, func() bool { return s.inflight() == 0 }, "the last copy still holds the slot")
			before := s.m.st.get(skipped)
			req, pw := pipeRequest(length, nil)
			defer pw.Close()
			req.URL, req.Host, req.RequestURI = mustParse(t, s.front.URL+"/slow"), "", ""
			go func() {
				resp, err := s.front.Client().Do(req)
				if err == nil {
					resp.Body.Close()
				}
			}()
			// Then nothing more. (Enough for the client to send its headers: it flushes them with
			// the first 4 KiB of a body of known length.)
			_, err := pw.Write(bytes.Repeat([]byte("a"), 8<<10))
			noError(t, err)
			eventually(t, func() bool { return s.m.st.get(skipped) == before+1 }, "the slow body's copy was not abandoned")
			equal(t, s.inflight(), 0, "copies in flight once abandoned")
			status, _ := s.do(t, newRequest(t, http.MethodPost, s.front.URL+"/other", strings.NewReader("x")))
			equal(t, status, http.StatusOK, "status")
			equal(t, s.mirror.next(t).path, "/other", "the next copy")
		})
	}
}

func mustParse(t *testing.T, raw string) *url.URL {
	t.Helper()
	u, err := url.Parse(raw)
	noError(t, err)
	return u
}

// Everything read from the mirror is bounded: an answer with megabytes of headers fails the copy.
func TestMirrorAnswerHeadersAreBounded(t *testing.T) {
	s := newStack(t, CreateConfig(), func(rw http.ResponseWriter, _ *http.Request) {
		conn, buf, err := rw.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		_, _ = buf.WriteString("HTTP/1.1 200 OK\r\n")
		for i := 0; i < 2000; i++ {
			if _, err := buf.WriteString("X-Pad: " + strings.Repeat("p", 1000) + "\r\n"); err != nil {
				return
			}
		}
		_ = buf.Flush()
	})
	status, _ := s.do(t, newRequest(t, http.MethodGet, s.front.URL+"/", nil))
	equal(t, status, http.StatusOK, "status")
	s.waitOutcome(t, failed, 1)
	eventually(t, func() bool { return strings.Contains(s.stderr.String(), "headers exceeded") }, "no error line about the headers: %q", s.stderr.String())
}

// A mirror that refuses connections is not tried on every request: copies pause for dialPause,
// counted as failed at once, and resume when it is back.
func TestRefusedConnectionPausesCopies(t *testing.T) {
	addr, release := refusedAddr(t)
	cfg := CreateConfig()
	cfg.URL = "http://" + addr
	s := newStack(t, cfg, nil)

	status, _ := s.do(t, newRequest(t, http.MethodGet, s.front.URL+"/1", nil))
	equal(t, status, http.StatusOK, "status")
	s.waitOutcome(t, failed, 1)
	if !s.m.st.paused.Load() {
		t.Fatal("copies not paused, want the refused connection to pause them")
	}

	release() // the mirror comes back on the same address
	back := newUpstreamOn(t, addr)
	status, _ = s.do(t, newRequest(t, http.MethodGet, s.front.URL+"/2", nil))
	equal(t, status, http.StatusOK, "status")
	equal(t, s.m.st.get(failed), 2, "failed (counted before the primary ran: no copy was tried)")
	equal(t, s.inflight(), 0, "copies in flight")

	// Every 50ms, not every millisecond: each try is a request.
	if !poll(50*time.Millisecond, func() bool {
		s.do(t, newRequest(t, http.MethodGet, s.front.URL+"/3", nil))
		return s.m.st.get(sent) > 0
	}) {
		t.Fatalf("no copy sent after %s, want copies to resume once the pause is over", waitLimit)
	}
	equal(t, back.next(t).path, "/3", "path at the mirror back")
	contains(t, s.stderr.String(), "connection refused")
}

// refusedAddr reserves a loopback address that refuses connections: a socket bound to it and
// never listening keeps its port from the test's other servers (a port merely free a moment
// ago can become the next one's). release frees it.
func refusedAddr(t *testing.T) (addr string, release func()) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	noError(t, err)
	var once sync.Once
	release = func() { once.Do(func() { _ = syscall.Close(fd) }) }
	t.Cleanup(release)
	noError(t, syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
	sa, err := syscall.Getsockname(fd)
	noError(t, err)
	return fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port), release
}

func newUpstreamOn(t *testing.T, addr string) *upstream {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	noError(t, err)
	u := &upstream{got: make(chan received, 100)}
	u.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { u.got <- record(r) }))
	u.Listener.Close()
	u.Listener = l
	u.Start()
	t.Cleanup(u.Close)
	return u
}

// A mirror that answers 101 Switching Protocols to a copy and holds the connection fails the
// copy at once: its slot does not wait for the mirror to close, and the connection is closed.
func TestMirrorAnswering101FailsAtOnce(t *testing.T) {
	closed := make(chan struct{})
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	cfg := CreateConfig()
	cfg.Timeout = "30s"
	s := newStack(t, cfg, func(rw http.ResponseWriter, _ *http.Request) {
		conn, buf, err := rw.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		_, _ = buf.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
		_ = buf.Flush()
		go func() {
			select {
			case <-release:
			case <-time.After(time.Minute):
			}
			conn.Close()
		}()
		if _, err := buf.ReadByte(); err != nil {
			close(closed) // Traefik's side closed the connection
		}
	})
	status, _ := s.do(t, newRequest(t, http.MethodGet, s.front.URL+"/", nil))
	equal(t, status, http.StatusOK, "status")
	s.waitOutcome(t, failed, 1)
	equal(t, inflight(s.m), 0, "copies holding a slot")
	select {
	case <-closed:
	case <-time.After(waitLimit):
		t.Fatal("the upgraded connection to the mirror was not closed")
	}
	eventually(t, func() bool { return strings.Contains(s.stderr.String(), "101 Switching Protocols") }, "no error line about the 101: %q", s.stderr.String())
}

// matchHeaders looks at 8 KiB of a header's values in all, however they are split.
func TestMatchHeadersLooksAtABoundedShare(t *testing.T) {
	re := regexp.MustCompile("a.*b")
	many := make([]string, 110)
	for i := range many {
		many[i] = strings.Repeat("a", 8000)
	}
	empties := make([]string, 10000)
	for _, test := range []struct {
		desc   string
		values []string
		exp    bool
	}{
		{"a small value", []string{"xaxb"}, true},
		{"one value of 8 KiB", []string{strings.Repeat("a", maxMatched-2) + "b"}, true},
		{"one value past 8 KiB", []string{strings.Repeat("a", maxMatched) + "b"}, false},
		{"the match past 8 KiB of values", append(append([]string(nil), many...), "ab"), false},
		{"the match after ten thousand empty values", append(append([]string(nil), empties...), "ab"), false},
	} {
		equal(t, matchesAny(re, test.values), test.exp, test.desc)
	}
}

// A caFile or compare.logFile that is not a regular file is refused at once: a FIFO would block
// New (and every configuration build of Traefik), /dev/zero would be read without end.
func TestOptionFilesMustBeRegular(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "fifo")
	noError(t, syscall.Mkfifo(fifo, 0o600))
	for _, test := range []struct {
		desc   string
		change func(*Config)
		expErr string
	}{
		{"caFile a FIFO", func(c *Config) { c.URL, c.CAFile = "https://mirror", fifo }, "not a regular file"},
		{"caFile /dev/zero", func(c *Config) { c.URL, c.CAFile = "https://mirror", "/dev/zero" }, "not a regular file"},
		{"compare.logFile a FIFO", func(c *Config) { c.Compare.Enabled, c.Compare.LogFile = true, fifo }, "not a regular file"},
	} {
		cfg := CreateConfig()
		cfg.URL = "http://127.0.0.1:1"
		test.change(cfg)
		cfg.FailClosed = true
		done := make(chan error, 1)
		go func() {
			_, err := New(context.Background(), http.NotFoundHandler(), cfg, testName(t))
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil {
				t.Errorf("%s: got no error", test.desc)
				continue
			}
			contains(t, err.Error(), test.expErr)
		case <-time.After(waitLimit):
			t.Fatalf("%s: New did not return within %s", test.desc, waitLimit)
		}
	}
	big := filepath.Join(t.TempDir(), "big.pem")
	noError(t, os.WriteFile(big, make([]byte, maxCAFile+1), 0o600))
	cfg := CreateConfig()
	cfg.URL, cfg.CAFile, cfg.FailClosed = "https://mirror", big, true
	_, err := New(context.Background(), http.NotFoundHandler(), cfg, testName(t))
	if err == nil {
		t.Fatal("a caFile past maxCAFile: got no error")
	}
	contains(t, err.Error(), "larger than")
}
