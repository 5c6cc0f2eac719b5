package mirror

import (
	"bufio"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// listeners are the metrics servers of this process, by address: one per address that some
// middleware was last built with, kept across reloads and closed when no middleware names its
// address any more (a name no longer configured keeps its address: Traefik says nothing of it).
var (
	listenersMu sync.Mutex
	listeners   = map[string]*http.Server{}
)

// The metrics server's bounds: a scraper that holds connections open, idle or slow, holds at
// most maxMetricsConns of Traefik's file descriptors, each for a bounded time.
const (
	maxMetricsConns     = 32
	metricsIdleTimeout  = 60 * time.Second
	metricsReadTimeout  = 30 * time.Second
	metricsWriteTimeout = 30 * time.Second
)

// useMetrics records the metrics address a middleware is built with ("" for none), serves
// http://addr/metrics unless that is done already, and closes the servers of addresses that no
// middleware names any more. If addr cannot be bound, mirroring goes on and the next
// configuration build tries again.
func useMetrics(st *state, addr string) {
	listenersMu.Lock()
	defer listenersMu.Unlock()
	if old, _ := st.metricsAddress.Swap(addr).(string); old != addr && old != "" {
		for a, srv := range listeners {
			if len(states(a)) == 0 {
				_ = srv.Close()
				delete(listeners, a)
			}
		}
	}
	if addr == "" || listeners[addr] != nil {
		return
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		st.error("mirror " + st.name + ": cannot serve metrics on metricsAddress " + addr + ": " + err.Error() + "; mirroring goes on without them")
		return
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		w := bufio.NewWriter(rw)
		writeMetrics(w, states(addr))
		_ = w.Flush()
	})
	srv := &http.Server{
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: metricsReadTimeout,
		WriteTimeout: metricsWriteTimeout, IdleTimeout: metricsIdleTimeout,
	}
	var h http.Handler = mux // set after construction: see PLUGIN-FACTS on Yaegi
	srv.Handler = h
	var open int64
	srv.ConnState = func(c net.Conn, s http.ConnState) {
		if s == http.StateNew && atomic.AddInt64(&open, 1) > maxMetricsConns {
			_ = c.Close() // the server then reports it closed
		}
		if s == http.StateClosed || s == http.StateHijacked {
			atomic.AddInt64(&open, -1)
		}
	}
	listeners[addr] = srv
	go serveForever(srv, l)
}

func serveForever(srv *http.Server, l net.Listener) {
	defer func() { _ = recover() }() // a panic in a goroutine the plugin started would kill Traefik
	_ = srv.Serve(l)
}

// family writes the HELP and TYPE lines of a metric family.
func family(w *bufio.Writer, name, kind, help string) {
	_, _ = w.WriteString("# HELP " + name + " " + help + "\n# TYPE " + name + " " + kind + "\n")
}

// sample writes one sample: name{labels} value.
func sample(w *bufio.Writer, name, labels string, value int64) {
	_, _ = w.WriteString(name + "{" + labels + "} " + strconv.FormatInt(value, 10) + "\n")
}

// histogram writes the samples of one histogram of durations: a count per durationBuckets bound
// and one over the last, cumulated, then the sum (nanoseconds) and the count.
func histogram(w *bufio.Writer, name, labels string, counts [12]int64, sum int64) {
	var cumulative int64
	for b, bound := range durationBuckets {
		cumulative += counts[b]
		sample(w, name+"_bucket", labels+`,le="`+strconv.FormatFloat(bound, 'g', -1, 64)+`"`, cumulative)
	}
	cumulative += counts[len(durationBuckets)]
	sample(w, name+"_bucket", labels+`,le="+Inf"`, cumulative)
	seconds := float64(sum) / float64(time.Second)
	_, _ = w.WriteString(name + "_sum{" + labels + "} " + strconv.FormatFloat(seconds, 'g', -1, 64) + "\n")
	sample(w, name+"_count", labels, cumulative)
}

// labelValue escapes a label value for the text exposition format 0.0.4.
var labelValue = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

