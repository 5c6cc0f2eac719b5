package mirror

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// result is what the comparison of one copy's answer with the primary's found.
type result int

const (
	matched     result = iota // same status, headers and body, noise aside
	differed                  // a difference line was written
	notCompared               // streamed, or an answer missing
	numResults
)

var resultNames = [numResults]string{"matched", "differed", "notCompared"}

// noiseHeaders differ from one answer to the next, or from one server to another, whatever the
// service does: never compared. Set-Cookie is compared by cookie names, not values.
var noiseHeaders = []string{
	"Age", "Alt-Svc", "Cf-Ray", "Connection", "Content-Length", "Date", "Etag", "Expires", "Keep-Alive",
	"Last-Modified", "Nel", "Report-To", "Server", "Server-Timing", "Strict-Transport-Security",
	"Trailer", "Transfer-Encoding", "Via", "X-Amz-Cf-Id", "X-Amzn-Trace-Id", "X-B3-Traceid", "X-Cache",
	"X-Correlation-Id", "X-Request-Id", "X-Runtime", "X-Served-By", "X-Trace-Id", "Traceparent",
}

const (
	maxCompareBody = 1 << 30 // compare.maxBodySize: each side holds this much at most
	maxDifferences = 20      // per difference line
	maxValue       = 200     // characters of a value in a difference line
	maxNoiseKeys   = 256     // distinct fields whose differences are counted, per middleware
	latencyRing    = 1024    // latencies kept for the percentiles, per side and middleware
	noiseShare     = 0.9     // a field that differs in this share of compared answers is probable noise
	noiseMinimum   = 10      // compared answers before noise is named
)

type compareSettings struct {
	maxBodySize   int64
	share         float64
	ignoreHeaders map[string]bool // canonical names, noise included
	ignorePaths   [][]string      // dotted paths split, "*" matching any one segment
	logFile       string
	log           *diffLog // nil: Traefik's log; set by New (useDiffLog)
}

func compileCompare(c *CompareConfig) (*compareSettings, error) {
	if !c.Enabled {
		return nil, nil
	}
	if c.MaxBodySize < 0 || c.MaxBodySize > maxCompareBody {
		return nil, fmt.Errorf("mirror: invalid compare.maxBodySize %d: must be a size in bytes, at most %d", c.MaxBodySize, int64(maxCompareBody))
	}
	if c.Percent != c.Percent || c.Percent < 0 || c.Percent > 100 {
		return nil, fmt.Errorf("mirror: invalid compare.percent %v: must be between 0 and 100", c.Percent)
	}
	s := &compareSettings{maxBodySize: c.MaxBodySize, share: c.Percent / 100, ignoreHeaders: map[string]bool{}}
	for _, name := range noiseHeaders {
		s.ignoreHeaders[name] = true
	}
	for _, name := range c.IgnoreHeaders {
		if name = strings.TrimSpace(name); name == "" {
			continue
		}
		if !validHeaderName(name) {
			return nil, fmt.Errorf("mirror: invalid compare.ignoreHeaders %q: %q is not a header name", strings.Join(c.IgnoreHeaders, ","), name)
		}
		s.ignoreHeaders[http.CanonicalHeaderKey(name)] = true
	}
	for _, p := range c.IgnoreJSONPaths {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		segments := strings.Split(p, ".")
		for _, seg := range segments {
			if seg == "" {
				return nil, fmt.Errorf("mirror: invalid compare.ignoreJSONPaths %q: empty segment in %q", strings.Join(c.IgnoreJSONPaths, ","), p)
			}
		}
		s.ignorePaths = append(s.ignorePaths, segments)
	}
	s.logFile = c.LogFile
	return s, nil
}

// side is one answer as compared.
type side struct {
	code    int
	header  http.Header
	body    []byte
	over    bool
	latency time.Duration
}

// compareAnswer reads the mirror's answer up to the limit, waits for the primary's (within the
// copy's deadline), compares them and counts the result. It runs in the copy's goroutine. (Under
// Yaegi every call allocates a value per expression of the called function: the common case,
// answers that are the same, goes through small functions only; judge has the rest.)
func compareAnswer(ctx context.Context, m *mirror, c *copyRequest, resp *http.Response) {
	w := c.capture
	mir := mirrorSide(c, resp)
	stop := context.AfterFunc(ctx, w.done) // the copy's deadline ends the wait too
	<-w.answered.Done()
	stop()
	runtime.Gosched() // the primary's answer is being sent now: let it go out first
	st, _ := m.st.compare.Load().(*compareStats)
	switch {
	case !w.finished.Load() || w.code == 0 || streamed(w.header, mir.header):
		atomic.AddInt64(&st.results[notCompared], 1)
		return
	case c.askedGzip && mir.header["Content-Encoding"] != nil && w.header["Content-Encoding"] == nil:
		meant(w, mir)
	}
	if !w.over && !mir.over && sameAnswer(m.compare, w, mir) {
		st.latencies(w.latency, mir.latency, w.code, mir.code)
		atomic.AddInt64(&st.results[matched], 1)
		return
	}
	judge(m, c, st, mir)
}

