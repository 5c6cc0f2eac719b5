// Package mirror is a Traefik middleware plugin that sends a copy of each request to a second
// upstream, in the background, while the original goes on to its router's service untouched.
package mirror

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"time"
)

// background is the context of the clone a copy starts from: the copy's own, with its deadline,
// replaces it when it is sent.
var background = context.Background()

// markerHeader is set on every copy, with the middleware's name, for the mirror to see.
const markerHeader = "X-Mirrored-By"

type mirror struct {
	next   http.Handler
	marker []string // the value of markerHeader: the middleware's name
	// The options, compiled in New. Embedded: under Yaegi each selector in a function is a value
	// made on every call, and m.cfg.x would be two, the first a copy of all of settings.
	settings
	st *state // shared by every instance of this middleware name

	transport http.RoundTripper // shared by every instance with the same TLS settings
}

// New creates the mirroring middleware. A mistake in its options never takes the router down
// unless failClosed says so: the middleware then mirrors nothing, says why at ERROR, and hands
// every request to the next handler.
func New(ctx context.Context, next http.Handler, config *Config, name string) (http.Handler, error) {
	st := stateFor(name)
	cfg, err := compile(config)
	if err == nil && cfg.compare != nil {
		cfg.compare.log, err = useDiffLog(st, cfg.compare.logFile)
	}
	useLease(ctx, st, &cfg, err == nil && cfg.percent > 0)
	if err != nil {
		if config != nil && config.FailClosed {
			return nil, err
		}
		// The metrics say so too, where they can be served: an alert on a middleware that
		// mirrors nothing, whatever its log says.
		if config != nil {
			if addr, bad := metricsAddress(config.MetricsAddress); bad == nil {
				useMetrics(st, addr)
			}
		}
		return misconfigured(st, next, err), nil
	}
	st.configError.Store("")
	if cfg.compare == nil {
		_, _ = useDiffLog(st, "")
	}
	useMetrics(st, cfg.metricsAddress)
	useRecorder(st, cfg.record)
	if cfg.percent == 0 {
		// Mirroring is off: the router gets its next handler itself, at no cost per request.
		debugLine("mirror " + name + ": percent=0, mirroring is off")
		return next, nil
	}
	m := &mirror{next: next, marker: []string{name}, settings: cfg, st: st}
	m.transport = transportFor(cfg)
	if cfg.compare != nil {
		enableCompare(st)
	}
	st.debug(fmt.Sprintf("mirror %s: copying to %s percent=%v mirrorBody=%v maxBodySize=%d timeout=%s maxInflight=%d maxRate=%v retries=%d compare=%v",
		name, cfg.base+cfg.baseRawPath, cfg.percent, cfg.mirrorBody, cfg.maxBodySize, cfg.timeout, cfg.maxInflight, cfg.maxRate, cfg.retries, cfg.compare != nil))
	return m, nil
}

// misconfiguredHandler stands for a middleware whose options are wrong: it hands every request
// to the next handler and repeats the error at most once per logInterval while requests come.
type misconfiguredHandler struct {
	next http.Handler
	st   *state
}

func misconfigured(st *state, next http.Handler, err error) http.Handler {
	line := "mirror " + st.name + ": " + strings.TrimPrefix(err.Error(), "mirror: ") +
		"; mirroring is off and requests go on unmirrored (failClosed: true disables the routers instead)"
	// Once per router and per reload New says the same: the line is written when it is new, and
	// then once per logInterval at most.
	if old, _ := st.configError.Swap(line).(string); old != line {
		st.nextConfigLine.Store(time.Now().Add(logInterval).UnixNano())
		st.error(line)
	} else if due := st.nextConfigLine.Load(); time.Now().UnixNano() >= due {
		repeatConfigError(st, due)
	}
	return &misconfiguredHandler{next: next, st: st}
}

