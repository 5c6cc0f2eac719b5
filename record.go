package mirror

import (
	"bytes"
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// The recorder writes copies, or the exchanges whose answers differed, in GoReplay's file format
// (what `gor --input-file` reads): each payload is a line "<type> <id> <timestamp-ns>
// <latency-ns>", the raw HTTP/1.1 message, then the separator line. Type 1 is a request, 2 the
// primary's answer, 3 the mirror's; the payloads of one exchange share an id. Writing happens in
// the copy's goroutine: one payload, or one exchange, is built in memory (its bodies cut at
// record.maxBodySize) and appended in one write.

// recordSeparator ends every payload; GoReplay ends a payload at a line that is its last
// characters alone.
const recordSeparator = "\n\U0001F435\U0001F648\U0001F649\n"

// recordCutHeader is set on a recorded message whose body is not whole: "<written> of <length>
// bytes" (length "unknown" for a streamed body of no declared length).
const recordCutHeader = "X-Mirror-Record-Cut"

// redacted replaces each value of a redacted header.
const redacted = "redacted"

// Defaults and bounds of the record block.
const (
	defaultRecordMaxSize  = 100 << 20
	defaultRecordMaxFiles = 10
	minRecordMaxSize      = 4 << 10
	maxRecordFiles        = 1000
	maxRecordBody         = 1 << 30
	recordRetry           = time.Second // a file that could not be opened is tried again after this
)

// RecordConfig is the record block of the configuration.
type RecordConfig struct {
	// File is the path copies are appended to, in GoReplay's file format; empty: off.
	File string `json:"file,omitempty"`
	// What is "copies" (every copy sent) or "differences" (the compared exchanges that differed).
	What string `json:"what,omitempty"`
	// MaxSize is the size in bytes after which the file is rotated.
	MaxSize int64 `json:"maxSize,omitempty"`
	// MaxFiles is how many rotated files are kept.
	MaxFiles int `json:"maxFiles,omitempty"`
	// RedactHeaders are the headers whose values are replaced in what is written; "none": none.
	RedactHeaders []string `json:"redactHeaders,omitempty"`
	// MaxBodySize is how many body bytes of each message are written.
	MaxBodySize int64 `json:"maxBodySize,omitempty"`
}

func defaultRecord() RecordConfig {
	return RecordConfig{
		What: "copies", MaxSize: defaultRecordMaxSize, MaxFiles: defaultRecordMaxFiles, MaxBodySize: 1 << 20,
		RedactHeaders: []string{"Authorization", "Cookie", "Proxy-Authorization", "Set-Cookie"},
	}
}

type recordSettings struct {
	file        string
	differences bool
	maxSize     int64
	maxFiles    int
	maxBodySize int64
	omit        map[string]bool // never written as they are: redacted, framing, the copy's own
	redact      []string        // canonical names, sorted
	w           *recorder       // set by New (useRecorder)
}

func compileRecord(c *RecordConfig, compare bool) (*recordSettings, error) {
	if c.File == "" {
		return nil, nil
	}
	s := &recordSettings{file: filepath.Clean(c.File), maxSize: c.MaxSize, maxFiles: c.MaxFiles, maxBodySize: c.MaxBodySize}
	switch strings.ToLower(strings.TrimSpace(c.What)) {
	case "", "copies":
	case "differences":
		if !compare {
			return nil, fmt.Errorf("mirror: invalid record.what %q: differences are found by compare, which is not enabled", c.What)
		}
		s.differences = true
	default:
		return nil, fmt.Errorf("mirror: invalid record.what %q: must be copies or differences", c.What)
	}
	if c.MaxSize < minRecordMaxSize {
		return nil, fmt.Errorf("mirror: invalid record.maxSize %d: must be at least %d bytes", c.MaxSize, minRecordMaxSize)
	}
	if c.MaxFiles < 0 || c.MaxFiles > maxRecordFiles {
		return nil, fmt.Errorf("mirror: invalid record.maxFiles %d: must be from 0 to %d", c.MaxFiles, maxRecordFiles)
	}
	if c.MaxBodySize < 0 || c.MaxBodySize > maxRecordBody {
		return nil, fmt.Errorf("mirror: invalid record.maxBodySize %d: must be from 0 to %d bytes", c.MaxBodySize, int64(maxRecordBody))
	}
	s.omit = map[string]bool{"Host": true, "Content-Length": true, "Transfer-Encoding": true, loopHeader: true, recordCutHeader: true}
	for _, name := range c.RedactHeaders {
		if name = strings.TrimSpace(name); name == "" || strings.EqualFold(name, "none") {
			continue
		}
		if !validHeaderName(name) {
			return nil, fmt.Errorf("mirror: invalid record.redactHeaders %q: %q is not a header name", strings.Join(c.RedactHeaders, ","), name)
		}
		name = http.CanonicalHeaderKey(name)
		if !s.omit[name] {
			s.omit[name] = true
			s.redact = append(s.redact, name)
		}
	}
	sort.Strings(s.redact)
	return s, nil
}

// recorded is a copy's request as the recorder writes it: taken in send before the copy is
// shaped (setHeaders, removeHeaders, preserveHost), with the copy's own loop token left out.
type recorded struct {
	method string
	target string // path and query, as the primary got them
	host   string
	header http.Header
	body   []byte
	length int64 // the whole body's, -1: unknown
	began  time.Time
}

// keepRecord takes what the record of a copy needs before send shapes it (u: the request's URL), and writes it now when
// copies are recorded; differences are written once the answers are judged (see judge).
func keepRecord(m *mirror, c *copyRequest, out *http.Request, u *url.URL) {
	rs := m.record
	if rs.differences && (c.capture == nil || c.stream != nil) {
		return // only a compared copy can differ, and a streamed one is not compared
	}
	// The request's target, as the primary got it (out.URL is the mirror's now): only written
	// into the record, never parsed as a URL.
	target := u.RequestURI() // bounded: by Traefik's request-line limit (its max header bytes)
	if strings.IndexByte(target, ' ') >= 0 {
		// A raw query may hold spaces (HTTP/2's :path is not split on them): written as they
		// came, the request line would not parse, and GoReplay would skip the record.
		target = strings.ReplaceAll(target, " ", "%20")
	}
	r := &recorded{method: out.Method, target: target, host: out.Host, header: out.Header, body: c.body, length: int64(len(c.body)), began: c.began}
	if c.began.IsZero() {
		r.began = time.Now() // serve's short path does not time its copies
	}
	if c.stream != nil {
		r.body = c.head // one field a statement: see PLUGIN-FACTS on tuple assignments under Yaegi
		r.length = out.ContentLength
		c.head = nil
	}
	if rs.differences {
		r.header = r.header.Clone() // send shapes the copy's own next
		c.recorded = r
		return
	}
	var buf bytes.Buffer
	writeRequest(&buf, rs, exchangeID(), r)
	writeRecord(m, buf.Bytes())
}

// recordExchange writes a compared exchange whose answers differed: the request, the primary's
// answer, the mirror's, under one id.
func recordExchange(m *mirror, c *copyRequest, prim, mir side) {
	r := c.recorded
	if r == nil {
		return
	}
	rs, id := m.record, exchangeID()
	var buf bytes.Buffer
	writeRequest(&buf, rs, id, r)
	writeAnswer(&buf, rs, "2 ", id, r.began.Add(prim.latency), prim)
	writeAnswer(&buf, rs, "3 ", id, r.began.Add(mir.latency), mir)
	writeRecord(m, buf.Bytes())
}

// exchangeID is 24 hex digits, as GoReplay's: this process's token's first 8, then a count (its
// top bit set, so that it always has 16 digits).
func exchangeID() string {
	return processToken[:8] + strconv.FormatUint(atomic.AddUint64(&exchanges, 1)|1<<63, 16)
}

var exchanges uint64 // atomic

// writeRequest writes a request payload. (Few statements, each doing much: under Yaegi every
// call allocates a value per expression of the called function.)
func writeRequest(buf *bytes.Buffer, rs *recordSettings, id string, r *recorded) {
	buf.WriteString("1 " + id + " " + strconv.FormatInt(r.began.UnixNano(), 10) + " 0\n" +
		r.method + " " + r.target + " HTTP/1.1\r\nHost: " + r.host + "\r\n")
	writeMessage(buf, rs, r.header, r.body, r.length)
}

// writeAnswer writes an answer payload: one side of a compared exchange.
func writeAnswer(buf *bytes.Buffer, rs *recordSettings, kind, id string, at time.Time, s side) {
	buf.WriteString(kind + id + " " + strconv.FormatInt(at.UnixNano(), 10) + " " + strconv.FormatInt(int64(s.latency), 10) + "\n" +
		"HTTP/1.1 " + strconv.Itoa(s.code) + " " + http.StatusText(s.code) + "\r\n")
	length := int64(len(s.body))
	if s.over {
		length = -1
	}
	writeMessage(buf, rs, s.header, s.body, length)
}

// writeMessage writes a message's headers (redacted, sorted, the framing ones set anew), its
// body cut to what may be written, and the separator.
func writeMessage(buf *bytes.Buffer, rs *recordSettings, h http.Header, body []byte, length int64) {
	_ = h.WriteSubset(buf, rs.omit)
	for _, name := range rs.redact {
		for range h[name] {
			buf.WriteString(name + ": " + redacted + "\r\n")
		}
	}
	n := writable(body, rs.maxBodySize)
	if int64(n) != length {
		total := "unknown"
		if length >= 0 {
			total = strconv.FormatInt(length, 10)
		}
		buf.WriteString(recordCutHeader + ": " + strconv.Itoa(n) + " of " + total + " bytes\r\n")
	}
	if n > 0 || length != 0 {
		buf.WriteString("Content-Length: " + strconv.Itoa(n) + "\r\n")
	}
	buf.WriteString("\r\n")
	buf.Write(body[:n])
	buf.WriteString(recordSeparator)
}

// monkeys are the separator's characters: a body without them is written whole.
var monkeys = []byte(recordSeparator[1 : len(recordSeparator)-1])

// writable is how much of a body a payload can hold: at most limit bytes, and none from a line
// that would read as the separator (GoReplay's format has no escape for it). The body begins a
// line (the header block ends with one) and the separator's own newline follows it: so the
// separator's characters alone are a separator line at its start, whole or followed by a
// newline, anywhere between two newlines, and at its end after one.
func writable(body []byte, limit int64) int {
	n := len(body)
	if int64(n) > limit {
		n = int(limit)
	}
	b := body[:n]
	if !bytes.Contains(b, monkeys) {
		return n
	}
	line := recordSeparator[1:]
	switch {
	case bytes.HasPrefix(b, []byte(line)) || bytes.Equal(b, monkeys):
		return 0
	case bytes.Contains(b, []byte(recordSeparator)):
		return bytes.Index(b, []byte(recordSeparator))
	case bytes.HasSuffix(b, []byte(recordSeparator[:len(recordSeparator)-1])):
		return n - len(recordSeparator) + 1
	}
	return n
}

// writeRecord appends one payload, or one exchange, to the middleware's record file, and counts
// it, or the failure.
func writeRecord(m *mirror, b []byte) {
	st := m.st
	if err := m.record.w.write(b); err != nil {
		atomic.AddInt64(&st.recordFailed, 1)
		m.record.w.complain(st, err)
		return
	}
	atomic.AddInt64(&st.records, 1)
	atomic.AddInt64(&st.recordBytes, int64(len(b)))
}
