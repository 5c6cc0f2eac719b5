package tests

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/mitchellh/mapstructure"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/traefik/yaegi/interp"
	"github.com/traefik/yaegi/stdlib"
	"gopkg.in/yaml.v3"
)

const waitLimit = 10 * time.Second

// interpreted is the plugin loaded under Yaegi the way Traefik v3.6 loads it
// (pkg/plugins/middlewareyaegi.go).
type interpreted struct {
	fnNew, fnCreateConfig reflect.Value
	stdout, stderr        *harness.SyncBuffer
}

func loadInterpreted(t testing.TB) *interpreted {
	t.Helper()
	return loadPackage(t, harness.LayoutPlugin, harness.ModulePath, "mirror")
}

// loadPackage lays a plugin out in a GOPATH of its own and loads it under Yaegi, as Traefik does.
func loadPackage(t testing.TB, lay func(srcRoot string) (string, error), modulePath, pkg string) *interpreted {
	t.Helper()
	gopath := t.TempDir()
	_, err := lay(filepath.Join(gopath, "src"))
	require.NoError(t, err)
	p := &interpreted{stdout: &harness.SyncBuffer{}, stderr: &harness.SyncBuffer{}}
	i := interp.New(interp.Options{GoPath: gopath, Env: os.Environ(), Stdout: p.stdout, Stderr: p.stderr})
	require.NoError(t, i.Use(stdlib.Symbols))
	_, err = i.Eval(`import "` + modulePath + `"`)
	require.NoError(t, err)
	p.fnNew, err = i.Eval(pkg + ".New")
	require.NoError(t, err)
	p.fnCreateConfig, err = i.Eval(pkg + ".CreateConfig")
	require.NoError(t, err)
	return p
}

// handler decodes config as Traefik does (values as strings, as the file provider sends them)
// and calls New.
func (p *interpreted) handler(next http.Handler, config map[string]any, name string) (http.Handler, error) {
	vConfig := p.fnCreateConfig.Call(nil)[0]
	if len(config) > 0 {
		decoder, err := mapstructure.NewDecoder(&mapstructure.DecoderConfig{
			DecodeHook:       mapstructure.StringToSliceHookFunc(","),
			WeaklyTypedInput: true,
			Result:           vConfig.Interface(),
		})
		if err != nil {
			return nil, err
		}
		if err := decoder.Decode(config); err != nil {
			return nil, fmt.Errorf("failed to decode configuration: %w", err)
		}
	}
	results := p.fnNew.Call([]reflect.Value{reflect.ValueOf(context.Background()), reflect.ValueOf(next), vConfig, reflect.ValueOf(name)})
	if err, _ := results[1].Interface().(error); err != nil {
		return nil, err
	}
	return results[0].Interface().(http.Handler), nil
}

// asStrings turns every value into a string, as Traefik's file provider delivers them (maps
// stay maps, of strings).
func asStrings(m map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok {
			out[k] = asStrings(sub)
			continue
		}
		out[k] = fmt.Sprint(v)
	}
	return out
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

type chunked struct{ r io.Reader }

func (c chunked) Read(p []byte) (int, error) { return c.r.Read(p) }

// proxyTo is a reverse proxy to the primary, as Traefik's, with a transport of its own:
// httptest.Server.Close closes http.DefaultTransport's idle connections, which can break another
// test's request on a shared one.
func proxyTo(u *url.URL) *httputil.ReverseProxy {
	p := httputil.NewSingleHostReverseProxy(u)
	p.Transport = &http.Transport{}
	return p
}

// yaegiStack is a loopback server running the interpreted middleware in front of a reverse
// proxy to a recording primary, with a recording mirror.
type yaegiStack struct {
	front           *httptest.Server
	primary, mirror *harness.Upstream
	url             string // the mirror url configured
}

