package mirror

import (
	"bytes"
	"encoding/json"
	"errors"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"
)

// The JSON comparison is bounded whatever the answers hold. The texts are compared in compiled
// code first, spacing aside; answers that still differ are walked one level at a time, each
// level decoded into its members' raw texts (compiled, without recursion), to at most
// maxJSONDepth levels, maxJSONNodes members and jsonScanFactor times the texts' bytes decoded
// in all. Past any of these, a value is compared whole (keys sorted, when it holds objects) and
// reported as one difference told apart by digests. A text nested deeper than maxJSONNesting is
// not walked at all: it is compared as written, spacing aside. (Decoding a whole answer is no bound: 10,000 nested arrays cost ~15 ms to decode and ~70
// ms to encode again, compiled; the interpreted recursive walk cost 48 MB of stack.)
const (
	maxJSONDepth   = 32
	maxJSONNodes   = 256
	maxJSONNesting = 128
	jsonScanFactor = 4
)

// compareJSON compares two bodies as JSON values and appends each path that differs; ok is
// false when either is not one JSON value (the caller compares the bytes).
func compareJSON(cmp *compareSettings, diffs []difference, p, q []byte) (_ []difference, ok bool) {
	// Text that is not UTF-8 is compared as bytes: decoding would turn every invalid byte into
	// U+FFFD, and tell different texts the same.
	var a, b bytes.Buffer
	if !utf8.Valid(p) || !utf8.Valid(q) || json.Compact(&a, p) != nil || json.Compact(&b, q) != nil {
		return diffs, false
	}
	if bytes.Equal(a.Bytes(), b.Bytes()) {
		return diffs, true
	}
	if !nestedWithin(a.Bytes()) || !nestedWithin(b.Bytes()) {
		return append(diffs, asWritten(nil, a.Bytes(), b.Bytes())), true
	}
	w := &jsonWalk{cmp: cmp, diffs: diffs, budget: maxJSONNodes, scan: jsonScanFactor * (a.Len() + b.Len())}
	w.value(nil, a.Bytes(), b.Bytes())
	return w.diffs, true
}

// sameCanonical compares two texts nested at most maxJSONNesting levels as values: decoded and
// encoded again, keys sorted, numbers as written (compiled, linear in their size). Texts
// without an object are the same value only if they are the same text.
func sameCanonical(p, q []byte) bool {
	if bytes.IndexByte(p, '{') < 0 && bytes.IndexByte(q, '{') < 0 {
		return false // compact texts that differ, and no key order to tell them apart
	}
	var a, b any
	if decodeJSON(p, &a) != nil || decodeJSON(q, &b) != nil {
		return false
	}
	return bytes.Equal(canonical(a), canonical(b))
}

func decodeJSON(b []byte, v *any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber() // numbers compared as written, without float rounding
	if err := d.Decode(v); err != nil {
		return err
	}
	if d.More() {
		return errors.New("more than one JSON value")
	}
	return nil
}

// canonical is a value's encoding with object keys sorted and numbers as written.
func canonical(v any) []byte {
	b, _ := json.Marshal(v) // decoded JSON always encodes
	return b
}

// nestedWithin says whether a valid JSON text nests at most maxJSONNesting levels, in one
// compiled pass: encoding/json refuses a text nested deeper than 10,000 levels, so the text
// within 10,000 - maxJSONNesting more levels is valid only if it nests at most that.
func nestedWithin(text []byte) bool {
	if bytes.Count(text, []byte("["))+bytes.Count(text, []byte("{")) <= maxJSONNesting {
		return true // few enough containers, however nested
	}
	b := make([]byte, 0, len(text)+2*len(nestingPad))
	b = append(append(append(append(b, nestingPad...), text...), ']'), nestingEnd...)
	return json.Valid(b)
}

var (
	nestingPad = bytes.Repeat([]byte("["), 10000-maxJSONNesting)
	nestingEnd = bytes.Repeat([]byte("]"), 10000-maxJSONNesting-1)
)

// jsonWalk compares two JSON texts depth first, keys in order, and appends each path that
// differs (objects' keys and arrays' indexes joined by dots), unless an ignoreJSONPaths matches.
type jsonWalk struct {
	cmp    *compareSettings
	diffs  []difference
	budget int // members that may still be looked at
	scan   int // bytes that may still be decoded
}

