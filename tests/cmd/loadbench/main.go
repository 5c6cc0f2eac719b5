// Command loadbench measures the plugin through a real Traefik on 127.0.0.1 against Traefik with
// no middleware, Traefik's built-in mirroring service (at its default maxBodySize -1, and
// bounded at 1 MiB) and the floor (tests/floor: the least a Yaegi middleware can do to copy a
// request), in alternation within one run (none, builtin, builtin-1MiB, floor, plugin, then the
// reverse, ...), and prints Markdown tables of medians.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
)

var profileDir string

// hungCap bounds the connections a hung mirror keeps open: the built-in mirroring service
// opens one per copy and never lets go, and this process has a limited number of descriptors.
// A "mirror conns after" of hungCap means "at least".
const hungCap = 4000

type scenario struct {
	name     string
	bodySize int
	mirror   string // healthy, slow, down, hung
	percent  float64
	modes    []string
	rate     float64 // requests per second offered, all connections together; 0: as fast as answered
	json     bool    // the primary and the mirror answer the same 1 KiB JSON document, not "ok"
}

// recordDir holds the plugin-record mode's files, removed at the end.
var recordDir string

var allModes = []string{"none", "builtin", "builtin-1MiB", "floor", "guarded", "plugin", "plugin-bare"}

// faultModes are the modes of the scenarios with a slow, down or hung mirror. The floor has no
// limits (it keeps every copy to a mirror that does not answer) and measures the cost of a
// healthy copy: it runs where the mirror is healthy and every request is copied.
var faultModes = []string{"none", "builtin", "builtin-1MiB", "plugin"}

var allScenarios = []scenario{
	{"healthy-1KiB", 1 << 10, "healthy", 100, allModes, 0, false},
	{"healthy-64KiB", 64 << 10, "healthy", 100, allModes, 0, false},
	{"slow-500ms", 1 << 10, "slow", 100, faultModes, 0, false},
	{"down", 1 << 10, "down", 100, faultModes, 0, false},
	{"hung", 1 << 10, "hung", 100, faultModes, 0, false},
	// percent 0 turns the middleware off; a tiny percent measures the sampling itself.
	{"sampled-out", 1 << 10, "healthy", 0, []string{"none", "plugin"}, 0, false},
	{"sampled-0.01%", 1 << 10, "healthy", 0.01, []string{"none", "plugin"}, 0, false},
	// Over 64 KiB: the body is copied as the primary reads it, through the tee.
	{"healthy-256KiB", 256 << 10, "healthy", 100, []string{"none", "builtin", "floor", "plugin", "plugin-stream"}, 0, false},
	// A body past bodyBuffer, streamed to the mirror as the primary reads it (plugin-stream:
	// maxBodySize -1, so that the body is copied at all).
	{"healthy-16MiB", 16 << 20, "healthy", 100, []string{"none", "builtin", "plugin-stream"}, 0, false},
	// Every copy recorded in GoReplay's format, next to the same options without a record.
	{"record-1KiB", 1 << 10, "healthy", 100, []string{"none", "plugin", "plugin-record"}, 0, false},
	// A compared request next to a copied one, both services answering the same 1 KiB JSON.
	{"compare-1KiB", 1 << 10, "healthy", 100, []string{"none", "plugin", "plugin-compare"}, 0, true},
	// The same at a fixed rate well below saturation: the client's latency, not the CPU's.
	// plugin-twin is a second Traefik configured as plugin: how far two identical setups differ
	// in one run, the noise that compare's cost is weighed against.
	{"compare-1KiB-paced", 1 << 10, "healthy", 100, []string{"none", "plugin", "plugin-twin", "plugin-compare"}, 500, true},
	// maxRate per process next to maxRate shared through Redis (issue #20): the client's path
	// spends a local token either way; the leases are taken in the background.
	{"maxRate-1KiB", 1 << 10, "healthy", 100, []string{"none", "plugin-maxrate", "plugin-redis"}, 0, false},
}

// benchMaxRate is the copies per second of the maxRate scenario: well below what the machine
// serves, so that most requests are refused by the budget, the path under test.
const benchMaxRate = 500

// redisServer is the Redis of the plugin-redis mode, started on first use.
var redisServer *harness.Redis

