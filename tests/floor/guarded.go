package floor

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"
)

// guarded is the floor with every guarantee the plugin gives a copy, and nothing else: the
// smallest program issue 16 asks for before a target is called out of reach. Per copy: a slot
// out of maxInflight (an atomic count), a pause after the mirror refused a connection, a
// deadline, recover in the goroutine, the mirror's scheme and host with only the request's path
// and query (no SSRF), the body read ahead whole (byte-identical, sent with the primary), the
// hop-by-hop headers removed and Accept-Encoding, User-Agent and X-Forwarded-For set as Traefik's
// proxy sets them for the primary, the marker, the loop token, and the outcome counted. No
// option, no log, no metrics. A request that needs more than the common copy (a Connection, TE,
// loop or Expect header, a body of unknown length or over 64 KiB, a path that is not a path) is
// counted as skipped and not copied: such requests take other paths in the plugin too, and the
// common copy is what is measured. Written as the plugin's own short path is, in as few
// interpreted values as we found (see the plugin's serve and send).
type guarded struct {
	next     http.Handler
	scheme   string
	host     string
	marker   []string
	timeout  time.Duration
	max      int64
	inflight int64 // atomic, as every count below
	paused   atomic.Bool
	counts   [4]int64 // sent, failed, dropped, skipped
}

const (
	sent = iota
	failed
	dropped
	skipped
)

// guardedReadAhead is the largest body the guarded floor reads ahead, as the plugin does.
const guardedReadAhead = 64 << 10

var (
	background  = context.Background()
	token       = newToken()
	ownLoop     = []string{token}
	gzipOnly    = []string{"gzip"}
	noUserAgent = []string{""}
	hopHeaders  = []string{"Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization", "Upgrade"}
)

func newToken() string {
	b := make([]byte, 16)
	_, _ = crand.Read(b)
	return hex.EncodeToString(b)
}

func newGuarded(next http.Handler, u *url.URL, name string) *guarded {
	return &guarded{next: next, scheme: u.Scheme, host: u.Host, marker: []string{name}, timeout: 5 * time.Second, max: 1000}
}

func (g *guarded) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	h, p := req.Header, req.URL.Path
	if uint64(req.ContentLength) > guardedReadAhead || p == "" || p[0] != '/' || req.Method == "CONNECT" ||
		h["Connection"] != nil || h["Te"] != nil || h["X-Mirror-Loop"] != nil || h["Expect"] != nil || g.paused.Load() {
		atomic.AddInt64(&g.counts[skipped], 1)
		g.next.ServeHTTP(rw, req)
		return
	}
	var body []byte
	if req.ContentLength > 0 {
		body = make([]byte, req.ContentLength)
		if n, err := io.ReadFull(req.Body, body); err != nil {
			broken(g.next, rw, req, body[:n])
			return
		}
		req.Body = io.NopCloser(bytes.NewReader(body))
	}
	if atomic.AddInt64(&g.inflight, 1) > g.max {
		atomic.AddInt64(&g.inflight, -1)
		atomic.AddInt64(&g.counts[dropped], 1)
	} else {
		ctx, cancel := context.WithTimeout(background, g.timeout)
		go sendGuarded(g, req.Clone(ctx), cancel, body)
	}
	g.next.ServeHTTP(rw, req)
}

func sendGuarded(g *guarded, out *http.Request, cancel context.CancelFunc, body []byte) {
	defer settleGuarded(g)
	u := out.URL
	out.URL = &url.URL{Scheme: g.scheme, Host: g.host, Path: u.Path, RawPath: u.RawPath, RawQuery: u.RawQuery}
	out.RequestURI = ""
	out.Close = false
	out.Trailer = nil
	out.Body = nil
	if body != nil {
		out.Body = io.NopCloser(bytes.NewReader(body))
	}
	h := out.Header
	for _, name := range hopHeaders {
		delete(h, name)
	}
	if h["Accept-Encoding"] == nil && h["Range"] == nil && out.Method != "HEAD" {
		h["Accept-Encoding"] = gzipOnly
	}
	if h["User-Agent"] == nil {
		h["User-Agent"] = noUserAgent
	}
	if ip, _, err := net.SplitHostPort(out.RemoteAddr); err == nil {
		if prior := h["X-Forwarded-For"]; prior != nil {
			ip = strings.Join(prior, ", ") + ", " + ip
		}
		h["X-Forwarded-For"] = []string{ip}
	}
	h["X-Mirrored-By"] = g.marker
	h["X-Mirror-Loop"] = ownLoop
	out.Host = g.host
	resp, err := transport.RoundTrip(out)
	if err == nil && uint(resp.StatusCode-200) < 300 {
		_, _ = io.CopyN(io.Discard, resp.Body, 64<<10)
		_ = resp.Body.Close()
		atomic.AddInt64(&g.counts[sent], 1)
	} else {
		failGuarded(g, resp, err)
	}
	cancel()
}

// failGuarded counts a copy that failed, and pauses copies after a refused connection.
func failGuarded(g *guarded, resp *http.Response, err error) {
	if err == nil {
		_ = resp.Body.Close()
	} else if strings.HasPrefix(err.Error(), "dial ") && g.paused.CompareAndSwap(false, true) {
		time.AfterFunc(time.Second, func() { g.paused.Store(false) })
	}
	atomic.AddInt64(&g.counts[failed], 1)
}

// settleGuarded gives the slot back; a panic in a goroutine the plugin started would kill Traefik.
func settleGuarded(g *guarded) {
	if r := recover(); r != nil {
		atomic.AddInt64(&g.counts[failed], 1)
	}
	atomic.AddInt64(&g.inflight, -1)
}
