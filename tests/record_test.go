package tests

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"go/build"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// End-to-end acceptance of record (issue 18): the files a real Traefik writes are read by the real
// GoReplay (v1.3.2, which .ci/run installs), and replayed to servers on 127.0.0.1.

// gorSeparator ends every payload of a GoReplay file.
const gorSeparator = "\n\U0001F435\U0001F648\U0001F649\n"

// goreplayBinary finds GoReplay: on PATH, or where `go install` puts it. Without it the test is
// skipped, unless CI is set: there a missing tool fails.
func goreplayBinary(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("goreplay"); err == nil {
		return p
	}
	gopath := build.Default.GOPATH
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil && len(bytes.TrimSpace(out)) > 0 {
		gopath = string(bytes.TrimSpace(out))
	}
	p := filepath.Join(gopath, "bin", "goreplay")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	msg := "no goreplay on PATH nor at " + p + " (go install github.com/buger/goreplay@v1.3.2; it needs Debian's libpcap-dev)"
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// replayed runs `goreplay --input-file input --output-http <to>`, one worker (so that the
// requests come in the file's order) and at most 1 ms between requests, until the upstream has
// received want requests or the deadline passes; GoReplay does not exit at the end of its input:
// it is stopped by its PID. It returns GoReplay's output.
func replayed(t *testing.T, input string, to *harness.Upstream, want int) string {
	t.Helper()
	out := &harness.SyncBuffer{}
	cmd := exec.Command(goreplayBinary(t), "--input-file", input, "--input-file-max-wait", "1ms",
		"--output-http", to.URL, "--output-http-workers", "1", "--output-http-timeout", "10s")
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	stop := func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}
	defer stop()
	deadline := time.Now().Add(20 * time.Second)
	for to.Count() < want && time.Now().Before(deadline) {
		select {
		case <-exited:
			t.Fatalf("goreplay exited after %d of %d requests:\n%s", to.Count(), want, out)
		case <-time.After(10 * time.Millisecond):
		}
	}
	require.Equal(t, want, to.Count(), "requests replayed by goreplay within 20s:\n%s", out)
	// Nothing more comes: a payload forged into the file would be replayed after the real ones.
	select {
	case <-exited:
		t.Fatalf("goreplay exited:\n%s", out)
	case <-time.After(300 * time.Millisecond):
	}
	return out.String()
}

// gorPayload is one payload of a GoReplay file, read as GoReplay's input_file.go reads it.
type gorPayload struct {
	kind, id string
	ts       int64
	msg      []byte
}

// readGor splits a GoReplay file into its payloads: lines up to a line that is the separator's
// alone; the payload is what came before, without its last newline.
func readGor(t *testing.T, path string) []gorPayload {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var all []gorPayload
	r := bufio.NewReader(bytes.NewReader(b))
	var buf bytes.Buffer
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			require.Empty(t, line, "%s ends with a payload cut short", path)
			return all
		}
		if string(line) != gorSeparator[1:] {
			buf.Write(line)
			continue
		}
		p := buf.Bytes()
		require.NotEmpty(t, p, "%s: an empty payload (GoReplay panics on it)", path)
		p = p[:len(p)-1]
		nl := bytes.IndexByte(p, '\n')
		require.Positive(t, nl, "%s: a payload without its meta line", path)
		meta := strings.Fields(string(p[:nl]))
		require.Len(t, meta, 4, "%s: meta line %q", path, p[:nl])
		ts, err := strconv.ParseInt(meta[2], 10, 64)
		require.NoError(t, err)
		all = append(all, gorPayload{kind: meta[0], id: meta[1], ts: ts, msg: append([]byte(nil), p[nl+1:]...)})
		buf.Reset()
	}
}

func (p gorPayload) request(t *testing.T) (*http.Request, []byte) {
	t.Helper()
	req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(p.msg)))
	require.NoError(t, err)
	body, err := io.ReadAll(req.Body)
	require.NoError(t, err)
	return req, body
}

// response reads an answer payload: its status and body.
func (p gorPayload) response(t *testing.T) (int, []byte) {
	t.Helper()
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(p.msg)), nil)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, body
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return fmt.Sprintf("%x", s[:8])
}

// bySeq collects n requests from an upstream, by their X-Seq header.
func bySeq(t *testing.T, u *harness.Upstream, n int, what string) map[int]harness.Received {
	t.Helper()
	got := map[int]harness.Received{}
	for len(got) < n {
		r, ok := u.Next(waitLimit)
		require.True(t, ok, "%s: %d of %d", what, len(got), n)
		seq, err := strconv.Atoi(r.Header.Get("X-Seq"))
		require.NoError(t, err, "%s: a request without X-Seq: %s %s", what, r.Method, r.Path)
		_, dup := got[seq]
		require.False(t, dup, "%s: X-Seq %d twice", what, seq)
		got[seq] = r
	}
	return got
}

// recordMirror is the example's middleware with a record block (and overrides of its own).
func recordMirror(d *harness.Dynamic, name string, record map[string]any, overrides map[string]any) {
	o := map[string]any{"record": record}
	for k, v := range overrides {
		o[k] = v
	}
	d.Mirror(name, o)
}

