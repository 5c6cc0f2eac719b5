package mirror

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func compareSettingsFor(t *testing.T, c CompareConfig) *compareSettings {
	t.Helper()
	c.Enabled = true
	if c.MaxBodySize == 0 {
		c.MaxBodySize = 64 << 10
	}
	if c.Percent == 0 {
		c.Percent = 100
	}
	s, err := compileCompare(&c)
	noError(t, err)
	return s
}

func jsonSide(code int, body string, header ...string) side {
	h := http.Header{"Content-Type": {"application/json"}}
	for i := 0; i+1 < len(header); i += 2 {
		h.Add(header[i], header[i+1])
	}
	return side{code: code, header: h, body: []byte(body)}
}

func gzipped(t *testing.T, s string) []byte {
	t.Helper()
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	_, err := io.WriteString(zw, s)
	noError(t, err)
	noError(t, zw.Close())
	return b.Bytes()
}

func TestDifferences(t *testing.T) {
	plain := func(body string) side {
		return side{code: 200, header: http.Header{"Content-Type": {"text/plain"}}, body: []byte(body)}
	}
	zipped := func(body []byte) side {
		return side{code: 200, header: http.Header{"Content-Type": {"application/json"}, "Content-Encoding": {"gzip"}}, body: body}
	}
	tests := []struct {
		desc       string
		cfg        CompareConfig
		prim, mir  side
		expDiffs   []difference
		expPrefix  string // of a body difference's values, instead of expDiffs
		expNoDiffs bool
	}{
		{desc: "JSON as values: key order, whitespace, noise headers",
			prim:       jsonSide(200, `{"a":1,"b":[1,2]}`, "Date", "Mon", "Server", "p", "X-Request-Id", "1", "Content-Length", "17"),
			mir:        jsonSide(200, "{\n \"b\": [1, 2],\n \"a\": 1\n}", "Date", "Tue", "Server", "m", "X-Request-Id", "2"),
			expNoDiffs: true},
		{desc: "status", prim: jsonSide(200, `{}`), mir: jsonSide(503, `{}`),
			expDiffs: []difference{{Kind: "status", Primary: "200", Mirror: "503"}}},
		{desc: "header", prim: jsonSide(200, `{}`, "Cache-Control", "no-store"), mir: jsonSide(200, `{}`, "Cache-Control", "max-age=60"),
			expDiffs: []difference{{Kind: "header", Name: "Cache-Control", Primary: "no-store", Mirror: "max-age=60"}}},
		{desc: "ignoreHeaders", cfg: CompareConfig{IgnoreHeaders: []string{"cache-control"}},
			prim: jsonSide(200, `{}`, "Cache-Control", "no-store"), mir: jsonSide(200, `{}`, "Cache-Control", "max-age=60"), expNoDiffs: true},
		{desc: "Set-Cookie by name", prim: jsonSide(200, `{}`, "Set-Cookie", "s=1; Path=/"), mir: jsonSide(200, `{}`, "Set-Cookie", "s=2; Path=/"),
			expNoDiffs: true},
		{desc: "Set-Cookie names differ", prim: jsonSide(200, `{}`, "Set-Cookie", "s=1"), mir: jsonSide(200, `{}`, "Set-Cookie", "t=1"),
			expDiffs: []difference{{Kind: "header", Name: "Set-Cookie", Primary: "s", Mirror: "t"}}},
		{desc: "JSON paths",
			prim: jsonSide(200, `{"id":7,"meta":{"ts":1},"items":[{"p":1,"q":"x"},{"p":2}],"gone":true}`),
			mir:  jsonSide(200, `{"id":7,"meta":{"ts":2},"items":[{"p":1,"q":"y"},{"p":3},{"p":4}],"new":null}`),
			expDiffs: []difference{
				{Kind: "json", Name: "gone", Primary: "true", Mirror: "(absent)"},
				{Kind: "json", Name: "items.0.q", Primary: `"x"`, Mirror: `"y"`},
				{Kind: "json", Name: "items.1.p", Primary: "2", Mirror: "3"},
				{Kind: "json", Name: "items.2", Primary: "(absent)", Mirror: `{"p":4}`},
				{Kind: "json", Name: "meta.ts", Primary: "1", Mirror: "2"},
				{Kind: "json", Name: "new", Primary: "(absent)", Mirror: "null"},
			}},
		{desc: "ignoreJSONPaths with a wildcard", cfg: CompareConfig{IgnoreJSONPaths: []string{"meta.ts", "items.*.q"}},
			prim:     jsonSide(200, `{"meta":{"ts":1},"items":[{"p":1,"q":"x"},{"p":2,"q":"z"}]}`),
			mir:      jsonSide(200, `{"meta":{"ts":2},"items":[{"p":1,"q":"y"},{"p":5,"q":"w"}]}`),
			expDiffs: []difference{{Kind: "json", Name: "items.1.p", Primary: "2", Mirror: "5"}}},
		{desc: "numbers as written", prim: jsonSide(200, `{"n":12345678901234567890}`), mir: jsonSide(200, `{"n":12345678901234567891}`),
			expDiffs: []difference{{Kind: "json", Name: "n", Primary: "12345678901234567890", Mirror: "12345678901234567891"}}},
		{desc: "kinds differ", prim: jsonSide(200, `{"a":[1]}`), mir: jsonSide(200, `{"a":{"0":1}}`),
			expDiffs: []difference{{Kind: "json", Name: "a", Primary: "[1]", Mirror: `{"0":1}`}}},
		{desc: "not JSON", prim: plain("hello"), mir: plain("hullo"), expPrefix: "5 bytes, sha256 "},
		{desc: "same text", prim: plain("hello"), mir: plain("hello"), expNoDiffs: true},
		{desc: "gzip undone", prim: zipped(gzipped(t, `{"a":1}`)), mir: zipped(gzipped(t, ` { "a" : 1 } `)), expNoDiffs: true},
		{desc: "over the limit: status and headers only",
			prim: side{code: 200, header: http.Header{"Content-Type": {"application/json"}}, body: []byte(`{"a":`), over: true},
			mir:  jsonSide(200, `{"a":2}`), expNoDiffs: true},
	}
	for _, test := range tests {
		t.Run(test.desc, func(t *testing.T) {
			cmp := compareSettingsFor(t, test.cfg)
			got, _ := differences(cmp, test.prim, test.mir)
			// The fast path never calls answers the same that differences tells apart.
			w := &capture{code: test.prim.code, header: test.prim.header, body: test.prim.body}
			if !test.prim.over && !test.mir.over && sameAnswer(cmp, w, &test.mir) && len(got) != 0 {
				t.Errorf("sameAnswer: the same, but differences found %+v", got)
			}
			switch {
			case test.expNoDiffs:
				if len(got) != 0 {
					t.Errorf("got differences %+v, want none", got)
				}
			case test.expPrefix != "":
				if len(got) != 1 || got[0].Kind != "body" || !strings.HasPrefix(got[0].Primary, test.expPrefix) || got[0].Primary == got[0].Mirror {
					t.Errorf("got %+v, want one body difference with sizes and digests", got)
				}
			case !reflect.DeepEqual(got, test.expDiffs) && (len(got) != 0 || len(test.expDiffs) != 0):
				t.Errorf("got  %+v\nwant %+v", got, test.expDiffs)
			}
		})
	}
}

