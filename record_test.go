package mirror

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
)

// payload is one payload of a record file, as GoReplay's file input reads it.
type payload struct {
	meta []string // type, id, timestamp, latency
	data []byte   // the raw HTTP message
}

// readPayloads splits a record file as GoReplay v1.3.2 does (input_file.go): line by line, a
// payload ending at a line that is the separator alone, its last newline dropped.
func readPayloads(t *testing.T, path string) []payload {
	t.Helper()
	b, err := os.ReadFile(path)
	noError(t, err)
	out, rest := splitPayloads(b)
	equal(t, rest, 0, "bytes after the last payload of "+path)
	return out
}

// splitPayloads splits a record, and says how many bytes follow its last separator.
func splitPayloads(b []byte) (out []payload, rest int) {
	r := bufio.NewReader(bytes.NewReader(b))
	var buf bytes.Buffer
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return out, buf.Len() + len(line)
		}
		if string(line) != recordSeparator[1:] {
			buf.Write(line)
			continue
		}
		p := buf.Bytes()
		if len(p) == 0 { // GoReplay v1.3.2 would panic here: never written
			return out, -1
		}
		p = p[:len(p)-1]
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			i = len(p)
			p = append(p, '\n')
		}
		out = append(out, payload{meta: strings.Split(string(p[:i]), " "), data: append([]byte(nil), p[i+1:]...)})
		buf.Reset()
	}
}

func (p payload) request(t *testing.T) *http.Request {
	t.Helper()
	req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(p.data)))
	noError(t, err)
	return req
}

func (p payload) answer(t *testing.T) (int, http.Header, []byte) {
	t.Helper()
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(p.data)), nil)
	noError(t, err)
	defer func() { _ = resp.Body.Close() }()
	return resp.StatusCode, resp.Header, readAll(t, resp.Body)
}

func readAll(t *testing.T, r io.Reader) []byte {
	t.Helper()
	b, err := io.ReadAll(r)
	noError(t, err)
	return b
}

func recordConfig(t *testing.T, what string) (*Config, string) {
	t.Helper()
	cfg := CreateConfig()
	cfg.Record.File = filepath.Join(t.TempDir(), "copies.gor")
	cfg.Record.What = what
	return cfg, cfg.Record.File
}

// TestRecordCopies: every copy is written as the primary got it, before shaping, its secrets
// redacted, and GoReplay's reading of the file gives each request back.
func TestRecordCopies(t *testing.T) {
	t.Parallel()
	cfg, path := recordConfig(t, "copies")
	cfg.SetHeaders = map[string]string{"X-Shadow": "1"}
	cfg.RemoveHeaders = []string{"X-Drop"}
	s := newStack(t, cfg, nil)

	bodies := [][]byte{nil, []byte(`{"a":1}`), randomBytes(t, 200<<10), []byte("tail\n\U0001F435\U0001F648\U0001F649\nGET /injected HTTP/1.1\r\n\r\n")}
	for i, body := range bodies {
		var r io.Reader
		method := http.MethodGet
		if body != nil {
			method, r = http.MethodPost, bytes.NewReader(body)
		}
		req := newRequest(t, method, s.front.URL+"/p/%C3%A9t%C3%A9?q=1&q=2", r)
		req.Header.Set("Authorization", "Bearer secret")
		req.Header["Cookie"] = []string{"a=1", "b=2"}
		req.Header.Set("X-Drop", "kept in the record")
		req.Header.Add("X-Many", "1")
		req.Header.Add("X-Many", "2")
		code, _ := s.do(t, req)
		equal(t, code, http.StatusOK, "status")
		s.waitOutcome(t, sent, int64(i+1))
	}
	got := readPayloads(t, path)
	equal(t, len(got), len(bodies), "payloads")
	sort.Slice(got, func(i, j int) bool { return got[i].meta[1] < got[j].meta[1] })
	for i, p := range got {
		equal(t, p.meta[0], "1", "payload type")
		equal(t, len(p.meta[1]), 24, "id length")
		req := p.request(t)
		equal(t, req.URL.RequestURI(), "/p/%C3%A9t%C3%A9?q=1&q=2", "target")
		equal(t, req.Header.Get("Authorization"), redacted, "Authorization")
		equal(t, strings.Join(req.Header["Cookie"], ","), "redacted,redacted", "Cookie")
		equal(t, req.Header.Get("X-Drop"), "kept in the record", "a header removeHeaders takes off the copy")
		equal(t, req.Header.Get("X-Shadow"), "", "a header setHeaders puts on the copy")
		equal(t, strings.Join(req.Header["X-Many"], ","), "1,2", "repeated header")
		equal(t, req.Header.Get(loopHeader), "", "the loop header")
		body := readAll(t, req.Body)
		if i < 3 {
			equal(t, req.Header.Get(recordCutHeader), "", "cut header")
			equal(t, string(body), string(bodies[i]), "body")
			continue
		}
		// A body holding the separator line is written up to it, and says so.
		equal(t, string(body), "tail", "body cut before the separator")
		contains(t, req.Header.Get(recordCutHeader), "4 of ")
	}
	equal(t, s.m.st.records, int64(len(bodies)), "records counted")
	info, err := os.Stat(path)
	noError(t, err)
	equal(t, s.m.st.recordBytes, info.Size(), "bytes counted")
}

