package mirror

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// recordingTransport takes the place of the mirror: it keeps each copy as it would go on the wire.
type recordingTransport struct{ got chan *http.Request }

func (r recordingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	var wire bytes.Buffer
	if err := req.Write(&wire); err != nil {
		return nil, err
	}
	parsed, err := http.ReadRequest(bufio.NewReader(&wire))
	if err != nil {
		return nil, err
	}
	parsed.URL.Scheme, parsed.URL.Host = req.URL.Scheme, req.URL.Host // where the transport dials
	body, _ := io.ReadAll(parsed.Body)
	parsed.Body = io.NopCloser(bytes.NewReader(body))
	r.got <- parsed
	return &http.Response{StatusCode: http.StatusOK, Body: http.NoBody, Request: req}, nil
}

// FuzzCopyTarget sends requests parsed from raw request lines and headers, as Go's server (and
// so Traefik's entry point) parses them, through the middleware, and checks that every copy goes
// to the mirror's host with the mirror's base path followed by the primary's path and query,
// with the primary's body; and that a target which is not a path is never copied.
func FuzzCopyTarget(f *testing.F) {
	for _, seed := range []struct{ method, target, header, body string }{
		{"GET", "/orders?page=2", "", ""},
		{"DELETE", "x:@127.0.0.1:9004/api/v1/users/42", "Cookie: s=1\r\n", "hello"},
		{"GET", "//127.0.0.1:9004/a", "", ""},
		{"GET", "http://127.0.0.1:9004/a?b=c", "", ""},
		{"GET", "https://user:pw@evil.example:443/x", "", ""},
		{"POST", "/a%2Fb/../%2e%2e/c;d?e=f;g", "Content-Length: 3\r\n", "abc"},
		{"OPTIONS", "*", "", ""},
		{"GET", "/@evil.example/x", "X-Forwarded-Host: evil.example\r\n", ""},
		{"PUT", "/a", "Transfer-Encoding: chunked\r\n", "3\r\nabc\r\n0\r\n\r\n"},
		{"GET", "/chat", "Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n", ""},
		{"GET", "/stray", "Upgrade: foo/2\r\n", ""},
		{"GET", "/loop", "X-Mirror-Loop: abc\r\nX-Mirrored-By: mirror@file\r\n", ""},
		{"CONNECT", "evil.example:443", "", ""},
		{"GET", "/%00%zz", "", ""},
	} {
		f.Add(seed.method, seed.target, seed.header, seed.body)
	}
	cfg := CreateConfig()
	cfg.URL = "http://mirror.internal:8080/base"
	cfg.MaxInflight = 1 << 20
	var primary *http.Request
	var primaryBody []byte
	h, err := New(context.Background(), http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
		primary = r
		primaryBody, _ = io.ReadAll(r.Body)
	}), cfg, testName(f))
	if err != nil {
		f.Fatal(err)
	}
	m := h.(*mirror)
	m.st.debug = func(string) {}
	m.st.error = func(string) {}
	rt := recordingTransport{got: make(chan *http.Request, 1)}
	m.transport = rt

	f.Fuzz(func(t *testing.T, method, target, header, body string) {
		raw := method + " " + target + " HTTP/1.1\r\nHost: api.example\r\n" + header + "\r\n" + body
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
		if err != nil {
			return // Go's server answers 400 itself
		}
		req.RemoteAddr = "192.0.2.1:1234"
		notPath := req.URL.Path == "" || req.URL.Path[0] != '/' || req.Method == http.MethodConnect
		before := total(m)
		primary, primaryBody = nil, nil
		h.ServeHTTP(httptest.NewRecorder(), req)
		if primary == nil {
			t.Fatal("the primary was not called")
		}
		// Each request ends in one outcome, counted after the copy's round trip, if any.
		deadline := time.Now().Add(waitLimit)
		for total(m) == before {
			if time.Now().After(deadline) {
				t.Fatalf("no outcome for %q", raw)
			}
			time.Sleep(10 * time.Microsecond)
		}
		var c *http.Request
		select {
		case c = <-rt.got:
		default:
			return // not copied: not a path, an upgrade, or a body the request did not complete
		}
		if notPath {
			t.Fatalf("target %q (%#v) was copied to %s", target, req.URL, c.URL)
		}
		if c.URL.Scheme != "http" || c.URL.Host != "mirror.internal:8080" || c.Host != "mirror.internal:8080" {
			t.Fatalf("target %q: copy to scheme %q host %q Host %q, want the mirror's", target, c.URL.Scheme, c.URL.Host, c.Host)
		}
		if got, want := c.URL.EscapedPath(), "/base"+primary.URL.EscapedPath(); got != want && (primary.URL.Path != "" || got != "/base") {
			t.Fatalf("target %q: copy path %q, want %q", target, got, want)
		}
		if c.URL.RawQuery != primary.URL.RawQuery {
			t.Fatalf("target %q: copy query %q, want %q", target, c.URL.RawQuery, primary.URL.RawQuery)
		}
		cBody, _ := io.ReadAll(c.Body)
		if !bytes.Equal(cBody, primaryBody) {
			t.Fatalf("target %q: copy body %q, want %q", target, cBody, primaryBody)
		}
		if got := c.Header.Get(markerHeader); got != testName(f) {
			t.Fatalf("copy %s = %q", markerHeader, got)
		}
		if got := c.Header.Get(loopHeader); !strings.HasSuffix(got, processToken) {
			t.Fatalf("copy %s = %q, want it to end with this process's token", loopHeader, got)
		}
	})
}

// total is the number of requests that have had their outcome.
func total(m *mirror) int64 {
	var n int64
	for k := outcome(0); k < numOutcomes; k++ {
		n += m.st.get(k)
	}
	return n
}
