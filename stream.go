package mirror

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"
)

// stream carries to the mirror a body that grew past bodyBuffer, as the primary reads it. The
// tee writes what the primary reads into a ring of bodyBuffer bytes; the copy's transport reads
// the ring (the stream is the copy's body: one interpreted Read per chunk the transport asks for,
// 32 KiB, not per byte). When the ring is full, the primary's read waits for room, at most
// streamStall in all per request; once that is spent, the copy is cut at once (its context is
// cancelled, which closes its connection) and the primary goes on at full speed. A cut copy's
// body ends in an error, so that the mirror sees a request that did not finish (a body shorter
// than its Content-Length, or a chunked body without its last chunk, then the connection
// closed), never a complete one that differs.
//
// No select (see PLUGIN-FACTS: Yaegi v0.16.1 shares a select's cases between goroutines): one
// mutex and one condition, and a timer that wakes a waiting writer when its budget is spent.
type stream struct {
	mu   sync.Mutex
	cond *sync.Cond // something changed: room, bytes, the end

	ring  []byte
	r, n  int   // the bytes not yet read by the transport: n of them from ring[r], wrapping
	total int64 // bytes the primary read, for maxBodySize
	sent  int64 // bytes the transport read
	limit int64 // maxBodySize, -1: none

	stall time.Duration // what is left of the primary's waiting
	wait  int           // which wait a firing timer ends: a late timer ends no later wait
	woken bool          // the current wait's budget is spent

	end     error   // io.EOF: the body is complete; otherwise why the copy was cut
	outcome outcome // how a copy whose body was cut counts
	stopped bool    // the copy's exchange is over (an answer, an error): nothing more is read

	cancel context.CancelFunc // the copy's deadline's: a cut ends the exchange at once
}

// errStopped is what a body read gets once the copy's exchange is over.
var errStopped = errors.New("the copy ended before its body")

// newStream starts a stream with the bytes held so far; cancel ends the copy's exchange.
func newStream(m *mirror, held []byte, cancel context.CancelFunc) *stream {
	s := &stream{ring: make([]byte, m.bodyBuffer), limit: m.maxBodySize, stall: m.streamStall, outcome: sent, cancel: cancel}
	s.cond = sync.NewCond(&s.mu)
	s.n = copy(s.ring, held)
	s.total = int64(s.n)
	return s
}

// write puts what the primary read on the ring, waiting for room within the stall budget. It
// never fails the primary: a copy that cannot follow is cut, and what comes after is dropped.
func (s *stream) write(b []byte) {
	s.mu.Lock()
	if s.end == nil && !s.stopped {
		s.put(b)
	}
	cut := s.end != nil && s.end != io.EOF
	s.mu.Unlock()
	if cut {
		s.cancel()
	}
}

// put is write's work, under mu.
func (s *stream) put(b []byte) {
	if s.limit >= 0 && s.total+int64(len(b)) > s.limit {
		s.cut(errors.New("the body passed maxBodySize while it was streamed"), tooLarge)
		return
	}
	s.total += int64(len(b))
	for len(b) > 0 && s.end == nil && !s.stopped {
		if s.n == len(s.ring) {
			if !s.waitForRoom() {
				s.cut(errors.New("the mirror read the body slower than the primary for streamStall in all"), cut)
			}
			continue
		}
		w := (s.r + s.n) % len(s.ring)
		room := len(s.ring) - w // contiguous
		if free := len(s.ring) - s.n; room > free {
			room = free
		}
		k := copy(s.ring[w:w+room], b)
		s.n += k
		b = b[k:]
		if s.n == k { // the transport may be waiting for bytes
			s.cond.Broadcast()
		}
	}
}

// waitForRoom waits, within what is left of the budget, until the transport has made room or
// the stream ended; it says whether the primary may go on writing. (Any room: a writer that
// waited for half the ring to empty waited longer in all, measured.)
func (s *stream) waitForRoom() bool {
	if s.stall <= 0 {
		return false
	}
	s.wait++
	s.woken = false
	wait := s.wait
	t := time.AfterFunc(s.stall, func() { s.wake(wait) })
	began := time.Now()
	for s.n == len(s.ring) && !s.woken && s.end == nil && !s.stopped {
		s.cond.Wait()
	}
	t.Stop()
	s.stall -= time.Since(began)
	return s.n < len(s.ring) || s.end != nil || s.stopped
}

// wake ends a wait whose budget is spent.
func (s *stream) wake(wait int) {
	s.mu.Lock()
	if s.wait == wait {
		s.woken = true
		s.cond.Broadcast()
	}
	s.mu.Unlock()
}

// cut ends the copy's body in an error, counted as o. The caller holds mu, and cancels the
// copy's exchange once it has let go of it.
func (s *stream) cut(why error, o outcome) {
	if s.end == nil {
		s.end, s.outcome = why, o
		s.cond.Broadcast()
	}
}

// finish ends the body from the primary's side: io.EOF when it is complete, otherwise the copy
// is cut (the client went away, the primary did not read to the end) and counted as o.
func (s *stream) finish(err error, o outcome) {
	s.mu.Lock()
	if err != io.EOF {
		s.cut(err, o)
	} else if s.end == nil {
		s.end = io.EOF
		s.cond.Broadcast()
	}
	cut := s.end != nil && s.end != io.EOF
	s.mu.Unlock()
	if cut {
		s.cancel()
	}
}

// Read gives the copy's transport the bytes in the order they came: it waits for them, and
// ends with io.EOF once the body is complete, or at once with the reason it was cut (what is
// pending is not sent).
func (s *stream) Read(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.n == 0 && s.end == nil && !s.stopped {
		s.cond.Wait()
	}
	switch {
	case s.stopped:
		return 0, errStopped
	case s.end != nil && s.end != io.EOF:
		return 0, s.end
	case s.n == 0:
		return 0, io.EOF
	}
	k := s.n
	if s.r+k > len(s.ring) {
		k = len(s.ring) - s.r
	}
	k = copy(p, s.ring[s.r:s.r+k])
	s.r = (s.r + k) % len(s.ring)
	s.n -= k
	s.sent += int64(k)
	if s.n+k == len(s.ring) { // the ring was full: the writer may be waiting
		s.cond.Broadcast()
	}
	return k, nil
}

// Close is the transport's, once it is done with the body.
func (s *stream) Close() error {
	s.stop()
	return nil
}

// stop ends the stream from the copy's side, once its exchange is over: nothing more is read
// or waited for.
func (s *stream) stop() {
	s.mu.Lock()
	s.stopped = true
	s.cond.Broadcast()
	s.mu.Unlock()
}

// result says how the copy of a stream that failed counts, and why: cut, tooLarge or skipped
// with the reason the body was cut, or sent (nothing to add) when it was not.
func (s *stream) result() (outcome, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.end == nil || s.end == io.EOF {
		return sent, nil
	}
	return s.outcome, s.end
}

// copied is how many body bytes the copy's transport read.
func (s *stream) copied() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sent
}