// meant undoes a gzip that only the mirror's side has: when the client asked for no encoding,
// Traefik's transport asks the primary for gzip and undoes it before the client sees it, and
// the copy asks the mirror alike (as the primary was asked), but nothing undoes the mirror's.
// The mirror's body is then compared decoded, and neither its Content-Encoding nor the
// Accept-Encoding in either Vary is compared: they come from this alone.
func meant(w *capture, mir *side) {
	if !strings.EqualFold(mir.header.Get("Content-Encoding"), "gzip") {
		return
	}
	if !mir.over {
		zr, err := gzip.NewReader(bytes.NewReader(mir.body))
		if err != nil {
			return // not gzip after all: compared as it is
		}
		body, err := io.ReadAll(io.LimitReader(zr, w.limit+1))
		if err != nil {
			return
		}
		mir.body = body
		if int64(len(body)) > w.limit {
			mir.body, mir.over = body[:w.limit], true
		}
	}
	mir.header = mir.header.Clone()
	delete(mir.header, "Content-Encoding")
	varyWithoutAcceptEncoding(mir.header)
	varyWithoutAcceptEncoding(w.header) // the capture's own copy of the primary's headers
}

// varyWithoutAcceptEncoding takes Accept-Encoding out of a header's Vary, if it is of a
// reasonable size (a longer one is compared as it is).
func varyWithoutAcceptEncoding(h http.Header) {
	values := h["Vary"]
	if values == nil || len(values) > 8 || len(strings.Join(values, ",")) > 1024 {
		return
	}
	var kept []string
	for _, v := range values {
		for _, token := range strings.Split(v, ",") {
			if token = strings.TrimSpace(token); token != "" && !strings.EqualFold(token, "Accept-Encoding") {
				kept = append(kept, token)
			}
		}
	}
	if kept == nil {
		delete(h, "Vary")
		return
	}
	h["Vary"] = []string{strings.Join(kept, ", ")}
}

// mirrorSide reads the mirror's answer, up to the limit.
func mirrorSide(c *copyRequest, resp *http.Response) *side {
	limit := c.capture.limit
	var buf bytes.Buffer
	if resp.ContentLength > 0 { // one buffer of the size to come, not a doubling one
		buf.Grow(int(min64(resp.ContentLength, limit+1)))
	}
	_, _ = buf.ReadFrom(io.LimitReader(resp.Body, limit+1))
	body := buf.Bytes()
	mir := &side{code: resp.StatusCode, header: resp.Header, body: body, latency: time.Since(c.began)}
	if int64(len(body)) > limit {
		mir.body, mir.over = body[:limit], true
	}
	return mir
}

// streamed says whether either answer is a stream, which is never compared.
func streamed(p, q http.Header) bool {
	return isStream(p.Get("Content-Type")) || isStream(q.Get("Content-Type"))
}

// sameAnswer says whether both answers have the same status, the same body bytes and the same
// headers (noise aside): the same as differences finding none, at a fraction of its cost.
func sameAnswer(cmp *compareSettings, w *capture, mir *side) bool {
	return w.code == mir.code && bytes.Equal(w.body, mir.body) && sameHeaders(cmp, w.header, mir.header)
}

// sameHeaders compares the headers in wire form, sorted, noise left out: two calls to compiled
// code instead of interpreted loops over both maps.
func sameHeaders(cmp *compareSettings, p, q http.Header) bool {
	var a, b bytes.Buffer
	_ = p.WriteSubset(&a, cmp.ignoreHeaders)
	_ = q.WriteSubset(&b, cmp.ignoreHeaders)
	return bytes.Equal(a.Bytes(), b.Bytes())
}

// judge compares answers that are not the same bytes, counts the result and writes the
// difference line, if any. One comparison at a time is judged in this process: however many
// copies are compared at once, their decoded JSON is in memory one at a time and the judging
// takes at most one core from the clients. At most maxJudgeQueue more wait their turn: an
// answer that differs beyond that is not compared (its copy would hold its slot waiting).
func judge(m *mirror, c *copyRequest, st *compareStats, mir *side) {
	if atomic.AddInt64(&judgeQueue, 1) > maxJudgeQueue+1 {
		atomic.AddInt64(&judgeQueue, -1)
		atomic.AddInt64(&st.results[notCompared], 1)
		return
	}
	judging.Lock()
	defer atomic.AddInt64(&judgeQueue, -1)
	defer judging.Unlock()
	w := c.capture
	prim := side{code: w.code, header: w.header, body: w.body, over: w.over, latency: w.latency}
	diffs, headersOnly := differences(m.compare, prim, *mir)
	st.record(prim.latency, mir.latency, prim.code, mir.code, headersOnly, diffs)
	if len(diffs) == 0 {
		atomic.AddInt64(&st.results[matched], 1)
		return
	}
	atomic.AddInt64(&st.results[differed], 1)
	writeDifference(m, c, prim, *mir, diffs)
	if m.record != nil {
		recordExchange(m, c, prim, *mir)
	}
}

