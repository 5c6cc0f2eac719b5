package mirror

import (
	"fmt"
	"log"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// outcome is what became of one request, as far as mirroring goes.
type outcome int

const (
	sent        outcome = iota // the mirror answered below 500
	failed                     // error, timeout or an answer of 500 or more
	dropped                    // every slot was taken
	rateLimited                // over maxRate
	tooLarge                   // the body was over maxBodySize
	sampledOut                 // not picked by percent
	filtered                   // not chosen by methods, pathRegex or matchHeaders
	skipped                    // upgrade, loop, not a path, or a body not finished
	cut                        // a streamed body the mirror did not keep up with
	numOutcomes
)

var outcomeNames = [numOutcomes]string{"sent", "failed", "dropped", "rateLimited", "tooLarge", "sampledOut", "filtered", "skipped", "cut"}

// logInterval is the least time between two log lines of one middleware.
const logInterval = 10 * time.Second

// durationBuckets are the upper bounds, in seconds, of the copy duration histogram (the
// Prometheus client's defaults).
var durationBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

// durationBounds are durationBuckets in nanoseconds.
var durationBounds = func() []int64 {
	b := make([]int64, len(durationBuckets))
	for i, s := range durationBuckets {
		b[i] = int64(s * float64(time.Second))
	}
	return b
}()

// maxCode bounds the status codes counted: Go's client accepts three digits only.
const maxCode = 1000

// state is everything of one middleware name that outlives its instances: Traefik builds an
// instance per router and again on every configuration change, and all of them share it. It
// counts what became of each request, holds the copies in flight and the rate budget, and logs
// the counts at most once per logInterval: at Traefik's ERROR level when copies failed or were
// dropped, at DEBUG otherwise. It stays small: a few counters, kept for the life of the process.
type state struct {
	name         string
	debug, error func(line string)

	counts   [numOutcomes]int64 // atomic
	inflight int64              // atomic: copies holding a slot, plus pausedSlots while paused (see holding)
	retries  int64              // atomic
	tat      int64              // atomic: when the rate budget is next whole, unix nanoseconds
	paused   atomic.Bool        // the mirror refused a connection a moment ago

	records, recordBytes, recordFailed int64 // atomic: records (or exchanges) written, their bytes, those not written

	// What only the metrics need, counted under one lock: two calls per copy under Yaegi where
	// an atomic add each would be four. (codes is a slice: under Yaegi every function that
	// names an array field holds a copy of it, 8 KB here, on every call.)
	measures    sync.Mutex
	durations   [12]int64 // copies by durationBuckets, then over the last bound
	durationSum int64     // nanoseconds
	codes       []int64   // maxCode of them: the mirror's answers by status code
	copiedBytes int64     // body bytes sent to the mirror

	metricsAddress atomic.Value // string: where this middleware's metrics are served
	compare        atomic.Value // *compareStats, once compare was enabled

	pending  atomic.Bool  // a line is due; the next outcome need not schedule one
	nextLine atomic.Int64 // unix nanoseconds before which no line is written
	lastErr  atomic.Value // string

	configError    atomic.Value // string: why the last build of this middleware failed, or ""
	nextConfigLine atomic.Int64 // unix nanoseconds before which configError is not repeated

	lease *lease // the budget shared through Redis (fleet.go)

	mu              sync.Mutex
	reported        [numOutcomes]int64
	reportedRetries int64
}

// measure is a snapshot of what the metrics count of the copies, besides their outcomes.
type measure struct {
	durations   [12]int64
	durationSum int64
	codes       []int64
	copiedBytes int64
}

func (st *state) snapshot() measure {
	st.measures.Lock()
	defer st.measures.Unlock()
	return measure{durations: st.durations, durationSum: st.durationSum, codes: append([]int64(nil), st.codes...), copiedBytes: st.copiedBytes}
}

// countCode counts an answer of the mirror that measured does not: an answer retried, a 1xx.
func countCode(st *state, code int) {
	st.measures.Lock()
	st.codes[code]++
	st.measures.Unlock()
}

// pausedSlots is added to the slots in use while copies pause (see fail), so that taking a slot,
// one atomic add the short path makes anyway, fails then: no other check of the pause on the
// client's path. maxInflight is at most maxSlots, far below it.
const (
	pausedSlots = 1 << 40
	maxSlots    = 1 << 30
)

// pause starts or ends the pause of copies after the mirror refused a connection. paused says
// who paused; the slots say so to the short path.
func pause(st *state, on bool) {
	if on {
		atomic.AddInt64(&st.inflight, pausedSlots)
		return
	}
	atomic.AddInt64(&st.inflight, -pausedSlots)
	st.paused.Store(false)
}

// holding says how many copies hold a slot.
func holding(st *state) int64 {
	n := atomic.LoadInt64(&st.inflight)
	if n >= pausedSlots/2 {
		n -= pausedSlots
	}
	return n
}

// registry holds the state of every middleware name ever configured in this process.
var (
	registryMu sync.Mutex
	registry   = map[string]*state{}
)

// stateFor returns the state of a middleware name, made on first use.
func stateFor(name string) *state {
	registryMu.Lock()
	defer registryMu.Unlock()
	st := registry[name]
	if st == nil {
		st = &state{name: name, debug: debugLine, error: errorLine, codes: make([]int64, maxCode), lease: newLease()}
		st.metricsAddress.Store("")
		registry[name] = st
	}
	return st
}

// states returns the states whose metrics are served at addr, by name.
func states(addr string) []*state {
	registryMu.Lock()
	var all []*state
	for _, st := range registry {
		if a, _ := st.metricsAddress.Load().(string); a == addr {
			all = append(all, st)
		}
	}
	registryMu.Unlock()
	sort.Slice(all, func(i, j int) bool { return all[i].name < all[j].name })
	return all
}

// debugLine and errorLine write a line at Traefik's DEBUG and ERROR levels: under Yaegi,
// fmt.Print* and the log package write to the interpreter's stdout and stderr, which Traefik
// logs at those levels, while os.Stdout and os.Stderr would bypass Traefik's log.
var (
	debugLine = func(line string) { fmt.Println(line) }
	errorLine = func(line string) { fmt.Fprintln(errorOut, line) }
)

// errorOut is where the log package writes: the interpreter's stderr under Yaegi. Writing to it
// directly leaves out the log package's own timestamp; Traefik's log line has one.
var errorOut = log.Writer()

// count counts an outcome and, unless a log line is already due, schedules one. The request
// path counts sampledOut, filtered and skipped with a bare atomic add instead: lines are
// written when copies end or are dropped, and carry every count. (Plain functions, not methods,
// and the common case kept apart from the rest: see ServeHTTP.)
func count(st *state, k outcome, err error) {
	if err != nil {
		st.lastErr.Store(err.Error()) // before the count, so that the line counting it has it
	}
	atomic.AddInt64(&st.counts[k], 1)
	if !st.pending.Load() {
		schedule(st)
	}
}

func schedule(st *state) {
	if st.pending.Load() || !st.pending.CompareAndSwap(false, true) {
		return
	}
	if wait := time.Duration(st.nextLine.Load() - time.Now().UnixNano()); wait > 0 {
		time.AfterFunc(wait, st.flush)
		return
	}
	st.flush()
}

// get returns the total count of one outcome.
func (st *state) get(k outcome) int64 {
	return atomic.LoadInt64(&st.counts[k])
}

// allow takes one copy from the rate budget (a token bucket kept as the time at which it is
// next full, GCRA): a copy is allowed when that time is at most tolerance ahead of now. A time
// further ahead than this rate ever sets it was set at another rate, before a reload (1,000 s
// ahead at 0.001 copies per second, even by an old instance serving after the new one was
// built): the budget then starts afresh, and a new maxRate applies at once.
//
// now is read after the budget: read before, a goroutine paused in between would take a budget
// that others moved on meanwhile for one set at another rate, and start it afresh (64 goroutines
// at 500/s sent 59,017 copies in 3 s, not 2,000).
func allow(st *state, interval, tolerance int64) bool {
	for {
		old := atomic.LoadInt64(&st.tat)
		now := time.Now().UnixNano()
		tat := old
		if tat < now || tat-now > tolerance+interval {
			tat = now
		}
		if tat-now > tolerance {
			return false
		}
		if atomic.CompareAndSwapInt64(&st.tat, old, tat+interval) {
			return true
		}
	}
}

// flush writes the counts since the last line.
func (st *state) flush() {
	defer func() { _ = recover() }() // runs in a timer goroutine: a panic would kill Traefik

	st.mu.Lock()
	var parts []string
	problems := false
	for k := outcome(0); k < numOutcomes; k++ {
		total := st.get(k)
		if d := total - st.reported[k]; d > 0 {
			parts = append(parts, outcomeNames[k]+"="+strconv.FormatInt(d, 10))
			problems = problems || k == failed || k == dropped || k == cut
		}
		st.reported[k] = total
	}
	retries := atomic.LoadInt64(&st.retries)
	if d := retries - st.reportedRetries; d > 0 {
		parts = append(parts, "retries="+strconv.FormatInt(d, 10))
	}
	st.reportedRetries = retries
	if !problems {
		st.lastErr.Store("")
	}
	st.mu.Unlock()
	st.nextLine.Store(time.Now().Add(logInterval).UnixNano())
	st.pending.Store(false)

	if cs, _ := st.compare.Load().(*compareStats); cs != nil {
		if summary := cs.summary(); summary != "" {
			parts = append(parts, summary)
		}
	}
	if len(parts) == 0 {
		return
	}
	line := "mirror " + st.name + ": " + strings.Join(parts, " ")
	if !problems {
		st.debug(line)
		return
	}
	// The last error of this interval only: an older one would mislead.
	if e, _ := st.lastErr.Swap("").(string); e != "" {
		line += " lastError=" + strconv.Quote(e)
	}
	st.error(line)
}
