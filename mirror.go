// Package mirror is a Traefik middleware plugin that sends a copy of each request to a second
// upstream, in the background, while the original goes on to its router's service untouched.
package mirror

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sync"
)

// markerHeader is set on every copy; a request that carries it is never copied again.
const markerHeader = "X-Mirrored-By"

type mirror struct {
	next  http.Handler
	name  string
	cfg   settings
	slots chan struct{} // one token per copy in flight
	out   *outcomes
}

// New creates the mirroring middleware.
func New(_ context.Context, next http.Handler, config *Config, name string) (http.Handler, error) {
	cfg, err := compile(config)
	if err != nil {
		return nil, err
	}
	m := &mirror{
		next:  next,
		name:  name,
		cfg:   cfg,
		slots: make(chan struct{}, cfg.maxInflight),
		out:   newOutcomes(name),
	}
	fmt.Printf("mirror %s: copying to %s://%s%s percent=%v mirrorBody=%v maxBodySize=%d timeout=%s maxInflight=%d\n",
		name, cfg.scheme, cfg.host, cfg.basePath, cfg.percent, cfg.mirrorBody, cfg.maxBodySize, cfg.timeout, cfg.maxInflight)
	return m, nil
}

func (m *mirror) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	// Cheap checks first: each "no" is one counted outcome and the request goes straight on.
	if req.Header.Get(markerHeader) != "" || req.Header.Get("Upgrade") != "" || req.Method == http.MethodConnect {
		m.out.count(skipped, nil)
		m.next.ServeHTTP(rw, req)
		return
	}
	if m.cfg.percent < 100 && rand.Float64()*100 >= m.cfg.percent {
		m.out.count(sampledOut, nil)
		m.next.ServeHTTP(rw, req)
		return
	}
	withBody := m.cfg.mirrorBody && req.Body != nil && req.Body != http.NoBody && req.ContentLength != 0
	if withBody && m.cfg.maxBodySize >= 0 && req.ContentLength > m.cfg.maxBodySize {
		m.out.count(tooLarge, nil)
		m.next.ServeHTTP(rw, req)
		return
	}
	select {
	case m.slots <- struct{}{}:
	default:
		m.out.count(dropped, nil)
		m.next.ServeHTTP(rw, req)
		return
	}

	c := captureRequest(req)
	switch {
	case !withBody:
		go m.send(c)

	case req.ContentLength > 0:
		// Known length within the limit: read it once, send the copy now, and give the
		// primary a standard-library reader over the same bytes.
		buf := make([]byte, req.ContentLength)
		n, err := io.ReadFull(req.Body, buf)
		if err != nil {
			// The client cut the body short: the primary sees the same bytes, then the same error.
			req.Body = io.NopCloser(io.MultiReader(bytes.NewReader(buf[:n]), req.Body))
			m.release()
			m.out.count(skipped, nil)
			break
		}
		req.Body = io.NopCloser(bytes.NewReader(buf))
		c.body = buf
		go m.send(c)

	default:
		// Unknown length: never hold the primary back; copy the body as the primary reads it.
		t := &teeBody{body: req.Body, m: m, c: c}
		req.Body = t
		defer t.abandon()
	}

	m.next.ServeHTTP(rw, req)
}

func (m *mirror) release() { <-m.slots }

// teeBody keeps a copy of a body of unknown length while the primary reads it, and sends the
// mirror copy when the primary has read it all.
type teeBody struct {
	body io.ReadCloser
	m    *mirror
	c    *copyRequest

	mu   sync.Mutex // the proxy may read the body from another goroutine
	done bool
}

func (t *teeBody) Read(p []byte) (int, error) {
	n, err := t.body.Read(p)
	t.observe(p[:n], err)
	return n, err
}

func (t *teeBody) Close() error {
	t.abandon()
	return t.body.Close()
}

func (t *teeBody) observe(b []byte, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return
	}
	if limit := t.m.cfg.maxBodySize; limit >= 0 && int64(len(t.c.body)+len(b)) > limit {
		t.finish(tooLarge)
		return
	}
	t.c.body = append(t.c.body, b...)
	switch {
	case err == io.EOF:
		t.done = true
		go t.m.send(t.c)
	case err != nil:
		t.finish(skipped)
	}
}

// abandon ends a copy whose body the primary did not read to the end.
func (t *teeBody) abandon() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.done {
		t.finish(skipped)
	}
}

func (t *teeBody) finish(o outcome) {
	t.done = true
	t.c.body = nil
	t.m.release()
	t.m.out.count(o, nil)
}
