package tests

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rawConn is a client connection to Traefik that writes bytes exactly as given, for the
// requests net/http would refuse to send or would send differently.
type rawConn struct {
	net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, e *e2e) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", strings.TrimPrefix(e.traefik.WebURL, "http://"), 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(30*time.Second)))
	return &rawConn{Conn: c, r: bufio.NewReader(c)}
}

func (c *rawConn) send(t *testing.T, s string) {
	t.Helper()
	_, err := io.WriteString(c, s)
	require.NoError(t, err)
}

// status reads the next answer's status line and headers and returns the status code (the
// body is left unread).
func (c *rawConn) status(t *testing.T) int {
	t.Helper()
	line, err := c.r.ReadString('\n')
	require.NoError(t, err)
	f := strings.Fields(line)
	require.GreaterOrEqual(t, len(f), 2, "status line %q", line)
	code, err := strconv.Atoi(f[1])
	require.NoError(t, err, "status line %q", line)
	for {
		h, err := c.r.ReadString('\n')
		require.NoError(t, err)
		if h == "\r\n" {
			return code
		}
	}
}

// entryServer is a primary that reports each request as its handler is entered, before it
// reads the body, then reads the body to its end and answers 200 (or answer's status).
type entryServer struct {
	addr    string
	entered chan string // the request's path
}

func startEntryServer(t *testing.T, answer func(r *http.Request) int) *entryServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &entryServer{addr: l.Addr().String(), entered: make(chan string, 1000)}
	srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		s.entered <- r.URL.Path
		if answer != nil {
			if code := answer(r); code != 0 {
				rw.WriteHeader(code)
				return
			}
		}
		_, _ = io.Copy(io.Discard, r.Body)
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return s
}

func (s *entryServer) waitEntered(t *testing.T, path string) {
	t.Helper()
	deadline := time.After(waitLimit)
	for {
		select {
		case p := <-s.entered:
			if p == path {
				return
			}
		case <-deadline:
			t.Fatalf("the primary's handler was not entered for %s within %s", path, waitLimit)
		}
	}
}