func (h *misconfiguredHandler) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	if due := h.st.nextConfigLine.Load(); time.Now().UnixNano() >= due {
		repeatConfigError(h.st, due)
	}
	h.next.ServeHTTP(rw, req)
}

// repeatConfigError writes the configuration error again, once per logInterval, while it stands
// (a later configuration may have fixed it).
func repeatConfigError(st *state, due int64) {
	if !st.nextConfigLine.CompareAndSwap(due, time.Now().Add(logInterval).UnixNano()) {
		return
	}
	if line, _ := st.configError.Load().(string); line != "" {
		st.error(line)
	}
}

// ServeHTTP is interpreted by Yaegi on every request. Under Yaegi v0.16.1 every call allocates
// one value per expression of the called function, and a call to an interpreted method costs
// about six times a call to a plain function (it builds a function wrapper through
// reflect.MakeFunc). So ServeHTTP holds one check, decided in New: percent, sampleBy and the
// filters, which only some middlewares have, go through choose; the request path is made of
// plain functions, each holding what its path needs; only the methods that compiled code calls
// are methods.
func (m *mirror) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	if m.choose {
		choose(m, rw, req)
		return
	}
	serve(m, rw, req)
}

// choose applies percent, sampleBy and the filters, which only some middlewares have.
func choose(m *mirror, rw http.ResponseWriter, req *http.Request) {
	if m.share < 1 && rand.Float64() >= m.share {
		atomic.AddInt64(&m.st.counts[sampledOut], 1)
		m.next.ServeHTTP(rw, req)
		return
	}
	if m.gate {
		gate(m, rw, req)
		return
	}
	serve(m, rw, req)
}

// gate applies sampleBy and the filters, which only some middlewares have: the method, the
// path (not the query), and each matchHeaders header, of which one value must match. (No call
// for the method and the path: each call costs under Yaegi. One expression, not a case list:
// Yaegi v0.16.1 misreads "case a, b:" in a switch without a tag.)
func gate(m *mirror, rw http.ResponseWriter, req *http.Request) {
	switch {
	case m.byShare < 1 && !sampledBy(m, req):
		atomic.AddInt64(&m.st.counts[sampledOut], 1)
	case m.methods != nil && !m.methods[req.Method] ||
		m.pathRegex != nil && (len(req.URL.Path) > maxMatched || !m.pathRegex.MatchString(req.URL.Path)) ||
		m.matchHeaders != nil && !matchHeaders(m, req):
		atomic.AddInt64(&m.st.counts[filtered], 1)
	default:
		serve(m, rw, req)
		return
	}
	m.next.ServeHTTP(rw, req)
}

// sampledBy decides by the sampleBy header's first value alone, the same way in every process:
// the request is in the sample when the first 8 bytes of the value's SHA-256, as a big-endian
// fraction of 2^64, are below percent/100. Without the header, the draw is random.
func sampledBy(m *mirror, req *http.Request) bool {
	v := req.Header[m.sampleBy]
	if v == nil {
		return rand.Float64() < m.byShare
	}
	sum := sha256.Sum256([]byte(v[0]))
	return float64(binary.BigEndian.Uint64(sum[:8])) < m.byShare*(1<<64)
}

// maxMatched is the most of a path, or of one header's values in all, that pathRegex and
// matchHeaders look at: a longer path, or a value past that much, never matches, and the request
// is filtered out. (Go's regexps run in linear time, but an unanchored pattern over a megabyte
// costs tens of milliseconds of a core, whether in one value or in a hundred.)
const maxMatched = 8 << 10

// matchHeaders says whether every matchHeaders header has a value that matches.
func matchHeaders(m *mirror, req *http.Request) bool {
	for _, hm := range m.matchHeaders {
		if !matchesAny(hm.re, req.Header[hm.name]) {
			return false
		}
	}
	return true
}

