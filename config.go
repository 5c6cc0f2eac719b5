package mirror

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Config is the plugin configuration. Traefik matches option names to these field names,
// case-insensitively; the json tags only document them.
type Config struct {
	// URL is the mirror upstream: http(s)://host[:port][/base/path].
	URL string `json:"url,omitempty"`
	// Percent is the share of eligible requests that are copied, 0 to 100.
	Percent float64 `json:"percent,omitempty"`
	// MirrorBody false sends the copy without a body.
	MirrorBody bool `json:"mirrorBody,omitempty"`
	// MaxBodySize is the largest body, in bytes, that is copied; -1 means no limit.
	MaxBodySize int64 `json:"maxBodySize,omitempty"`
	// BodyBuffer is the most of one body a copy holds: a longer body, when maxBodySize allows
	// it, is streamed to the mirror as the primary reads it.
	BodyBuffer int64 `json:"bodyBuffer,omitempty"`
	// StreamStall is how long in all the primary's reads of one streamed body may wait for the
	// mirror, as a Go duration; then the copy is cut.
	StreamStall string `json:"streamStall,omitempty"`
	// Timeout bounds the whole copy exchange, as a Go duration ("5s", "250ms").
	Timeout string `json:"timeout,omitempty"`
	// MaxInflight is how many copies may be in flight at once; past it copies are dropped.
	MaxInflight int `json:"maxInflight,omitempty"`

	// Methods, if set, are the only methods copied (case-insensitive).
	Methods []string `json:"methods,omitempty"`
	// PathRegex, if set, must match the request's path (not its query) for it to be copied.
	PathRegex string `json:"pathRegex,omitempty"`
	// MatchHeaders maps header names to regular expressions that must all match.
	MatchHeaders map[string]string `json:"matchHeaders,omitempty"`
	// SampleBy names a header whose value alone decides whether a request is in the sample.
	SampleBy string `json:"sampleBy,omitempty"`

	// SetHeaders are set on the copy, replacing any value.
	SetHeaders map[string]string `json:"setHeaders,omitempty"`
	// RemoveHeaders are removed from the copy.
	RemoveHeaders []string `json:"removeHeaders,omitempty"`
	// PreserveHost true sends the client's Host to the mirror.
	PreserveHost bool `json:"preserveHost,omitempty"`
	// Retries is how many times a copy is resent after a connection error or a 502, 503 or 504.
	Retries int `json:"retries,omitempty"`

	// InsecureSkipVerify true does not verify an https mirror's certificate.
	InsecureSkipVerify bool `json:"insecureSkipVerify,omitempty"`
	// CAFile is a PEM file of the CAs trusted for an https mirror.
	CAFile string `json:"caFile,omitempty"`
	// ServerName is the TLS server name for an https mirror.
	ServerName string `json:"serverName,omitempty"`

	// MaxRate caps the copies per second of this middleware; 0 means no cap.
	MaxRate float64 `json:"maxRate,omitempty"`
	// Redis, with endpoints, makes maxRate the budget of all processes sharing its database.
	Redis RedisConfig `json:"redis,omitempty"`
	// MetricsAddress is a host:port where Prometheus metrics are served at /metrics.
	MetricsAddress string `json:"metricsAddress,omitempty"`

	// Compare compares the mirror's answers with the primary's.
	Compare CompareConfig `json:"compare,omitempty"`
	// Record writes the copies, or the exchanges that differed, to a file in GoReplay's format.
	Record RecordConfig `json:"record,omitempty"`

	// FailClosed true makes a mistake in these options disable the routers that use the
	// middleware (Traefik then answers 404); by default it is logged and nothing is mirrored.
	FailClosed bool `json:"failClosed,omitempty"`
}

