#!/usr/bin/env bash
# Prints the path of a Traefik binary of the pinned version, building it from
# Traefik's Go module the first time (about ten minutes on 2 cores, cached after).
# TRAEFIK_BIN overrides it with an existing binary; TRAEFIK_VERSION picks another version.
set -euo pipefail

if [ -n "${TRAEFIK_BIN:-}" ]; then
  [ -x "$TRAEFIK_BIN" ] || { echo "traefik.sh: TRAEFIK_BIN=$TRAEFIK_BIN is not executable" >&2; exit 1; }
  echo "$TRAEFIK_BIN"
  exit 0
fi

version=${TRAEFIK_VERSION:-v3.6.12}
cache=${TRAEFIK_CACHE:-$(go env GOCACHE)/traefik-mirror}
bin="$cache/traefik-$version"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

echo "traefik.sh: downloading github.com/traefik/traefik/v3@$version" >&2
# go install pkg@version refuses modules with replace directives, so build from a copy.
dir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "github.com/traefik/traefik/v3@$version" |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -n "$dir" ] || { echo "traefik.sh: go mod download gave no module directory" >&2; exit 1; }
cp -R "$dir" "$work/src"
chmod -R u+w "$work/src"

echo "traefik.sh: building Traefik $version (about 10 minutes on a cold cache; progress below)" >&2
cd "$work/src"
go mod download -x 2>&1 | grep -c '^# get' | sed 's/^/traefik.sh: modules fetched: /' >&2 || true
( while sleep 30; do echo "traefik.sh: still building Traefik $version..." >&2; done ) &
ticker=$!
trap 'kill $ticker 2>/dev/null; chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
CGO_ENABLED=0 go build -trimpath -o "$work/traefik" \
  -ldflags "-X github.com/traefik/traefik/v3/pkg/version.Version=$version" ./cmd/traefik
mv "$work/traefik" "$bin"
echo "traefik.sh: built $bin" >&2
echo "$bin"
