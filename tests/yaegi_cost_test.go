package tests

import (
	"testing"

	"github.com/traefik/yaegi/interp"
	"github.com/traefik/yaegi/stdlib"
)

// yaegiCosts are the constructs a copy's path is made of, each as the body of a function that
// compiled code calls, as Traefik calls ServeHTTP. BenchmarkYaegiConstructs measures what each
// costs under Yaegi v0.16.1, against the call of an empty function: the cost model behind the
// request path's shape (see BENCHMARKS.md).
const yaegiCosts = `package costs

import (
	"net/http"
	"net/http/httptest"
	"io"
	"strings"
	"sync/atomic"
	"time"
)

type state struct {
	n       int64
	h       http.Header
	a, b, c int
}

var (
	s      = &state{h: http.Header{"A": {"x"}}}
	req, _ = http.NewRequest("GET", "http://mirror/path", nil)
)

func empty()                   {}
func twoArgs(_ *state, _ int)  {}
func wide(r *http.Request) bool {
	return r.ContentLength > 0 && r.Header["Expect"] == nil && r.Header["Connection"] == nil && len(r.URL.Path) > 0 && r.URL.Path[0] == '/'
}

func Empty()         {}
func CallPlain()     { twoArgs(s, 1) }
func CallStdlib()    { _ = strings.LastIndexByte("10.0.0.1:80", ':') }
func AtomicAdd()     { atomic.AddInt64(&s.n, 1) }
func TimeNow()       { _ = time.Now() }
func HeaderLookup()  { if s.h["A"] != nil { s.a = 1 } }
func HeaderSet()     { s.h["B"] = []string{"y"} }
func FieldSum()      { s.a = s.a + s.b + s.c }
func UntakenBranch() { if s.a > 1000 { s.a = s.b + s.c*2 - s.a; s.b = s.a*3 + s.b; s.c += s.a * s.b } }
func Deferred()      { defer empty() }
func Goroutine()     { go empty() }
func StructLiteral() { t := &state{a: 1, b: 2}; t.c = 3 }
func CallCondition() { wide(req) }
func RequestClone()  { _ = req.Clone(req.Context()) }

// An interpreted http.ResponseWriter (as the comparison's capture is) handed to compiled code.
type writer struct {
	http.ResponseWriter
	n int
}

var (
	recorder                      = httptest.NewRecorder()
	pooled                        = &writer{ResponseWriter: recorder}
	convertedOnce http.ResponseWriter = pooled
)

// Write counts and passes on, as the capture's does.
func (w *writer) Write(b []byte) (int, error) {
	w.n += len(b)
	return w.ResponseWriter.Write(b)
}

// CompiledCallsWrite: compiled code (io.WriteString) calls the interpreted Write once.
func CompiledCallsWrite() {
	recorder.Body.Reset()
	_, _ = io.WriteString(convertedOnce, "x")
}

func WriterFresh()         { _ = http.NewResponseController(&writer{ResponseWriter: recorder}) }
func WriterSame()          { _ = http.NewResponseController(pooled) }
func WriterConvertedOnce() { _ = http.NewResponseController(convertedOnce) }
`

func BenchmarkYaegiConstructs(b *testing.B) {
	i := interp.New(interp.Options{})
	if err := i.Use(stdlib.Symbols); err != nil {
		b.Fatal(err)
	}
	if _, err := i.Eval(yaegiCosts); err != nil {
		b.Fatal(err)
	}
	for _, name := range []string{"Empty", "CallPlain", "CallStdlib", "AtomicAdd", "TimeNow", "HeaderLookup", "HeaderSet",
		"FieldSum", "UntakenBranch", "Deferred", "Goroutine", "StructLiteral", "CallCondition", "RequestClone",
		"WriterFresh", "WriterSame", "WriterConvertedOnce", "CompiledCallsWrite"} {
		v, err := i.Eval("costs." + name)
		if err != nil {
			b.Fatal(err)
		}
		f := v.Interface().(func())
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for n := 0; n < b.N; n++ {
				f()
			}
		})
	}
}
