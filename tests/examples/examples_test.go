// Package examples checks that the deployment examples in example/ decode as Traefik decodes them.
package examples

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
	mirror "github.com/mirrorgate/traefik-mirror"
	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/mitchellh/mapstructure"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/traefik/paerser/file"
	"github.com/traefik/traefik/v3/pkg/config/dynamic"
	"github.com/traefik/traefik/v3/pkg/config/label"
	"github.com/traefik/traefik/v3/pkg/provider/kubernetes/crd/traefikio/v1alpha1"
	yamlv3 "gopkg.in/yaml.v3"
	networkingv1 "k8s.io/api/networking/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

func examplePath(parts ...string) string {
	return filepath.Join(append([]string{harness.RepoRoot(), "example"}, parts...)...)
}

// decodePluginConfig decodes a plugin block as Traefik does and runs New on it.
func decodePluginConfig(t *testing.T, options map[string]any) *mirror.Config {
	t.Helper()
	cfg := mirror.CreateConfig()
	decoder, err := mapstructure.NewDecoder(&mapstructure.DecoderConfig{
		DecodeHook: mapstructure.StringToSliceHookFunc(","), WeaklyTypedInput: true, Result: cfg, ErrorUnused: true,
	})
	require.NoError(t, err)
	require.NoError(t, decoder.Decode(options))
	_, err = mirror.New(context.Background(), nil, cfg, "example@test")
	require.NoError(t, err)
	return cfg
}

// fileExample is the mirror-api middleware of example/dynamic.yml, decoded by Traefik's file
// provider.
func fileExample(t *testing.T) (*dynamic.Configuration, *mirror.Config) {
	t.Helper()
	return fileMiddleware(t, "mirror-api")
}

func fileMiddleware(t *testing.T, name string) (*dynamic.Configuration, *mirror.Config) {
	t.Helper()
	conf := &dynamic.Configuration{}
	require.NoError(t, file.Decode(examplePath("dynamic.yml"), conf))
	mw := conf.HTTP.Middlewares[name]
	require.NotNil(t, mw, name)
	require.Contains(t, mw.Plugin, "mirror")
	return conf, decodePluginConfig(t, mw.Plugin["mirror"])
}

// The shadow example sets the options that choose, shape, limit and compare the copies, as
// Traefik decodes them from each form.
func checkShadow(t *testing.T, form string, got *mirror.Config) {
	t.Helper()
	_, want := fileMiddleware(t, "mirror-shadow")
	assert.Equal(t, []string{"POST", "PUT", "PATCH"}, got.Methods, form)
	assert.Equal(t, map[string]string{"X-Canary": "^yes$"}, got.MatchHeaders, form)
	assert.True(t, got.Compare.Enabled, form)
	assert.Equal(t, []string{"meta.requestTime", "items.*.updatedAt"}, got.Compare.IgnoreJSONPaths, form)
	got.URL, got.SetHeaders, got.MetricsAddress = want.URL, want.SetHeaders, want.MetricsAddress
	assert.Equal(t, want, got, form)
}

func TestExampleFileProvider(t *testing.T) {
	conf, cfg := fileExample(t)
	assert.Equal(t, "http://"+harness.ExampleMirror, cfg.URL)
	router := conf.HTTP.Routers["api"]
	require.NotNil(t, router)
	assert.Equal(t, []string{"mirror-api"}, router.Middlewares)
	assert.Equal(t, "http://"+harness.ExamplePrimary, conf.HTTP.Services["primary"].LoadBalancer.Servers[0].URL)

	// The static file itself is loaded by a real Traefik in the end-to-end tests and the demo.
	var st struct {
		EntryPoints  map[string]struct{ Address string } `yaml:"entryPoints"`
		Global       struct{ CheckNewVersion bool }      `yaml:"global"`
		Providers    struct{ File struct{ Filename string } }
		Experimental struct {
			LocalPlugins map[string]struct {
				ModuleName string `yaml:"moduleName"`
			} `yaml:"localPlugins"`
		}
	}
	raw, err := os.ReadFile(examplePath("traefik.yml"))
	require.NoError(t, err)
	require.NoError(t, yamlv3.Unmarshal(raw, &st))
	require.Contains(t, st.Experimental.LocalPlugins, "mirror")
	assert.Equal(t, harness.ModulePath, st.Experimental.LocalPlugins["mirror"].ModuleName)
	assert.Equal(t, harness.ExampleWeb, st.EntryPoints["web"].Address)
	assert.Equal(t, "example/dynamic.yml", st.Providers.File.Filename)
	assert.False(t, st.Global.CheckNewVersion, "no calls home from the example")
}

