package tests

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
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

// The tests of issue #15: what a client, or a hostile mirror, can make the comparison of answers
// (and the loop header, and matchHeaders) cost a real Traefik, in memory and CPU.

// hcMiddleware is the example's middleware, as the metrics name it.
const hcMiddleware = "mirror-api@file"

// hcLineLimit bounds a difference line: at most 20 differences of a few hundred bytes each.
const hcLineLimit = 16 << 10

// hcJSON answers body as JSON of known length.
func hcJSON(rw http.ResponseWriter, body []byte) {
	rw.Header().Set("Content-Type", "application/json")
	rw.Header().Set("Content-Length", strconv.Itoa(len(body)))
	_, _ = rw.Write(body)
}

// hcGet is a GET of path through Traefik (built without t: it runs in harness.Run's goroutines).
func hcGet(e *e2e, path string) *http.Request {
	req, err := http.NewRequest(http.MethodGet, e.traefik.WebURL+path, nil)
	if err != nil {
		panic(err) // a constant URL: never
	}
	return req
}

// hcStartE2E is startE2E, with the client's idle connections closed before Traefik is stopped
// (Traefik waits its grace period for open connections).
func hcStartE2E(t *testing.T, d *harness.Dynamic, routers ...string) *e2e {
	t.Helper()
	e := startE2E(t, d, routers...)
	t.Cleanup(e.client.CloseIdleConnections)
	return e
}

// hcStart runs Traefik with the example's router and middleware mirror-api, its service primary
// and its mirror mirror, comparing their answers and writing the difference lines to the file it
// returns.
func hcStart(t *testing.T, primary, mirror http.Handler) (*e2e, string) {
	t.Helper()
	logFile := filepath.Join(t.TempDir(), "differences.log")
	o := map[string]any{"url": startApp(t, mirror), "compare": map[string]any{"enabled": true, "logFile": logFile}}
	d := exampleDynamic(t)
	d.Service("primary", startApp(t, primary))
	d.Mirror("mirror-api", o)
	return hcStartE2E(t, d), logFile
}

// hcCompared is traefik_mirror_compared_total of a middleware, by result.
func hcCompared(t *testing.T, e *e2e, middleware string) map[string]float64 {
	t.Helper()
	s := mustScrape(t, e.traefik.MetricsURL)
	got := map[string]float64{}
	for _, r := range []string{"matched", "differed", "notCompared"} {
		v, ok := s.value("traefik_mirror_compared_total", map[string]string{"middleware": middleware, "result": r})
		require.True(t, ok, "no compared_total{middleware=%q,result=%q}", middleware, r)
		got[r] = v
	}
	return got
}

