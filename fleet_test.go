package mirror

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestCompileRedis(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		desc   string
		edit   func(c *Config)
		expErr string
	}{
		{"off by default", func(*Config) {}, ""},
		{"on", func(c *Config) { c.MaxRate = 30; c.Redis.Endpoints = []string{"127.0.0.1:6379"} }, ""},
		{"empty entries of a label list", func(c *Config) { c.MaxRate = 30; c.Redis.Endpoints = []string{"", "r:6379", " "} }, ""},
		{"no maxRate", func(c *Config) { c.Redis.Endpoints = []string{"127.0.0.1:6379"} }, "maxRate must be set"},
		{"no port", func(c *Config) { c.MaxRate = 1; c.Redis.Endpoints = []string{"redis"} }, `invalid redis.endpoints "redis"`},
		{"bad port", func(c *Config) { c.MaxRate = 1; c.Redis.Endpoints = []string{"redis:0"} }, "port must be a number"},
		{"password without endpoints", func(c *Config) { c.Redis.Password = "x" }, "without redis.endpoints"},
		{"negative db", func(c *Config) { c.MaxRate = 1; c.Redis.Endpoints = []string{"r:1"}; c.Redis.DB = -1 }, "invalid redis.db -1"},
		{"username alone", func(c *Config) { c.MaxRate = 1; c.Redis.Endpoints = []string{"r:1"}; c.Redis.Username = "u" }, "redis.password is required"},
		{"bad timeout", func(c *Config) { c.MaxRate = 1; c.Redis.Endpoints = []string{"r:1"}; c.Redis.ReadTimeout = "3" }, `invalid redis.readTimeout "3"`},
		{"zero timeout", func(c *Config) { c.MaxRate = 1; c.Redis.Endpoints = []string{"r:1"}; c.Redis.DialTimeout = "0s" }, "must be positive"},
		{"missing ca", func(c *Config) { c.MaxRate = 1; c.Redis.Endpoints = []string{"r:1"}; c.Redis.TLS.CA = "/nonexistent" }, "invalid redis.tls.ca"},
		{"cert without key", func(c *Config) { c.MaxRate = 1; c.Redis.Endpoints = []string{"r:1"}; c.Redis.TLS.Cert = "x" }, "cert and key go together"},
		{"insecure tls", func(c *Config) {
			c.MaxRate = 1
			c.Redis.Endpoints = []string{"r:1"}
			c.Redis.TLS.InsecureSkipVerify = true
		}, ""},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			t.Parallel()
			c := CreateConfig()
			c.URL = "http://127.0.0.1:1"
			tc.edit(c)
			s, err := compile(c)
			if tc.expErr == "" {
				noError(t, err)
				if (s.redis != nil) != (len(c.Redis.Endpoints) > 0) {
					t.Fatalf("redis compiled to %v for endpoints %q", s.redis, c.Redis.Endpoints)
				}
				return
			}
			if err == nil {
				t.Fatalf("got no error, want %q", tc.expErr)
			}
			contains(t, err.Error(), tc.expErr)
		})
	}
}

// A mistake in the redis block leaves the router serving (fail open), as every option's.
func TestRedisConfigErrorFailsOpen(t *testing.T) {
	t.Parallel()
	cfg := CreateConfig()
	cfg.URL = "http://127.0.0.1:1"
	cfg.Redis.Endpoints = []string{"127.0.0.1:6379"} // no maxRate
	var served bool
	h, err := New(context.Background(), http.HandlerFunc(func(http.ResponseWriter, *http.Request) { served = true }), cfg, testName(t))
	noError(t, err)
	h.ServeHTTP(httptest.NewRecorder(), newRequest(t, "GET", "http://x/", nil))
	if !served {
		t.Fatal("the primary was not called")
	}
}

// redisServer runs Debian's redis-server on a free loopback port until the test ends. Without
// the binary the test is skipped, except in CI (.ci/run installs it), where it fails.
type redisServer struct {
	addr string
	cmd  *exec.Cmd
	done chan struct{}
}

func startRedis(t *testing.T, args ...string) *redisServer {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("no redis-server in CI: %v", err)
		}
		t.Skipf("no redis-server (Debian package redis-server: apt-get install -y redis-server): %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	noError(t, err)
	addr := l.Addr().String()
	_ = l.Close()
	_, port, _ := net.SplitHostPort(addr)
	r := &redisServer{addr: addr, done: make(chan struct{})}
	r.cmd = exec.Command(bin, append([]string{"--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"}, args...)...)
	var out bytes.Buffer
	r.cmd.Stdout, r.cmd.Stderr = &out, &out
	noError(t, r.cmd.Start())
	go func() { _ = r.cmd.Wait(); close(r.done) }()
	t.Cleanup(func() {
		_ = r.cmd.Process.Kill()
		<-r.done
	})
	if !poll(10*time.Millisecond, func() bool {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err == nil {
			_ = c.Close()
		}
		return err == nil
	}) {
		t.Fatalf("redis-server did not listen on %s", addr)
	}
	return r
}