func TestExampleDockerCompose(t *testing.T) {
	path := examplePath("docker-compose.yml")
	project, err := loader.LoadWithContext(context.Background(), types.ConfigDetails{
		WorkingDir:  filepath.Dir(path),
		ConfigFiles: []types.ConfigFile{{Filename: path}},
		Environment: map[string]string{},
	}, func(o *loader.Options) { o.SetProjectName("example", true) })
	require.NoError(t, err)
	for _, name := range []string{"traefik", "primary", "mirror"} {
		_, err := project.GetService(name)
		require.NoError(t, err, name)
	}
	traefik, _ := project.GetService("traefik")

	script, err := os.ReadFile(filepath.Join(harness.RepoRoot(), "scripts", "traefik.sh"))
	require.NoError(t, err)
	pinned := regexp.MustCompile(`TRAEFIK_VERSION:-(v[0-9.]+)`).FindSubmatch(script)
	require.NotNil(t, pinned)
	assert.Equal(t, "traefik:"+string(pinned[1]), traefik.Image, "same Traefik as the tests")

	var pluginMount *types.ServiceVolumeConfig
	for i, v := range traefik.Volumes {
		if v.Target == "/plugins-local/src/"+harness.ModulePath {
			pluginMount = &traefik.Volumes[i]
		}
	}
	require.NotNil(t, pluginMount, "the plugin is mounted as a local plugin")
	assert.Equal(t, harness.RepoRoot(), filepath.Clean(pluginMount.Source))
	assert.FileExists(t, filepath.Join(pluginMount.Source, ".traefik.yml"))
	assert.Contains(t, traefik.Command, "--experimental.localPlugins.mirror.moduleName="+harness.ModulePath)

	// The labels, decoded by Traefik's own label parser, give the file example's middleware,
	// pointing at the compose mirror service instead of 127.0.0.1.
	primary, _ := project.GetService("primary")
	conf, err := label.DecodeConfiguration(primary.Labels)
	require.NoError(t, err)
	mw := conf.HTTP.Middlewares["mirror-api"]
	require.NotNil(t, mw)
	fromLabels := decodePluginConfig(t, mw.Plugin["mirror"])
	_, fromFile := fileExample(t)
	assert.Equal(t, "http://mirror:8080", fromLabels.URL)
	// Metrics on every address of the container, published on the host's loopback: a scraper on
	// the host reaches them (127.0.0.1 in the container would be the container's own loopback).
	assert.Equal(t, ":8082", fromLabels.MetricsAddress)
	published := false
	for _, p := range traefik.Ports {
		published = published || p.Target == 8082 && p.Published == "8082" && p.HostIP == "127.0.0.1"
	}
	assert.True(t, published, "the metrics port published on 127.0.0.1:8082")
	fromLabels.URL, fromLabels.MetricsAddress = fromFile.URL, fromFile.MetricsAddress
	assert.Equal(t, fromFile, fromLabels)
	assert.Equal(t, []string{"mirror-api"}, conf.HTTP.Routers["api"].Middlewares)
	shadow := decodePluginConfig(t, conf.HTTP.Middlewares["mirror-shadow"].Plugin["mirror"])
	assert.Equal(t, map[string]string{"X-Api-Key": "shadow-key"}, shadow.SetHeaders)
	assert.Equal(t, ":8082", shadow.MetricsAddress, "one listener for both")
	checkShadow(t, "labels", shadow)

	mirrorSvc, _ := project.GetService("mirror")
	port := mirrorSvc.Environment["HTTP_PORT"]
	require.NotNil(t, port)
	assert.Equal(t, "8080", *port, "the mirror listens where the middleware sends")
}

// TestExampleGatewayAPI: the HTTPRoute mirrors through the Middleware, by an ExtensionRef filter
// (Traefik implements no RequestMirror filter), decoded with the Gateway API's own types.
func TestExampleGatewayAPI(t *testing.T) {
	raw, err := os.ReadFile(examplePath("kubernetes", "httproute.yaml"))
	require.NoError(t, err)
	var route gatewayv1.HTTPRoute
	require.NoError(t, yaml.UnmarshalStrict(raw, &route))
	assert.Equal(t, "gateway.networking.k8s.io/v1", route.APIVersion)
	assert.Equal(t, "HTTPRoute", route.Kind)
	raw, err = os.ReadFile(examplePath("kubernetes", "middleware.yaml"))
	require.NoError(t, err)
	var mw v1alpha1.Middleware
	require.NoError(t, yaml.UnmarshalStrict(raw, &mw))
	require.Len(t, route.Spec.Rules, 1)
	require.Len(t, route.Spec.Rules[0].Filters, 1)
	f := route.Spec.Rules[0].Filters[0]
	assert.Equal(t, gatewayv1.HTTPRouteFilterExtensionRef, f.Type)
	require.NotNil(t, f.ExtensionRef)
	assert.Equal(t, gatewayv1.Group("traefik.io"), f.ExtensionRef.Group)
	assert.Equal(t, gatewayv1.Kind("Middleware"), f.ExtensionRef.Kind)
	assert.Equal(t, mw.Name, string(f.ExtensionRef.Name), "the route names the mirror Middleware")
	assert.Equal(t, mw.Namespace, route.Namespace, "an ExtensionRef is local to the route's namespace")
	require.Len(t, route.Spec.Rules[0].BackendRefs, 1)
}

