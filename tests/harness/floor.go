package harness

import (
	"path/filepath"
)

// The floor (tests/floor) is the project's own minimal copying plugin, the measuring stick of
// the benchmarks: it is laid out and loaded like the plugin, under its own module path and key.
const (
	// FloorModulePath is the floor's module path, as in tests/floor/.traefik.yml.
	FloorModulePath = "github.com/mirrorgate/floor"
	// FloorKey is the floor's key under experimental.localPlugins and in a middleware's plugin
	// block.
	FloorKey = "floor"
)

// FloorDir returns the floor's source directory.
func FloorDir() string { return filepath.Join(RepoRoot(), "tests", "floor") }

// LayoutFloor copies what Traefik loads of the floor (.traefik.yml and the package's non-test Go
// files) to srcRoot/<FloorModulePath>, and returns that directory.
func LayoutFloor(srcRoot string) (string, error) {
	return layout(FloorDir(), filepath.Join(srcRoot, filepath.FromSlash(FloorModulePath)))
}

// Floor adds a middleware that runs the floor, copying every request to url; guarded, the
// guarded floor (tests/floor/guarded.go).
func (d *Dynamic) Floor(name, url string, guarded bool) {
	d.HTTP.Middlewares[name] = map[string]any{"plugin": map[string]any{FloorKey: map[string]any{"url": url, "guarded": guarded}}}
}

// addFloor lays the floor out next to the plugin and declares it in the static configuration.
func addFloor(srcRoot string, cfg map[string]any) error {
	if _, err := LayoutFloor(srcRoot); err != nil {
		return err
	}
	experimental, _ := cfg["experimental"].(map[string]any)
	if experimental == nil {
		experimental = map[string]any{}
		cfg["experimental"] = experimental
	}
	local, _ := experimental["localPlugins"].(map[string]any)
	if local == nil {
		local = map[string]any{}
		experimental["localPlugins"] = local
	}
	local[FloorKey] = map[string]any{"moduleName": FloorModulePath}
	return nil
}
