package harness

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"os"
	"strings"
)

// GorSeparator ends every payload of a GoReplay file.
const GorSeparator = "\n\U0001F435\U0001F648\U0001F649\n"

// GorPayload is one payload of a GoReplay file.
type GorPayload struct {
	Meta []string // type, id, timestamp (ns), latency (ns)
	Data []byte   // the raw HTTP message
}

// ReadGor splits a GoReplay file as GoReplay v1.3.2 reads it (input_file.go): line by line, a
// payload ending at a line that is the separator alone, its last newline dropped. Bytes after
// the last separator are an error: GoReplay would drop them.
func ReadGor(path string) ([]GorPayload, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	r := bufio.NewReader(f)
	var out []GorPayload
	var buf bytes.Buffer
	for {
		line, err := r.ReadBytes('\n')
		if err == io.EOF && buf.Len()+len(line) == 0 {
			return out, nil
		}
		if err != nil {
			return out, errors.New("bytes after the last payload of " + path)
		}
		if string(line) != GorSeparator[1:] {
			buf.Write(line)
			continue
		}
		b := buf.Bytes()
		b = b[:len(b)-1]
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return out, errors.New("a payload without its first line in " + path)
		}
		out = append(out, GorPayload{Meta: strings.Split(string(b[:i]), " "), Data: append([]byte(nil), b[i+1:]...)})
		buf.Reset()
	}
}

// Request parses a request payload.
func (p GorPayload) Request() (*http.Request, []byte, error) {
	req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(p.Data)))
	if err != nil {
		return nil, nil, err
	}
	body, err := io.ReadAll(req.Body)
	return req, body, err
}

// Answer parses an answer payload.
func (p GorPayload) Answer() (int, http.Header, []byte, error) {
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(p.Data)), nil)
	if err != nil {
		return 0, nil, nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, body, err
}
