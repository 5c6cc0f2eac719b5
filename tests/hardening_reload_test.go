package tests

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// switcher is a mirror that answers every request with 101 Switching Protocols, then holds the
// connection open until its client closes it (or the test ends).
type switcher struct {
	addr     string
	requests chan switched // a request was read and answered 101
	closed   chan time.Time
}

type switched struct {
	path string
	at   time.Time
}

func startSwitcher(t *testing.T) *switcher {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &switcher{addr: l.Addr().String(), requests: make(chan switched, 100), closed: make(chan time.Time, 100)}
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	t.Cleanup(func() {
		_ = l.Close()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				br := bufio.NewReader(c)
				req, err := http.ReadRequest(br)
				if err != nil {
					return
				}
				_, _ = io.Copy(io.Discard, req.Body)
				s.requests <- switched{path: req.URL.Path, at: time.Now()}
				if _, err := io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"); err != nil {
					return
				}
				_, _ = io.Copy(io.Discard, br) // until the client closes (or the test ends)
				s.closed <- time.Now()
			}()
		}
	}()
	return s
}

// pollScrape scrapes target until ok says the scrape is what the caller waits for, or within
// has passed; it returns the last scrape and whether ok said yes.
func pollScrape(target string, within time.Duration, ok func(s *scrape) bool) (*scrape, bool) {
	deadline := time.Now().Add(within)
	var last *scrape
	for {
		if s, err := scrapeMetrics(target); err == nil {
			last = s
			if ok(s) {
				return s, true
			}
		}
		if time.Now().After(deadline) {
			return last, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func inflight(s *scrape, middleware string) float64 {
	v, ok := s.value("traefik_mirror_inflight", map[string]string{"middleware": middleware})
	if !ok {
		return -1
	}
	return v
}

// A mirror answering 101 Switching Protocols fails the copy at once: Traefik closes the
// connection and gives the slot back, instead of holding both until the mirror lets go.
func TestTraefikSwitchingProtocolsFailsTheCopy(t *testing.T) {
	const timeout = time.Second
	sw := startSwitcher(t)
	metrics := freeAddr(t)
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"url": "http://" + sw.addr, "timeout": timeout.String(), "maxInflight": 1,
		"metricsAddress": metrics})
	e := startE2E(t, d)

	for i := 1; i <= 2; i++ {
		path := fmt.Sprintf("/switch/%d", i)
		e.send(t, http.MethodPost, path, []byte("upgrade me"))
		var got switched
		select {
		case got = <-sw.requests:
		case <-time.After(waitLimit):
			// The one slot (maxInflight 1) is still held by the first copy.
			t.Fatalf("copy %d did not reach the mirror within %s", i, waitLimit)
		}
		assert.Equal(t, path, got.path)
		select {
		case at := <-sw.closed:
			held := at.Sub(got.at)
			t.Logf("copy %d: Traefik closed the upgraded connection %v after the 101", i, held.Round(time.Millisecond))
			assert.Less(t, held, timeout, "copy %d: the connection was closed, but only after timeout", i)
		case <-time.After(3 * timeout):
			t.Fatalf("copy %d: Traefik still holds the mirror's connection %s after the 101 (timeout %s)", i, 3*timeout, timeout)
		}
		s, ok := pollScrape(metrics, 3*timeout, func(s *scrape) bool {
			return inflight(s, "mirror-api@file") == 0 && s.outcome("mirror-api@file", "failed") == float64(i)
		})
		require.NotNil(t, s)
		require.True(t, ok, "copy %d: inflight %v, failed %v (want 0 and %d)", i,
			inflight(s, "mirror-api@file"), s.outcome("mirror-api@file", "failed"), i)
		assert.Equal(t, expectOutcomes(map[string]float64{"failed": float64(i)}), s.outcomes("mirror-api@file"))
	}
	assert.Equal(t, 2, e.primary.Count())
}

// Raising maxRate on a reload takes effect at once: the budget built at the old rate (one copy
// per 1,000 s here) does not hold copies back at the new one.
func TestTraefikRaisingMaxRateOnReload(t *testing.T) {
	metrics := freeAddr(t)
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"maxRate": 0.001, "metricsAddress": metrics})
	e := startE2E(t, d)

	e.send(t, http.MethodGet, "/slow/1", nil)
	c, ok := e.mirror.Next(waitLimit)
	require.True(t, ok, "the first copy (the burst of one)")
	assert.Equal(t, "/slow/1", c.Path)
	e.send(t, http.MethodGet, "/slow/2", nil)
	waitScrape(t, metrics, func(s *scrape) bool { return s.outcome("mirror-api@file", "rateLimited") == 1 },
		"the second request rate limited")

	builds := func() int { return strings.Count(e.traefik.Log(), "mirror mirror-api@file: copying to") }
	n := builds()
	d.Mirror("mirror-api", map[string]any{"maxRate": 1000, "metricsAddress": metrics})
	require.NoError(t, e.traefik.SetDynamic(d.YAML()))
	require.Eventually(t, func() bool { return builds() > n }, waitLimit, 5*time.Millisecond, "reload not applied")

	// Traefik switches to the new handlers a moment after building them: requests are sent until
	// one is copied.
	start := time.Now()
	i := 0
	copied := false
	for deadline := start.Add(5 * time.Second); !copied && time.Now().Before(deadline); {
		i++
		e.send(t, http.MethodGet, fmt.Sprintf("/fast/%d", i), nil)
		for _, c := range e.mirror.Drain() {
			copied = copied || strings.HasPrefix(c.Path, "/fast/")
		}
		if !copied {
			if c, ok := e.mirror.Next(50 * time.Millisecond); ok {
				copied = strings.HasPrefix(c.Path, "/fast/")
			}
		}
	}
	require.True(t, copied, "nothing copied within 5s of the reload to maxRate 1000 (%d requests)", i)
	t.Logf("copies flow again %v after the reload was built", time.Since(start).Round(time.Millisecond))
	// And every one from now on, well under the new rate.
	for k := 0; k < 5; k++ {
		e.send(t, http.MethodGet, fmt.Sprintf("/after/%d", k), nil)
	}
	got := map[string]bool{}
	for len(got) < 5 {
		c, ok := e.mirror.Next(waitLimit)
		require.True(t, ok, "copies after the reload: %d of 5", len(got))
		if strings.HasPrefix(c.Path, "/after/") {
			got[c.Path] = true
		}
	}
}

