package tests

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The tests of issue #17: bodies past bodyBuffer, when maxBodySize allows more, streamed to the
// mirror as the primary reads them, through a real Traefik.

// streamMiddleware is the example's middleware, as the metrics name it.
const streamMiddleware = "mirror-api@file"

// hashed is one request as a hashServer saw it: its body's digest, length and how its read
// ended, never the body itself.
type hashed struct {
	Path          string
	ContentLength int64
	N             int64    // body bytes read
	Sum           [32]byte // SHA-256 of those bytes
	Err           error    // nil: the body was read to its end
	Took          time.Duration
}

// firstBytes is what a hashServer signals when it has read the first bytes of a body.
type firstBytes struct {
	Path string
	At   time.Time
	Head []byte // up to 64 bytes
}

// hashServer is an HTTP server on 127.0.0.1 that hashes every request body as it reads it, so
// that a test of hundreds of MiB holds none of them.
type hashServer struct {
	URL string

	got     chan hashed
	first   chan firstBytes // the first bytes of each body (dropped when nobody listens)
	arrived atomic.Int64    // requests that reached the handler
	fast    atomic.Bool     // stop pacing the reads

	pace   int // bytes per second, 0: as fast as it can
	answer int // answer this status without reading the body, 0: read it, then 200

	seen map[string]hashed // read by wait, in the test's goroutine only
}

func startHashServer(t *testing.T, pace, answer int) *hashServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &hashServer{
		URL: "http://" + l.Addr().String(), got: make(chan hashed, 64), first: make(chan firstBytes, 64),
		pace: pace, answer: answer, seen: map[string]hashed{},
	}
	srv := &http.Server{Handler: http.HandlerFunc(s.serve), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return s
}

func (s *hashServer) serve(rw http.ResponseWriter, r *http.Request) {
	s.arrived.Add(1)
	if s.answer != 0 {
		rw.Header().Set("Connection", "close")
		rw.WriteHeader(s.answer)
		return
	}
	began := time.Now()
	h := sha256.New()
	buf := make([]byte, 32<<10)
	if s.pace > 0 {
		buf = buf[:16<<10]
	}
	rec := hashed{Path: r.URL.Path, ContentLength: r.ContentLength}
	for {
		if s.pace > 0 && !s.fast.Load() {
			time.Sleep(time.Second * time.Duration(len(buf)) / time.Duration(s.pace)) // the mirror's pace
		}
		k, err := r.Body.Read(buf)
		if k > 0 && rec.N == 0 {
			select {
			case s.first <- firstBytes{Path: rec.Path, At: time.Now(), Head: bytes.Clone(buf[:min(k, 64)])}:
			default:
			}
		}
		_, _ = h.Write(buf[:k])
		rec.N += int64(k)
		if err != nil {
			if err != io.EOF {
				rec.Err = err
			}
			break
		}
	}
	h.Sum(rec.Sum[:0])
	rec.Took = time.Since(began)
	s.got <- rec
	if rec.Err == nil {
		_, _ = io.WriteString(rw, "ok")
	}
}

// wait returns the record of the request to path, waiting at most within for it.
func (s *hashServer) wait(t *testing.T, path string, within time.Duration) hashed {
	t.Helper()
	deadline := time.After(within)
	for {
		if rec, ok := s.seen[path]; ok {
			delete(s.seen, path)
			return rec
		}
		select {
		case rec := <-s.got:
			s.seen[rec.Path] = rec
		case <-deadline:
			t.Fatalf("%s: no request to %s within %s", s.URL, path, within)
		}
	}
}

// pattern is n deterministic bytes (ChaCha8 from a seed), generated as they are read: a body of
// hundreds of MiB that no one holds.
type pattern struct {
	r    *rand.ChaCha8
	left int64
}

func newPattern(seed byte, n int64) *pattern {
	var key [32]byte
	key[0] = seed
	return &pattern{r: rand.NewChaCha8(key), left: n}
}

func (p *pattern) Read(b []byte) (int, error) {
	if p.left == 0 {
		return 0, io.EOF
	}
	if int64(len(b)) > p.left {
		b = b[:p.left]
	}
	_, _ = p.r.Read(b)
	p.left -= int64(len(b))
	return len(b), nil
}

