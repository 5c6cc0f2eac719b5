package mirror

// The fleet budget: with a redis block, maxRate is the budget of the middleware name across every
// Traefik process sharing the Redis database. A token bucket lives in Redis; each process takes
// tokens from it in small leases, in the background, and spends them locally with one atomic
// operation per request. Nothing on the client's path waits for Redis.

import (
	"bufio"
	"context"
	"crypto/sha1" //nolint:gosec // SHA-1 is how Redis names a script (EVALSHA), not a security measure
	"encoding/hex"
	"errors"
	"math"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// The lease's timing. Each period a process asks for what it spent and was refused in the last
// one, plus one, at most leaseMost periods of the whole budget, and gives back what it holds
// beyond that: what the processes hold outside the bucket is the error bound (see the readme).
const (
	leasePeriod   = 100 * time.Millisecond
	leaseMost     = 2           // periods of maxRate one lease asks for at most
	leaseValidFor = time.Second // an exchange that takes longer: Redis is slow, the fallback applies
	leaseRetry    = time.Second // between attempts while Redis fails
	leaseGone     = 30 * time.Second
	replicaTTL    = 5 * time.Second // a process not heard of for this long is not counted
	maxReplicas   = 1000
)

// leaseScript spends the shared budget atomically: it refills the bucket from Redis's own clock
// (no process's clock matters), takes back what a process gives, grants at most what it asks
// for, and counts the processes heard of within the TTL, this one included.
// KEYS: bucket, processes. ARGV: rate per second, burst, want, give, process id, TTL in ms.
// (ts is written with %.0f: Lua's tostring keeps 14 digits, and microseconds since 1970 take 16.)
const leaseScript = `if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local want, give, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil or ts == nil then tokens, ts = burst, now end
if now > ts then tokens = tokens + (now - ts) * rate / 1000000 end
tokens = tokens + give
if tokens > burst then tokens = burst end
local grant = math.floor(tokens)
if grant > want then grant = want end
if grant < 0 then grant = 0 end
tokens = tokens - grant
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], ttl * 12)
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl * 1000)
redis.call('PEXPIRE', KEYS[2], ttl)
return {grant, redis.call('ZCARD', KEYS[2])}`

var leaseScriptSHA = func() string {
	sum := sha1.Sum([]byte(leaseScript)) //nolint:gosec // see the import
	return hex.EncodeToString(sum[:])
}()

// leaseKeyPrefix namespaces the keys: <prefix><middleware name>:bucket and :processes.
const leaseKeyPrefix = "traefik-mirror:"

// fleetProcess identifies this process (this interpreter) among those sharing the budget. It is
// not processToken, which must stay secret.
var fleetProcess = newToken()

// lease is the shared budget's side of a middleware name's state.
type lease struct {
	tokens   int64 // atomic: copies this process may still send from its leases
	shared   int32 // atomic: 1 while Redis answers, each exchange within leaseValidFor (see spend)
	replicas int64 // atomic: processes sharing the budget at the last answer; 1 before any
	fallback int64 // atomic: nanoseconds between copies at the fallback rate, maxRate / replicas
	granted  int64 // atomic: tokens Redis granted, in all
	errors   int64 // atomic: exchanges with Redis that failed
	used     atomic.Bool
	running  atomic.Bool
	cfg      atomic.Value // *leaseConfig; leaseOff when the name has no redis block
}

// leaseConfig is what the budget's goroutine works with, as the last New of the name left it.
type leaseConfig struct {
	redis         *redisOptions // nil: off
	rate, burst   float64
	interval      int64 // nanoseconds between copies at maxRate
	bucket, procs string
	ctx           context.Context // of the New that stored it: done at the next rebuild
}

var leaseOff = &leaseConfig{}

func newLease() *lease {
	l := &lease{replicas: 1}
	l.cfg.Store(leaseOff)
	return l
}

// leaseLoops counts the budget goroutines running in this process (for tests).
var leaseLoops int64

// useLease gives the name's budget goroutine the configuration New just built, and starts it
// unless it runs. It stops by itself when the name has no redis block any more, or when no New
// has been called for the name for leaseGone after a rebuild (the name was removed).
func useLease(ctx context.Context, st *state, s *settings, on bool) {
	l := st.lease
	if !on || s.redis == nil {
		l.cfg.Store(leaseOff)
		return
	}
	burst := math.Floor(s.maxRate)
	if burst < 1 {
		burst = 1
	}
	l.used.Store(true)
	l.cfg.Store(&leaseConfig{
		redis: s.redis, rate: s.maxRate, burst: burst, interval: s.rateInterval,
		bucket: leaseKeyPrefix + st.name + ":bucket", procs: leaseKeyPrefix + st.name + ":processes", ctx: ctx,
	})
	atomic.StoreInt64(&l.fallback, s.rateInterval*atomic.LoadInt64(&l.replicas))
	if l.running.CompareAndSwap(false, true) {
		go leaseLoop(st)
	}
}

// spend takes one copy from the shared budget, on the client's path: a token of the local lease
// if there is one; else, while Redis answered lately, no; else (Redis down, slow or refusing)
// the fallback: maxRate divided by the processes last seen, counted locally.
func spend(m *mirror) bool {
	l := m.st.lease
	for n := atomic.LoadInt64(&l.tokens); n > 0; n = atomic.LoadInt64(&l.tokens) {
		if atomic.CompareAndSwapInt64(&l.tokens, n, n-1) {
			return true
		}
	}
	if atomic.LoadInt32(&l.shared) == 1 {
		return false
	}
	return allow(m.st, atomic.LoadInt64(&l.fallback), m.rateTolerance)
}

// leaser is the budget goroutine's own state.
type leaser struct {
	st        *state
	l         *lease
	conn      *respConn
	retryAt   time.Time
	held      int64     // l.tokens as the goroutine last left it
	last      time.Time // when the last exchange began
	refused   int64     // the name's rateLimited count at the last exchange
	failing   bool
	nextError time.Time
	goneCfg   *leaseConfig // the configuration whose ctx was seen done
	goneAt    time.Time
}

func leaseLoop(st *state) {
	atomic.AddInt64(&leaseLoops, 1)
	defer atomic.AddInt64(&leaseLoops, -1)
	ls := &leaser{st: st, l: st.lease}
	defer func() {
		if recover() != nil { // a panic in a goroutine the plugin started would kill Traefik
			ls.release()
			ls.l.running.Store(false) // the next New starts another
		}
	}()
	for {
		cfg := ls.active()
		if cfg == nil {
			ls.release()
			// A New that stored a configuration meanwhile saw this goroutine running and started
			// none: look again once the flag is down.
			ls.l.running.Store(false)
			if ls.active() == nil || !ls.l.running.CompareAndSwap(false, true) {
				return
			}
			continue
		}
		ls.exchange(cfg)
		time.Sleep(leasePeriod)
	}
}

// release closes the connection and drops the lease: the shared budget is not this process's
// while no goroutine keeps it.
func (ls *leaser) release() {
	if ls.conn != nil {
		ls.conn.close()
		ls.conn = nil
	}
	atomic.StoreInt64(&ls.l.tokens, 0)
	atomic.StoreInt32(&ls.l.shared, 0)
	ls.held = 0
}

// active returns the configuration to work with, or nil when the goroutine should end.
func (ls *leaser) active() *leaseConfig {
	cfg, _ := ls.l.cfg.Load().(*leaseConfig)
	if cfg == nil || cfg.redis == nil {
		return nil
	}
	if cfg.ctx != nil && cfg.ctx.Err() != nil {
		if ls.goneCfg != cfg {
			ls.goneCfg = cfg // (two statements: Yaegi v0.16.1 can lose a tuple assignment to fields)
			ls.goneAt = time.Now()
		} else if time.Since(ls.goneAt) > leaseGone {
			return nil
		}
	}
	return cfg
}

// exchange makes one lease: it measures the demand of the last period, gives back what is held
// beyond it, asks for the rest, and adds what Redis grants.
func (ls *leaser) exchange(cfg *leaseConfig) {
	now := time.Now()
	if ls.conn == nil {
		if now.Before(ls.retryAt) {
			return
		}
		c, err := dialRedis(cfg.redis)
		if err != nil {
			ls.fail(cfg, err)
			return
		}
		ls.conn = c
	}
	l := ls.l
	held := atomic.LoadInt64(&l.tokens)
	spent := ls.held - held
	if spent < 0 {
		spent = 0
	}
	refused := ls.st.get(rateLimited)
	demand := spent + refused - ls.refused
	ls.refused = refused
	// At most leaseMost periods of the whole rate; a period is as long as it has been since the
	// last exchange when this goroutine ran late (a loaded CPU), up to a second: else the process
	// could not take its share.
	since := now.Sub(ls.last)
	if since < leasePeriod || since > time.Second {
		since = leasePeriod
	}
	ls.last = now
	most := int64(math.Ceil(cfg.rate * since.Seconds() * leaseMost))
	target := demand + 1
	if target > most {
		target = most
	}
	var want, give int64
	if held > target {
		give = takeBack(l, held-target)
	} else {
		want = target - held
	}
	watchdog := time.AfterFunc(leaseValidFor, ls.stale)
	r, err := ls.conn.eval(leaseScriptSHA, leaseScript, []string{cfg.bucket, cfg.procs}, []string{
		strconv.FormatFloat(cfg.rate, 'f', -1, 64), strconv.FormatFloat(cfg.burst, 'f', -1, 64),
		strconv.FormatInt(want, 10), strconv.FormatInt(give, 10), fleetProcess,
		strconv.FormatInt(replicaTTL.Milliseconds(), 10),
	})
	watchdog.Stop()
	var grant, replicas int64
	switch {
	case err != nil:
	case r.isError():
		err = errors.New("redis " + ls.conn.endpoint + ": " + r.str)
	default:
		// A reply out of bounds: the server is not to be trusted further (fail closes).
		if grant, replicas, err = leaseReply(r, want); err != nil {
			err = errors.New("redis " + ls.conn.endpoint + ": " + err.Error())
		}
	}
	if err != nil {
		ls.held = atomic.LoadInt64(&l.tokens)
		ls.fail(cfg, err)
		return
	}
	atomic.StoreInt64(&l.replicas, replicas)
	atomic.StoreInt64(&l.fallback, cfg.interval*replicas)
	atomic.AddInt64(&l.granted, grant)
	ls.held = atomic.AddInt64(&l.tokens, grant)
	atomic.StoreInt32(&l.shared, 1)
	if ls.failing {
		ls.failing = false
		ls.st.debug("mirror " + ls.st.name + ": redis " + ls.conn.endpoint + " answers again: the shared copy budget is back")
	}
}

// stale stops trusting Redis's word when an exchange has taken leaseValidFor: Redis is slow,
// and the fallback rate applies until it answers (it runs in a timer's goroutine).
func (ls *leaser) stale() {
	defer func() { _ = recover() }() // a panic in a goroutine the plugin started would kill Traefik
	atomic.StoreInt32(&ls.l.shared, 0)
}

// takeBack takes up to n tokens back from the local lease, and says how many it took.
func takeBack(l *lease, n int64) int64 {
	for {
		held := atomic.LoadInt64(&l.tokens)
		take := n
		if take > held {
			take = held
		}
		if take <= 0 {
			return 0
		}
		if atomic.CompareAndSwapInt64(&l.tokens, held, held-take) {
			return take
		}
	}
}

// leaseReply checks the script's answer: {grant, processes}, grant within what was asked.
func leaseReply(r respReply, want int64) (grant, replicas int64, err error) {
	if r.kind != '*' || len(r.elems) != 2 || r.elems[0].kind != ':' || r.elems[1].kind != ':' {
		return 0, 0, errors.New("unexpected reply to the budget script")
	}
	grant, replicas = r.elems[0].n, r.elems[1].n
	if grant < 0 || grant > want || replicas < 1 {
		return 0, 0, errors.New("unexpected reply to the budget script: grant " + strconv.FormatInt(grant, 10) + " of " + strconv.FormatInt(want, 10) + ", processes " + strconv.FormatInt(replicas, 10))
	}
	if replicas > maxReplicas {
		replicas = maxReplicas
	}
	return grant, replicas, nil
}

// fail counts a failed exchange, stops trusting Redis's word at once (the fallback rate applies
// from now), and says why at ERROR, at most once per logInterval.
func (ls *leaser) fail(cfg *leaseConfig, err error) {
	atomic.AddInt64(&ls.l.errors, 1)
	atomic.StoreInt32(&ls.l.shared, 0)
	if ls.conn != nil {
		ls.conn.close()
		ls.conn = nil
	}
	now := time.Now()
	ls.retryAt = now.Add(leaseRetry)
	ls.failing = true
	if now.Before(ls.nextError) {
		return
	}
	ls.nextError = now.Add(logInterval)
	n := atomic.LoadInt64(&ls.l.replicas)
	ls.st.error("mirror " + ls.st.name + ": " + strings.TrimPrefix(err.Error(), "mirror: ") +
		"; the shared copy budget is out of reach: this process copies at most " +
		strconv.FormatFloat(cfg.rate/float64(n), 'g', 4, 64) + "/s (maxRate " + strconv.FormatFloat(cfg.rate, 'g', -1, 64) +
		" / " + strconv.FormatInt(n, 10) + " processes last seen) until Redis answers")
}

// writeLeaseMetrics writes the shared budget's families, for the middlewares that have a redis
// block or had one.
func writeLeaseMetrics(w *bufio.Writer, all []*state, mw []string) {
	family(w, "traefik_mirror_lease_granted_total", "counter", "Copies granted to this process from the budget shared through Redis.")
	for i, st := range all {
		if st.lease.used.Load() {
			sample(w, "traefik_mirror_lease_granted_total", mw[i], atomic.LoadInt64(&st.lease.granted))
		}
	}
	family(w, "traefik_mirror_lease_errors_total", "counter", "Exchanges with Redis for the shared budget that failed.")
	for i, st := range all {
		if st.lease.used.Load() {
			sample(w, "traefik_mirror_lease_errors_total", mw[i], atomic.LoadInt64(&st.lease.errors))
		}
	}
	family(w, "traefik_mirror_lease_shared", "gauge", "1 while Redis answers and the shared budget holds, 0 while the local fallback rate does.")
	for i, st := range all {
		if st.lease.used.Load() {
			sample(w, "traefik_mirror_lease_shared", mw[i], int64(atomic.LoadInt32(&st.lease.shared)))
		}
	}
	family(w, "traefik_mirror_lease_processes", "gauge", "Processes sharing the budget, as Redis last counted them.")
	for i, st := range all {
		if st.lease.used.Load() {
			sample(w, "traefik_mirror_lease_processes", mw[i], atomic.LoadInt64(&st.lease.replicas))
		}
	}
}