// noKeepAlive is a client that opens a new connection for every request.
func noKeepAlive() *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
}

// getOK says whether a GET of url on a new connection answers 200.
func getOK(url string) error {
	resp, err := noKeepAlive().Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// The metrics listener serves at most 32 connections at once and closes the ones past that, so
// idle keep-alive connections to it cannot use up Traefik's file descriptors.
func TestTraefikMetricsListenerBoundsConnections(t *testing.T) {
	const conns, limit = 200, 32
	metrics := freeAddr(t)
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"metricsAddress": metrics})
	e := startE2E(t, d)
	metricsURL := "http://" + metrics + "/metrics"
	webURL := e.traefik.WebURL + "/web"
	require.Eventually(t, func() bool { return getOK(metricsURL) == nil }, waitLimit, 20*time.Millisecond)
	require.NoError(t, getOK(webURL))
	before, err := e.traefik.OpenFiles()
	require.NoError(t, err)

	// One request on each connection, all at once, then the served ones are left idle.
	all := make([]net.Conn, 0, conns)
	t.Cleanup(func() {
		for _, c := range all {
			_ = c.Close()
		}
	})
	for i := 0; i < conns; i++ {
		c, err := net.DialTimeout("tcp", metrics, 5*time.Second)
		require.NoError(t, err, "connection %d", i)
		all = append(all, c)
	}
	const (
		served = iota
		closed
		unanswered
	)
	fate := make([]int, conns)
	var wg sync.WaitGroup
	for i, c := range all {
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			defer func() { _ = c.SetDeadline(time.Time{}) }()
			fate[i] = closed // a write refused: the server closed it already
			if _, err := io.WriteString(c, "GET /metrics HTTP/1.1\r\nHost: metrics\r\n\r\n"); err != nil {
				return
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			var ne net.Error
			switch {
			case errors.As(err, &ne) && ne.Timeout():
				fate[i] = unanswered
				return
			case err != nil: // EOF or reset
				return
			}
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err == nil && resp.StatusCode == http.StatusOK {
				fate[i] = served
			}
		}(i, c)
	}
	wg.Wait()
	count := map[int]int{}
	for _, f := range fate {
		count[f]++
	}
	held, err := e.traefik.OpenFiles()
	require.NoError(t, err)
	t.Logf("%d connections: %d served and kept open, %d closed by Traefik, %d unanswered; Traefik's open files %d -> %d",
		conns, count[served], count[closed], count[unanswered], before, held)
	assert.LessOrEqual(t, count[served], limit, "connections served at once")
	assert.Positive(t, count[served])
	assert.Zero(t, count[unanswered], "a connection past the limit is closed at once, not left waiting")
	assert.Equal(t, conns, count[served]+count[closed])
	assert.Less(t, held-before, limit+16, "Traefik's open files grow with the idle connections")
	assert.NoError(t, getOK(webURL), "the web entry point, with the idle connections open")

	// The client lets its connections go: a new one is served again.
	for _, c := range all {
		_ = c.Close()
	}
	require.Eventually(t, func() bool { return getOK(metricsURL) == nil }, waitLimit, 20*time.Millisecond,
		"/metrics on a new connection after the others closed")
	assert.NoError(t, getOK(webURL))
	assert.True(t, e.traefik.Running())
}