// record.what copies: 200 varied requests through Traefik, the file replayed by GoReplay, each
// request reproduced (method, target, headers with the redacted ones as "redacted", body bytes).
func TestRecordCopiesReplayedByGoReplay(t *testing.T) {
	goreplayBinary(t)
	file := filepath.Join(t.TempDir(), "copies.gor")
	d := exampleDynamic(t)
	recordMirror(d, "mirror-api", map[string]any{"file": file}, nil)
	e := startE2E(t, d)

	const n = 200
	bodies := make([][]byte, n)
	build := func(i int) *http.Request {
		var req *http.Request
		switch i % 7 {
		case 0:
			req = e.request(t, http.MethodGet, "/q/"+strconv.Itoa(i)+"?a=1&b=x%20y&b=2&utf=%C3%A9", nil)
		case 1:
			bodies[i] = []byte(fmt.Sprintf(`{"seq":%d,"items":["a","b"],"nested":{"ok":true}}`, i))
			req = e.request(t, http.MethodPost, "/json/"+strconv.Itoa(i), bytes.NewReader(bodies[i]))
			req.Header.Set("Content-Type", "application/json")
		case 2:
			size := (i * 7919) % (256 << 10)
			switch i {
			case 2:
				size = 1 << 20 // record.maxBodySize and the mirror's maxBodySize: written whole
			case 9:
				size = 1<<20 - 1
			}
			bodies[i] = randomBytes(t, size)
			req = e.request(t, http.MethodPut, "/bin/"+strconv.Itoa(i), bytes.NewReader(bodies[i]))
			req.Header.Set("Content-Type", "application/octet-stream")
		case 3:
			bodies[i] = bytes.Repeat([]byte("chunked line\r\n"), i*20+1)
			req = e.request(t, http.MethodPost, "/chunked/"+strconv.Itoa(i), chunked{bytes.NewReader(bodies[i])})
		case 4:
			req = e.request(t, http.MethodGet, "/repeated/"+strconv.Itoa(i), nil)
			req.Header.Add("Accept", "text/html")
			req.Header.Add("Accept", "application/json")
			req.Header.Add("X-Multi", "one")
			req.Header.Add("X-Multi", "two, three")
		case 5:
			req = e.request(t, http.MethodDelete, "/caf\u00e9/\u65e5\u672c/"+strconv.Itoa(i), nil)
		case 6:
			bodies[i] = []byte("a=1&b=" + strconv.Itoa(i))
			req = e.request(t, http.MethodPatch, "/auth/"+strconv.Itoa(i), bytes.NewReader(bodies[i]))
			req.Header.Set("Authorization", "Bearer secret-"+strconv.Itoa(i))
			req.Header.Set("Cookie", "session=s"+strconv.Itoa(i))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		req.Header.Set("X-Seq", strconv.Itoa(i))
		return req
	}
	reqs := make([]*http.Request, n)
	for i := range reqs {
		reqs[i] = build(i)
	}
	results := harness.Run(e.client, n, 8, func(i int) *http.Request { return reqs[i] })
	require.Equal(t, 0, harness.Failures(results))
	primaries := bySeq(t, e.primary, n, "primary")
	// A copy's record is written before the copy is sent: once the mirror has every copy, the file
	// has every record.
	copies := bySeq(t, e.mirror, n, "mirror")

	payloads := readGor(t, file)
	require.Len(t, payloads, n)
	for _, p := range payloads {
		assert.Equal(t, "1", p.kind)
		assert.Len(t, p.id, 24)
	}

	recorder, err := harness.StartUpstream("127.0.0.1:0", n+10, nil)
	require.NoError(t, err)
	t.Cleanup(recorder.Close)
	start := time.Now()
	replayed(t, file, recorder, n)
	t.Logf("goreplay replayed %d requests (%d bytes of file) in %v", n, fileSize(t, file), time.Since(start).Round(time.Millisecond))
	got := bySeq(t, recorder, n, "replay")
	for i := 0; i < n; i++ {
		r, p, c := got[i], primaries[i], copies[i]
		assert.Equal(t, p.Method, r.Method, "%d: method", i)
		assert.Equal(t, p.Path, r.Path, "%d: path", i)
		assert.Equal(t, p.RawQuery, r.RawQuery, "%d: query", i)
		assert.Equal(t, recorder.Addr, r.Host, "%d: GoReplay sets the Host of --output-http", i)
		assert.Equal(t, sum(bodies[i]), sum(r.Body), "%d: body (%d bytes, replayed %d)", i, len(bodies[i]), len(r.Body))
		assert.Equal(t, sum(bodies[i]), sum(p.Body), "%d: the primary's body", i)
		want := c.Header.Clone()
		for _, h := range []string{"X-Mirrored-By", "X-Mirror-Loop", "Content-Length", "Transfer-Encoding"} {
			want.Del(h)
		}
		for _, h := range []string{"Authorization", "Cookie"} {
			for k := range want[h] {
				want[h][k] = "redacted"
			}
		}
		have := r.Header.Clone()
		have.Del("Content-Length")
		assert.Equal(t, want, have, "%d: headers", i)
		if i%7 == 6 {
			assert.Equal(t, []string{"redacted"}, r.Header["Authorization"], "%d", i)
			assert.Equal(t, "Bearer secret-"+strconv.Itoa(i), p.Header.Get("Authorization"), "%d: the primary's", i)
		}
		if i%7 == 4 {
			assert.Equal(t, []string{"text/html", "application/json"}, r.Header["Accept"], "%d", i)
			assert.Equal(t, []string{"one", "two, three"}, r.Header["X-Multi"], "%d", i)
		}
	}
	raw, err := os.ReadFile(file)
	require.NoError(t, err)
	assert.NotContains(t, string(raw), "secret-", "a redacted value in the file")
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	info, err := os.Stat(path)
	require.NoError(t, err)
	return info.Size()
}

// Rotation: past maxSize the file is renamed as GoReplay names its chunks (copies_0.gor, ...),
// at most maxFiles are kept, and GoReplay replays the set (copies*.gor) in the order of the
// records' timestamps.
func TestRecordRotationReplayedInOrder(t *testing.T) {
	goreplayBinary(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "copies.gor")
	d := exampleDynamic(t)
	recordMirror(d, "mirror-api", map[string]any{"file": file, "maxSize": 4096, "maxFiles": 3}, nil)
	e := startE2E(t, d)

	const n = 60
	for i := 0; i < n; i++ { // one at a time: the records' order is the requests'
		req := e.request(t, http.MethodPost, "/rot/"+strconv.Itoa(i), bytes.NewReader(bytes.Repeat([]byte{'a' + byte(i%26)}, 900)))
		req.Header.Set("X-Seq", strconv.Itoa(i))
		r := harness.Do(e.client, req)
		require.NoError(t, r.Err)
		require.Equal(t, http.StatusOK, r.Status)
		_, ok := e.mirror.Next(waitLimit) // the record is written before the copy leaves
		require.True(t, ok, "copy %d", i)
	}
	names, err := filepath.Glob(filepath.Join(dir, "*"))
	require.NoError(t, err)
	var rotated []string
	for _, name := range names {
		base := filepath.Base(name)
		if base == "copies.gor" {
			continue
		}
		assert.Regexp(t, `^copies_[0-9]+\.gor$`, base)
		rotated = append(rotated, base)
	}
	t.Logf("files after %d records of ~1.1 KiB, maxSize 4096, maxFiles 3: %v", n, names)
	require.Len(t, rotated, 3, "maxFiles rotated files kept")
	// The newest three chunks: with ~3 records a chunk, 60 records made ~19 of them.
	sort.Slice(rotated, func(i, j int) bool { return chunkIndex(rotated[i]) < chunkIndex(rotated[j]) })
	first := chunkIndex(rotated[0])
	assert.Greater(t, first, 10)
	assert.Equal(t, []int{first, first + 1, first + 2}, []int{chunkIndex(rotated[0]), chunkIndex(rotated[1]), chunkIndex(rotated[2])})

	// What the files hold, in order: chunks oldest first, then the current file.
	var want []int
	for _, name := range append(rotated, "copies.gor") {
		path := filepath.Join(dir, name)
		assert.LessOrEqual(t, fileSize(t, path), int64(4096), name)
		for _, p := range readGor(t, path) {
			req, _ := p.request(t)
			seq, err := strconv.Atoi(req.Header.Get("X-Seq"))
			require.NoError(t, err)
			want = append(want, seq)
		}
	}
	require.NotEmpty(t, want)
	for k := 1; k < len(want); k++ {
		require.Equal(t, want[k-1]+1, want[k], "records in the kept files: %v", want)
	}
	assert.Equal(t, n-1, want[len(want)-1])

	recorder, err := harness.StartUpstream("127.0.0.1:0", n, nil)
	require.NoError(t, err)
	t.Cleanup(recorder.Close)
	replayed(t, filepath.Join(dir, "copies*.gor"), recorder, len(want))
	var order []int
	for _, r := range recorder.Drain() {
		seq, err := strconv.Atoi(r.Header.Get("X-Seq"))
		require.NoError(t, err)
		order = append(order, seq)
		assert.Equal(t, bytes.Repeat([]byte{'a' + byte(seq%26)}, 900), r.Body, "%d", seq)
	}
	assert.Equal(t, want, order, "GoReplay replays the rotated set in order")
}

func chunkIndex(name string) int {
	i, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(name, "copies_"), ".gor"))
	if err != nil {
		return -1
	}
	return i
}

