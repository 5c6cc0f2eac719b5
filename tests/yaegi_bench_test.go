package tests

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"
)

// loadFloor loads the floor (tests/floor), the measuring stick of the benchmarks, under Yaegi
// the way loadInterpreted loads the plugin.
func loadFloor(t testing.TB) *interpreted {
	t.Helper()
	return loadPackage(t, harness.LayoutFloor, harness.FloorModulePath, "floor")
}

// TestYaegiFloorCopies checks the floor the benchmarks measure against: its manifest's testData
// builds, and under Yaegi every request reaches the primary and the mirror whole.
func TestYaegiFloorCopies(t *testing.T) {
	p := loadFloor(t)
	raw, err := os.ReadFile(filepath.Join(harness.FloorDir(), ".traefik.yml"))
	require.NoError(t, err)
	var manifest struct {
		Import   string         `yaml:"import"`
		BasePkg  string         `yaml:"basePkg"`
		TestData map[string]any `yaml:"testData"`
	}
	require.NoError(t, yaml.Unmarshal(raw, &manifest))
	assert.Equal(t, harness.FloorModulePath, manifest.Import)
	assert.Equal(t, "floor", manifest.BasePkg)
	_, err = p.handler(http.NotFoundHandler(), asStrings(manifest.TestData), "catalog@file")
	require.NoError(t, err)
	_, err = p.handler(http.NotFoundHandler(), map[string]any{"url": "mirror/x"}, "bad@file")
	require.Error(t, err)

	primary, err := harness.StartUpstream("127.0.0.1:0", 10, nil)
	require.NoError(t, err)
	defer primary.Close()
	mirror, err := harness.StartUpstream("127.0.0.1:0", 10, nil)
	require.NoError(t, err)
	defer mirror.Close()
	pu, err := url.Parse(primary.URL)
	require.NoError(t, err)
	h, err := p.handler(proxyTo(pu), map[string]any{"url": mirror.URL}, "floor@file")
	require.NoError(t, err)
	front := httptest.NewServer(h)
	defer front.Close()
	for _, test := range []struct {
		desc    string
		method  string
		body    []byte
		chunked bool
	}{
		{"GET", http.MethodGet, nil, false},
		{"1 KiB", http.MethodPost, randomBytes(t, 1<<10), false},
		{"1 KiB chunked", http.MethodPost, randomBytes(t, 1<<10), true},
		{"300 KiB", http.MethodPut, randomBytes(t, 300<<10), false},
	} {
		var body io.Reader
		if test.body != nil {
			body = bytes.NewReader(test.body)
			if test.chunked {
				body = chunked{body}
			}
		}
		req, err := http.NewRequest(test.method, front.URL+"/v1/items?id=7", body)
		require.NoError(t, err)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err, test.desc)
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, "ok", string(got), test.desc)
		for _, u := range []*harness.Upstream{primary, mirror} {
			r, ok := u.Next(waitLimit)
			require.True(t, ok, test.desc)
			assert.Equal(t, test.method, r.Method, test.desc)
			assert.Equal(t, "/v1/items", r.Path, test.desc)
			assert.Equal(t, "id=7", r.RawQuery, test.desc)
			assert.True(t, bytes.Equal(test.body, r.Body), "%s: body at %s", test.desc, u.URL)
		}
	}

	// A body shorter than declared: the primary gets what came, no copy is sent.
	var seen []byte
	h, err = p.handler(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { seen, _ = io.ReadAll(r.Body) }),
		map[string]any{"url": mirror.URL}, "floor-short@file")
	require.NoError(t, err)
	req := httptest.NewRequest(http.MethodPost, "/short", strings.NewReader("short"))
	req.ContentLength = 100
	h.ServeHTTP(httptest.NewRecorder(), req)
	assert.Equal(t, "short", string(seen))
	_, copied := mirror.Next(300 * time.Millisecond)
	assert.False(t, copied, "no copy of a broken body")
}