// Reloads that name a new metricsAddress and compare.logFile each time close the listener and
// the file that no middleware names any more: listeners, files and goroutines do not grow with
// the number of reloads.
func TestTraefikReloadsCloseUnusedListenersAndFiles(t *testing.T) {
	const reloads = 20
	dir := t.TempDir()
	var addrs []string
	d := exampleDynamic(t)
	set := func(i int) {
		addr := freeAddr(t)
		addrs = append(addrs, addr)
		d.Mirror("mirror-api", map[string]any{"metricsAddress": addr, "compare": map[string]any{
			"enabled": true, "logFile": filepath.Join(dir, fmt.Sprintf("diff-%d.log", i)),
		}})
	}
	set(0)
	e := startE2EWith(t, e2eOpts{dynamic: d, static: func(cfg map[string]any) {
		cfg["metrics"] = map[string]any{"prometheus": map[string]any{"entryPoint": "traefik"}}
	}})
	builds := func() int { return strings.Count(e.traefik.Log(), "mirror mirror-api@file: copying to") }
	sent := 0
	reload := func(i int) {
		n := builds()
		set(i)
		require.NoError(t, e.traefik.SetDynamic(d.YAML()))
		require.Eventually(t, func() bool { return builds() > n }, waitLimit, 5*time.Millisecond, "reload %d not applied", i)
		// Traffic, so that copies are compared and difference lines written.
		e.send(t, http.MethodGet, fmt.Sprintf("/r/%d", i), nil)
		sent++
	}
	listeners := func() int {
		n := 0
		for _, a := range addrs {
			n += listening(t, a)
		}
		return n
	}
	reload(1)
	reload(2)
	beforeListeners := listeners()
	beforeFiles, err := e.traefik.OpenFiles()
	require.NoError(t, err)
	beforeGoroutines := traefikGoroutines(t, e)
	for i := 3; i < 3+reloads; i++ {
		reload(i)
	}
	last := addrs[len(addrs)-1]
	s := waitScrape(t, last, func(s *scrape) bool { return s.outcome("mirror-api@file", "sent") == float64(sent) },
		fmt.Sprintf("the last metricsAddress serves sent=%d", sent))
	assert.Equal(t, float64(0), inflight(s, "mirror-api@file"))

	// Settle: Traefik's own goroutines come and go around a reload.
	var afterListeners, afterFiles int
	afterGoroutines := traefikGoroutines(t, e)
	for deadline := time.Now().Add(waitLimit); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		afterListeners = listeners()
		afterFiles, err = e.traefik.OpenFiles()
		require.NoError(t, err)
		if g := traefikGoroutines(t, e); g < afterGoroutines {
			afterGoroutines = g
		}
		if afterListeners <= beforeListeners && afterFiles-beforeFiles < 10 && afterGoroutines-beforeGoroutines < 10 {
			break
		}
	}
	logs, err := e.traefik.OpenFilesUnder(dir)
	require.NoError(t, err)
	t.Logf("over %d reloads: listeners %d -> %d, open files %d -> %d, goroutines %v -> %v; log files open: %v",
		reloads, beforeListeners, afterListeners, beforeFiles, afterFiles, beforeGoroutines, afterGoroutines, logs)
	assert.LessOrEqual(t, afterListeners, beforeListeners, "metrics listeners")
	assert.Equal(t, 1, listening(t, last), "the last metricsAddress")
	assert.Less(t, afterFiles-beforeFiles, 10, "open files")
	assert.Less(t, afterGoroutines-beforeGoroutines, 10.0, "goroutines")
	assert.Equal(t, []string{filepath.Join(dir, fmt.Sprintf("diff-%d.log", 2+reloads))}, logs, "compare log files open")
	var accepting []string
	for _, a := range addrs[:len(addrs)-1] {
		if c, err := net.DialTimeout("tcp", a, time.Second); err == nil {
			c.Close()
			accepting = append(accepting, a)
		}
	}
	assert.Empty(t, accepting, "old metricsAddress values that still accept connections (of %d)", len(addrs)-1)
}