// jsonAnswer is the 1 KiB JSON document of the compare scenarios.
var jsonAnswer = func() []byte {
	var b bytes.Buffer
	b.WriteString(`{"id":4711,"status":"shipped","items":[`)
	for i := 0; b.Len() < 1000; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"sku":"SKU-%04d","quantity":%d,"price":%d.99}`, i, i%7+1, i%50)
	}
	b.WriteString(`],"total":1234.5}`)
	return b.Bytes()
}()

func main() {
	duration := flag.Duration("duration", 3*time.Second, "length of one measured run")
	rounds := flag.Int("rounds", 6, "rounds of alternation (A B C, then C B A, ...)")
	conns := flag.Int("conns", 32, "keep-alive client connections")
	only := flag.String("scenarios", "", "comma-separated scenario names (default: all)")
	modes := flag.String("modes", "", "comma-separated modes to run: none, builtin, builtin-1MiB, floor, guarded, plugin, plugin-bare, plugin-stream, plugin-record, plugin-compare, plugin-twin, plugin-maxrate, plugin-redis (default: each scenario's own list)")
	flag.StringVar(&profileDir, "profile", "", "directory for a CPU profile of each Traefik during its first run")
	flag.Parse()
	var err error
	if recordDir, err = os.MkdirTemp("", "loadbench-record-"); err != nil {
		panic(err)
	}

	fmt.Printf("# Load benchmark\n\n%d rounds of %s per mode, %d keep-alive connections, POST bodies, Traefik %s, %s\n",
		*rounds, *duration, *conns, traefikVersion(), machine())
	for _, sc := range allScenarios {
		if *only != "" && !strings.Contains(","+*only+",", ","+sc.name+",") {
			continue
		}
		if *modes != "" {
			var keep []string
			for _, m := range sc.modes {
				if strings.Contains(","+*modes+",", ","+m+",") {
					keep = append(keep, m)
				}
			}
			sc.modes = keep
		}
		if err := runScenario(sc, *duration, *rounds, *conns); err != nil {
			fmt.Fprintln(os.Stderr, "loadbench:", sc.name+":", err)
			_ = os.RemoveAll(recordDir)
			os.Exit(1)
		}
	}
	_ = os.RemoveAll(recordDir)
}

// sameBody reads a body to its end, comparing it with expect piece by piece (a 16 MiB body per
// connection is not held); nil expects anything.
func sameBody(r io.Reader, expect []byte) bool {
	buf := make([]byte, 32<<10)
	same, off := true, 0
	for {
		n, err := r.Read(buf)
		if expect != nil && (off+n > len(expect) || !bytes.Equal(buf[:n], expect[off:off+n])) {
			same = false
		}
		off += n
		if err != nil {
			return err == io.EOF && (expect == nil || same && off == len(expect))
		}
	}
}

// sink is a loopback upstream that counts requests and checks bodies against the one sent.
type sink struct {
	addr     string
	srv      *http.Server
	requests atomic.Int64
	badBody  atomic.Int64
	conns    atomic.Int64
}

func startSink(expect []byte, delay time.Duration, answer []byte) (*sink, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &sink{addr: l.Addr().String()}
	s.srv = &http.Server{
		Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			if !sameBody(r.Body, expect) {
				s.badBody.Add(1)
			}
			s.requests.Add(1)
			if delay > 0 {
				select {
				case <-time.After(delay):
				case <-r.Context().Done():
				}
			}
			if answer != nil {
				rw.Header().Set("Content-Type", "application/json")
				_, _ = rw.Write(answer)
				return
			}
			_, _ = io.WriteString(rw, "ok")
		}),
		ConnState: func(_ net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				s.conns.Add(1)
			case http.StateClosed, http.StateHijacked:
				s.conns.Add(-1)
			}
		},
	}
	go func() { _ = s.srv.Serve(l) }()
	return s, nil
}

func (s *sink) close() { _ = s.srv.Close() }

// mirrorTarget is whatever the copies go to in a scenario.
type mirrorTarget struct {
	addr  string
	sink  *sink
	hung  *harness.Hung
	close func()
}

func (m *mirrorTarget) open() int64 {
	switch {
	case m.sink != nil:
		return m.sink.conns.Load()
	case m.hung != nil:
		return int64(m.hung.Open())
	}
	return 0
}

func startMirror(kind string, body, answer []byte) (*mirrorTarget, error) {
	switch kind {
	case "healthy", "slow":
		delay := time.Duration(0)
		if kind == "slow" {
			delay = 500 * time.Millisecond
		}
		s, err := startSink(body, delay, answer)
		if err != nil {
			return nil, err
		}
		return &mirrorTarget{addr: s.addr, sink: s, close: s.close}, nil
	case "hung":
		h, err := harness.StartHung(hungCap)
		if err != nil {
			return nil, err
		}
		return &mirrorTarget{addr: h.Addr, hung: h, close: h.Close}, nil
	default: // down
		r, err := harness.StartRefused()
		if err != nil {
			return nil, err
		}
		return &mirrorTarget{addr: r.Addr, close: r.Close}, nil
	}
}

type measure struct {
	reqs, errors   int
	rps            float64
	p50, p99       time.Duration
	cpuPerReq      time.Duration
	copiesPerPrim  float64
	primaryDelta   int64
	copiesReceived int64
}

type modeRun struct {
	name    string
	traefik *harness.Traefik
	primary *sink
	mirror  *mirrorTarget
	runs    []measure
	peakRSS int64
	openEnd int64
}

func dynamicFor(mode string, sc scenario, primary, mirror string) string {
	d, err := harness.ExampleDynamic()
	if err != nil {
		panic(err)
	}
	d.Service("primary", "http://"+primary)
	switch mode {
	case "none":
		d.Router("api", "/", "primary")
	case "builtin": // Traefik's default: no body limit, no buffer per request
		d.Service("mirror-svc", "http://"+mirror)
		d.MirroringService("mirrored", "primary", "mirror-svc", -1)
		d.Router("api", "/", "mirrored")
	case "builtin-1MiB":
		d.Service("mirror-svc", "http://"+mirror)
		d.MirroringService("mirrored", "primary", "mirror-svc", 1<<20)
		d.Router("api", "/", "mirrored")
	case "floor": // the floor plugin, routed like the plugin: every request copied
		d.Floor("mirror-floor", "http://"+mirror, false)
		d.Router("api", "/", "primary", "mirror-floor")
	case "guarded": // the floor with every guarantee the plugin gives a copy, no option
		d.Floor("mirror-guarded", "http://"+mirror, true)
		d.Router("api", "/", "primary", "mirror-guarded")
	case "plugin", "plugin-twin":
		d.Mirror("mirror-api", map[string]any{"url": "http://" + mirror, "percent": sc.percent})
		d.Router("api", "/", "primary", "mirror-api")
	case "plugin-bare": // the default options with the example's maxBodySize: no metrics
		d.Mirror("mirror-api", map[string]any{"url": "http://" + mirror, "percent": sc.percent, "metricsAddress": nil})
		d.Router("api", "/", "primary", "mirror-api")
	case "plugin-stream": // the example's options but maxBodySize -1: bodies past bodyBuffer are streamed
		d.Mirror("mirror-api", map[string]any{"url": "http://" + mirror, "percent": sc.percent, "maxBodySize": -1})
		d.Router("api", "/", "primary", "mirror-api")
	case "plugin-record": // the example's options, every copy recorded (rotated at 100 MiB, 10 kept)
		d.Mirror("mirror-api", map[string]any{"url": "http://" + mirror, "percent": sc.percent, "record": map[string]any{"file": filepath.Join(recordDir, "copies.gor")}})
		d.Router("api", "/", "primary", "mirror-api")
	case "plugin-maxrate":
		d.Mirror("mirror-api", map[string]any{"url": "http://" + mirror, "percent": sc.percent, "maxRate": benchMaxRate})
		d.Router("api", "/", "primary", "mirror-api")
	case "plugin-redis":
		d.Mirror("mirror-api", map[string]any{"url": "http://" + mirror, "percent": sc.percent, "maxRate": benchMaxRate,
			"redis": map[string]any{"endpoints": []string{redisServer.Addr}}})
		d.Router("api", "/", "primary", "mirror-api")
	case "plugin-compare":
		d.Mirror("mirror-api", map[string]any{"url": "http://" + mirror, "percent": sc.percent, "compare": map[string]any{"enabled": true}})
		d.Router("api", "/", "primary", "mirror-api")
	}
	return d.YAML()
}

func runScenario(sc scenario, duration time.Duration, rounds, conns int) error {
	body := bytes.Repeat([]byte("0123456789abcdef"), sc.bodySize/16)
	var runs []*modeRun
	defer func() {
		for _, r := range runs {
			if r.traefik != nil {
				r.traefik.Stop()
			}
			r.primary.close()
			r.mirror.close()
		}
	}()
	var answer []byte
	if sc.json {
		answer = jsonAnswer
	}
	for _, mode := range sc.modes {
		primary, err := startSink(body, 0, answer)
		if err != nil {
			return err
		}
		mirror, err := startMirror(sc.mirror, body, answer)
		if err != nil {
			return err
		}
		r := &modeRun{name: mode, primary: primary, mirror: mirror}
		runs = append(runs, r)
		if mode == "plugin-redis" && redisServer == nil {
			if redisServer, err = harness.StartRedis(); err != nil {
				return err
			}
			defer func() { redisServer.Stop(); redisServer = nil }()
		}
		addrs, err := harness.FreeAddrs(2)
		if err != nil {
			return err
		}
		web, api := addrs[0], addrs[1]
		opts := harness.Options{
			Debug:   profileDir != "", // pprof endpoints
			Replace: map[string]string{harness.ExampleWeb: web, harness.ExampleAPI: api},
			Dynamic: dynamicFor(mode, sc, primary.addr, mirror.addr),
			Static:  func(cfg map[string]any) { cfg["log"] = map[string]any{"level": "ERROR"} },
			Floor:   mode == "floor" || mode == "guarded", // laid out as a second local plugin, next to the plugin
		}
		r.traefik, err = harness.StartTraefik(opts)
		if err != nil {
			return err
		}
		if err := r.traefik.WaitRouters("enabled", "api"); err != nil {
			return err
		}
	}
	// Warm up each Traefik (connections, interpreter, caches).
	for _, r := range runs {
		load(r.traefik.WebURL, body, conns, duration/4, sc.rate)
	}
	for round := 0; round < rounds; round++ {
		// A B C, then C B A, ...: no mode always runs first or last.
		order := append([]*modeRun(nil), runs...)
		if round%2 == 1 {
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		for _, r := range order {
			var profile chan error
			if profileDir != "" && round == 0 {
				profile = make(chan error, 1)
				go func() { profile <- r.profile(filepath.Join(profileDir, sc.name+"-"+r.name+".prof"), duration) }()
			}
			r.runs = append(r.runs, r.measure(body, conns, duration, sc.mirror == "healthy", sc.rate))
			if round == rounds-1 { // right after this mode's last run, whatever runs after it
				r.openEnd = r.mirror.open()
			}
			if profile != nil {
				if err := <-profile; err != nil {
					return err
				}
			}
		}
	}
	for _, r := range runs {
		st, err := r.traefik.Stats()
		if err != nil {
			return err
		}
		r.peakRSS = st.PeakRSS
	}
	report(sc, runs)
	return nil
}

func (r *modeRun) measure(body []byte, conns int, duration time.Duration, settle bool, rate float64) measure {
	st0, _ := r.traefik.Stats()
	p0, m0 := r.primary.requests.Load(), r.mirrorCount()
	results, elapsed := load(r.traefik.WebURL, body, conns, duration, rate)
	st1, _ := r.traefik.Stats()
	if settle { // copies still in flight when the load stopped
		deadline := time.Now().Add(2 * time.Second)
		for r.mirrorCount()-m0 < r.primary.requests.Load()-p0 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
	m := measure{reqs: len(results), errors: harness.Failures(results)}
	m.rps = float64(len(results)) / elapsed.Seconds()
	m.p50 = harness.Percentile(results, 50)
	m.p99 = harness.Percentile(results, 99)
	if len(results) > 0 {
		m.cpuPerReq = (st1.CPU - st0.CPU) / time.Duration(len(results))
	}
	m.primaryDelta = r.primary.requests.Load() - p0
	m.copiesReceived = r.mirrorCount() - m0
	if m.primaryDelta > 0 {
		m.copiesPerPrim = float64(m.copiesReceived) / float64(m.primaryDelta)
	}
	return m
}

// profile saves a CPU profile of Traefik taken over most of a run.
func (r *modeRun) profile(path string, duration time.Duration) error {
	seconds := int(duration.Seconds()) - 1
	if seconds < 1 {
		seconds = 1
	}
	resp, err := http.Get(fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", r.traefik.APIURL, seconds))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}

func (r *modeRun) mirrorCount() int64 {
	if r.mirror.sink == nil {
		return 0
	}
	return r.mirror.sink.requests.Load()
}

// load runs a closed loop of conns workers posting body for duration; with rate > 0, each worker
// starts its requests on a schedule of conns/rate seconds apart (later if an answer is late).
func load(url string, body []byte, conns int, duration time.Duration, rate float64) ([]harness.Result, time.Duration) {
	client := harness.Client(conns)
	defer client.CloseIdleConnections()
	var mu sync.Mutex
	var all []harness.Result
	start := time.Now()
	deadline := start.Add(duration)
	var wg sync.WaitGroup
	for w := 0; w < conns; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var mine []harness.Result
			var interval time.Duration
			next := start
			if rate > 0 {
				interval = time.Duration(float64(conns) / rate * float64(time.Second))
				next = start.Add(interval * time.Duration(w) / time.Duration(conns))
			}
			for time.Now().Before(deadline) {
				if interval > 0 {
					time.Sleep(time.Until(next))
					next = next.Add(interval)
				}
				req, _ := http.NewRequest(http.MethodPost, url+"/bench", bytes.NewReader(body))
				mine = append(mine, harness.Do(client, req))
			}
			mu.Lock()
			all = append(all, mine...)
			mu.Unlock()
		}(w)
	}
	wg.Wait()
	return all, time.Since(start)
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func pick(r *modeRun, f func(measure) float64) float64 {
	var xs []float64
	for _, m := range r.runs {
		xs = append(xs, f(m))
	}
	return median(xs)
}

func report(sc scenario, runs []*modeRun) {
	paced := ""
	if sc.rate > 0 {
		paced = fmt.Sprintf(", paced at %v requests/s", sc.rate)
	}
	fmt.Printf("\n## %s (mirror %s, %d B bodies, percent %v%s)\n\n", sc.name, sc.mirror, sc.bodySize, sc.percent, paced)
	fmt.Println("| mode | req/s | p50 | p99 | errors | Traefik CPU/req | peak RSS | copies/primary | bad copies | mirror conns after |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|")
	vals := map[string]map[string]float64{}
	for _, r := range runs {
		v := map[string]float64{
			"rps":    pick(r, func(m measure) float64 { return m.rps }),
			"p50":    pick(r, func(m measure) float64 { return float64(m.p50) }),
			"p99":    pick(r, func(m measure) float64 { return float64(m.p99) }),
			"cpu":    pick(r, func(m measure) float64 { return float64(m.cpuPerReq) }),
			"copies": pick(r, func(m measure) float64 { return m.copiesPerPrim }),
		}
		vals[r.name] = v
		errors := 0
		for _, m := range r.runs {
			errors += m.errors
		}
		bad := int64(0)
		if r.mirror.sink != nil {
			bad = r.mirror.sink.badBody.Load()
		}
		copies := "-"
		if sc.mirror == "healthy" && sc.percent == 100 && r.name != "none" {
			copies = fmt.Sprintf("%.4f", v["copies"])
		}
		fmt.Printf("| %s | %.0f | %v | %v | %d | %v | %.0f MiB | %s | %d | %d |\n", r.name, v["rps"],
			time.Duration(v["p50"]).Round(10*time.Microsecond), time.Duration(v["p99"]).Round(10*time.Microsecond),
			errors, time.Duration(v["cpu"]).Round(time.Microsecond), float64(r.peakRSS)/(1<<20), copies, bad, r.openEnd)
	}
	byName := map[string]*modeRun{}
	for _, r := range runs {
		byName[r.name] = r
	}
	none, plugin := byName["none"], byName["plugin"]
	if streamed := byName["plugin-stream"]; streamed != nil && none != nil {
		fmt.Printf("\nplugin-stream/none: %s", ratios(streamed, none))
		if builtin := byName["builtin"]; builtin != nil {
			fmt.Printf("; plugin-stream/builtin: %s", ratios(streamed, builtin))
		}
		fmt.Println()
	}
	if none == nil || plugin == nil {
		return
	}
	fmt.Printf("\nplugin/none: %s", ratios(plugin, none))
	if builtin := byName["builtin"]; builtin != nil {
		fmt.Printf("; plugin/builtin: %s", ratios(plugin, builtin))
	}
	if bounded := byName["builtin-1MiB"]; bounded != nil {
		fmt.Printf("; plugin/builtin-1MiB: %s", ratios(plugin, bounded))
	}
	floor := byName["floor"]
	if floor != nil {
		fmt.Printf("; plugin/floor: %s", ratios(plugin, floor))
	}
	fmt.Println()
	if bare := byName["plugin-bare"]; bare != nil {
		fmt.Printf("\nplugin/plugin-bare (what the metrics cost): %s", ratios(plugin, bare))
		if builtin := byName["builtin"]; builtin != nil {
			fmt.Printf("; plugin-bare/builtin: %s", ratios(bare, builtin))
		}
		if floor != nil {
			fmt.Printf("; plugin-bare/floor: %s", ratios(bare, floor))
		}
		if guarded := byName["guarded"]; guarded != nil {
			fmt.Printf("\nplugin-bare/guarded (what the options cost): %s", ratios(bare, guarded))
			if floor != nil {
				fmt.Printf("; guarded/floor (what the guarantees cost): %s", ratios(guarded, floor))
			}
			if builtin := byName["builtin"]; builtin != nil {
				fmt.Printf("; guarded/builtin: %s", ratios(guarded, builtin))
			}
		}
		fmt.Println()
	}
	if recorded := byName["plugin-record"]; recorded != nil {
		fmt.Printf("\nplugin-record/plugin (what recording every copy costs): %s\n", ratios(recorded, plugin))
	}
	if compared := byName["plugin-compare"]; compared != nil {
		fmt.Printf("\nplugin-compare/plugin: %s; plugin-compare/none: %s\n", ratios(compared, plugin), ratios(compared, none))
	}
	if twin := byName["plugin-twin"]; twin != nil {
		fmt.Printf("\nplugin-twin/plugin (two identical setups: the noise): %s\n", ratios(twin, plugin))
		if compared := byName["plugin-compare"]; compared != nil {
			p50 := func(m measure) float64 { return float64(m.p50) }
			fmt.Printf("\np50 ratios round by round: plugin-compare/plugin %s; plugin-twin/plugin %s\n",
				perRound(compared, plugin, p50), perRound(twin, plugin, p50))
		}
	}
	if builtin := byName["builtin"]; builtin != nil {
		fmt.Printf("\nbuiltin/none: %s", ratios(builtin, none))
		if floor != nil { // the floor against the compiled built-in: what interpreting a copy costs
			fmt.Printf("; floor/builtin: %s", ratios(floor, builtin))
		}
		fmt.Println()
	}
}

// ratios compares two modes round by round (runs seconds apart, under the same machine load)
// and gives the median of each ratio: steadier than the ratio of medians on a noisy machine.
func ratios(a, b *modeRun) string {
	ratio := func(f func(measure) float64) float64 {
		var xs []float64
		for i := range a.runs {
			xs = append(xs, f(a.runs[i])/f(b.runs[i]))
		}
		return median(xs)
	}
	return fmt.Sprintf("throughput %.2fx, CPU/req %.2fx, p50 %.2fx, p99 %.2fx",
		ratio(func(m measure) float64 { return m.rps }),
		ratio(func(m measure) float64 { return float64(m.cpuPerReq) }),
		ratio(func(m measure) float64 { return float64(m.p50) }),
		ratio(func(m measure) float64 { return float64(m.p99) }))
}

// perRound lists a ratio round by round, sorted, to show its spread.
func perRound(a, b *modeRun, f func(measure) float64) string {
	var xs []string
	for i := range a.runs {
		xs = append(xs, fmt.Sprintf("%.2f", f(a.runs[i])/f(b.runs[i])))
	}
	sort.Strings(xs)
	return "[" + strings.Join(xs, " ") + "]"
}

func traefikVersion() string {
	bin, err := harness.TraefikBinary()
	if err != nil {
		return "?"
	}
	return bin[strings.LastIndex(bin, "/")+1:]
}

func machine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "model name") {
				cpu = strings.TrimSpace(line[strings.Index(line, ":")+1:])
				break
			}
		}
	}
	return fmt.Sprintf("%s, %d CPUs", cpu, runtime.NumCPU())
}