// BenchmarkYaegiServeHTTP measures the interpreted middleware as Traefik runs it, for the same
// request shapes as the compiled BenchmarkServeHTTP: the whole cost of a request, its copy to a
// loopback mirror included, with at most 64 copies in flight so that none is dropped.
// floor_POST_1KiB is POST_1KiB through the floor (tests/floor), the least a Yaegi middleware can
// do to copy a request: the measuring stick for the plugin's allocations per copy;
// guarded_POST_1KiB through the guarded floor (tests/floor/guarded.go), the floor with every
// guarantee the plugin gives a copy: what the guarantees alone cost.
func BenchmarkYaegiServeHTTP(b *testing.B) {
	p := loadInterpreted(b)
	floor := loadFloor(b)
	// The same mirror as the compiled benchmark's: it reads and discards, nothing recorded.
	var received atomic.Int64
	mirrorSrv := httptest.NewServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		received.Add(1)
	}))
	defer mirrorSrv.Close()
	count := func() int { return int(received.Load()) }
	next := http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		rw.WriteHeader(http.StatusOK)
	})
	hung, err := harness.StartHung(0)
	if err != nil {
		b.Fatal(err)
	}
	defer hung.Close()
	down, err := harness.StartRefused()
	if err != nil {
		b.Fatal(err)
	}
	defer down.Close()
	metricsAddr, err := harness.FreeAddrs(1)
	if err != nil {
		b.Fatal(err)
	}
	stingy := stingyRedis(b)
	cases := []struct {
		name    string
		method  string
		size    int
		percent float64        // sampledOut: a tiny share, as percent 0 turns the middleware off
		config  map[string]any // replaces the healthy mirror's
	}{
		{"sampledOut", http.MethodGet, 0, 1e-6, nil},
		{"filtered", http.MethodGet, 0, 100, map[string]any{"pathRegex": "^/api/"}},
		{"rateLimited", http.MethodGet, 0, 100, map[string]any{"maxRate": "0.000001"}},
		// The same budget shared through Redis, which grants nothing: the client's path spends
		// from the local lease, as rateLimited does from the local bucket.
		{"rateLimited_redis", http.MethodGet, 0, 100, map[string]any{"maxRate": "0.000001", "redis": map[string]any{"endpoints": stingy}}},
		{"GET", http.MethodGet, 0, 100, nil},
		{"POST_1KiB", http.MethodPost, 1 << 10, 100, nil},
		// With metrics served: the durations, answers and bytes counted too.
		{"POST_1KiB_metrics", http.MethodPost, 1 << 10, 100, map[string]any{"metricsAddress": metricsAddr[0]}},
		{"POST_1KiB_compared", http.MethodPost, 1 << 10, 100, map[string]any{"compare": map[string]any{"enabled": true}}},
		{"POST_1KiB_retries", http.MethodPost, 1 << 10, 100, map[string]any{"retries": 1}},
		{"POST_1KiB_recorded", http.MethodPost, 1 << 10, 100, map[string]any{"record": map[string]any{"file": filepath.Join(b.TempDir(), "copies.gor")}}},
		{"POST_64KiB", http.MethodPost, 64 << 10, 100, nil},
		{"POST_256KiB_tee", http.MethodPost, 256 << 10, 100, nil},
		{"POST_1KiB_chunked", http.MethodPost, 1 << 10, 100, nil},
		{"POST_overLimit", http.MethodPost, 2 << 20, 100, nil},
		// Every slot held by a copy to a mirror that never answers: the request is dropped.
		{"POST_1KiB_dropped", http.MethodPost, 1 << 10, 100, map[string]any{"url": "http://" + hung.Addr, "maxInflight": 1, "timeout": "1h"}},
		// The mirror refused a connection: copies pause, the request is counted as failed.
		{"POST_1KiB_paused", http.MethodPost, 1 << 10, 100, map[string]any{"url": "http://" + down.Addr}},
		// The floor: every request copied, its only option the url.
		{"floor_POST_1KiB", http.MethodPost, 1 << 10, 100, nil},
		// The guarded floor: the floor with every guarantee the plugin gives a copy, no option.
		{"guarded_POST_1KiB", http.MethodPost, 1 << 10, 100, nil},
	}
	for _, bc := range cases {
		b.Run(bc.name, func(b *testing.B) {
			config := map[string]any{"url": mirrorSrv.URL, "percent": bc.percent, "maxInflight": 1 << 20}
			for k, v := range bc.config {
				config[k] = v
			}
			loaded := p
			if strings.HasPrefix(bc.name, "floor_") {
				loaded, config = floor, map[string]any{"url": mirrorSrv.URL}
			}
			if strings.HasPrefix(bc.name, "guarded_") {
				loaded, config = floor, map[string]any{"url": mirrorSrv.URL, "guarded": true}
			}
			h, err := loaded.handler(next, asStrings(config), "bench-"+bc.name+"@file")
			if err != nil {
				b.Fatal(err)
			}
			if bc.config != nil { // the first copy takes the slot, or meets the refusal
				h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(bc.method, "/", nil))
			}
			if bc.config["redis"] != nil { // the first lease (100 ms at most), then the shared budget's refusals
				for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); {
					h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(bc.method, "/", nil))
				}
			}
			body := []byte(strings.Repeat("b", bc.size))
			rw := httptest.NewRecorder()
			// Copies that reach a healthy mirror are paced, so that none is dropped.
			paced := bc.percent == 100 && bc.size <= 1<<20 &&
				(bc.config == nil || bc.config["compare"] != nil || bc.config["metricsAddress"] != nil)
			before := count()
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				req := httptest.NewRequest(bc.method, "/bench?x=1", bytes.NewReader(body))
				if strings.HasSuffix(bc.name, "_chunked") {
					req.ContentLength = -1
				}
				h.ServeHTTP(rw, req)
				if paced {
					paceCopies(b, i+1, 64, func() int { return count() - before })
				}
			}
			b.StopTimer()
			if paced {
				paceCopies(b, b.N, 1, func() int { return count() - before })
			}
			b.ReportMetric(float64(count()-before)/float64(b.N), "copies/op")
		})
	}
}