// CompareConfig is the compare block of the configuration.
type CompareConfig struct {
	// Enabled turns the comparison on.
	Enabled bool `json:"enabled,omitempty"`
	// MaxBodySize is how many answer bytes are captured from each side.
	MaxBodySize int64 `json:"maxBodySize,omitempty"`
	// IgnoreHeaders are answer headers never compared.
	IgnoreHeaders []string `json:"ignoreHeaders,omitempty"`
	// IgnoreJSONPaths are dotted JSON paths never compared ("meta.timestamp", "items.*.id").
	IgnoreJSONPaths []string `json:"ignoreJSONPaths,omitempty"`
	// Percent is the share of copied requests that are also compared, 0 to 100.
	Percent float64 `json:"percent,omitempty"`
	// LogFile is where difference lines are appended; empty means Traefik's log.
	LogFile string `json:"logFile,omitempty"`
}

// CreateConfig returns the default configuration.
func CreateConfig() *Config {
	return &Config{
		Percent:     100,
		MirrorBody:  true,
		MaxBodySize: 1 << 20,
		BodyBuffer:  1 << 20,
		StreamStall: "1s",
		Timeout:     "5s",
		MaxInflight: 100,
		Redis:       defaultRedis(),
		Compare: CompareConfig{
			MaxBodySize: 64 << 10,
			Percent:     100,
		},
		Record: defaultRecord(),
	}
}

// maxCAFile bounds what is read of caFile: a bundle of every public CA is about 200 KiB.
const maxCAFile = 4 << 20

// readSmallFile reads a regular file of at most limit bytes. Anything else is refused before it
// is opened (a FIFO would block New, and with it every configuration build of Traefik; a device
// such as /dev/zero would be read without end).
func readSmallFile(path string, limit int64) ([]byte, error) {
	if err := regularFile(path); err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err == nil && int64(len(b)) > limit {
		err = fmt.Errorf("larger than %d bytes", limit)
	}
	return b, err
}

// regularFile says why path, if it exists, is not a regular file.
func regularFile(path string) error {
	info, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !info.Mode().IsRegular() {
		return fmt.Errorf("not a regular file (%s)", info.Mode().Type())
	}
	return nil
}

// maxBodyBuffer bounds bodyBuffer: what one copy may hold of a body.
const maxBodyBuffer = 1 << 30

// maxRetries bounds retries: every attempt must fit in the one timeout anyway.
const maxRetries = 10

// minCopyRate and maxCopyRate bound maxRate so that the time between two copies, in
// nanoseconds, and a second's burst fit in an int64 (0.000001 is also the least a YAML float
// keeps through Traefik's file provider, which keeps 6 decimals).
const (
	minCopyRate = 0.000001
	maxCopyRate = 1e9
)

// settings is a validated Config, compiled once in New for the request path.
type settings struct {
	base        string // scheme://host[:port], for the log
	scheme      string
	basePath    string // the url's path, decoded and escaped, without trailing slash
	baseRawPath string
	host        string
	percent     float64
	share       float64 // percent / 100 for a random draw (1 with sampleBy, which byShare serves)
	byShare     float64 // percent / 100 by sampleBy's hash (1 without sampleBy)
	gate        bool    // sampleBy or a filter decides before serve
	choose      bool    // percent below 100, sampleBy or a filter: ServeHTTP calls choose
	// leanUnder is one more than the largest body the short path reads ahead (see serve), or 0
	// when the short path is not taken at all: one comparison decides both.
	leanUnder   uint64
	mirrorBody  bool
	maxBodySize int64 // -1: no limit
	bodyBuffer  int   // the most of a body a copy holds
	streams     bool  // a body past bodyBuffer is streamed: maxBodySize allows more
	streamStall time.Duration
	timeout     time.Duration
	maxInflight int64

	filter       bool            // methods, pathRegex or matchHeaders is set
	methods      map[string]bool // nil: all
	pathRegex    *regexp.Regexp
	matchHeaders []headerMatch
	sampleBy     string // canonical header name

	shape         bool // setHeaders, removeHeaders or preserveHost is set
	setHeaders    http.Header
	removeHeaders []string // canonical names
	preserveHost  bool
	retries       int

	tlsKey    string // which shared transport: "" for the default one
	tlsConfig *tls.Config

	rateInterval  int64 // nanoseconds between copies at maxRate; 0: no cap
	rateTolerance int64 // how far ahead of the rate a burst may go, in nanoseconds
	maxRate       float64
	redis         *redisOptions // nil: maxRate is this process's; else the fleet's (fleet.go)

	metricsAddress string
	metrics        bool // metricsAddress is set: the copies' durations, answers and bytes are counted

	compare *compareSettings // nil: off
	record  *recordSettings  // nil: off
}

