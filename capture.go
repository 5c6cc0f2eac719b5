package mirror

import (
	"context"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

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
	url   *url.URL // the request's, as the primary got it (send replaces the copy's)

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
	cmp := m.compare
	if cmp.share < 1 && rand.Float64() >= cmp.share {
		return false
	}
	w := &capture{limit: cmp.maxBodySize, url: c.req.URL}
	w.answered, w.done = context.WithCancel(context.Background())
	c.capture = w
	c.follows = true
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
