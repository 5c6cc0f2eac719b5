package tests

// Issue #18's recorder under Yaegi, as Traefik runs the plugin: framing, redaction, rotation,
// and the exchanges that differed.

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestYaegiRecordCopies(t *testing.T) {
	p := loadInterpreted(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "copies.gor")
	const name = "record@file"
	s := newYaegiStack(t, p, map[string]any{
		"record": map[string]any{"file": path, "maxSize": "4096", "maxFiles": "2"},
	}, name, nil)
	body := bytes.Repeat([]byte("x"), 3000) // one record per file
	forged := []byte("a" + harness.GorSeparator + "1 forged 0 0\nGET /forged HTTP/1.1\r\n\r\n")
	bodies := [][]byte{body, body, body, body, forged}
	for i, b := range bodies {
		req, err := http.NewRequest(http.MethodPost, s.front.URL+"/r?i="+fmt.Sprint(i), bytes.NewReader(b))
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer secret")
		req.Header["X-Many"] = []string{"1", "2"}
		r := harness.Do(http.DefaultClient, req)
		require.NoError(t, r.Err)
		require.Equal(t, http.StatusOK, r.Status)
		c, ok := s.mirror.Next(waitLimit)
		require.True(t, ok)
		assert.Equal(t, b, c.Body, "the copy's body")
		waitLine(t, p.stdout, fmt.Sprintf("mirror %s: sent=", name)) // before the next copy: see yaegiWarmUp
	}
	// The forged body's record is small: it goes into the file of the last whole one.
	var current []harness.GorPayload
	require.Eventually(t, func() bool {
		var err error
		current, err = harness.ReadGor(path)
		return err == nil && len(current) == 2
	}, waitLimit, 10*time.Millisecond, "the last records; stderr:\n%s", p.stderr)

	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	assert.Equal(t, []string{"copies.gor", "copies_1.gor", "copies_2.gor"}, names, "rotated as GoReplay names its chunks, maxFiles kept")
	var all []harness.GorPayload
	for _, n := range names[1:] {
		got, err := harness.ReadGor(filepath.Join(dir, n))
		require.NoError(t, err)
		require.Len(t, got, 1, n)
		all = append(all, got...)
	}
	all = append(all, current...)
	for i, pl := range all {
		assert.Equal(t, "1", pl.Meta[0], "type")
		req, b, err := pl.Request()
		require.NoError(t, err)
		assert.Equal(t, fmt.Sprint("i=", i+1), req.URL.RawQuery, "the requests in order, the oldest deleted")
		assert.Equal(t, "redacted", req.Header.Get("Authorization"))
		assert.Equal(t, []string{"1", "2"}, req.Header["X-Many"])
		if i == len(all)-1 { // the forged one: cut before the separator
			assert.Equal(t, "a", string(b))
			assert.Equal(t, fmt.Sprintf("1 of %d bytes", len(forged)), req.Header.Get("X-Mirror-Record-Cut"))
			continue
		}
		assert.Equal(t, body, b)
	}
}

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
	var got []harness.GorPayload
	require.Eventually(t, func() bool {
		var err error
		got, err = harness.ReadGor(path)
		return err == nil && len(got) == 3
	}, waitLimit, 10*time.Millisecond, "one exchange of three payloads")
	req, _, err := got[0].Request()
	require.NoError(t, err)
	assert.Equal(t, "/differs", req.URL.Path)
	for i, pl := range got {
		assert.Equal(t, fmt.Sprint(i+1), pl.Meta[0], "type")
		assert.Equal(t, got[0].Meta[1], pl.Meta[1], "one id")
	}
	code, _, body, err := got[1].Answer()
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ok", string(body), "the primary's answer")
	_, h, body, err := got[2].Answer()
	require.NoError(t, err)
	assert.Equal(t, "ok", string(body), "the mirror's answer")
	assert.Equal(t, "redacted", h.Get("Set-Cookie"))
}
