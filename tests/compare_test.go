package tests

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// jsonApp is a small JSON service; the shadow version answers differently on some paths.
func jsonApp(shadow bool, events chan struct{}) http.HandlerFunc {
	return func(rw http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		id := filepath.Base(r.URL.Path)
		doc := map[string]any{"id": id, "name": "tea", "price": 10, "items": []any{map[string]any{"sku": "a", "qty": 1}}}
		rw.Header().Set("Content-Type", "application/json")
		rw.Header().Set("Date", time.Now().Format(time.RFC3339Nano))
		rw.Header().Set("Server", map[bool]string{false: "v1", true: "v2"}[shadow])
		switch {
		case strings.HasPrefix(r.URL.Path, "/field/") && shadow:
			doc["price"] = 11
		case strings.HasPrefix(r.URL.Path, "/ignored/"):
			doc["meta"] = map[string]any{"timestamp": time.Now().UnixNano()}
			if shadow {
				doc["items"] = []any{map[string]any{"sku": "a", "qty": 2}}
			}
		case strings.HasPrefix(r.URL.Path, "/kinds/") && shadow: // an array became an object
			doc["items"] = map[string]any{"sku": "a", "qty": 1}
		case strings.HasPrefix(r.URL.Path, "/noise/"):
			doc["meta"] = map[string]any{"timestamp": time.Now().UnixNano()}
		case strings.HasPrefix(r.URL.Path, "/status/"):
			if shadow {
				rw.Header().Set("X-Version", "2")
				rw.WriteHeader(http.StatusInternalServerError)
			} else {
				rw.Header().Set("X-Version", "1")
			}
		case strings.HasPrefix(r.URL.Path, "/text/"):
			rw.Header().Set("Content-Type", "text/plain")
			_, _ = io.WriteString(rw, map[bool]string{false: "hello", true: "hello, world"}[shadow])
			return
		case strings.HasPrefix(r.URL.Path, "/events"):
			rw.Header().Set("Content-Type", "text/event-stream")
			for i := 0; i < 3; i++ {
				fmt.Fprintf(rw, "data: %d\n\n", i)
				rw.(http.Flusher).Flush()
				if shadow {
					continue
				}
				select {
				case <-events:
				case <-time.After(waitLimit):
					return
				}
			}
			return
		}
		b, _ := json.Marshal(doc)
		if shadow { // the same document written differently: no Content-Length, spaced out
			b, _ = json.MarshalIndent(doc, "", "  ")
			_, _ = rw.Write(b[:len(b)/2])
			rw.(http.Flusher).Flush()
			_, _ = rw.Write(b[len(b)/2:])
			return
		}
		_, _ = rw.Write(b)
	}
}

func startApp(t *testing.T, h http.Handler) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: h}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return "http://" + l.Addr().String()
}

// diffLines reads a compare.logFile's lines.
func diffLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(l), &m), "line %q", l)
		lines = append(lines, m)
	}
	return lines
}

