package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"
)

// The families the plugin serves at metricsAddress, with their types (metrics.go).
var mirrorFamilies = map[string]string{
	"traefik_mirror_requests_total":        "counter",
	"traefik_mirror_copy_duration_seconds": "histogram",
	"traefik_mirror_responses_total":       "counter",
	"traefik_mirror_inflight":              "gauge",
	"traefik_mirror_config_error":          "gauge",
	"traefik_mirror_copied_bytes_total":    "counter",
	"traefik_mirror_retries_total":         "counter",
	"traefik_mirror_compared_total":        "counter",
	"traefik_mirror_records_total":         "counter",
	"traefik_mirror_record_bytes_total":    "counter",
	"traefik_mirror_record_failures_total": "counter",
}

// mirrorOutcomes are the outcome label values of traefik_mirror_requests_total.
var mirrorOutcomes = []string{"sent", "failed", "dropped", "rateLimited", "tooLarge", "sampledOut", "filtered", "skipped", "cut"}

// scrape is one read of a metrics endpoint: the text and what expfmt made of it.
type scrape struct {
	text        string
	contentType string
	families    map[string]*dto.MetricFamily
}

// scrapeMetrics reads http://addr/metrics (or a full URL) and parses it as the Prometheus text
// format 0.0.4.
func scrapeMetrics(target string) (*scrape, error) {
	if !strings.HasPrefix(target, "http://") {
		target = "http://" + target + "/metrics"
	}
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(target)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s: %s", target, resp.Status, body)
	}
	var parser expfmt.TextParser
	families, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%s: %w\n%s", target, err, body)
	}
	return &scrape{text: string(body), contentType: resp.Header.Get("Content-Type"), families: families}, nil
}

func mustScrape(t *testing.T, target string) *scrape {
	t.Helper()
	s, err := scrapeMetrics(target)
	require.NoError(t, err)
	return s
}

func hasLabels(m *dto.Metric, labels map[string]string) bool {
	got := map[string]string{}
	for _, lp := range m.GetLabel() {
		got[lp.GetName()] = lp.GetValue()
	}
	for k, v := range labels {
		if got[k] != v {
			return false
		}
	}
	return true
}

// series returns the samples of a family whose labels include the given ones.
func (s *scrape) series(family string, labels map[string]string) []*dto.Metric {
	var all []*dto.Metric
	for _, m := range s.families[family].GetMetric() {
		if hasLabels(m, labels) {
			all = append(all, m)
		}
	}
	return all
}

// value is the value of the one counter or gauge sample of family with these labels, and
// whether there is exactly one.
func (s *scrape) value(family string, labels map[string]string) (float64, bool) {
	all := s.series(family, labels)
	if len(all) != 1 {
		return 0, false
	}
	m := all[0]
	switch {
	case m.Counter != nil:
		return m.GetCounter().GetValue(), true
	case m.Gauge != nil:
		return m.GetGauge().GetValue(), true
	case m.Untyped != nil:
		return m.GetUntyped().GetValue(), true
	}
	return 0, false
}

// outcome is traefik_mirror_requests_total of one middleware and outcome (-1: no such series).
func (s *scrape) outcome(middleware, outcome string) float64 {
	v, ok := s.value("traefik_mirror_requests_total", map[string]string{"middleware": middleware, "outcome": outcome})
	if !ok {
		return -1
	}
	return v
}

// outcomes are all the outcome counts of one middleware.
func (s *scrape) outcomes(middleware string) map[string]float64 {
	got := map[string]float64{}
	for _, o := range mirrorOutcomes {
		got[o] = s.outcome(middleware, o)
	}
	return got
}

// histogram is a middleware's copy duration histogram.
func (s *scrape) histogram(middleware string) *dto.Histogram {
	all := s.series("traefik_mirror_copy_duration_seconds", map[string]string{"middleware": middleware})
	if len(all) != 1 {
		return nil
	}
	return all[0].GetHistogram()
}

// expectOutcomes is every outcome at 0 but the ones given.
func expectOutcomes(nonZero map[string]float64) map[string]float64 {
	exp := map[string]float64{}
	for _, o := range mirrorOutcomes {
		exp[o] = nonZero[o]
	}
	return exp
}