func matchesAny(re *regexp.Regexp, values []string) bool {
	budget := maxMatched
	for _, v := range values {
		if budget -= len(v) + 1; budget < 0 { // +1: a thousand empty values cost too
			return false
		}
		if re.MatchString(v) {
			return true
		}
	}
	return false
}

// serve copies a chosen request. The common copy (leanUnder: decided in New; no body or a small
// one of known length; a plain path; no Connection, TE, loop or Expect header) takes the short
// path below, in as few interpreted expressions and calls as it can be (a paused mirror fails
// its slot: see pause): under
// Yaegi each call allocates a value for every expression of the called function, and each call
// into compiled code costs about as much as eight expressions (BenchmarkYaegiConstructs). Every
// other request goes through serveOther.
func serve(m *mirror, rw http.ResponseWriter, req *http.Request) {
	h, p := req.Header, req.URL.Path
	if uint64(req.ContentLength) >= m.leanUnder || p == "" || p[0] != '/' || req.Method == "CONNECT" ||
		h["Connection"] != nil || h["Te"] != nil || h[loopHeader] != nil || h["Expect"] != nil {
		serveOther(m, rw, req)
		return
	}
	var body []byte
	if req.ContentLength > 0 {
		body = make([]byte, req.ContentLength) // bounded: under leanUnder, at most readAhead
		if n, err := io.ReadFull(req.Body, body); err != nil {
			cutShort(m, req, body[:n])
			m.next.ServeHTTP(rw, req)
			return
		}
		req.Body = io.NopCloser(bytes.NewReader(body))
	}
	if atomic.AddInt64(&m.st.inflight, 1) > m.maxInflight {
		noSlot(m)
	} else {
		// Detached from the client's request: only the mirror's own deadline cancels the copy.
		ctx, cancel := context.WithTimeout(background, m.timeout)
		go send(m, &copyRequest{req: req.Clone(ctx), cancel: cancel, body: body})
	}
	m.next.ServeHTTP(rw, req)
}

// serveOther serves a request that the lean path does not take.
func serveOther(m *mirror, rw http.ResponseWriter, req *http.Request) {
	if m.st.paused.Load() { // the mirror refused a connection a moment ago
		count(m.st, failed, nil)
		m.next.ServeHTTP(rw, req)
		return
	}
	if c := start(m, req); c != nil {
		follow(m, rw, req, c)
		return
	}
	m.next.ServeHTTP(rw, req)
}

// readAhead is the largest body of known length that is read before the primary is called: what
// a client sends in one burst. Larger bodies, and bodies whose client asked to be told to go on
// (Expect: 100-continue), are copied as the primary reads them.
const readAhead = 64 << 10

// follow serves the primary of a copy that needs it: one that compares its answer, or whose
// body the primary reads through the tee, to be abandoned once the primary is done.
func follow(m *mirror, rw http.ResponseWriter, req *http.Request, c *copyRequest) {
	if c.capture != nil {
		serveCompared(m, rw, req, c)
		return
	}
	m.next.ServeHTTP(rw, req)
	c.tee.abandon()
}

// start copies a request that passed the cheap checks, unless refused says no; it takes what
// the copy needs now, since later middlewares may change the request in place, and a slot, then
// sends the copy, and returns it if the primary must be followed (see follow). The checks that
// rarely say no are made again, one by one, in refused: a call costs under Yaegi.
func start(m *mirror, req *http.Request) *copyRequest {
	withBody := m.mirrorBody && req.ContentLength != 0 && req.Body != nil && req.Body != http.NoBody
	// Map indexing, not Header.Get: the server canonicalizes keys, and a call costs more.
	if req.URL.Path == "" || req.URL.Path[0] != '/' || req.Method == http.MethodConnect ||
		req.Header["Connection"] != nil || req.Header[loopHeader] != nil || m.rateInterval > 0 ||
		withBody && m.maxBodySize >= 0 && req.ContentLength > m.maxBodySize {
		if refused(m, req, withBody) {
			return nil
		}
	}
	ctx, cancel := context.WithTimeout(background, m.timeout)
	c := &copyRequest{req: req.Clone(ctx), cancel: cancel, full: true}
	if withBody && (req.ContentLength < 0 || req.ContentLength > readAhead || req.Header["Expect"] != nil) {
		return tee(m, req, c)
	}
	// Read before a slot is taken: a client that drips its body holds no slot meanwhile.
	if withBody && !readBody(m, req, c) || !acquire(m) {
		cancel()
		return nil
	}
	if m.compare != nil && prepareCompare(m, c) {
		go send(m, c)
		return c
	}
	go send(m, c)
	return nil
}