func TestTraefikCompare(t *testing.T) {
	events := make(chan struct{})
	primary := startApp(t, jsonApp(false, events))
	shadow := startApp(t, jsonApp(true, nil))
	logs := t.TempDir()
	d := exampleDynamic(t)
	d.Service("app", primary)
	cases := []string{"same", "field", "ignored", "status", "text", "noise", "events"}
	for _, c := range cases {
		opts := map[string]any{"url": shadow, "compare": map[string]any{"enabled": true, "logFile": filepath.Join(logs, c+".log")}}
		if c == "ignored" {
			opts["compare"].(map[string]any)["ignoreJSONPaths"] = []string{"meta.timestamp"}
		}
		d.Mirror("cmp-"+c, opts)
		d.Router(c, "/"+c+"/", "app", "cmp-"+c)
	}
	d.HTTP.Middlewares["strip"] = map[string]any{"stripPrefix": map[string]any{"prefixes": []string{"/plain"}}}
	d.Router("plain", "/plain/", "app", "strip")
	e := startE2E(t, d, append(cases, "plain")...)

	get := func(path string) (int, http.Header, string) {
		t.Helper()
		resp, err := e.client.Get(e.traefik.WebURL + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.StatusCode, resp.Header, string(b)
	}
	const n = 12
	for i := 0; i < n; i++ {
		for _, c := range []string{"same", "field", "ignored", "status", "text", "noise"} {
			status, _, _ := get(fmt.Sprintf("/%s/%d?page=%d", c, i, i))
			assert.Equal(t, http.StatusOK, status, "%s: the client gets the primary's answer", c)
		}
	}
	wantLines := map[string]int{"same": 0, "field": n, "ignored": n, "status": n, "text": n, "noise": n}
	require.Eventually(t, func() bool {
		for c, want := range wantLines {
			if len(diffLines(t, filepath.Join(logs, c+".log"))) != want {
				return false
			}
		}
		return true
	}, waitLimit, 20*time.Millisecond, "difference lines per case")

	one := func(c string) map[string]any {
		lines := diffLines(t, filepath.Join(logs, c+".log"))
		require.NotEmpty(t, lines, c)
		return lines[0]
	}
	field := one("field")
	assert.Equal(t, "cmp-field@file", field["middleware"])
	assert.Equal(t, "GET", field["method"])
	assert.Equal(t, "/field/0?page=0", field["path"])
	assert.Equal(t, map[string]any{"primary": 200.0, "mirror": 200.0}, field["status"])
	assert.Contains(t, field["latencyMs"], "primary")
	assert.Equal(t, []any{map[string]any{"kind": "json", "name": "price", "primary": "10", "mirror": "11"}}, field["differences"])

	ignored := one("ignored")
	assert.Equal(t, []any{map[string]any{"kind": "json", "name": "items.0.qty", "primary": "1", "mirror": "2"}}, ignored["differences"],
		"only the paths not ignored")

	status := one("status")
	assert.Equal(t, map[string]any{"primary": 200.0, "mirror": 500.0}, status["status"])
	assert.Equal(t, []any{
		map[string]any{"kind": "status", "primary": "200", "mirror": "500"},
		map[string]any{"kind": "header", "name": "X-Version", "primary": "1", "mirror": "2"},
	}, status["differences"])

	text := one("text")["differences"].([]any)[0].(map[string]any)
	assert.Equal(t, "body", text["kind"])
	assert.Regexp(t, `^5 bytes, sha256 [0-9a-f]{64}$`, text["primary"])
	assert.Regexp(t, `^12 bytes, sha256 [0-9a-f]{64}$`, text["mirror"])

	// The noise report: a field that differs in every compared answer, in the summary line.
	require.Eventually(t, func() bool {
		return strings.Contains(e.traefik.Log(), fmt.Sprintf("probable noise: meta.timestamp differed in 100%% of %d compared; ignore it with compare.ignoreJSONPaths", n))
	}, 15*time.Second, 50*time.Millisecond, "no noise report")
	assert.Contains(t, e.traefik.Log(), "mirror cmp-same@file: sent=")
	assert.Regexp(t, `mirror cmp-same@file: sent=\d+ matched=\d+ matchRate=100.0% primaryP50=`, e.traefik.Log())

	// A streamed answer reaches the client event by event with compare on, and is not compared.
	resp, err := e.client.Get(e.traefik.WebURL + "/events/1")
	require.NoError(t, err)
	r := bufio.NewReader(resp.Body)
	for i := 0; i < 3; i++ {
		line, err := r.ReadString('\n')
		require.NoError(t, err)
		assert.Equal(t, fmt.Sprintf("data: %d\n", i), line)
		_, _ = r.ReadString('\n')
		events <- struct{}{} // the primary writes the next event only now
	}
	resp.Body.Close()
	require.Eventually(t, func() bool { return strings.Contains(e.traefik.Log(), "mirror cmp-events@file: sent=1 notCompared=1") },
		15*time.Second, 50*time.Millisecond)
	assert.Empty(t, diffLines(t, filepath.Join(logs, "events.log")))

	// The client gets byte for byte what it gets without the middleware.
	for _, c := range []string{"field", "status", "text"} {
		codeA, hA, bodyA := get("/" + c + "/7")
		codeB, hB, bodyB := get("/plain/" + c + "/7")
		assert.Equal(t, codeB, codeA, c)
		assert.Equal(t, bodyB, bodyA, c)
		for _, name := range []string{"Content-Type", "Content-Length", "Transfer-Encoding", "X-Version", "Server"} {
			assert.Equal(t, hB.Values(name), hA.Values(name), "%s: %s", c, name)
		}
	}
}