func newYaegiStack(t *testing.T, p *interpreted, config map[string]any, name string, mirrorAnswer http.HandlerFunc) *yaegiStack {
	t.Helper()
	s := &yaegiStack{}
	var err error
	s.primary, err = harness.StartUpstream("127.0.0.1:0", 100, nil)
	require.NoError(t, err)
	t.Cleanup(s.primary.Close)
	s.mirror, err = harness.StartUpstream("127.0.0.1:0", 100, mirrorAnswer)
	require.NoError(t, err)
	t.Cleanup(s.mirror.Close)
	if _, ok := config["url"]; !ok {
		config["url"] = s.mirror.URL
	}
	s.url = fmt.Sprint(config["url"])
	pu, err := url.Parse(s.primary.URL)
	require.NoError(t, err)
	h, err := p.handler(proxyTo(pu), asStrings(config), name)
	require.NoError(t, err)
	s.front = httptest.NewServer(h)
	t.Cleanup(s.front.Close)
	return s
}

func waitLine(t *testing.T, buf *harness.SyncBuffer, want string) {
	t.Helper()
	require.Eventually(t, func() bool { return strings.Contains(buf.String(), want) }, waitLimit, time.Millisecond,
		"no line %q in:\n%s", want, buf)
}

func TestYaegiTestDataFromManifest(t *testing.T) {
	p := loadInterpreted(t)
	raw, err := os.ReadFile(filepath.Join(harness.RepoRoot(), ".traefik.yml"))
	require.NoError(t, err)
	var manifest struct {
		Type     string         `yaml:"type"`
		Import   string         `yaml:"import"`
		BasePkg  string         `yaml:"basePkg"`
		TestData map[string]any `yaml:"testData"`
	}
	require.NoError(t, yaml.Unmarshal(raw, &manifest))
	assert.Equal(t, "middleware", manifest.Type)
	assert.Equal(t, harness.ModulePath, manifest.Import)
	assert.Equal(t, "mirror", manifest.BasePkg)
	require.NotEmpty(t, manifest.TestData)
	for _, config := range []map[string]any{manifest.TestData, asStrings(manifest.TestData)} {
		h, err := p.handler(http.NotFoundHandler(), config, "catalog@file")
		require.NoError(t, err)
		assert.NotNil(t, h)
	}
}

func TestYaegiRejectsBadConfiguration(t *testing.T) {
	p := loadInterpreted(t)
	tests := []struct {
		desc   string
		config map[string]any
		expErr string
	}{
		{"missing url", map[string]any{"percent": "50"}, "mirror: option url is required"},
		{"bad timeout", map[string]any{"url": "http://127.0.0.1:1", "timeout": "5"}, `mirror: invalid timeout "5": time: missing unit in duration`},
		{"percent 150", map[string]any{"url": "http://127.0.0.1:1", "percent": "150.000000"}, "mirror: invalid percent 150"},
		{"relative url", map[string]any{"url": "mirror/x"}, `mirror: invalid url "mirror/x"`},
		{"maxInflight 0", map[string]any{"url": "http://127.0.0.1:1", "maxInflight": "0"}, "mirror: invalid maxInflight 0"},
	}
	teapot := http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) { rw.WriteHeader(http.StatusTeapot) })
	for _, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			// By default the middleware fails open: every request goes to the next handler.
			h, err := p.handler(teapot, test.config, "bad@file")
			require.NoError(t, err)
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
			assert.Equal(t, http.StatusTeapot, rec.Code)

			closed := map[string]any{"failClosed": "true"}
			for k, v := range test.config {
				closed[k] = v
			}
			h, err = p.handler(teapot, closed, "bad@file")
			require.Error(t, err)
			assert.Nil(t, h)
			assert.Contains(t, err.Error(), test.expErr)
		})
	}
}