// record.what differences: answers alike write nothing; an answer with one field changed writes
// one exchange (request, primary's answer, mirror's answer, one id); the file's request, replayed
// by GoReplay through Traefik against the fixed shadow, compares alike.
func TestRecordDifferencesReplayedAgainstFixedShadow(t *testing.T) {
	goreplayBinary(t)
	answer := func(price int, changed bool) http.HandlerFunc {
		return func(rw http.ResponseWriter, r *http.Request) {
			p := price
			if changed && strings.HasPrefix(r.URL.Path, "/changed") {
				p++
			}
			rw.Header().Set("Content-Type", "application/json")
			_, _ = fmt.Fprintf(rw, `{"path":%q,"price":%d,"currency":"EUR"}`, r.URL.Path, p)
		}
	}
	primary, err := harness.StartUpstream("127.0.0.1:0", 1000, answer(10, false))
	require.NoError(t, err)
	t.Cleanup(primary.Close)
	broken, err := harness.StartUpstream("127.0.0.1:0", 1000, answer(10, true))
	require.NoError(t, err)
	t.Cleanup(broken.Close)
	fixed, err := harness.StartUpstream("127.0.0.1:0", 1000, answer(10, false))
	require.NoError(t, err)
	t.Cleanup(fixed.Close)

	dir := t.TempDir()
	file, again := filepath.Join(dir, "differences.gor"), filepath.Join(dir, "again.gor")
	metrics := freeAddr(t)
	d := exampleDynamic(t)
	d.Service("primary", primary.URL)
	mw := func(url, file string) {
		recordMirror(d, "mirror-api", map[string]any{"file": file, "what": "differences"},
			map[string]any{"url": url, "metricsAddress": metrics, "compare": map[string]any{"enabled": true}})
	}
	mw(broken.URL, file)
	e := startE2E(t, d)

	const same = 20
	for i := 0; i < same; i++ {
		e.send(t, http.MethodGet, "/same/"+strconv.Itoa(i)+"?x=1", nil)
	}
	body := []byte(`{"order":7,"lines":[1,2,3]}`)
	req := e.request(t, http.MethodPost, "/changed/7?v=2", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer top-secret")
	r := harness.Do(e.client, req)
	require.NoError(t, r.Err)
	require.Equal(t, http.StatusOK, r.Status)
	compared := func(result string) func(s *scrape) float64 {
		return func(s *scrape) float64 {
			v, _ := s.value("traefik_mirror_compared_total", map[string]string{"middleware": "mirror-api@file", "result": result})
			return v
		}
	}
	matched, differed := compared("matched"), compared("differed")
	waitScrape(t, metrics, func(s *scrape) bool { return matched(s) == same && differed(s) == 1 }, "compared")
	s := waitScrape(t, metrics, func(s *scrape) bool {
		v, _ := s.value("traefik_mirror_records_total", map[string]string{"middleware": "mirror-api@file"})
		return v == 1
	}, "one record")

	payloads := readGor(t, file)
	require.Len(t, payloads, 3, "one exchange of three payloads")
	for k, p := range payloads {
		assert.Equal(t, strconv.Itoa(k+1), p.kind)
		assert.Equal(t, payloads[0].id, p.id, "one id")
	}
	rq, rbody := payloads[0].request(t)
	assert.Equal(t, "POST", rq.Method)
	assert.Equal(t, "/changed/7?v=2", rq.RequestURI)
	assert.Equal(t, body, rbody)
	assert.Equal(t, "redacted", rq.Header.Get("Authorization"))
	p2, b2 := payloads[1].response(t)
	p3, b3 := payloads[2].response(t)
	assert.Equal(t, 200, p2)
	assert.Equal(t, 200, p3)
	assert.JSONEq(t, `{"path":"/changed/7","price":10,"currency":"EUR"}`, string(b2), "type 2: the primary's answer")
	assert.JSONEq(t, `{"path":"/changed/7","price":11,"currency":"EUR"}`, string(b3), "type 3: the mirror's answer")
	assert.GreaterOrEqual(t, payloads[1].ts, payloads[0].ts)
	bytesTotal, _ := s.value("traefik_mirror_record_bytes_total", map[string]string{"middleware": "mirror-api@file"})
	assert.Equal(t, float64(fileSize(t, file)), bytesTotal)

	// The shadow fixed: the recorded request, replayed through Traefik, compares alike.
	builds := func() int { return strings.Count(e.traefik.Log(), "mirror mirror-api@file: copying to") }
	n := builds()
	mw(fixed.URL, again)
	require.NoError(t, e.traefik.SetDynamic(d.YAML()))
	require.Eventually(t, func() bool { return builds() > n }, waitLimit, 10*time.Millisecond, "reload")
	require.NoError(t, e.traefik.WaitRouters("enabled", "api"))
	webURL := &harness.Upstream{URL: e.traefik.WebURL}
	replayTo(t, file, webURL, func() bool { return fixed.Count() == 1 })
	waitScrape(t, metrics, func(s *scrape) bool { return matched(s) == same+1 }, "the replay compared")
	s = mustScrape(t, metrics)
	assert.Equal(t, float64(1), differed(s), "no difference with the fixed shadow")
	c, ok := fixed.Next(waitLimit)
	require.True(t, ok)
	assert.Equal(t, "/changed/7", c.Path)
	assert.Equal(t, "v=2", c.RawQuery)
	assert.Equal(t, body, c.Body)
	_, err = os.Stat(again)
	assert.True(t, os.IsNotExist(err), "no difference recorded: %v", err)
}

// replayTo runs GoReplay to an address that is not a recording upstream, until done says so.
func replayTo(t *testing.T, input string, to *harness.Upstream, done func() bool) {
	t.Helper()
	out := &harness.SyncBuffer{}
	cmd := exec.Command(goreplayBinary(t), "--input-file", input, "--input-file-max-wait", "1ms",
		"--output-http", to.URL, "--output-http-workers", "1")
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	require.Eventually(t, done, 20*time.Second, 10*time.Millisecond, "goreplay:\n%s", out)
}

// A record file that cannot be written (a missing directory, a full disk, a FIFO, a directory)
// leaves the primary and the copies as they were: every request answered 200, every copy at the
// mirror; one ERROR line naming the file (at most one per 10 s), and the failures counted.
func TestRecordFailuresLeaveCopiesAlone(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.gor")
	require.NoError(t, syscall.Mkfifo(fifo, 0o644))
	files := map[string]string{
		"missing": filepath.Join(dir, "missing", "copies.gor"),
		"full":    "/dev/full",
		"fifo":    fifo,
		"dir":     dir,
	}
	if _, err := os.Stat("/dev/full"); err != nil {
		delete(files, "full")
		t.Logf("no /dev/full: %v", err)
	}
	metrics := freeAddr(t)
	d := exampleDynamic(t)
	d.HTTP.Routers = map[string]any{}
	var names []string
	for name, file := range files {
		recordMirror(d, "m-"+name, map[string]any{"file": file}, map[string]any{"metricsAddress": metrics})
		d.Router(name, "/"+name, "primary", "m-"+name)
		names = append(names, name)
	}
	e := startE2E(t, d, names...)

	const per = 25
	body := randomBytes(t, 2048)
	results := harness.Run(e.client, per*len(names), 8, func(i int) *http.Request {
		return e.request(t, http.MethodPost, "/"+names[i%len(names)]+"/"+strconv.Itoa(i), bytes.NewReader(body))
	})
	assert.Equal(t, 0, harness.Failures(results))
	for i := 0; i < per*len(names); i++ {
		c, ok := e.mirror.Next(waitLimit)
		require.True(t, ok, "copy %d of %d", i, per*len(names))
		assert.Equal(t, body, c.Body)
	}
	// A copy's record is written (or fails) before the copy is sent, and the copy is counted once
	// the mirror has answered: both counts are awaited.
	s := waitScrape(t, metrics, func(s *scrape) bool {
		for _, name := range names {
			v, _ := s.value("traefik_mirror_record_failures_total", map[string]string{"middleware": "m-" + name + "@file"})
			if v != per || s.outcome("m-"+name+"@file", "sent") != per {
				return false
			}
		}
		return true
	}, "record failures and copies sent")
	log := ansiEscape.ReplaceAllString(e.traefik.Log(), "")
	for _, name := range names {
		assert.Equal(t, float64(per), s.outcome("m-"+name+"@file", "sent"), name)
		v, _ := s.value("traefik_mirror_records_total", map[string]string{"middleware": "m-" + name + "@file"})
		assert.Zero(t, v, name)
		var lines []string
		for _, l := range strings.Split(log, "\n") {
			if strings.Contains(l, "mirror m-"+name+"@file: cannot write record file "+files[name]+": ") {
				lines = append(lines, l)
			}
		}
		if assert.Len(t, lines, 1, "%s: one ERROR line within the interval", name) {
			assert.Contains(t, lines[0], " ERR ", name)
			t.Logf("%s", lines[0])
		}
	}

	// Writing works again (the missing directory made): recording resumes within the retry delay
	// (1 s) while requests come, with no new failure.
	require.NoError(t, os.Mkdir(filepath.Join(dir, "missing"), 0o755))
	start := time.Now()
	written := func() bool {
		b, err := os.ReadFile(files["missing"])
		return err == nil && strings.Contains(string(b), gorSeparator)
	}
	for deadline := start.Add(waitLimit); !written() && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		e.send(t, http.MethodPost, "/missing/again", body)
	}
	require.True(t, written(), "recording did not resume once the directory existed")
	t.Logf("recording resumed %v after the directory was made", time.Since(start).Round(10*time.Millisecond))
	for _, p := range readGor(t, files["missing"]) {
		req, got := p.request(t)
		assert.Equal(t, "/missing/again", req.URL.Path)
		assert.Equal(t, body, got)
	}
	waitScrape(t, metrics, func(s *scrape) bool {
		v, _ := s.value("traefik_mirror_records_total", map[string]string{"middleware": "m-missing@file"})
		return v >= 1
	}, "records counted once writing works")
	assert.True(t, e.traefik.Running())
}

