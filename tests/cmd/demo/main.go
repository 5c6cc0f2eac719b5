// Command demo runs Traefik with the plugin and the configuration in example/, between a demo
// primary API and a demo mirror on 127.0.0.1, sends a few requests, and shows what the client
// got next to what the mirror received, and the middleware's metrics. It then prints each
// mirrored request live until Ctrl-C. With -compare, the mirror is a new version of the API
// that answers slightly differently, the middleware compares the answers, and the demo shows
// the difference lines and the summary.
// With DEMO_ONCE=1 it runs the scripted part only, on free ports, and exits non-zero if a copy is
// missing or differs. Otherwise it uses the example's ports (8000, 8080, 9001, 9002) where they
// are free, and free ports for those that are taken.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

// addrs gives each example address itself when it is free (and once is false), or else a free
// loopback port.
func addrs(once bool, example ...string) (map[string]string, error) {
	free, err := harness.FreeAddrs(len(example))
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for i, a := range example {
		out[a] = free[i]
		if once {
			continue
		}
		if l, err := net.Listen("tcp", a); err == nil {
			l.Close()
			out[a] = a
		} else {
			fmt.Printf("%s is taken: using %s instead\n", a, free[i])
		}
	}
	return out, nil
}

// api answers as the demo's order service; version 2 prices the tea differently.
func api(version int) http.HandlerFunc {
	return func(rw http.ResponseWriter, r *http.Request) {
		price := 4.5
		if version == 2 && strings.HasSuffix(r.URL.Path, "/42") {
			price = 4.9
		}
		rw.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(rw).Encode(map[string]any{
			"method": r.Method, "path": r.URL.Path, "item": "tea", "price": price,
			"servedAt": time.Now().Format(time.RFC3339Nano), // differs in every answer: noise
		})
	}
}

