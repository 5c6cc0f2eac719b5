package examples

import (
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
)

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