// sameAnswer, the common case's fast path: the same status, body bytes and headers, noise and
// ignoreHeaders aside.
func TestSameAnswer(t *testing.T) {
	cmp := compareSettingsFor(t, CompareConfig{IgnoreHeaders: []string{"X-Version"}})
	prim := jsonSide(200, `{"a":1}`, "Date", "Mon", "Server", "p", "Content-Length", "7", "X-Version", "1", "Vary", "Accept")
	w := &capture{code: prim.code, header: prim.header, body: prim.body}
	for _, test := range []struct {
		desc string
		mir  side
		exp  bool
	}{
		{"noise and ignoreHeaders differ", jsonSide(200, `{"a":1}`, "Date", "Tue", "Server", "m", "X-Version", "2", "Vary", "Accept"), true},
		{"status", jsonSide(201, `{"a":1}`, "Vary", "Accept"), false},
		{"body bytes", jsonSide(200, `{"a": 1}`, "Vary", "Accept"), false},
		{"header value", jsonSide(200, `{"a":1}`, "Vary", "Origin"), false},
		{"header missing", jsonSide(200, `{"a":1}`), false},
		{"header only on the mirror", jsonSide(200, `{"a":1}`, "Vary", "Accept", "Cache-Control", "no-store"), false},
	} {
		if got := sameAnswer(cmp, w, &test.mir); got != test.exp {
			t.Errorf("%s: sameAnswer = %v, want %v", test.desc, got, test.exp)
		}
	}
}