// checkExposition checks that every family is announced with HELP and TYPE, and has the type it
// should have wherever it has samples.
func checkExposition(t *testing.T, s *scrape) {
	t.Helper()
	for name, kind := range mirrorFamilies {
		assert.Regexp(t, regexp.MustCompile(`(?m)^# HELP `+name+` \S.*$`), s.text, "HELP of %s", name)
		assert.Regexp(t, regexp.MustCompile(`(?m)^# TYPE `+name+` `+kind+`$`), s.text, "TYPE of %s", name)
		if mf := s.families[name]; mf != nil {
			assert.Equal(t, kind, strings.ToLower(mf.GetType().String()), "type of %s", name)
			assert.NotEmpty(t, mf.GetHelp(), "help of %s", name)
		}
	}
	assert.Equal(t, "text/plain; version=0.0.4; charset=utf-8", s.contentType)
}

// checkFresh checks the series of a middleware that has seen no request: every outcome there,
// at 0, and the other per-middleware families at 0.
func checkFresh(t *testing.T, s *scrape, middleware string) {
	t.Helper()
	assert.Equal(t, expectOutcomes(nil), s.outcomes(middleware), "%s: every outcome present, at 0", middleware)
	for _, family := range []string{"traefik_mirror_inflight", "traefik_mirror_copied_bytes_total", "traefik_mirror_retries_total"} {
		v, ok := s.value(family, map[string]string{"middleware": middleware})
		assert.True(t, ok, "%s: no %s", middleware, family)
		assert.Zero(t, v, "%s: %s", middleware, family)
	}
	for _, result := range []string{"matched", "differed", "notCompared"} {
		v, ok := s.value("traefik_mirror_compared_total", map[string]string{"middleware": middleware, "result": result})
		assert.True(t, ok, "%s: no compared_total{result=%q}", middleware, result)
		assert.Zero(t, v)
	}
	h := s.histogram(middleware)
	if assert.NotNil(t, h, "%s: no histogram", middleware) {
		assert.Zero(t, h.GetSampleCount())
		assert.Zero(t, h.GetSampleSum())
		assert.NotEmpty(t, h.GetBucket())
	}
	assert.Empty(t, s.series("traefik_mirror_responses_total", map[string]string{"middleware": middleware}))
}

// checkHistogram checks that buckets are cumulative, ascending, and end at the count.
func checkHistogram(t *testing.T, h *dto.Histogram, count uint64) {
	t.Helper()
	require.NotNil(t, h)
	assert.Equal(t, count, h.GetSampleCount())
	prevBound, prevCount := math.Inf(-1), uint64(0)
	for _, b := range h.GetBucket() {
		assert.Greater(t, b.GetUpperBound(), prevBound)
		assert.GreaterOrEqual(t, b.GetCumulativeCount(), prevCount)
		prevBound, prevCount = b.GetUpperBound(), b.GetCumulativeCount()
	}
	assert.LessOrEqual(t, prevCount, count)
	if count > 0 {
		assert.Greater(t, h.GetSampleSum(), 0.0)
	}
}

// waitScrape polls target until ok says the scrape is what the test waits for.
func waitScrape(t *testing.T, target string, ok func(s *scrape) bool, what string) *scrape {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	var last *scrape
	var lastErr error
	for time.Now().Before(deadline) {
		last, lastErr = scrapeMetrics(target)
		if lastErr == nil && ok(last) {
			return last
		}
		time.Sleep(20 * time.Millisecond)
	}
	if last != nil {
		t.Fatalf("%s: not within %s; last scrape:\n%s", what, waitLimit, last.text)
	}
	t.Fatalf("%s: not within %s: %v", what, waitLimit, lastErr)
	return nil
}

func freeAddr(t *testing.T) string {
	t.Helper()
	addrs, err := harness.FreeAddrs(1)
	require.NoError(t, err)
	return addrs[0]
}

// send sends one request and requires a 200.
func (e *e2e) send(t *testing.T, method, path string, body []byte) {
	t.Helper()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	res := harness.Do(e.client, e.request(t, method, path, r))
	require.NoError(t, res.Err, "%s %s", method, path)
	require.Equal(t, http.StatusOK, res.Status, "%s %s", method, path)
}

