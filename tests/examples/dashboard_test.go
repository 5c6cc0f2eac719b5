package examples

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	mirror "github.com/mirrorgate/traefik-mirror"
	"github.com/mirrorgate/traefik-mirror/tests/harness"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// servedSeries runs the compiled plugin with metricsAddress on a free port, sends one copy
// through it (so that every family has a sample), scrapes the endpoint, and returns each series
// name it serves (a histogram's _bucket, _sum and _count) with the label names it carries. The
// copy is compared, and the mirror answers what the primary does not, so that the differences
// have a sample too.
func servedSeries(t *testing.T) map[string]map[string]bool {
	t.Helper()
	upstream, err := harness.StartUpstream("127.0.0.1:0", 10, func(rw http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(rw, "another answer") // not the primary's: a difference
	})
	require.NoError(t, err)
	t.Cleanup(upstream.Close)
	addrs, err := harness.FreeAddrs(1)
	require.NoError(t, err)
	cfg := mirror.CreateConfig()
	cfg.URL = upstream.URL
	cfg.MetricsAddress = addrs[0]
	cfg.Compare.Enabled = true
	h, err := mirror.New(context.Background(), http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(rw, "an answer")
	}), cfg, "dashboard@test")
	require.NoError(t, err)
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/dashboard", nil))

	var families map[string]*dto.MetricFamily
	var last string
	scraped := assert.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addrs[0] + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return false
		}
		last = string(body)
		var parser expfmt.TextParser
		families, err = parser.TextToMetricFamilies(bytes.NewReader(body))
		if err != nil {
			last = err.Error() + "\n" + last
			return false
		}
		return families["traefik_mirror_responses_total"] != nil && families["traefik_mirror_differences_total"] != nil &&
			len(families["traefik_mirror_copy_duration_seconds"].GetMetric()) > 0 &&
			families["traefik_mirror_copy_duration_seconds"].GetMetric()[0].GetHistogram().GetSampleCount() > 0
	}, 10*time.Second, 10*time.Millisecond)
	require.True(t, scraped, "no copy in the scrape:\n%s", last)

	series := map[string]map[string]bool{}
	add := func(name string, m *dto.Metric, extra ...string) {
		if series[name] == nil {
			series[name] = map[string]bool{}
		}
		for _, lp := range m.GetLabel() {
			series[name][lp.GetName()] = true
		}
		for _, l := range extra {
			series[name][l] = true
		}
	}
	for name, mf := range families {
		for _, m := range mf.GetMetric() {
			switch mf.GetType() {
			case dto.MetricType_HISTOGRAM:
				add(name+"_bucket", m, "le")
				add(name+"_sum", m)
				add(name+"_count", m)
			case dto.MetricType_SUMMARY:
				add(name, m, "quantile")
				add(name+"_sum", m)
				add(name+"_count", m)
			default:
				add(name, m)
			}
		}
	}
	return series
}

// panelsOf returns every panel of a dashboard, those inside rows too.
func panelsOf(panels []map[string]any) []map[string]any {
	var all []map[string]any
	for _, p := range panels {
		all = append(all, p)
		if nested, ok := p["panels"].([]any); ok {
			var inner []map[string]any
			for _, n := range nested {
				inner = append(inner, n.(map[string]any))
			}
			all = append(all, panelsOf(inner)...)
		}
	}
	return all
}

// selector is a metric name in a PromQL expression with the label names of its matchers.
type selector struct {
	metric string
	labels []string
}

// promqlKeywords are the identifiers of PromQL that are neither metrics nor functions.
var promqlKeywords = map[string]bool{
	"and": true, "or": true, "unless": true, "bool": true, "offset": true, "by": true, "without": true,
	"on": true, "ignoring": true, "group_left": true, "group_right": true, "inf": true, "nan": true, "atan2": true,
}

// promqlAggregations may take their by or without clause before their argument.
var promqlAggregations = map[string]bool{
	"sum": true, "min": true, "max": true, "avg": true, "group": true, "stddev": true, "stdvar": true, "count": true,
	"count_values": true, "bottomk": true, "topk": true, "quantile": true, "limitk": true, "limit_ratio": true,
}