// maxJudgeQueue is how many answers that differ may wait while another is judged.
const maxJudgeQueue = 8

var (
	judging    sync.Mutex
	judgeQueue int64 // atomic: answers being judged or waiting for it
)

// difference is one way in which the answers differ.
type difference struct {
	Kind    string `json:"kind"`           // status, header, json or body
	Name    string `json:"name,omitempty"` // the header's name or the JSON path
	Primary string `json:"primary"`
	Mirror  string `json:"mirror"`
}

// differences compares two answers: status, headers (noise and ignoreHeaders aside), and the
// bodies when both are within the limit: as JSON values when both are JSON, else byte for byte.
func differences(cmp *compareSettings, prim, mir side) (diffs []difference, headersOnly bool) {
	if prim.code != mir.code {
		diffs = append(diffs, difference{Kind: "status", Primary: strconv.Itoa(prim.code), Mirror: strconv.Itoa(mir.code)})
	}
	// Only the names whose values differ are sorted and looked at again: headers that are the
	// same on both sides, the common case, cost one pass over each side.
	var differ []string
	for name, values := range prim.header {
		if !cmp.ignoreHeaders[name] && !sameValues(values, mir.header[name]) {
			differ = append(differ, name)
		}
	}
	for name := range mir.header {
		if _, both := prim.header[name]; !both && !cmp.ignoreHeaders[name] {
			differ = append(differ, name)
		}
	}
	sort.Strings(differ)
	for _, name := range differ {
		if len(diffs) >= maxDifferences {
			return diffs, prim.over || mir.over
		}
		p, q := headerValue(prim.header, name), headerValue(mir.header, name)
		if p != q {
			diffs = append(diffs, difference{Kind: "header", Name: truncate(name), Primary: truncate(p), Mirror: truncate(q)})
		}
	}
	if prim.over || mir.over || len(diffs) >= maxDifferences {
		return diffs, prim.over || mir.over // status and headers only, or nothing more is listed
	}
	if bytes.Equal(prim.body, mir.body) && sameValues(prim.header["Content-Encoding"], mir.header["Content-Encoding"]) {
		return diffs, false // the same bytes, encoded alike: the same value, JSON or not
	}
	pb, overP := decoded(prim, cmp.maxBodySize)
	qb, overQ := decoded(mir, cmp.maxBodySize)
	if overP || overQ {
		return diffs, true // longer than the limit once gzip is undone: status and headers only
	}
	if isJSON(prim.header) && isJSON(mir.header) {
		if d, ok := compareJSON(cmp, diffs, pb, qb); ok {
			return d, false
		}
	}
	if !bytes.Equal(pb, qb) && len(diffs) < maxDifferences {
		diffs = append(diffs, difference{Kind: "body", Primary: digest(pb), Mirror: digest(qb)})
	}
	return diffs, false
}

func sameValues(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// headerValue is a header's values as compared: Set-Cookie by cookie names only.
func headerValue(h http.Header, name string) string {
	values := h[name]
	if name != "Set-Cookie" {
		return strings.Join(values, ", ")
	}
	cookies := make([]string, 0, len(values))
	for _, v := range values {
		cookies = append(cookies, strings.TrimSpace(strings.SplitN(v, "=", 2)[0]))
	}
	sort.Strings(cookies)
	return strings.Join(cookies, ", ")
}

func isJSON(h http.Header) bool {
	ct := strings.ToLower(h.Get("Content-Type"))
	return strings.Contains(ct, "json")
}

// decoded is a body as its service meant it: gzip undone, up to the limit (over: it is longer,
// and is compared by status and headers only).
func decoded(s side, limit int64) (_ []byte, over bool) {
	if !strings.EqualFold(s.header.Get("Content-Encoding"), "gzip") {
		return s.body, false
	}
	zr, err := gzip.NewReader(bytes.NewReader(s.body))
	if err != nil {
		return s.body, false
	}
	out, err := io.ReadAll(io.LimitReader(zr, limit+1))
	if err != nil && len(out) == 0 {
		return s.body, false
	}
	return out, int64(len(out)) > limit
}

// min64 is min for int64: Yaegi v0.16.1 does not know the builtin.
func min64(a, b int64) int64 {
	if a < b {
		return a
	}
	return b
}

func truncate(s string) string {
	if len(s) <= maxValue {
		return s
	}
	return s[:maxValue] + "..."
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return strconv.Itoa(len(b)) + " bytes, sha256 " + hex.EncodeToString(sum[:])
}
