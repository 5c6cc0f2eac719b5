package examples

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	mirror "github.com/mirrorgate/traefik-mirror"
	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	yamlv3 "gopkg.in/yaml.v3"
)

// TestReadmeLinksAreAbsolute: the plugin catalog shows the readme on a site of its own, where a
// relative link leads nowhere.
func TestReadmeLinksAreAbsolute(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(harness.RepoRoot(), "readme.md"))
	require.NoError(t, err)
	for _, m := range regexp.MustCompile(`\]\(([^)\s]+)\)`).FindAllStringSubmatch(string(raw), -1) {
		target := m[1]
		assert.True(t, strings.HasPrefix(target, "https://") || strings.HasPrefix(target, "#"), "relative link %s", target)
		if rest, ok := strings.CutPrefix(target, "https://github.com/mirrorgate/traefik-mirror/"); ok {
			_, path, _ := strings.Cut(strings.TrimPrefix(strings.TrimPrefix(rest, "blob/"), "tree/"), "/")
			path, _, _ = strings.Cut(path, "#")
			_, err := os.Stat(filepath.Join(harness.RepoRoot(), filepath.FromSlash(path)))
			assert.NoError(t, err, "a link to %s, which the repository does not have", target)
		}
	}
}

// TestReadmeOptionsTable checks the readme's "Options at a glance" against the plugin's own
// Config: every option listed once, none that does not exist, and each default the one
// CreateConfig gives.
func TestReadmeOptionsTable(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(harness.RepoRoot(), "readme.md"))
	require.NoError(t, err)
	text := string(raw)
	start := strings.Index(text, "### Options at a glance")
	require.NotEqual(t, -1, start, "no options table")
	row := regexp.MustCompile("(?m)^\\| \\[`([a-zA-Z.]+)`\\]\\([^)]*\\) \\| [^|]+ \\| ([^|]+) \\|")
	listed := map[string]string{}
	for _, m := range row.FindAllStringSubmatch(text[start:], -1) {
		_, dup := listed[m[1]]
		assert.False(t, dup, "%s listed twice", m[1])
		listed[m[1]] = strings.TrimSpace(m[2])
	}

	defaults := map[string]any{}
	var walk func(prefix string, v reflect.Value)
	walk = func(prefix string, v reflect.Value) {
		for i := 0; i < v.NumField(); i++ {
			f := v.Type().Field(i)
			name := prefix + strings.Split(f.Tag.Get("json"), ",")[0]
			if f.Type.Kind() == reflect.Struct {
				walk(name+".", v.Field(i))
				continue
			}
			defaults[name] = v.Field(i).Interface()
		}
	}
	walk("", reflect.ValueOf(*mirror.CreateConfig()))

	for name, value := range defaults {
		got, ok := listed[name]
		if !assert.True(t, ok, "option %s is not in the table", name) {
			continue
		}
		switch v := reflect.ValueOf(value); v.Kind() {
		case reflect.Slice, reflect.Map:
			continue // none, or all
		case reflect.String:
			if v.String() == "" {
				continue
			}
		}
		if strings.HasPrefix(got, "`") {
			assert.Equal(t, fmt.Sprintf("`%v`", value), strings.Fields(got)[0], "the default of %s", name)
		}
	}
	for name := range listed {
		_, ok := defaults[name]
		assert.True(t, ok, "the table lists %s, which is not an option", name)
	}
}

// TestManifestIcon: the catalog shows the icon that .traefik.yml names.
func TestManifestIcon(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(harness.RepoRoot(), ".traefik.yml"))
	require.NoError(t, err)
	var manifest struct {
		IconPath string `yaml:"iconPath"`
	}
	require.NoError(t, yamlv3.Unmarshal(raw, &manifest))
	require.NotEmpty(t, manifest.IconPath)
	icon, err := os.ReadFile(filepath.Join(harness.RepoRoot(), filepath.FromSlash(manifest.IconPath)))
	require.NoError(t, err)
	assert.True(t, strings.HasPrefix(string(icon), "\x89PNG\r\n\x1a\n"), "not a PNG")
}

// TestDashboardLossRatio: the share of copies lost is of the copies meant to be sent, not of
// every request (a middleware at percent 1 loses none of the 99 it never meant to copy).
func TestDashboardLossRatio(t *testing.T) {
	raw, err := os.ReadFile(examplePath("grafana-dashboard.json"))
	require.NoError(t, err)
	var board struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	require.NoError(t, json.Unmarshal(raw, &board))
	found := false
	for _, p := range board.Panels {
		if p.Title != "Copies lost" {
			continue
		}
		found = true
		require.Len(t, p.Targets, 1)
		num, den, ok := strings.Cut(p.Targets[0].Expr, ") / sum(")
		require.True(t, ok, "a ratio: %s", p.Targets[0].Expr)
		assert.Contains(t, num, `outcome=~"failed|dropped|cut"`)
		assert.Contains(t, den, `outcome!~"sampledOut|filtered"`)
	}
	assert.True(t, found, "no Copies lost panel")
}