func TestExampleKubernetes(t *testing.T) {
	read := func(name string) []byte {
		b, err := os.ReadFile(examplePath("kubernetes", name))
		require.NoError(t, err)
		return b
	}

	var mw v1alpha1.Middleware
	require.NoError(t, yaml.UnmarshalStrict(read("middleware.yaml"), &mw))
	assert.Equal(t, "traefik.io/v1alpha1", mw.APIVersion)
	assert.Equal(t, "Middleware", mw.Kind)
	require.Contains(t, mw.Spec.Plugin, "mirror")
	var options map[string]any // as the CRD provider sees it: JSON numbers, booleans, strings
	require.NoError(t, json.Unmarshal(mw.Spec.Plugin["mirror"].Raw, &options))
	fromCRD := decodePluginConfig(t, options)
	_, fromFile := fileExample(t)
	assert.Equal(t, "http://api-shadow.default.svc.cluster.local:8080", fromCRD.URL)
	assert.Equal(t, ":8082", fromCRD.MetricsAddress, "the pod's port")
	fromCRD.URL, fromCRD.MetricsAddress = fromFile.URL, fromFile.MetricsAddress
	assert.Equal(t, fromFile, fromCRD)

	var shadowMW v1alpha1.Middleware
	require.NoError(t, yaml.UnmarshalStrict(read("middleware-shadow.yaml"), &shadowMW))
	var shadowOptions map[string]any
	require.NoError(t, json.Unmarshal(shadowMW.Spec.Plugin["mirror"].Raw, &shadowOptions))
	shadow := decodePluginConfig(t, shadowOptions)
	assert.Equal(t, map[string]string{"X-Api-Key": "urn:k8s:secret:api-shadow:api-key"}, shadow.SetHeaders, "a Secret reference")
	checkShadow(t, "CRD", shadow)

	var route v1alpha1.IngressRoute
	require.NoError(t, yaml.UnmarshalStrict(read("ingressroute.yaml"), &route))
	assert.Equal(t, "IngressRoute", route.Kind)
	require.Len(t, route.Spec.Routes, 1)
	require.Len(t, route.Spec.Routes[0].Middlewares, 1)
	assert.Equal(t, mw.Name, route.Spec.Routes[0].Middlewares[0].Name)
	assert.Equal(t, mw.Namespace, route.Namespace)

	var ing networkingv1.Ingress
	require.NoError(t, yaml.UnmarshalStrict(read("ingress.yaml"), &ing))
	assert.Equal(t, "Ingress", ing.Kind)
	assert.Equal(t, mw.Namespace+"-"+mw.Name+"@kubernetescrd", ing.Annotations["traefik.ingress.kubernetes.io/router.middlewares"])

	var values struct {
		Experimental struct {
			Plugins map[string]struct {
				ModuleName string `json:"moduleName"`
				Version    string `json:"version"`
			} `json:"plugins"`
		} `json:"experimental"`
		Ports map[string]struct {
			Port   int `json:"port"`
			Expose struct {
				Default bool `json:"default"`
			} `json:"expose"`
			Protocol string `json:"protocol"`
		} `json:"ports"`
		Deployment struct {
			PodAnnotations map[string]string `json:"podAnnotations"`
		} `json:"deployment"`
	}
	require.NoError(t, yaml.UnmarshalStrict(read("traefik-values.yaml"), &values))
	plugin := values.Experimental.Plugins["mirror"]
	assert.Equal(t, harness.ModulePath, plugin.ModuleName)
	assert.Regexp(t, `^v\d+\.\d+\.\d+$`, plugin.Version)
	// The metrics port the middleware serves on (":8082", checked above), declared and scraped,
	// not exposed.
	port := "8082"
	metricsPort := values.Ports["mirror-metrics"]
	assert.Equal(t, port, strconv.Itoa(metricsPort.Port), "the declared port is the one metricsAddress names")
	assert.False(t, metricsPort.Expose.Default, "the metrics port is not exposed by the Service")
	assert.Equal(t, map[string]string{"prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": "/metrics"},
		values.Deployment.PodAnnotations)
}
