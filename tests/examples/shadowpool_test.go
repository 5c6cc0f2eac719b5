package examples

import (
	"context"
	"net/http"
	"testing"
	"time"

	mirror "github.com/mirrorgate/traefik-mirror"
	"github.com/mitchellh/mapstructure"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/traefik/paerser/file"
	"github.com/traefik/traefik/v3/pkg/config/dynamic"
)

// example/shadow-pool.yml decodes as Traefik's file provider decodes it, with no option the
// plugin does not know (Traefik would ignore a misspelled one silently). A real Traefik runs it
// in TestTraefikShadowPool.
func TestExampleShadowPool(t *testing.T) {
	conf := &dynamic.Configuration{}
	require.NoError(t, file.Decode(examplePath("shadow-pool.yml"), conf))

	api := conf.HTTP.Routers["api"]
	require.NotNil(t, api)
	assert.Equal(t, []string{"web"}, api.EntryPoints)
	assert.Equal(t, []string{"mirror-api"}, api.Middlewares)
	assert.Equal(t, "primary", api.Service)
	shadow := conf.HTTP.Routers["shadow"]
	require.NotNil(t, shadow)
	assert.Equal(t, []string{"shadow"}, shadow.EntryPoints, "the copies' entry point only")
	assert.Empty(t, shadow.Middlewares, "no mirroring of the copies")
	assert.Equal(t, "shadow-pool", shadow.Service)

	mw := conf.HTTP.Middlewares["mirror-api"]
	require.NotNil(t, mw)
	require.Contains(t, mw.Plugin, "mirror")
	cfg := mirror.CreateConfig()
	decoder, err := mapstructure.NewDecoder(&mapstructure.DecoderConfig{
		DecodeHook: mapstructure.StringToSliceHookFunc(","), WeaklyTypedInput: true, Result: cfg, ErrorUnused: true,
	})
	require.NoError(t, err)
	require.NoError(t, decoder.Decode(mw.Plugin["mirror"]))
	assert.Equal(t, "http://127.0.0.1:8081", cfg.URL, "the shadow entry point the comments name")
	assert.Equal(t, "127.0.0.1:9100", cfg.MetricsAddress)
	cfg.MetricsAddress = "" // New would listen on it
	_, err = mirror.New(context.Background(), http.NotFoundHandler(), cfg, "shadow-example@test")
	require.NoError(t, err)

	pool := conf.HTTP.Services["shadow-pool"]
	require.NotNil(t, pool)
	require.NotNil(t, pool.LoadBalancer)
	var urls []string
	for _, s := range pool.LoadBalancer.Servers {
		urls = append(urls, s.URL)
	}
	assert.Equal(t, []string{"http://127.0.0.1:9003", "http://127.0.0.1:9004"}, urls)
	hc := pool.LoadBalancer.HealthCheck
	require.NotNil(t, hc, "the pool has a health check")
	assert.Equal(t, "/health", hc.Path)
	assert.Positive(t, time.Duration(hc.Interval))
	assert.LessOrEqual(t, time.Duration(hc.Interval), time.Second)
	assert.Positive(t, time.Duration(hc.Timeout))
	assert.Less(t, time.Duration(hc.Timeout), time.Duration(hc.Interval))
}
