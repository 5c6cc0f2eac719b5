package mirror

// A minimal Redis client (RESP2) for the shared copy budget: AUTH, SELECT and EVALSHA/EVAL of one
// script, over one net.Conn. go-redis, redigo and rueidis, vendored, do not load under Yaegi
// v0.16.1 (see the readme's redis section). Every reply is bounded (line length, bulk length,
// array length, nesting, bytes in all) and every exchange has a deadline, so a hostile or broken
// server can neither hold the budget's goroutine nor grow Traefik's memory.

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"math"
	"net"
	"strconv"
	"strings"
	"time"
)

// The bounds of one reply. The budget's script answers two integers; the rest is for errors.
const (
	respMaxLine  = 1024     // a simple string, an error or a length line, CRLF included
	respMaxBulk  = 64 << 10 // one bulk string
	respMaxArray = 64       // elements of one array
	respMaxDepth = 4        // arrays within arrays
	respMaxBytes = 64 << 10 // all the strings of one reply
	respMaxItems = 256      // values in one reply, nested ones included (64^4 integers would not do)
)

var (
	errRESPProtocol = errors.New("redis: protocol error")
	errRESPTooLarge = errors.New("redis: reply over the client's bounds")
)

// respReply is one RESP2 reply. kind is its type byte: '+' simple string, '-' error (str holds
// the message), ':' integer, '$' bulk string, '*' array. null is a null bulk string or array.
type respReply struct {
	kind  byte
	str   string
	n     int64
	null  bool
	elems []respReply
}

// isError says whether the reply is an error reply.
func (r respReply) isError() bool { return r.kind == '-' }

// respReader reads replies from r within the bounds above.
type respReader struct {
	r     *bufio.Reader
	left  int // bytes still allowed in the current reply's strings
	items int // values still allowed in the current reply
}

func newRESPReader(r io.Reader) *respReader {
	return &respReader{r: bufio.NewReaderSize(r, respMaxLine)}
}

// read reads one whole reply.
func (rr *respReader) read() (respReply, error) {
	rr.left = respMaxBytes
	rr.items = respMaxItems
	return rr.value(0)
}

// line reads one CRLF-terminated line, without the CRLF.
func (rr *respReader) line() (string, error) {
	b, err := rr.r.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		return "", errRESPTooLarge
	}
	if err != nil {
		return "", err
	}
	if len(b) < 2 || b[len(b)-2] != '\r' {
		return "", errRESPProtocol
	}
	return string(b[:len(b)-2]), nil
}

func (rr *respReader) value(depth int) (respReply, error) {
	if rr.items--; rr.items < 0 {
		return respReply{}, errRESPTooLarge
	}
	l, err := rr.line()
	if err != nil {
		return respReply{}, err
	}
	if l == "" {
		return respReply{}, errRESPProtocol
	}
	r := respReply{kind: l[0]}
	body := l[1:]
	switch r.kind {
	case '+', '-':
		if err := rr.spend(len(body)); err != nil {
			return r, err
		}
		r.str = body
		return r, nil
	case ':':
		r.n, err = strconv.ParseInt(body, 10, 64)
		if err != nil {
			return r, errRESPProtocol
		}
		return r, nil
	case '$':
		n, err := respLength(body)
		switch {
		case err != nil:
			return r, errRESPProtocol
		case n == -1:
			r.null = true
			return r, nil
		case n > respMaxBulk:
			return r, errRESPTooLarge
		}
		if err := rr.spend(int(n)); err != nil {
			return r, err
		}
		b := make([]byte, n+2)
		if _, err := io.ReadFull(rr.r, b); err != nil {
			return r, err
		}
		if b[n] != '\r' || b[n+1] != '\n' {
			return r, errRESPProtocol
		}
		r.str = string(b[:n])
		return r, nil
	case '*':
		n, err := respLength(body)
		switch {
		case err != nil:
			return r, errRESPProtocol
		case n == -1:
			r.null = true
			return r, nil
		case n > respMaxArray || depth >= respMaxDepth:
			return r, errRESPTooLarge
		}
		r.elems = make([]respReply, 0, n)
		for i := int64(0); i < n; i++ {
			e, err := rr.value(depth + 1)
			if err != nil {
				return r, err
			}
			r.elems = append(r.elems, e)
		}
		return r, nil
	}
	return r, errRESPProtocol
}

// respLength parses the length of a bulk string or an array as servers write it: -1 (null) or
// digits without a sign or a leading zero. One too long for an int64 is too large, not malformed.
func respLength(s string) (int64, error) {
	if s == "-1" {
		return -1, nil
	}
	if s == "" || len(s) > 1 && s[0] == '0' {
		return 0, errRESPProtocol
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, errRESPProtocol
		}
	}
	if len(s) > 18 {
		return math.MaxInt64, nil
	}
	return strconv.ParseInt(s, 10, 64)
}

// spend takes n bytes from what the current reply may still hold.
func (rr *respReader) spend(n int) error {
	if n > rr.left {
		return errRESPTooLarge
	}
	rr.left -= n
	return nil
}

