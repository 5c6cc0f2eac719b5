package mirror

import (
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
)

// nested is n arrays, one in the other, around a value.
func nested(n int, value string) string {
	return strings.Repeat("[", n) + value + strings.Repeat("]", n)
}

// The JSON comparison is bounded whatever the answers hold: depth, nodes, and the length of
// every path and value it writes.
func TestJSONComparisonIsBounded(t *testing.T) {
	var wide, wideOther, keys, keysReversed strings.Builder
	wide.WriteString("[")
	wideOther.WriteString("[ ")
	for i := 0; i < 20000; i++ {
		if i > 0 {
			wide.WriteString(",")
			wideOther.WriteString(" , ")
		}
		fmt.Fprintf(&wide, "%d", i)
		fmt.Fprintf(&wideOther, "%d", i)
	}
	wide.WriteString("]")
	wideOther.WriteString(" ]")
	longKey := strings.Repeat("k", 1<<20)
	keys.WriteString("{")
	for i := 0; i < 5000; i++ {
		if i > 0 {
			keys.WriteString(",")
		}
		fmt.Fprintf(&keys, `"k%d":%d`, i, i)
	}
	keys.WriteString("}")
	keysReversed.WriteString("{")
	for i := 4999; i >= 0; i-- {
		fmt.Fprintf(&keysReversed, `"k%d": %d`, i, i)
		if i > 0 {
			keysReversed.WriteString(", ")
		}
	}
	keysReversed.WriteString("}")
	widened := strings.Replace(wide.String(), ",19999]", ",20000]", 1)

	tests := []struct {
		desc       string
		prim, mir  string
		expDiffs   int
		expName    string // of the first difference
		expDigests bool   // told apart by digests
	}{
		{desc: "10,000 levels, one value differs", prim: nested(10000, "1"), mir: nested(10000, "2"),
			expDiffs: 1, expDigests: true},
		{desc: "the same 10,000 levels, spaced otherwise", prim: nested(10000, "1"), mir: nested(10000, " 1 "), expDiffs: 0},
		{desc: "20,000 elements spaced otherwise", prim: wide.String(), mir: wideOther.String(), expDiffs: 0},
		{desc: "20,000 elements, the last differs: past the node budget", prim: wide.String(), mir: widened,
			expDiffs: 1, expName: ".", expDigests: true},
		{desc: "5,000 keys in another order", prim: keys.String(), mir: keysReversed.String()},
		{desc: "5,000 keys, one differs", prim: keys.String(), mir: strings.Replace(keysReversed.String(), `"k7": 7`, `"k7": 8`, 1),
			expDiffs: 1, expName: ".", expDigests: true},
		{desc: "a key of a megabyte", prim: `{"` + longKey + `":1}`, mir: `{"` + longKey + `":2}`, expDiffs: 1},
	}
	for _, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			cmp := compareSettingsFor(t, CompareConfig{MaxBodySize: 4 << 20})
			got, _ := differences(cmp, jsonSide(200, test.prim), jsonSide(200, test.mir))
			equal(t, len(got), test.expDiffs, "differences")
			for _, d := range got {
				if len(d.Name) > maxValue+3 || len(d.Primary) > maxValue+3 || len(d.Mirror) > maxValue+3 {
					t.Errorf("a difference longer than %d characters: name %d, primary %d, mirror %d", maxValue+3, len(d.Name), len(d.Primary), len(d.Mirror))
				}
			}
			if len(got) > 0 && test.expName != "" {
				equal(t, got[0].Name, test.expName, "the difference's name")
			}
			if len(got) > 0 && test.expDigests {
				contains(t, got[0].Primary, "sha256 ")
			}
		})
	}
}

// The walk's stack stays small however deep the answers go: 10,000 levels compared cost far
// less memory than the interpreted recursion did (48 MB a comparison under Yaegi).
func TestJSONComparisonMemory(t *testing.T) {
	cmp := compareSettingsFor(t, CompareConfig{})
	p, q := jsonSide(200, nested(10000, "1")), jsonSide(200, nested(10000, "2"))
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := 0; i < 10; i++ {
		_, _ = differences(cmp, p, q)
	}
	runtime.ReadMemStats(&after)
	perComparison := (after.TotalAlloc - before.TotalAlloc) / 10
	t.Logf("%d KiB allocated per comparison", perComparison>>10)
	if perComparison > 8<<20 {
		t.Errorf("a comparison of 10,000 levels allocated %d MiB", perComparison>>20)
	}
}

