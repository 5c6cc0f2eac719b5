package tests

// Issue #20: one copy budget for all Traefik replicas, through Redis. Real Traefik processes, a
// real redis-server (Debian's, which .ci/run installs), and a fake hostile one.

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// startRedis starts redis-server until the test ends; without it the test is skipped, in CI it
// fails.
func startRedis(t *testing.T, args ...string) *harness.Redis {
	t.Helper()
	if testing.Short() {
		t.Skip("real Redis tests are skipped in -short mode")
	}
	r, err := harness.StartRedis(args...)
	if errors.Is(err, harness.ErrNoRedis) && !harness.RequireRedis() {
		t.Skip(err.Error())
	}
	require.NoError(t, err)
	t.Cleanup(r.Stop)
	return r
}

// fleetTraefik starts one Traefik of a fleet: the example's api router through mirror-api,
// with these options over the example's, to the given primary and mirror.
func fleetTraefik(t *testing.T, options map[string]any, primary, mirror string) *harness.Traefik {
	t.Helper()
	d := exampleDynamic(t)
	d.Mirror("mirror-api", options)
	addrs, err := harness.FreeAddrs(2)
	require.NoError(t, err)
	tr, err := harness.StartTraefik(harness.Options{
		Debug: true,
		Replace: map[string]string{
			harness.ExampleWeb: addrs[0], harness.ExampleAPI: addrs[1],
			harness.ExamplePrimary: primary, harness.ExampleMirror: mirror,
		},
		Static: func(cfg map[string]any) {
			cfg["providers"].(map[string]any)["providersThrottleDuration"] = "10ms"
		},
		Dynamic: d.YAML(),
	})
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("traefik log:\n%s", tr.Log())
		}
		tr.Stop()
	})
	require.NoError(t, tr.WaitRouters("enabled", "api"))
	return tr
}

// leaseGauge reads one of the lease families of mirror-api from a Traefik's metrics.
func leaseGauge(tr *harness.Traefik, family string) (float64, bool) {
	s, err := scrapeMetrics(tr.MetricsURL)
	if err != nil {
		return 0, false
	}
	return s.value(family, map[string]string{"middleware": "mirror-api@file"})
}

// loadFronts sends rate requests per second to each front's /fleet for d, in parallel, and
// returns the requests that did not end in 200.
func loadFronts(client *http.Client, d time.Duration, rates map[string]float64) int64 {
	var wg sync.WaitGroup
	var bad atomic.Int64
	for front, rate := range rates {
		wg.Add(1)
		go func(url string, rate float64) {
			defer wg.Done()
			_, b := harness.Paced(client, url, rate, d)
			bad.Add(b)
		}(front+"/fleet", rate)
	}
	wg.Wait()
	return bad.Load()
}

// settle waits until the copies of the last requests have arrived: until the mirror's count has
// not moved for 50 ms (a copy is on its way for a millisecond or two on loopback), 2 s at most.
func settle(mirror *harness.Upstream) {
	last, since := mirror.Count(), time.Now()
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline) && time.Since(since) < 50*time.Millisecond; {
		if n := mirror.Count(); n != last {
			last, since = n, time.Now()
		}
		time.Sleep(5 * time.Millisecond) // polling, within the deadline
	}
}

// copiesPerSecond runs a phase of load for d and returns the copies per second the mirror got
// from skip after the phase's start to its end: the first seconds hold what the phase before
// left (the bucket full at the very start, a process's lease held when its traffic stopped).
func copiesPerSecond(t *testing.T, client *http.Client, mirror *harness.Upstream, d, skip time.Duration, rates map[*harness.Traefik]float64) float64 {
	t.Helper()
	fronts := map[string]float64{}
	for tr, rate := range rates {
		fronts[tr.WebURL] = rate
	}
	return pacedCopies(t, client, mirror, d, skip, fronts)
}