// hcWaitCompared waits (up to within) until n more comparisons than since are counted, and
// returns the counts then.
func hcWaitCompared(t *testing.T, e *e2e, middleware string, since map[string]float64, n int, within time.Duration) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		got := hcCompared(t, e, middleware)
		total := 0.0
		for r, v := range got {
			total += v - since[r]
		}
		if total >= float64(n) {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d comparisons counted within %s: %v (before: %v)", int(total), n, within, got, since)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// hcWaitSettled waits (up to within) until a middleware has counted total requests and has no
// copy in flight, and says whether it did.
func hcWaitSettled(t *testing.T, e *e2e, middleware string, total int, within time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		s := mustScrape(t, e.traefik.MetricsURL)
		counted := 0.0
		for _, n := range s.outcomes(middleware) {
			counted += n
		}
		inflight, ok := s.value("traefik_mirror_inflight", map[string]string{"middleware": middleware})
		if ok && inflight == 0 && counted >= float64(total) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// hcDelta is after - before, by result.
func hcDelta(before, after map[string]float64) map[string]float64 {
	d := map[string]float64{}
	for r, v := range after {
		d[r] = v - before[r]
	}
	return d
}

func hcStats(t *testing.T, e *e2e) harness.Stats {
	t.Helper()
	s, err := e.traefik.Stats()
	require.NoError(t, err)
	return s
}

// hcRun sends n GETs, concurrency at a time, and requires every one to be answered 200.
func hcRun(t *testing.T, e *e2e, n, concurrency int, path func(i int) string) {
	t.Helper()
	results := harness.Run(e.client, n, concurrency, func(i int) *http.Request { return hcGet(e, path(i)) })
	require.Equal(t, 0, harness.Failures(results), "first result: %+v", results[0])
}

// hcRunCompared sends n GETs one at a time, and after every batch of them waits until their
// comparisons are counted: fewer differing answers wait to be judged than the plugin's queue
// holds (8), so every one is compared. It returns the counts at the end.
func hcRunCompared(t *testing.T, e *e2e, n, batch int, counts map[string]float64, path func(i int) string) map[string]float64 {
	t.Helper()
	for i := 0; i < n; i += batch {
		k := batch
		if n-i < k {
			k = n - i
		}
		from := i
		hcRun(t, e, k, 1, func(j int) string { return path(from + j) })
		counts = hcWaitCompared(t, e, hcMiddleware, counts, k, 60*time.Second)
	}
	return counts
}

// hcLines reads the difference lines, each as its length and its differences.
func hcLines(t *testing.T, logFile string) (sizes []int, diffs [][]any) {
	t.Helper()
	b, err := os.ReadFile(logFile)
	if os.IsNotExist(err) {
		return nil, nil
	}
	require.NoError(t, err)
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l == "" {
			continue
		}
		var line struct {
			Differences []any `json:"differences"`
		}
		require.NoError(t, json.Unmarshal([]byte(l), &line), "line of %d bytes", len(l))
		sizes = append(sizes, len(l))
		diffs = append(diffs, line.Differences)
	}
	return sizes, diffs
}

func hcMaxInt(a []int) int {
	m := 0
	for _, v := range a {
		if v > m {
			m = v
		}
	}
	return m
}

// Item 1. Answers of 10,000 nested arrays that differ cost Traefik a bounded amount of memory
// when 50 are compared at once, and a bounded CPU each when judged one at a time, and are still
// found different.
func TestTraefikCompareDeepJSONIsBounded(t *testing.T) {
	const depth, n, warm = 10000, 50, 5
	app := func(leaf string) http.HandlerFunc {
		deep := []byte(strings.Repeat("[", depth) + leaf + strings.Repeat("]", depth))
		return func(rw http.ResponseWriter, r *http.Request) {
			if strings.HasPrefix(r.URL.Path, "/deep/") {
				hcJSON(rw, deep)
				return
			}
			hcJSON(rw, []byte(`{"warm":[`+leaf+`]}`))
		}
	}
	e, logFile := hcStart(t, app("1"), app("2"))
	base := hcCompared(t, e, hcMiddleware)
	// Warm up the judging path (the interpreter, its reflect types) before the peak is taken.
	hcRun(t, e, warm, 1, func(i int) string { return fmt.Sprintf("/warm/%d", i) })
	base = hcWaitCompared(t, e, hcMiddleware, base, warm, waitLimit)
	before := hcStats(t, e)

	start := time.Now()
	hcRun(t, e, n, n, func(i int) string { return fmt.Sprintf("/deep/%d", i) })
	got := hcWaitCompared(t, e, hcMiddleware, base, n, 60*time.Second)
	after := hcStats(t, e)
	growth := after.PeakRSS - before.PeakRSS
	burst := hcDelta(base, got)
	t.Logf("%d answers of %d nested arrays at once in %v: %v; peak RSS %d -> %d MiB (+%d MiB), CPU %v",
		n, depth, time.Since(start).Round(time.Millisecond), burst, before.PeakRSS>>20, after.PeakRSS>>20, growth>>20,
		after.CPU-before.CPU)
	assert.Zero(t, burst["matched"], "deep answers that differ counted matched")
	assert.GreaterOrEqual(t, burst["differed"], 1.0, "no deep answer judged")
	assert.Less(t, growth, int64(200<<20), "peak RSS grew by %d MiB", growth>>20)

	// One at a time, every one is judged, at a bounded cost each.
	const serial = 10
	before = hcStats(t, e)
	got2 := hcRunCompared(t, e, serial, 1, got, func(i int) string { return fmt.Sprintf("/deep/serial-%d", i) })
	after = hcStats(t, e)
	perAnswer := (after.CPU - before.CPU) / serial
	t.Logf("%d answers of %d nested arrays one at a time: %v; CPU %v per answer; peak RSS %d MiB",
		serial, depth, hcDelta(got, got2), perAnswer, after.PeakRSS>>20)
	assert.Equal(t, float64(serial), got2["differed"]-got["differed"], "deep answers judged one at a time")
	assert.Less(t, perAnswer, 30*time.Millisecond, "Traefik CPU per deep answer judged")

	sizes, diffs := hcLines(t, logFile)
	require.Len(t, sizes, warm+int(got2["differed"]-base["differed"]), "a line per answer that differed")
	assert.Less(t, hcMaxInt(sizes), hcLineLimit, "a difference line of %d bytes", hcMaxInt(sizes))
	for _, d := range diffs[warm:] {
		assert.NotEmpty(t, d)
		assert.LessOrEqual(t, len(d), 20)
	}
}

// hcDigits is a JSON array of n one-digit numbers (i%10), written with sep between elements;
// the element at index odd, if any, is the next digit instead.
func hcDigits(n int, sep string, odd int) []byte {
	var b bytes.Buffer
	b.WriteByte('[')
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteString(sep)
		}
		v := i % 10
		if i == odd {
			v = (v + 1) % 10
		}
		b.WriteString(strconv.Itoa(v))
	}
	b.WriteByte(']')
	return b.Bytes()
}

