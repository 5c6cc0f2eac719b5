.PHONY: default lint test unit integration demo demo-compare bench tidy plugins-local traefik clean

export GOFLAGS := -buildvcs=false
GOLANGCI_LINT_VERSION ?= v2.15.0

default: lint test

# The whole suite: unit tests and a short fuzz run, the plugin under Yaegi, a real Traefik end to
# end, and the demo (on free ports).
test: unit integration

unit:
	go test -race -count=1 ./...
	# A count, not a duration: a duration races Go 1.26's fuzz coordinator at its deadline and
	# fails with "context deadline exceeded" and no crasher (golang/go#75804, fixed in Go 1.27).
	go test -run '^$$' -fuzz FuzzCopyTarget -fuzztime 20000x .
	go test -run '^$$' -fuzz FuzzRecordFraming -fuzztime 20000x .
	go test -run '^$$' -fuzz FuzzRESPReply -fuzztime 20000x .

# The suite's results come last, then the tests it skipped and why (cmd/testsummary reads go
# test -json: a skip, such as the Prometheus test without Debian's prometheus, is easy to miss).
integration: traefik
	cd tests && TRAEFIK_BIN=$$(../scripts/traefik.sh) DEMO_ONCE=1 go run ./cmd/demo
	cd tests && TRAEFIK_BIN=$$(../scripts/traefik.sh) DEMO_ONCE=1 go run ./cmd/demo -compare
	cd tests && TRAEFIK_BIN=$$(../scripts/traefik.sh) go test -race -count=1 -timeout 20m -json ./... 2>&1 | go run ./cmd/testsummary

# Traefik with the plugin mirroring live traffic on 127.0.0.1, until Ctrl-C.
demo: traefik
	cd tests && TRAEFIK_BIN=$$(../scripts/traefik.sh) go run ./cmd/demo

# The same, with the mirror as a new version of the API whose answers are compared.
demo-compare: traefik
	cd tests && TRAEFIK_BIN=$$(../scripts/traefik.sh) go run ./cmd/demo -compare

# Go benchmarks (compiled and under Yaegi), then the load benchmark through a real Traefik.
bench: traefik
	go test -run '^$$' -bench . -benchmem -count 3 .
	cd tests && go test -run '^$$' -bench . -benchmem -count 3 .
	cd tests && TRAEFIK_BIN=$$(../scripts/traefik.sh) go run ./cmd/loadbench $(BENCH_ARGS)

# Builds (once, then cached) the pinned Traefik from its Go module.
traefik:
	@scripts/traefik.sh >/dev/null

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go' | grep -v '^vendor/'))" || { gofmt -l $$(git ls-files '*.go' | grep -v '^vendor/'); exit 1; }
	go vet ./...
	cd tests && go vet ./...
	@if go install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION); then \
		"$$(go env GOPATH)/bin/golangci-lint" run ./... && cd tests && "$$(go env GOPATH)/bin/golangci-lint" run ./... ; \
	else echo "golangci-lint $(GOLANGCI_LINT_VERSION) not available from the module proxy; gofmt and go vet only"; fi

# go.mod and go.sum of both modules as go mod tidy leaves them (the plugin has no dependency,
# so no vendor/ either).
tidy:
	go mod tidy
	cd tests && go mod tidy

# Lays the plugin out for a Traefik run from the repository root:
#   traefik --configFile=example/traefik.yml
plugins-local:
	mkdir -p plugins-local/src/github.com/mirrorgate/traefik-mirror
	cp .traefik.yml go.mod $$(ls *.go | grep -v _test.go) plugins-local/src/github.com/mirrorgate/traefik-mirror/

clean:
	rm -rf plugins-local