type headerMatch struct {
	name string
	re   *regexp.Regexp
}

func compile(c *Config) (settings, error) {
	var s settings
	if c == nil {
		return s, fmt.Errorf("mirror: no configuration")
	}
	if err := compileURL(&s, c); err != nil {
		return s, err
	}

	if math.IsNaN(c.Percent) || c.Percent < 0 || c.Percent > 100 {
		return s, fmt.Errorf("mirror: invalid percent %v: must be between 0 and 100", c.Percent)
	}
	s.percent = c.Percent
	s.share, s.byShare = c.Percent/100, 1
	s.mirrorBody = c.MirrorBody

	if c.MaxBodySize < -1 {
		return s, fmt.Errorf("mirror: invalid maxBodySize %d: must be -1 (no limit) or a size in bytes", c.MaxBodySize)
	}
	s.maxBodySize = c.MaxBodySize
	if c.BodyBuffer < readAhead || c.BodyBuffer > maxBodyBuffer {
		return s, fmt.Errorf("mirror: invalid bodyBuffer %d: must be from %d to %d bytes", c.BodyBuffer, readAhead, maxBodyBuffer)
	}
	s.bodyBuffer = int(c.BodyBuffer)
	s.streams = c.MaxBodySize < 0 || c.MaxBodySize > c.BodyBuffer

	// Timeout is a string: Traefik's decoder cannot turn "5s" into a time.Duration.
	var err error
	s.timeout, err = time.ParseDuration(c.Timeout)
	if err != nil {
		return s, fmt.Errorf("mirror: invalid timeout %q: %w", c.Timeout, err)
	}
	if s.timeout <= 0 {
		return s, fmt.Errorf("mirror: invalid timeout %q: must be positive", c.Timeout)
	}
	if s.streamStall, err = time.ParseDuration(c.StreamStall); err != nil {
		return s, fmt.Errorf("mirror: invalid streamStall %q: %w", c.StreamStall, err)
	}
	if s.streamStall < 0 {
		return s, fmt.Errorf("mirror: invalid streamStall %q: must not be negative", c.StreamStall)
	}

	if c.MaxInflight < 1 {
		return s, fmt.Errorf("mirror: invalid maxInflight %d: must be at least 1", c.MaxInflight)
	}
	s.maxInflight = int64(c.MaxInflight)
	if s.maxInflight > maxSlots { // far beyond what a process can hold
		s.maxInflight = maxSlots
	}

	if err := compileFilters(&s, c); err != nil {
		return s, err
	}
	if err := compileShape(&s, c); err != nil {
		return s, err
	}
	if err := compileTLS(&s, c); err != nil {
		return s, err
	}

	if math.IsNaN(c.MaxRate) || c.MaxRate < 0 || c.MaxRate > 0 && (c.MaxRate < minCopyRate || c.MaxRate > maxCopyRate) {
		return s, fmt.Errorf("mirror: invalid maxRate %v: must be 0 (no cap) or copies per second from 0.000001 to 1e9", c.MaxRate)
	}
	if c.MaxRate > 0 {
		s.maxRate = c.MaxRate
		s.rateInterval = int64(float64(time.Second) / c.MaxRate)
		if s.rateInterval < 1 {
			s.rateInterval = 1
		}
		// A burst of at most one second's worth, and at least one copy.
		burst := math.Floor(c.MaxRate)
		if burst < 1 {
			burst = 1
		}
		s.rateTolerance = int64(burst-1) * s.rateInterval
	}

	if err := compileRedis(&s, c); err != nil {
		return s, err
	}

	if s.metricsAddress, err = metricsAddress(c.MetricsAddress); err != nil {
		return s, err
	}

	if s.compare, err = compileCompare(&c.Compare); err != nil {
		return s, err
	}
	if s.record, err = compileRecord(&c.Record, s.compare != nil); err != nil {
		return s, err
	}
	if s.record != nil && s.compare != nil && s.compare.logFile != "" && s.record.file == filepath.Clean(s.compare.logFile) {
		return s, fmt.Errorf("mirror: invalid record.file %q: it is compare.logFile too, whose lines would break its records", c.Record.File)
	}
	s.metrics = s.metricsAddress != ""
	s.choose = s.share < 1 || s.gate
	// The short path copies what needs no option's work on the client's path: no rate to take
	// from, no answer to capture, no retry, and a body read ahead within maxBodySize.
	if s.mirrorBody && s.rateInterval == 0 && s.compare == nil && s.retries == 0 {
		s.leanUnder = readAhead + 1
		if s.maxBodySize >= 0 && s.maxBodySize < readAhead {
			s.leanUnder = uint64(s.maxBodySize) + 1
		}
	}
	return s, nil
}