// hcKeys is a JSON object of n keys ("k0000": i%10), written with sep between members and
// colon after each key; the value at index odd, if any, is the next digit instead.
func hcKeys(n int, sep, colon string, odd int) []byte {
	var b bytes.Buffer
	b.WriteByte('{')
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteString(sep)
		}
		v := i % 10
		if i == odd {
			v = (v + 1) % 10
		}
		fmt.Fprintf(&b, `"k%04d"%s%d`, i, colon, v)
	}
	b.WriteByte('}')
	return b.Bytes()
}

// Item 2. The same JSON value written with other spacing, or with one element or key different,
// costs Traefik under 40 ms of CPU per compared answer more than the same bytes do (220-268 ms
// before the fix, 0-21 ms after): no interpreted walk of 20,000 elements or 5,000 keys.
func TestTraefikCompareJSONCostIsBounded(t *testing.T) {
	const elements, keys, within = 20000, 5000, 2000 // within: a walk that fits the node budget
	primary := map[string][]byte{
		"arr": hcDigits(elements, ",", -1),
		"obj": hcKeys(keys, ",", ":", -1),
		"mid": hcKeys(within, ",", ":", -1),
	}
	type variant struct {
		name, kind string
		mirror     []byte
		result     string
	}
	variants := []variant{
		{"identical", "arr", primary["arr"], "matched"}, // the baseline: the same bytes
		{"array-spaced", "arr", hcDigits(elements, ", ", -1), "matched"},
		{"array-one-differs", "arr", hcDigits(elements, ", ", elements/2), "differed"},
		{"object-spaced", "obj", hcKeys(keys, ", ", ": ", -1), "matched"},
		{"object-one-differs", "obj", hcKeys(keys, ", ", ": ", keys/2), "differed"},
		{"object-within-budget-one-differs", "mid", hcKeys(within, ", ", ": ", within/2), "differed"},
	}
	for _, v := range variants {
		require.Less(t, len(v.mirror), 64<<10, "%s: within the default compare.maxBodySize", v.name)
	}
	byName := map[string]variant{}
	for _, v := range variants {
		byName[v.name] = v
	}
	// Paths are /<variant>/<i>.
	name := func(r *http.Request) string { return strings.Split(r.URL.Path, "/")[1] }
	e, logFile := hcStart(t,
		http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) { hcJSON(rw, primary[byName[name(r)].kind]) }),
		http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) { hcJSON(rw, byName[name(r)].mirror) }))

	counts := hcCompared(t, e, hcMiddleware)
	for _, v := range variants { // warm-up: the interpreter, each path once
		counts = hcRunCompared(t, e, 2, 2, counts, func(i int) string { return fmt.Sprintf("/%s/warm-%d", v.name, i) })
	}
	const n = 20
	perAnswer := map[string]time.Duration{}
	for _, v := range variants {
		before := hcStats(t, e)
		got := hcRunCompared(t, e, n, 4, counts, func(i int) string { return fmt.Sprintf("/%s/%d", v.name, i) })
		after := hcStats(t, e)
		assert.Equal(t, float64(n), got[v.result]-counts[v.result], "%s: %d answers %s", v.name, n, v.result)
		counts = got
		perAnswer[v.name] = (after.CPU - before.CPU) / n
	}
	for _, v := range variants {
		excess := perAnswer[v.name] - perAnswer["identical"]
		t.Logf("%-34s %7v CPU per compared answer (%+v over the same bytes)", v.name, perAnswer[v.name], excess)
		if v.name != "identical" {
			assert.Less(t, excess, 40*time.Millisecond, "%s: Traefik CPU per compared answer", v.name)
		}
	}
	sizes, _ := hcLines(t, logFile)
	assert.Less(t, hcMaxInt(sizes), hcLineLimit, "a difference line of %d bytes", hcMaxInt(sizes))
}

