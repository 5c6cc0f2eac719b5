package mirror

import (
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// recorder is one record file, shared by every middleware that names it and kept across
// reloads, closed when no middleware names it any more (see useRecorder). It is opened on the
// first write, not in New: a path that cannot be written is no configuration error, and the
// middleware copies as usual. A file that cannot be opened is tried again after recordRetry; a
// failed write or rotation is tried again at the next payload. Past maxSize the file is rotated
// as GoReplay names its chunks (requests.gor becomes requests_0.gor, then requests_1.gor, ...),
// and the oldest beyond maxFiles are deleted.
type recorder struct {
	path string

	mu       sync.Mutex
	f        *os.File // nil: not open
	size     int64    // bytes in the open file
	regular  bool     // the path is a regular file: it is rotated (a device such as /dev/null is not)
	broken   bool     // a write was cut short: the next payload begins with the separator
	closed   bool     // no middleware names this file any more
	retryAt  time.Time
	checked  time.Time // when the path was last seen to name the open file
	next     int       // the index the next rotated file gets
	maxSize  int64
	maxFiles int

	complained atomic.Int64 // unix nanoseconds before which no other failure is logged
	failures   atomic.Int64 // since the last line
}

// recorders are the record files by path; recordFiles, what each middleware name was last
// built with (a name no longer configured keeps its file: Traefik says nothing of it).
var (
	recordersMu sync.Mutex
	recorders   = map[string]*recorder{}
	recordFiles = map[*state]string{}
)

// useRecorder records the file a middleware is built with (nil: none), makes its recorder
// unless there is one, and closes those that no middleware names any more. The last build's
// maxSize and maxFiles apply to a file that several middlewares name.
func useRecorder(st *state, rs *recordSettings) {
	recordersMu.Lock()
	defer recordersMu.Unlock()
	path := ""
	if rs != nil {
		path = rs.file
		w := recorders[path]
		if w == nil {
			w = &recorder{path: path, next: -1}
			recorders[path] = w
		}
		w.mu.Lock()
		w.maxSize = rs.maxSize // one field a statement: Yaegi v0.16.1 misassigns tuples of fields
		w.maxFiles = rs.maxFiles
		w.mu.Unlock()
		rs.w = w
	}
	if recordFiles[st] == path {
		return
	}
	recordFiles[st] = path
	named := map[string]bool{}
	for _, p := range recordFiles {
		named[p] = true
	}
	for p, w := range recorders {
		if !named[p] {
			w.close()
			delete(recorders, p)
		}
	}
}

func (w *recorder) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f != nil {
		_ = w.f.Close()
	}
	w.f = nil
	w.closed = true
}

var errRecordClosed = errors.New("the record file is no longer configured")

// write appends b in one write, rotating the file first when b would take it past maxSize.
func (w *recorder) write(b []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return errRecordClosed
	}
	if w.f != nil && w.regular && time.Since(w.checked) >= time.Second && !w.stillThere() {
		_ = w.f.Close() // moved or deleted (taken away to be replayed, say): begun anew at the path
		w.f = nil
		w.retryAt = time.Time{}
	}
	if w.f == nil {
		if err := w.open(); err != nil {
			return err
		}
	}
	if w.regular && w.size > 0 && w.size+int64(len(b)) > w.maxSize {
		if err := w.rotate(); err != nil {
			return err
		}
	}
	if w.broken {
		b = append([]byte(recordSeparator), b...)
	}
	n, err := w.f.Write(b)
	w.size += int64(n)
	w.broken = err != nil && n > 0
	return err
}

// stillThere says whether the path still names the open file; it is asked at most once a second.
func (w *recorder) stillThere() bool {
	w.checked = time.Now()
	open, err1 := w.f.Stat()
	named, err2 := os.Stat(w.path)
	return err1 == nil && err2 == nil && os.SameFile(open, named)
}

// open opens the file for appending, creating it, unless it failed a moment ago. Anything but a
// regular file or a device is refused: a FIFO would block the copy's goroutine in the open.
func (w *recorder) open() error {
	if time.Now().Before(w.retryAt) {
		return errors.New("cannot open the record file; tried again every " + recordRetry.String())
	}
	w.retryAt = time.Now().Add(recordRetry)
	info, err := os.Stat(w.path)
	if err == nil && !info.Mode().IsRegular() && info.Mode()&os.ModeDevice == 0 {
		return errors.New("not a regular file (" + info.Mode().Type().String() + ")")
	}
	f, err := os.OpenFile(w.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640) // bodies: not for every user
	if err != nil {
		return err
	}
	if info, err = f.Stat(); err != nil {
		_ = f.Close()
		return err
	}
	w.f = f // one field a statement: Yaegi v0.16.1 left a tuple-assigned *os.File nil
	w.size = info.Size()
	w.regular = info.Mode().IsRegular()
	w.broken = false
	w.checked = time.Now()
	return nil
}

// rotate renames the file to its next index, deletes the oldest rotated files beyond maxFiles,
// and opens a new file.
func (w *recorder) rotate() error {
	if w.next < 0 {
		w.next = 0
		if indexes := w.rotated(); len(indexes) > 0 {
			w.next = indexes[len(indexes)-1] + 1
		}
	}
	if err := os.Rename(w.path, rotatedName(w.path, w.next)); err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
		// The file was moved or deleted (taken away to be replayed, say): what was written went
		// with it, and a new file begins at the path. (Retrying the rename failed every record.)
		_ = w.f.Close()
		w.f = nil
		w.retryAt = time.Time{}
		return w.open()
	}
	w.next++
	_ = w.f.Close()
	w.f = nil
	indexes := w.rotated()
	for i := 0; i < len(indexes)-w.maxFiles; i++ {
		_ = os.Remove(rotatedName(w.path, indexes[i]))
	}
	w.retryAt = time.Time{}
	return w.open()
}

// rotatedName is GoReplay's name for a chunk of a file: the index before the extension.
func rotatedName(path string, index int) string {
	ext := filepath.Ext(path)
	return strings.TrimSuffix(path, ext) + "_" + strconv.Itoa(index) + ext
}

// rotated lists the indexes of the file's rotated chunks, in order.
func (w *recorder) rotated() []int {
	ext := filepath.Ext(w.path)
	prefix := filepath.Base(strings.TrimSuffix(w.path, ext)) + "_"
	entries, err := os.ReadDir(filepath.Dir(w.path))
	if err != nil {
		return nil
	}
	var indexes []int
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, prefix) || !strings.HasSuffix(name, ext) || len(name) < len(prefix)+len(ext)+1 {
			continue
		}
		if i, err := strconv.Atoi(name[len(prefix) : len(name)-len(ext)]); err == nil && i >= 0 {
			indexes = append(indexes, i)
		}
	}
	sort.Ints(indexes)
	return indexes
}

// complain writes a failure at ERROR, naming the file, at most once per logInterval per file,
// with the count of payloads not written since the last line.
func (w *recorder) complain(st *state, err error) {
	n := w.failures.Add(1)
	due := w.complained.Load()
	if time.Now().UnixNano() < due || !w.complained.CompareAndSwap(due, time.Now().Add(logInterval).UnixNano()) {
		return
	}
	w.failures.Add(-n)
	st.error("mirror " + st.name + ": cannot write record file " + w.path + ": " + err.Error() +
		" (" + strconv.FormatInt(n, 10) + " records not written; copies go on)")
}
