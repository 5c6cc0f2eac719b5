package mirror

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestRESPReader(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		desc, in string
		exp      respReply
		expErr   error // nil: any error will do when expFail
		expFail  bool
	}{
		{desc: "simple", in: "+OK\r\n", exp: respReply{kind: '+', str: "OK"}},
		{desc: "error", in: "-NOSCRIPT No matching script\r\n", exp: respReply{kind: '-', str: "NOSCRIPT No matching script"}},
		{desc: "integer", in: ":-42\r\n", exp: respReply{kind: ':', n: -42}},
		{desc: "bulk", in: "$5\r\nhe\r\no\r\n", exp: respReply{kind: '$', str: "he\r\no"}},
		{desc: "empty bulk", in: "$0\r\n\r\n", exp: respReply{kind: '$'}},
		{desc: "null bulk", in: "$-1\r\n", exp: respReply{kind: '$', null: true}},
		{desc: "null array", in: "*-1\r\n", exp: respReply{kind: '*', null: true}},
		{desc: "array", in: "*2\r\n:3\r\n:1\r\n", exp: respReply{kind: '*', elems: []respReply{{kind: ':', n: 3}, {kind: ':', n: 1}}}},
		{desc: "no CR", in: "+OK\n", expFail: true, expErr: errRESPProtocol},
		{desc: "empty line", in: "\r\n", expFail: true, expErr: errRESPProtocol},
		{desc: "unknown type", in: "!3\r\n", expFail: true, expErr: errRESPProtocol},
		{desc: "RESP3 map", in: "%1\r\n", expFail: true, expErr: errRESPProtocol},
		{desc: "bad integer", in: ":12a\r\n", expFail: true, expErr: errRESPProtocol},
		{desc: "integer overflow", in: ":99999999999999999999\r\n", expFail: true, expErr: errRESPProtocol},
		{desc: "negative bulk", in: "$-2\r\n", expFail: true, expErr: errRESPProtocol},
		{desc: "huge bulk", in: "$9223372036854775807\r\n", expFail: true, expErr: errRESPTooLarge},
		{desc: "bulk past the cap", in: "$" + strconv.Itoa(respMaxBulk+1) + "\r\n", expFail: true, expErr: errRESPTooLarge},
		{desc: "bulk short", in: "$10\r\nabc", expFail: true, expErr: io.ErrUnexpectedEOF},
		{desc: "bulk without CRLF", in: "$3\r\nabcde", expFail: true, expErr: errRESPProtocol},
		{desc: "huge array", in: "*2147483648\r\n", expFail: true, expErr: errRESPTooLarge},
		{desc: "deep array", in: strings.Repeat("*1\r\n", respMaxDepth+1) + ":1\r\n", expFail: true, expErr: errRESPTooLarge},
		{desc: "long line", in: "+" + strings.Repeat("a", respMaxLine) + "\r\n", expFail: true, expErr: errRESPTooLarge},
		{desc: "truncated", in: "*2\r\n:1\r\n", expFail: true, expErr: io.EOF},
		{desc: "values past the reply cap", in: "*64\r\n" + strings.Repeat("*64\r\n"+strings.Repeat(":1\r\n", 64), 64), expFail: true, expErr: errRESPTooLarge},
		{desc: "strings past the reply cap", in: "*2\r\n$" + strconv.Itoa(respMaxBulk) + "\r\n" + strings.Repeat("a", respMaxBulk) + "\r\n$1\r\nb\r\n", expFail: true, expErr: errRESPTooLarge},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			t.Parallel()
			got, err := newRESPReader(strings.NewReader(tc.in)).read()
			if tc.expFail {
				if err == nil {
					t.Fatalf("got %+v, want an error", got)
				}
				if tc.expErr != nil && !errors.Is(err, tc.expErr) {
					t.Fatalf("got error %v, want %v", err, tc.expErr)
				}
				return
			}
			noError(t, err)
			if !sameReply(got, tc.exp) {
				t.Fatalf("got %+v, want %+v", got, tc.exp)
			}
		})
	}
}

func sameReply(a, b respReply) bool {
	if a.kind != b.kind || a.str != b.str || a.n != b.n || a.null != b.null || len(a.elems) != len(b.elems) {
		return false
	}
	for i := range a.elems {
		if !sameReply(a.elems[i], b.elems[i]) {
			return false
		}
	}
	return true
}