// The copy's URL is the mirror's with the request's path and query: no request target, however
// written, sends a copy to another host. A target that is not a path is not copied at all, and
// the client and the primary see what they see without the middleware.
func TestTraefikCopyGoesOnlyToTheMirror(t *testing.T) {
	attacker, err := harness.StartUpstream("127.0.0.1:0", 100, nil)
	require.NoError(t, err)
	t.Cleanup(attacker.Close)
	d := exampleDynamic(t)
	// Rules without a path matcher: every request target reaches the middleware.
	d.HTTP.Routers["api"] = map[string]any{"rule": "Host(`api.example`) || Header(`X-Route`, `api`)",
		"entryPoints": []string{"web"}, "service": "primary", "middlewares": []string{"mirror-api"}}
	d.HTTP.Routers["plain"] = map[string]any{"rule": "Host(`plain.example`) || Header(`X-Route`, `plain`)",
		"entryPoints": []string{"web"}, "service": "primary"}
	e := startE2E(t, d, "api", "plain")

	a := attacker.Addr
	targets := []string{
		"x:@" + a + "/api/v1/users/42",
		"http:@" + a + "/a",
		"mailto:@" + a,
		"//" + a + "/a",
		"http://" + a + "/a",
		"https://" + a + "/a?b=1",
		"/a/..%2F..%2F/@" + a,
		"/%2F%2F" + a + "/a",
		"*",
		"/@" + a + "/a",
	}
	send := func(target, host string) int {
		c := dialRaw(t, e)
		c.send(t, "DELETE "+target+" HTTP/1.1\r\nHost: "+host+"\r\nX-Route: "+strings.TrimSuffix(host, ".example")+
			"\r\nCookie: session=secret\r\nAuthorization: Bearer secret\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
		return c.status(t)
	}
	for _, target := range targets {
		plain := send(target, "plain.example")
		mirrored := send(target, "api.example")
		assert.Equal(t, plain, mirrored, "%s: the client's answer, without and with the middleware", target)
	}
	// Every copy left before its primary answered; one more copy, arrived, closes the run.
	sentinel := e.request(t, http.MethodGet, "/sentinel", nil)
	sentinel.Header.Set("X-Route", "api")
	r := harness.Do(e.client, sentinel)
	require.NoError(t, r.Err)
	require.Equal(t, http.StatusOK, r.Status)
	for {
		c, ok := e.mirror.Next(waitLimit)
		require.True(t, ok, "the sentinel's copy did not arrive")
		if c.Path == "/sentinel" {
			break
		}
		assert.Equal(t, e.mirror.Addr, c.Host, "a copy with another Host")
		assert.True(t, strings.HasPrefix(c.Path, "/"), "copy path %q", c.Path)
	}
	assert.Equal(t, 0, attacker.Count(), "copies reached a host that is not the mirror")
}

// Memory follows the bytes that arrive: a declared length is never allocated.
func TestTraefikHugeContentLength(t *testing.T) {
	primary := startEntryServer(t, nil)
	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"maxBodySize": -1})
	d.Service("primary", "http://"+primary.addr)
	e := startE2E(t, d)
	before, err := e.traefik.Stats()
	require.NoError(t, err)
	for i, length := range []string{"100000000000", "9223372036854775807"} {
		path := fmt.Sprintf("/huge/%d", i)
		c := dialRaw(t, e)
		c.send(t, "POST "+path+" HTTP/1.1\r\nHost: x\r\nContent-Length: "+length+"\r\n\r\n0123456789")
		primary.waitEntered(t, path)
		c.Close()
	}
	r := harness.Do(e.client, e.request(t, http.MethodGet, "/after", nil))
	require.NoError(t, r.Err)
	assert.Equal(t, http.StatusOK, r.Status)
	require.True(t, e.traefik.Running())
	after, err := e.traefik.Stats()
	require.NoError(t, err)
	t.Logf("peak RSS %d MiB before, %d MiB after", before.PeakRSS>>20, after.PeakRSS>>20)
	assert.Less(t, after.PeakRSS-before.PeakRSS, int64(32<<20), "peak memory grew")
}

// A mirror answering with megabytes of headers costs Traefik at most the answer header limit
// per copy in flight.
func TestTraefikMirrorAnswerHeadersAreBounded(t *testing.T) {
	const copies = 50
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	var served atomic.Int64
	var conns sync.WaitGroup
	stop := make(chan struct{})
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer conns.Done()
				defer c.Close()
				if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
					return
				}
				line := "X-Pad: " + strings.Repeat("p", 1000) + "\r\n"
				block := []byte("HTTP/1.1 200 OK\r\n" + strings.Repeat(line, 64))
				for written := 0; written < 9<<20; written += len(block) {
					if _, err := c.Write(block); err != nil {
						break
					}
					block = []byte(strings.Repeat(line, 64))
				}
				served.Add(1)
				<-stop // the header block never ends
			}()
		}
	}()
	t.Cleanup(func() { close(stop); conns.Wait() })

	d := exampleDynamic(t)
	d.Mirror("mirror-api", map[string]any{"url": "http://" + l.Addr().String(), "timeout": "20s"})
	e := startE2E(t, d)
	// Warm up Traefik (connections, interpreter) before its peak memory is taken.
	require.Equal(t, 0, harness.Failures(harness.Run(e.client, copies, copies, func(int) *http.Request {
		return e.request(t, http.MethodGet, "/warm", nil)
	})))
	require.Eventually(t, func() bool { return served.Load() == copies }, 30*time.Second, 10*time.Millisecond)
	before, err := e.traefik.Stats()
	require.NoError(t, err)
	results := harness.Run(e.client, copies, copies, func(int) *http.Request {
		return e.request(t, http.MethodPost, "/x", strings.NewReader("payload"))
	})
	assert.Equal(t, 0, harness.Failures(results))
	require.Eventually(t, func() bool { return served.Load() == 2*copies }, 30*time.Second, 10*time.Millisecond,
		"the mirror wrote its headers to %d of %d copies", served.Load()-copies, copies)
	after, err := e.traefik.Stats()
	require.NoError(t, err)
	t.Logf("peak RSS %d MiB before, %d MiB after %d copies answered with 9 MiB of headers",
		before.PeakRSS>>20, after.PeakRSS>>20, copies)
	assert.Less(t, after.PeakRSS-before.PeakRSS, int64(copies<<20), "more than 1 MiB per copy in flight")
}

