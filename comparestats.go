package mirror

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// compareStats are the comparison counts of one middleware name, kept across reloads.
type compareStats struct {
	results [numResults]int64 // atomic

	mu              sync.Mutex
	reported        [numResults]int64
	headersOnly     int64                  // compared by status and headers: a body over the limit
	reportedHeaders int64                  // headersOnly at the last line
	noise           map[string]*noiseCount // differences by field ("json meta.timestamp", "header Etag")
	primary, mirror []float64              // latency rings, in seconds
	next            int

	// For the metrics: the answers in which each field differed, for the first maxFieldSeries
	// fields (a series each, kept for the life of the process: a counter that comes and goes
	// would read as resets), then by kind alone (name "other").
	fields     map[string]int64 // by noise key
	fieldOrder []string
	others     map[string]int64 // by kind

	// For the metrics, each side of every compared exchange (0: the primary, 1: the mirror): its
	// answers by status class (1xx to 5xx), its latency in durationBuckets, and their sum.
	classes   [2][6]int64
	durations [2][12]int64
	sums      [2]int64 // nanoseconds
}

// sideNames are the values of the side label.
var sideNames = [2]string{"primary", "mirror"}

// maxFieldSeries bounds the per-field series of traefik_mirror_differences_total, per middleware.
const maxFieldSeries = 20

func enableCompare(st *state) {
	if st.compare.Load() == nil {
		st.compare.CompareAndSwap(nil, &compareStats{noise: map[string]*noiseCount{}})
	}
}

// noiseKey names a difference's field for the noise counts: array indexes become "*", so that
// items.0.updatedAt and items.1.updatedAt count as one field.
func noiseKey(d difference) string {
	switch d.Kind {
	case "json":
		segments := strings.Split(d.Name, ".")
		for i, seg := range segments {
			if _, err := strconv.Atoi(seg); err == nil {
				segments[i] = "*"
			}
		}
		return "json " + strings.Join(segments, ".")
	case "header":
		return "header " + d.Name
	}
	return d.Kind
}

// record counts one comparison: its latencies and statuses, whether its body was compared, and
// which fields differed.
func (cs *compareStats) record(prim, mir time.Duration, primCode, mirCode int, headersOnly bool, diffs []difference) {
	cs.latencies(prim, mir, primCode, mirCode)
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if headersOnly {
		cs.headersOnly++
	}
	if len(diffs) == 0 {
		return
	}
	compared := atomic.LoadInt64(&cs.results[matched]) + atomic.LoadInt64(&cs.results[differed])
	seen := map[string]bool{}
	for _, d := range diffs {
		key := noiseKey(d)
		if !seen[key] {
			seen[key] = true
			cs.countNoise(key, compared)
			cs.countField(key, d.Kind)
		}
	}
}

// countField counts one answer in which a field differed, for the metrics. The caller holds mu.
func (cs *compareStats) countField(key, kind string) {
	if cs.fields == nil {
		cs.fields, cs.others = map[string]int64{}, map[string]int64{}
	}
	if _, ok := cs.fields[key]; ok || len(cs.fields) < maxFieldSeries {
		if !ok {
			cs.fieldOrder = append(cs.fieldOrder, key)
		}
		cs.fields[key]++
		return
	}
	cs.others[kind]++
}

// side counts one side's answer for the metrics. The caller holds mu.
func (cs *compareStats) side(i int, d time.Duration, code int) {
	b := 0
	for b < len(durationBounds) && int64(d) > durationBounds[b] {
		b++
	}
	cs.durations[i][b]++
	cs.sums[i] += int64(d)
	if class := code / 100; class >= 1 && class <= 5 {
		cs.classes[i][class]++
	}
}

// sides is a snapshot of both sides' counts for the metrics.
func (cs *compareStats) sides() (classes [2][6]int64, durations [2][12]int64, sums [2]int64) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.classes, cs.durations, cs.sums
}

// fieldCount is one series of traefik_mirror_differences_total.
type fieldCount struct {
	kind, name string
	n          int64
}

// fieldCounts gives the per-field counts, in the order the fields first differed, then the
// others by kind.
func (cs *compareStats) fieldCounts() []fieldCount {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	var all []fieldCount
	for _, key := range cs.fieldOrder {
		kind, name, _ := strings.Cut(key, " ")
		if name == "" {
			name = kind // a status or a body: the kind is the field
		}
		all = append(all, fieldCount{kind, name, cs.fields[key]})
	}
	kinds := make([]string, 0, len(cs.others))
	for kind := range cs.others {
		kinds = append(kinds, kind)
	}
	sort.Strings(kinds)
	for _, kind := range kinds {
		all = append(all, fieldCount{kind, "other", cs.others[kind]})
	}
	return all
}

