package tests

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// countingNext is the primary of the Yaegi metrics tests: it counts the requests it gets.
type countingNext struct{ n atomic.Int64 }

func (c *countingNext) ServeHTTP(rw http.ResponseWriter, _ *http.Request) {
	c.n.Add(1)
	_, _ = rw.Write([]byte("primary"))
}

// serveDirect calls an (interpreted) handler in this goroutine, as Traefik's router does.
func serveDirect(t *testing.T, h http.Handler, method, path string, body []byte) {
	t.Helper()
	var req *http.Request
	if body == nil {
		req = httptest.NewRequest(method, path, nil)
	} else {
		req = httptest.NewRequest(method, path, bytes.NewReader(body))
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	require.Equal(t, http.StatusOK, rec.Code)
	require.Equal(t, "primary", rec.Body.String())
}

// Instances with one name share one state: two handlers (two routers) add up, and a third New
// (a reload) starts from the counts so far.
func TestYaegiMetricsRegistry(t *testing.T) {
	p := loadInterpreted(t)
	mirrorUp, err := harness.StartUpstream("127.0.0.1:0", 100, nil)
	require.NoError(t, err)
	t.Cleanup(mirrorUp.Close)
	metrics := freeAddr(t)
	config := func() map[string]any { return map[string]any{"url": mirrorUp.URL, "metricsAddress": metrics} }
	next := &countingNext{}

	h1, err := p.handler(next, asStrings(config()), "shared@file")
	require.NoError(t, err)
	h2, err := p.handler(next, asStrings(config()), "shared@file")
	require.NoError(t, err)
	other, err := p.handler(next, asStrings(config()), "other@file")
	require.NoError(t, err)

	for i := 0; i < 3; i++ {
		serveDirect(t, h1, http.MethodGet, "/one", nil)
	}
	for i := 0; i < 2; i++ {
		serveDirect(t, h2, http.MethodPost, "/two", []byte("body"))
	}
	s := waitScrape(t, metrics, func(s *scrape) bool { return s.outcome("shared@file", "sent") == 5 }, "sent=5")
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": 5}), s.outcomes("shared@file"))
	assert.Equal(t, expectOutcomes(nil), s.outcomes("other@file"), "another name has counts of its own")
	assert.Len(t, s.series("traefik_mirror_requests_total", map[string]string{"middleware": "shared@file"}), len(mirrorOutcomes),
		"one series per outcome for the two instances")
	b, _ := s.value("traefik_mirror_copied_bytes_total", map[string]string{"middleware": "shared@file"})
	assert.Equal(t, 8.0, b)

	// A reload: New again with the same name. The counts are kept.
	h3, err := p.handler(next, asStrings(config()), "shared@file")
	require.NoError(t, err)
	s = mustScrape(t, metrics)
	assert.Equal(t, 5.0, s.outcome("shared@file", "sent"))
	serveDirect(t, h3, http.MethodGet, "/three", nil)
	serveDirect(t, other, http.MethodGet, "/other", nil)
	s = waitScrape(t, metrics, func(s *scrape) bool {
		return s.outcome("shared@file", "sent") == 6 && s.outcome("other@file", "sent") == 1
	}, "sent=6 and 1")
	checkHistogram(t, s.histogram("shared@file"), 6)
	checkHistogram(t, s.histogram("other@file"), 1)
	assert.Equal(t, int64(7), next.n.Load())
	require.Eventually(t, func() bool { return mirrorUp.Count() == 7 }, waitLimit, 5*time.Millisecond)
	assert.NotContains(t, p.stderr.String(), "cannot serve metrics", "one listener for all instances")
}

// maxRate 5: a burst of 20 quick requests gives 5 copies, and 15 are rateLimited.
func TestYaegiMaxRateBurst(t *testing.T) {
	p := loadInterpreted(t)
	mirrorUp, err := harness.StartUpstream("127.0.0.1:0", 100, nil)
	require.NoError(t, err)
	t.Cleanup(mirrorUp.Close)
	metrics := freeAddr(t)
	next := &countingNext{}
	h, err := p.handler(next, map[string]any{"url": mirrorUp.URL, "metricsAddress": metrics, "maxRate": "5.000000"}, "rate@file")
	require.NoError(t, err)

	begin := time.Now()
	for i := 0; i < 20; i++ {
		serveDirect(t, h, http.MethodGet, "/burst", nil)
	}
	elapsed := time.Since(begin)
	s := waitScrape(t, metrics, func(s *scrape) bool {
		v, _ := s.value("traefik_mirror_inflight", map[string]string{"middleware": "rate@file"})
		return s.outcome("rate@file", "sent")+s.outcome("rate@file", "rateLimited") == 20 && v == 0
	}, "20 counted")
	sent := s.outcome("rate@file", "sent")
	// One copy more per 200 ms the burst took: exact when it took less than 200 ms, as it does
	// but on a machine stalled.
	allowed := 5.0 + float64(elapsed/(200*time.Millisecond))
	t.Logf("20 requests in %v: %.0f sent", elapsed, sent)
	if elapsed < 200*time.Millisecond {
		assert.Equal(t, 5.0, sent)
	} else {
		assert.GreaterOrEqual(t, sent, 5.0)
		assert.LessOrEqual(t, sent, allowed+1)
	}
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": sent, "rateLimited": 20 - sent}), s.outcomes("rate@file"))
	assert.Equal(t, int64(20), next.n.Load(), "the primary gets every request")
	require.Eventually(t, func() bool { return mirrorUp.Count() == int(sent) }, waitLimit, 5*time.Millisecond)
}

// The exposition served by the interpreted plugin parses, with every family, type and help, the
// histogram cumulative, and label values escaped.
func TestYaegiMetricsExposition(t *testing.T) {
	p := loadInterpreted(t)
	mirrorUp, err := harness.StartUpstream("127.0.0.1:0", 100, nil)
	require.NoError(t, err)
	t.Cleanup(mirrorUp.Close)
	metrics := freeAddr(t)
	next := &countingNext{}
	config := map[string]any{"url": mirrorUp.URL, "metricsAddress": metrics, "maxBodySize": "16"}
	h, err := p.handler(next, config, "expo@file")
	require.NoError(t, err)
	// A name with the characters the format escapes (no traffic: the marker header could not
	// carry it).
	odd := "odd \"quoted\" back\\slash\nline@file"
	_, err = p.handler(next, config, odd)
	require.NoError(t, err)

	fresh := mustScrape(t, metrics)
	checkExposition(t, fresh)
	checkFresh(t, fresh, "expo@file")
	checkFresh(t, fresh, odd)

	serveDirect(t, h, http.MethodGet, "/a", nil)
	serveDirect(t, h, http.MethodGet, "/b", nil)
	serveDirect(t, h, http.MethodPost, "/c", []byte("0123456789"))
	serveDirect(t, h, http.MethodPost, "/d", []byte(strings.Repeat("x", 32))) // over maxBodySize
	s := waitScrape(t, metrics, func(s *scrape) bool {
		v, _ := s.value("traefik_mirror_inflight", map[string]string{"middleware": "expo@file"})
		return s.outcome("expo@file", "sent") == 3 && v == 0
	}, "sent=3")
	checkExposition(t, s)
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": 3, "tooLarge": 1}), s.outcomes("expo@file"))
	assert.Equal(t, expectOutcomes(nil), s.outcomes(odd), "the escaped name parses back")
	b, _ := s.value("traefik_mirror_copied_bytes_total", map[string]string{"middleware": "expo@file"})
	assert.Equal(t, 10.0, b)
	r, _ := s.value("traefik_mirror_retries_total", map[string]string{"middleware": "expo@file"})
	assert.Zero(t, r)
	checkHistogram(t, s.histogram("expo@file"), 3)
	h2 := s.histogram("expo@file")
	var bounds []float64
	for _, bucket := range h2.GetBucket() {
		bounds = append(bounds, bucket.GetUpperBound())
	}
	assert.Subset(t, bounds, []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10})
	assert.Contains(t, s.text, `traefik_mirror_copy_duration_seconds_bucket{middleware="expo@file",le="+Inf"} 3`)
	assert.Contains(t, s.text, `middleware="odd \"quoted\" back\\slash\nline@file"`)

	codes, _ := s.value("traefik_mirror_responses_total", map[string]string{"middleware": "expo@file", "code": "200"})
	assert.Equal(t, 3.0, codes, "responses_total{code=200} must equal the 3 answers the mirror gave")
	assert.Len(t, s.series("traefik_mirror_responses_total", nil), 1)
	assert.Equal(t, int64(4), next.n.Load())
	require.Eventually(t, func() bool { return mirrorUp.Count() == 3 }, waitLimit, 5*time.Millisecond)

	// Only /metrics is served.
	resp, err := http.Get("http://" + metrics + "/other")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
}

