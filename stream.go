package mirror

import (
	"errors"
	"io"
	"sync"
	"time"
)

// stream carries to the mirror a body that grew past bodyBuffer, as the primary reads it. The
// tee writes what the primary reads into a ring of bodyBuffer bytes; a pump goroutine writes the
// ring out through a pipe, which the copy's transport reads (a standard-library reader: compiled
// code never calls into an interpreted one per chunk). When the ring is full, the primary's read
// waits for room, at most streamStall in all per request; once that is spent, the copy is cut at
// once and the primary goes on at full speed. A cut copy's body ends in an error, so that the
// mirror sees a request that did not finish (a body shorter than its Content-Length, or a chunked
// body without its last chunk, then the connection closed), never a complete one that differs.
//
// No select (see PLUGIN-FACTS: Yaegi v0.16.1 shares a select's cases between goroutines): one
// mutex and one condition, and a timer that wakes a waiting writer when its budget is spent.
type stream struct {
	mu   sync.Mutex
	cond *sync.Cond // something changed: room, bytes, the end

	ring  []byte
	r, n  int   // the bytes not yet handed to the transport: n of them from ring[r], wrapping
	total int64 // bytes the primary read, for maxBodySize
	sent  int64 // bytes handed to the transport
	limit int64 // maxBodySize, -1: none

	stall time.Duration // what is left of the primary's waiting
	wait  int           // which wait a firing timer ends: a late timer ends no later wait
	woken bool          // the current wait's budget is spent

	end     error   // io.EOF: the body is complete; otherwise why the copy was cut
	outcome outcome // how a copy that did not end with its body counts
	stopped bool    // the copy ended from its side (an answer, an error): nothing more goes out

	pr *io.PipeReader // the copy's body
	pw *io.PipeWriter
}

// errStopped ends the pipe of a copy that ended before its body: the mirror answered early, or
// the copy failed.
var errStopped = errors.New("the copy ended before its body")

// newStream starts a stream with the bytes held so far, and its pump.
func newStream(m *mirror, held []byte) *stream {
	s := &stream{ring: make([]byte, m.bodyBuffer), limit: m.maxBodySize, stall: m.streamStall, outcome: sent}
	s.cond = sync.NewCond(&s.mu)
	s.n = copy(s.ring, held)
	s.total = int64(s.n)
	s.pr, s.pw = io.Pipe()
	go pump(s)
	return s
}

// write puts what the primary read on the ring, waiting for room within the stall budget. It
// never fails the primary: a copy that cannot follow is cut, and what comes after is dropped.
func (s *stream) write(b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.end != nil || s.stopped {
		return
	}
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
		s.cond.Broadcast()
	}
}

// waitForRoom waits, within what is left of the budget, until the pump has made room or the
// stream ended; it says whether the primary may go on writing.
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

// cut ends the copy's body in an error, counted as outcome. The caller holds mu.
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
	s.mu.Unlock()
}

// stop ends the stream from the copy's side, once its exchange is over: nothing more is sent or
// waited for, and the pump ends.
func (s *stream) stop() {
	s.mu.Lock()
	s.stopped = true
	s.cond.Broadcast()
	s.mu.Unlock()
	_ = s.pr.CloseWithError(errStopped)
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

// copied is how many body bytes were handed to the copy's transport.
func (s *stream) copied() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sent
}

// pump hands the ring's bytes to the pipe in the order they came. It runs until the body is
// complete and written, the copy is cut (at once: what is pending is not sent), or the copy
// ended from its side.
func pump(s *stream) {
	defer func() { _ = recover() }() // a panic in a goroutine the plugin started would kill Traefik
	s.mu.Lock()
	for {
		for s.n == 0 && s.end == nil && !s.stopped {
			s.cond.Wait()
		}
		if s.stopped || s.end != nil && s.end != io.EOF || s.n == 0 {
			end := s.end
			s.mu.Unlock()
			if end == io.EOF {
				_ = s.pw.Close()
			} else {
				_ = s.pw.CloseWithError(pipeError(end))
			}
			return
		}
		k := s.n
		if s.r+k > len(s.ring) {
			k = len(s.ring) - s.r
		}
		chunk := s.ring[s.r : s.r+k] // the writer does not touch it until n drops
		s.mu.Unlock()
		_, err := s.pw.Write(chunk) // returns once the transport has read it all
		s.mu.Lock()
		s.r = (s.r + k) % len(s.ring)
		s.n -= k
		s.sent += int64(k)
		s.cond.Broadcast()
		if err != nil { // the transport stopped reading: the copy is over
			s.stopped = true
		}
	}
}

// pipeError is what the copy's transport reads when its body ends in an error.
func pipeError(end error) error {
	if end == nil {
		return errStopped
	}
	return end
}
