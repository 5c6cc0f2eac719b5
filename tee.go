package mirror

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// tee copies a body as the primary reads it, once it has a slot. The copy's deadline started
// with it: a body that is not complete by then is abandoned, so that no client holds a slot
// longer than timeout.
func tee(m *mirror, req *http.Request, c *copyRequest) *copyRequest {
	if !acquire(m) {
		c.cancel()
		return nil
	}
	if m.compare != nil {
		prepareCompare(m, c)
	}
	t := &teeBody{body: req.Body, m: m, c: c}
	t.mu.Lock()
	t.timer = time.AfterFunc(m.timeout, t.expire)
	t.mu.Unlock()
	c.tee = t
	req.Body = t
	return c
}

// teeBody keeps a copy of a body while the primary reads it, and sends the mirror copy when the
// primary has read it all; or, once the body grows past bodyBuffer and maxBodySize allows more,
// sends the copy at once and streams the rest of the body to it (see stream).
type teeBody struct {
	body io.ReadCloser
	m    *mirror
	c    *copyRequest

	mu     sync.Mutex // the proxy may read the body from another goroutine
	done   bool       // the copy no longer follows the body here: sent, streaming or abandoned
	timer  *time.Timer
	stream *stream // set once, under mu, when the body started to stream
}

func (t *teeBody) Read(p []byte) (int, error) {
	n, err := t.body.Read(p)
	if s := t.observe(p[:n], err); s != nil {
		// Streaming: outside mu, since the write may wait (boundedly) for the mirror.
		s.write(p[:n])
		switch {
		case err == io.EOF:
			s.finish(io.EOF, sent)
		case err != nil:
			s.finish(fmt.Errorf("the client's body broke off: %w", err), skipped)
		}
	}
	return n, err
}

func (t *teeBody) Close() error {
	t.abandon()
	return t.body.Close()
}

// observe keeps what the primary read, and says which stream it goes to once the body streams.
func (t *teeBody) observe(b []byte, err error) *stream {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stream != nil {
		if err != nil {
			t.done = true // the body ends here; abandon has nothing to do
		}
		return t.stream
	}
	if t.done {
		return nil
	}
	if limit := t.m.maxBodySize; limit >= 0 && int64(len(t.c.body)+len(b)) > limit {
		t.finish(tooLarge)
		return nil
	}
	if t.m.streams && len(t.c.body)+len(b) > t.m.bodyBuffer {
		// Too large to hold: the copy leaves now with what came, and the rest follows it.
		t.stream = newStream(t.m, t.c.body, t.c.cancel)
		t.c.stream = t.stream
		t.c.follows = true
		if t.m.record != nil && !t.m.record.differences { // a streamed copy is never compared
			t.c.head = t.c.body
		}
		t.c.body = nil
		t.timer.Stop() // the copy's own deadline bounds it from here
		go send(t.m, t.c)
		if err != nil {
			t.done = true
		}
		return t.stream
	}
	t.c.body = append(t.c.body, b...)
	switch {
	case err == io.EOF:
		t.done = true
		t.timer.Stop()
		go send(t.m, t.c)
	case err != nil:
		t.finish(skipped)
	}
	return nil
}

// abandon ends a copy whose body the primary did not read to the end.
func (t *teeBody) abandon() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done {
		return
	}
	if t.stream != nil {
		t.done = true
		t.stream.finish(errors.New("the primary did not read the body to the end"), skipped)
		return
	}
	t.finish(skipped)
}

// expire runs in a timer's goroutine when the body was not complete within timeout.
func (t *teeBody) expire() {
	defer func() { _ = recover() }() // a panic here would kill Traefik
	t.abandon()
}

func (t *teeBody) finish(o outcome) {
	t.done = true
	t.timer.Stop()
	t.c.body = nil
	t.c.cancel()
	atomic.AddInt64(&t.m.st.inflight, -1)
	count(t.m.st, o, nil)
}
