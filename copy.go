package mirror

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// maxDrain bounds how much of a mirror's answer is read so that its connection can be reused.
const maxDrain = 64 << 10

// hopHeaders are removed from the copy, as a proxy does (RFC 9110, section 7.6.1); so are the
// headers named in Connection and every Proxy-* header.
var hopHeaders = []string{"Connection", "Keep-Alive", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// sharedTransport carries the copies of every instance. Package-level state survives
// configuration reloads, so idle connections to the mirror are reused instead of reopened.
var sharedTransport = newTransport()

func newTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConns = 0 // no global limit; MaxIdleConnsPerHost bounds each mirror
	t.MaxIdleConnsPerHost = 1024
	t.DisableCompression = true // the answer is drained, never decoded
	return t
}

// copyRequest is what the copy needs from the incoming request, taken before the primary
// runs: later middlewares may change the request in place.
type copyRequest struct {
	method     string
	path       string
	rawPath    string
	rawQuery   string
	host       string
	remoteAddr string
	tls        bool
	header     http.Header
	body       []byte // nil: no body
}

func captureRequest(req *http.Request) *copyRequest {
	return &copyRequest{
		method:     req.Method,
		path:       req.URL.Path,
		rawPath:    req.URL.RawPath,
		rawQuery:   req.URL.RawQuery,
		host:       req.Host,
		remoteAddr: req.RemoteAddr,
		tls:        req.TLS != nil,
		header:     req.Header.Clone(),
	}
}

// send runs in its own goroutine and owns one slot, which it gives back when done.
func (m *mirror) send(c *copyRequest) {
	defer m.release()
	defer func() {
		// A panic in a goroutine the plugin started would kill Traefik.
		if r := recover(); r != nil {
			m.out.count(failed, fmt.Errorf("panic: %v", r))
		}
	}()

	// Detached from the client's request: only the mirror's own deadline cancels the copy.
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.timeout)
	defer cancel()

	out, err := m.newCopy(ctx, c)
	if err != nil {
		m.out.count(failed, err)
		return
	}
	resp, err := sharedTransport.RoundTrip(out)
	if err != nil {
		m.out.count(failed, err)
		return
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxDrain))
	_ = resp.Body.Close()
	if resp.StatusCode >= 500 {
		m.out.count(failed, fmt.Errorf("mirror answered %s", resp.Status))
		return
	}
	m.out.count(sent, nil)
}

func (m *mirror) newCopy(ctx context.Context, c *copyRequest) (*http.Request, error) {
	var body io.Reader
	if c.body != nil {
		body = bytes.NewReader(c.body)
	}
	out, err := http.NewRequestWithContext(ctx, c.method, "", body)
	if err != nil {
		return nil, err
	}
	u := &url.URL{Scheme: m.cfg.scheme, Host: m.cfg.host, Path: m.cfg.basePath + c.path}
	if c.rawPath != "" {
		u.RawPath = m.cfg.baseRawPath + c.rawPath
	}
	// Traefik's proxy sends the primary the query with ';' turned into '&'.
	u.RawQuery = strings.ReplaceAll(c.rawQuery, ";", "&")
	out.URL = u
	out.Host = m.cfg.host

	h := c.header
	removeHopByHop(h)
	// Traefik's transport asks the primary for gzip when the client did not say; so does the copy.
	if _, ok := h["Accept-Encoding"]; !ok && h.Get("Range") == "" && c.method != http.MethodHead {
		h.Set("Accept-Encoding", "gzip")
	}
	if _, ok := h["User-Agent"]; !ok {
		h.Set("User-Agent", "") // keep Go's default User-Agent off the copy
	}
	if h.Get("X-Forwarded-Host") == "" && c.host != "" {
		h.Set("X-Forwarded-Host", c.host)
	}
	if h.Get("X-Forwarded-Proto") == "" {
		if c.tls {
			h.Set("X-Forwarded-Proto", "https")
		} else {
			h.Set("X-Forwarded-Proto", "http")
		}
	}
	// The same X-Forwarded-For that Traefik's proxy (net/http/httputil) gives the primary.
	if ip, _, err := net.SplitHostPort(c.remoteAddr); err == nil {
		if prior := h["X-Forwarded-For"]; len(prior) > 0 {
			ip = strings.Join(prior, ", ") + ", " + ip
		}
		h.Set("X-Forwarded-For", ip)
	}
	h.Set(markerHeader, m.name)
	out.Header = h
	return out, nil
}

func removeHopByHop(h http.Header) {
	for _, v := range h["Connection"] {
		for _, name := range strings.Split(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopHeaders {
		delete(h, name)
	}
	for name := range h {
		if strings.HasPrefix(name, "Proxy-") {
			delete(h, name)
		}
	}
}