func TestYaegiBodiesAndHeaders(t *testing.T) {
	p := loadInterpreted(t)
	tests := []struct {
		desc    string
		method  string
		body    []byte
		chunked bool
		expCopy bool
		expLine string
	}{
		{desc: "GET", method: http.MethodGet, expCopy: true, expLine: "sent=1"},
		{desc: "1 byte", method: http.MethodPost, body: []byte("x"), expCopy: true, expLine: "sent=1"},
		{desc: "64 KiB", method: http.MethodPut, body: randomBytes(t, 64<<10), expCopy: true, expLine: "sent=1"},
		{desc: "at limit", method: http.MethodPost, body: randomBytes(t, 100<<10), expCopy: true, expLine: "sent=1"},
		{desc: "over limit", method: http.MethodPost, body: randomBytes(t, 100<<10+1), expLine: "tooLarge=1"},
		{desc: "chunked", method: http.MethodPatch, body: randomBytes(t, 80<<10), chunked: true, expCopy: true, expLine: "sent=1"},
		{desc: "chunked over limit", method: http.MethodPost, body: randomBytes(t, 100<<10+1), chunked: true, expLine: "tooLarge=1"},
	}
	for i, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			name := fmt.Sprintf("body-%d@file", i)
			s := newYaegiStack(t, p, map[string]any{"maxBodySize": 100 << 10, "timeout": "2s"}, name, nil)
			var body io.Reader
			if test.body != nil {
				body = bytes.NewReader(test.body)
				if test.chunked {
					body = chunked{body}
				}
			}
			req, err := http.NewRequest(test.method, s.front.URL+"/v1/items?id=7", body)
			require.NoError(t, err)
			req.Header.Set("X-Request-Id", "abc")
			req.Header.Set("Connection", "X-Hop")
			req.Header.Set("X-Hop", "1")
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			got, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			assert.Equal(t, "ok", string(got))

			primary, ok := s.primary.Next(waitLimit)
			require.True(t, ok)
			assert.True(t, bytes.Equal(test.body, primary.Body) || len(test.body)+len(primary.Body) == 0, "primary body")
			assert.Empty(t, primary.Header.Get("X-Mirrored-By"))

			waitLine(t, p.stdout, "mirror "+name+": "+test.expLine)
			if !test.expCopy {
				_, got := s.mirror.Next(0)
				assert.False(t, got, "no copy expected")
				return
			}
			c, ok := s.mirror.Next(waitLimit)
			require.True(t, ok)
			assert.Equal(t, test.method, c.Method)
			assert.Equal(t, "/v1/items", c.Path)
			assert.Equal(t, "id=7", c.RawQuery)
			assert.True(t, bytes.Equal(test.body, c.Body) || len(test.body)+len(c.Body) == 0, "copy body")
			assert.Equal(t, int64(len(test.body)), c.ContentLength, "the copy is sent with its length")
			assert.Equal(t, name, c.Header.Get("X-Mirrored-By"))
			assert.Equal(t, "abc", c.Header.Get("X-Request-Id"))
			assert.Empty(t, c.Header.Get("X-Hop"))
			assert.Equal(t, primary.Header.Get("X-Forwarded-For"), c.Header.Get("X-Forwarded-For"))
			assert.Equal(t, strings.TrimPrefix(s.mirror.URL, "http://"), c.Host)
		})
	}
}