// A known mix of requests shows as exact counts, and every outcome is there from the start.
func TestTraefikMetricsOutcomes(t *testing.T) {
	hung, err := harness.StartHung(0)
	require.NoError(t, err)
	t.Cleanup(hung.Close)
	down, err := harness.StartRefused()
	require.NoError(t, err)
	t.Cleanup(down.Close)
	metrics := freeAddr(t)

	d := exampleDynamic(t)
	d.HTTP.Routers = map[string]any{}
	with := func(o map[string]any) map[string]any { o["metricsAddress"] = metrics; return o }
	d.Mirror("m-main", with(map[string]any{"maxBodySize": 1024, "methods": "GET,POST"}))
	d.Mirror("m-sampled", with(map[string]any{"percent": "0.000001"})) // percent 0 would turn it off
	d.Mirror("m-hung", with(map[string]any{"url": "http://" + hung.Addr, "maxInflight": 1, "timeout": "60s"}))
	d.Mirror("m-rated", with(map[string]any{"maxRate": "0.01"})) // one copy per 100 s, a burst of 1
	d.Mirror("m-failed", with(map[string]any{"url": "http://" + down.Addr}))
	names := []string{"main", "sampled", "hung", "rated", "failed"}
	for _, n := range names {
		d.Router(n, "/"+n, "primary", "m-"+n)
	}
	e := startE2EWith(t, e2eOpts{dynamic: d, routers: names})

	before := mustScrape(t, metrics)
	checkExposition(t, before)
	for _, n := range names {
		checkFresh(t, before, "m-"+n+"@file")
	}

	small, large := randomBytes(t, 100), randomBytes(t, 2048)
	for i := 0; i < 20; i++ {
		e.send(t, http.MethodGet, "/main/get-"+strconv.Itoa(i), nil)
	}
	for i := 0; i < 10; i++ {
		e.send(t, http.MethodPost, "/main/post", small)
	}
	for i := 0; i < 4; i++ {
		e.send(t, http.MethodPost, "/main/large", large) // over maxBodySize
	}
	for i := 0; i < 3; i++ {
		e.send(t, http.MethodDelete, "/main/delete", nil) // not in methods
	}
	for i := 0; i < 10; i++ {
		e.send(t, http.MethodGet, "/sampled", nil)
	}
	for i := 0; i < 6; i++ { // the first holds the only slot, forever: the others are dropped
		e.send(t, http.MethodGet, "/hung", nil)
	}
	for i := 0; i < 6; i++ {
		e.send(t, http.MethodGet, "/rated", nil)
	}
	e.send(t, http.MethodGet, "/failed", nil)
	const requests = 20 + 10 + 4 + 3 + 10 + 6 + 6 + 1

	s := waitScrape(t, metrics, func(s *scrape) bool {
		return s.outcome("m-main@file", "sent") == 30 && s.outcome("m-rated@file", "sent") == 1 &&
			s.outcome("m-failed@file", "failed") == 1
	}, "copies settled")
	checkExposition(t, s)
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": 30, "tooLarge": 4, "filtered": 3}), s.outcomes("m-main@file"))
	assert.Equal(t, expectOutcomes(map[string]float64{"sampledOut": 10}), s.outcomes("m-sampled@file"))
	assert.Equal(t, expectOutcomes(map[string]float64{"dropped": 5}), s.outcomes("m-hung@file"), "one copy still in flight")
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": 1, "rateLimited": 5}), s.outcomes("m-rated@file"))
	assert.Equal(t, expectOutcomes(map[string]float64{"failed": 1}), s.outcomes("m-failed@file"))

	inflight, _ := s.value("traefik_mirror_inflight", map[string]string{"middleware": "m-hung@file"})
	assert.Equal(t, 1.0, inflight)
	assert.Equal(t, 1, hung.Open())
	for _, n := range []string{"main", "sampled", "rated", "failed"} {
		v, _ := s.value("traefik_mirror_inflight", map[string]string{"middleware": "m-" + n + "@file"})
		assert.Zero(t, v, n)
	}
	bytesSent, _ := s.value("traefik_mirror_copied_bytes_total", map[string]string{"middleware": "m-main@file"})
	assert.Equal(t, float64(10*len(small)), bytesSent)

	// Each copy that went out is observed once; the hung one has not ended.
	checkHistogram(t, s.histogram("m-main@file"), 30)
	checkHistogram(t, s.histogram("m-rated@file"), 1)
	checkHistogram(t, s.histogram("m-failed@file"), 1)
	checkHistogram(t, s.histogram("m-hung@file"), 0)
	checkHistogram(t, s.histogram("m-sampled@file"), 0)

	// One answer of the mirror is one response counted.
	codes, _ := s.value("traefik_mirror_responses_total", map[string]string{"middleware": "m-main@file", "code": "200"})
	assert.Equal(t, 30.0, codes, "responses_total{code=200} must equal the 30 answers the mirror gave")
	codes, _ = s.value("traefik_mirror_responses_total", map[string]string{"middleware": "m-rated@file", "code": "200"})
	assert.Equal(t, 1.0, codes)
	assert.Empty(t, s.series("traefik_mirror_responses_total", map[string]string{"middleware": "m-failed@file"}))

	require.Eventually(t, func() bool { return e.mirror.Count() == 31 }, waitLimit, 10*time.Millisecond)
	require.Eventually(t, func() bool { return e.primary.Count() == requests }, waitLimit, 10*time.Millisecond)
}