// metricsAddress checks a metricsAddress ("" for none) and gives it as the listener is keyed.
func metricsAddress(addr string) (string, error) {
	if addr == "" {
		return "", nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("mirror: invalid metricsAddress %q: %w", addr, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("mirror: invalid metricsAddress %q: port must be a number from 1 to 65535", addr)
	}
	return net.JoinHostPort(host, port), nil
}

func compileURL(s *settings, c *Config) error {
	if c.URL == "" {
		return fmt.Errorf("mirror: option url is required")
	}
	u, err := url.Parse(c.URL)
	if err != nil {
		return fmt.Errorf("mirror: invalid url %q: %w", c.URL, err)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return fmt.Errorf("mirror: invalid url %q: scheme must be http or https", c.URL)
	case u.Host == "":
		return fmt.Errorf("mirror: invalid url %q: no host", c.URL)
	case u.User != nil:
		return fmt.Errorf("mirror: invalid url %q: user info is not supported; use setHeaders for credentials", c.URL)
	case u.RawQuery != "" || u.ForceQuery:
		return fmt.Errorf("mirror: invalid url %q: must not have a query; the request's query is appended", c.URL)
	case u.Fragment != "" || strings.Contains(c.URL, "#"):
		return fmt.Errorf("mirror: invalid url %q: must not have a fragment", c.URL)
	}
	s.host = u.Host
	s.base = u.Scheme + "://" + u.Host
	s.scheme = u.Scheme
	s.basePath = strings.TrimSuffix(u.Path, "/")
	s.baseRawPath = strings.TrimSuffix(u.EscapedPath(), "/")
	return nil
}

// validHeaderName says whether name is an HTTP token (RFC 9110, section 5.1).
func validHeaderName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		b := name[i]
		if b <= ' ' || b >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, b) >= 0 {
			return false
		}
	}
	return true
}

