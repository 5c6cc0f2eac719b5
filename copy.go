package mirror

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// dialPause is how long copies stop after the mirror could not be connected to.
const dialPause = time.Second

// maxDrain bounds how much of a mirror's answer is read so that its connection can be reused.
const maxDrain = 64 << 10

// maxAnswerHeader bounds the header block of a mirror's answer (Go's default is 10 MiB): a
// mirror that answers with more fails the copy.
const maxAnswerHeader = 64 << 10

// loopHeader lists the Traefik processes a copy went through, one random token each. A request
// carrying this process's token is a copy of its own come back, and is never copied again; a
// client cannot forge it, since it cannot know the token. Each copy adds its process's token to
// the list it arrived with, kept to the last maxLoopTokens, so that a loop through several
// replicas ends when it comes back to any of them.
const loopHeader = "X-Mirror-Loop"

const maxLoopTokens = 16

// maxLoopToken is the longest token kept from a loop header: a process's is 32 characters, and a
// client's longer one is not passed on to the mirror.
const maxLoopToken = 64

// processToken identifies this Traefik process (this interpreter) on the copies it sends.
var processToken = newToken()

func newToken() string {
	b := make([]byte, 16)
	if _, err := crand.Read(b); err != nil {
		panic("mirror: no randomness for the loop token: " + err.Error())
	}
	return hex.EncodeToString(b)
}

// isOwnCopy says whether a request is a copy sent by this process. Only the last
// maxLoopTokens values are looked at: a copy carries one, and a client's thousands of others
// must not cost a look each.
func isOwnCopy(values []string) bool {
	if len(values) > maxLoopTokens {
		values = values[len(values)-maxLoopTokens:]
	}
	for _, v := range values {
		if strings.Contains(v, processToken) {
			return true
		}
	}
	return false
}

// Header values set on copies, shared: header values are never modified in place.
var (
	gzipOnly     = []string{"gzip"}
	noUserAgent  = []string{""}
	trailersOnly = []string{"trailers"}
)

// teTrailers says whether TE holds the token trailers, which Go's proxy keeps (alone) for the
// primary.
func teTrailers(h http.Header) bool {
	for i, v := range h["Te"] {
		if i == 4 || len(v) > 256 { // no client needs more: a longer TE is not looked at
			return false
		}
		for _, token := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(token), "trailers") {
				return true
			}
		}
	}
	return false
}

// ownLoop is the loop header of a copy of a request that carried none (shared: header values
// are never modified in place).
var ownLoop = []string{processToken}

// loopTokens is the loop header of a copy: the last tokens it arrived with (at most
// maxLoopTokens-1, none longer than maxLoopToken), then this process's. It works from the end
// of the values, a bounded number of steps, so that a header of a million commas, or of a
// thousand long tokens, costs no more than one of a few tokens.
func loopTokens(values []string) []string {
	kept := make([]string, maxLoopTokens)
	n := maxLoopTokens - 1
	kept[n] = processToken
	steps := 2 * maxLoopTokens // tokens looked at, kept or not
	for i := len(values) - 1; i >= 0 && i >= len(values)-maxLoopTokens && n > 0; i-- {
		v := values[i]
		for ; n > 0 && steps > 0; steps-- {
			v = strings.TrimRight(v, ", \t")
			if v == "" {
				break
			}
			cut := strings.LastIndexByte(v, ',')
			if token := strings.TrimSpace(v[cut+1:]); len(token) <= maxLoopToken { // no process's token is longer
				n--
				kept[n] = token
			}
			v = v[:cut+1]
		}
	}
	return []string{strings.Join(kept[n:], ", ")}
}

// hopHeaders are the hop-by-hop headers that net/http/httputil removes, and so the copy loses
// them too (RFC 9110, section 7.6.1); so are the headers named in Connection. Transfer-Encoding
// and Trailer need no removal: the transport never sends them from Header. Upgrade goes even
// without "Connection: upgrade" (which is never copied), as the proxy drops it for the primary.
var hopHeaders = []string{"Connection", "Keep-Alive", "Te", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization", "Upgrade"}

// sharedTransport carries the copies of every instance without TLS options; transports holds
// one more for each distinct set of them (insecureSkipVerify, caFile's content, serverName).
// Package-level state survives configuration reloads, so idle connections to the mirror are
// reused instead of reopened, and no reload adds a transport for settings already seen.
var (
	sharedTransport = newTransport()
	transportsMu    sync.Mutex
	transports      = map[string]*http.Transport{}
)

func transportFor(s settings) http.RoundTripper {
	if s.tlsConfig == nil {
		return sharedTransport
	}
	transportsMu.Lock()
	defer transportsMu.Unlock()
	t := transports[s.tlsKey]
	if t == nil {
		t = newTransport()
		t.TLSClientConfig = s.tlsConfig
		transports[s.tlsKey] = t
	}
	return t
}

func newTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConns = 0 // no global limit; MaxIdleConnsPerHost bounds each mirror
	t.MaxIdleConnsPerHost = 1024
	t.DisableCompression = true // the answer is drained, never decoded
	t.MaxResponseHeaderBytes = maxAnswerHeader
	return t
}

