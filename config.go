package mirror

import (
	"fmt"
	"math"
	"net/url"
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
	// Timeout bounds the whole copy exchange, as a Go duration ("5s", "250ms").
	Timeout string `json:"timeout,omitempty"`
	// MaxInflight is how many copies may be in flight at once; past it copies are dropped.
	MaxInflight int `json:"maxInflight,omitempty"`
}

// CreateConfig returns the default configuration.
func CreateConfig() *Config {
	return &Config{
		Percent:     100,
		MirrorBody:  true,
		MaxBodySize: 1 << 20,
		Timeout:     "5s",
		MaxInflight: 100,
	}
}

// settings is a validated Config, compiled once in New for the request path.
type settings struct {
	base        string // scheme://host[:port], what the copy's URL is parsed from
	basePath    string // the url's path, decoded and escaped, without trailing slash
	baseRawPath string
	host        string
	percent     float64
	share       float64 // percent / 100, for the request path
	mirrorBody  bool
	maxBodySize int64 // -1: no limit
	timeout     time.Duration
	maxInflight int
}

func compile(c *Config) (settings, error) {
	var s settings
	if c == nil {
		return s, fmt.Errorf("mirror: no configuration")
	}

	if c.URL == "" {
		return s, fmt.Errorf("mirror: option url is required")
	}
	u, err := url.Parse(c.URL)
	if err != nil {
		return s, fmt.Errorf("mirror: invalid url %q: %w", c.URL, err)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return s, fmt.Errorf("mirror: invalid url %q: scheme must be http or https", c.URL)
	case u.Host == "":
		return s, fmt.Errorf("mirror: invalid url %q: no host", c.URL)
	case u.User != nil:
		return s, fmt.Errorf("mirror: invalid url %q: user info is not supported", c.URL)
	case u.RawQuery != "" || u.ForceQuery:
		return s, fmt.Errorf("mirror: invalid url %q: must not have a query; the request's query is appended", c.URL)
	case u.Fragment != "" || strings.Contains(c.URL, "#"):
		return s, fmt.Errorf("mirror: invalid url %q: must not have a fragment", c.URL)
	}
	s.host = u.Host
	s.base = u.Scheme + "://" + u.Host
	s.basePath = strings.TrimSuffix(u.Path, "/")
	s.baseRawPath = strings.TrimSuffix(u.EscapedPath(), "/")

	if math.IsNaN(c.Percent) || c.Percent < 0 || c.Percent > 100 {
		return s, fmt.Errorf("mirror: invalid percent %v: must be between 0 and 100", c.Percent)
	}
	s.percent = c.Percent
	s.share = c.Percent / 100
	s.mirrorBody = c.MirrorBody

	if c.MaxBodySize < -1 {
		return s, fmt.Errorf("mirror: invalid maxBodySize %d: must be -1 (no limit) or a size in bytes", c.MaxBodySize)
	}
	s.maxBodySize = c.MaxBodySize

	// Timeout is a string: Traefik's decoder cannot turn "5s" into a time.Duration.
	s.timeout, err = time.ParseDuration(c.Timeout)
	if err != nil {
		return s, fmt.Errorf("mirror: invalid timeout %q: %w", c.Timeout, err)
	}
	if s.timeout <= 0 {
		return s, fmt.Errorf("mirror: invalid timeout %q: must be positive", c.Timeout)
	}

	if c.MaxInflight < 1 {
		return s, fmt.Errorf("mirror: invalid maxInflight %d: must be at least 1", c.MaxInflight)
	}
	s.maxInflight = c.MaxInflight
	return s, nil
}
