package mirror

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// The JSON comparison is bounded whatever the answers hold: the text is compared in compiled
// code first (spacing aside, then as canonical encodings), and only answers that still differ
// are walked, to at most maxJSONDepth levels and maxJSONNodes keys and elements. Past either,
// a value is compared whole, by its canonical encoding, and reported as one difference. (An
// interpreted walk costs about 5 KB of stack a level and microseconds a node: unbounded, two
// 20 KB answers of 10,000 nested arrays cost 48 MB each.)
const (
	maxJSONDepth = 32
	maxJSONNodes = 4096
)

// compareJSON compares two bodies as JSON values and appends each path that differs; ok is
// false when either is not one JSON value (the caller compares the bytes).
func compareJSON(cmp *compareSettings, diffs []difference, p, q []byte) (_ []difference, ok bool) {
	var a, b bytes.Buffer
	if json.Compact(&a, p) != nil || json.Compact(&b, q) != nil {
		return diffs, false
	}
	if bytes.Equal(a.Bytes(), b.Bytes()) {
		return diffs, true // the same text, spacing aside
	}
	var pv, qv any
	if decodeJSON(a.Bytes(), &pv) != nil || decodeJSON(b.Bytes(), &qv) != nil {
		return diffs, false
	}
	w := &jsonWalk{cmp: cmp, diffs: diffs, budget: maxJSONNodes}
	if !sameValue(pv, qv) { // the same value, keys in another order: no walk
		w.value(nil, pv, qv)
	}
	return w.diffs, true
}

func decodeJSON(b []byte, v *any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber() // numbers compared as written, without float rounding
	if err := d.Decode(v); err != nil {
		return err
	}
	if d.More() {
		return fmt.Errorf("more than one JSON value")
	}
	return nil
}

// canonical is a value's encoding with object keys sorted and numbers as written.
func canonical(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		return []byte(fmt.Sprint(v))
	}
	return b
}

// sameValue compares two decoded values: scalars directly, containers by their canonical
// encodings (compiled code, however large or deep).
func sameValue(p, q any) bool {
	if !isContainer(p) && !isContainer(q) {
		return p == q
	}
	return isContainer(p) && isContainer(q) && bytes.Equal(canonical(p), canonical(q))
}

// jsonWalk compares two decoded values depth first, keys in order, and appends each path that
// differs (objects' keys and arrays' indexes joined by dots), unless an ignoreJSONPaths matches.
type jsonWalk struct {
	cmp    *compareSettings
	diffs  []difference
	budget int // keys and elements that may still be looked at
}

func (w *jsonWalk) value(path []string, p, q any) {
	if len(w.diffs) >= maxDifferences || ignored(w.cmp, path) {
		return
	}
	switch pv := p.(type) {
	case map[string]any:
		if qv, ok := q.(map[string]any); ok {
			w.object(path, pv, qv)
			return
		}
	case []any:
		if qv, ok := q.([]any); ok {
			w.array(path, pv, qv)
			return
		}
	}
	if !sameValue(p, q) {
		w.diffs = append(w.diffs, jsonDifference(path, p, q, true, true))
	}
}

// room takes n nodes from the budget, unless the path is too deep or the budget too small: the
// two values are then one difference, told apart by the digests of their encodings.
func (w *jsonWalk) room(path []string, n int, p, q any) bool {
	if len(path) < maxJSONDepth && n <= w.budget {
		w.budget -= n
		return true
	}
	d := difference{Kind: "json", Name: pathName(path), Primary: digest(canonical(p)), Mirror: digest(canonical(q))}
	w.diffs = append(w.diffs, d)
	return false
}

func (w *jsonWalk) object(path []string, p, q map[string]any) {
	if !w.room(path, len(p)+len(q), p, q) {
		return
	}
	keys := make([]string, 0, len(p)+len(q))
	for k := range p {
		keys = append(keys, k)
	}
	for k := range q {
		if _, seen := p[k]; !seen {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		if len(w.diffs) >= maxDifferences {
			return
		}
		a, inP := p[k]
		b, inQ := q[k]
		child := append(path, k)
		switch {
		case inP && inQ:
			if !sameValue(a, b) {
				w.value(child, a, b)
			}
		case !ignored(w.cmp, child):
			w.diffs = append(w.diffs, jsonDifference(child, a, b, inP, inQ))
		}
	}
}

func (w *jsonWalk) array(path []string, p, q []any) {
	n := len(p)
	if len(q) > n {
		n = len(q)
	}
	if !w.room(path, n, p, q) {
		return
	}
	path = append(path, "") // the index, set for each element
	last := len(path) - 1
	for i := 0; i < n && len(w.diffs) < maxDifferences; i++ {
		path[last] = strconv.Itoa(i)
		switch {
		case i < len(p) && i < len(q):
			if !sameValue(p[i], q[i]) {
				w.value(path, p[i], q[i])
			}
		case !ignored(w.cmp, path):
			w.diffs = append(w.diffs, jsonDifference(path, index(p, i), index(q, i), i < len(p), i < len(q)))
		}
	}
}

func index(a []any, i int) any {
	if i < len(a) {
		return a[i]
	}
	return nil
}

// isContainer says whether a JSON value is an object or an array. (A case each: Yaegi v0.16.1
// misreads case lists.)
func isContainer(v any) bool {
	switch v.(type) {
	case map[string]any:
		return true
	case []any:
		return true
	}
	return false
}

func jsonDifference(path []string, p, q any, inP, inQ bool) difference {
	d := difference{Kind: "json", Name: pathName(path), Primary: "(absent)", Mirror: "(absent)"}
	if inP {
		d.Primary = jsonText(p)
	}
	if inQ {
		d.Mirror = jsonText(q)
	}
	return d
}

func jsonText(v any) string {
	return truncate(string(canonical(v)))
}

// pathName joins a path with dots, cut as values are cut: a key can be as long as the answer.
func pathName(path []string) string {
	if len(path) == 0 {
		return "."
	}
	var b strings.Builder
	for i, seg := range path {
		if i > 0 {
			b.WriteByte('.')
		}
		if room := maxValue - b.Len(); len(seg) > room {
			if room > 0 {
				b.WriteString(seg[:room])
			}
			b.WriteString("...")
			break
		}
		b.WriteString(seg)
	}
	return b.String()
}

func ignored(cmp *compareSettings, path []string) bool {
	for _, pattern := range cmp.ignorePaths {
		if len(pattern) != len(path) {
			continue
		}
		match := true
		for i, seg := range pattern {
			if seg != "*" && seg != path[i] {
				match = false
				break
			}
		}
		if match {
			return true
		}
	}
	return false
}