// hcRawServer is an HTTP/1.1 server for requests without bodies: it answers every request head
// with 200 and "ok", and finds the heads' ends with bytes.Index, so that megabyte heads cost
// this race-instrumented process no work per byte.
type hcRawServer struct {
	url   string
	heads atomic.Int64
}

var hcRawOK = []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")

func hcStartRawServer(t *testing.T) *hcRawServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &hcRawServer{url: "http://" + l.Addr().String()}
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				s.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		_ = l.Close()
		mu.Lock()
		for c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return s
}

func (s *hcRawServer) serve(c net.Conn) {
	buf := make([]byte, 0, 64<<10)
	chunk := make([]byte, 64<<10)
	from := 0 // where the end of the head may start
	for {
		if i := bytes.Index(buf[from:], []byte("\r\n\r\n")); i >= 0 {
			s.heads.Add(1)
			if _, err := c.Write(hcRawOK); err != nil {
				return
			}
			buf = append(buf[:0], buf[from+i+4:]...)
			from = 0
			continue
		}
		if from = len(buf) - 3; from < 0 {
			from = 0
		}
		n, err := c.Read(chunk)
		buf = append(buf, chunk[:n]...)
		if err != nil {
			return
		}
	}
}

// hcRawRun sends n GETs to Traefik, concurrency at a time over as many kept-alive connections,
// each written as the given pieces in one go (no per-byte work in this process), and requires
// every answer to be 200.
func hcRawRun(t *testing.T, e *e2e, n, concurrency int, pieces func(i int) net.Buffers) {
	t.Helper()
	next := make(chan int)
	errs := make(chan error, concurrency)
	var wg sync.WaitGroup
	for w := 0; w < concurrency; w++ {
		c := dialRaw(t, e) // closed in t.Cleanup; its deadline bounds every exchange
		wg.Add(1)
		go func() {
			defer wg.Done()
			var failed error
			for i := range next {
				if failed != nil {
					continue
				}
				b := pieces(i)
				if _, err := b.WriteTo(c); err != nil {
					failed = err
					continue
				}
				resp, err := http.ReadResponse(c.r, nil)
				if err != nil {
					failed = err
					continue
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err == nil && resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("request %d: %s", i, resp.Status)
				}
				failed = err
			}
			errs <- failed
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	for w := 0; w < concurrency; w++ {
		require.NoError(t, <-errs)
	}
}

// Item 3. An X-Mirror-Loop of a megabyte of commas costs Traefik no more memory (nor much more
// CPU) than the same size of letters: 200 such requests, 20 at a time.
func TestTraefikLoopHeaderOfCommasIsBounded(t *testing.T) {
	const n, concurrency = 200, 20
	const size = 1_000_000 - 1_000 // under Traefik's 1 MiB of request headers, with the rest
	primary, mirror := hcStartRawServer(t), hcStartRawServer(t)
	d := exampleDynamic(t)
	d.Service("primary", primary.url)
	d.Mirror("mirror-api", map[string]any{"url": mirror.url})
	e := hcStartE2E(t, d)
	sent := 0
	run := func(loop []byte) harness.Stats {
		want := mirror.heads.Load() + n
		hcRawRun(t, e, n, concurrency, func(i int) net.Buffers {
			return net.Buffers{[]byte("GET /loop/" + strconv.Itoa(i) + " HTTP/1.1\r\nHost: x\r\nX-Mirror-Loop: "), loop, []byte("\r\n\r\n")}
		})
		sent += n
		settled := hcWaitSettled(t, e, hcMiddleware, sent, 60*time.Second)
		stats := hcStats(t, e)
		assert.True(t, settled, "copies still in flight after 60s")
		assert.Equal(t, want, mirror.heads.Load(), "copies that reached the mirror")
		return stats
	}
	run([]byte("warm-up"))
	before := hcStats(t, e)
	letters := run(bytes.Repeat([]byte("a"), size))
	commas := run(bytes.Repeat([]byte(","), size))
	t.Logf("peak RSS %d MiB; after %d requests with %d letters: %d MiB (+%d); then as many commas: %d MiB (+%d more); CPU letters %v, commas %v",
		before.PeakRSS>>20, n, size, letters.PeakRSS>>20, (letters.PeakRSS-before.PeakRSS)>>20, commas.PeakRSS>>20,
		(commas.PeakRSS-letters.PeakRSS)>>20, letters.CPU-before.CPU, commas.CPU-letters.CPU)
	assert.Less(t, commas.PeakRSS-before.PeakRSS, int64(250<<20), "peak RSS grew by %d MiB", (commas.PeakRSS-before.PeakRSS)>>20)
	assert.Less(t, commas.PeakRSS-letters.PeakRSS, int64(64<<20), "commas cost %d MiB more than letters",
		(commas.PeakRSS-letters.PeakRSS)>>20)
	assert.Less(t, commas.CPU-letters.CPU, 2*(letters.CPU-before.CPU), "CPU of the commas against the letters'")
}

// Item 5. A mirror answering with 3,000 headers more than the primary gives a difference line of
// at most 20 differences.
func TestTraefikCompareHeaderDifferencesAreCapped(t *testing.T) {
	const extra, n = 3000, 3
	body := []byte(`{"id":1}`)
	e, logFile := hcStart(t,
		http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) { hcJSON(rw, body) }),
		http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
			for i := 0; i < extra; i++ {
				rw.Header().Set(fmt.Sprintf("X-Extra-%04d", i), "v")
			}
			hcJSON(rw, body)
		}))
	base := hcCompared(t, e, hcMiddleware)
	hcRun(t, e, n, 1, func(i int) string { return fmt.Sprintf("/headers/%d", i) })
	got := hcWaitCompared(t, e, hcMiddleware, base, n, waitLimit)
	assert.Equal(t, float64(n), got["differed"]-base["differed"])
	sizes, diffs := hcLines(t, logFile)
	require.Len(t, diffs, n)
	for i, d := range diffs {
		t.Logf("difference line %d: %d bytes, %d differences", i, sizes[i], len(d))
		assert.NotEmpty(t, d)
		assert.LessOrEqual(t, len(d), 20, "differences in one line")
		assert.Less(t, sizes[i], hcLineLimit, "line length")
		for _, x := range d {
			assert.Equal(t, "header", x.(map[string]any)["kind"])
		}
	}
}