// patternSum is the SHA-256 of a pattern.
func patternSum(seed byte, n int64) [32]byte {
	var sum [32]byte
	h := sha256.New()
	_, _ = io.Copy(h, newPattern(seed, n))
	h.Sum(sum[:0])
	return sum
}

// streamE2E is a real Traefik whose example router copies with maxBodySize -1 (and the given
// options) from a hashing primary to a hashing mirror.
type streamE2E struct {
	*e2e
	primary, mirror *hashServer
}

// startStreamE2E starts the servers and Traefik. The copy's timeout is 30 s: a streamed copy
// lasts as long as its upload, and must not be ended by the example's 5 s.
func startStreamE2E(t *testing.T, mirror *hashServer, options map[string]any, plain bool) *streamE2E {
	t.Helper()
	if testing.Short() {
		t.Skip("real Traefik tests are skipped in -short mode")
	}
	s := &streamE2E{primary: startHashServer(t, 0, 0), mirror: mirror}
	if s.mirror == nil {
		s.mirror = startHashServer(t, 0, 0)
	}
	o := map[string]any{"url": s.mirror.URL, "maxBodySize": -1, "timeout": "30s"}
	for k, v := range options {
		o[k] = v
	}
	d := exampleDynamic(t)
	d.Service("primary", s.primary.URL)
	d.Mirror("mirror-api", o)
	routers := []string{"api"}
	if plain {
		d.Router("plain", "/plain", "primary") // the same primary, without the middleware
		routers = append(routers, "plain")
	}
	s.e2e = hcStartE2E(t, d, routers...)
	return s
}

// upload sends n bytes of pattern seed to path, with its Content-Length or chunked, and
// returns how long until its answer was read.
func (s *streamE2E) upload(t *testing.T, path string, seed byte, n int64, chunked bool) time.Duration {
	t.Helper()
	r := harness.Do(s.client, s.uploadRequest(t, path, seed, n, chunked))
	require.NoError(t, r.Err, path)
	require.Equal(t, http.StatusOK, r.Status, path)
	return r.Latency
}

func (s *streamE2E) uploadRequest(t *testing.T, path string, seed byte, n int64, chunked bool) *http.Request {
	t.Helper()
	req := s.request(t, http.MethodPut, path, newPattern(seed, n))
	req.ContentLength = n
	if chunked {
		req.ContentLength = -1
	}
	return req
}

// outcomes are the middleware's outcome counts.
func (s *streamE2E) outcomes(t *testing.T) map[string]float64 {
	t.Helper()
	return mustScrape(t, s.traefik.MetricsURL).outcomes(streamMiddleware)
}

// waitOutcome waits until the middleware has counted want copies of outcome.
func (s *streamE2E) waitOutcome(t *testing.T, outcome string, want float64) {
	t.Helper()
	waitScrape(t, s.traefik.MetricsURL, func(sc *scrape) bool { return sc.outcome(streamMiddleware, outcome) >= want },
		fmt.Sprintf("%v copies counted %s", want, outcome))
}

// checkWhole requires the request to path to have reached both servers whole.
func (s *streamE2E) checkWhole(t *testing.T, path string, seed byte, n int64) {
	t.Helper()
	want := patternSum(seed, n)
	for _, srv := range []struct {
		name string
		hs   *hashServer
	}{{"primary", s.primary}, {"mirror", s.mirror}} {
		rec := srv.hs.wait(t, path, 30*time.Second)
		assert.NoError(t, rec.Err, "%s %s: the body's read", srv.name, path)
		assert.Equal(t, n, rec.N, "%s %s: bytes", srv.name, path)
		assert.Equal(t, want, rec.Sum, "%s %s: SHA-256", srv.name, path)
	}
}

func (s *streamE2E) peakRSS(t *testing.T) int64 {
	t.Helper()
	st, err := s.traefik.Stats()
	require.NoError(t, err)
	return st.PeakRSS
}