// stingyRedis is a fake Redis on loopback that answers every command as the budget script does
// when the bucket is empty: nothing granted, one process.
func stingyRedis(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if strings.HasPrefix(sc.Text(), "*") { // a command's first line
						if _, err := c.Write([]byte("*2\r\n:0\r\n:1\r\n")); err != nil {
							return
						}
					}
				}
			}()
		}
	}()
	return l.Addr().String()
}

// paceCopies waits until fewer than limit of the sent copies are still on their way.
func paceCopies(b *testing.B, sent, limit int, received func() int) {
	deadline := time.Now().Add(10 * time.Second)
	for sent-received() >= limit {
		if time.Now().After(deadline) {
			b.Fatalf("%d copies still in flight after 10s", sent-received())
		}
		runtime.Gosched()
	}
}

// BenchmarkYaegiClientPath times what the client waits for: ServeHTTP alone, the primary behind
// Go's reverse proxy, with compare off and on (the capture of the primary's answer), each
// request after the previous copy arrived.
// client-µs is the median; the copy's own work runs afterwards, in its goroutine.
func BenchmarkYaegiClientPath(b *testing.B) {
	p := loadInterpreted(b)
	var received atomic.Int64
	mirrorSrv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		rw.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(rw, `{"ok":"yes"}`+"\n")
		received.Add(1)
	}))
	defer mirrorSrv.Close()
	// The primary behind Go's reverse proxy, as Traefik's service calls it.
	primary := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		rw.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(rw, `{"ok":"yes"}`+"\n")
	}))
	defer primary.Close()
	target, _ := url.Parse(primary.URL)
	next := httputil.NewSingleHostReverseProxy(target)
	for _, bc := range []struct {
		name   string
		config map[string]any
	}{
		{"POST_1KiB", nil},
		{"POST_1KiB_compared", map[string]any{"compare": map[string]any{"enabled": true}}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			config := map[string]any{"url": mirrorSrv.URL}
			for k, v := range bc.config {
				config[k] = v
			}
			h, err := p.handler(next, asStrings(config), "client-"+bc.name+"@file")
			if err != nil {
				b.Fatal(err)
			}
			body := bytes.Repeat([]byte("b"), 1<<10)
			took := make([]time.Duration, 0, b.N)
			for i := 0; i < b.N; i++ {
				before := received.Load()
				req := httptest.NewRequest(http.MethodPost, "/bench", bytes.NewReader(body))
				start := time.Now()
				h.ServeHTTP(httptest.NewRecorder(), req)
				took = append(took, time.Since(start))
				paceCopies(b, 1, 1, func() int { return int(received.Load() - before) })
			}
			sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
			b.ReportMetric(float64(took[len(took)/2].Nanoseconds())/1000, "client-µs")
		})
	}
}