// hcLetters is n random lowercase letters.
func hcLetters(t *testing.T, n int) string {
	b := randomBytes(t, n)
	for i := range b {
		b[i] = 'a' + b[i]%26
	}
	return string(b)
}

// Item 6. JSON paths made of huge keys are cut in difference lines: answers whose keys are 1 MB
// long (compare.maxBodySize 1 MiB), or 60 KB long (the defaults), give lines of a few KB, and 50
// such answers at once cost under 150 MB of peak memory more than 50 identical ones.
func TestTraefikCompareJSONPathsAreCut(t *testing.T) {
	const n = 50
	keyA, keyB, keyC := hcLetters(t, 1_000_000), hcLetters(t, 1_000_000), hcLetters(t, 60_000)
	big := func(key string) []byte { return []byte(`{"` + key + `":1}`) }
	nested := func(add int) []byte { // {"<60 KB key>":{"k00":0,...,"k19":19}}, values + add
		var b bytes.Buffer
		b.WriteString(`{"` + keyC + `":{`)
		for i := 0; i < 20; i++ {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `"k%02d":%d`, i, i+add)
		}
		b.WriteString(`}}`)
		return b.Bytes()
	}
	answers := map[bool]map[string][]byte{ // by side (mirror?), then by path's first segment
		false: {"same": big(keyA), "diff": big(keyA), "small": nested(0)},
		true:  {"same": big(keyA), "diff": big(keyB), "small": nested(100)},
	}
	require.Less(t, len(answers[false]["small"]), 64<<10)
	app := func(mirror bool) http.HandlerFunc {
		return func(rw http.ResponseWriter, r *http.Request) {
			hcJSON(rw, answers[mirror][strings.Split(r.URL.Path, "/")[1]])
		}
	}
	logs := t.TempDir()
	primary, mirror := startApp(t, app(false)), startApp(t, app(true))
	d := exampleDynamic(t)
	d.Service("primary", primary)
	d.Mirror("mirror-api", map[string]any{"url": mirror, "compare": map[string]any{
		"enabled": true, "maxBodySize": 1 << 20, "logFile": filepath.Join(logs, "big.log")}})
	d.Mirror("cmp-small", map[string]any{"url": mirror, "compare": map[string]any{
		"enabled": true, "logFile": filepath.Join(logs, "small.log")}})
	d.Router("small", "/small/", "primary", "cmp-small")
	e := hcStartE2E(t, d, "api", "small")

	// The defaults: a 60 KB answer with 20 differences under one 60 KB key.
	small := hcCompared(t, e, "cmp-small@file")
	hcRun(t, e, 3, 1, func(i int) string { return fmt.Sprintf("/small/%d", i) })
	got := hcWaitCompared(t, e, "cmp-small@file", small, 3, waitLimit)
	assert.Equal(t, 3.0, got["differed"]-small["differed"])
	sizes, diffs := hcLines(t, filepath.Join(logs, "small.log"))
	require.Len(t, sizes, 3)
	t.Logf("defaults, 60 KB key: difference lines of %v bytes, %d differences", sizes, len(diffs[0]))
	assert.Less(t, hcMaxInt(sizes), hcLineLimit, "a difference line of %d bytes", hcMaxInt(sizes))
	assert.Len(t, diffs[0], 20)

	// compare.maxBodySize 1 MiB: 50 identical answers at once, then 50 with other 1 MB keys.
	counts := hcCompared(t, e, hcMiddleware)
	hcRun(t, e, 2, 1, func(i int) string { return fmt.Sprintf("/diff/warm-%d", i) })
	counts = hcWaitCompared(t, e, hcMiddleware, counts, 2, 30*time.Second)
	before := hcStats(t, e)
	hcRun(t, e, n, n, func(i int) string { return fmt.Sprintf("/same/%d", i) })
	got = hcWaitCompared(t, e, hcMiddleware, counts, n, 30*time.Second)
	assert.Equal(t, float64(n), got["matched"]-counts["matched"])
	counts = got
	same := hcStats(t, e)
	hcRun(t, e, n, n, func(i int) string { return fmt.Sprintf("/diff/%d", i) })
	got = hcWaitCompared(t, e, hcMiddleware, counts, n, 60*time.Second)
	diff := hcStats(t, e)
	burst := hcDelta(counts, got)
	t.Logf("%d answers with other 1 MB keys at once: %v", n, burst)
	assert.Zero(t, burst["matched"], "answers with other keys counted matched")
	assert.GreaterOrEqual(t, burst["differed"], 1.0, "no answer judged")
	sizes, diffs = hcLines(t, filepath.Join(logs, "big.log"))
	require.Len(t, sizes, 2+int(burst["differed"]), "a line per answer that differed")
	t.Logf("1 MB keys: peak RSS %d MiB; after %d identical answers at once %d MiB (+%d); after %d with other keys %d MiB (+%d more); longest line %d bytes",
		before.PeakRSS>>20, n, same.PeakRSS>>20, (same.PeakRSS-before.PeakRSS)>>20, n, diff.PeakRSS>>20,
		(diff.PeakRSS-same.PeakRSS)>>20, hcMaxInt(sizes))
	assert.Less(t, hcMaxInt(sizes), hcLineLimit, "a difference line of %d bytes", hcMaxInt(sizes))
	for _, d := range diffs {
		assert.Len(t, d, 2, "one key only in each answer")
	}
	assert.Less(t, diff.PeakRSS-same.PeakRSS, int64(150<<20), "differing answers cost %d MiB more peak RSS than identical ones",
		(diff.PeakRSS-same.PeakRSS)>>20)
}

