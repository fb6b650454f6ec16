#!/usr/bin/env bash
# Builds the TEST-ONLY `cnitool` of the CNI project (module
# github.com/containernetworking/cni, pinned below): a container runtime's
# side of the CNI protocol (libcni: reads a conflist, runs the plugins with
# the spec's environment, parses and checks their results). The e2e tests
# run our cilium-cni plugin through it, so the plugin is judged by the
# reference library and not by our own reading of the spec.
#
# Built through the Go module proxy into the Go module cache under
# $CILIUM_RS_CACHE, cached there keyed by version and recipe, linked as
# .tools/bin/cnitool. Cold build: ~20 s on 2 cores.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CILIUM_RS_CACHE:-/var/cache/cilium-rs}
bin="$here/.tools/bin"

log() { printf '[build-cnitool] %s\n' "$*" >&2; }
die() { printf '[build-cnitool] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=scripts/go-toolchain.sh
. "$here/scripts/go-toolchain.sh"

CNI_VERSION=v1.3.1
# Bump RECIPE when the build recipe below changes: it keys the cache.
RECIPE=1
out="$cache/cnitool-$CNI_VERSION-r$RECIPE"

link() {
  mkdir -p "$bin"
  ln -sfn "$out/cnitool" "$bin/cnitool"
}

if [ -x "$out/cnitool" ]; then
  link
  log "cnitool up to date ($out)"
  exit 0
fi

find_go
need_space "$cache" 500
work=$(mktemp -d "$cache/cnitool.tmp.XXXXXX")
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT

log "building cnitool $CNI_VERSION with $("$go" env GOVERSION)"
t0=$SECONDS
# `go install pkg@version` checks the module against sum.golang.org and
# needs no module file of ours.
GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$work" \
  GOFLAGS="-trimpath -modcacherw -buildvcs=false" \
  GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" \
  "$go" install -ldflags="-s -w" "github.com/containernetworking/cni/cnitool@$CNI_VERSION" >"$work/build.log" 2>&1 ||
  die "go install failed: $(tail -20 "$work/build.log")"
[ -x "$work/cnitool" ] || die "go install made no cnitool"
rm -f "$work/build.log"

if [ -x "$out/cnitool" ]; then
  log "another build finished first; keeping $out"
else
  rm -rf "$out"
  mv "$work" "$out"
fi
trap - EXIT
rm -rf "$work"
find "$cache" -maxdepth 1 -name 'cnitool-*' -type d ! -path "$out" -exec rm -rf {} +
link
log "cnitool built in $((SECONDS - t0)) s: $out/cnitool"