// Bodies that hold GoReplay's separator line cannot forge a payload: GoReplay replays exactly the
// requests that went through Traefik, none injected, and does not fail on the file.
func TestRecordSeparatorInjection(t *testing.T) {
	goreplayBinary(t)
	dir := t.TempDir()
	file, cut := filepath.Join(dir, "inj.gor"), filepath.Join(dir, "cut.gor")
	d := exampleDynamic(t)
	recordMirror(d, "mirror-api", map[string]any{"file": file}, nil)
	// The same, with record.maxBodySize cutting a body right after a separator's characters.
	recordMirror(d, "m-cut", map[string]any{"file": cut, "maxBodySize": 12}, nil)
	d.Router("cut", "/cut", "primary", "m-cut")
	e := startE2E(t, d, "api", "cut")

	monkeys := "\U0001F435\U0001F648\U0001F649"
	forged := "1 " + strings.Repeat("f", 24) + " 1 0\nGET /injected HTTP/1.1\r\nHost: evil\r\nX-Seq: 999\r\n\r\n"
	bodies := []string{
		"before\n" + monkeys + "\n" + forged,
		monkeys + "\n" + forged,
		"tail\n" + monkeys,
		monkeys,
		"\n" + monkeys,
		monkeys + "\n",
		monkeys + monkeys + "\n" + monkeys + "\n" + forged,
		"x" + monkeys + "\n" + forged, // not a line of its own: written whole
		"plain",
	}
	for i, b := range bodies {
		for _, path := range []string{"/inj/", "/cut/"} {
			req := e.request(t, http.MethodPost, path+strconv.Itoa(i), strings.NewReader(b))
			req.Header.Set("X-Seq", strconv.Itoa(i))
			r := harness.Do(e.client, req)
			require.NoError(t, r.Err)
			require.Equal(t, http.StatusOK, r.Status)
		}
	}
	require.Eventually(t, func() bool { return e.mirror.Count() == 2*len(bodies) }, waitLimit, 10*time.Millisecond)

	// A raw query with spaces, as HTTP/2 lets it through (:path is not split on spaces): the
	// record's request line must still parse. (The primary answers 400; the copy does not leave.)
	u, err := url.Parse(e.traefik.WebURL + "/inj/space")
	require.NoError(t, err)
	u.RawQuery = "x=a b HTTP/1.1"
	req, err := http.NewRequest(http.MethodGet, e.traefik.WebURL, nil)
	require.NoError(t, err)
	req.URL = u
	req.Header.Set("X-Seq", strconv.Itoa(len(bodies)))
	resp, err := h2cClient().Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(file)
		return err == nil && strings.Count(string(b), gorSeparator) == len(bodies)+1
	}, waitLimit, 10*time.Millisecond, "the record of the request with spaces")

	for _, f := range []string{file, cut} {
		t.Run(filepath.Base(f), func(t *testing.T) {
			want := len(bodies)
			if f == file {
				want++
			}
			payloads := readGor(t, f)
			require.Len(t, payloads, want)
			recorder, err := harness.StartUpstream("127.0.0.1:0", 100, nil)
			require.NoError(t, err)
			t.Cleanup(recorder.Close)
			out := replayed(t, f, recorder, want)
			assert.NotContains(t, out, "panic")
			got := bySeq(t, recorder, want, "replay")
			for i, b := range bodies {
				r := got[i]
				assert.NotEqual(t, "/injected", r.Path)
				assert.True(t, strings.HasPrefix(b, string(r.Body)), "%d: the replayed body %q is the sent one's beginning", i, r.Body)
				assert.NotContains(t, string(r.Body), "\n"+monkeys+"\n", i)
				if !strings.Contains("\n"+b+"\n", "\n"+monkeys+"\n") && f == file {
					assert.Equal(t, b, string(r.Body), "%d: a body with no separator line is written whole", i)
				}
			}
			if f == file {
				r := got[len(bodies)]
				assert.Equal(t, "/inj/space", r.Path)
				assert.Equal(t, "x=a%20b%20HTTP/1.1", r.RawQuery)
			}
		})
	}
}