func TestYaegiMirrorFailures(t *testing.T) {
	p := loadInterpreted(t)
	hung, err := harness.StartHung(0)
	require.NoError(t, err)
	t.Cleanup(hung.Close)
	down, err := harness.StartRefused()
	require.NoError(t, err)
	t.Cleanup(down.Close)

	tests := []struct {
		desc    string
		config  map[string]any
		answer  http.HandlerFunc
		expLine string
	}{
		{desc: "down", config: map[string]any{"url": "http://" + down.Addr}, expLine: "dial tcp " + down.Addr},
		{desc: "hung", config: map[string]any{"url": "http://" + hung.Addr, "timeout": "100ms"}, expLine: `context deadline exceeded"`},
		{desc: "500", answer: func(rw http.ResponseWriter, _ *http.Request) { rw.WriteHeader(500) }, expLine: `mirror answered 500 Internal Server Error"`},
	}
	for i, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			name := fmt.Sprintf("fail-%d@file", i)
			config := map[string]any{"timeout": "1s"}
			for k, v := range test.config {
				config[k] = v
			}
			s := newYaegiStack(t, p, config, name, test.answer)
			body := randomBytes(t, 4096)
			resp, err := http.Post(s.front.URL+"/", "application/octet-stream", bytes.NewReader(body))
			require.NoError(t, err)
			resp.Body.Close()
			assert.Equal(t, http.StatusOK, resp.StatusCode)
			primary, ok := s.primary.Next(waitLimit)
			require.True(t, ok)
			assert.True(t, bytes.Equal(body, primary.Body))
			// The error names the mirror.
			waitLine(t, p.stderr, "mirror "+name+": failed=1 lastError=\""+s.url+": "+test.expLine)
		})
	}
}

// After a refused connection copies pause; the timer that ends the pause runs interpreted code
// in a goroutine of its own, where a panic would kill Traefik.
func TestYaegiPauseEnds(t *testing.T) {
	p := loadInterpreted(t)
	down, err := harness.StartRefused()
	require.NoError(t, err)
	t.Cleanup(down.Close)
	s := newYaegiStack(t, p, map[string]any{"url": "http://" + down.Addr}, "pause@file", nil)
	get := func() bool {
		resp, err := http.Get(s.front.URL + "/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	require.True(t, get())
	waitLine(t, p.stderr, "mirror pause@file: failed=1")

	down.Close() // the mirror comes back on the same address
	back, err := harness.StartUpstream(down.Addr, 100, nil)
	require.NoError(t, err)
	t.Cleanup(back.Close)
	require.Eventually(t, func() bool {
		ok := get()
		_, got := back.Next(0)
		return ok && got
	}, waitLimit, 50*time.Millisecond, "copies resume once the pause is over")
}

func TestYaegiSaturationDrops(t *testing.T) {
	p := loadInterpreted(t)
	hung, err := harness.StartHung(0)
	require.NoError(t, err)
	t.Cleanup(hung.Close)
	s := newYaegiStack(t, p, map[string]any{"url": "http://" + hung.Addr, "maxInflight": 1, "timeout": "30s"}, "sat@file", nil)
	for i := 0; i < 3; i++ {
		resp, err := http.Get(s.front.URL + "/")
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusOK, resp.StatusCode)
	}
	waitLine(t, p.stderr, "mirror sat@file: dropped=1")
	assert.Equal(t, 1, hung.Open(), "one copy in flight")
}

func TestYaegiLoopAndUpgradeSkipped(t *testing.T) {
	p := loadInterpreted(t)
	s := newYaegiStack(t, p, map[string]any{}, "skip@file", nil)
	get := func(path string, header http.Header) {
		t.Helper()
		req, err := http.NewRequest(http.MethodGet, s.front.URL+path, nil)
		require.NoError(t, err)
		req.Header = header
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusOK, resp.StatusCode)
		_, ok := s.primary.Next(waitLimit)
		require.True(t, ok)
	}
	// A client's X-Mirrored-By and a stray Upgrade (no Connection: upgrade) are copied.
	get("/marked", http.Header{"X-Mirrored-By": {"skip@file"}, "Upgrade": {"foo/2"}})
	c, ok := s.mirror.Next(waitLimit)
	require.True(t, ok)
	assert.Equal(t, "/marked", c.Path)
	assert.Empty(t, c.Header.Get("Upgrade"), "hop-by-hop on the copy as on the primary")
	own := c.Header.Get("X-Mirror-Loop")
	require.NotEmpty(t, own)

	// The copy come back (this interpreter's token), and an upgrade, are not.
	get("/back", http.Header{"X-Mirror-Loop": {"0123, " + own}})
	get("/ws", http.Header{"Connection": {"keep-alive, Upgrade"}, "Upgrade": {"websocket"}})
	get("/copied", http.Header{"X-Mirror-Loop": {"another-replica"}})
	c, ok = s.mirror.Next(waitLimit)
	require.True(t, ok)
	assert.Equal(t, "/copied", c.Path)
	assert.Equal(t, "another-replica, "+own, c.Header.Get("X-Mirror-Loop"))
	_, got := s.mirror.Next(0)
	assert.False(t, got)
}

