package mirror

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// dialPause is how long copies stop after the mirror could not be connected to.
const dialPause = time.Second

// maxDrain bounds how much of a mirror's answer is read so that its connection can be reused.
const maxDrain = 64 << 10

// hopHeaders are the hop-by-hop headers that net/http/httputil removes, and so the copy loses
// them too (RFC 9110, section 7.6.1); so are the headers named in Connection. Transfer-Encoding,
// Trailer and Upgrade need no removal: the transport never sends the first two from Header, and
// upgrades are not copied.
var hopHeaders = []string{"Connection", "Keep-Alive", "Te", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization"}

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

// copyRequest is what the copy needs from the incoming request, and what became of it.
type copyRequest struct {
	method     string
	uri        string // escaped path and query
	remoteAddr string
	header     http.Header
	body       []byte // nil: no body

	outcome outcome
	err     error
}

// send runs in its own goroutine and owns one slot until settle gives it back. (A pool of
// reused goroutines was measured slower under Yaegi: its select costs more than go.)
func send(m *mirror, c *copyRequest) {
	c.outcome = failed // what settle counts if anything below panics
	defer settle(m, c)

	// Detached from the client's request: only the mirror's own deadline cancels the copy.
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.timeout)
	out, err := newCopy(ctx, m, c)
	if err == nil {
		var resp *http.Response
		resp, err = sharedTransport.RoundTrip(out)
		if err == nil {
			_, _ = io.CopyN(io.Discard, resp.Body, maxDrain)
			_ = resp.Body.Close()
			if resp.StatusCode < 500 {
				c.outcome = sent
			} else {
				err = fmt.Errorf("mirror answered %s", resp.Status)
			}
		}
	}
	cancel()
	if err != nil {
		fail(m, c, err)
	}
}

// fail keeps the error of a copy that failed. After a refused, unreachable or unresolvable
// mirror (net.OpError "dial ..."), copies pause instead of trying every request. (errors.As
// cannot be used under Yaegi.)
func fail(m *mirror, c *copyRequest, err error) {
	c.err = err
	if strings.HasPrefix(err.Error(), "dial ") && m.paused.CompareAndSwap(false, true) {
		time.AfterFunc(dialPause, func() { m.paused.Store(false) })
	}
}

// settle is deferred by send: a panic in a goroutine the plugin started would kill Traefik.
func settle(m *mirror, c *copyRequest) {
	if r := recover(); r != nil {
		c.outcome, c.err = failed, panicked(r)
	}
	<-m.slots
	count(m.out, c.outcome, c.err)
}

func panicked(r any) error { return fmt.Errorf("panic: %v", r) }

// newCopy builds the copy as Traefik's proxy (net/http/httputil) builds the primary's request.
// The request line comes as the primary gets it: Traefik's entry point has already turned the
// query's semicolons into '&' (or %3B).
func newCopy(ctx context.Context, m *mirror, c *copyRequest) (*http.Request, error) {
	var body io.Reader
	if c.body != nil {
		body = bytes.NewReader(c.body)
	}
	out, err := http.NewRequestWithContext(ctx, c.method, m.cfg.base+c.uri, body)
	if err != nil {
		return nil, err
	}

	// Direct map operations with canonical keys: each function call costs under Yaegi, and
	// most requests carry none of these.
	h := c.header
	if h["Connection"] != nil {
		removeConnectionHeaders(h)
	}
	for _, name := range hopHeaders {
		delete(h, name)
	}
	// Traefik's transport asks the primary for gzip when the client did not say; so does the copy.
	if h["Accept-Encoding"] == nil && h["Range"] == nil && c.method != http.MethodHead {
		h["Accept-Encoding"] = []string{"gzip"}
	}
	if h["User-Agent"] == nil {
		h["User-Agent"] = []string{""} // keep Go's default User-Agent off the copy
	}
	// X-Forwarded-Host, -Proto, -Port and -Server are already there: Traefik's entry point sets
	// them before any middleware runs. X-Forwarded-For is the proxy's, as the primary gets it.
	if ip, _, err := net.SplitHostPort(c.remoteAddr); err == nil {
		if prior := h["X-Forwarded-For"]; prior != nil {
			ip = strings.Join(prior, ", ") + ", " + ip
		}
		h["X-Forwarded-For"] = []string{ip}
	}
	h[markerHeader] = m.marker
	out.Header = h
	out.Host = m.cfg.host
	return out, nil
}

// removeConnectionHeaders removes the headers that Connection names.
func removeConnectionHeaders(h http.Header) {
	for _, f := range h["Connection"] {
		for _, name := range strings.Split(f, ",") {
			h.Del(strings.TrimSpace(name))
		}
	}
}