// parsePromQL finds the metric selectors of an expression and the label names of its by,
// without, on and ignoring clauses. It is a lexer, not a parser: enough for checking names
// (strings, ranges and numbers are skipped; an identifier before "(" is a function).
func parsePromQL(expr string) (selectors []selector, grouping []string, err error) {
	isStart := func(c byte) bool { return c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }
	isPart := func(c byte) bool { return isStart(c) || c >= '0' && c <= '9' }
	skipSpace := func(i int) int {
		for i < len(expr) && (expr[i] == ' ' || expr[i] == '\t' || expr[i] == '\n') {
			i++
		}
		return i
	}
	// matchers reads {a="x", b=~"y"} from i (at '{') and returns the label names and the end.
	matchers := func(i int) ([]string, int, error) {
		var names []string
		i++
		for {
			i = skipSpace(i)
			if i >= len(expr) {
				return nil, i, fmt.Errorf("unterminated {")
			}
			if expr[i] == '}' {
				return names, i + 1, nil
			}
			if expr[i] == ',' {
				i++
				continue
			}
			start := i
			for i < len(expr) && isPart(expr[i]) {
				i++
			}
			if start == i {
				return nil, i, fmt.Errorf("no label name at %d", i)
			}
			names = append(names, expr[start:i])
			i = skipSpace(i)
			for i < len(expr) && strings.IndexByte("=!~", expr[i]) >= 0 {
				i++
			}
			i = skipSpace(i)
			if i >= len(expr) || expr[i] != '"' && expr[i] != '\'' && expr[i] != '`' {
				return nil, i, fmt.Errorf("no label value at %d", i)
			}
			q := expr[i]
			i++
			for i < len(expr) && expr[i] != q {
				if expr[i] == '\\' {
					i++
				}
				i++
			}
			i++
		}
	}
	for i := 0; i < len(expr); {
		c := expr[i]
		switch {
		case c == '"' || c == '\'' || c == '`':
			i++
			for i < len(expr) && expr[i] != c {
				if expr[i] == '\\' {
					i++
				}
				i++
			}
			i++
		case c == '[':
			end := strings.IndexByte(expr[i:], ']')
			if end < 0 {
				return nil, nil, fmt.Errorf("unterminated [")
			}
			i += end + 1
		case c >= '0' && c <= '9' || c == '.':
			for i < len(expr) && (isPart(expr[i]) || expr[i] == '.') {
				i++
			}
		case c == '{': // a selector without a metric name
			names, end, err := matchers(i)
			if err != nil {
				return nil, nil, err
			}
			selectors = append(selectors, selector{labels: names})
			i = end
		case isStart(c):
			start := i
			for i < len(expr) && isPart(expr[i]) {
				i++
			}
			word := expr[start:i]
			j := skipSpace(i)
			switch {
			case word == "by" || word == "without" || word == "on" || word == "ignoring" || word == "group_left" || word == "group_right":
				if j < len(expr) && expr[j] == '(' {
					end := strings.IndexByte(expr[j:], ')')
					if end < 0 {
						return nil, nil, fmt.Errorf("unterminated %s (", word)
					}
					for _, l := range strings.Split(expr[j+1:j+end], ",") {
						if l = strings.TrimSpace(l); l != "" {
							grouping = append(grouping, l)
						}
					}
					i = j + end + 1
				}
			case promqlKeywords[strings.ToLower(word)]:
			case promqlAggregations[strings.ToLower(word)] && (strings.HasPrefix(expr[j:], "by") || strings.HasPrefix(expr[j:], "without")):
				// "sum by (le) (...)": the clause comes next
			case j < len(expr) && expr[j] == '(': // a function or an aggregation
			default:
				s := selector{metric: word}
				if j < len(expr) && expr[j] == '{' {
					names, end, err := matchers(j)
					if err != nil {
						return nil, nil, err
					}
					s.labels = names
					i = end
				}
				selectors = append(selectors, s)
			}
		default:
			i++
		}
	}
	return selectors, grouping, nil
}

func TestParsePromQL(t *testing.T) {
	sel, grouping, err := parsePromQL(`histogram_quantile(0.99, sum by (le, code) (rate(a_bucket{x=~"$v", y!="}"}[$__rate_interval]))) / on(z) b + 1e3`)
	require.NoError(t, err)
	assert.Equal(t, []selector{{metric: "a_bucket", labels: []string{"x", "y"}}, {metric: "b"}}, sel)
	assert.Equal(t, []string{"le", "code", "z"}, grouping)
}