// copyRequest is what the copy needs from the incoming request, and what became of it.
type copyRequest struct {
	// req is the request as the primary gets it, cloned when the copy starts (one compiled
	// call): later middlewares may change the request in place. Its body is not read. Its
	// context carries the copy's deadline, from then; send makes it the copy itself.
	req    *http.Request
	cancel context.CancelFunc // the deadline's
	body   []byte             // nil: no body

	full bool // not from serve's short path: the copy's headers need all of send's work (see send)

	tee      *teeBody  // the body is copied as the primary reads it
	stream   *stream   // the rest of the body follows the copy (see stream)
	capture  *capture  // the primary's answer, when this copy is compared
	head     []byte    // what a streamed body held when it began to stream, when copies are recorded
	recorded *recorded // the request as recorded, when differences are
	follows  bool      // the answer needs more than a drain: a comparison, a stream to stop

	askedGzip bool // the copy asks for gzip where the client asked for no encoding (see meant)

	began   time.Time // when the copy was sent (with metrics, compare or record)
	code    int       // the mirror's last answer's status, once read
	outcome outcome
	err     error
}

// send runs in its own goroutine and owns one slot until settle gives it back. (A pool of
// reused goroutines was measured slower under Yaegi: its select costs more than go.)
//
// It builds the copy as Traefik's proxy (net/http/httputil) builds the primary's request, sends
// it and reads the answer. Under Yaegi a call allocates a value for every expression of the
// called function, taken or not, and a call into compiled code costs about eight
// (BenchmarkYaegiConstructs): so send holds what the common copy runs (serve's short path: no
// Connection, TE or loop header, a body of known length, an answer below 500 not compared), in
// one function, and every other copy (c.full) and answer goes through a helper of its own.
func send(m *mirror, c *copyRequest) {
	c.outcome = failed // what settle counts if anything below panics
	defer settle(m, c)

	out := c.req
	// The URL is the mirror's, parsed in New, with the request's path and query put in its
	// fields: nothing from the request is ever parsed as a scheme, host or user info. The
	// request line comes as the primary gets it: Traefik's entry point has already turned the
	// query's semicolons into '&' (or %3B).
	u := out.URL
	out.URL = &url.URL{Scheme: m.scheme, Host: m.host, Path: u.Path, RawPath: u.RawPath, RawQuery: u.RawQuery}
	if m.basePath != "" {
		rebase(m, out.URL)
	}
	out.RequestURI = ""
	out.Close = false
	out.Trailer = nil
	out.Body = nil
	if c.body != nil {
		out.Body = io.NopCloser(bytes.NewReader(c.body))
	}

	// Direct map operations with canonical keys: each function call costs under Yaegi.
	h := out.Header
	if c.full {
		fullHeaders(c, out)
	} else {
		for _, name := range hopHeaders {
			delete(h, name)
		}
		h[loopHeader] = ownLoop // it arrived without one
		if m.metrics {
			c.began = time.Now() // for the histogram (fullHeaders times the other copies)
		}
	}
	// Traefik's transport asks the primary for gzip when the client did not say; so does the copy.
	if h["Accept-Encoding"] == nil && h["Range"] == nil && out.Method != "HEAD" {
		h["Accept-Encoding"] = gzipOnly
		c.askedGzip = true
	}
	if h["User-Agent"] == nil {
		h["User-Agent"] = noUserAgent // keep Go's default User-Agent off the copy
	}
	// X-Forwarded-Host, -Proto, -Port and -Server are already there: Traefik's entry point sets
	// them before any middleware runs. X-Forwarded-For is the proxy's, as the primary gets it.
	if ip, _, err := net.SplitHostPort(out.RemoteAddr); err == nil {
		if prior := h["X-Forwarded-For"]; prior != nil {
			ip = forwardedFor(prior, ip)
		}
		h["X-Forwarded-For"] = []string{ip}
	}
	if m.record != nil {
		keepRecord(m, c, out, u)
	}
	h[markerHeader] = m.marker
	if m.shape {
		shape(m, h, out)
	} else {
		out.Host = m.host
	}
	resp, err := m.transport.RoundTrip(out)
	if err == nil && uint(resp.StatusCode-200) < 300 && !c.follows {
		_, _ = io.CopyN(io.Discard, resp.Body, maxDrain)
		_ = resp.Body.Close()
		c.code = resp.StatusCode // counted in settle
		c.outcome = sent
	} else {
		ended(m, c, out, resp, err)
	}
	c.cancel()
}