// Two routers that use one middleware add up in one series.
func TestTraefikMetricsSharedByRouters(t *testing.T) {
	metrics := freeAddr(t)
	d := exampleDynamic(t)
	d.HTTP.Routers = map[string]any{}
	d.Mirror("m-shared", map[string]any{"metricsAddress": metrics})
	d.Router("a", "/a", "primary", "m-shared")
	d.Router("b", "/b", "primary", "m-shared")
	e := startE2EWith(t, e2eOpts{dynamic: d, routers: []string{"a", "b"}})
	for i := 0; i < 7; i++ {
		e.send(t, http.MethodGet, "/a", nil)
	}
	for i := 0; i < 5; i++ {
		e.send(t, http.MethodPost, "/b", []byte("twelve bytes"))
	}
	s := waitScrape(t, metrics, func(s *scrape) bool { return s.outcome("m-shared@file", "sent") >= 12 }, "12 sent")
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": 12}), s.outcomes("m-shared@file"))
	assert.Len(t, s.series("traefik_mirror_requests_total", nil), len(mirrorOutcomes), "one series per outcome, for one middleware")
	for _, family := range []string{"traefik_mirror_inflight", "traefik_mirror_copied_bytes_total", "traefik_mirror_retries_total", "traefik_mirror_copy_duration_seconds"} {
		assert.Len(t, s.series(family, nil), 1, family)
	}
	b, _ := s.value("traefik_mirror_copied_bytes_total", map[string]string{"middleware": "m-shared@file"})
	assert.Equal(t, 5.0*12, b)
	checkHistogram(t, s.histogram("m-shared@file"), 12)
	require.Eventually(t, func() bool { return e.mirror.Count() == 12 }, waitLimit, 10*time.Millisecond)
}

// traefikGoroutines reads go_goroutines from Traefik's own Prometheus metrics.
func traefikGoroutines(t *testing.T, e *e2e) float64 {
	t.Helper()
	s := mustScrape(t, e.traefik.APIURL+"/metrics")
	v, ok := s.value("go_goroutines", nil)
	require.True(t, ok, "no go_goroutines in Traefik's metrics:\n%.2000s", s.text)
	return v
}

// listening counts the sockets listening on a loopback address, from /proc/net/tcp.
func listening(t *testing.T, addr string) int {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	p, err := strconv.Atoi(port)
	require.NoError(t, err)
	raw, err := os.ReadFile("/proc/net/tcp")
	require.NoError(t, err)
	want := fmt.Sprintf("0100007F:%04X", p)
	n := 0
	for _, line := range strings.Split(string(raw), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && f[1] == want && f[3] == "0A" { // 0A: LISTEN
			n++
		}
	}
	return n
}