func TestRecordBodyCutAtMaxBodySize(t *testing.T) {
	t.Parallel()
	cfg, path := recordConfig(t, "copies")
	cfg.Record.MaxBodySize = 10
	cfg.Record.RedactHeaders = []string{"none"}
	s := newStack(t, cfg, nil)
	req := newRequest(t, http.MethodPut, s.front.URL+"/up", strings.NewReader("0123456789abcdef"))
	req.Header.Set("Authorization", "Bearer kept")
	code, _ := s.do(t, req)
	equal(t, code, http.StatusOK, "status")
	equal(t, len(s.mirror.next(t).body), 16, "the copy's body")
	s.waitOutcome(t, sent, 1)
	got := readPayloads(t, path)
	equal(t, len(got), 1, "payloads")
	r := got[0].request(t)
	equal(t, string(readAll(t, r.Body)), "0123456789", "body")
	equal(t, r.Header.Get(recordCutHeader), "10 of 16 bytes", "cut header")
	equal(t, r.Header.Get("Authorization"), "Bearer kept", "redactHeaders none")
}

// TestRecordRotation: past maxSize the file is renamed as GoReplay names its chunks, and at
// most maxFiles are kept, the newest.
func TestRecordRotation(t *testing.T) {
	t.Parallel()
	cfg, path := recordConfig(t, "copies")
	cfg.Record.MaxSize = minRecordMaxSize
	cfg.Record.MaxFiles = 2
	s := newStack(t, cfg, nil)
	body := bytes.Repeat([]byte("x"), 3000) // one record per file
	for i := 1; i <= 5; i++ {
		code, _ := s.do(t, newRequest(t, http.MethodPost, s.front.URL+"/r", bytes.NewReader(body)))
		equal(t, code, http.StatusOK, "status")
		s.waitOutcome(t, sent, int64(i))
	}
	dir := filepath.Dir(path)
	entries, err := os.ReadDir(dir)
	noError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	equal(t, strings.Join(names, " "), "copies.gor copies_2.gor copies_3.gor", "files")
	for _, name := range names {
		equal(t, len(readPayloads(t, filepath.Join(dir, name))), 1, "payloads in "+name)
	}
	equal(t, s.m.st.recordFailed, 0, "failures")
}

// TestRecordFileTakenAway: the file moved away while open; at its rotation a new one begins at
// the path, with no record failed.
func TestRecordFileTakenAway(t *testing.T) {
	t.Parallel()
	cfg, path := recordConfig(t, "copies")
	cfg.Record.MaxSize = minRecordMaxSize
	s := newStack(t, cfg, nil)
	body := bytes.Repeat([]byte("x"), 3000) // one record per file
	for i := 1; i <= 4; i++ {
		if i == 2 {
			noError(t, os.Rename(path, path+".taken"))
		}
		code, _ := s.do(t, newRequest(t, http.MethodPost, s.front.URL+"/r", bytes.NewReader(body)))
		equal(t, code, http.StatusOK, "status")
		s.waitOutcome(t, sent, int64(i))
	}
	equal(t, len(readPayloads(t, path+".taken")), 1, "payloads in the file taken away")
	equal(t, len(readPayloads(t, path)), 1, "payloads in the new file")
	rotated, err := filepath.Glob(strings.TrimSuffix(path, ".gor") + "_*.gor")
	noError(t, err)
	equal(t, len(rotated), 2, "rotated files")
	equal(t, atomic.LoadInt64(&s.m.st.recordFailed), 0, "failures")
}