// Item 8. Identical services are counted matched when the client asks for no encoding: Traefik
// un-gzips the primary's answer, and the comparison undoes the mirror's gzip likewise; a real
// difference under that gzip is still reported, as a JSON difference only.
func TestTraefikCompareMirrorGzipIsUndone(t *testing.T) {
	app := func(mirror bool) http.HandlerFunc {
		return func(rw http.ResponseWriter, r *http.Request) {
			price := 10
			if mirror && strings.HasPrefix(r.URL.Path, "/changed/") {
				price = 11
			}
			body := []byte(fmt.Sprintf(`{"id":%q,"price":%d,"items":[%s]}`, r.URL.Path, price,
				strings.TrimSuffix(strings.Repeat(`{"sku":"abc","qty":1},`, 50), ",")))
			rw.Header().Set("Vary", "Accept-Encoding")
			if strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
				var z bytes.Buffer
				zw := gzip.NewWriter(&z)
				_, _ = zw.Write(body)
				_ = zw.Close()
				body = z.Bytes()
				rw.Header().Set("Content-Encoding", "gzip")
			}
			hcJSON(rw, body)
		}
	}
	e, logFile := hcStart(t, app(false), app(true))
	require.True(t, e.client.Transport.(*http.Transport).DisableCompression, "the client must send no Accept-Encoding")

	const same, explicit, changed = 10, 3, 3
	base := hcCompared(t, e, hcMiddleware)
	hcRun(t, e, same, 2, func(i int) string { return fmt.Sprintf("/same/%d", i) })
	for i := 0; i < explicit; i++ { // the client asks for gzip itself: both sides gzipped alike
		req := hcGet(e, fmt.Sprintf("/explicit/%d", i))
		req.Header.Set("Accept-Encoding", "gzip")
		r := harness.Do(e.client, req)
		require.NoError(t, r.Err)
		require.Equal(t, http.StatusOK, r.Status)
	}
	hcRun(t, e, changed, 1, func(i int) string { return fmt.Sprintf("/changed/%d", i) })
	got := hcWaitCompared(t, e, hcMiddleware, base, same+explicit+changed, waitLimit)
	assert.Equal(t, map[string]float64{"matched": same + explicit, "differed": changed, "notCompared": 0}, hcDelta(base, got))

	lines := diffLines(t, logFile)
	require.Len(t, lines, changed, "difference lines: only the changed answers")
	for _, l := range lines {
		assert.True(t, strings.HasPrefix(l["path"].(string), "/changed/"), "a difference line for %v", l["path"])
		assert.Equal(t, []any{map[string]any{"kind": "json", "name": "price", "primary": "10", "mirror": "11"}}, l["differences"])
	}
}