// A body that does not come within timeout is abandoned by a timer, which runs interpreted code
// in a goroutine of its own, and its slot is free again.
func TestYaegiSlowBodyAbandoned(t *testing.T) {
	p := loadInterpreted(t)
	s := newYaegiStack(t, p, map[string]any{"timeout": "200ms", "maxInflight": 1}, "slow@file", nil)
	pr, pw := io.Pipe()
	defer pw.Close()
	go func() {
		resp, err := http.Post(s.front.URL+"/slow", "text/plain", pr)
		if err == nil {
			resp.Body.Close()
		}
	}()
	_, err := pw.Write([]byte("a"))
	require.NoError(t, err)
	waitLine(t, p.stdout, "mirror slow@file: skipped=1")
	resp, err := http.Post(s.front.URL+"/other", "text/plain", strings.NewReader("x"))
	require.NoError(t, err)
	resp.Body.Close()
	c, ok := s.mirror.Next(waitLimit)
	require.True(t, ok)
	assert.Equal(t, "/other", c.Path)
}

// A body of unknown length goes through the interpreted tee while the primary streams.
func TestYaegiStreamingBody(t *testing.T) {
	p := loadInterpreted(t)
	primary := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		_ = http.NewResponseController(rw).EnableFullDuplex()
		br := bufio.NewReader(r.Body)
		first, _ := br.ReadString('\n')
		_, _ = io.WriteString(rw, "ack "+first)
		rw.(http.Flusher).Flush()
		rest, _ := io.ReadAll(br)
		_, _ = rw.Write(rest)
	}))
	t.Cleanup(primary.Close)
	mirrorSrv, err := harness.StartUpstream("127.0.0.1:0", 10, nil)
	require.NoError(t, err)
	t.Cleanup(mirrorSrv.Close)
	pu, _ := url.Parse(primary.URL)
	h, err := p.handler(proxyTo(pu), map[string]any{"url": mirrorSrv.URL}, "stream@file")
	require.NoError(t, err)
	front := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		_ = http.NewResponseController(rw).EnableFullDuplex()
		h.ServeHTTP(rw, r)
	}))
	t.Cleanup(front.Close)

	pr, pw := io.Pipe()
	respc := make(chan *http.Response, 1)
	go func() {
		resp, err := http.Post(front.URL+"/s", "text/plain", pr) //nolint:bodyclose // closed by the test once read
		if err != nil {
			close(respc)
			return
		}
		respc <- resp
	}()
	_, err = io.WriteString(pw, "hello\n")
	require.NoError(t, err)
	var resp *http.Response
	select {
	case resp = <-respc:
	case <-time.After(waitLimit):
		t.Fatal("no answer before the body ended")
	}
	require.NotNil(t, resp)
	defer resp.Body.Close()
	ack := make([]byte, len("ack hello\n"))
	_, err = io.ReadFull(resp.Body, ack)
	require.NoError(t, err)
	_, err = io.WriteString(pw, "world")
	require.NoError(t, err)
	require.NoError(t, pw.Close())
	rest, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, "world", string(rest))
	c, ok := mirrorSrv.Next(waitLimit)
	require.True(t, ok)
	assert.Equal(t, "hello\nworld", string(c.Body))
}