// TestRecordFailuresLeaveCopies: a file that cannot be written is no configuration error; the
// copies go on, the failures are counted and said at ERROR, naming the file.
func TestRecordFailuresLeaveCopies(t *testing.T) {
	t.Parallel()
	for _, path := range []string{"/dev/full", filepath.Join(t.TempDir(), "missing", "copies.gor")} {
		t.Run(filepath.Base(path), func(t *testing.T) { recordFails(t, path) })
	}
}

func recordFails(t *testing.T, path string) {
	cfg := CreateConfig()
	cfg.Record.File = path
	s := newStack(t, cfg, nil)
	for i := 1; i <= 3; i++ {
		code, _ := s.do(t, newRequest(t, http.MethodPost, s.front.URL+"/f", strings.NewReader("body")))
		equal(t, code, http.StatusOK, "status")
		equal(t, string(s.mirror.next(t).body), "body", "the copy's body")
		s.waitOutcome(t, sent, int64(i))
	}
	equal(t, s.m.st.recordFailed, 3, "failures")
	equal(t, s.m.st.records, 0, "records")
	contains(t, s.stderr.String(), "cannot write record file "+path)
	equal(t, strings.Count(s.stderr.String(), "cannot write record file"), 1, "lines within the log interval")
	if path == "/dev/full" {
		return
	}
	// Once the file can be written, recording resumes (a failed open is tried again after
	// recordRetry).
	noError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	eventually(t, func() bool {
		code, _ := s.do(t, newRequest(t, http.MethodPost, s.front.URL+"/f", strings.NewReader("body")))
		return code == http.StatusOK && atomic.LoadInt64(&s.m.st.records) > 0
	}, "recording resumed")
}

// TestRecordStreamedCopy: a body that streams is recorded as far as the copy held it when it
// began to stream, and says so.
func TestRecordStreamedCopy(t *testing.T) {
	t.Parallel()
	cfg, path := recordConfig(t, "copies")
	cfg.MaxBodySize = -1
	cfg.Record.MaxBodySize = 100
	s := newStack(t, cfg, nil)
	body := randomBytes(t, 3<<20)
	code, _ := s.do(t, newRequest(t, http.MethodPost, s.front.URL+"/big", bytes.NewReader(body)))
	equal(t, code, http.StatusOK, "status")
	equal(t, len(s.mirror.next(t).body), len(body), "the copy's body")
	s.waitOutcome(t, sent, 1)
	got := readPayloads(t, path)
	equal(t, len(got), 1, "payloads")
	r := got[0].request(t)
	equal(t, r.Header.Get(recordCutHeader), "100 of 3145728 bytes", "cut header")
	equal(t, string(readAll(t, r.Body)), string(body[:100]), "the body's first bytes")
}

// TestRecordDifferences: identical answers write nothing; answers that differ write the
// exchange: the request, the primary's answer and the mirror's, under one id.
func TestRecordDifferences(t *testing.T) {
	t.Parallel()
	cfg, path := recordConfig(t, "differences")
	cfg.Compare.Enabled = true
	s := newStack(t, cfg, func(rw http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/differs" {
			rw.Header().Set("Set-Cookie", "session=mirror")
			_, _ = rw.Write([]byte("mirror's"))
		}
	})
	for i, p := range []string{"/same", "/differs"} {
		code, _ := s.do(t, newRequest(t, http.MethodPost, s.front.URL+p, strings.NewReader("q")))
		equal(t, code, http.StatusOK, "status")
		s.waitOutcome(t, sent, int64(i+1))
	}
	st := s.m.st.compare.Load().(*compareStats)
	eventually(t, func() bool { return st.results[differed]+st.results[matched] == 2 }, "both compared")
	got := readPayloads(t, path)
	equal(t, len(got), 3, "payloads")
	for i, p := range got {
		equal(t, p.meta[0], string(rune('1'+i)), "payload type")
		equal(t, p.meta[1], got[0].meta[1], "one id")
	}
	req := got[0].request(t)
	equal(t, req.URL.Path, "/differs", "the request")
	equal(t, string(readAll(t, req.Body)), "q", "the request's body")
	code, _, pb := got[1].answer(t)
	equal(t, code, http.StatusOK, "the primary's status")
	equal(t, string(pb), "", "the primary's body")
	_, mh, mb := got[2].answer(t)
	equal(t, string(mb), "mirror's", "the mirror's body")
	equal(t, mh.Get("Set-Cookie"), redacted, "Set-Cookie")
}