// leaseMiddleware is a middleware under test with a redis block.
func leaseMiddleware(t *testing.T, name string, rate float64, redis RedisConfig) *mirror {
	t.Helper()
	cfg := CreateConfig()
	cfg.URL = "http://127.0.0.1:1"
	cfg.MaxRate = rate
	cfg.Redis = redis
	ctx, cancel := context.WithCancel(context.Background())
	h, err := New(ctx, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}), cfg, name)
	noError(t, err)
	m := h.(*mirror)
	t.Cleanup(func() {
		cancel()
		m.st.lease.cfg.Store(leaseOff)
		eventually(t, func() bool { return !m.st.lease.running.Load() }, "the budget goroutine of %s did not end", name)
	})
	return m
}

// take is the rate check of the request path (refused): a copy refused is counted.
func take(m *mirror) bool {
	if spend(m) {
		return true
	}
	count(m.st, rateLimited, nil)
	return false
}

// Two middleware states sharing one bucket take, in all, the shared rate, even when one has all
// the demand.
func TestLeaseSharesTheBudget(t *testing.T) {
	// Not parallel: it measures rates, which the suite's parallel tests would disturb on a small
	// machine.
	r := startRedis(t)
	redis := defaultRedis()
	redis.Endpoints = []string{r.addr}
	const rate = 50
	a := leaseMiddleware(t, testName(t)+"-a", rate, redis)
	b := leaseMiddleware(t, testName(t)+"-b", rate, redis)
	// Both on one bucket, as two processes with the same middleware name are.
	cb := *b.st.lease.cfg.Load().(*leaseConfig)
	ca := a.st.lease.cfg.Load().(*leaseConfig)
	cb.bucket, cb.procs = ca.bucket, ca.procs
	b.st.lease.cfg.Store(&cb)

	eventually(t, func() bool {
		return atomic.LoadInt32(&a.st.lease.shared) == 1 && atomic.LoadInt32(&b.st.lease.shared) == 1
	}, "no lease from Redis")
	// The bucket starts full: drain it, then count over a window.
	drainUntil := time.Now().Add(1500 * time.Millisecond)
	for time.Now().Before(drainUntil) {
		take(a)
		take(b)
		time.Sleep(time.Millisecond)
	}
	for _, phase := range []struct {
		desc  string
		users []*mirror
	}{{"split", []*mirror{a, b}}, {"all on one", []*mirror{a}}} {
		// Each user asks as a busy process would, far above the rate, from a goroutine of its
		// own (one loop for both would halve one user's demand when the other stops).
		var n, asked int64
		window := 3 * time.Second
		end := time.Now().Add(window)
		done := make(chan struct{})
		for _, m := range phase.users {
			go func(m *mirror) {
				defer func() { done <- struct{}{} }()
				for time.Now().Before(end) {
					atomic.AddInt64(&asked, 1)
					if take(m) {
						atomic.AddInt64(&n, 1)
					}
					time.Sleep(200 * time.Microsecond) // the pace of the demand
				}
			}(m)
		}
		for range phase.users {
			<-done
		}
		if asked < 3*rate*int64(window/time.Second) {
			t.Fatalf("%s: only %d copies asked for in %v: the machine is too loaded for the measure", phase.desc, asked, window)
		}
		got := float64(n) / window.Seconds()
		// The bound: the lease tokens held outside the bucket, 2 x 10, and a period's refill, 5,
		// in 150: 17%; the bucket's start (a full second's burst) was drained before.
		if got < rate*0.8 || got > rate*1.2 {
			t.Errorf("%s: %.1f copies/s, want %d +-20%%", phase.desc, got, rate)
		}
		t.Logf("%s: %.1f copies/s (%d asked)", phase.desc, got, asked)
	}
}