func run() error {
	compare := flag.Bool("compare", false, "the mirror is version 2 of the API; compare its answers")
	flag.Parse()
	once := os.Getenv("DEMO_ONCE") != ""
	use, err := addrs(once, harness.ExampleWeb, harness.ExampleAPI, harness.ExamplePrimary, harness.ExampleMirror, harness.ExampleMetrics)
	if err != nil {
		return err
	}
	primary, err := harness.StartUpstream(use[harness.ExamplePrimary], 1000, api(1))
	if err != nil {
		return fmt.Errorf("demo primary on %s: %w", use[harness.ExamplePrimary], err)
	}
	defer primary.Close()
	var mirrorAnswer http.HandlerFunc // the default: "ok"
	if *compare {
		mirrorAnswer = api(2)
	}
	mirror, err := harness.StartUpstream(use[harness.ExampleMirror], 1000, mirrorAnswer)
	if err != nil {
		return fmt.Errorf("demo mirror on %s: %w", use[harness.ExampleMirror], err)
	}
	defer mirror.Close()

	opts := harness.Options{Replace: use}
	var differences string
	if *compare {
		dir, err := os.MkdirTemp("", "traefik-mirror-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		differences = filepath.Join(dir, "differences.log")
		d, err := harness.ExampleDynamic()
		if err != nil {
			return err
		}
		d.Mirror("mirror-api", map[string]any{"compare": map[string]any{"enabled": true, "logFile": differences}})
		opts.Dynamic = d.YAML()
		opts.Debug = true // the summary line is at DEBUG level
		fmt.Println("Compare mode: the mirror is version 2 of the API; the middleware compares its answers.")
	}
	fmt.Println("Starting Traefik with example/traefik.yml and example/dynamic.yml ...")
	traefik, err := harness.StartTraefik(opts)
	if err != nil {
		return err
	}
	defer traefik.Stop()
	if err := traefik.WaitRouters("enabled", "api"); err != nil {
		return err
	}
	fmt.Printf("Traefik is up: %s -> primary %s, copies -> mirror %s\n\n", traefik.WebURL, primary.URL, mirror.URL)

	type step struct {
		method, path, contentType, body string
	}
	steps := []step{
		{http.MethodGet, "/api/orders?page=1", "", ""},
		{http.MethodPost, "/api/orders", "application/json", `{"customer":"ada","items":[{"sku":"tea","qty":2}]}`},
		{http.MethodPut, "/api/orders/42", "application/json", `{"status":"shipped"}`},
		{http.MethodDelete, "/api/orders/42", "", ""},
	}
	if *compare { // enough answers for the summary to name the noise
		for i := 40; i < 48; i++ {
			steps = append(steps, step{http.MethodGet, fmt.Sprintf("/api/orders/%d", i), "", ""})
		}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "REQUEST\tCLIENT GOT (from primary)\tMIRROR RECEIVED\tBODY\tX-Mirrored-By\tX-Forwarded-For\tAFTER PRIMARY")
	problems := 0
	for _, s := range steps {
		req, err := http.NewRequest(s.method, traefik.WebURL+s.path, strings.NewReader(s.body))
		if err != nil {
			return err
		}
		if s.contentType != "" {
			req.Header.Set("Content-Type", s.contentType)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		answer, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		p, okP := primary.Next(10 * time.Second)
		c, okC := mirror.Next(10 * time.Second)
		got := fmt.Sprintf("%d %s", resp.StatusCode, bytes.TrimSpace(answer))
		if !okP || !okC {
			problems++
			fmt.Fprintf(tw, "%s %s\t%s\tNOTHING\t\t\t\t\n", s.method, s.path, got)
			continue
		}
		if c.Method != s.method || c.Path+query(c.RawQuery) != s.path || string(c.Body) != s.body || string(p.Body) != s.body {
			problems++
			got += "  << COPY DIFFERS"
		}
		fmt.Fprintf(tw, "%s %s\t%s\t%s %s\t%d B sha256:%s\t%s\t%s\t%+.2fms\n",
			s.method, s.path, got, c.Method, c.Path+query(c.RawQuery), len(c.Body), c.Digest(),
			c.Header.Get("X-Mirrored-By"), c.Header.Get("X-Forwarded-For"), float64(c.At.Sub(p.At).Microseconds())/1000)
	}
	_ = tw.Flush()
	if problems > 0 {
		return fmt.Errorf("%d of %d requests were not mirrored faithfully", problems, len(steps))
	}
	fmt.Println("\nEvery request reached the primary and an identical copy reached the mirror.")
	if err := showMetrics(traefik.MetricsURL, len(steps)); err != nil {
		return err
	}
	if *compare {
		if err := showComparison(traefik, differences); err != nil {
			return err
		}
		if err := ignoreNoise(traefik, differences); err != nil {
			return err
		}
	}

	if once {
		return nil
	}
	fmt.Printf("\nTry it: curl -d '{\"hello\":\"mirror\"}' %s/anything\n", traefik.WebURL)
	fmt.Printf("Traefik's API: %s/api/http/routers   Mirrored requests appear below; Ctrl-C stops everything.\n\n", traefik.APIURL)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	for {
		select {
		case <-stop:
			fmt.Println("\nStopping Traefik and the demo servers.")
			return nil
		case <-time.After(200 * time.Millisecond):
			for _, c := range mirror.Drain() {
				fmt.Printf("%s  mirror got %s %s  %d B sha256:%s  X-Mirrored-By=%s\n", c.At.Format("15:04:05.000"),
					c.Method, c.Path+query(c.RawQuery), len(c.Body), c.Digest(), c.Header.Get("X-Mirrored-By"))
			}
			primary.Drain()
		}
	}
}

// showMetrics prints the middleware's request counts from its metrics endpoint.
func showMetrics(url string, sent int) error {
	want := fmt.Sprintf(`traefik_mirror_requests_total{middleware="mirror-api@file",outcome="sent"} %d`, sent)
	var body string
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(body, want) {
		if time.Now().After(deadline) {
			return fmt.Errorf("the metrics at %s do not show %d copies sent:\n%s", url, sent, body)
		}
		time.Sleep(50 * time.Millisecond)
		resp, err := http.Get(url)
		if err != nil {
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
	}
	fmt.Printf("\nMetrics (Prometheus format): %s\n", url)
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, "traefik_mirror_requests_total{") && !strings.HasSuffix(line, " 0") {
			fmt.Println("  " + line)
		}
	}
	return nil
}

// showComparison prints the difference lines and the summary line, which the middleware writes
// at most every 10 seconds.
func showComparison(traefik *harness.Traefik, differences string) error {
	fmt.Println("\nDifference lines (compare.logFile), one JSON object per differing answer:")
	b, err := os.ReadFile(differences)
	if err != nil {
		return fmt.Errorf("no difference lines: %w", err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	for _, line := range lines {
		fmt.Println("  " + line)
	}
	if !strings.Contains(string(b), `"name":"price"`) {
		return fmt.Errorf("the price difference is not reported")
	}
	fmt.Println("\nWaiting for the summary line (at most 10 s) ...")
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(traefik.Log(), "probable noise") {
		if time.Now().After(deadline) {
			return fmt.Errorf("no summary line with the noise report")
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Println("Summary lines (Traefik's log, DEBUG level):")
	for _, line := range strings.Split(traefik.Log(), "\n") {
		if i := strings.Index(line, "mirror mirror-api@file: sent="); i >= 0 {
			line = line[i:]
			if end := strings.Index(line, "\x1b"); end >= 0 { // Traefik's colours and fields
				line = line[:end]
			}
			fmt.Println("  " + line)
		}
	}
	return nil
}

// ignoreNoise takes the summary's advice: it reloads the middleware with the noisy field in
// compare.ignoreJSONPaths, as a person would edit the dynamic configuration, and shows that the
// difference lines then name the real difference alone.
func ignoreNoise(traefik *harness.Traefik, differences string) error {
	noisy := regexp.MustCompile(`probable noise: ([A-Za-z0-9_.*]+) differed`).FindStringSubmatch(traefik.Log())
	if noisy == nil {
		return fmt.Errorf("the summary names no noisy field")
	}
	fmt.Printf("\nNext step: the summary says %s is noise. Ignoring it (a reload of the dynamic configuration):\n", noisy[1])
	fmt.Printf("  compare:\n    enabled: true\n    logFile: %s\n    ignoreJSONPaths: [%s]\n", differences, noisy[1])
	d, err := harness.ExampleDynamic()
	if err != nil {
		return err
	}
	d.Mirror("mirror-api", map[string]any{"compare": map[string]any{"enabled": true, "logFile": differences, "ignoreJSONPaths": []string{noisy[1]}}})
	if err := traefik.SetDynamic(d.YAML()); err != nil {
		return err
	}
	// Traefik reloads a moment later: until the new middleware serves, lines still name the noise.
	deadline := time.Now().Add(15 * time.Second)
	for {
		if time.Now().After(deadline) {
			return fmt.Errorf("the difference lines still name %s after the reload", noisy[1])
		}
		before := lineCount(differences)
		resp, err := http.Get(traefik.WebURL + "/api/orders/42") // the one order priced differently
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		line := ""
		for wait := time.Now().Add(5 * time.Second); line == "" && time.Now().Before(wait); time.Sleep(20 * time.Millisecond) {
			if lines := readLines(differences); len(lines) > before {
				line = lines[len(lines)-1]
			}
		}
		if line == "" {
			return fmt.Errorf("no difference line for a request after the reload")
		}
		if !strings.Contains(line, `"name":"`+noisy[1]+`"`) {
			fmt.Println("\nThe next difference line names the real difference alone (the price, 4.5 against 4.9):")
			fmt.Println("  " + line)
			fmt.Printf("\nDifference lines go to compare.logFile (here %s), one JSON object per line;\n", differences)
			fmt.Println("without logFile, to Traefik's log at ERROR level. The summary lines go to Traefik's log.")
			return nil
		}
	}
}

func readLines(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil || len(bytes.TrimSpace(b)) == 0 {
		return nil
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

func lineCount(path string) int { return len(readLines(path)) }

func query(q string) string {
	if q == "" {
		return ""
	}
	return "?" + q
}