// X-Mirrored-By from a client does not opt its request out of being copied, and reaches the
// primary as sent.
func TestTraefikClientMarkerIsCopied(t *testing.T) {
	e := startE2E(t, nil)
	for i, value := range []string{"mirror-api@file", "", "anything"} {
		path := fmt.Sprintf("/marked/%d", i)
		req := e.request(t, http.MethodPost, path, strings.NewReader("audit me"))
		req.Header["X-Mirrored-By"] = []string{value}
		r := harness.Do(e.client, req)
		require.NoError(t, r.Err)
		require.Equal(t, http.StatusOK, r.Status)
		p, ok := e.primary.Next(waitLimit)
		require.True(t, ok)
		assert.Equal(t, []string{value}, p.Header["X-Mirrored-By"], "the primary gets the client's header")
		c, ok := e.mirror.Next(waitLimit)
		require.True(t, ok, "a request carrying X-Mirrored-By %q was not copied", value)
		assert.Equal(t, path, c.Path)
		assert.Equal(t, "audit me", string(c.Body))
		assert.Equal(t, []string{"mirror-api@file"}, c.Header["X-Mirrored-By"])
	}
}

// Two Traefik processes mirroring to each other: a copy goes round once and stops when it comes
// back to the process that sent it.
func TestTraefikLoopThroughAnotherReplicaEnds(t *testing.T) {
	if testing.Short() {
		t.Skip("real Traefik tests are skipped in -short mode")
	}
	addrs, err := harness.FreeAddrs(4)
	require.NoError(t, err)
	primaries := make([]*harness.Upstream, 2)
	replicas := make([]*harness.Traefik, 2)
	for i := range replicas {
		primaries[i], err = harness.StartUpstream("127.0.0.1:0", 100, nil)
		require.NoError(t, err)
		t.Cleanup(primaries[i].Close)
	}
	for i := range replicas {
		other := addrs[2*(1-i)]
		replicas[i], err = harness.StartTraefik(harness.Options{Replace: map[string]string{
			harness.ExampleWeb: addrs[2*i], harness.ExampleAPI: addrs[2*i+1],
			harness.ExamplePrimary: primaries[i].Addr, harness.ExampleMirror: other,
		}})
		require.NoError(t, err)
		tr := replicas[i]
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("traefik log:\n%s", tr.Log())
			}
			tr.Stop()
		})
		require.NoError(t, tr.WaitRouters("enabled", "api"))
	}
	client := harness.Client(4)
	r := harness.Do(client, mustRequest(t, http.MethodPost, replicas[0].WebURL+"/round", "trip"))
	require.NoError(t, r.Err)
	require.Equal(t, http.StatusOK, r.Status)
	// The request at A, its copy at B, the copy's copy back at A, which stops there. (The copy's
	// copy may reach A's primary before the request itself.)
	hops := map[int]harness.Received{}
	for _, at := range []int{0, 1, 0} {
		p, ok := primaries[at].Next(waitLimit)
		require.True(t, ok, "a hop did not reach replica %d (got %d)", at, len(hops))
		assert.Equal(t, "/round", p.Path)
		assert.Equal(t, "trip", string(p.Body))
		hops[loopTokens(p.Header.Get("X-Mirror-Loop"))] = p
	}
	for i := 0; i < 3; i++ {
		assert.Contains(t, hops, i, "no request with %d loop tokens", i)
	}
	// A loop would keep going; a few round trips later nothing else has come.
	for i := 0; i < 5; i++ {
		require.NoError(t, harness.Do(client, mustRequest(t, http.MethodGet, replicas[1].APIURL+"/ping", "")).Err)
	}
	_, more := primaries[1].Next(200 * time.Millisecond)
	assert.False(t, more, "the copy went round again")
	assert.Equal(t, 2, primaries[0].Count())
	assert.Equal(t, 1, primaries[1].Count())
}