// Redis out of reach: copies go on at the fallback rate, an ERROR line says why, and the shared
// budget comes back when Redis does.
func TestLeaseFallbackAndReturn(t *testing.T) {
	t.Parallel()
	r := startRedis(t)
	redis := defaultRedis()
	redis.Endpoints = []string{r.addr}
	redis.DialTimeout, redis.ReadTimeout = "200ms", "200ms"
	name := testName(t)
	var lines syncBuffer
	st := stateFor(name)
	st.error = func(line string) { _, _ = lines.Write([]byte(line + "\n")) }
	m := leaseMiddleware(t, name, 40, redis)
	l := m.st.lease
	eventually(t, func() bool { return atomic.LoadInt32(&l.shared) == 1 }, "no lease from Redis")

	// Stop the server: the next exchanges fail.
	_ = r.cmd.Process.Kill()
	<-r.done
	eventually(t, func() bool { return atomic.LoadInt64(&l.errors) > 0 }, "no error counted")
	eventually(t, func() bool { return strings.Contains(lines.String(), "shared copy budget is out of reach") }, "no ERROR line: %q", lines.String())
	contains(t, lines.String(), r.addr)
	// The fallback: 40 / 1 process, in a GCRA with a second's burst.
	var n int64
	window := 2 * time.Second
	end := time.Now().Add(window)
	for time.Now().Before(end) {
		if take(m) {
			n++
		}
		time.Sleep(time.Millisecond)
	}
	if n < 60 || n > 130 { // 80 over 2 s, plus up to a second's burst of 40
		t.Errorf("fallback: %d copies in %v, want about 80 (+ a burst up to 40)", n, window)
	}
	equal(t, strings.Count(lines.String(), "out of reach"), 1, "ERROR lines within logInterval")

	// Redis back on the same port: the lease resumes within a few seconds.
	_, port, _ := net.SplitHostPort(r.addr)
	r2 := &redisServer{addr: r.addr, done: make(chan struct{})}
	r2.cmd = exec.Command(r.cmd.Path, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	noError(t, r2.cmd.Start())
	go func() { _ = r2.cmd.Wait(); close(r2.done) }()
	defer func() { _ = r2.cmd.Process.Kill(); <-r2.done }()
	granted := atomic.LoadInt64(&l.granted)
	eventually(t, func() bool {
		take(m)
		return atomic.LoadInt64(&l.granted) > granted && atomic.LoadInt32(&l.shared) == 1
	}, "the shared budget did not come back")
}

// quietRedis is a fake Redis that grants nothing and accepts everything, once no budget goroutine
// of another test runs: for the tests that count them.
func quietRedis(t *testing.T) *fakeRedis {
	t.Helper()
	fr := newFakeRedis(t, func(cmd []string) []byte {
		if cmd[0] == "EVALSHA" {
			return []byte("*2\r\n:0\r\n:1\r\n")
		}
		return []byte("+OK\r\n")
	})
	eventually(t, func() bool { return atomic.LoadInt64(&leaseLoops) == 0 }, "budget goroutines of other tests still run")
	return fr
}

// One goroutine per middleware name, however many instances and rebuilds; none once the name has
// no redis block.
func TestLeaseOneGoroutinePerName(t *testing.T) {
	// Not parallel: it counts every budget goroutine of the process.
	fr := quietRedis(t)
	name := testName(t)
	cfg := CreateConfig()
	cfg.URL = "http://127.0.0.1:1"
	cfg.MaxRate = 10
	cfg.Redis.Endpoints = []string{fr.addr}
	next := http.HandlerFunc(func(http.ResponseWriter, *http.Request) {})
	for i := 0; i < 20; i++ {
		ctx, cancel := context.WithCancel(context.Background())
		_, err := New(ctx, next, cfg, name)
		noError(t, err)
		cancel() // the next rebuild
	}
	eventually(t, func() bool { return len(fr.cmds) > 3 }, "no exchange with the fake Redis")
	equal(t, atomic.LoadInt64(&leaseLoops), 1, "budget goroutines")

	off := *cfg
	off.Redis = defaultRedis()
	_, err := New(context.Background(), next, &off, name)
	noError(t, err)
	eventually(t, func() bool { return atomic.LoadInt64(&leaseLoops) == 0 }, "the budget goroutine did not end without redis")
	for len(fr.cmds) > 0 {
		<-fr.cmds
	}
	time.Sleep(3 * leasePeriod) // nothing should come: an absence has no event to wait for
	equal(t, len(fr.cmds), 0, "exchanges after redis was removed")
}

// A hostile server never grants more than asked, nor crashes the goroutine: the copies fall back.
func TestLeaseHostileReplies(t *testing.T) {
	t.Parallel()
	for _, reply := range []string{"*2\r\n:1000000\r\n:1\r\n", "*2\r\n:-5\r\n:1\r\n", "*1\r\n:1\r\n", "+OK\r\n", "$1099511627776\r\n", "\x00garbage\r\n"} {
		fr := newFakeRedis(t, func(cmd []string) []byte {
			if cmd[0] == "EVALSHA" {
				return []byte(reply)
			}
			return []byte("+OK\r\n")
		})
		redis := defaultRedis()
		redis.Endpoints = []string{fr.addr}
		m := leaseMiddleware(t, testName(t)+"-"+strconv.Quote(reply), 10, redis)
		eventually(t, func() bool { return atomic.LoadInt64(&m.st.lease.errors) > 0 }, "reply %q: no error counted", reply)
		equal(t, atomic.LoadInt64(&m.st.lease.tokens), 0, "tokens from "+strconv.Quote(reply))
		if !m.st.lease.running.Load() {
			t.Errorf("reply %q: the budget goroutine ended", reply)
		}
	}
}

func TestLeaseMetrics(t *testing.T) {
	t.Parallel()
	fr := newFakeRedis(t, func(cmd []string) []byte {
		if cmd[0] == "EVALSHA" { // grants what is asked for (ARGV[3]), one at most; three processes
			grant := "1"
			if cmd[7] == "0" {
				grant = "0"
			}
			return []byte("*2\r\n:" + grant + "\r\n:3\r\n")
		}
		return []byte("+OK\r\n")
	})
	redis := defaultRedis()
	redis.Endpoints = []string{fr.addr}
	m := leaseMiddleware(t, testName(t), 10, redis)
	eventually(t, func() bool { return atomic.LoadInt64(&m.st.lease.granted) > 0 }, "nothing granted")
	var b bytes.Buffer
	w := bufio.NewWriter(&b)
	writeMetrics(w, []*state{m.st})
	noError(t, w.Flush())
	mw := `{middleware="` + m.st.name + `"}`
	for _, want := range []string{"traefik_mirror_lease_granted_total" + mw + " ", "traefik_mirror_lease_errors_total" + mw + " 0",
		"traefik_mirror_lease_processes" + mw + " 3", "traefik_mirror_lease_shared" + mw + " "} {
		contains(t, b.String(), want)
	}
}

// The rate budget holds under contention (the fallback of the shared budget is this budget):
// many goroutines taking from it at once never start it afresh.
func TestAllowUnderContention(t *testing.T) {
	t.Parallel()
	st := &state{}
	const rate = 500
	interval := int64(time.Second / rate)
	tolerance := (rate - 1) * interval
	var n int64
	done := make(chan struct{})
	start := time.Now()
	end := start.Add(2 * time.Second)
	for g := 0; g < 64; g++ {
		go func() {
			defer func() { done <- struct{}{} }()
			for time.Now().Before(end) {
				if allow(st, interval, tolerance) {
					atomic.AddInt64(&n, 1)
				}
			}
		}()
	}
	for g := 0; g < 64; g++ {
		<-done
	}
	most := rate*time.Since(start).Seconds() + rate // the rate, and a second's burst
	if got := float64(atomic.LoadInt64(&n)); got > most {
		t.Fatalf("%v copies allowed in %v at %d/s, want at most %v", got, time.Since(start), rate, most)
	}
}

// Rebuilds that take the redis block away and give it back in quick succession never leave the
// name without its goroutine, nor with two.
func TestLeaseOnOffOn(t *testing.T) {
	// Not parallel: it counts every budget goroutine of the process.
	fr := quietRedis(t)
	name := testName(t)
	on := CreateConfig()
	on.URL = "http://127.0.0.1:1"
	on.MaxRate = 10
	on.Redis.Endpoints = []string{fr.addr}
	off := *on
	off.Redis = defaultRedis()
	next := http.HandlerFunc(func(http.ResponseWriter, *http.Request) {})
	for i := 0; i < 300; i++ {
		cfg := on
		if i%2 == 1 {
			cfg = &off
		}
		_, err := New(context.Background(), next, cfg, name)
		noError(t, err)
		if i%50 == 0 {
			time.Sleep(leasePeriod) // let a goroutine reach its end now and then
		}
	}
	_, err := New(context.Background(), next, on, name)
	noError(t, err)
	st := stateFor(name)
	eventually(t, func() bool { return atomic.LoadInt32(&st.lease.shared) == 1 }, "no lease after the last rebuild")
	// One, once a goroutine that lost the race to go on has returned.
	eventually(t, func() bool { return atomic.LoadInt64(&leaseLoops) == 1 }, "budget goroutines: %d", atomic.LoadInt64(&leaseLoops))
	time.Sleep(3 * leasePeriod) // and still one: a second would have no event to wait for
	equal(t, atomic.LoadInt64(&leaseLoops), 1, "budget goroutines")
	st.lease.cfg.Store(leaseOff)
	eventually(t, func() bool { return atomic.LoadInt64(&leaseLoops) == 0 }, "the budget goroutine did not end")
}