// A mistake in the options (failing open: nothing is mirrored) shows in the metrics, served at
// the metricsAddress it names, until a build of the middleware succeeds.
func TestYaegiConfigErrorMetric(t *testing.T) {
	p := loadInterpreted(t)
	mirrorUp, err := harness.StartUpstream("127.0.0.1:0", 100, nil)
	require.NoError(t, err)
	t.Cleanup(mirrorUp.Close)
	metrics := freeAddr(t)
	const name = "typo@file"
	next := &countingNext{}
	h, err := p.handler(next, asStrings(map[string]any{"url": mirrorUp.URL, "metricsAddress": metrics, "percent": "150"}), name)
	require.NoError(t, err, "fails open")
	serveDirect(t, h, http.MethodGet, "/", nil)
	s := waitScrape(t, metrics, func(s *scrape) bool {
		v, ok := s.value("traefik_mirror_config_error", map[string]string{"middleware": name})
		return ok && v == 1
	}, "config_error 1")
	assert.Equal(t, expectOutcomes(nil), s.outcomes(name), "nothing mirrored")

	h, err = p.handler(next, asStrings(map[string]any{"url": mirrorUp.URL, "metricsAddress": metrics}), name)
	require.NoError(t, err)
	serveDirect(t, h, http.MethodGet, "/", nil)
	waitScrape(t, metrics, func(s *scrape) bool {
		v, ok := s.value("traefik_mirror_config_error", map[string]string{"middleware": name})
		return ok && v == 0 && s.outcome(name, "sent") == 1
	}, "config_error 0 once fixed, and the copy counted")
}