// warmUp streams one body of each kind through the copy, so that the peak taken after it is
// Traefik's with the streaming path loaded (the interpreter, the connections, a ring).
func (s *streamE2E) warmUp(t *testing.T) {
	t.Helper()
	for i, chunked := range []bool{false, true} {
		path := fmt.Sprintf("/warm/%d", i)
		s.upload(t, path, 200+byte(i), 8<<20, chunked)
		s.checkWhole(t, path, 200+byte(i), 8<<20)
	}
	s.waitOutcome(t, "sent", 2)
}

// Item 1. With maxBodySize -1, uploads far larger than bodyBuffer reach the primary and the mirror
// byte-identical, and Traefik's peak memory grows by a fraction of them.
func TestTraefikStreamLargeUploads(t *testing.T) {
	t.Run("200MiB", func(t *testing.T) {
		const size = 200 << 20
		s := startStreamE2E(t, nil, nil, false)
		s.warmUp(t)
		before := s.peakRSS(t)
		for i, chunked := range []bool{false, true} {
			path := fmt.Sprintf("/big/%d", i)
			took := s.upload(t, path, byte(i), size, chunked)
			s.checkWhole(t, path, byte(i), size)
			t.Logf("200 MiB, chunked=%v: %v (%.0f MiB/s); peak RSS now %d MiB", chunked, took.Round(time.Millisecond),
				float64(size>>20)/took.Seconds(), s.peakRSS(t)>>20)
		}
		s.waitOutcome(t, "sent", 4)
		after := s.peakRSS(t)
		t.Logf("peak RSS %d MiB before, %d MiB after two 200 MiB uploads (+%d MiB); outcomes %v",
			before>>20, after>>20, (after-before)>>20, s.outcomes(t))
		assert.Less(t, after-before, int64(64<<20), "peak RSS grew by %d MiB", (after-before)>>20)
	})

	// Six at once keep the two cores of a small machine busy: the copies then fall behind the
	// primaries now and then, and the primaries wait for them (2 to 553 ms in all per 32 MiB
	// upload, measured). With the default streamStall every copy still arrives whole.
	t.Run("6x32MiB", func(t *testing.T) { streamConcurrentUploads(t, "") })
}

// streamConcurrentUploads sends six 32 MiB uploads at once, half of them chunked, through a
// fresh Traefik whose middleware has streamStall stall ("": the default).
func streamConcurrentUploads(t *testing.T, stall string) {
	const size, n = 32 << 20, 6
	var options map[string]any
	if stall != "" {
		options = map[string]any{"streamStall": stall}
	}
	s := startStreamE2E(t, nil, options, false)
	s.warmUp(t)
	before := s.peakRSS(t)
	reqs := make([]*http.Request, n)
	for i := range reqs {
		reqs[i] = s.uploadRequest(t, fmt.Sprintf("/concurrent/%d", i), byte(10+i), size, i%2 == 1)
	}
	began := time.Now()
	results := harness.Run(s.client, n, n, func(i int) *http.Request { return reqs[i] })
	took := time.Since(began)
	require.Equal(t, 0, harness.Failures(results), "first result: %+v", results[0])
	for i := range reqs {
		s.checkWhole(t, fmt.Sprintf("/concurrent/%d", i), byte(10+i), size)
	}
	s.waitOutcome(t, "sent", 2+n)
	after := s.peakRSS(t)
	t.Logf("%d concurrent uploads of 32 MiB in %v; peak RSS %d MiB before, %d MiB after (+%d MiB); outcomes %v",
		n, took.Round(time.Millisecond), before>>20, after>>20, (after-before)>>20, s.outcomes(t))
	assert.Less(t, after-before, int64(96<<20), "peak RSS grew by %d MiB", (after-before)>>20)
}