// Three Traefik processes sharing one Redis send maxRate copies per second in all, whatever the
// split of the traffic; with Redis killed they go on at maxRate / 3 each, say so at ERROR, and
// the shared budget is back within seconds of Redis's return.
//
// The issue asks for 15 s phases counted whole. The suite's budget asks for less: each phase
// lasts 10 s and copies are counted over its last 8 s. The error bound of the leases (readme:
// what the processes hold outside the bucket, at most 3 x 6 copies, plus the bucket's refill
// within one period, 3) is 21 copies over 240, 8.8%: within the 10% without counting the
// start's burst, which the first 2 s take.
func TestRedisFleetBudget(t *testing.T) {
	r := startRedis(t)
	primary, err := harness.StartUpstream("127.0.0.1:0", 10, nil)
	require.NoError(t, err)
	t.Cleanup(primary.Close)
	mirror, err := harness.StartUpstream("127.0.0.1:0", 10, nil)
	require.NoError(t, err)
	t.Cleanup(mirror.Close)
	options := map[string]any{"maxRate": 30, "redis": map[string]any{
		"endpoints": []string{r.Addr}, "dialTimeout": "500ms", "readTimeout": "500ms", "writeTimeout": "500ms",
	}}
	var fleet []*harness.Traefik
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tr := fleetTraefik(t, options, primary.Addr, mirror.Addr)
			mu.Lock()
			fleet = append(fleet, tr)
			mu.Unlock()
		}()
	}
	wg.Wait()
	require.Len(t, fleet, 3)
	for _, tr := range fleet {
		require.Eventually(t, func() bool { v, ok := leaseGauge(tr, "traefik_mirror_lease_processes"); return ok && v == 3 },
			waitLimit, 50*time.Millisecond, "every process counts three")
	}
	client := harness.Client(256)
	const rate = 30.0

	split := copiesPerSecond(t, client, mirror, 10*time.Second, 2*time.Second,
		map[*harness.Traefik]float64{fleet[0]: 40, fleet[1]: 40, fleet[2]: 40})
	t.Logf("split 1:1:1, 120 requests/s: %.1f copies/s", split)
	assert.InDelta(t, rate, split, rate*0.1, "split 1:1:1")
	one := copiesPerSecond(t, client, mirror, 10*time.Second, 2*time.Second, map[*harness.Traefik]float64{fleet[0]: 120})
	t.Logf("all on one, 120 requests/s: %.1f copies/s", one)
	assert.InDelta(t, rate, one, rate*0.1, "all on one")

	// Redis killed: the loaded process copies at 30 / 3 processes last seen.
	r.Stop()
	down := copiesPerSecond(t, client, mirror, 8*time.Second, 3*time.Second, map[*harness.Traefik]float64{fleet[0]: 120})
	t.Logf("Redis down, all on one: %.1f copies/s", down)
	assert.InDelta(t, rate/3, down, rate/3*0.2, "the fallback rate")
	for i, tr := range fleet {
		lines := strings.Count(tr.Log(), "the shared copy budget is out of reach")
		assert.Equal(t, 1, lines, "process %d: one ERROR line within logInterval (10 s)", i)
		line := logLine(tr.Log(), "the shared copy budget is out of reach")
		assert.Contains(t, line, " ERR ", "process %d: logged at ERROR", i)
		assert.Contains(t, line, "redis "+r.Addr+": ", "process %d: the ERROR names the endpoint", i)
		assert.Contains(t, line, "at most 10/s (maxRate 30 / 3 processes last seen)", "process %d: the fallback rate said", i)
	}
	v, ok := leaseGauge(fleet[0], "traefik_mirror_lease_shared")
	assert.True(t, ok && v == 0, "lease_shared while Redis is down: %v", v)

	// Redis back: within a few seconds every process leases again, and the budget is shared.
	require.NoError(t, r.Start())
	back := time.Now()
	for _, tr := range fleet {
		require.Eventually(t, func() bool { v, ok := leaseGauge(tr, "traefik_mirror_lease_shared"); return ok && v == 1 },
			5*time.Second, 20*time.Millisecond, "the shared budget did not come back")
	}
	t.Logf("the shared budget back after %v", time.Since(back).Round(time.Millisecond))
	again := copiesPerSecond(t, client, mirror, 6*time.Second, 2*time.Second, map[*harness.Traefik]float64{fleet[0]: 60, fleet[1]: 60})
	t.Logf("Redis back, split 1:1:0: %.1f copies/s", again)
	assert.InDelta(t, rate, again, rate*0.15, "the shared budget after Redis's return")
}

// A wrong password: an ERROR naming the endpoint, and the router serves on, copying at the
// fallback rate.
func TestRedisWrongPassword(t *testing.T) {
	r := startRedis(t, "--requirepass", "right-password")
	e := startE2EWith(t, e2eOpts{dynamic: redisDynamic(t, map[string]any{"maxRate": 5, "redis": map[string]any{
		"endpoints": []string{r.Addr}, "password": "wrong-password",
	}})})
	for i := 0; i < 20; i++ {
		res := harness.Do(e.client, e.request(t, http.MethodGet, "/pw", nil))
		require.NoError(t, res.Err)
		require.Equal(t, http.StatusOK, res.Status)
	}
	_, ok := e.mirror.Next(waitLimit)
	assert.True(t, ok, "no copy at the fallback rate")
	require.Eventually(t, func() bool { return strings.Contains(e.traefik.Log(), "redis "+r.Addr+": AUTH: WRONGPASS") }, waitLimit, 10*time.Millisecond,
		"no ERROR naming the endpoint and the refusal")
	assert.Contains(t, logLine(e.traefik.Log(), "WRONGPASS"), " ERR ", "logged at ERROR")
	assert.NotContains(t, e.traefik.Log(), "right-password")

	// The right password, by a reload: the shared budget holds.
	require.NoError(t, e.traefik.SetDynamic(redisDynamic(t, map[string]any{"maxRate": 5, "redis": map[string]any{
		"endpoints": []string{r.Addr}, "password": "right-password",
	}}).YAML()))
	require.Eventually(t, func() bool { v, ok := leaseGauge(e.traefik, "traefik_mirror_lease_shared"); return ok && v == 1 },
		waitLimit, 20*time.Millisecond, "no lease with the right password")
	require.Eventually(t, func() bool { n, err := r.Clients("right-password"); return err == nil && n == 2 },
		waitLimit, 20*time.Millisecond, "connections to Redis: one for the budget goroutine, one asking")

	// redis removed by a reload: the budget goroutine ends and closes its connection.
	require.NoError(t, e.traefik.SetDynamic(redisDynamic(t, map[string]any{"maxRate": 5}).YAML()))
	require.Eventually(t, func() bool { n, err := r.Clients("right-password"); return err == nil && n == 1 },
		waitLimit, 20*time.Millisecond, "the budget goroutine still holds a connection to Redis")
	res := harness.Do(e.client, e.request(t, http.MethodGet, "/after", nil))
	require.NoError(t, res.Err)
	assert.Equal(t, http.StatusOK, res.Status)
}

