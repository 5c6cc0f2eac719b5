package harness

import (
	"io"
	"net/http"
	"sort"
	"sync"
	"time"
)

// Result is one request of a load run.
type Result struct {
	Latency time.Duration
	Status  int
	Err     error
}

// Run sends n requests, concurrency at a time, and returns each one's result by index.
// newRequest must return a fresh request for index i.
func Run(client *http.Client, n, concurrency int, newRequest func(i int) *http.Request) []Result {
	results := make([]Result, n)
	next := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				results[i] = Do(client, newRequest(i))
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	return results
}

// Do sends one request and reads the whole answer.
func Do(client *http.Client, req *http.Request) Result {
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return Result{Latency: time.Since(start), Err: err}
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return Result{Latency: time.Since(start), Status: resp.StatusCode, Err: err}
}

// Percentile returns the p-th percentile (0 < p <= 100) of the latencies.
func Percentile(results []Result, p float64) time.Duration {
	if len(results) == 0 {
		return 0
	}
	l := make([]time.Duration, len(results))
	for i, r := range results {
		l[i] = r.Latency
	}
	sort.Slice(l, func(a, b int) bool { return l[a] < l[b] })
	idx := int(float64(len(l))*p/100+0.5) - 1
	if idx < 0 {
		idx = 0
	}
	if idx >= len(l) {
		idx = len(l) - 1
	}
	return l[idx]
}

// Failures counts results that are errors or not 2xx.
func Failures(results []Result) int {
	n := 0
	for _, r := range results {
		if r.Err != nil || r.Status < 200 || r.Status > 299 {
			n++
		}
	}
	return n
}

// Client is a keep-alive client for load on loopback.
func Client(conns int) *http.Client {
	return &http.Client{
		Timeout:   30 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns, DisableCompression: true},
	}
}