// Item 2. The copy leaves with the primary: the mirror reads the first bytes of an 8 MiB body
// while the client still holds back its second half.
func TestTraefikStreamCopyLeavesWithThePrimary(t *testing.T) {
	const size = 8 << 20
	s := startStreamE2E(t, nil, nil, false)
	body := randomBytes(t, size)
	pr, pw := io.Pipe()
	t.Cleanup(func() { _ = pw.CloseWithError(errors.New("the test ended")) })
	req := s.request(t, http.MethodPost, "/two-halves", pr)
	req.ContentLength = size
	done := make(chan harness.Result, 1)
	began := time.Now()
	go func() { done <- harness.Do(s.client, req) }()

	wrote := make(chan error, 1)
	go func() { _, err := pw.Write(body[:size/2]); wrote <- err }()
	var first firstBytes
	select {
	case first = <-s.mirror.first:
	case <-time.After(waitLimit):
		t.Fatalf("no byte of the copy reached the mirror within %s while the client held back the second half", waitLimit)
	}
	assert.Equal(t, "/two-halves", first.Path)
	assert.Equal(t, body[:len(first.Head)], first.Head, "the copy's first bytes")
	select {
	case err := <-wrote:
		require.NoError(t, err)
	case <-time.After(waitLimit):
		t.Fatalf("the first half was not taken within %s", waitLimit)
	}
	heldBack := time.Now()
	t.Logf("the mirror read the copy's first bytes %v after the upload began; the second half is sent %v after it",
		first.At.Sub(began).Round(time.Millisecond), heldBack.Sub(first.At).Round(time.Millisecond))

	go func() {
		_, err := pw.Write(body[size/2:])
		_ = pw.CloseWithError(err)
	}()
	select {
	case r := <-done:
		require.NoError(t, r.Err)
		require.Equal(t, http.StatusOK, r.Status)
	case <-time.After(waitLimit):
		t.Fatalf("no answer within %s of the second half", waitLimit)
	}
	want := sha256.Sum256(body)
	for name, hs := range map[string]*hashServer{"primary": s.primary, "mirror": s.mirror} {
		rec := hs.wait(t, "/two-halves", waitLimit)
		assert.NoError(t, rec.Err, name)
		assert.Equal(t, int64(size), rec.N, name)
		assert.Equal(t, want, rec.Sum, "%s: SHA-256", name)
	}
	s.waitOutcome(t, "sent", 1)
}

// Item 3. A mirror reading at 256 KiB/s holds a 16 MiB upload back by streamStall at most; its
// copy is cut, counted, and ends in an error at the mirror.
func TestTraefikStreamSlowMirrorIsCut(t *testing.T) {
	const size = 16 << 20
	const stall = 200 * time.Millisecond
	slow := startHashServer(t, 256<<10, 0)
	s := startStreamE2E(t, slow, map[string]any{"streamStall": stall.String()}, true)

	// Without the middleware, in the same Traefik: a first upload warms up the connections.
	s.upload(t, "/plain/warm", 1, size, false)
	s.primary.wait(t, "/plain/warm", waitLimit)
	baseline := s.upload(t, "/plain/baseline", 2, size, false)
	s.checkPrimary(t, "/plain/baseline", 2, size)

	took := s.upload(t, "/slow", 3, size, false)
	s.checkPrimary(t, "/slow", 3, size)
	t.Logf("16 MiB: %v without the middleware, %v with a mirror reading at 256 KiB/s (streamStall %v)",
		baseline.Round(time.Millisecond), took.Round(time.Millisecond), stall)
	assert.Less(t, took, baseline+stall+1500*time.Millisecond, "the primary's request was held back by the mirror")

	// The copy is counted once its exchange ends: the cut ends its body in an error, which the
	// transport reads only when its blocked write to the mirror returns, once the mirror has
	// drained part of the kernel's buffers (about 5 s at this pace; a mirror that reads nothing
	// ends at the copy's timeout). Only then is it fast.
	cutAt := time.Now()
	s.waitOutcome(t, "cut", 1)
	t.Logf("the cut was counted %v after the primary's answer", time.Since(cutAt).Round(time.Millisecond))
	slow.fast.Store(true) // what the kernel buffered of the cut copy would take long at that pace
	rec := slow.wait(t, "/slow", waitLimit)
	t.Logf("the mirror read %d of %d bytes in %v, then: %v", rec.N, size, rec.Took.Round(time.Millisecond), rec.Err)
	assert.Error(t, rec.Err, "the cut copy's body read to its end at the mirror")
	assert.Less(t, rec.N, int64(size), "the mirror read the whole body of a cut copy")
	assert.Equal(t, int64(size), rec.ContentLength, "the copy's Content-Length")
	got := s.outcomes(t)
	assert.Equal(t, expectOutcomes(map[string]float64{"cut": 1}), got)
}