// Reloads keep the counts, keep one listener and start no goroutine.
func TestTraefikMetricsAcrossReloads(t *testing.T) {
	metrics := freeAddr(t)
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"metricsAddress": metrics})
	e := startE2EWith(t, e2eOpts{dynamic: d, static: func(cfg map[string]any) {
		cfg["metrics"] = map[string]any{"prometheus": map[string]any{"entryPoint": "traefik"}}
	}})

	builds := func() int { return strings.Count(e.traefik.Log(), "mirror mirror-api@file: copying to") }
	reload := func(i int) {
		n := builds()
		d.Mirror("mirror-api", map[string]any{"metricsAddress": metrics, "timeout": fmt.Sprintf("%ds", 6+i)})
		require.NoError(t, e.traefik.SetDynamic(d.YAML()))
		require.Eventually(t, func() bool { return builds() > n }, waitLimit, 5*time.Millisecond, "reload %d not applied", i)
	}
	sent := 0
	prev := mustScrape(t, metrics)
	traffic := func() {
		for k := 0; k < 3; k++ {
			e.send(t, http.MethodPost, "/r", []byte("reload"))
		}
		sent += 3
		cur := waitScrape(t, metrics, func(s *scrape) bool { return s.outcome("mirror-api@file", "sent") == float64(sent) },
			fmt.Sprintf("sent=%d", sent))
		for _, o := range mirrorOutcomes {
			assert.GreaterOrEqual(t, cur.outcome("mirror-api@file", o), prev.outcome("mirror-api@file", o), "%s went backwards", o)
		}
		assert.GreaterOrEqual(t, cur.histogram("mirror-api@file").GetSampleCount(),
			prev.histogram("mirror-api@file").GetSampleCount())
		prev = cur
	}
	// Two reloads and some traffic first, so that connections of steady traffic exist.
	reload(100)
	traffic()
	reload(101)
	traffic()
	before := traefikGoroutines(t, e)
	for i := 0; i < 20; i++ {
		reload(i)
		traffic()
	}
	// Traefik's own goroutines come and go by a dozen or so around a reload (watchers,
	// throttling): the count is read until it is back near where it was, which a leak of one
	// goroutine per reload (20 here) would never be.
	after := traefikGoroutines(t, e)
	for deadline := time.Now().Add(waitLimit); after-before >= 10 && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
		after = math.Min(after, traefikGoroutines(t, e))
	}
	t.Logf("goroutines %v before 20 reloads, %v after", before, after)
	assert.Less(t, after-before, 10.0, "goroutines grow across reloads: a leak of one per reload would show")
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": float64(sent)}), prev.outcomes("mirror-api@file"))
	assert.Equal(t, 1, listening(t, metrics), "one listener on the metrics address")
	assert.NotContains(t, e.traefik.Log(), "cannot serve metrics")
	assert.GreaterOrEqual(t, builds(), 22)
}

// ansiEscape matches the colour codes of Traefik's console log.
var ansiEscape = regexp.MustCompile("\x1b\\[[0-9;]*m")

// A metrics address that cannot be bound is an ERROR line naming it; mirroring goes on.
func TestTraefikMetricsAddressInUse(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { held.Close() })
	addr := held.Addr().String()
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"metricsAddress": addr})
	e := startE2EWith(t, e2eOpts{dynamic: d})

	want := "mirror mirror-api@file: cannot serve metrics on metricsAddress " + addr + ": "
	require.Eventually(t, func() bool { return strings.Contains(e.traefik.Log(), want) }, waitLimit, 10*time.Millisecond)
	var line string
	for _, l := range strings.Split(ansiEscape.ReplaceAllString(e.traefik.Log(), ""), "\n") {
		if strings.Contains(l, want) {
			line = l
			break
		}
	}
	t.Logf("%s", line)
	assert.Contains(t, line, " ERR ", "logged at ERROR level")
	assert.Contains(t, line, "address already in use")
	routers, err := e.traefik.Routers()
	require.NoError(t, err)
	assert.Equal(t, "enabled", routers["api@file"])
	for i := 0; i < 3; i++ {
		e.send(t, http.MethodPost, "/still", []byte("copied"))
		c, ok := e.mirror.Next(waitLimit)
		require.True(t, ok, "copy %d", i)
		assert.Equal(t, "copied", string(c.Body))
	}
	assert.Equal(t, 3, e.primary.Count())
}

