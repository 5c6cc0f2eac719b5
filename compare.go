package mirror

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
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
}

func enableCompare(st *state) {
	if st.compare.Load() == nil {
		st.compare.CompareAndSwap(nil, &compareStats{noise: map[string]*noiseCount{}})
	}
}

// capture takes the primary's status, headers and first body bytes as they go to the client,
// without holding any back. Every write of an answer without Content-Length (a stream: events,
// gRPC, a chunked body) is passed on and flushed at once, as Traefik's proxy flushes such an
// answer, since compiled code cannot see a Flush method on an interpreted writer. The capture
// does as little as it can: what is only needed for the comparison is worked out later, in the
// copy's goroutine.
type capture struct {
	// The client's writer, embedded: compiled callers reach its Header method directly, not
	// through an interpreted one (Go's proxy calls it several times per answer).
	http.ResponseWriter
	limit int64

	code    int
	header  http.Header
	body    []byte
	over    bool // the body was longer than limit
	stream  bool // no Content-Length: every write is flushed
	began   time.Time
	latency time.Duration

	// answered is cancelled once the primary's handler has returned (finished is then true if
	// it answered), or at the copy's deadline. (A context, not a select on two channels: Yaegi
	// v0.16.1 runs a select with one set of cases shared by every goroutine executing it.)
	answered context.Context
	done     context.CancelFunc
	finished atomic.Bool
}

// prepareCompare decides whether this copy is compared, before its goroutine starts, and says
// whether it is.
func prepareCompare(m *mirror, c *copyRequest) bool {
	cmp := m.cfg.compare
	if cmp.share < 1 && rand.Float64() >= cmp.share {
		return false
	}
	w := &capture{limit: cmp.maxBodySize}
	w.answered, w.done = context.WithCancel(context.Background())
	c.capture = w
	return true
}

func isStream(contentType string) bool {
	return strings.HasPrefix(contentType, "text/event-stream") || strings.HasPrefix(contentType, "application/grpc")
}

// serveCompared serves the primary through the capture. The primary's answer is complete
// (finished) only when the next handler returns: Go's reverse proxy panics
// (http.ErrAbortHandler) when the client goes away during the answer, and the copy then ends
// its wait (done is deferred) without comparing what was cut short.
func serveCompared(m *mirror, rw http.ResponseWriter, req *http.Request, c *copyRequest) {
	w := c.capture
	w.ResponseWriter = rw // one assignment each: Yaegi v0.16.1 leaves an interface field nil in a tuple assignment
	w.began = time.Now()
	defer w.done()
	m.next.ServeHTTP(w, req)
	w.latency = time.Since(w.began)
	w.finished.Store(true)
	if c.tee != nil {
		c.tee.abandon()
	}
}

func (w *capture) WriteHeader(code int) {
	if code >= 200 && w.code == 0 {
		w.code = code
		w.header = w.ResponseWriter.Header().Clone()
		w.stream = w.header["Content-Length"] == nil
		if n, err := strconv.ParseInt(w.header.Get("Content-Length"), 10, 64); err == nil && n > 0 {
			w.body = make([]byte, 0, min64(n, w.limit)) // one buffer of the size to come
		}
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *capture) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.WriteHeader(http.StatusOK)
	}
	n, err := w.ResponseWriter.Write(b)
	if w.over || int64(len(w.body)+n) > w.limit {
		w.overflow(b[:n])
	} else {
		w.body = append(w.body, b[:n]...)
	}
	if w.stream {
		_ = http.NewResponseController(w.ResponseWriter).Flush()
	}
	return n, err
}

// overflow keeps what fits of a write that reaches the limit.
func (w *capture) overflow(b []byte) {
	if !w.over {
		w.body = append(w.body, b[:w.limit-int64(len(w.body))]...)
		w.over = true
	}
}

// Flush and Unwrap serve interpreted callers; compiled ones never see them.
func (w *capture) Flush() { _ = http.NewResponseController(w.ResponseWriter).Flush() }