// Bodies past bodyBuffer under the interpreter: streamed whole to a mirror that keeps up, cut
// (and the primary not held back) by one that does not, ended by one that answers early.
func TestYaegiStreamedBodies(t *testing.T) {
	p := loadInterpreted(t)
	stream := map[string]any{"maxBodySize": -1, "bodyBuffer": 64 << 10, "streamStall": "50ms"}
	with := func(extra map[string]any) map[string]any {
		c := map[string]any{}
		for k, v := range stream {
			c[k] = v
		}
		for k, v := range extra {
			c[k] = v
		}
		return c
	}
	body := randomBytes(t, 3<<20+17)

	t.Run("whole", func(t *testing.T) {
		// The default buffer and stall: under -race the interpreter is slow enough that a 64 KiB
		// buffer and 50 ms cut copies to a mirror that keeps up.
		s := newYaegiStack(t, p, with(map[string]any{"bodyBuffer": 1 << 20, "streamStall": "200ms"}), "streamed@file", nil)
		for _, isChunked := range []bool{false, true} {
			var r io.Reader = bytes.NewReader(body)
			if isChunked {
				r = chunked{r}
			}
			resp, err := http.Post(s.front.URL+"/up", "application/octet-stream", r)
			require.NoError(t, err)
			resp.Body.Close()
			for _, u := range []*harness.Upstream{s.primary, s.mirror} {
				got, ok := u.Next(waitLimit)
				require.True(t, ok, "chunked %v: nothing at %s", isChunked, u.URL)
				require.NoError(t, got.BodyErr, "chunked %v at %s: %d bytes of %d", isChunked, u.URL, len(got.Body), len(body))
				assert.True(t, bytes.Equal(body, got.Body), "chunked %v: the body at %s", isChunked, u.URL)
			}
		}
		waitLine(t, p.stdout, "mirror streamed@file: sent=")
	})

	t.Run("cut", func(t *testing.T) {
		var fast atomic.Bool
		ended := make(chan error, 1)
		slow := httptest.NewServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
			b := make([]byte, 16<<10)
			var err error
			for err == nil {
				if !fast.Load() {
					time.Sleep(50 * time.Millisecond) // about 320 KiB/s
				}
				_, err = r.Body.Read(b)
			}
			ended <- err
		}))
		t.Cleanup(slow.Close)
		s := newYaegiStack(t, p, with(map[string]any{"url": slow.URL}), "streamcut@file", nil)
		big := randomBytes(t, 16<<20)
		began := time.Now()
		resp, err := http.Post(s.front.URL+"/big", "application/octet-stream", bytes.NewReader(big))
		require.NoError(t, err)
		resp.Body.Close()
		assert.Less(t, time.Since(began), 5*time.Second, "the primary held back by the mirror")
		got, ok := s.primary.Next(waitLimit)
		require.True(t, ok)
		assert.True(t, bytes.Equal(big, got.Body), "the primary's body")
		waitLine(t, p.stderr, "mirror streamcut@file: cut=1")
		fast.Store(true)
		select {
		case err := <-ended:
			assert.NotEqual(t, io.EOF, err, "the mirror read a complete body")
		case <-time.After(waitLimit):
			t.Fatal("the mirror's request did not end")
		}
	})

	t.Run("early answer", func(t *testing.T) {
		var answered atomic.Int64
		early := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
			answered.Add(1) // without reading the body
			rw.Header().Set("Connection", "close")
			rw.WriteHeader(http.StatusRequestEntityTooLarge)
		}))
		t.Cleanup(early.Close)
		s := newYaegiStack(t, p, with(map[string]any{"url": early.URL}), "streamearly@file", nil)
		for i := 0; i < 2; i++ {
			resp, err := http.Post(s.front.URL+"/early", "application/octet-stream", bytes.NewReader(body))
			require.NoError(t, err)
			resp.Body.Close()
			got, ok := s.primary.Next(waitLimit)
			require.True(t, ok)
			assert.True(t, bytes.Equal(body, got.Body), "the primary's body")
		}
		waitLine(t, p.stdout, "mirror streamearly@file: sent=")
		assert.Equal(t, int64(2), answered.Load(), "copies the mirror answered")
	})
}
