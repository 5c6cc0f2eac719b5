package harness

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"gopkg.in/yaml.v3"
)

// Example addresses, as written in example/: tests replace them with free ports.
const (
	ExampleWeb     = "127.0.0.1:8000"
	ExampleAPI     = "127.0.0.1:8080"
	ExamplePrimary = "127.0.0.1:9001"
	ExampleMirror  = "127.0.0.1:9002"
	ExampleMetrics = "127.0.0.1:8082"
)

// Options says how to run Traefik.
type Options struct {
	// Dynamic is the dynamic configuration (YAML); empty means example/dynamic.yml.
	Dynamic string
	// Replace maps each example address to the one to use, in both configuration files. The
	// metrics address, unless given, becomes a free port: every Traefik gets its own.
	Replace map[string]string
	// Debug turns on Traefik's DEBUG log and its pprof endpoints (api.debug).
	Debug bool
	// Static edits the decoded static configuration before it is written.
	Static func(cfg map[string]any)
	// Floor lays out the floor (tests/floor) as a second local plugin, key FloorKey.
	Floor bool
}

// Traefik is a running Traefik process, working in its own temporary directory with the
// plugin laid out as a local plugin.
type Traefik struct {
	Dir    string
	WebURL string
	APIURL string
	// MetricsURL is where the example's middlewares serve their metrics.
	MetricsURL string

	cmd     *exec.Cmd
	log     *SyncBuffer
	replace map[string]string
	done    chan struct{}
}

// StartTraefik starts Traefik with example/traefik.yml and waits until its API answers.
func StartTraefik(o Options) (*Traefik, error) {
	bin, err := TraefikBinary()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "traefik-mirror-")
	if err != nil {
		return nil, err
	}
	if _, err := LayoutPlugin(filepath.Join(dir, "plugins-local", "src")); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(dir, "example"), 0o755); err != nil {
		return nil, err
	}
	replace := map[string]string{}
	for from, to := range o.Replace {
		replace[from] = to
	}
	if _, ok := replace[ExampleMetrics]; !ok {
		free, err := FreeAddrs(1)
		if err != nil {
			return nil, err
		}
		replace[ExampleMetrics] = free[0]
	}
	t := &Traefik{Dir: dir, log: &SyncBuffer{}, replace: replace, done: make(chan struct{})}

	static, err := os.ReadFile(filepath.Join(RepoRoot(), "example", "traefik.yml"))
	if err != nil {
		return nil, err
	}
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(t.substitute(string(static))), &cfg); err != nil {
		return nil, fmt.Errorf("example/traefik.yml: %w", err)
	}
	if o.Debug {
		cfg["log"] = map[string]any{"level": "DEBUG"}
		cfg["api"].(map[string]any)["debug"] = true
	}
	if o.Floor {
		if err := addFloor(filepath.Join(dir, "plugins-local", "src"), cfg); err != nil {
			return nil, err
		}
	}
	if o.Static != nil {
		o.Static(cfg)
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "example", "traefik.yml"), out, 0o644); err != nil {
		return nil, err
	}
	dynamic := o.Dynamic
	if dynamic == "" {
		b, err := os.ReadFile(filepath.Join(RepoRoot(), "example", "dynamic.yml"))
		if err != nil {
			return nil, err
		}
		dynamic = string(b)
	}
	if err := t.SetDynamic(dynamic); err != nil {
		return nil, err
	}
	entry := cfg["entryPoints"].(map[string]any)
	t.WebURL = "http://" + entry["web"].(map[string]any)["address"].(string)
	t.APIURL = "http://" + entry["traefik"].(map[string]any)["address"].(string)
	t.MetricsURL = "http://" + replace[ExampleMetrics] + "/metrics"

	t.cmd = exec.Command(bin, "--configFile=example/traefik.yml")
	t.cmd.Dir = dir
	t.cmd.Stdout = t.log
	t.cmd.Stderr = t.log
	t.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the test
	if err := t.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = t.cmd.Wait(); close(t.done) }()

	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(t.APIURL + "/ping")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return t, nil
			}
		}
		select {
		case <-t.done:
			return nil, fmt.Errorf("traefik exited at start:\n%s", t.Log())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Stop()
			return nil, fmt.Errorf("traefik did not answer /ping within 60s:\n%s", t.Log())
		}
	}
}

func (t *Traefik) substitute(s string) string {
	for from, to := range t.replace {
		s = strings.ReplaceAll(s, from, to)
	}
	return s
}

// SetDynamic replaces the dynamic configuration file (Traefik watches it), with the example
// addresses replaced.
func (t *Traefik) SetDynamic(yamlText string) error {
	path := filepath.Join(t.Dir, "example", "dynamic.yml")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(t.substitute(yamlText)), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// WaitRouters waits until every named router is loaded with the given status
// ("enabled" or "disabled").
func (t *Traefik) WaitRouters(status string, names ...string) error {
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		got, err := t.Routers()
		if err == nil {
			ready := true
			for _, n := range names {
				if got[n+"@file"] != status {
					ready = false
				}
			}
			if ready {
				return nil
			}
			last = fmt.Sprint(got)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("routers %v not %s within 30s (last: %s)\n%s", names, status, last, t.Log())
}

// Routers returns each HTTP router's status, by name.
func (t *Traefik) Routers() (map[string]string, error) {
	resp, err := http.Get(t.APIURL + "/api/http/routers")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var routers []struct {
		Name   string `json:"name"`
		Status string `json:"status"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&routers); err != nil {
		return nil, err
	}
	got := map[string]string{}
	for _, r := range routers {
		got[r.Name] = r.Status
	}
	return got, nil
}

// Goroutines reads Traefik's goroutine count from its pprof endpoint (needs Options.Debug).
func (t *Traefik) Goroutines() (int, error) {
	resp, err := http.Get(t.APIURL + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	first, err := io.ReadAll(io.LimitReader(resp.Body, 200))
	if err != nil {
		return 0, err
	}
	var n int
	if _, err := fmt.Sscanf(string(first), "goroutine profile: total %d", &n); err != nil {
		return 0, fmt.Errorf("pprof goroutine: %q: %w", first, err)
	}
	return n, nil
}

// Stats are Traefik's CPU time and peak memory, from /proc.
type Stats struct {
	CPU     time.Duration // user + system, since start
	PeakRSS int64         // bytes, VmHWM
}

// Stats reads Traefik's process statistics.
func (t *Traefik) Stats() (Stats, error) {
	var s Stats
	pid := t.cmd.Process.Pid
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	s.CPU = time.Duration(utime+stime) * time.Second / 100 // USER_HZ is 100 on Linux
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		var kb int64
		if _, err := fmt.Sscanf(line, "VmHWM: %d kB", &kb); err == nil {
			s.PeakRSS = kb << 10
		}
	}
	return s, nil
}

// Log is everything Traefik printed so far.
func (t *Traefik) Log() string { return t.log.String() }

// Running says whether the process is still alive.
func (t *Traefik) Running() bool {
	select {
	case <-t.done:
		return false
	default:
		return true
	}
}

// Stop ends Traefik (SIGTERM, then SIGKILL after 10 s) and removes its directory.
func (t *Traefik) Stop() {
	if t.cmd != nil && t.cmd.Process != nil {
		_ = t.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-t.done:
		case <-time.After(10 * time.Second):
			_ = t.cmd.Process.Kill()
			<-t.done
		}
	}
	_ = os.RemoveAll(t.Dir)
}

// SyncBuffer is a bytes.Buffer safe for concurrent writers.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
