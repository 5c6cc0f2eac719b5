package mirror

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const waitLimit = 10 * time.Second

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
	require.NoError(t, err)
	h, err := New(context.Background(), httputil.NewSingleHostReverseProxy(pu), cfg, "mirror-test@file")
	require.NoError(t, err)
	s.m = h.(*mirror)
	s.m.out.error = func(line string) { _, _ = s.stderr.Write([]byte(line + "\n")) }
	s.m.out.debug = func(string) {}
	s.front = httptest.NewServer(h)
	t.Cleanup(s.front.Close)
	return s
}

// do sends req to the front server and returns the status and body of the answer.
func (s *stack) do(t *testing.T, req *http.Request) (int, []byte) {
	t.Helper()
	resp, err := s.front.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, body
}

// waitOutcome waits until outcome k has been counted n times.
func (s *stack) waitOutcome(t *testing.T, k outcome, n int64) {
	t.Helper()
	require.Eventually(t, func() bool { return s.m.out.get(k) >= n }, waitLimit, time.Millisecond,
		"%s: got %d, want %d", outcomeNames[k], s.m.out.get(k), n)
	assert.Equal(t, n, s.m.out.get(k), outcomeNames[k])
}

func (s *stack) inflight() int { return len(s.m.slots) }

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
	require.NoError(t, err)
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
	require.NoError(t, err)
	return b
}

// chunked hides the length of a body so that it is sent with Transfer-Encoding: chunked.
type chunked struct{ r io.Reader }

func (c chunked) Read(p []byte) (int, error) { return c.r.Read(p) }

func TestCreateConfigDefaults(t *testing.T) {
	assert.Equal(t, &Config{Percent: 100, MirrorBody: true, MaxBodySize: 1 << 20, Timeout: "5s", MaxInflight: 100}, CreateConfig())
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
	}
	for _, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			t.Parallel()
			cfg := CreateConfig()
			cfg.URL = "http://127.0.0.1:1"
			test.change(cfg)
			h, err := New(context.Background(), http.NotFoundHandler(), cfg, "m@file")
			require.Error(t, err)
			assert.Nil(t, h)
			assert.Contains(t, err.Error(), "mirror: "+test.expErr)
		})
	}
}

