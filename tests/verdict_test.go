package tests

import (
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"
)

// verdictMetric is one metric of the release verdict, as example/kubernetes/rollouts writes it.
type verdictMetric struct {
	name, query string
	max         float64 // the query's result must stay under it
}

// verdictMetrics reads the Argo Rollouts AnalysisTemplate and the Flagger MetricTemplates, with
// their variables filled in for a middleware and a window, and checks that both ask the same.
func verdictMetrics(t *testing.T, middleware, window string) []verdictMetric {
	t.Helper()
	dir := filepath.Join(harness.RepoRoot(), "example", "kubernetes", "rollouts")
	raw, err := os.ReadFile(filepath.Join(dir, "argo-analysistemplate.yaml"))
	require.NoError(t, err)
	var argo struct {
		Kind string `yaml:"kind"`
		Spec struct {
			Metrics []struct {
				Name             string `yaml:"name"`
				SuccessCondition string `yaml:"successCondition"`
				Provider         struct {
					Prometheus struct {
						Query string `yaml:"query"`
					} `yaml:"prometheus"`
				} `yaml:"provider"`
			} `yaml:"metrics"`
		} `yaml:"spec"`
	}
	require.NoError(t, yaml.Unmarshal(raw, &argo))
	require.Equal(t, "AnalysisTemplate", argo.Kind)

	raw, err = os.ReadFile(filepath.Join(dir, "flagger-metrictemplates.yaml"))
	require.NoError(t, err)
	flagger := map[string]string{}
	dec := yaml.NewDecoder(strings.NewReader(string(raw)))
	for {
		var doc struct {
			Kind     string `yaml:"kind"`
			Metadata struct {
				Name string `yaml:"name"`
			} `yaml:"metadata"`
			Spec struct {
				Query string `yaml:"query"`
			} `yaml:"spec"`
		}
		if dec.Decode(&doc) != nil {
			break
		}
		require.Equal(t, "MetricTemplate", doc.Kind)
		flagger[doc.Metadata.Name] = strings.NewReplacer("{{ variables.middleware }}", middleware, "{{ interval }}", window).Replace(doc.Spec.Query)
	}

	condition := regexp.MustCompile(`^result\[0\] < ([0-9.]+)$`)
	var metrics []verdictMetric
	for _, m := range argo.Spec.Metrics {
		c := condition.FindStringSubmatch(m.SuccessCondition)
		require.NotNil(t, c, "%s: a condition result[0] < x", m.Name)
		limit, err := strconv.ParseFloat(c[1], 64)
		require.NoError(t, err)
		query := strings.NewReplacer("{{args.middleware}}", middleware, "{{args.window}}", window).Replace(m.Provider.Prometheus.Query)
		assert.Equal(t, query, flagger[m.Name], "%s: Flagger's query is Argo's", m.Name)
		metrics = append(metrics, verdictMetric{m.Name, query, limit})
	}
	require.Len(t, metrics, 3, "mismatches, errors, latency")
	return metrics
}

// TestPrometheusShadowVerdict runs the release verdict of example/kubernetes/rollouts against a
// real Prometheus scraping a real Traefik: every metric passes for a shadow that answers as the
// primary does, and every one fails for a shadow that answers 500, otherwise and slowly.
func TestPrometheusShadowVerdict(t *testing.T) {
	metrics := freeAddr(t)
	p := startPrometheus(t, metrics)
	same, err := harness.StartUpstream("127.0.0.1:0", 10000, nil) // as the primary answers
	require.NoError(t, err)
	t.Cleanup(same.Close)
	broken, err := harness.StartUpstream("127.0.0.1:0", 10000, func(rw http.ResponseWriter, _ *http.Request) {
		time.Sleep(60 * time.Millisecond) // the primary answers within a few milliseconds
		rw.WriteHeader(http.StatusInternalServerError)
		_, _ = rw.Write([]byte("broken"))
	})
	require.NoError(t, err)
	t.Cleanup(broken.Close)

	d := exampleDynamic(t)
	for name, shadow := range map[string]*harness.Upstream{"same": same, "broken": broken} {
		d.Mirror("mirror-"+name, map[string]any{"url": shadow.URL, "metricsAddress": metrics, "compare": map[string]any{"enabled": true}})
		d.Router(name, "/"+name, "primary", "mirror-"+name)
	}
	e := startE2EWith(t, e2eOpts{dynamic: d, routers: []string{"same", "broken"}})

	// About 10 s of traffic at 20 requests per second to each, while Prometheus scrapes each
	// second; the verdict's window is the last 30 s.
	const rounds = 200
	for i := 0; i < rounds; i++ {
		e.send(t, http.MethodGet, "/same/orders/"+strconv.Itoa(i), nil)
		e.send(t, http.MethodGet, "/broken/orders/"+strconv.Itoa(i), nil)
		time.Sleep(50 * time.Millisecond) // the pace of the traffic, not a wait for anything
	}
	compared := func(s *scrape, middleware, result string) float64 {
		v, _ := s.value("traefik_mirror_compared_total", map[string]string{"middleware": middleware, "result": result})
		return v
	}
	waitScrape(t, metrics, func(s *scrape) bool {
		return compared(s, "mirror-same@file", "matched") >= rounds*0.9 && compared(s, "mirror-broken@file", "differed") >= rounds*0.9
	}, "the copies compared")

	verdict := func(middleware string) map[verdictMetric]float64 {
		got := map[verdictMetric]float64{}
		for _, m := range verdictMetrics(t, middleware, "30s") {
			var value float64
			require.Eventually(t, func() bool { // until Prometheus has scraped the last copies
				res, err := p.query(m.query)
				if err != nil || len(res) != 1 {
					return false
				}
				for _, v := range res {
					value, err = strconv.ParseFloat(v, 64)
				}
				return err == nil
			}, 30*time.Second, 200*time.Millisecond, "%s for %s", m.name, middleware)
			got[m] = value
			t.Logf("%s %s = %g (the threshold: %g)", middleware, m.name, value, m.max)
		}
		return got
	}
	for m, value := range verdict("mirror-same@file") {
		assert.Less(t, value, m.max, "%s: an identical shadow passes", m.name)
	}
	for m, value := range verdict("mirror-broken@file") {
		assert.GreaterOrEqual(t, value, m.max, "%s: a broken shadow fails", m.name)
	}
}
