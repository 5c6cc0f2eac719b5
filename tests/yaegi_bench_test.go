package tests

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
)

// BenchmarkYaegiServeHTTP measures the interpreted middleware as Traefik runs it, for the same
// request shapes as the compiled BenchmarkServeHTTP: the whole cost of a request, its copy to a
// loopback mirror included, with at most 64 copies in flight so that none is dropped.
func BenchmarkYaegiServeHTTP(b *testing.B) {
	p := loadInterpreted(b)
	mirrorSrv, err := harness.StartUpstream("127.0.0.1:0", 0, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer mirrorSrv.Close()
	next := http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		rw.WriteHeader(http.StatusOK)
	})
	cases := []struct {
		name    string
		method  string
		size    int
		percent int
	}{
		{"sampledOut", http.MethodGet, 0, 0},
		{"GET", http.MethodGet, 0, 100},
		{"POST_1KiB", http.MethodPost, 1 << 10, 100},
		{"POST_64KiB", http.MethodPost, 64 << 10, 100},
		{"POST_overLimit", http.MethodPost, 2 << 20, 100},
	}
	for _, bc := range cases {
		b.Run(bc.name, func(b *testing.B) {
			h, err := p.handler(next, asStrings(map[string]any{"url": mirrorSrv.URL, "percent": bc.percent, "maxInflight": 1 << 20}), "bench@file")
			if err != nil {
				b.Fatal(err)
			}
			body := []byte(strings.Repeat("b", bc.size))
			rw := httptest.NewRecorder()
			before := mirrorSrv.Count()
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				h.ServeHTTP(rw, httptest.NewRequest(bc.method, "/bench?x=1", bytes.NewReader(body)))
				if bc.percent > 0 && bc.size <= 1<<20 {
					paceCopies(b, i+1, 64, func() int { return mirrorSrv.Count() - before })
				}
			}
			b.StopTimer()
			if bc.percent > 0 && bc.size <= 1<<20 {
				paceCopies(b, b.N, 1, func() int { return mirrorSrv.Count() - before })
			}
			b.ReportMetric(float64(mirrorSrv.Count()-before)/float64(b.N), "copies/op")
		})
	}
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