// value compares two compact JSON texts.
func (w *jsonWalk) value(path []string, p, q []byte) {
	if len(w.diffs) >= maxDifferences || bytes.Equal(p, q) || ignored(w.cmp, path) {
		return
	}
	switch {
	case p[0] == '{' && q[0] == '{':
		w.object(path, p, q)
	case p[0] == '[' && q[0] == '[':
		w.array(path, p, q)
	case p[0] == '"' && q[0] == '"' && sameString(p, q):
	default:
		w.diffs = append(w.diffs, jsonDifference(path, p, q, true, true))
	}
}

// sameString says whether two JSON strings written differently ("\u0041", "A") are the same.
func sameString(p, q []byte) bool {
	var a, b string
	return json.Unmarshal(p, &a) == nil && json.Unmarshal(q, &b) == nil && a == b
}

// room takes n members from the budget, unless the path is too deep or a budget too small: the
// two values are then compared whole, and are one difference if they differ.
func (w *jsonWalk) room(path []string, n int, p, q []byte) bool {
	if len(path) < maxJSONDepth && n <= w.budget {
		w.budget -= n
		return true
	}
	if !sameCanonical(p, q) { // the same but for key order, is the same: the walk found no more
		w.diffs = append(w.diffs, asWritten(path, p, q))
	}
	return false
}

// asWritten is the one difference of two values compared whole, told apart by the digests of
// their texts.
func asWritten(path []string, p, q []byte) difference {
	return difference{Kind: "json", Name: pathName(path), Primary: digest(p), Mirror: digest(q)}
}

// decodable takes the bytes of two texts from the scan budget, or says one difference.
func (w *jsonWalk) decodable(path []string, p, q []byte) bool {
	if w.scan -= len(p) + len(q); w.scan >= 0 {
		return true
	}
	w.budget = 0
	return w.room(path, 1, p, q)
}

func (w *jsonWalk) object(path []string, p, q []byte) {
	var pm, qm map[string]json.RawMessage
	if !w.decodable(path, p, q) || json.Unmarshal(p, &pm) != nil || json.Unmarshal(q, &qm) != nil || !w.room(path, len(pm)+len(qm), p, q) {
		return
	}
	keys := make([]string, 0, len(pm)+len(qm))
	for k := range pm {
		keys = append(keys, k)
	}
	for k := range qm {
		if _, seen := pm[k]; !seen {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		if len(w.diffs) >= maxDifferences {
			return
		}
		a, inP := pm[k]
		b, inQ := qm[k]
		child := append(path, k) //nolint:gocritic // a child path is used before the next is made
		switch {
		case inP && inQ:
			w.value(child, a, b)
		case !ignored(w.cmp, child):
			w.diffs = append(w.diffs, jsonDifference(child, a, b, inP, inQ))
		}
	}
}

func (w *jsonWalk) array(path []string, p, q []byte) {
	var pa, qa []json.RawMessage
	if !w.decodable(path, p, q) || json.Unmarshal(p, &pa) != nil || len(pa) > w.budget && !w.room(path, len(pa), p, q) ||
		json.Unmarshal(q, &qa) != nil {
		return
	}
	n := len(pa)
	if len(qa) > n {
		n = len(qa)
	}
	if !w.room(path, n, p, q) {
		return
	}
	path = append(path, "") // the index, set for each element
	last := len(path) - 1
	for i := 0; i < n && len(w.diffs) < maxDifferences; i++ {
		path[last] = strconv.Itoa(i)
		switch {
		case i < len(pa) && i < len(qa):
			w.value(path, pa[i], qa[i])
		case !ignored(w.cmp, path):
			w.diffs = append(w.diffs, jsonDifference(path, index(pa, i), index(qa, i), i < len(pa), i < len(qa)))
		}
	}
}

func index(a []json.RawMessage, i int) []byte {
	if i < len(a) {
		return a[i]
	}
	return nil
}

func jsonDifference(path []string, p, q []byte, inP, inQ bool) difference {
	d := difference{Kind: "json", Name: pathName(path), Primary: "(absent)", Mirror: "(absent)"}
	if inP {
		d.Primary = jsonText(p)
	}
	if inQ {
		d.Mirror = jsonText(q)
	}
	return d
}

func jsonText(v []byte) string {
	return truncate(string(v))
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