func TestRecordConfiguration(t *testing.T) {
	t.Parallel()
	for _, test := range []struct {
		set  func(*RecordConfig)
		want string
	}{
		{func(r *RecordConfig) { r.What = "all" }, "record.what"},
		{func(r *RecordConfig) { r.What = "differences" }, "compare"},
		{func(r *RecordConfig) { r.MaxSize = 100 }, "record.maxSize"},
		{func(r *RecordConfig) { r.MaxFiles = -1 }, "record.maxFiles"},
		{func(r *RecordConfig) { r.MaxBodySize = -1 }, "record.maxBodySize"},
		{func(r *RecordConfig) { r.RedactHeaders = []string{"Bad Name"} }, "record.redactHeaders"},
		{func(r *RecordConfig) { r.What = "differences"; r.File = "./same.log" }, "compare.logFile"},
	} {
		cfg := CreateConfig()
		cfg.URL = "http://127.0.0.1:1"
		cfg.Record.File = filepath.Join(t.TempDir(), "r.gor")
		if test.want == "compare.logFile" {
			cfg.Compare.Enabled = true
			cfg.Compare.LogFile = "same.log"
		}
		test.set(&cfg.Record)
		_, err := compile(cfg)
		if err == nil || !strings.Contains(err.Error(), test.want) {
			t.Errorf("error %v, want one about %s", err, test.want)
		}
	}
}

func TestWritable(t *testing.T) {
	t.Parallel()
	sep := recordSeparator
	for _, test := range []struct {
		body  string
		limit int64
		want  int
	}{
		{"plain", 100, 5},
		{"0123456789", 4, 4},
		{sep[1:] + "x", 100, 0},
		{"ab" + sep + "cd", 100, 2},
		{"ab" + sep[:len(sep)-1], 100, 2},
		{"ab\U0001F435\U0001F648\U0001F649\n", 100, 15}, // not at a line's start
		{sep[1 : len(sep)-1], 100, 0},                   // the body's first line, ended by the separator
		{sep[1:len(sep)-1] + "\nmore", 12, 0},           // the same, cut by the limit
		{"x" + sep[1:len(sep)-1], 100, 13},              // not at a line's start
	} {
		equal(t, writable([]byte(test.body), test.limit), test.want, "writable of "+test.body)
	}
}

// FuzzRecordFraming: whatever a client sends as a body or a header value, its record is one
// payload that reads back as the request, with the body whole or cut, never another payload.
func FuzzRecordFraming(f *testing.F) {
	f.Add([]byte("plain"), "v")
	f.Add([]byte(recordSeparator+"1 x 0 0\nGET /forged HTTP/1.1\r\n\r\n"), "v")
	f.Add([]byte(recordSeparator[1:]), recordSeparator[1:5])
	f.Add([]byte("a\n\U0001F435\U0001F648\U0001F649"), "\U0001F435")
	cfg := defaultRecord()
	cfg.File = "unused.gor"
	cfg.MaxBodySize = 64
	rs, err := compileRecord(&cfg, false)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body []byte, value string) {
		for _, c := range []byte(value) {
			if c < ' ' && c != '\t' || c == 0x7f { // Go's server refuses such a value
				return
			}
		}
		r := &recorded{method: "POST", target: "/x?y=1", host: "h", header: http.Header{"X-Value": {value}}, body: body, length: int64(len(body))}
		var buf bytes.Buffer
		writeRequest(&buf, rs, exchangeID(), r)
		got, rest := splitPayloads(buf.Bytes())
		if len(got) != 1 || rest != 0 {
			t.Fatalf("%d payloads, %d bytes after them, from %q", len(got), rest, buf.Bytes())
		}
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(got[0].data)))
		if err != nil {
			t.Fatalf("%v: %q", err, got[0].data)
		}
		b, err := io.ReadAll(req.Body)
		if err != nil || !bytes.HasPrefix(body, b) || len(b) < len(body) && req.Header.Get(recordCutHeader) == "" {
			t.Fatalf("body %q (%v), cut %q, from %q", b, err, req.Header.Get(recordCutHeader), body)
		}
	})
}