// A client that goes away during the primary's answer (Go's proxy then panics with
// http.ErrAbortHandler) leaves an answer cut short: it is not compared, and the copy does not
// wait for its deadline.
func TestCompareClientGone(t *testing.T) {
	cfg := CreateConfig()
	cfg.Timeout = "1h"
	front, m, lines := compareStack(t, cfg, func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(rw, `{"a":1}`)
	}, func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(rw, `{"a":1}`)
	})
	cut := m.next
	m.next = http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "application/json")
		rw.Header().Set("Content-Length", "7")
		rw.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(rw, `{"a":`)
		panic(http.ErrAbortHandler)
	})
	resp, err := http.Get(front.URL + "/cut")
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Fatal("the client got the whole answer")
	}
	cs := m.st.compare.Load().(*compareStats)
	eventually(t, func() bool { return atomic.LoadInt64(&cs.results[notCompared]) == 1 }, "not counted notCompared")
	eventually(t, func() bool { return atomic.LoadInt64(&m.st.inflight) == 0 }, "the copy still holds its slot")
	equal(t, atomic.LoadInt64(&cs.results[differed]), 0, "differed")
	equal(t, lines.String(), "", "log lines")
	m.next = cut
}

// A field that differs in nearly every compared answer is named as probable noise; array
// indexes count as one field.
func TestNoiseSummary(t *testing.T) {
	cs := &compareStats{noise: map[string]*noiseCount{}}
	for i := 0; i < 40; i++ {
		diffs := []difference{{Kind: "json", Name: fmt.Sprintf("items.%d.updatedAt", i%3)}, {Kind: "header", Name: "X-Version"}}
		if i%4 == 0 {
			diffs = append(diffs, difference{Kind: "json", Name: "price"})
		}
		cs.record(time.Duration(i)*time.Millisecond, 2*time.Duration(i)*time.Millisecond, 200, 200, false, diffs)
		cs.results[differed]++
	}
	got := cs.summary()
	for _, want := range []string{
		"differed=40", "matchRate=0.0%", "primaryP50=19ms", "mirrorP99=76ms",
		`"probable noise: items.*.updatedAt differed in 100% of 40 compared; ignore it with compare.ignoreJSONPaths"`,
		`"probable noise: X-Version differed in 100% of 40 compared; ignore it with compare.ignoreHeaders"`,
	} {
		contains(t, got, want)
	}
	if strings.Contains(got, "price") {
		t.Errorf("a field that differs in a quarter of answers is named as noise: %s", got)
	}
	equal(t, cs.summary(), "", "summary with nothing new")
}

// compareStack is a primary and a mirror behind the middleware with compare on.
func compareStack(t *testing.T, cfg *Config, primary, shadow http.HandlerFunc) (front *httptest.Server, m *mirror, lines *syncBuffer) {
	t.Helper()
	p := httptest.NewServer(primary)
	t.Cleanup(p.Close)
	ms := httptest.NewServer(shadow)
	t.Cleanup(ms.Close)
	cfg.URL = ms.URL
	cfg.Compare.Enabled = true
	pu, err := url.Parse(p.URL)
	noError(t, err)
	h, err := New(context.Background(), proxyTo(pu), cfg, testName(t))
	noError(t, err)
	m = h.(*mirror)
	lines = &syncBuffer{}
	m.st.error = func(line string) { _, _ = lines.Write([]byte(line + "\n")) }
	m.st.debug = func(string) {}
	front = httptest.NewServer(h)
	t.Cleanup(front.Close)
	return front, m, lines
}

func TestCompareWritesDifferences(t *testing.T) {
	answer := func(version string) http.HandlerFunc {
		return func(rw http.ResponseWriter, r *http.Request) {
			rw.Header().Set("Content-Type", "application/json")
			rw.Header().Set("Date", time.Now().String())
			fmt.Fprintf(rw, `{"path":%q,"version":%q,"n":1}`, r.URL.Path, version)
		}
	}
	front, m, lines := compareStack(t, CreateConfig(), answer("1"), answer("2"))
	req := newRequest(t, http.MethodGet, front.URL+"/orders/7?x=1", nil)
	req.Header.Set("X-Request-Id", "req-1")
	resp, err := http.DefaultClient.Do(req)
	noError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	equal(t, string(body), `{"path":"/orders/7","version":"1","n":1}`, "the client's answer")
	cs := m.st.compare.Load().(*compareStats)
	eventually(t, func() bool { return strings.Contains(lines.String(), "difference") }, "no difference line")
	equal(t, atomic.LoadInt64(&cs.results[differed]), 1, "differed")
	line := lines.String()
	for _, want := range []string{
		"mirror " + testName(t) + `: difference {"time":"`, `"middleware":"` + testName(t) + `","method":"GET","path":"/orders/7?x=1","requestId":"req-1","status":{"primary":200,"mirror":200}`,
		`"differences":[{"kind":"json","name":"version","primary":"\"1\"","mirror":"\"2\""}]}`,
	} {
		contains(t, line, want)
	}
}

