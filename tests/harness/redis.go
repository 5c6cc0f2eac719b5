package harness

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// ErrNoRedis is returned by StartRedis when redis-server is not installed.
var ErrNoRedis = errors.New("no redis-server (Debian package redis-server: apt-get install -y redis-server)")

// Redis is a redis-server process on a loopback port, with nothing saved to disk.
type Redis struct {
	Addr string
	Log  *SyncBuffer

	args []string
	cmd  *exec.Cmd
	done chan struct{}
}

// StartRedis starts redis-server on a free loopback port, with extra arguments (--requirepass
// x, TLS options), and waits until it answers PING.
func StartRedis(args ...string) (*Redis, error) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		return nil, ErrNoRedis
	}
	addrs, err := FreeAddrs(1)
	if err != nil {
		return nil, err
	}
	r := &Redis{Addr: addrs[0], Log: &SyncBuffer{}, args: args}
	return r, r.Start()
}

// Start starts the server (again) on its port.
func (r *Redis) Start() error {
	_, port, _ := net.SplitHostPort(r.Addr)
	args := append([]string{"--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"}, r.args...)
	r.cmd = exec.Command("redis-server", args...)
	r.cmd.Stdout, r.cmd.Stderr = r.Log, r.Log
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the test
	if err := r.cmd.Start(); err != nil {
		return err
	}
	r.done = make(chan struct{})
	done := r.done
	go func() { _ = r.cmd.Wait(); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("redis-server exited at start:\n%s", r.Log)
		default:
		}
		if c, err := net.DialTimeout("tcp", r.Addr, 100*time.Millisecond); err == nil {
			_ = c.Close()
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	r.Stop()
	return fmt.Errorf("redis-server did not listen on %s within 10s:\n%s", r.Addr, r.Log)
}

// Stop kills the server by its PID and waits for it to end.
func (r *Redis) Stop() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

// Paced sends GET requests to url at rate per second for d, each in a goroutine of its own, and
// returns how many were sent and how many did not end in 200 (errors included).
func Paced(client *http.Client, url string, rate float64, d time.Duration) (sent, bad int64) {
	interval := time.Duration(float64(time.Second) / rate)
	var wg sync.WaitGroup
	start := time.Now()
	for next := start; next.Before(start.Add(d)); next = next.Add(interval) {
		if wait := time.Until(next); wait > 0 {
			time.Sleep(wait) // the pace of the load, not a synchronisation
		}
		sent++
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, err := http.NewRequest(http.MethodGet, url, nil)
			if err != nil {
				atomic.AddInt64(&bad, 1)
				return
			}
			if r := Do(client, req); r.Err != nil || r.Status != http.StatusOK {
				atomic.AddInt64(&bad, 1)
			}
		}()
	}
	wg.Wait()
	return sent, atomic.LoadInt64(&bad)
}

// RequireRedis says whether a missing redis-server fails the test instead of skipping it: in CI
// (.ci/run installs it).
func RequireRedis() bool { return os.Getenv("CI") != "" }

// Clients returns how many clients are connected to the server, the one asking included
// (INFO clients, after AUTH when password is set).
func (r *Redis) Clients(password string) (int, error) {
	c, err := net.DialTimeout("tcp", r.Addr, time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	cmd := "INFO clients\r\n"
	if password != "" {
		cmd = "AUTH " + password + "\r\n" + cmd
	}
	if _, err := c.Write([]byte(cmd)); err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "connected_clients:"); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, fmt.Errorf("no connected_clients in INFO: %v", sc.Err())
}