func TestNewAcceptsGoodConfiguration(t *testing.T) {
	for _, u := range []string{"http://127.0.0.1:8080", "https://mirror.example", "http://mirror/base/", "http://[::1]:9000/a%2Fb"} {
		cfg := CreateConfig()
		cfg.URL = u
		cfg.MaxBodySize = -1
		cfg.Percent = 0
		_, err := New(context.Background(), http.NotFoundHandler(), cfg, "m@file")
		assert.NoError(t, err, u)
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
			require.NoError(t, err)
			status, _ := s.do(t, req)
			assert.Equal(t, http.StatusOK, status)

			p := s.primary.next(t)
			require.NoError(t, p.bodyErr)
			assert.Equal(t, len(test.body), len(p.body), "primary body length")
			assert.True(t, bytes.Equal(test.body, p.body) || len(test.body) == 0 && len(p.body) == 0, "primary body differs")
			if test.chunked && len(test.body) > 0 {
				assert.Equal(t, int64(-1), p.contentLength, "primary should still get a chunked body")
			}

			s.waitOutcome(t, test.expOutc, 1)
			if !test.expCopy {
				s.mirror.assertNothing(t)
				return
			}
			c := s.mirror.next(t)
			assert.Equal(t, test.method, c.method)
			assert.Equal(t, "/upload", c.path)
			if test.noMirror {
				assert.Empty(t, c.body)
				assert.Equal(t, int64(0), c.contentLength)
			} else {
				assert.Equal(t, len(test.body), len(c.body), "copy body length")
				assert.True(t, bytes.Equal(test.body, c.body) || len(test.body) == 0 && len(c.body) == 0, "copy body differs")
			}
			require.Eventually(t, func() bool { return s.inflight() == 0 }, waitLimit, time.Millisecond)
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
	require.NoError(t, err)
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
	assert.Equal(t, http.StatusOK, status)

	p := s.primary.next(t)
	c := s.mirror.next(t)
	assert.Equal(t, "/shadow/api/a%2Fb/items", c.path)
	assert.Equal(t, p.rawQuery, c.rawQuery, "the query as the primary gets it")
	assert.Equal(t, strings.TrimPrefix(mirrorSrv.URL, "http://"), c.host)
	assert.Equal(t, "mirror-test@file", c.header.Get(markerHeader))
	assert.Equal(t, []string{"text/plain", "application/json"}, c.header.Values("Accept"))
	assert.Equal(t, "Bearer t", c.header.Get("Authorization"))
	assert.Equal(t, `{"a":1}`, string(c.body))
	for _, h := range []string{"X-Hop", "Proxy-Authorization", "Te", "Connection", "User-Agent"} {
		assert.Empty(t, c.header.Values(h), h)
	}
	// Same X-Forwarded-For as the primary got from the reverse proxy.
	assert.Equal(t, p.header.Get("X-Forwarded-For"), c.header.Get("X-Forwarded-For"))
	assert.Equal(t, "203.0.113.9, 127.0.0.1", c.header.Get("X-Forwarded-For"))
	// The primary sees the request unchanged.
	assert.Equal(t, "shop.example", p.host)
	assert.Empty(t, p.header.Get(markerHeader))
	// Like the primary's proxy, only the standard Proxy-* headers are hop-by-hop.
	assert.Equal(t, "1", p.header.Get("Proxy-Foo"))
	assert.Equal(t, "1", c.header.Get("Proxy-Foo"))
}

func TestNotCopied(t *testing.T) {
	tests := []struct {
		desc    string
		prepare func(*http.Request)
		percent float64
		expOutc outcome
	}{
		{desc: "loop marker", prepare: func(r *http.Request) { r.Header.Set(markerHeader, "other@file") }, percent: 100, expOutc: skipped},
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
			h, err := New(context.Background(), http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { seen = r }), cfg, "m@file")
			require.NoError(t, err)
			req := httptest.NewRequest(http.MethodGet, "/ws", nil)
			test.prepare(req)
			h.ServeHTTP(httptest.NewRecorder(), req)
			assert.Same(t, req, seen, "the request goes on unchanged")
			assert.Equal(t, int64(1), h.(*mirror).out.get(test.expOutc))
			assert.Equal(t, 0, len(h.(*mirror).slots))
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
	h, err := New(context.Background(), next, cfg, "m@file")
	require.NoError(t, err)
	assert.Same(t, next, h, "the next handler itself: nothing runs per request")
	assert.Equal(t, []string{"mirror m@file: percent=0, mirroring is off"}, lines)
}

func TestPercentSamples(t *testing.T) {
	mirrorSrv := newUpstream(t, nil)
	cfg := CreateConfig()
	cfg.URL = mirrorSrv.URL
	cfg.Percent = 30
	cfg.MaxInflight = 4096
	h, err := New(context.Background(), http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}), cfg, "m@file")
	require.NoError(t, err)
	m := h.(*mirror)
	const n = 2000
	for i := 0; i < n; i++ {
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil))
	}
	require.Eventually(t, func() bool { return m.out.get(sent)+m.out.get(sampledOut) == n }, waitLimit, time.Millisecond)
	// Binomial(2000, 0.3): mean 600, standard deviation 20.5; allow 5 deviations.
	assert.InDelta(t, 600, m.out.get(sent), 103)
	assert.Equal(t, int64(0), m.out.get(failed)+m.out.get(dropped))
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
		h, err := New(context.Background(), httputil.NewSingleHostReverseProxy(pu), cfg, "m@file")
		require.NoError(t, err)
		front := httptest.NewServer(h)
		t.Cleanup(front.Close)
		resp, err := http.Post(front.URL, "text/plain", strings.NewReader(body))
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusOK, resp.StatusCode, "body %q", body)
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
	assert.Equal(t, http.StatusOK, status)
	s.mirror.next(t)
	s.front.CloseClientConnections()
	close(release)
	s.waitOutcome(t, sent, 1)
	assert.Equal(t, int64(0), s.m.out.get(failed))
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
			cfg.Timeout = "200ms"
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
				assert.Equal(t, http.StatusOK, status)
				assert.Empty(t, got)
				p := s.primary.next(t)
				assert.True(t, bytes.Equal(body, p.body), "primary body")
			}
			if test.expErr == "" {
				s.waitOutcome(t, sent, n)
				require.Eventually(t, func() bool { return s.inflight() == 0 }, waitLimit, time.Millisecond)
				return
			}
			s.waitOutcome(t, failed, n)
			require.Eventually(t, func() bool { return strings.Contains(s.stderr.String(), "failed=") }, waitLimit, time.Millisecond)
			assert.Contains(t, s.stderr.String(), "mirror mirror-test@file: ")
			assert.Contains(t, s.stderr.String(), test.expErr)
			require.Eventually(t, func() bool { return s.inflight() == 0 }, waitLimit, time.Millisecond)
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
		assert.Equal(t, http.StatusOK, status)
	}
	s.waitOutcome(t, dropped, n-2)
	assert.Equal(t, 2, s.inflight())
	require.Eventually(t, func() bool { return strings.Contains(s.stderr.String(), "dropped=") }, waitLimit, time.Millisecond)
	close(release)
	s.waitOutcome(t, sent, 2)
	require.Eventually(t, func() bool { return s.inflight() == 0 }, waitLimit, time.Millisecond)
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
	h, err := New(context.Background(), httputil.NewSingleHostReverseProxy(pu), cfg, "m@file")
	require.NoError(t, err)
	front := httptest.NewServer(fullDuplex(h))
	t.Cleanup(front.Close)

	pr, pw := io.Pipe()
	req, err := http.NewRequest(http.MethodPost, front.URL+"/stream", pr)
	require.NoError(t, err)
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
	require.NoError(t, err)
	var resp *http.Response
	select {
	case resp = <-done:
	case <-time.After(waitLimit):
		t.Fatal("the primary's answer did not come before the body ended")
	}
	require.NotNil(t, resp)
	defer resp.Body.Close()
	ack := make([]byte, len("ack hello\n"))
	_, err = io.ReadFull(resp.Body, ack)
	require.NoError(t, err)
	assert.Equal(t, "ack hello\n", string(ack))
	_, err = io.WriteString(pw, "world")
	require.NoError(t, err)
	require.NoError(t, pw.Close())
	rest, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, "world", string(rest))

	c := mirrorSrv.next(t)
	assert.Equal(t, "hello\nworld", string(c.body))
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
			}), cfg, "m@file")
			require.NoError(t, err)
			req := httptest.NewRequest(http.MethodPost, "/", nil)
			req.Body = &cutBody{strings.NewReader(strings.Repeat("a", 50))}
			req.ContentLength = length
			h.ServeHTTP(httptest.NewRecorder(), req)
			assert.Equal(t, strings.Repeat("a", 50), string(got))
			assert.ErrorIs(t, gotErr, io.ErrUnexpectedEOF)
			m := h.(*mirror)
			assert.Equal(t, int64(1), m.out.get(skipped))
			assert.Equal(t, 0, len(m.slots))
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
	}), cfg, "m@file")
	require.NoError(t, err)
	req := httptest.NewRequest(http.MethodPost, "/", chunked{strings.NewReader("data")})
	req.ContentLength = -1
	h.ServeHTTP(httptest.NewRecorder(), req)
	m := h.(*mirror)
	assert.Equal(t, int64(1), m.out.get(skipped))
	assert.Equal(t, 0, len(m.slots))
}

