package tests

// Issue #18's recorder under Yaegi, as Traefik runs the plugin: the exchanges that differed
// (record_test.go has the copies, TestRecordUnderYaegi).

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestYaegiRecordDifferences(t *testing.T) {
	p := loadInterpreted(t)
	path := filepath.Join(t.TempDir(), "differences.gor")
	const name = "record-diff@file"
	s := newYaegiStack(t, p, map[string]any{
		"compare": map[string]any{"enabled": "true"},
		"record":  map[string]any{"file": path, "what": "differences"},
	}, name, func(rw http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/differs" {
			rw.Header().Set("Set-Cookie", "s=mirror")
		}
		_, _ = rw.Write([]byte("ok"))
	})
	for _, target := range []string{"/same", "/differs"} {
		r := harness.Do(http.DefaultClient, mustRequest(t, http.MethodGet, s.front.URL+target, ""))
		require.NoError(t, r.Err)
		_, ok := s.mirror.Next(waitLimit)
		require.True(t, ok)
		waitLine(t, p.stdout, fmt.Sprintf("mirror %s: sent=", name))
	}
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(path)
		return err == nil && bytes.Count(b, []byte(gorSeparator)) == 3
	}, waitLimit, 10*time.Millisecond, "one exchange of three payloads")
	got := readGor(t, path)
	req, _ := got[0].request(t)
	assert.Equal(t, "/differs", req.URL.Path)
	for i, pl := range got {
		assert.Equal(t, fmt.Sprint(i+1), pl.kind, "type")
		assert.Equal(t, got[0].id, pl.id, "one id")
	}
	code, body := got[1].response(t)
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ok", string(body), "the primary's answer")
	code, body = got[2].response(t)
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ok", string(body), "the mirror's answer")
	raw := string(got[2].msg)
	assert.Contains(t, raw, "Set-Cookie: redacted\r\n", "the mirror's Set-Cookie")
}
