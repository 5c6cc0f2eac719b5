package harness

import (
	"fmt"
	"os"
	"path/filepath"
)

// PID is the Traefik process's id.
func (t *Traefik) PID() int { return t.cmd.Process.Pid }

// OpenFiles counts the file descriptors Traefik holds open now (sockets included), from
// /proc/PID/fd.
func (t *Traefik) OpenFiles() (int, error) {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", t.PID()))
	if err != nil {
		return 0, err
	}
	return len(fds), nil
}

// OpenFilesUnder lists the files under dir that Traefik holds open now, one entry per
// descriptor, from the links in /proc/PID/fd.
func (t *Traefik) OpenFilesUnder(dir string) ([]string, error) {
	fdDir := fmt.Sprintf("/proc/%d/fd", t.PID())
	fds, err := os.ReadDir(fdDir)
	if err != nil {
		return nil, err
	}
	prefix := filepath.Clean(dir) + string(filepath.Separator)
	var under []string
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
		if err != nil {
			continue // closed since the listing
		}
		if len(target) > len(prefix) && target[:len(prefix)] == prefix {
			under = append(under, target)
		}
	}
	return under, nil
}