// The Grafana dashboard of example/ asks only for series the plugin serves, by labels they have.
func TestGrafanaDashboard(t *testing.T) {
	raw, err := os.ReadFile(examplePath("grafana-dashboard.json"))
	require.NoError(t, err)
	var dash struct {
		Title         string           `json:"title"`
		UID           string           `json:"uid"`
		SchemaVersion int              `json:"schemaVersion"`
		Panels        []map[string]any `json:"panels"`
		Templating    struct {
			List []map[string]any `json:"list"`
		} `json:"templating"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	require.NoError(t, dec.Decode(&dash))
	assert.NotEmpty(t, dash.Title)
	assert.NotEmpty(t, dash.UID)
	assert.Positive(t, dash.SchemaVersion)

	served := servedSeries(t)
	var names []string
	for name := range served {
		names = append(names, name)
	}
	sort.Strings(names)
	t.Logf("served: %s", strings.Join(names, " "))
	require.Contains(t, served, "traefik_mirror_copy_duration_seconds_bucket")

	// The variables: a Prometheus data source, and the middlewares from the requests counter.
	vars := map[string]map[string]any{}
	for _, v := range dash.Templating.List {
		vars[fmt.Sprint(v["name"])] = v
	}
	require.Contains(t, vars, "datasource")
	assert.Equal(t, "datasource", vars["datasource"]["type"])
	assert.Equal(t, "prometheus", vars["datasource"]["query"])
	require.Contains(t, vars, "middleware")
	mw := vars["middleware"]
	assert.Equal(t, "query", mw["type"])
	assert.Equal(t, map[string]any{"type": "prometheus", "uid": "${datasource}"}, mw["datasource"])
	query := mw["query"]
	if q, ok := query.(map[string]any); ok {
		query = q["query"]
	}
	assert.Equal(t, "label_values(traefik_mirror_requests_total, middleware)", query)
	assert.Equal(t, query, mw["definition"])
	assert.Contains(t, served["traefik_mirror_requests_total"], "middleware")

	// Every expression of every panel.
	var exprs []string
	ids := map[float64]bool{}
	for _, p := range panelsOf(dash.Panels) {
		title := fmt.Sprint(p["title"])
		id, _ := p["id"].(float64)
		assert.False(t, ids[id], "panel id %v used twice", id)
		ids[id] = true
		assert.Contains(t, p, "gridPos", title)
		if p["type"] == "row" {
			continue
		}
		assert.Equal(t, map[string]any{"type": "prometheus", "uid": "${datasource}"}, p["datasource"], "%s: data source", title)
		targets, _ := p["targets"].([]any)
		require.NotEmpty(t, targets, "%s: no query", title)
		for _, target := range targets {
			tg := target.(map[string]any)
			expr, _ := tg["expr"].(string)
			require.NotEmpty(t, expr, "%s: empty expression", title)
			assert.Equal(t, map[string]any{"type": "prometheus", "uid": "${datasource}"}, tg["datasource"], "%s: data source of %s", title, expr)
			exprs = append(exprs, expr)
		}
	}
	require.NotEmpty(t, exprs)
	for _, expr := range exprs {
		selectors, grouping, err := parsePromQL(expr)
		require.NoError(t, err, expr)
		require.NotEmpty(t, selectors, "no metric in %s", expr)
		known := map[string]bool{}
		for _, s := range selectors {
			require.NotEmpty(t, s.metric, "a selector without a metric name in %s", expr)
			labels, ok := served[s.metric]
			if !assert.True(t, ok, "%s is not served by the plugin (in %s)", s.metric, expr) {
				continue
			}
			assert.Contains(t, s.labels, "middleware", "%s is not filtered by $middleware in %s", s.metric, expr)
			for _, l := range s.labels {
				assert.True(t, labels[l], "%s has no label %s (in %s)", s.metric, l, expr)
			}
			for l := range labels {
				known[l] = true
			}
		}
		for _, l := range grouping {
			assert.True(t, known[l], "grouping by %s, a label none of the series has (in %s)", l, expr)
		}
	}

	// The panels this dashboard is for.
	all := strings.Join(exprs, "\n")
	for _, want := range []string{
		"rate(traefik_mirror_requests_total{",
		"histogram_quantile(0.5, sum by (le) (rate(traefik_mirror_copy_duration_seconds_bucket{",
		"histogram_quantile(0.9, sum by (le) (rate(traefik_mirror_copy_duration_seconds_bucket{",
		"histogram_quantile(0.99, sum by (le) (rate(traefik_mirror_copy_duration_seconds_bucket{",
		"sum by (code) (rate(traefik_mirror_responses_total{",
		"traefik_mirror_inflight{",
	} {
		assert.Contains(t, all, want)
	}

	checkWithPromtool(t, exprs)
}

// checkWithPromtool has Prometheus's own parser check each expression (Grafana's variables
// replaced), as recording rules, when promtool is installed.
func checkWithPromtool(t *testing.T, exprs []string) {
	t.Helper()
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Log("promtool not installed (Debian package prometheus): PromQL syntax not checked by Prometheus")
		return
	}
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	r := strings.NewReplacer("$__rate_interval", "5m", "$middleware", ".*")
	for i, expr := range exprs {
		quoted, err := json.Marshal(r.Replace(expr)) // a JSON string is a YAML string
		require.NoError(t, err)
		fmt.Fprintf(&rules, "      - record: dashboard:expr_%d\n        expr: %s\n", i, quoted)
	}
	path := filepath.Join(t.TempDir(), "rules.yml")
	require.NoError(t, os.WriteFile(path, []byte(rules.String()), 0o644))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, promtool, "check", "rules", path).CombinedOutput()
	assert.NoError(t, err, "promtool check rules:\n%s\n%s", out, rules.String())
	assert.Contains(t, string(out), fmt.Sprintf("%d rules found", len(exprs)))
}
