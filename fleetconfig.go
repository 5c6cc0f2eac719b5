package mirror

// The redis block: its options, their defaults, and their validation in New (fleet.go has the
// budget they configure).

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// RedisConfig is the redis block: the Redis server whose database holds the budget shared by
// every process. The names are those of Traefik's rateLimit.redis.
type RedisConfig struct {
	// Endpoints are host:port of the Redis server; the first that answers is used.
	Endpoints []string `json:"endpoints,omitempty"`
	// Username and Password authenticate (AUTH); without Username, the default user.
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// DB is the database number.
	DB int `json:"db,omitempty"`
	// TLS, if set, connects with TLS.
	TLS RedisTLSConfig `json:"tls,omitempty"`
	// DialTimeout, ReadTimeout and WriteTimeout bound each step of an exchange, as Go durations.
	DialTimeout  string `json:"dialTimeout,omitempty"`
	ReadTimeout  string `json:"readTimeout,omitempty"`
	WriteTimeout string `json:"writeTimeout,omitempty"`
}

// RedisTLSConfig is the redis.tls block.
type RedisTLSConfig struct {
	// CA is a PEM file (or PEM text) of the CAs trusted for the server.
	CA string `json:"ca,omitempty"`
	// Cert and Key are a PEM client certificate and its key (files or PEM text).
	Cert string `json:"cert,omitempty"`
	Key  string `json:"key,omitempty"`
	// InsecureSkipVerify true does not verify the server's certificate.
	InsecureSkipVerify bool `json:"insecureSkipVerify,omitempty"`
}

// defaultRedis is the redis block's defaults: off, with Traefik's timeouts.
func defaultRedis() RedisConfig {
	return RedisConfig{DialTimeout: "5s", ReadTimeout: "3s", WriteTimeout: "3s"}
}

// compileRedis validates the redis block into s.redis (nil: the budget is per process).
func compileRedis(s *settings, c *Config) error {
	r := &c.Redis
	var endpoints []string
	for _, ep := range r.Endpoints {
		if ep = strings.TrimSpace(ep); ep == "" {
			continue
		}
		host, port, err := net.SplitHostPort(ep)
		if err != nil || host == "" {
			return fmt.Errorf("mirror: invalid redis.endpoints %q: %q is not host:port", strings.Join(r.Endpoints, ","), ep)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("mirror: invalid redis.endpoints %q: %q: port must be a number from 1 to 65535", strings.Join(r.Endpoints, ","), ep)
		}
		endpoints = append(endpoints, ep)
	}
	if endpoints == nil {
		if r.Username != "" || r.Password != "" || r.DB != 0 || tlsSet(&r.TLS) {
			return fmt.Errorf("mirror: invalid redis: options set without redis.endpoints")
		}
		return nil
	}
	if s.maxRate == 0 {
		return fmt.Errorf("mirror: invalid redis: maxRate must be set: it is the budget the processes share")
	}
	if r.DB < 0 {
		return fmt.Errorf("mirror: invalid redis.db %d: must not be negative", r.DB)
	}
	o := &redisOptions{endpoints: endpoints, username: r.Username, password: r.Password, db: r.DB}
	if r.Username != "" && r.Password == "" {
		return fmt.Errorf("mirror: invalid redis.username %q: redis.password is required with it", r.Username)
	}
	for _, d := range []struct {
		name, value string
		to          *time.Duration
	}{{"dialTimeout", r.DialTimeout, &o.dialTimeout}, {"readTimeout", r.ReadTimeout, &o.readTimeout}, {"writeTimeout", r.WriteTimeout, &o.writeTimeout}} {
		v, err := time.ParseDuration(d.value)
		if err != nil {
			return fmt.Errorf("mirror: invalid redis.%s %q: %w", d.name, d.value, err)
		}
		if v <= 0 {
			return fmt.Errorf("mirror: invalid redis.%s %q: must be positive", d.name, d.value)
		}
		*d.to = v
	}
	if tlsSet(&r.TLS) {
		cfg, err := redisTLS(&r.TLS)
		if err != nil {
			return err
		}
		o.tls = cfg
	}
	s.redis = o
	return nil
}

func tlsSet(t *RedisTLSConfig) bool {
	return t.CA != "" || t.Cert != "" || t.Key != "" || t.InsecureSkipVerify
}

// redisTLS builds the TLS configuration of the redis.tls block.
func redisTLS(t *RedisTLSConfig) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: t.InsecureSkipVerify} //nolint:gosec // the user's choice, as in Traefik
	if t.CA != "" {
		pem, err := fileOrContent(t.CA)
		if err != nil {
			return nil, fmt.Errorf("mirror: invalid redis.tls.ca %q: %w", t.CA, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("mirror: invalid redis.tls.ca %q: no PEM certificate in it", t.CA)
		}
		cfg.RootCAs = pool
	}
	if (t.Cert == "") != (t.Key == "") {
		return nil, fmt.Errorf("mirror: invalid redis.tls: cert and key go together")
	}
	if t.Cert != "" {
		cert, err := fileOrContent(t.Cert)
		if err != nil {
			return nil, fmt.Errorf("mirror: invalid redis.tls.cert %q: %w", t.Cert, err)
		}
		key, err := fileOrContent(t.Key)
		if err != nil {
			return nil, fmt.Errorf("mirror: invalid redis.tls.key: %w", err)
		}
		pair, err := tls.X509KeyPair(cert, key)
		if err != nil {
			return nil, fmt.Errorf("mirror: invalid redis.tls.cert %q: %w", t.Cert, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// fileOrContent reads a PEM file, or takes the value itself when it is PEM text (as Traefik's
// tls options do, and as a Kubernetes secret gives it).
func fileOrContent(v string) ([]byte, error) {
	if strings.HasPrefix(strings.TrimSpace(v), "-----BEGIN") {
		return []byte(v), nil
	}
	return readSmallFile(v, maxCAFile)
}
