package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/mirrorgate/traefik-mirror/tests/harness"
)

func main() {
	mode := os.Args[1]
	body := bytes.Repeat([]byte("x"), 1024)
	primary, _ := harness.StartUpstream("127.0.0.1:0", 0, nil)
	mirror, _ := harness.StartUpstream("127.0.0.1:0", 0, nil)
	d, _ := harness.ExampleDynamic()
	d.Service("primary", primary.URL)
	d.Mirror("mirror-api", map[string]any{"url": mirror.URL})
	if mode == "none" {
		d.Router("api", "/", "primary")
	}
	web, _ := harness.FreeAddr()
	api, _ := harness.FreeAddr()
	tr, err := harness.StartTraefik(harness.Options{Debug: true, Dynamic: d.YAML(), Replace: map[string]string{harness.ExampleWeb: web, harness.ExampleAPI: api},
		Static: func(cfg map[string]any) { cfg["log"] = map[string]any{"level": "ERROR"} }})
	if err != nil {
		panic(err)
	}
	defer tr.Stop()
	tr.WaitRouters("enabled", "api")
	client := harness.Client(32)
	stop := time.Now().Add(8 * time.Second)
	var wg sync.WaitGroup
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				req, _ := http.NewRequest("POST", tr.WebURL+"/x", bytes.NewReader(body))
				harness.Do(client, req)
			}
		}()
	}
	time.Sleep(time.Second)
	resp, err := http.Get(tr.APIURL + "/debug/pprof/profile?seconds=5")
	if err != nil {
		panic(err)
	}
	f, _ := os.Create("/tmp/traefik-" + mode + ".prof")
	io.Copy(f, resp.Body)
	f.Close()
	wg.Wait()
	fmt.Println("done")
}
