package mirror

import (
	"fmt"
	"log"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// outcome is what became of one request, as far as mirroring goes.
type outcome int

const (
	sent       outcome = iota // the mirror answered below 500
	failed                    // error, timeout or an answer of 500 or more
	dropped                   // every slot was taken
	tooLarge                  // the body was over maxBodySize
	sampledOut                // not picked by percent
	skipped                   // upgrade, loop, or a body the client or primary did not finish
	numOutcomes
)

var outcomeNames = [numOutcomes]string{"sent", "failed", "dropped", "tooLarge", "sampledOut", "skipped"}

// logInterval is the least time between two log lines of one middleware.
const logInterval = 10 * time.Second

// outcomes counts what became of each request and logs the counts at most once per
// logInterval: at Traefik's ERROR level when copies failed or were dropped, at DEBUG otherwise.
type outcomes struct {
	name         string
	debug, error func(line string)

	counts   [numOutcomes]int64 // atomic
	pending  atomic.Bool        // a line is due; the next outcome need not schedule one
	nextLine atomic.Int64       // unix nanoseconds before which no line is written
	lastErr  atomic.Value       // string

	mu       sync.Mutex
	reported [numOutcomes]int64
}

func newOutcomes(name string) *outcomes {
	return &outcomes{name: name, debug: debugLine, error: errorLine}
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
// path counts sampledOut and skipped with a bare atomic add instead: lines are written when
// copies end or are dropped, and carry every count. (Plain functions, not methods, and the
// common case kept apart from the rest: see ServeHTTP.)
func count(o *outcomes, k outcome, err error) {
	if err != nil {
		o.lastErr.Store(err.Error()) // before the count, so that the line counting it has it
	}
	atomic.AddInt64(&o.counts[k], 1)
	if !o.pending.Load() {
		schedule(o)
	}
}

func schedule(o *outcomes) {
	if o.pending.Load() || !o.pending.CompareAndSwap(false, true) {
		return
	}
	if wait := time.Duration(o.nextLine.Load() - time.Now().UnixNano()); wait > 0 {
		time.AfterFunc(wait, o.flush)
		return
	}
	o.flush()
}

// get returns the total count of one outcome.
func (o *outcomes) get(k outcome) int64 {
	return atomic.LoadInt64(&o.counts[k])
}

// flush writes the counts since the last line.
func (o *outcomes) flush() {
	defer func() { _ = recover() }() // runs in a timer goroutine: a panic would kill Traefik

	o.mu.Lock()
	var parts []string
	problems := false
	for k := outcome(0); k < numOutcomes; k++ {
		total := o.get(k)
		if d := total - o.reported[k]; d > 0 {
			parts = append(parts, outcomeNames[k]+"="+strconv.FormatInt(d, 10))
			problems = problems || k == failed || k == dropped
		}
		o.reported[k] = total
	}
	if !problems {
		o.lastErr.Store("")
	}
	o.mu.Unlock()
	o.nextLine.Store(time.Now().Add(logInterval).UnixNano())
	o.pending.Store(false)

	if len(parts) == 0 {
		return
	}
	line := "mirror " + o.name + ": " + strings.Join(parts, " ")
	if !problems {
		o.debug(line)
		return
	}
	// The last error of this interval only: an older one would mislead.
	if e, _ := o.lastErr.Swap("").(string); e != "" {
		line += " lastError=" + strconv.Quote(e)
	}
	o.error(line)
}
