package mirror

import (
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"
)

type statusPair struct {
	Primary int `json:"primary"`
	Mirror  int `json:"mirror"`
}

type latencyPair struct {
	Primary float64 `json:"primary"`
	Mirror  float64 `json:"mirror"`
}

// diffLine is the documented, stable schema of a difference line.
type diffLine struct {
	Time        string       `json:"time"`
	Middleware  string       `json:"middleware"`
	Method      string       `json:"method"`
	Path        string       `json:"path"`
	RequestID   string       `json:"requestId,omitempty"`
	Status      statusPair   `json:"status"`
	LatencyMs   latencyPair  `json:"latencyMs"`
	Differences []difference `json:"differences"`
}

func writeDifference(m *mirror, c *copyRequest, prim, mir side, diffs []difference) {
	target := c.capture.url.EscapedPath()
	if c.capture.url.RawQuery != "" {
		target += "?" + c.capture.url.RawQuery
	}
	line := diffLine{
		Time: time.Now().UTC().Format(time.RFC3339Nano), Middleware: m.st.name, Method: c.req.Method, Path: target,
		RequestID:   c.req.Header.Get("X-Request-Id"),
		Status:      statusPair{Primary: prim.code, Mirror: mir.code},
		LatencyMs:   latencyPair{Primary: ms(prim.latency), Mirror: ms(mir.latency)},
		Differences: diffs,
	}
	b, err := json.Marshal(line)
	if err != nil {
		return
	}
	if l := m.compare.log; l != nil && l.write(b) {
		return
	}
	m.st.error("mirror " + m.st.name + ": difference " + string(b))
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// diffLog is a file that difference lines are appended to, shared by every middleware that
// names it, and opened again when it has been rotated away. It is closed when no middleware
// names it any more (see useDiffLog).
type diffLog struct {
	path    string
	mu      sync.Mutex
	f       *os.File // nil once closed
	checked time.Time
}

// diffLogs are the open log files by path; logFiles, what each middleware name was last built
// with (a name no longer configured keeps its file open: Traefik says nothing of it).
var (
	diffLogsMu sync.Mutex
	diffLogs   = map[string]*diffLog{}
	logFiles   = map[*state]string{}
)

// useDiffLog records the log file a middleware is built with ("" for none), opens it unless it
// is open, and closes every file that no middleware names any more.
func useDiffLog(st *state, path string) (*diffLog, error) {
	diffLogsMu.Lock()
	defer diffLogsMu.Unlock()
	var l *diffLog
	if path != "" {
		if l = diffLogs[path]; l == nil {
			f, err := openLogFile(path)
			if err != nil {
				return nil, fmt.Errorf("mirror: invalid compare.logFile %q: %w", path, err)
			}
			l = &diffLog{path: path, f: f, checked: time.Now()}
			diffLogs[path] = l
		}
	}
	if logFiles[st] == path {
		return l, nil
	}
	logFiles[st] = path
	named := map[string]bool{}
	for _, p := range logFiles {
		named[p] = true
	}
	for p, open := range diffLogs {
		if !named[p] {
			open.close()
			delete(diffLogs, p)
		}
	}
	return l, nil
}

// openLogFile opens a log file for appending, creating it, unless the path names something other
// than a regular file: a FIFO would block the open, in New every configuration build of Traefik.
func openLogFile(path string) (*os.File, error) {
	if err := regularFile(path); err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
}

func (l *diffLog) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	_ = l.f.Close()
	l.f = nil
}

// write appends one line; false if the file was closed (an instance built before a reload that
// named another file: the line goes to Traefik's log). At most once a second it checks that
// the path still names the open file, and opens it again if not (logrotate moved it away).
func (l *diffLog) write(line []byte) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return false
	}
	if time.Since(l.checked) >= time.Second {
		l.checked = time.Now()
		open, err1 := l.f.Stat()
		named, err2 := os.Stat(l.path)
		if err1 != nil || err2 != nil || !os.SameFile(open, named) {
			if f, err := openLogFile(l.path); err == nil {
				_ = l.f.Close()
				l.f = f
			}
		}
	}
	_, _ = l.f.Write(append(line, '\n'))
	return true
}