// Difference lines list at most maxDifferences differences, headers too.
func TestHeaderDifferencesAreCapped(t *testing.T) {
	cmp := compareSettingsFor(t, CompareConfig{})
	mir := jsonSide(200, `{"a":2}`)
	for i := 0; i < 3000; i++ {
		mir.header.Set(fmt.Sprintf("X-Extra-%d", i), strings.Repeat("v", 1000))
	}
	got, _ := differences(cmp, jsonSide(200, `{"a":1}`), mir)
	equal(t, len(got), maxDifferences, "differences listed")
}

// The noise table keeps maxNoiseKeys fields at most, and a field that starts to differ in
// nearly every answer after the table is full is still named.
func TestNoiseLearnedLate(t *testing.T) {
	cs := &compareStats{noise: map[string]*noiseCount{}}
	judged := func(diffs ...difference) {
		cs.record(0, 0, 200, 200, false, diffs)
		cs.results[differed]++
	}
	for i := 0; i < 128; i++ { // random keys fill the table
		judged(difference{Kind: "json", Name: fmt.Sprintf("r%da", i)}, difference{Kind: "json", Name: fmt.Sprintf("r%db", i)})
	}
	equal(t, len(cs.noise), maxNoiseKeys, "fields counted")
	_ = cs.summary()
	for i := 0; i < 100; i++ {
		diffs := []difference{{Kind: "json", Name: fmt.Sprintf("random%d", i)}}
		if i%100 < 91 {
			diffs = append(diffs, difference{Kind: "json", Name: "meta.requestTime"})
		}
		judged(diffs...)
	}
	equal(t, len(cs.noise), maxNoiseKeys, "fields counted")
	contains(t, cs.summary(), `probable noise: meta.requestTime differed in 91% of 100 compared`)
}

// A difference's field name, as kept in the noise table, is cut as values are.
func TestNoiseKeysAreBounded(t *testing.T) {
	cmp := compareSettingsFor(t, CompareConfig{MaxBodySize: 4 << 20})
	cs := &compareStats{noise: map[string]*noiseCount{}}
	for i := 0; i < 3; i++ {
		key := strings.Repeat(fmt.Sprint(i), 1<<20)
		diffs, _ := differences(cmp, jsonSide(200, `{"`+key+`":1}`), jsonSide(200, `{"`+key+`":2}`))
		cs.record(0, 0, 200, 200, false, diffs)
	}
	for key := range cs.noise {
		if len(key) > maxValue+16 {
			t.Errorf("a noise key of %d bytes", len(key))
		}
	}
}

// An identical service is not reported as different when the client asked for no encoding:
// Traefik's transport undoes the primary's gzip, and the comparison undoes the mirror's.
func TestCompareUndoesTheMirrorsGzip(t *testing.T) {
	answer := func(rw http.ResponseWriter, r *http.Request) {
		rw.Header().Set("Content-Type", "application/json")
		rw.Header().Set("Vary", "Accept-Encoding")
		body := `{"id":7,"name":"seven"}`
		if r.Header.Get("Accept-Encoding") == "gzip" {
			rw.Header().Set("Content-Encoding", "gzip")
			_, _ = rw.Write(gzipped(t, body))
			return
		}
		_, _ = rw.Write([]byte(body))
	}
	front, m, lines := compareStack(t, CreateConfig(), answer, answer)
	for i := 0; i < 3; i++ {
		req := newRequest(t, http.MethodGet, front.URL+"/items/7", nil)
		resp, err := (&http.Transport{DisableCompression: true}).RoundTrip(req) // no Accept-Encoding
		noError(t, err)
		resp.Body.Close()
		equal(t, resp.Header.Get("Content-Encoding"), "", "the client's answer is not encoded")
	}
	cs := m.st.compare.Load().(*compareStats)
	eventually(t, func() bool {
		return atomic.LoadInt64(&cs.results[matched])+atomic.LoadInt64(&cs.results[differed]) == 3
	}, "not compared")
	equal(t, atomic.LoadInt64(&cs.results[matched]), int64(3), "matched")
	equal(t, lines.String(), "", "difference lines")
}

