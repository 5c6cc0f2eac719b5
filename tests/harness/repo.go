// Package harness runs the plugin the way users do: under Yaegi, and inside a real Traefik
// process with real HTTP servers on 127.0.0.1. The tests, the demo and the load benchmark share it.
package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
)

// ModulePath is the plugin's module path, as in .traefik.yml.
const ModulePath = "github.com/mirrorgate/traefik-mirror"

// RepoRoot returns the plugin repository's root directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// LayoutPlugin copies what Traefik loads of the plugin (.traefik.yml and the root package's
// non-test Go files) to srcRoot/<module path>, and returns that directory.
func LayoutPlugin(srcRoot string) (string, error) {
	root := RepoRoot()
	return layout(root, filepath.Join(srcRoot, filepath.FromSlash(ModulePath)), filepath.Join(root, "go.mod"))
}

// layout copies a package's non-test Go files, its .traefik.yml and the extra files to dst.
func layout(src, dst string, extra ...string) (string, error) {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return "", err
	}
	names, err := filepath.Glob(filepath.Join(src, "*.go"))
	if err != nil {
		return "", err
	}
	names = append(append(names, filepath.Join(src, ".traefik.yml")), extra...)
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		b, err := os.ReadFile(name)
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(dst, filepath.Base(name)), b, 0o644); err != nil {
			return "", err
		}
	}
	return dst, nil
}

// TraefikBinary returns the Traefik binary to run: $TRAEFIK_BIN, or the pinned version that
// scripts/traefik.sh builds (or finds in its cache).
func TraefikBinary() (string, error) {
	if bin := os.Getenv("TRAEFIK_BIN"); bin != "" {
		return bin, nil
	}
	cmd := exec.Command(filepath.Join(RepoRoot(), "scripts", "traefik.sh"))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("scripts/traefik.sh: %w", err)
	}
	bin := strings.TrimSpace(string(out))
	_ = os.Setenv("TRAEFIK_BIN", bin) // once per process
	return bin, nil
}