// Item 13. pathRegex and matchHeaders never run over a path or header value longer than 8 KiB: a
// request with a 900 KB header, or path, that an unanchored expression looks for is filtered
// (not copied) at little more CPU than a request of the same size that nothing looks at.
func TestTraefikFiltersSkipHugeValues(t *testing.T) {
	const n = 20
	const size = 900_000
	primary := hcStartRawServer(t)
	d := exampleDynamic(t)
	d.Service("primary", primary.url)
	d.Mirror("mirror-api", map[string]any{"matchHeaders": map[string]any{"X-Big": "a.*b"}})
	d.Mirror("mirror-path", map[string]any{"pathRegex": "a.*b"})
	d.Router("path", "/p/", "primary", "mirror-path")
	e := hcStartE2E(t, d, "api", "path")
	big := bytes.Repeat([]byte("a"), size)
	// cpu sends count requests, one at a time, and returns Traefik's CPU per request.
	cpu := func(count int, path string, header string, value []byte) time.Duration {
		before := hcStats(t, e)
		hcRawRun(t, e, count, 1, func(i int) net.Buffers {
			return net.Buffers{[]byte("GET " + path), []byte(strconv.Itoa(i) + " HTTP/1.1\r\nHost: x\r\n" + header + ": "), value, []byte("\r\n\r\n")}
		})
		after := hcStats(t, e)
		return (after.CPU - before.CPU) / time.Duration(count)
	}
	longPath := func(prefix, last string) string { return prefix + string(big) + last + "/" }
	// Warm-up, and one request each that the expressions would match: too long to be looked at,
	// so filtered too.
	cpu(2, "/big/", "X-Other", big)
	cpu(1, "/big/", "X-Big", append(big[:size:size], 'b'))
	cpu(1, longPath("/big/", ""), "X-Other", []byte("x"))
	cpu(1, longPath("/p/", "b"), "X-Other", []byte("x"))
	// Rounds of each kind in turn, so that a change of the machine's load weighs on all alike.
	var other, header, otherPath, path time.Duration
	const rounds = 4
	for r := 0; r < rounds; r++ {
		other += cpu(n/rounds, "/big/", "X-Other", big) / rounds
		header += cpu(n/rounds, "/big/", "X-Big", big) / rounds
		otherPath += cpu(n/rounds, longPath("/big/", ""), "X-Other", []byte("x")) / rounds // no pathRegex
		path += cpu(n/rounds, longPath("/p/", ""), "X-Other", []byte("x")) / rounds
	}
	t.Logf("Traefik CPU per request of %d bytes: in a header nothing looks at %v, in X-Big (matchHeaders a.*b) %v; "+
		"in a path nothing looks at %v, in a path under pathRegex a.*b %v", size, other, header, otherPath, path)
	assert.Less(t, header-other, 15*time.Millisecond, "matchHeaders over a %d-byte value: CPU per request", size)
	assert.Less(t, path-otherPath, 15*time.Millisecond, "pathRegex over a %d-byte path: CPU per request", size)

	s := mustScrape(t, e.traefik.MetricsURL)
	assert.Equal(t, float64(2+1+1+3*n), s.outcome(hcMiddleware, "filtered"), "every request filtered by matchHeaders")
	assert.Equal(t, float64(1+n), s.outcome("mirror-path@file", "filtered"), "every request filtered by pathRegex")
	assert.Zero(t, s.outcome(hcMiddleware, "sent"), "no request copied")
	assert.Zero(t, s.outcome("mirror-path@file", "sent"), "no request copied")
	assert.Zero(t, e.mirror.Count(), "copies reached the mirror")
	assert.Equal(t, int64(2+1+1+1+4*n), primary.heads.Load(), "requests the primary got")
}