// maxBodySize -1 streams a body past bodyBuffer: the record holds only what the copy held when it
// began to stream (bounded), marked as cut, and GoReplay still replays it.
func TestRecordStreamedBodyIsBounded(t *testing.T) {
	goreplayBinary(t)
	file := filepath.Join(t.TempDir(), "stream.gor")
	d := exampleDynamic(t)
	recordMirror(d, "mirror-api", map[string]any{"file": file}, map[string]any{"maxBodySize": -1, "bodyBuffer": 65536})
	e := startE2E(t, d)
	big := randomBytes(t, 3<<20)
	req := e.request(t, http.MethodPut, "/big", chunked{bytes.NewReader(big)})
	req.Header.Set("X-Seq", "0")
	r := harness.Do(e.client, req)
	require.NoError(t, r.Err)
	require.Equal(t, http.StatusOK, r.Status)
	c, ok := e.mirror.Next(waitLimit)
	require.True(t, ok)
	assert.Equal(t, sum(big), sum(c.Body), "the copy streamed whole")
	payloads := readGor(t, file)
	require.Len(t, payloads, 1)
	rq, body := payloads[0].request(t)
	assert.LessOrEqual(t, len(body), 65536)
	assert.Positive(t, len(body))
	assert.Equal(t, sum(big[:len(body)]), sum(body), "the body's beginning")
	assert.Equal(t, strconv.Itoa(len(body))+" of unknown bytes", rq.Header.Get("X-Mirror-Record-Cut"))
	t.Logf("3 MiB streamed body: %d bytes recorded, file %d bytes", len(body), fileSize(t, file))

	recorder, err := harness.StartUpstream("127.0.0.1:0", 10, nil)
	require.NoError(t, err)
	t.Cleanup(recorder.Close)
	replayed(t, file, recorder, 1)
	got, ok := recorder.Next(waitLimit)
	require.True(t, ok)
	assert.Equal(t, sum(body), sum(got.Body))
	assert.Equal(t, "/big", got.Path)
}

