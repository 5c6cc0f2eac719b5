package mirror

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// benchCases are the request shapes measured both compiled (here) and under Yaegi
// (tests/yaegi_bench_test.go).
var benchCases = []struct {
	name    string
	method  string
	size    int
	percent float64 // sampledOut: a tiny share, as percent 0 turns the middleware off
}{
	{"sampledOut", http.MethodGet, 0, 1e-6},
	{"filtered", http.MethodGet, 0, 100},                  // pathRegex does not match
	{"rateLimited", http.MethodGet, 0, 100},               // maxRate's budget is spent
	{"POST_1KiB_compared", http.MethodPost, 1 << 10, 100}, // compare on
	{"GET", http.MethodGet, 0, 100},
	{"POST_1KiB", http.MethodPost, 1 << 10, 100},
	{"POST_64KiB", http.MethodPost, 64 << 10, 100},
	{"POST_256KiB_tee", http.MethodPost, 256 << 10, 100}, // over 64 KiB: copied as the primary reads it
	{"POST_1KiB_chunked", http.MethodPost, 1 << 10, 100}, // unknown length: copied as the primary reads it
	{"POST_overLimit", http.MethodPost, 2 << 20, 100},
	{"POST_1KiB_dropped", http.MethodPost, 1 << 10, 100}, // every slot held
	{"POST_1KiB_paused", http.MethodPost, 1 << 10, 100},  // the mirror refused a connection
}

// BenchmarkServeHTTP measures the whole cost of a request through the middleware, its copy to a
// loopback mirror included, with at most 64 copies in flight so that none is dropped
// (copies/op shows it).
func BenchmarkServeHTTP(b *testing.B) {
	defer func(saved func(string)) { debugLine = saved }(debugLine)
	debugLine = func(string) {} // keep the benchmark's output readable
	var received atomic.Int64
	mirrorSrv := httptest.NewServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		received.Add(1)
	}))
	defer mirrorSrv.Close()
	next := http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		rw.WriteHeader(http.StatusOK)
	})
	for _, bc := range benchCases {
		b.Run(bc.name, func(b *testing.B) {
			cfg := CreateConfig()
			cfg.URL = mirrorSrv.URL
			cfg.Percent = bc.percent
			cfg.MaxInflight = 1 << 20 // pacing below keeps copies in flight few; none is dropped
			switch bc.name {
			case "POST_1KiB_dropped":
				cfg.MaxInflight = 1
			case "filtered":
				cfg.PathRegex = "^/api/"
			case "rateLimited":
				cfg.MaxRate = 1e-6 // one copy, then none
			case "POST_1KiB_compared":
				cfg.Compare.Enabled = true
			}
			h, err := New(context.Background(), next, cfg, "bench-"+bc.name+"@file")
			if err != nil {
				b.Fatal(err)
			}
			m := h.(*mirror)
			m.st.error = func(string) {}
			var held int // no copy leaves: every slot held, or the mirror paused
			switch bc.name {
			case "POST_1KiB_dropped":
				held = int(m.maxInflight)
				atomic.AddInt64(&m.st.inflight, int64(held))
			case "POST_1KiB_paused":
				m.st.paused.Store(true)
				pause(m.st, true)
			}
			paced := bc.percent == 100 && bc.size <= int(cfg.MaxBodySize) && held == 0 && !m.st.paused.Load() &&
				cfg.PathRegex == "" && cfg.MaxRate == 0
			sentBefore := m.st.get(sent)
			body := []byte(strings.Repeat("b", bc.size))
			rw := httptest.NewRecorder()
			before := received.Load()
			inflight := func(sent int) int { return sent - int(received.Load()-before) }
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				req := httptest.NewRequest(bc.method, "/bench?x=1", bytes.NewReader(body))
				if strings.HasSuffix(bc.name, "_chunked") {
					req.ContentLength = -1
				}
				h.ServeHTTP(rw, req)
				if paced {
					waitInflight(b, func() bool { return inflight(i+1) < 64 })
				}
			}
			b.StopTimer()
			atomic.AddInt64(&m.st.inflight, -int64(held))
			if m.st.paused.Load() {
				pause(m.st, false)
			}
			waitInflight(b, func() bool { return atomic.LoadInt64(&m.st.inflight) == 0 })
			b.ReportMetric(float64(m.st.get(sent)-sentBefore)/float64(b.N), "copies/op")
		})
	}
}

func waitInflight(b *testing.B, done func() bool) {
	deadline := time.Now().Add(10 * time.Second)
	for !done() {
		if time.Now().After(deadline) {
			b.Fatal("copies still in flight after 10s")
		}
		runtime.Gosched()
	}
}