func TestOutcomeLogIsRateLimited(t *testing.T) {
	var stdout, stderr syncBuffer
	o := newOutcomes("api@file")
	o.debug = func(line string) { _, _ = stdout.Write([]byte(line + "\n")) }
	o.error = func(line string) { _, _ = stderr.Write([]byte(line + "\n")) }
	count(o, failed, fmt.Errorf("first"))
	assert.Equal(t, "mirror api@file: failed=1 lastError=\"first\"\n", stderr.String())
	for i := 0; i < 4; i++ {
		count(o, failed, fmt.Errorf("boom %d", i))
		count(o, sent, nil)
	}
	count(o, dropped, nil)
	assert.Equal(t, 1, strings.Count(stderr.String(), "\n"), "no second line within the interval")
	// The pending line is written when the interval ends; bring that forward.
	o.flush()
	assert.Equal(t, "mirror api@file: failed=1 lastError=\"first\"\nmirror api@file: sent=4 failed=4 dropped=1 lastError=\"boom 3\"\n", stderr.String())
	o.flush()
	assert.Equal(t, 2, strings.Count(stderr.String(), "\n"), "nothing new, no line")

	o.nextLine.Store(0)
	o.pending.Store(false)
	count(o, sent, nil)
	assert.Equal(t, "mirror api@file: sent=1\n", stdout.String(), "successes go to DEBUG")
}

// A mirror that refuses connections is not tried on every request: copies pause for dialPause,
// counted as failed at once, and resume when it is back.
func TestRefusedConnectionPausesCopies(t *testing.T) {
	addr, release := refusedAddr(t)
	cfg := CreateConfig()
	cfg.URL = "http://" + addr
	s := newStack(t, cfg, nil)

	status, _ := s.do(t, newRequest(t, http.MethodGet, s.front.URL+"/1", nil))
	assert.Equal(t, http.StatusOK, status)
	s.waitOutcome(t, failed, 1)
	require.True(t, s.m.paused.Load(), "the refused connection pauses copies")

	release() // the mirror comes back on the same address
	back := newUpstreamOn(t, addr)
	status, _ = s.do(t, newRequest(t, http.MethodGet, s.front.URL+"/2", nil))
	assert.Equal(t, http.StatusOK, status)
	assert.Equal(t, int64(2), s.m.out.get(failed), "counted before the primary ran: no copy was tried")
	assert.Equal(t, 0, s.inflight())

	require.Eventually(t, func() bool {
		s.do(t, newRequest(t, http.MethodGet, s.front.URL+"/3", nil))
		return s.m.out.get(sent) > 0
	}, waitLimit, 50*time.Millisecond, "copies resume once the pause is over")
	assert.Equal(t, "/3", back.next(t).path)
	assert.Contains(t, s.stderr.String(), "connection refused")
}

// refusedAddr reserves a loopback address that refuses connections: a socket bound to it and
// never listening keeps its port from the test's other servers (a port merely free a moment
// ago can become the next one's). release frees it.
func refusedAddr(t *testing.T) (addr string, release func()) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	var once sync.Once
	release = func() { once.Do(func() { _ = syscall.Close(fd) }) }
	t.Cleanup(release)
	require.NoError(t, syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
	sa, err := syscall.Getsockname(fd)
	require.NoError(t, err)
	return fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port), release
}

func newUpstreamOn(t *testing.T, addr string) *upstream {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	u := &upstream{got: make(chan received, 100)}
	u.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { u.got <- record(r) }))
	u.Listener.Close()
	u.Listener = l
	u.Start()
	t.Cleanup(u.Close)
	return u
}
