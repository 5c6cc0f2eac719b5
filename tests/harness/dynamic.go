package harness

import (
	"fmt"
	"os"
	"path/filepath"

	"gopkg.in/yaml.v3"
)

// Dynamic is a dynamic configuration built on example/dynamic.yml.
type Dynamic struct {
	HTTP struct {
		Routers     map[string]any `yaml:"routers"`
		Middlewares map[string]any `yaml:"middlewares"`
		Services    map[string]any `yaml:"services"`
	} `yaml:"http"`
}

// ExampleDynamic reads example/dynamic.yml.
func ExampleDynamic() (*Dynamic, error) {
	b, err := os.ReadFile(filepath.Join(RepoRoot(), "example", "dynamic.yml"))
	if err != nil {
		return nil, err
	}
	d := &Dynamic{}
	if err := yaml.Unmarshal(b, d); err != nil {
		return nil, fmt.Errorf("example/dynamic.yml: %w", err)
	}
	return d, nil
}

// Mirror adds a middleware with the example's options, changed by overrides.
func (d *Dynamic) Mirror(name string, overrides map[string]any) {
	example := d.HTTP.Middlewares["mirror-api"].(map[string]any)["plugin"].(map[string]any)["mirror"].(map[string]any)
	opts := map[string]any{}
	for k, v := range example {
		opts[k] = v
	}
	for k, v := range overrides {
		if v == nil {
			delete(opts, k)
			continue
		}
		opts[k] = v
	}
	d.HTTP.Middlewares[name] = map[string]any{"plugin": map[string]any{"mirror": opts}}
}

// Router adds a router for a path prefix on the web entrypoint.
func (d *Dynamic) Router(name, pathPrefix, service string, middlewares ...string) {
	r := map[string]any{"rule": "PathPrefix(`" + pathPrefix + "`)", "entryPoints": []string{"web"}, "service": service}
	if len(middlewares) > 0 {
		r["middlewares"] = middlewares
	}
	d.HTTP.Routers[name] = r
}

// Service adds a load-balancer service with one server.
func (d *Dynamic) Service(name, url string) {
	d.HTTP.Services[name] = map[string]any{"loadBalancer": map[string]any{"servers": []any{map[string]any{"url": url}}}}
}

// MirroringService adds Traefik's built-in mirroring service: all of main, a copy to mirror.
func (d *Dynamic) MirroringService(name, main, mirror string, maxBodySize int) {
	d.HTTP.Services[name] = map[string]any{"mirroring": map[string]any{
		"service": main, "mirrorBody": true, "maxBodySize": maxBodySize,
		"mirrors": []any{map[string]any{"name": mirror, "percent": 100}},
	}}
}

// YAML renders the configuration.
func (d *Dynamic) YAML() string {
	b, err := yaml.Marshal(d)
	if err != nil {
		panic(err) // maps of plain values always marshal
	}
	return string(b)
}