// rebase puts the mirror's own path before the request's.
func rebase(m *mirror, u *url.URL) {
	escaped := u.EscapedPath()
	u.Path = m.basePath + u.Path
	u.RawPath = m.baseRawPath + escaped
}

// fullHeaders does for a copy that serve's short path did not take what that path needs not:
// the body's length as the copy sends it, the headers that Connection names removed, TE kept
// (as trailers alone) when it holds trailers, as Go's proxy keeps it for the primary, the loop
// tokens it arrived with kept, and the time it is sent (for the comparison's latency and the
// metrics); and what both need: the hop-by-hop headers removed, this process's loop token.
func fullHeaders(c *copyRequest, out *http.Request) {
	c.began = time.Now()
	out.TransferEncoding = nil
	if c.stream != nil {
		out.Body = c.stream // ContentLength stays as the client declared it; -1: chunked
	} else {
		out.ContentLength = int64(len(c.body))
	}
	h := out.Header
	if h["Connection"] != nil {
		removeConnectionHeaders(h)
	}
	te := h["Te"] != nil && teTrailers(h)
	for _, name := range hopHeaders {
		delete(h, name)
	}
	if te {
		h["Te"] = trailersOnly
	}
	h[loopHeader] = loopTokens(h[loopHeader])
}

// forwardedFor appends the client's address to the X-Forwarded-For it arrived with.
func forwardedFor(prior []string, ip string) string {
	return strings.Join(prior, ", ") + ", " + ip
}

// ended handles every answer but the common one: a connection error or an answer of 500 or more
// (retried when retries allow), a 1xx, a compared answer.
func ended(m *mirror, c *copyRequest, out *http.Request, resp *http.Response, err error) {
	ctx := out.Context()
	if err != nil || resp.StatusCode >= 500 && m.retries > 0 {
		resp, err = retry(ctx, m, c, out, resp, err) //nolint:bodyclose // answered closes it
	}
	if err == nil {
		err = answered(ctx, m, c, resp)
	}
	if c.stream != nil {
		// The exchange is over, whether the mirror read the whole body or not: the primary
		// goes on alone. A copy that failed because its body was cut counts as such.
		c.stream.stop()
		if o, why := c.stream.result(); err != nil && o != sent {
			c.outcome = o
			err = why
		}
	}
	if err != nil {
		fail(m, c, err)
	}
}

// answered counts the mirror's answer and reads it, at most maxDrain bytes of it so that its
// connection can be reused (or what the comparison captures), and closes it.
func answered(ctx context.Context, m *mirror, c *copyRequest, resp *http.Response) error {
	if resp.StatusCode < 200 {
		// A final 1xx (101 Switching Protocols): Go's client hands back the connection as the
		// body, which the copy's deadline no longer bounds. A copy is never upgraded.
		if m.metrics {
			countCode(m.st, resp.StatusCode)
		}
		_ = resp.Body.Close()
		return fmt.Errorf("mirror answered %s to a copy, which is never upgraded", resp.Status)
	}
	c.code = resp.StatusCode // counted in settle
	if c.capture != nil {
		compareAnswer(ctx, m, c, resp)
	} else {
		_, _ = io.CopyN(io.Discard, resp.Body, maxDrain)
	}
	_ = resp.Body.Close()
	if resp.StatusCode >= 500 {
		return fmt.Errorf("mirror answered %s", resp.Status)
	}
	c.outcome = sent
	return nil
}