// Unwrap returns the writer the capture passes everything to.
func (w *capture) Unwrap() http.ResponseWriter { return w.ResponseWriter }

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
	if !w.over && !mir.over && sameAnswer(m.cfg.compare, w, mir) {
		st.latencies(w.latency, mir.latency)
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
	diffs := differences(m.cfg.compare, prim, *mir)
	st.record(prim, *mir, diffs)
	if len(diffs) == 0 {
		atomic.AddInt64(&st.results[matched], 1)
		return
	}
	atomic.AddInt64(&st.results[differed], 1)
	writeDifference(m, c, prim, *mir, diffs)
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

type statusPair struct {
	Primary int `json:"primary"`
	Mirror  int `json:"mirror"`
}

type latencyPair struct {
	Primary float64 `json:"primary"`
	Mirror  float64 `json:"mirror"`
}

// diffLine is the documented, stable schema of a difference line.
type diffLine struct {
	Time        string       `json:"time"`
	Middleware  string       `json:"middleware"`
	Method      string       `json:"method"`
	Path        string       `json:"path"`
	RequestID   string       `json:"requestId,omitempty"`
	Status      statusPair   `json:"status"`
	LatencyMs   latencyPair  `json:"latencyMs"`
	Differences []difference `json:"differences"`
}

func writeDifference(m *mirror, c *copyRequest, prim, mir side, diffs []difference) {
	target := c.req.URL.EscapedPath()
	if c.req.URL.RawQuery != "" {
		target += "?" + c.req.URL.RawQuery
	}
	line := diffLine{
		Time: time.Now().UTC().Format(time.RFC3339Nano), Middleware: m.st.name, Method: c.req.Method, Path: target,
		RequestID:   c.req.Header.Get("X-Request-Id"),
		Status:      statusPair{Primary: prim.code, Mirror: mir.code},
		LatencyMs:   latencyPair{Primary: ms(prim.latency), Mirror: ms(mir.latency)},
		Differences: diffs,
	}
	b, err := json.Marshal(line)
	if err != nil {
		return
	}
	if l := m.cfg.compare.log; l != nil && l.write(b) {
		return
	}
	m.st.error("mirror " + m.st.name + ": difference " + string(b))
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// differences compares two answers: status, headers (noise and ignoreHeaders aside), and the
// bodies when both are within the limit: as JSON values when both are JSON, else byte for byte.
func differences(cmp *compareSettings, prim, mir side) []difference {
	var diffs []difference
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
			return diffs
		}
		p, q := headerValue(prim.header, name), headerValue(mir.header, name)
		if p != q {
			diffs = append(diffs, difference{Kind: "header", Name: truncate(name), Primary: truncate(p), Mirror: truncate(q)})
		}
	}
	if prim.over || mir.over || len(diffs) >= maxDifferences {
		return diffs // compared by status and headers only, or nothing more is listed
	}
	if bytes.Equal(prim.body, mir.body) && sameValues(prim.header["Content-Encoding"], mir.header["Content-Encoding"]) {
		return diffs // the same bytes, encoded alike: the same value, JSON or not
	}
	pb, qb := decoded(prim), decoded(mir)
	if isJSON(prim.header) && isJSON(mir.header) {
		if d, ok := compareJSON(cmp, diffs, pb, qb); ok {
			return d
		}
	}
	if !bytes.Equal(pb, qb) && len(diffs) < maxDifferences {
		diffs = append(diffs, difference{Kind: "body", Primary: digest(pb), Mirror: digest(qb)})
	}
	return diffs
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

// decoded is a body as its service meant it: gzip undone, within the same limit.
func decoded(s side) []byte {
	if !strings.EqualFold(s.header.Get("Content-Encoding"), "gzip") {
		return s.body
	}
	zr, err := gzip.NewReader(bytes.NewReader(s.body))
	if err != nil {
		return s.body
	}
	out, err := io.ReadAll(io.LimitReader(zr, 4*int64(len(s.body))+64<<10))
	if err != nil && len(out) == 0 {
		return s.body
	}
	return out
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

// record counts one comparison: its latencies, whether its body was compared, and which fields
// differed.
func (cs *compareStats) record(prim, mir side, diffs []difference) {
	cs.latencies(prim.latency, mir.latency)
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if prim.over || mir.over {
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
		}
	}
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
func (cs *compareStats) latencies(prim, mir time.Duration) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
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

// diffLog is a file that difference lines are appended to, shared by every middleware that
// names it, and opened again when it has been rotated away. It is closed when no middleware
// names it any more (see useDiffLog).
type diffLog struct {
	path    string
	mu      sync.Mutex
	f       *os.File // nil once closed
	checked time.Time
}

// diffLogs are the open log files by path; logFiles, what each middleware name was last built
// with (a name no longer configured keeps its file open: Traefik says nothing of it).
var (
	diffLogsMu sync.Mutex
	diffLogs   = map[string]*diffLog{}
	logFiles   = map[*state]string{}
)

// useDiffLog records the log file a middleware is built with ("" for none), opens it unless it
// is open, and closes every file that no middleware names any more.
func useDiffLog(st *state, path string) (*diffLog, error) {
	diffLogsMu.Lock()
	defer diffLogsMu.Unlock()
	var l *diffLog
	if path != "" {
		if l = diffLogs[path]; l == nil {
			f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
			if err != nil {
				return nil, fmt.Errorf("mirror: invalid compare.logFile %q: %w", path, err)
			}
			l = &diffLog{path: path, f: f, checked: time.Now()}
			diffLogs[path] = l
		}
	}
	if logFiles[st] == path {
		return l, nil
	}
	logFiles[st] = path
	named := map[string]bool{}
	for _, p := range logFiles {
		named[p] = true
	}
	for p, open := range diffLogs {
		if !named[p] {
			open.close()
			delete(diffLogs, p)
		}
	}
	return l, nil
}

func (l *diffLog) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	_ = l.f.Close()
	l.f = nil
}

// write appends one line; false if the file was closed (an instance built before a reload that
// named another file: the line goes to Traefik's log). At most once a second it checks that
// the path still names the open file, and opens it again if not (logrotate moved it away).
func (l *diffLog) write(line []byte) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return false
	}
	if time.Since(l.checked) >= time.Second {
		l.checked = time.Now()
		open, err1 := l.f.Stat()
		named, err2 := os.Stat(l.path)
		if err1 != nil || err2 != nil || !os.SameFile(open, named) {
			if f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644); err == nil {
				_ = l.f.Close()
				l.f = f
			}
		}
	}
	_, _ = l.f.Write(append(line, '\n'))
	return true
}