// maxRate lets through the burst, then the rate; the rest are counted rateLimited.
func TestTraefikMaxRate(t *testing.T) {
	const rate, burst, n, workers = 20, 20, 400, 4
	metrics := freeAddr(t)
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"metricsAddress": metrics, "maxRate": rate})
	e := startE2EWith(t, e2eOpts{dynamic: d})

	// 400 requests paced over about 2 s, four clients at a time.
	var mu sync.Mutex
	var firstDone, lastStart time.Time
	failures := 0
	next := make(chan int)
	var wg sync.WaitGroup
	begin := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				start := time.Now()
				req, err := http.NewRequest(http.MethodGet, e.traefik.WebURL+"/rate", nil)
				if err != nil {
					panic(err)
				}
				r := harness.Do(e.client, req)
				done := time.Now()
				mu.Lock()
				if start.After(lastStart) {
					lastStart = start
				}
				if firstDone.IsZero() || done.Before(firstDone) {
					firstDone = done
				}
				if r.Err != nil || r.Status != http.StatusOK {
					failures++
				}
				mu.Unlock()
			}
		}()
	}
	tick := time.NewTicker(2 * time.Second / n)
	for i := 0; i < n; i++ {
		<-tick.C
		next <- i
	}
	tick.Stop()
	close(next)
	wg.Wait()
	end := time.Now()
	assert.Zero(t, failures)

	s := waitScrape(t, metrics, func(s *scrape) bool {
		v, _ := s.value("traefik_mirror_inflight", map[string]string{"middleware": "mirror-api@file"})
		return s.outcome("mirror-api@file", "sent")+s.outcome("mirror-api@file", "rateLimited") == n && v == 0
	}, "every request counted")
	sent, limited := s.outcome("mirror-api@file", "sent"), s.outcome("mirror-api@file", "rateLimited")
	// Every request reached the middleware within [begin, end]; a copy is allowed per 1/rate
	// plus the burst, at most. From the first answer to the last request sent, requests kept
	// coming faster than the rate, so (but for a stall of a second) every token was used.
	outer, inner := end.Sub(begin).Seconds(), lastStart.Sub(firstDone).Seconds()
	upper := float64(burst) + math.Ceil(outer*rate) + 1
	lower := float64(burst) + math.Floor(0.9*inner*rate) - 1
	t.Logf("%.0f sent, %.0f rateLimited in %.2fs (inner %.2fs): bounds [%.0f, %.0f]", sent, limited, outer, inner, lower, upper)
	assert.GreaterOrEqual(t, sent, lower)
	assert.LessOrEqual(t, sent, upper)
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": sent, "rateLimited": n - sent}), s.outcomes("mirror-api@file"))
	require.Eventually(t, func() bool { return e.primary.Count() == n }, waitLimit, 10*time.Millisecond, "the primary gets every request")
	assert.Equal(t, int(sent), e.mirror.Count())
}

// prometheus is a real Prometheus server scraping targets every second, and its query API.
type prometheus struct {
	exited <-chan struct{}
	logs   *harness.SyncBuffer
	web    string
}

// startPrometheus starts /usr/bin/prometheus (Debian's package, which .ci/run installs) scraping
// the metrics endpoints at targets, or skips the test without it. It is stopped, by its PID,
// when the test ends.
func startPrometheus(t *testing.T, targets ...string) *prometheus {
	t.Helper()
	const bin = "/usr/bin/prometheus"
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("no Prometheus server at %s (Debian package prometheus: apt-get install -y prometheus): %v", bin, err)
	}
	dir := t.TempDir()
	p := &prometheus{logs: &harness.SyncBuffer{}, web: freeAddr(t)}
	quoted := make([]string, len(targets))
	for i, target := range targets {
		quoted[i] = strconv.Quote(target)
	}
	config := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: traefik-mirror
    static_configs:
      - targets: [%s]
