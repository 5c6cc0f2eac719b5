package main

import (
	"fmt"
	"net/http/httptest"
	"reflect"
	"sort"
	"time"

	"github.com/traefik/yaegi/interp"
	"github.com/traefik/yaegi/stdlib"
)

func main() {
	i := interp.New(interp.Options{GoPath: "/tmp/ycal"})
	i.Use(stdlib.Symbols)
	if _, err := i.Eval(`import "cal"`); err != nil {
		panic(err)
	}
	v, err := i.Eval("cal.Run")
	if err != nil {
		panic(err)
	}
	b, err := i.Eval("cal.Boom")
	if err != nil {
		panic(err)
	}
	fmt.Println("Boom:", b.Call(nil)[0].Int())
	req := httptest.NewRequest("GET", "/x", nil)
	req.Header.Set("Accept", "a")
	req.Header.Set("User-Agent", "u")
	out := v.Call([]reflect.Value{reflect.ValueOf(req)})[0].Interface().(map[string]time.Duration)
	keys := []string{}
	for k := range out {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Printf("%-26s %v\n", k, out[k])
	}
}