// checkPrimary requires the request to path to have reached the primary whole.
func (s *streamE2E) checkPrimary(t *testing.T, path string, seed byte, n int64) {
	t.Helper()
	rec := s.primary.wait(t, path, waitLimit)
	assert.NoError(t, rec.Err, "primary %s", path)
	assert.Equal(t, n, rec.N, "primary %s: bytes", path)
	assert.Equal(t, patternSum(seed, n), rec.Sum, "primary %s: SHA-256", path)
}

// Item 4. A mirror that answers 413 without reading ends its copy: the primary gets the whole
// body, and the next copy is sent.
func TestTraefikStreamMirrorAnswersEarly(t *testing.T) {
	const size = 16 << 20
	refusing := startHashServer(t, 0, http.StatusRequestEntityTooLarge)
	s := startStreamE2E(t, refusing, nil, false)
	for i := 1; i <= 2; i++ {
		path := fmt.Sprintf("/early/%d", i)
		took := s.upload(t, path, byte(i), size, false)
		s.checkPrimary(t, path, byte(i), size)
		s.waitOutcome(t, "sent", float64(i))
		t.Logf("%s: %v", path, took.Round(time.Millisecond))
	}
	assert.Equal(t, int64(2), refusing.arrived.Load(), "copies that reached the mirror")
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": 2}), s.outcomes(t))
	codes, _ := mustScrape(t, s.traefik.MetricsURL).value("traefik_mirror_responses_total",
		map[string]string{"middleware": streamMiddleware, "code": "413"})
	assert.Equal(t, 2.0, codes, "answers 413 counted")
}

// Item 5. A client that goes away 4 MiB into a 16 MiB body leaves the mirror an incomplete
// request, and Traefik serving.
func TestTraefikStreamClientGoneMidBody(t *testing.T) {
	const size = 16 << 20
	s := startStreamE2E(t, nil, nil, false)
	c := dialRaw(t, s.e2e)
	c.send(t, fmt.Sprintf("POST /gone HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", size))
	_, err := io.Copy(c, newPattern(5, 4<<20))
	require.NoError(t, err)
	require.NoError(t, c.Close())

	rec := s.mirror.wait(t, "/gone", waitLimit)
	t.Logf("the mirror read %d of %d bytes, then: %v", rec.N, size, rec.Err)
	assert.Error(t, rec.Err, "the copy's body read to its end at the mirror")
	assert.Less(t, rec.N, int64(size), "a complete copy reached the mirror")
	p := s.primary.wait(t, "/gone", waitLimit)
	t.Logf("the primary read %d bytes, then: %v", p.N, p.Err)

	s.waitOutcome(t, "skipped", 1)
	s.upload(t, "/after", 6, 4<<20, false)
	s.checkWhole(t, "/after", 6, 4<<20)
	s.waitOutcome(t, "sent", 1)
	assert.Equal(t, expectOutcomes(map[string]float64{"skipped": 1, "sent": 1}), s.outcomes(t))
	assert.True(t, s.traefik.Running())
}

// Item 6. An empty chunked POST is copied, with an empty body.
func TestTraefikStreamEmptyChunkedBody(t *testing.T) {
	s := startStreamE2E(t, nil, nil, false)
	c := dialRaw(t, s.e2e)
	c.send(t, "POST /empty HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
	assert.Equal(t, http.StatusOK, c.status(t))
	empty := sha256.Sum256(nil)
	for name, hs := range map[string]*hashServer{"primary": s.primary, "mirror": s.mirror} {
		rec := hs.wait(t, "/empty", waitLimit)
		assert.NoError(t, rec.Err, name)
		assert.Zero(t, rec.N, name)
		assert.Equal(t, empty, rec.Sum, name)
		t.Logf("%s: Content-Length %d", name, rec.ContentLength)
	}
	s.waitOutcome(t, "sent", 1)
	assert.Equal(t, expectOutcomes(map[string]float64{"sent": 1}), s.outcomes(t))
}