// encodeReply writes a reply as a server would.
func encodeReply(b []byte, r respReply) []byte {
	b = append(b, r.kind)
	switch {
	case r.null:
		return append(b, "-1\r\n"...)
	case r.kind == ':':
		return append(strconv.AppendInt(b, r.n, 10), '\r', '\n')
	case r.kind == '$':
		b = append(strconv.AppendInt(b, int64(len(r.str)), 10), '\r', '\n')
		return append(append(b, r.str...), '\r', '\n')
	case r.kind == '*':
		b = append(strconv.AppendInt(b, int64(len(r.elems)), 10), '\r', '\n')
		for _, e := range r.elems {
			b = encodeReply(b, e)
		}
		return b
	}
	return append(append(b, r.str...), '\r', '\n')
}

// replySize is what a reply holds in strings and values, and its depth: what the bounds are
// about.
func replySize(r respReply, depth int) (bytes, items, maxDepth int) {
	bytes, items, maxDepth = len(r.str), 1, depth
	for _, e := range r.elems {
		b, n, d := replySize(e, depth+1)
		bytes += b
		items += n
		if d > maxDepth {
			maxDepth = d
		}
	}
	return bytes, items, maxDepth
}

// FuzzRESPReply feeds malformed and hostile replies to the reader: it never panics, never holds
// more than its bounds, and what it accepts encodes back to the bytes it read.
func FuzzRESPReply(f *testing.F) {
	for _, seed := range []string{
		"+OK\r\n", "-ERR x\r\n", ":1\r\n", "$3\r\nabc\r\n", "$-1\r\n", "*2\r\n:3\r\n:1\r\n", "*-1\r\n",
		"*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", "$99999999999\r\n", "*99999999\r\n", "$4\r\nab", ":\r\n", "*2\r\n$1\r\na\r\n+b\r\n",
		"-NOSCRIPT No matching script. Please use EVAL.\r\n", "%2\r\n", "_\r\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		rd := bytes.NewReader(in)
		r, err := newRESPReader(rd).read()
		if err != nil {
			return
		}
		size, items, depth := replySize(r, 0)
		if size > respMaxBytes || items > respMaxItems || depth > respMaxDepth {
			t.Fatalf("accepted a reply of %d bytes, %d values, at depth %d", size, items, depth)
		}
		var elems func(r respReply) bool
		elems = func(r respReply) bool {
			if len(r.elems) > respMaxArray {
				return false
			}
			for _, e := range r.elems {
				if !elems(e) {
					return false
				}
			}
			return true
		}
		if !elems(r) {
			t.Fatalf("accepted an array over %d elements", respMaxArray)
		}
		// Accepted means well-formed: it encodes back to a prefix of the input (integers aside,
		// which "+1" and "01" spell differently).
		if !hasInteger(r) {
			enc := encodeReply(nil, r)
			if !bytes.HasPrefix(in, enc) {
				t.Fatalf("accepted %q as %+v, which encodes as %q", in, r, enc)
			}
		}
	})
}

func hasInteger(r respReply) bool {
	if r.kind == ':' || r.kind == '$' && r.null || r.kind == '*' && r.null {
		return true
	}
	for _, e := range r.elems {
		if hasInteger(e) {
			return true
		}
	}
	return false
}

func TestAppendCommand(t *testing.T) {
	t.Parallel()
	got := string(appendCommand(nil, []string{"AUTH", "u", "p w\r\n"}))
	equal(t, got, "*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$5\r\np w\r\n\r\n", "command")
}

// fakeRedis serves one scripted conversation per connection on loopback: answer returns the
// bytes to send for each command read (nil: close the connection).
type fakeRedis struct {
	addr string
	l    net.Listener
	cmds chan []string
}

func newFakeRedis(t *testing.T, answer func(cmd []string) []byte) *fakeRedis {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	noError(t, err)
	fr := &fakeRedis{addr: l.Addr().String(), l: l, cmds: make(chan []string, 100)}
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go fr.serve(c, answer)
		}
	}()
	return fr
}