`, strings.Join(quoted, ", "))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(config), 0o644))
	cmd := exec.Command(bin, "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+p.web, "--log.level=warn")
	cmd.Stdout, cmd.Stderr = p.logs, p.logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	p.exited = exited
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("prometheus log:\n%s", p.logs)
		}
	})
	return p
}

// query runs an instant query and gives each result's value by its middleware label.
func (p *prometheus) query(q string) (map[string]string, error) {
	select {
	case <-p.exited:
		return nil, fmt.Errorf("prometheus exited:\n%s", p.logs)
	default:
	}
	resp, err := http.Get("http://" + p.web + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, err
	}
	if out.Status != "success" {
		return nil, fmt.Errorf("%s: status %s: %s", q, out.Status, out.Error)
	}
	got := map[string]string{}
	for _, r := range out.Data.Result {
		got[r.Metric["middleware"]] = fmt.Sprint(r.Value[1])
	}
	return got, nil
}

// A real Prometheus server scrapes the endpoint and reports the count.
func TestPrometheusScrapesMetrics(t *testing.T) {
	metrics := freeAddr(t)
	p := startPrometheus(t, metrics)
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"metricsAddress": metrics})
	e := startE2EWith(t, e2eOpts{dynamic: d})
	const n = 15
	for i := 0; i < n; i++ {
		e.send(t, http.MethodGet, "/p/"+strconv.Itoa(i), nil)
	}
	waitScrape(t, metrics, func(s *scrape) bool { return s.outcome("mirror-api@file", "sent") == n }, "sent")

	deadline := time.Now().Add(30 * time.Second)
	var last map[string]string
	var lastErr error
	for {
		last, lastErr = p.query(`traefik_mirror_requests_total{outcome="sent"}`)
		if lastErr == nil && last["mirror-api@file"] == strconv.Itoa(n) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus did not report sent=%d within 30s: %v %v", n, last, lastErr)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The histogram and the other families are ingested too.
	got, err := p.query(`traefik_mirror_copy_duration_seconds_count`)
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(n), got["mirror-api@file"])
	got, err = p.query(`sum by (middleware) (traefik_mirror_requests_total)`)
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(n), got["mirror-api@file"])
	got, err = p.query(`up{job="traefik-mirror"}`)
	require.NoError(t, err)
	assert.Equal(t, "1", got[""])
}

// shadowServer is one server of the shadow pool: it answers /health and counts the copies.
type shadowServer struct {
	*harness.Upstream
	mu     sync.Mutex
	copies int
	bad    []string // copies without the marker, or health checks with one
}

func startShadow(t *testing.T) *shadowServer {
	t.Helper()
	s := &shadowServer{}
	u, err := harness.StartUpstream("127.0.0.1:0", 100000, func(rw http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if r.URL.Path == "/health" {
			if r.Header.Get("X-Mirrored-By") != "" {
				s.bad = append(s.bad, "health check with a marker")
			}
			_, _ = io.WriteString(rw, "healthy")
			return
		}
		s.copies++
		if r.Header.Get("X-Mirrored-By") != "mirror-api@file" || r.Header.Get("X-Mirror-Loop") == "" {
			s.bad = append(s.bad, r.URL.Path+" without the marker")
		}
		_, _ = io.WriteString(rw, "shadow")
	})
	require.NoError(t, err)
	s.Upstream = u
	t.Cleanup(u.Close)
	return s
}

func (s *shadowServer) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.copies
}

// serverStatus is the status Traefik's API gives each server of a service.
func serverStatus(e *e2e, service string) (map[string]string, error) {
	resp, err := http.Get(e.traefik.APIURL + "/api/http/services/" + service)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var info struct {
		ServerStatus map[string]string `json:"serverStatus"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil {
		return nil, err
	}
	return info.ServerStatus, nil
}

func waitServerStatus(t *testing.T, e *e2e, service string, want map[string]string) {
	t.Helper()
	var last map[string]string
	require.Eventually(t, func() bool {
		got, err := serverStatus(e, service)
		last = got
		if err != nil {
			return false
		}
		for k, v := range want {
			if got[k] != v {
				return false
			}
		}
		return true
	}, waitLimit, 20*time.Millisecond, "server status of %s: want %v, last %v", service, want, &last)
}