// Two middlewares naming the same file share one writer: under concurrent load from both, every
// record is whole (none interleaved), and GoReplay replays them all.
func TestRecordSharedFileConcurrentWriters(t *testing.T) {
	goreplayBinary(t)
	file := filepath.Join(t.TempDir(), "shared.gor")
	d := exampleDynamic(t)
	d.HTTP.Routers = map[string]any{}
	for _, name := range []string{"a", "b"} {
		recordMirror(d, "m-"+name, map[string]any{"file": file}, nil)
		d.Router(name, "/"+name, "primary", "m-"+name)
	}
	e := startE2E(t, d, "a", "b")
	const n = 200
	bodies := make([][]byte, n)
	for i := range bodies {
		bodies[i] = randomBytes(t, 1+(i*1237)%(96<<10))
	}
	results := harness.Run(e.client, n, 16, func(i int) *http.Request {
		path := "/a/"
		if i%2 == 1 {
			path = "/b/"
		}
		req := e.request(t, http.MethodPost, path+strconv.Itoa(i), bytes.NewReader(bodies[i]))
		req.Header.Set("X-Seq", strconv.Itoa(i))
		return req
	})
	require.Equal(t, 0, harness.Failures(results))
	bySeq(t, e.mirror, n, "mirror")
	payloads := readGor(t, file)
	require.Len(t, payloads, n)
	ids := map[string]bool{}
	for _, p := range payloads {
		rq, body := p.request(t)
		seq, err := strconv.Atoi(rq.Header.Get("X-Seq"))
		require.NoError(t, err)
		assert.Equal(t, sum(bodies[seq]), sum(body), "%d", seq)
		assert.False(t, ids[p.id], "id %s twice", p.id)
		ids[p.id] = true
	}
	recorder, err := harness.StartUpstream("127.0.0.1:0", n+10, nil)
	require.NoError(t, err)
	t.Cleanup(recorder.Close)
	replayed(t, file, recorder, n)
	for seq, r := range bySeq(t, recorder, n, "replay") {
		assert.Equal(t, sum(bodies[seq]), sum(r.Body), "%d", seq)
	}
}

