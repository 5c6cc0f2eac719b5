// Package floor is the least interpreted work a Yaegi middleware can do to copy a request: read
// the body once, hand a clone of the request to a compiled transport in a goroutine, drain the
// answer. No limits, counters, filters, deadline or recover: it is not a product but a measuring
// stick for what any mirroring plugin costs (the load benchmark's floor mode and
// BenchmarkYaegiServeHTTP/floor_POST_1KiB). Standard library only, in the Go that Yaegi v0.16.1
// runs.
package floor

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
)

// preallocLimit bounds the buffer made from a declared Content-Length before any of the body
// has arrived: a larger body is read with io.ReadAll, which grows only with what comes.
const preallocLimit = 16 << 20

// Config holds the mirror's URL (scheme and host; the copy keeps the request's path and query).
// Guarded builds the guarded floor instead (guarded.go).
type Config struct {
	URL     string
	Guarded bool
}

// CreateConfig gives an empty config.
func CreateConfig() *Config { return &Config{} }

// transport is shared by every instance: New runs again on every configuration change, and a
// middleware has no hook to close what it opened.
var transport = newTransport()

func newTransport() *http.Transport {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 1024
	return tr
}

type floor struct {
	next http.Handler
	base *url.URL
}

// New builds the middleware.
func New(_ context.Context, next http.Handler, cfg *Config, name string) (http.Handler, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, err
	}
	if u.Scheme == "" || u.Host == "" {
		return nil, errors.New("floor: url needs a scheme and a host: " + cfg.URL)
	}
	if cfg.Guarded {
		return newGuarded(next, u, name), nil
	}
	return &floor{next: next, base: u}, nil
}

func (f *floor) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	var body []byte
	if req.ContentLength > 0 && req.ContentLength <= preallocLimit {
		// The declared length: one buffer, no growing (io.ReadAll starts at 512 bytes).
		body = make([]byte, req.ContentLength)
		if n, err := io.ReadFull(req.Body, body); err != nil {
			broken(f.next, rw, req, body[:n])
			return
		}
		req.Body = io.NopCloser(bytes.NewReader(body))
	} else if req.ContentLength != 0 && req.Body != nil {
		serveUnsized(f, rw, req)
		return
	}
	go send(f.base, req.Clone(context.Background()), body)
	f.next.ServeHTTP(rw, req)
}

// serveUnsized copies a request whose body has no declared length, or a very large one. The
// rare paths are functions of their own, not branches of ServeHTTP: Yaegi allocates a value for
// every expression of a function on each call, taken or not. Plain functions, not methods: a
// call of an interpreted method costs more.
func serveUnsized(f *floor, rw http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		broken(f.next, rw, req, body)
		return
	}
	req.Body = io.NopCloser(bytes.NewReader(body))
	go send(f.base, req.Clone(context.Background()), body)
	f.next.ServeHTTP(rw, req)
}

// broken serves a request whose body broke off: the primary reads what came, then the same
// error; nothing is copied.
func broken(next http.Handler, rw http.ResponseWriter, req *http.Request, read []byte) {
	req.Body = io.NopCloser(io.MultiReader(bytes.NewReader(read), req.Body))
	next.ServeHTTP(rw, req)
}

// send sends the copy and drains the answer. Its arguments are values, not a closure's captures:
// Yaegi's closures cost more than plain calls.
func send(base *url.URL, out *http.Request, body []byte) {
	out.URL.Scheme = base.Scheme
	out.URL.Host = base.Host
	out.Host = base.Host
	out.RequestURI = ""
	if body != nil {
		out.Body = io.NopCloser(bytes.NewReader(body))
	}
	resp, err := transport.RoundTrip(out)
	if err != nil {
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
}
