// Command testsummary reads `go test -json` on its standard input and writes what `go test`
// would (each package's result, and the whole output of every test that failed), then, last,
// every test that was skipped and why: a skip is easy to miss in a long run (a test of a real
// server whose package is not installed). It exits 1 when a test or a package failed, or when
// no package result came at all (go test itself could not run).
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
)

// event is one line of test2json's output.
type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

func main() {
	failed, results := false, 0
	outputs := map[string][]string{} // package/test -> its output lines
	var skipped []string
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	for in.Scan() {
		var e event
		if err := json.Unmarshal(in.Bytes(), &e); err != nil {
			fmt.Println(in.Text()) // not test2json: go test's own words
			continue
		}
		key := e.Package + " " + e.Test
		switch e.Action {
		case "output", "build-output":
			outputs[key] = append(outputs[key], e.Output)
			if e.Test == "" && e.Action == "output" && !strings.HasPrefix(e.Output, "=== ") &&
				!strings.HasPrefix(e.Output, "--- ") && strings.TrimSpace(e.Output) != "PASS" {
				fmt.Print(e.Output) // the package's own lines: ok, FAIL, coverage
			}
			if e.Action == "build-output" {
				fmt.Print(e.Output)
			}
		case "fail":
			failed = true
			if e.Test != "" {
				fmt.Print(strings.Join(outputs[key], ""))
			} else {
				results++
			}
		case "pass":
			if e.Test == "" {
				results++
			}
		case "skip":
			if e.Test == "" {
				results++
				break
			}
			why := reason(outputs[key])
			skipped = append(skipped, fmt.Sprintf("%s (%s): %s", e.Test, e.Package, why))
		}
		if e.Action == "pass" || e.Action == "fail" || e.Action == "skip" {
			delete(outputs, key)
		}
	}
	if len(skipped) > 0 {
		sort.Strings(skipped)
		fmt.Printf("\n%d test(s) skipped:\n", len(skipped))
		for _, s := range skipped {
			fmt.Println("  " + s)
		}
	} else {
		fmt.Println("\nNo test skipped.")
	}
	if failed || results == 0 {
		os.Exit(1)
	}
}

// reason is what a skipped test said: its lines but the run and skip markers.
func reason(lines []string) string {
	var kept []string
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- SKIP") {
			continue
		}
		kept = append(kept, t)
	}
	if len(kept) == 0 {
		return "(no reason given)"
	}
	return strings.Join(kept, " ")
}