// noiseCount counts the answers in which one field differed, since it was first counted.
type noiseCount struct {
	n     int64 // answers in which it differed
	over  int64 // how much n may overcount (see countNoise)
	since int64 // answers compared before it was counted
}

// countNoise counts a field that differed in one more answer. The table keeps maxNoiseKeys
// fields, keys cut as paths are cut: when it is full, the least-counted field gives way to the
// new one, which starts from that count, noted as what it may overcount (the Space-Saving
// algorithm), so that a field that starts to differ late is still counted, and found.
func (cs *compareStats) countNoise(key string, compared int64) {
	if c := cs.noise[key]; c != nil {
		c.n++
		return
	}
	c := &noiseCount{n: 1, since: compared}
	if len(cs.noise) >= maxNoiseKeys {
		var least string
		var fewest *noiseCount // not min: Yaegi v0.16.1 does not know the builtin, keep clear of it
		for k, v := range cs.noise {
			if fewest == nil || v.n < fewest.n {
				least, fewest = k, v
			}
		}
		delete(cs.noise, least)
		c.n, c.over = fewest.n+1, fewest.n
	}
	cs.noise[key] = c
}

// latencies keeps both sides' latencies of one comparison, for the percentiles.
func (cs *compareStats) latencies(prim, mir time.Duration, primCode, mirCode int) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	cs.side(0, prim, primCode)
	cs.side(1, mir, mirCode)
	if len(cs.primary) < latencyRing {
		cs.primary = append(cs.primary, prim.Seconds())
		cs.mirror = append(cs.mirror, mir.Seconds())
		return
	}
	cs.primary[cs.next], cs.mirror[cs.next] = prim.Seconds(), mir.Seconds()
	cs.next = (cs.next + 1) % latencyRing
}

// summary is the comparison's part of the log line: the results since the last line, the match
// rate, both sides' latency percentiles, and the fields that differ in nearly every answer.
func (cs *compareStats) summary() string {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	var delta [numResults]int64
	var total, compared int64
	for r := result(0); r < numResults; r++ {
		n := atomic.LoadInt64(&cs.results[r])
		delta[r] = n - cs.reported[r]
		cs.reported[r] = n
		total += delta[r]
		if r != notCompared {
			compared += n
		}
	}
	if total == 0 {
		return ""
	}
	parts := []string{}
	for r := result(0); r < numResults; r++ {
		if delta[r] > 0 {
			parts = append(parts, resultNames[r]+"="+strconv.FormatInt(delta[r], 10))
		}
	}
	if n := delta[matched] + delta[differed]; n > 0 {
		parts = append(parts, fmt.Sprintf("matchRate=%.1f%%", 100*float64(delta[matched])/float64(n)))
	}
	if len(cs.primary) > 0 {
		parts = append(parts, "primaryP50="+percentile(cs.primary, 0.5), "primaryP99="+percentile(cs.primary, 0.99),
			"mirrorP50="+percentile(cs.mirror, 0.5), "mirrorP99="+percentile(cs.mirror, 0.99))
	}
	if d := cs.headersOnly - cs.reportedHeaders; d > 0 {
		parts = append(parts, "bodyOverLimit="+strconv.FormatInt(d, 10))
	}
	cs.reportedHeaders = cs.headersOnly
	// A field is noise when it differed in noiseShare of the answers compared since it was first
	// seen, at the least (what it may overcount left out).
	var noisy []string
	share := map[string]string{}
	for key, c := range cs.noise {
		if n, of := c.n-c.over, compared-c.since; of >= noiseMinimum && float64(n) >= noiseShare*float64(of) {
			noisy = append(noisy, key)
			share[key] = fmt.Sprintf("%.0f%% of %d", 100*float64(n)/float64(of), of)
		}
	}
	sort.Strings(noisy)
	for _, key := range noisy {
		option := "compare.ignoreJSONPaths"
		field := strings.TrimPrefix(key, "json ")
		if strings.HasPrefix(key, "header ") {
			option, field = "compare.ignoreHeaders", strings.TrimPrefix(key, "header ")
		} else if !strings.HasPrefix(key, "json ") {
			continue // status and body differences are not noise
		}
		parts = append(parts, strconv.Quote(fmt.Sprintf("probable noise: %s differed in %s compared; ignore it with %s",
			field, share[key], option)))
	}
	return strings.Join(parts, " ")
}

func percentile(ring []float64, p float64) string {
	s := append([]float64(nil), ring...)
	sort.Float64s(s)
	d := time.Duration(s[int(p*float64(len(s)-1))] * float64(time.Second))
	return d.Round(100 * time.Microsecond).String()
}