// writeMetrics writes the families of the given middlewares in the Prometheus text format.
func writeMetrics(w *bufio.Writer, all []*state) {
	mw := make([]string, len(all))
	for i, st := range all {
		mw[i] = `middleware="` + labelValue.Replace(st.name) + `"`
	}
	family(w, "traefik_mirror_requests_total", "counter", "Requests seen by the mirroring middleware, by what became of their copy.")
	for i, st := range all {
		for k := outcome(0); k < numOutcomes; k++ {
			sample(w, "traefik_mirror_requests_total", mw[i]+`,outcome="`+outcomeNames[k]+`"`, st.get(k))
		}
	}
	// Each middleware's measures, taken at once (a histogram's count and sum agree) and after its
	// outcomes: a copy is measured before it is counted, so every copy counted above is in them.
	ms := make([]measure, len(all))
	for i, st := range all {
		ms[i] = st.snapshot()
	}
	family(w, "traefik_mirror_copy_duration_seconds", "histogram", "Time from sending a copy to the end of the mirror's answer or the failure.")
	for i := range all {
		histogram(w, "traefik_mirror_copy_duration_seconds", mw[i], ms[i].durations, ms[i].durationSum)
	}
	family(w, "traefik_mirror_responses_total", "counter", "Answers of the mirror, by status code.")
	for i := range all {
		for code := 0; code < maxCode; code++ {
			if n := ms[i].codes[code]; n > 0 {
				sample(w, "traefik_mirror_responses_total", mw[i]+`,code="`+strconv.Itoa(code)+`"`, n)
			}
		}
	}
	family(w, "traefik_mirror_config_error", "gauge",
		"1 while the middleware's options are wrong: it mirrors nothing, and requests go on unmirrored (the log line says why).")
	for i, st := range all {
		var bad int64
		if line, _ := st.configError.Load().(string); line != "" {
			bad = 1
		}
		sample(w, "traefik_mirror_config_error", mw[i], bad)
	}
	family(w, "traefik_mirror_inflight", "gauge", "Copies in flight now.")
	for i, st := range all {
		sample(w, "traefik_mirror_inflight", mw[i], holding(st))
	}
	family(w, "traefik_mirror_copied_bytes_total", "counter", "Body bytes sent to the mirror.")
	for i := range all {
		sample(w, "traefik_mirror_copied_bytes_total", mw[i], ms[i].copiedBytes)
	}
	family(w, "traefik_mirror_retries_total", "counter", "Copies sent again after a connection error or a 502, 503 or 504.")
	for i, st := range all {
		sample(w, "traefik_mirror_retries_total", mw[i], atomic.LoadInt64(&st.retries))
	}
	family(w, "traefik_mirror_records_total", "counter", "Records written to record.file: a copy's request, or an exchange whose answers differed.")
	for i, st := range all {
		sample(w, "traefik_mirror_records_total", mw[i], atomic.LoadInt64(&st.records))
	}
	family(w, "traefik_mirror_record_bytes_total", "counter", "Bytes written to record.file.")
	for i, st := range all {
		sample(w, "traefik_mirror_record_bytes_total", mw[i], atomic.LoadInt64(&st.recordBytes))
	}
	family(w, "traefik_mirror_record_failures_total", "counter", "Records not written to record.file: it could not be opened, written or rotated.")
	for i, st := range all {
		sample(w, "traefik_mirror_record_failures_total", mw[i], atomic.LoadInt64(&st.recordFailed))
	}
	family(w, "traefik_mirror_compared_total", "counter", "Copies whose answer was compared with the primary's, by result.")
	for i, st := range all {
		cs, _ := st.compare.Load().(*compareStats)
		for r := result(0); r < numResults; r++ {
			var n int64
			if cs != nil {
				n = atomic.LoadInt64(&cs.results[r])
			}
			sample(w, "traefik_mirror_compared_total", mw[i]+`,result="`+resultNames[r]+`"`, n)
		}
	}
	family(w, "traefik_mirror_compared_answers_total", "counter",
		"Answers of the compared exchanges, by side (the primary's or the mirror's) and status class: the shadow's error rate against the primary's.")
	for i, st := range all {
		cs, _ := st.compare.Load().(*compareStats)
		var classes [2][6]int64
		if cs != nil {
			classes, _, _ = cs.sides()
		}
		for s, side := range sideNames {
			for class := 1; class <= 5; class++ {
				sample(w, "traefik_mirror_compared_answers_total",
					mw[i]+`,side="`+side+`",class="`+strconv.Itoa(class)+`xx"`, classes[s][class])
			}
		}
	}
	family(w, "traefik_mirror_compared_duration_seconds", "histogram",
		"Latency of each side of the compared exchanges: the primary's, from the request to the end of its answer; the mirror's, from sending the copy to the end of its answer.")
	for i, st := range all {
		cs, _ := st.compare.Load().(*compareStats)
		var durations [2][12]int64
		var sums [2]int64
		if cs != nil {
			_, durations, sums = cs.sides()
		}
		for s, side := range sideNames {
			histogram(w, "traefik_mirror_compared_duration_seconds", mw[i]+`,side="`+side+`"`, durations[s], sums[s])
		}
	}
	family(w, "traefik_mirror_differences_total", "counter",
		"Compared answers in which a field differed, by kind and name: the first 20 fields of each middleware, then the rest by kind under name=\"other\".")
	for i, st := range all {
		if cs, _ := st.compare.Load().(*compareStats); cs != nil {
			for _, f := range cs.fieldCounts() {
				sample(w, "traefik_mirror_differences_total",
					mw[i]+`,kind="`+f.kind+`",name="`+labelValue.Replace(f.name)+`"`, f.n)
			}
		}
	}
	writeLeaseMetrics(w, all, mw)
}