// retry resends a copy after a connection error or a 502, 503 or 504, up to retries times,
// after a jittered backoff, while its deadline allows; the last answer or error stands. The body
// is the same bytes each time.
func retry(ctx context.Context, m *mirror, c *copyRequest, out *http.Request, resp *http.Response, err error) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		if err == nil && resp.StatusCode != http.StatusBadGateway && resp.StatusCode != http.StatusServiceUnavailable &&
			resp.StatusCode != http.StatusGatewayTimeout {
			return resp, nil
		}
		// 25 ms, 50 ms, 100 ms, ... each between half and one and a half of that.
		backoff := time.Duration(float64(25*time.Millisecond<<attempt) * (0.5 + rand.Float64()))
		// A streamed copy is not sent again: its body is gone.
		if deadline, _ := ctx.Deadline(); attempt == m.retries || c.stream != nil || ctx.Err() != nil || time.Until(deadline) < backoff {
			return resp, err
		}
		if err == nil { // this answer is not the last: count it and let it go (answered counts the last)
			if m.metrics {
				countCode(m.st, resp.StatusCode)
			}
			_, _ = io.CopyN(io.Discard, resp.Body, maxDrain)
			_ = resp.Body.Close()
		}
		// A plain sleep, within the deadline (checked above): no select, which Yaegi v0.16.1 runs
		// with one set of cases shared by every goroutine executing the statement.
		time.Sleep(backoff)
		atomic.AddInt64(&m.st.retries, 1)
		again := out.Clone(ctx)
		if c.body != nil {
			again.Body = io.NopCloser(bytes.NewReader(c.body))
		}
		resp, err = m.transport.RoundTrip(again)
	}
}

// fail keeps the error of a copy that failed, naming the mirror. After a refused, unreachable
// or unresolvable mirror (net.OpError "dial ..."), copies pause instead of trying every request.
// (errors.As cannot be used under Yaegi.)
func fail(m *mirror, c *copyRequest, err error) {
	c.err = fmt.Errorf("%s: %w", m.base, err)
	if strings.HasPrefix(err.Error(), "dial ") && m.st.paused.CompareAndSwap(false, true) {
		pause(m.st, true)
		st := m.st
		time.AfterFunc(dialPause, func() { pause(st, false) })
	}
}

// settle is deferred by send: a panic in a goroutine the plugin started would kill Traefik. It
// gives the slot back, and counts the copy (and, with metrics, how long it took).
func settle(m *mirror, c *copyRequest) {
	if r := recover(); r != nil {
		c.outcome = failed
		c.err = panicked(r) // not in a tuple assignment: see serveCompared
	}
	atomic.AddInt64(&m.st.inflight, -1)
	if m.metrics {
		measured(m, c)
	}
	if c.err != nil {
		count(m.st, c.outcome, c.err)
		return
	}
	atomic.AddInt64(&m.st.counts[c.outcome], 1) // count's common case, inline
	if !m.st.pending.Load() {
		schedule(m.st)
	}
}

func panicked(r any) error { return fmt.Errorf("panic: %v", r) }

// measured counts, for the metrics, a copy's duration in the histogram and, if the mirror
// answered it, the answer's status and the body bytes sent. (Only with metricsAddress: an option
// that is not configured costs nothing per copy.)
func measured(m *mirror, c *copyRequest) {
	d := int64(time.Since(c.began))
	b := 0 // the bucket: a loop of comparisons allocates nothing, a call into compiled code does
	for b < len(durationBounds) && d > durationBounds[b] {
		b++
	}
	st := m.st
	st.measures.Lock()
	if c.code != 0 {
		st.codes[c.code]++ // Go's client reads three digits only
		st.copiedBytes += int64(len(c.body))
		if c.stream != nil {
			st.copiedBytes += c.stream.copied()
		}
	}
	st.durations[b]++
	st.durationSum += d
	st.measures.Unlock()
}

// shape applies removeHeaders, then setHeaders, then preserveHost: the copy goes to the mirror's
// host, or keeps the request's.
func shape(m *mirror, h http.Header, out *http.Request) {
	for _, name := range m.removeHeaders {
		delete(h, name)
	}
	for name, values := range m.setHeaders {
		h[name] = values // shared, never modified in place
	}
	if v := m.setHeaders[loopHeader]; v != nil { // loop protection is not optional
		h[loopHeader] = loopTokens(v)
	}
	if !m.preserveHost {
		out.Host = m.host
	}
}

// removeConnectionHeaders removes the headers that Connection names.
func removeConnectionHeaders(h http.Header) {
	for _, f := range h["Connection"] {
		for _, name := range strings.Split(f, ",") {
			h.Del(strings.TrimSpace(name))
		}
	}
}
