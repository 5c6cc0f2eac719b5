package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Received is one request as an upstream saw it.
type Received struct {
	At            time.Time
	Method        string
	Path          string // escaped
	RawQuery      string
	Host          string
	Header        http.Header
	Body          []byte
	ContentLength int64
	BodyErr       error
}

// Digest is the body's SHA-256, shortened for display.
func (r Received) Digest() string {
	sum := sha256.Sum256(r.Body)
	return hex.EncodeToString(sum[:6])
}

// Upstream is an HTTP server on 127.0.0.1 that records every request it gets.
type Upstream struct {
	URL  string
	Addr string

	srv  *http.Server
	got  chan Received
	mu   sync.Mutex
	seen int
}

// StartUpstream listens on addr ("127.0.0.1:0" for any port) and answers with answer, or
// with 200 and "ok" when answer is nil. Up to buffer requests are kept for Next; more are
// counted and dropped. Request bodies are read in full before answer runs.
func StartUpstream(addr string, buffer int, answer http.HandlerFunc) (*Upstream, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	u := &Upstream{URL: "http://" + l.Addr().String(), Addr: l.Addr().String(), got: make(chan Received, buffer)}
	u.srv = &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		rec := Received{
			At: time.Now(), Method: r.Method, Path: r.URL.EscapedPath(), RawQuery: r.URL.RawQuery, Host: r.Host,
			Header: r.Header.Clone(), Body: body, ContentLength: r.ContentLength, BodyErr: err,
		}
		u.mu.Lock()
		u.seen++
		u.mu.Unlock()
		select {
		case u.got <- rec:
		default:
		}
		if answer != nil {
			answer(rw, r)
			return
		}
		_, _ = io.WriteString(rw, "ok")
	}), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = u.srv.Serve(l) }()
	return u, nil
}

// Next returns the next recorded request, or false when none comes within wait.
func (u *Upstream) Next(wait time.Duration) (Received, bool) {
	select {
	case r := <-u.got:
		return r, true
	case <-time.After(wait):
		return Received{}, false
	}
}

// Drain returns the requests recorded so far without waiting.
func (u *Upstream) Drain() []Received {
	var all []Received
	for {
		select {
		case r := <-u.got:
			all = append(all, r)
		default:
			return all
		}
	}
}

// Count is how many requests arrived so far.
func (u *Upstream) Count() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.seen
}

// Close stops the server, cutting open connections.
func (u *Upstream) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_ = u.srv.Shutdown(ctx)
	_ = u.srv.Close()
}

// Hung accepts connections and never answers, until closed.
type Hung struct {
	Addr string
	l    net.Listener
	open atomic.Int64
	mu   sync.Mutex
	all  []net.Conn
}

// StartHung listens on a free loopback port. With limit > 0, connections past limit open ones
// are closed at once, so that a client that never lets go cannot exhaust this process's
// descriptors.
func StartHung(limit int) (*Hung, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	h := &Hung{Addr: l.Addr().String(), l: l}
	go func() {
		for {
			c, err := l.Accept()
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil { // out of descriptors, say: try again
				time.Sleep(10 * time.Millisecond)
				continue
			}
			if limit > 0 && h.Open() >= limit {
				_ = c.Close()
				continue
			}
			h.mu.Lock()
			h.all = append(h.all, c)
			h.mu.Unlock()
			h.open.Add(1)
			go func() {
				_, _ = io.Copy(io.Discard, c) // returns when the client closes
				h.open.Add(-1)
			}()
		}
	}()
	return h, nil
}

// Open is how many connections the clients have open to it now.
func (h *Hung) Open() int { return int(h.open.Load()) }

// Close stops listening and closes every connection.
func (h *Hung) Close() {
	_ = h.l.Close()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.all {
		_ = c.Close()
	}
}

// FreeAddrs returns n distinct loopback addresses with ports free right now (all held open
// until all are found, so that none is handed out twice). The ports are below the kernel's
// ephemeral range: a port the kernel handed out (":0") and that was free a moment ago can become
// the source port of any connection the tests open before the server binds it (it did: "bind:
// address already in use" for a Traefik entry point, with streamed uploads in the same run).
func FreeAddrs(n int) ([]string, error) {
	low := ephemeralLow()
	var addrs []string
	for len(addrs) < n {
		addr := "127.0.0.1:0"
		if low > minChosenPort+1000 {
			addr = fmt.Sprintf("127.0.0.1:%d", minChosenPort+rand.IntN(low-minChosenPort))
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			if addr != "127.0.0.1:0" {
				continue // taken: another
			}
			return nil, err
		}
		defer l.Close()
		addrs = append(addrs, l.Addr().String())
	}
	return addrs, nil
}

// minChosenPort is the least port FreeAddrs chooses: above the ports the examples use.
const minChosenPort = 10000

// ephemeralLow is the first port of the kernel's ephemeral range (0 when unknown).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	var low, high int
	if _, err := fmt.Sscan(string(b), &low, &high); err != nil {
		return 0
	}
	return low
}

// Refused is a loopback address that refuses connections: a socket bound to it and never
// listening keeps its port from being handed to any other listener while the test runs (a
// port merely free a moment ago can become the next upstream's).
type Refused struct {
	Addr  string
	fd    int
	close sync.Once
}

// StartRefused reserves a refusing loopback address.
func StartRefused() (*Refused, error) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		_ = syscall.Close(fd)
		return nil, err
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		_ = syscall.Close(fd)
		return nil, err
	}
	return &Refused{Addr: fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port), fd: fd}, nil
}

// Close frees the address; it may be called more than once.
func (r *Refused) Close() { r.close.Do(func() { _ = syscall.Close(r.fd) }) }