// appendCommand appends a command as a RESP array of bulk strings.
func appendCommand(b []byte, args []string) []byte {
	b = append(b, '*')
	b = strconv.AppendInt(b, int64(len(args)), 10)
	b = append(b, '\r', '\n')
	for _, a := range args {
		b = append(b, '$')
		b = strconv.AppendInt(b, int64(len(a)), 10)
		b = append(b, '\r', '\n')
		b = append(b, a...)
		b = append(b, '\r', '\n')
	}
	return b
}

// redisOptions are the validated options of the redis block.
type redisOptions struct {
	endpoints                              []string
	username, password                     string
	db                                     int
	tls                                    *tls.Config // nil: plain TCP
	dialTimeout, readTimeout, writeTimeout time.Duration
}

// respConn is one connection to Redis, used by one goroutine at a time.
type respConn struct {
	conn     net.Conn
	rd       *respReader
	endpoint string
	o        *redisOptions
	buf      []byte
}

// dialRedis connects to the first endpoint that answers, authenticates and selects the database.
// Its error names the endpoint (the last one tried).
func dialRedis(o *redisOptions) (*respConn, error) {
	var last error
	for _, ep := range o.endpoints {
		c, err := dialEndpoint(o, ep)
		if err == nil {
			return c, nil
		}
		last = err
	}
	if last == nil {
		last = errors.New("redis: no endpoint")
	}
	return nil, last
}

func dialEndpoint(o *redisOptions, ep string) (*respConn, error) {
	d := &net.Dialer{Timeout: o.dialTimeout}
	conn, err := d.Dial("tcp", ep)
	if err != nil {
		return nil, errors.New("redis " + ep + ": " + err.Error())
	}
	if o.tls != nil {
		cfg := o.tls.Clone()
		if cfg.ServerName == "" {
			host, _, _ := net.SplitHostPort(ep)
			cfg.ServerName = host
		}
		tc := tls.Client(conn, cfg)
		_ = tc.SetDeadline(time.Now().Add(o.dialTimeout))
		if err := tc.Handshake(); err != nil {
			_ = conn.Close()
			return nil, errors.New("redis " + ep + ": TLS: " + err.Error())
		}
		conn = tc
	}
	c := &respConn{conn: conn, rd: newRESPReader(conn), endpoint: ep, o: o}
	if o.password != "" {
		args := []string{"AUTH", o.password}
		if o.username != "" {
			args = []string{"AUTH", o.username, o.password}
		}
		if err := c.expectOK("AUTH", args); err != nil {
			c.close()
			return nil, err
		}
	}
	if o.db != 0 {
		if err := c.expectOK("SELECT", []string{"SELECT", strconv.Itoa(o.db)}); err != nil {
			c.close()
			return nil, err
		}
	}
	return c, nil
}

// expectOK runs a command that answers +OK; anything else is an error naming the endpoint.
func (c *respConn) expectOK(name string, args []string) error {
	r, err := c.do(args)
	if err != nil {
		return err
	}
	if r.isError() {
		return errors.New("redis " + c.endpoint + ": " + name + ": " + r.str)
	}
	if r.kind != '+' || r.str != "OK" {
		return errors.New("redis " + c.endpoint + ": " + name + ": unexpected reply")
	}
	return nil
}

// do sends one command and reads its reply, each within its timeout. An error reply is a reply,
// not an error: the connection is still good. An error means the connection is not, and it is
// closed.
func (c *respConn) do(args []string) (respReply, error) {
	c.buf = appendCommand(c.buf[:0], args)
	_ = c.conn.SetWriteDeadline(time.Now().Add(c.o.writeTimeout))
	if _, err := c.conn.Write(c.buf); err != nil {
		c.close()
		return respReply{}, errors.New("redis " + c.endpoint + ": " + err.Error())
	}
	if cap(c.buf) > 4<<10 {
		c.buf = nil // the script is sent once in a while; do not hold its buffer
	}
	_ = c.conn.SetReadDeadline(time.Now().Add(c.o.readTimeout))
	r, err := c.rd.read()
	if err != nil {
		c.close()
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return r, errors.New("redis " + c.endpoint + ": " + err.Error())
	}
	return r, nil
}

// eval runs a script by its SHA-1, and by its text when the server does not have it (NOSCRIPT,
// as after a restart), which also loads it.
func (c *respConn) eval(sha, script string, keys, args []string) (respReply, error) {
	cmd := make([]string, 0, 3+len(keys)+len(args))
	cmd = append(cmd, "EVALSHA", sha, strconv.Itoa(len(keys)))
	cmd = append(append(cmd, keys...), args...)
	r, err := c.do(cmd)
	if err != nil || !r.isError() || !strings.HasPrefix(r.str, "NOSCRIPT") {
		return r, err
	}
	cmd[0] = "EVAL"
	cmd[1] = script
	return c.do(cmd)
}

func (c *respConn) close() {
	if c.conn != nil {
		_ = c.conn.Close()
	}
}