func loopTokens(header string) int {
	if header == "" {
		return 0
	}
	return len(strings.Split(header, ","))
}

func mustRequest(t *testing.T, method, url, body string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	return req
}

// With Expect: 100-continue, a primary that refuses the upload unread is heard first, as
// without the middleware: the middleware does not ask the client for the body.
func TestTraefikExpectContinue(t *testing.T) {
	primary := startEntryServer(t, func(*http.Request) int { return http.StatusUnauthorized })
	d := exampleDynamic(t)
	d.Service("primary", "http://"+primary.addr)
	d.Router("plain", "/plain", "primary")
	e := startE2E(t, d, "api", "plain")
	for _, path := range []string{"/plain", "/mirrored"} {
		c := dialRaw(t, e)
		c.send(t, "POST "+path+" HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\nExpect: 100-continue\r\n\r\n")
		assert.Equal(t, http.StatusUnauthorized, c.status(t), "%s: the first answer the client gets", path)
	}
}

// A large upload reaches the primary's handler at once, as without the middleware, and is still
// copied whole.
func TestTraefikLargeUploadIsNotHeldBack(t *testing.T) {
	primary := startEntryServer(t, nil)
	d := exampleDynamic(t)
	d.Service("primary", "http://"+primary.addr)
	e := startE2E(t, d)
	body := randomBytes(t, 1<<20)
	c := dialRaw(t, e)
	c.send(t, "PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
	_, err := c.Write(body[:64<<10])
	require.NoError(t, err)
	primary.waitEntered(t, "/upload") // the rest of the body is not sent yet
	_, err = c.Write(body[64<<10:])
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, c.status(t))
	copied, ok := e.mirror.Next(waitLimit)
	require.True(t, ok)
	assert.Equal(t, "/upload", copied.Path)
	assert.True(t, bytes.Equal(body, copied.Body), "the copy's body differs (%d bytes)", len(copied.Body))
}

// Clients that drip their bodies hold a slot for at most timeout: after it, other requests
// are copied again while they still drip.
func TestTraefikDrippingClientsReleaseSlots(t *testing.T) {
	primary := startEntryServer(t, nil)
	d := exampleDynamic(t)
	d.Service("primary", "http://"+primary.addr)
	d.Mirror("mirror-api", map[string]any{"maxInflight": 2, "timeout": "1s"})
	e := startE2E(t, d)

	stop := make(chan struct{})
	var drippers sync.WaitGroup
	t.Cleanup(func() { close(stop); drippers.Wait() })
	drip := func(path, head string, first []byte, piece func() []byte) {
		c := dialRaw(t, e)
		c.send(t, head)
		_, err := c.Write(first)
		require.NoError(t, err)
		primary.waitEntered(t, path)
		drippers.Add(1)
		go func() {
			defer drippers.Done()
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if _, err := c.Write(piece()); err != nil {
						return
					}
				}
			}
		}()
	}
	drip("/drip/chunked", "POST /drip/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
		[]byte("1\r\na\r\n"), func() []byte { return []byte("1\r\na\r\n") })
	drip("/drip/length", "POST /drip/length HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n",
		bytes.Repeat([]byte("a"), 8<<10), func() []byte { return []byte("a") })
	start := time.Now()

	// While they drip, other requests' copies get through again once timeout has passed.
	i := 0
	require.Eventually(t, func() bool {
		i++
		path := fmt.Sprintf("/other/%d", i)
		r := harness.Do(e.client, e.request(t, http.MethodPost, path, strings.NewReader("x")))
		if r.Err != nil || r.Status != http.StatusOK {
			return false
		}
		for _, c := range e.mirror.Drain() {
			if strings.HasPrefix(c.Path, "/other/") {
				return true
			}
		}
		return false
	}, 8*time.Second, 20*time.Millisecond, "no copy got through while two clients dripped")
	t.Logf("copies got through again %v after the drippers started", time.Since(start).Round(time.Millisecond))
	select {
	case <-stop:
		t.Fatal("the drippers stopped")
	default:
	}
}