// How redactHeaders arrives through Traefik's file provider: the default (Authorization, Cookie,
// Proxy-Authorization, Set-Cookie), an empty list `[]`, and ["none"].
func TestRecordRedactHeadersThroughFileProvider(t *testing.T) {
	dir := t.TempDir()
	cases := map[string]any{"default": nil, "empty": []any{}, "none": []any{"none"}, "custom": []any{"X-Api-Key"}}
	d := exampleDynamic(t)
	d.HTTP.Routers = map[string]any{}
	var names []string
	for name, redact := range cases {
		rec := map[string]any{"file": filepath.Join(dir, name+".gor")}
		if redact != nil {
			rec["redactHeaders"] = redact
		}
		recordMirror(d, "m-"+name, rec, nil)
		d.Router(name, "/"+name, "primary", "m-"+name)
		names = append(names, name)
	}
	yml := d.YAML()
	require.Contains(t, yml, "redactHeaders: []", "the YAML Traefik reads")
	e := startE2E(t, d, names...)
	for _, name := range names {
		req := e.request(t, http.MethodGet, "/"+name, nil)
		req.Header.Set("Authorization", "Bearer s3cret")
		req.Header.Set("X-Api-Key", "k3y")
		r := harness.Do(e.client, req)
		require.NoError(t, r.Err)
		require.Equal(t, http.StatusOK, r.Status)
	}
	for i := 0; i < len(names); i++ { // the record is written before the copy leaves
		_, ok := e.mirror.Next(waitLimit)
		require.True(t, ok)
	}
	headers := map[string]http.Header{}
	for _, name := range names {
		payloads := readGor(t, filepath.Join(dir, name+".gor"))
		require.Len(t, payloads, 1, name)
		rq, _ := payloads[0].request(t)
		headers[name] = rq.Header
		t.Logf("%-7s Authorization=%q X-Api-Key=%q", name, rq.Header.Get("Authorization"), rq.Header.Get("X-Api-Key"))
	}
	assert.Equal(t, "redacted", headers["default"].Get("Authorization"))
	assert.Equal(t, "k3y", headers["default"].Get("X-Api-Key"))
	assert.Equal(t, "Bearer s3cret", headers["none"].Get("Authorization"), `["none"] keeps every header`)
	assert.Equal(t, "redacted", headers["custom"].Get("X-Api-Key"))
	assert.Equal(t, "Bearer s3cret", headers["custom"].Get("Authorization"), "a list replaces the default")
	// `redactHeaders: []` in YAML: Traefik's file provider (paerser's raw node decoding) turns an
	// empty list into the empty string, and its decoder's StringToSliceHookFunc(",") turns "" into
	// an empty []string, which replaces the default list: nothing is redacted, as with ["none"].
	assert.Equal(t, "Bearer s3cret", headers["empty"].Get("Authorization"), "[] reaches the plugin as an empty list: nothing redacted")
	assert.Equal(t, headers["none"], headers["empty"])
}

// The recorder interpreted by Yaegi v0.16.1, as Traefik runs it (no Traefik): framing,
// redaction, a body that is the separator's characters, rotation. (A tuple assignment to the
// recorder's fields left its file nil under Yaegi alone: every write failed.)
func TestRecordUnderYaegi(t *testing.T) {
	p := loadInterpreted(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "copies.gor")
	s := newYaegiStack(t, p, map[string]any{"record": map[string]any{"file": file, "maxSize": 4096, "maxFiles": 2}}, "rec@file", nil)
	monkeys := gorSeparator[1 : len(gorSeparator)-1]
	const n = 20
	for i := 0; i < n; i++ {
		body := strings.Repeat(string(rune('a'+i)), 700)
		if i == 1 {
			body = monkeys
		}
		req, err := http.NewRequest(http.MethodPost, s.front.URL+"/y/"+strconv.Itoa(i)+"?q=1", strings.NewReader(body))
		require.NoError(t, err)
		req.Header.Set("X-Seq", strconv.Itoa(i))
		req.Header.Set("Authorization", "Bearer y-secret")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		_, ok := s.mirror.Next(waitLimit) // one at a time: Yaegi builds some types on first use without a lock
		require.True(t, ok, "copy %d", i)
	}
	names, err := filepath.Glob(filepath.Join(dir, "copies_*.gor"))
	require.NoError(t, err)
	sort.Slice(names, func(i, j int) bool { return chunkIndex(filepath.Base(names[i])) < chunkIndex(filepath.Base(names[j])) })
	require.Len(t, names, 2, "maxFiles rotated files: %v", names)
	var seqs []int
	for _, name := range append(names, file) {
		for _, pl := range readGor(t, name) {
			req, body := pl.request(t)
			seq, err := strconv.Atoi(req.Header.Get("X-Seq"))
			require.NoError(t, err)
			seqs = append(seqs, seq)
			assert.Equal(t, "/y/"+strconv.Itoa(seq)+"?q=1", req.RequestURI)
			assert.Equal(t, "redacted", req.Header.Get("Authorization"))
			if seq == 1 {
				assert.Empty(t, body)
				assert.Equal(t, "0 of 12 bytes", req.Header.Get("X-Mirror-Record-Cut"))
			} else {
				assert.Equal(t, strings.Repeat(string(rune('a'+seq)), 700), string(body))
			}
		}
	}
	require.NotEmpty(t, seqs)
	for k := 1; k < len(seqs); k++ {
		assert.Equal(t, seqs[k-1]+1, seqs[k], "%v", seqs)
	}
	assert.Equal(t, n-1, seqs[len(seqs)-1])
}