// example/shadow-pool.yml: the copies go to an entry point of the same Traefik, whose load
// balancer spreads them over a pool of shadow servers with a health check.
func TestTraefikShadowPool(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(harness.RepoRoot(), "example", "shadow-pool.yml"))
	require.NoError(t, err)
	a, b := startShadow(t), startShadow(t)
	shadowEntry, metrics := freeAddr(t), freeAddr(t)
	e := startE2EWith(t, e2eOpts{
		yaml: string(raw),
		static: func(cfg map[string]any) {
			cfg["entryPoints"].(map[string]any)["shadow"] = map[string]any{"address": shadowEntry}
		},
		replace: map[string]string{
			"127.0.0.1:8081": shadowEntry, "127.0.0.1:9003": a.Addr, "127.0.0.1:9004": b.Addr, "127.0.0.1:9100": metrics,
		},
		routers: []string{"api", "shadow"},
	})
	waitServerStatus(t, e, "shadow-pool@file", map[string]string{a.URL: "UP", b.URL: "UP"})
	// The example's own mirror address is not used: it copies to the shadow entry point.
	assert.Zero(t, e.mirror.Count())

	primaryOK := func(want int) {
		t.Helper()
		require.Eventually(t, func() bool { return e.primary.Count() == want }, waitLimit, 10*time.Millisecond,
			"the primary gets every request: %d of %d", e.primary.Count(), want)
		for _, p := range e.primary.Drain() {
			assert.Empty(t, p.Header.Get("X-Mirrored-By"), "a copy reached the primary: %s", p.Path)
			assert.Empty(t, p.Header.Get("X-Mirror-Loop"), "a copy reached the primary: %s", p.Path)
			assert.True(t, strings.HasPrefix(p.Path, "/orders/"), "the primary got %s", p.Path)
		}
	}

	// Both shadow servers up: the copies are spread over them.
	const first = 40
	for i := 0; i < first; i++ {
		e.send(t, http.MethodPost, "/orders/"+strconv.Itoa(i), []byte(`{"n":`+strconv.Itoa(i)+`}`))
	}
	require.Eventually(t, func() bool { return a.count()+b.count() == first }, waitLimit, 10*time.Millisecond,
		"copies: %d + %d of %d", a.count(), b.count(), first)
	t.Logf("copies spread %d / %d", a.count(), b.count())
	assert.GreaterOrEqual(t, a.count(), first/4)
	assert.GreaterOrEqual(t, b.count(), first/4)
	primaryOK(first)

	// One shadow server stops: the health check takes it out, the other gets every copy.
	b.Close()
	waitServerStatus(t, e, "shadow-pool@file", map[string]string{a.URL: "UP", b.URL: "DOWN"})
	aBefore, bBefore := a.count(), b.count()
	const second = 30
	for i := 0; i < second; i++ {
		e.send(t, http.MethodGet, "/orders/"+strconv.Itoa(first+i), nil)
	}
	require.Eventually(t, func() bool { return a.count() == aBefore+second }, waitLimit, 10*time.Millisecond,
		"copies on the healthy server: %d of %d", a.count()-aBefore, second)
	assert.Equal(t, bBefore, b.count())
	primaryOK(first + second)

	s := waitScrape(t, metrics, func(s *scrape) bool { return s.outcome("mirror-api@file", "sent") == first+second },
		"every copy sent")
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": first + second}), s.outcomes("mirror-api@file"),
		"no copy failed: the pool had a healthy server for each")
	codes, _ := s.value("traefik_mirror_responses_total", map[string]string{"middleware": "mirror-api@file", "code": "200"})
	assert.Positive(t, codes)
	assert.Empty(t, a.bad)
	assert.Empty(t, b.bad)
	assert.NotContains(t, e.traefik.Log(), "failed=")

	// Were the shadow router to carry the middleware too, the loop token stops the copies there:
	// each is skipped, not copied again.
	var doc map[string]any
	require.NoError(t, yaml.Unmarshal(raw, &doc))
	httpDoc := doc["http"].(map[string]any)
	shadowRouter := httpDoc["routers"].(map[string]any)["shadow"].(map[string]any)
	shadowRouter["middlewares"] = []any{"mirror-api"}
	pool := httpDoc["services"].(map[string]any)["shadow-pool"].(map[string]any)["loadBalancer"].(map[string]any)
	pool["servers"] = []any{map[string]any{"url": "http://127.0.0.1:9003"}} // the stopped one is gone
	out, err := yaml.Marshal(doc)
	require.NoError(t, err)
	require.NoError(t, e.traefik.SetDynamic(string(out)))
	require.Eventually(t, func() bool {
		resp, err := http.Get(e.traefik.APIURL + "/api/http/routers/shadow@file")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var r struct {
			Middlewares []string `json:"middlewares"`
			Status      string   `json:"status"`
		}
		return json.NewDecoder(resp.Body).Decode(&r) == nil && r.Status == "enabled" && len(r.Middlewares) == 1
	}, waitLimit, 20*time.Millisecond, "the shadow router does not carry the middleware")
	aBefore = a.count()
	const third = 10
	for i := 0; i < third; i++ {
		e.send(t, http.MethodGet, "/orders/"+strconv.Itoa(first+second+i), nil)
	}
	s = waitScrape(t, metrics, func(s *scrape) bool {
		return s.outcome("mirror-api@file", "skipped") == third && s.outcome("mirror-api@file", "sent") == first+second+third
	}, "each copy skipped once at the shadow router")
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": first + second + third, "skipped": third}), s.outcomes("mirror-api@file"))
	require.Eventually(t, func() bool { return a.count() == aBefore+third }, waitLimit, 10*time.Millisecond)
	primaryOK(first + second + third)
	assert.Equal(t, aBefore+third, a.count(), "no copy of a copy")
	assert.Empty(t, a.bad)
}
