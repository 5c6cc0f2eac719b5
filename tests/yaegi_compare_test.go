package tests

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The comparison interpreted: the capture of the primary's answer as compiled code writes it,
// the JSON comparison, the difference line's encoding and the noise counts.
func TestYaegiCompare(t *testing.T) {
	p := loadInterpreted(t)
	events := make(chan struct{})
	primary := httptest.NewServer(jsonApp(false, events))
	t.Cleanup(primary.Close)
	shadow := httptest.NewServer(jsonApp(true, nil))
	t.Cleanup(shadow.Close)
	pu, err := url.Parse(primary.URL)
	require.NoError(t, err)
	logFile := filepath.Join(t.TempDir(), "diff.log")
	h, err := p.handler(proxyTo(pu), map[string]any{
		"url": shadow.URL, "compare": map[string]any{"enabled": "true", "logFile": logFile, "ignoreJSONPaths": "meta.timestamp"},
	}, "cmp@file")
	require.NoError(t, err)
	front := httptest.NewServer(h)
	t.Cleanup(front.Close)

	const n = 10
	for i := 0; i < n; i++ {
		for j, path := range []string{"/same/1", "/field/2", "/noise/3"} {
			resp, err := http.Get(front.URL + path)
			require.NoError(t, err)
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			assert.Equal(t, http.StatusOK, resp.StatusCode)
			assert.Contains(t, string(b), `"name":"tea"`)
			if i > 0 {
				continue
			}
			// The first copy of each kind ends before copies overlap: Yaegi v0.16.1 builds some
			// types on first use without a lock, which the race detector reports.
			switch j {
			case 0:
				waitLine(t, p.stdout, "mirror cmp@file: sent=1 matched=1")
			case 1:
				require.Eventually(t, func() bool { return len(diffLines(t, logFile)) == 1 }, waitLimit, time.Millisecond)
			}
		}
	}
	require.Eventually(t, func() bool { return len(diffLines(t, logFile)) == n }, waitLimit, 10*time.Millisecond)
	line := diffLines(t, logFile)[0]
	assert.Equal(t, "cmp@file", line["middleware"])
	assert.Equal(t, "/field/2", line["path"])
	assert.Equal(t, []any{map[string]any{"kind": "json", "name": "price", "primary": "10", "mirror": "11"}}, line["differences"])

	// An array against an object: the type switches of the JSON comparison, interpreted.
	resp, err := http.Get(front.URL + "/kinds/4")
	require.NoError(t, err)
	resp.Body.Close()
	require.Eventually(t, func() bool { return len(diffLines(t, logFile)) == n+1 }, waitLimit, 10*time.Millisecond)
	assert.Equal(t, []any{map[string]any{"kind": "json", "name": "items", "primary": `[{"qty":1,"sku":"a"}]`, "mirror": `{"qty":1,"sku":"a"}`}},
		diffLines(t, logFile)[n]["differences"])

	// An event stream is passed on event by event (the capture flushes every write).
	resp, err = http.Get(front.URL + "/events")
	require.NoError(t, err)
	r := bufio.NewReader(resp.Body)
	for i := 0; i < 3; i++ {
		l, err := r.ReadString('\n')
		require.NoError(t, err)
		assert.Equal(t, fmt.Sprintf("data: %d\n", i), l)
		_, _ = r.ReadString('\n')
		events <- struct{}{}
	}
	resp.Body.Close()
	waitLine(t, p.stdout, "mirror cmp@file: sent=")
	_, err = os.Stat(logFile)
	require.NoError(t, err)
	assert.False(t, strings.Contains(p.stderr.String(), "panic"), p.stderr.String())
}