// refused says whether a request must not be copied, and counts why: a target that is not a
// plain path (an opaque "x:@host/p", "*": only the path and query of a request are ever put on
// the mirror's URL), an upgrade, a copy of this process's own, a body over maxBodySize, or a
// copy over maxRate.
func refused(m *mirror, req *http.Request, withBody bool) bool {
	switch {
	case req.URL.Path == "" || req.URL.Path[0] != '/' || req.Method == http.MethodConnect ||
		(req.Header["Connection"] != nil || req.Header[loopHeader] != nil) && excluded(req.Header):
		atomic.AddInt64(&m.st.counts[skipped], 1)
	case withBody && m.maxBodySize >= 0 && req.ContentLength > m.maxBodySize:
		count(m.st, tooLarge, nil)
	case m.rateInterval > 0 && (m.redis == nil && !allow(m.st, m.rateInterval, m.rateTolerance) || m.redis != nil && !spend(m)):
		count(m.st, rateLimited, nil)
	default:
		return false
	}
	return true
}

// acquire takes a slot, owned by the copy from then on, unless every one is taken.
func acquire(m *mirror) bool {
	if atomic.AddInt64(&m.st.inflight, 1) > m.maxInflight {
		noSlot(m)
		return false
	}
	return true
}

// noSlot gives back the slot taken over the limit, and counts the copy dropped, or failed when
// the limit was the pause's (see pause).
func noSlot(m *mirror) {
	if atomic.AddInt64(&m.st.inflight, -1) >= pausedSlots/2 {
		count(m.st, failed, nil)
		return
	}
	count(m.st, dropped, nil)
}

// excluded says whether a request carrying Connection or the loop header must not be copied:
// an upgrade (Connection carries the upgrade token, as Go's reverse proxy decides), or a copy of
// this process's own come back.
func excluded(h http.Header) bool {
	return h["Connection"] != nil && isUpgrade(h) || h[loopHeader] != nil && isOwnCopy(h[loopHeader])
}

// isUpgrade says whether Connection carries the upgrade token.
func isUpgrade(h http.Header) bool {
	for _, v := range h["Connection"] {
		for _, token := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(token), "upgrade") {
				return true
			}
		}
	}
	return false
}

// readBody reads a small body of known length, once, for the copy, and gives the primary a
// standard-library reader over the same bytes. Memory follows the bytes that arrive: the buffer
// is at most readAhead. (The paths that start does not always take live in functions of their
// own, so that start allocates less: see ServeHTTP.)
func readBody(m *mirror, req *http.Request, c *copyRequest) bool {
	buf := make([]byte, req.ContentLength) // bounded: 1..readAhead, start tees every other length
	n, err := io.ReadFull(req.Body, buf)
	if err != nil {
		cutShort(m, req, buf[:n])
		return false
	}
	req.Body = io.NopCloser(bytes.NewReader(buf))
	c.body = buf
	return true
}

// cutShort gives the primary of a body that the client cut short the bytes that came, then the
// error, and counts it: no copy is sent.
func cutShort(m *mirror, req *http.Request, came []byte) {
	req.Body = io.NopCloser(io.MultiReader(bytes.NewReader(came), req.Body))
	count(m.st, skipped, nil)
}