// With compare on, a streamed answer still reaches the client event by event, and is not
// compared.
func TestCompareKeepsStreaming(t *testing.T) {
	next := make(chan struct{})
	sse := func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "text/event-stream")
		for i := 0; i < 3; i++ {
			fmt.Fprintf(rw, "data: %d\n\n", i)
			rw.(http.Flusher).Flush()
			select {
			case <-next:
			case <-time.After(waitLimit):
				return
			}
		}
	}
	chunks := func(rw http.ResponseWriter, _ *http.Request) { // no Content-Length, not SSE: compared
		for i := 0; i < 3; i++ {
			fmt.Fprintf(rw, "part %d\n", i)
			rw.(http.Flusher).Flush()
			select {
			case <-next:
			case <-time.After(waitLimit):
				return
			}
		}
	}
	for _, test := range []struct {
		desc    string
		primary http.HandlerFunc
		exp     result
	}{{"SSE", sse, notCompared}, {"chunked", chunks, differed}} {
		t.Run(test.desc, func(t *testing.T) {
			testStreaming(t, test.primary, test.exp, next)
		})
	}
}

// testStreaming reads three events, each before the primary writes the next one.
func testStreaming(t *testing.T, primary http.HandlerFunc, exp result, next chan struct{}) {
	front, m, _ := compareStack(t, CreateConfig(), primary, func(rw http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(rw, "x") })
	resp, err := http.Get(front.URL + "/events")
	noError(t, err)
	r := bufio.NewReader(resp.Body)
	for i := 0; i < 3; i++ {
		line, err := r.ReadString('\n') // arrives before the primary writes the next one
		noError(t, err)
		if !strings.Contains(line, fmt.Sprint(i)) {
			t.Errorf("event %d: got %q", i, line)
		}
		if strings.HasPrefix(line, "data") {
			_, _ = r.ReadString('\n')
		}
		next <- struct{}{}
	}
	_, err = io.ReadAll(r) // to the end: a client that leaves before it is not compared
	noError(t, err)
	resp.Body.Close()
	cs := m.st.compare.Load().(*compareStats)
	eventually(t, func() bool { return atomic.LoadInt64(&cs.results[exp]) == 1 }, "not counted %s", resultNames[exp])
}

// Difference lines go to compare.logFile, opened once, and again after it is rotated away.
func TestCompareLogFileReopensAfterRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "diff.log")
	l, err := useDiffLog(stateFor(t.Name()+"-a"), path)
	noError(t, err)
	same, err := useDiffLog(stateFor(t.Name()+"-b"), path)
	noError(t, err)
	equal(t, same, l, "the file is opened once and shared")
	l.write([]byte(`{"n":1}`))
	noError(t, os.Rename(path, path+".1"))
	l.checked = time.Time{} // as if a second had passed
	l.write([]byte(`{"n":2}`))
	rotated, err := os.ReadFile(path + ".1")
	noError(t, err)
	equal(t, string(rotated), "{\"n\":1}\n", "the rotated file")
	current, err := os.ReadFile(path)
	noError(t, err)
	equal(t, string(current), "{\"n\":2}\n", "the file at the path")
}

// The differences by field, for the metrics: a series for each of the first maxFieldSeries
// fields, kept; the rest counted by kind under "other".
func TestCompareFieldCounts(t *testing.T) {
	cs := &compareStats{noise: map[string]*noiseCount{}}
	for i := 0; i < maxFieldSeries+5; i++ {
		cs.record(0, 0, 200, 200, false, []difference{{Kind: "json", Name: fmt.Sprintf("f%d", i)}, {Kind: "status"}})
	}
	cs.record(0, 0, 200, 200, false, []difference{{Kind: "json", Name: "f0"}, {Kind: "header", Name: "Etag"}, {Kind: "json", Name: "items.3.id"}, {Kind: "json", Name: "items.4.id"}})
	counts := cs.fieldCounts()
	equal(t, len(counts), maxFieldSeries+2, "series: the first fields, then json and header under other")
	equal(t, counts[0], fieldCount{"json", "f0", 2}, "the first field, counted twice")
	equal(t, counts[1], fieldCount{"status", "status", maxFieldSeries + 5}, "the status, a field of its own")
	equal(t, counts[maxFieldSeries], fieldCount{"header", "other", 1}, "a header past the bound")
	// f0..f18 and the status took the 20 series: f19..f24 and items.*.id (once per answer) are other.
	equal(t, counts[maxFieldSeries+1], fieldCount{"json", "other", 6 + 1}, "json fields past the bound")
}