// nestedWithin tells a text nested maxJSONNesting levels from one nested a level more, in
// arrays, objects and strings that hold brackets.
func TestNestedWithin(t *testing.T) {
	object := func(n int) string {
		return strings.Repeat(`{"a":`, n) + `"[[[{"` + strings.Repeat("}", n)
	}
	for _, test := range []struct {
		text string
		exp  bool
	}{
		{nested(maxJSONNesting, "1"), true},
		{nested(maxJSONNesting+1, "1"), false},
		{object(maxJSONNesting), true},
		{object(maxJSONNesting + 1), false},
		{"[" + strings.Repeat("[],", 1000) + "[]]", true},
		{nested(10000, "1"), false},
	} {
		equal(t, nestedWithin([]byte(test.text)), test.exp, fmt.Sprintf("nestedWithin of %.40s...", test.text))
	}
}

// jsonShapes are answers that differ, as a client or a mirror can make them, for the
// comparison's benchmark (compiled here; under Yaegi, the walk's few interpreted steps add to
// it, see BENCHMARKS.md).
func jsonShapes() map[string][2]string {
	var wide, items strings.Builder
	wide.WriteString("[")
	items.WriteString(`{"items":[`)
	for i := 0; i < 20000; i++ {
		if i > 0 {
			wide.WriteString(",")
		}
		fmt.Fprintf(&wide, "%d", i)
	}
	for i := 0; i < 500; i++ {
		if i > 0 {
			items.WriteString(",")
		}
		fmt.Fprintf(&items, `{"id":%d,"name":"item %d","price":{"amount":4.5,"currency":"EUR"},"tags":["a","b"]}`, i, i)
	}
	wide.WriteString("]")
	items.WriteString(`],"meta":{"requestTime":1}}`)
	return map[string][2]string{
		"nested10000": {nested(10000, "1"), nested(10000, "2")},
		"wide20000":   {wide.String(), strings.Replace(wide.String(), ",19999]", ",20000]", 1)},
		"items500":    {items.String(), strings.Replace(items.String(), `"requestTime":1`, `"requestTime":2`, 1)},
	}
}

func BenchmarkJSONComparison(b *testing.B) {
	cmp := &compareSettings{ignoreHeaders: map[string]bool{}}
	for name, pair := range jsonShapes() {
		p, q := jsonSide(200, pair[0]), jsonSide(200, pair[1])
		b.Run(fmt.Sprintf("%s_%dKB", name, len(pair[0])>>10), func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				_, _ = differences(cmp, p, q)
			}
		})
	}
}

// Answers that differ only past compare.maxBodySize, once gzip is undone, are compared by
// status and headers only and counted so: never by the prefixes that fit.
func TestGzipPastTheLimitIsHeadersOnly(t *testing.T) {
	cmp := compareSettingsFor(t, CompareConfig{})
	long := func(last string) side {
		s := jsonSide(200, "", "Content-Encoding", "gzip")
		s.body = gzipped(t, "["+strings.Repeat("0,", 1<<20)+last+"]")
		return s
	}
	diffs, headersOnly := differences(cmp, long("1"), long("2"))
	equal(t, len(diffs), 0, "differences")
	equal(t, headersOnly, true, "compared by status and headers only")
	_, headersOnly = differences(cmp, jsonSide(200, `[1]`), jsonSide(200, `[2]`))
	equal(t, headersOnly, false, "small bodies compared whole")
}

// JSON that is not UTF-8 is compared byte for byte: decoding would make different texts equal.
func TestJSONNotUTF8IsComparedAsBytes(t *testing.T) {
	cmp := compareSettingsFor(t, CompareConfig{})
	for _, pair := range [][2]string{{"{\"a\":\"\xff\"}", "{\"a\":\"\xfe\"}"}, {"{\"\xff\":1}", "{\"\xfe\":1}"}} {
		diffs, _ := differences(cmp, jsonSide(200, pair[0]), jsonSide(200, pair[1]))
		if len(diffs) != 1 || diffs[0].Kind != "body" {
			t.Errorf("%q against %q: got %+v, want one body difference", pair[0], pair[1], diffs)
		}
	}
}
