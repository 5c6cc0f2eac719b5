package mirror

import (
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
// primary has read it all.
type teeBody struct {
	body io.ReadCloser
	m    *mirror
	c    *copyRequest

	mu    sync.Mutex // the proxy may read the body from another goroutine
	done  bool
	timer *time.Timer
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
	if limit := t.m.maxBodySize; limit >= 0 && int64(len(t.c.body)+len(b)) > limit {
		t.finish(tooLarge)
		return
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
}

// abandon ends a copy whose body the primary did not read to the end.
func (t *teeBody) abandon() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.done {
		t.finish(skipped)
	}
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