func compileFilters(s *settings, c *Config) error {
	for _, m := range c.Methods {
		name := strings.ToUpper(strings.TrimSpace(m))
		if name == "" {
			continue // "post," from a label
		}
		if !validHeaderName(name) {
			return fmt.Errorf("mirror: invalid methods %q: %q is not an HTTP method", strings.Join(c.Methods, ","), m)
		}
		if s.methods == nil {
			s.methods = map[string]bool{}
		}
		s.methods[name] = true
	}
	if c.PathRegex != "" {
		re, err := regexp.Compile(c.PathRegex)
		if err != nil {
			return fmt.Errorf("mirror: invalid pathRegex %q: %w", c.PathRegex, err)
		}
		s.pathRegex = re
	}
	names := make([]string, 0, len(c.MatchHeaders))
	for name := range c.MatchHeaders {
		names = append(names, name)
	}
	// The order of the checks, and of errors, is stable.
	sort.Slice(names, func(i, j int) bool { return http.CanonicalHeaderKey(names[i]) < http.CanonicalHeaderKey(names[j]) })
	for _, name := range names {
		expr := c.MatchHeaders[name]
		if !validHeaderName(name) {
			return fmt.Errorf("mirror: invalid matchHeaders %q: not a header name", name)
		}
		re, err := regexp.Compile(expr)
		if err != nil {
			return fmt.Errorf("mirror: invalid matchHeaders %q: %q: %w", name, expr, err)
		}
		s.matchHeaders = append(s.matchHeaders, headerMatch{name: http.CanonicalHeaderKey(name), re: re})
	}
	s.filter = s.methods != nil || s.pathRegex != nil || s.matchHeaders != nil

	if c.SampleBy != "" {
		if !validHeaderName(c.SampleBy) {
			return fmt.Errorf("mirror: invalid sampleBy %q: not a header name", c.SampleBy)
		}
		s.sampleBy = http.CanonicalHeaderKey(c.SampleBy)
		s.share, s.byShare = 1, s.share
	}
	s.gate = s.filter || s.byShare < 1
	return nil
}

func compileShape(s *settings, c *Config) error {
	for name, value := range c.SetHeaders {
		if !validHeaderName(name) {
			return fmt.Errorf("mirror: invalid setHeaders %q: not a header name", name)
		}
		if strings.ContainsAny(value, "\r\n\x00") {
			return fmt.Errorf("mirror: invalid setHeaders %q: the value holds a line break or NUL", name)
		}
		if s.setHeaders == nil {
			s.setHeaders = http.Header{}
		}
		s.setHeaders[http.CanonicalHeaderKey(name)] = []string{value}
	}
	for _, name := range c.RemoveHeaders {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		if !validHeaderName(name) {
			return fmt.Errorf("mirror: invalid removeHeaders %q: %q is not a header name", strings.Join(c.RemoveHeaders, ","), name)
		}
		if name = http.CanonicalHeaderKey(name); name != loopHeader { // loop protection is not optional
			s.removeHeaders = append(s.removeHeaders, name)
		}
	}
	s.preserveHost = c.PreserveHost
	s.shape = s.setHeaders != nil || s.removeHeaders != nil || s.preserveHost

	if c.Retries < 0 || c.Retries > maxRetries {
		return fmt.Errorf("mirror: invalid retries %d: must be from 0 to %d", c.Retries, maxRetries)
	}
	s.retries = c.Retries
	return nil
}

func compileTLS(s *settings, c *Config) error {
	if !c.InsecureSkipVerify && c.CAFile == "" && c.ServerName == "" {
		return nil
	}
	if !strings.HasPrefix(s.base, "https://") {
		for _, o := range []struct{ name, value string }{
			{"insecureSkipVerify", fmt.Sprint(c.InsecureSkipVerify)}, {"caFile", c.CAFile}, {"serverName", c.ServerName},
		} {
			if o.value != "" && o.value != "false" {
				return fmt.Errorf("mirror: invalid %s %q: url %q is not https", o.name, o.value, c.URL)
			}
		}
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.ServerName, InsecureSkipVerify: c.InsecureSkipVerify}
	key := fmt.Sprintf("insecure=%v serverName=%q", c.InsecureSkipVerify, c.ServerName)
	if c.CAFile != "" {
		pem, err := readSmallFile(c.CAFile, maxCAFile)
		if err != nil {
			return fmt.Errorf("mirror: invalid caFile %q: %w", c.CAFile, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("mirror: invalid caFile %q: no PEM certificate in it", c.CAFile)
		}
		cfg.RootCAs = pool
		sum := sha256.Sum256(pem)
		key += " ca=" + hex.EncodeToString(sum[:])
	}
	s.tlsKey, s.tlsConfig = key, cfg
	return nil
}