// The file taken away while Traefik writes it (moved to be replayed, or deleted): the records
// that were written go with it, and recording goes on at the path, none lost once the file is due
// for rotation, none counted as failed.
func TestRecordFileMovedAway(t *testing.T) {
	dir := t.TempDir()
	file, taken := filepath.Join(dir, "copies.gor"), filepath.Join(dir, "taken.gor")
	metrics := freeAddr(t)
	d := exampleDynamic(t)
	recordMirror(d, "mirror-api", map[string]any{"file": file, "maxSize": 4096, "maxFiles": 5}, map[string]any{"metricsAddress": metrics})
	e := startE2E(t, d)
	send := func(i int) {
		req := e.request(t, http.MethodPost, "/m/"+strconv.Itoa(i), bytes.NewReader(bytes.Repeat([]byte{'m'}, 900)))
		req.Header.Set("X-Seq", strconv.Itoa(i))
		r := harness.Do(e.client, req)
		require.NoError(t, r.Err)
		require.Equal(t, http.StatusOK, r.Status)
		_, ok := e.mirror.Next(waitLimit) // the record is written before the copy leaves
		require.True(t, ok, "copy %d", i)
	}
	const before, after = 2, 12
	for i := 0; i < before; i++ {
		send(i)
	}
	require.NoError(t, os.Rename(file, taken))
	for i := before; i < before+after; i++ {
		send(i)
	}
	s := waitScrape(t, metrics, func(s *scrape) bool {
		v, _ := s.value("traefik_mirror_records_total", map[string]string{"middleware": "mirror-api@file"})
		f, _ := s.value("traefik_mirror_record_failures_total", map[string]string{"middleware": "mirror-api@file"})
		return v+f == before+after
	}, "records and failures")
	failed, _ := s.value("traefik_mirror_record_failures_total", map[string]string{"middleware": "mirror-api@file"})
	assert.Zero(t, failed, "records not written after the file was moved")
	seen := map[int]bool{}
	names, err := filepath.Glob(filepath.Join(dir, "*.gor"))
	require.NoError(t, err)
	for _, name := range names {
		for _, p := range readGor(t, name) {
			req, _ := p.request(t)
			seq, err := strconv.Atoi(req.Header.Get("X-Seq"))
			require.NoError(t, err)
			seen[seq] = true
		}
	}
	t.Logf("files: %v; records found: %d of %d", names, len(seen), before+after)
	assert.Len(t, seen, before+after, "every record in one of the files")
	_, err = os.Stat(file)
	assert.NoError(t, err, "recording goes on at the path")
}

// The file is kept across reloads: under traffic, five reloads of the middleware lose no record
// and cut none; every copy that reached the mirror is in the file, whole.
func TestRecordAcrossReloads(t *testing.T) {
	file := filepath.Join(t.TempDir(), "copies.gor")
	metrics := freeAddr(t)
	d := exampleDynamic(t)
	recordMirror(d, "mirror-api", map[string]any{"file": file}, map[string]any{"metricsAddress": metrics})
	e := startE2E(t, d)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	sent := 0
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				req := e.request(t, http.MethodPost, "/reload/"+strconv.Itoa(w)+"/"+strconv.Itoa(i), strings.NewReader(strings.Repeat("r", 500+i%500)))
				r := harness.Do(e.client, req)
				if r.Err == nil && r.Status == http.StatusOK {
					mu.Lock()
					sent++
					mu.Unlock()
				}
			}
		}(w)
	}
	builds := func() int { return strings.Count(e.traefik.Log(), "mirror mirror-api@file: copying to") }
	for i := 0; i < 5; i++ {
		n := builds()
		recordMirror(d, "mirror-api", map[string]any{"file": file}, map[string]any{"metricsAddress": metrics, "timeout": strconv.Itoa(6+i) + "s"})
		require.NoError(t, e.traefik.SetDynamic(d.YAML()))
		require.Eventually(t, func() bool { return builds() > n }, waitLimit, 5*time.Millisecond, "reload %d", i)
	}
	close(stop)
	wg.Wait()
	require.Eventually(t, func() bool { return e.mirror.Count() == e.primary.Count() }, waitLimit, 10*time.Millisecond, "copies")
	s := waitScrape(t, metrics, func(s *scrape) bool {
		v, _ := s.value("traefik_mirror_records_total", map[string]string{"middleware": "mirror-api@file"})
		return int(v) == e.mirror.Count()
	}, "every copy recorded")
	failed, _ := s.value("traefik_mirror_record_failures_total", map[string]string{"middleware": "mirror-api@file"})
	assert.Zero(t, failed)
	payloads := readGor(t, file)
	assert.Len(t, payloads, e.mirror.Count())
	for _, p := range payloads {
		req, body := p.request(t)
		assert.True(t, strings.HasPrefix(req.URL.Path, "/reload/"))
		assert.Equal(t, strings.Repeat("r", len(body)), string(body))
	}
	t.Logf("%d requests across 5 reloads, %d records", sent, len(payloads))
	assert.NotContains(t, e.traefik.Log(), "cannot write record file")
}