// logLine is the first line of log that holds s.
func logLine(log, s string) string {
	for _, line := range strings.Split(ansiEscape.ReplaceAllString(log, ""), "\n") {
		if strings.Contains(line, s) {
			return line
		}
	}
	return ""
}

func redisDynamic(t *testing.T, options map[string]any) *harness.Dynamic {
	t.Helper()
	d := exampleDynamic(t)
	d.Mirror("mirror-api", options)
	return d
}

// hostileRedis is a fake Redis on loopback that reads whatever comes and answers with answer.
func hostileRedis(t *testing.T, answer func(c net.Conn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				go func() { _, _ = bufio.NewReader(c).WriteTo(discard{}) }()
				answer(c)
			}()
		}
	}()
	return l.Addr().String()
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// Malformed and hostile replies (garbage, huge lengths, an endless line, a slow drip) neither
// crash Traefik nor grow its memory; the routers serve on.
func TestRedisHostileServer(t *testing.T) {
	if testing.Short() {
		t.Skip("real Traefik tests are skipped in -short mode")
	}
	chunk := []byte(strings.Repeat("x", 64<<10))
	servers := map[string]func(c net.Conn){
		"garbage": func(c net.Conn) {
			for i := 0; i < 1000; i++ {
				if _, err := c.Write([]byte("\x00\xff\r\n%$*:-+\r\n")); err != nil {
					return
				}
			}
		},
		"hugebulk":  func(c net.Conn) { _, _ = c.Write([]byte("$1099511627776\r\n")); _, _ = c.Write(chunk) },
		"hugearray": func(c net.Conn) { _, _ = c.Write([]byte("*1099511627776\r\n")); _, _ = c.Write(chunk) },
		"endless": func(c net.Conn) {
			_, _ = c.Write([]byte("+"))
			for i := 0; i < 1024; i++ { // 64 MiB, if the client read it all
				if _, err := c.Write(chunk); err != nil {
					return
				}
			}
		},
		"drip": func(c net.Conn) {
			for i := 0; i < 200; i++ {
				if _, err := c.Write([]byte("*")); err != nil {
					return
				}
				time.Sleep(20 * time.Millisecond) // the drip itself
			}
		},
	}
	d := exampleDynamic(t)
	var routers []string
	for name, answer := range servers {
		addr := hostileRedis(t, answer)
		d.Mirror("mirror-"+name, map[string]any{"maxRate": 50, "redis": map[string]any{
			"endpoints": []string{addr}, "readTimeout": "300ms", "dialTimeout": "300ms",
		}})
		d.Router(name, "/"+name, "primary", "mirror-"+name)
		routers = append(routers, name)
	}
	e := startE2E(t, d, routers...)
	before, err := e.traefik.Stats()
	require.NoError(t, err)
	deadline := time.Now().Add(6 * time.Second)
	for time.Now().Before(deadline) {
		for _, name := range routers {
			res := harness.Do(e.client, e.request(t, http.MethodGet, "/"+name, nil))
			require.NoError(t, res.Err)
			require.Equal(t, http.StatusOK, res.Status, name)
		}
		time.Sleep(20 * time.Millisecond) // the pace of the requests
	}
	require.True(t, e.traefik.Running(), "Traefik died")
	after, err := e.traefik.Stats()
	require.NoError(t, err)
	t.Logf("peak RSS %d MiB before the hostile exchanges, %d MiB after 6 s of them", before.PeakRSS>>20, after.PeakRSS>>20)
	assert.Less(t, after.PeakRSS-before.PeakRSS, int64(32<<20), "Traefik's memory grew")
	for _, name := range routers {
		assert.Contains(t, e.traefik.Log(), "mirror mirror-"+name+"@file: redis 127.0.0.1:", "no ERROR for %s", name)
	}
}