func (fr *fakeRedis) serve(c net.Conn, answer func(cmd []string) []byte) {
	defer c.Close()
	rd := newRESPReader(bufio.NewReader(c))
	for {
		r, err := rd.read()
		if err != nil {
			return
		}
		var cmd []string
		for _, e := range r.elems {
			cmd = append(cmd, e.str)
		}
		select {
		case fr.cmds <- cmd:
		default:
		}
		out := answer(cmd)
		if out == nil {
			return
		}
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}

func testOptions(addr string) *redisOptions {
	return &redisOptions{endpoints: []string{addr}, dialTimeout: time.Second, readTimeout: 300 * time.Millisecond, writeTimeout: 300 * time.Millisecond}
}

func TestRESPConnAuthSelectEval(t *testing.T) {
	t.Parallel()
	fr := newFakeRedis(t, func(cmd []string) []byte {
		switch cmd[0] {
		case "AUTH":
			if len(cmd) == 3 && cmd[1] == "bob" && cmd[2] == "secret" {
				return []byte("+OK\r\n")
			}
			return []byte("-WRONGPASS invalid username-password pair or user is disabled.\r\n")
		case "SELECT":
			return []byte("+OK\r\n")
		case "EVALSHA":
			return []byte("-NOSCRIPT No matching script. Please use EVAL.\r\n")
		case "EVAL":
			return []byte("*2\r\n:3\r\n:2\r\n")
		}
		return []byte("-ERR unknown\r\n")
	})
	o := testOptions(fr.addr)
	o.username, o.password, o.db = "bob", "secret", 3
	c, err := dialRedis(o)
	noError(t, err)
	defer c.close()
	r, err := c.eval(leaseScriptSHA, leaseScript, []string{"k1", "k2"}, []string{"a"})
	noError(t, err)
	grant, replicas, err := leaseReply(r, 5)
	noError(t, err)
	equal(t, grant, 3, "grant")
	equal(t, replicas, 2, "replicas")
	var seen []string
	for len(fr.cmds) > 0 {
		cmd := <-fr.cmds
		seen = append(seen, cmd[0])
		if cmd[0] == "EVAL" {
			equal(t, cmd[1], leaseScript, "EVAL's script")
			equal(t, strings.Join(cmd[2:], " "), "2 k1 k2 a", "EVAL's keys and args")
		}
	}
	equal(t, strings.Join(seen, " "), "AUTH SELECT EVALSHA EVAL", "commands")

	o.password = "wrong"
	_, err = dialRedis(o)
	if err == nil || !strings.Contains(err.Error(), fr.addr) || !strings.Contains(err.Error(), "WRONGPASS") {
		t.Fatalf("got %v, want an AUTH error naming the endpoint", err)
	}
}

// A hostile server: every bad answer ends in an error within the read timeout, never a hang.
func TestRESPConnHostile(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		desc   string
		answer func(c net.Conn)
	}{
		{"garbage", func(c net.Conn) { _, _ = c.Write([]byte("\x00\xff garbage\r\n")) }},
		{"huge bulk", func(c net.Conn) { _, _ = c.Write([]byte("$1099511627776\r\n")) }},
		{"huge array", func(c net.Conn) { _, _ = c.Write([]byte("*1099511627776\r\n")) }},
		{"endless line", func(c net.Conn) {
			for i := 0; i < 100; i++ {
				if _, err := c.Write(bytes.Repeat([]byte("a"), 1024)); err != nil {
					return
				}
			}
		}},
		{"slow drip", func(c net.Conn) {
			for _, b := range []byte("*2\r\n:1\r\n:1\r\n") {
				if _, err := c.Write([]byte{b}); err != nil {
					return
				}
				time.Sleep(100 * time.Millisecond) // the drip itself, not a synchronisation
			}
		}},
		{"silence", func(net.Conn) {}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			t.Parallel()
			l, err := net.Listen("tcp", "127.0.0.1:0")
			noError(t, err)
			defer l.Close()
			done := make(chan struct{})
			defer close(done)
			go func() {
				c, err := l.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				_, _ = newRESPReader(c).read()
				tc.answer(c)
				<-done
			}()
			c, err := dialRedis(testOptions(l.Addr().String()))
			noError(t, err)
			start := time.Now()
			_, err = c.eval(leaseScriptSHA, leaseScript, []string{"a", "b"}, nil)
			if err == nil {
				t.Fatal("got no error")
			}
			if d := time.Since(start); d > time.Second {
				t.Fatalf("the exchange took %v, past the read timeout", d)
			}
			if !strings.Contains(err.Error(), l.Addr().String()) {
				t.Fatalf("error %q does not name the endpoint", err)
			}
		})
	}
}

func TestDialRedisFirstThatAnswers(t *testing.T) {
	t.Parallel()
	fr := newFakeRedis(t, func([]string) []byte { return []byte("+OK\r\n") })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	noError(t, err)
	closed := l.Addr().String()
	_ = l.Close()
	o := testOptions(closed)
	o.endpoints = append(o.endpoints, fr.addr)
	o.password = "x"
	c, err := dialRedis(o)
	noError(t, err)
	equal(t, c.endpoint, fr.addr, "endpoint used")
	c.close()
}
