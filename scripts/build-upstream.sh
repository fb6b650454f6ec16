#!/usr/bin/env bash
# Builds upstream Cilium's cilium-operator-generic (github.com/cilium/cilium,
# pinned below) for the side-by-side benchmarks of docs/benchmarks.md. Only
# the benchmark tier needs it; scripts/test.sh does not.
#
# Upstream's code comes from the Go module proxy into the Go module cache under
# $CILIUM_RS_CACHE; only our module file (scripts/upstream-operator/go.mod and
# go.sum, which pin every dependency) is in the repository. `go build` builds
# upstream's own main package (github.com/cilium/cilium/operator) with the tag
# upstream's Makefile gives cilium-operator-generic (ipam_provider_operator).
# The binary is cached in $CILIUM_RS_CACHE keyed by Cilium version, recipe
# number and a hash of the module files, and linked as
# .tools/bin/cilium-operator-generic.
#
# Needs Go >= 1.26 and the Go module proxy on a cold module cache.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CILIUM_RS_CACHE:-/var/cache/cilium-rs}
src="$here/scripts/upstream-operator"
bin="$here/.tools/bin"

log() { printf '[build-upstream] %s\n' "$*" >&2; }
die() { printf '[build-upstream] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=scripts/go-toolchain.sh
. "$here/scripts/go-toolchain.sh"

CILIUM_VERSION=v1.20.2
RECIPE=1

[ -f "$src/go.mod" ] && [ -f "$src/go.sum" ] || die "$src is incomplete"
grep -Eq "^[[:space:]]*(require[[:space:]]+)?github.com/cilium/cilium $CILIUM_VERSION[[:space:]]*\$" "$src/go.mod" ||
  die "$src/go.mod does not require github.com/cilium/cilium $CILIUM_VERSION (update CILIUM_VERSION here too)"

src_hash=$(cat "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-12)
name="cilium-operator-generic-$CILIUM_VERSION-r$RECIPE-$src_hash"
out="$cache/$name"

link() {
  mkdir -p "$bin"
  ln -sfn "$out/cilium-operator-generic" "$bin/cilium-operator-generic"
}

if [ -x "$out/cilium-operator-generic" ]; then
  link
  log "cilium-operator-generic up to date ($out)"
  exit 0
fi

find_go
need_space "$cache" 4000
work=$(mktemp -d "$cache/$name.tmp.XXXXXX")
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT

log "building cilium-operator-generic $CILIUM_VERSION with $("$go" env GOVERSION) (cold: several minutes on 2 cores)"
t0=$SECONDS
(cd "$src" &&
  GOTOOLCHAIN=local CGO_ENABLED=0 \
    GOFLAGS="-trimpath -mod=readonly -modcacherw -buildvcs=false" \
    GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" \
    "$go" build -tags ipam_provider_operator -ldflags="-s -w" \
    -o "$work/cilium-operator-generic" github.com/cilium/cilium/operator >"$work/build.log" 2>&1) ||
  die "go build failed: $(tail -20 "$work/build.log")"

# Smoke test before caching: it runs and knows the cluster-pool options.
# (Its version string comes from upstream's Makefile ldflags, not set here.)
ver=$("$work/cilium-operator-generic" --version 2>&1 || true)
case "$ver" in
  *Cilium-Operator*) ;;
  *) die "built cilium-operator-generic answered unexpectedly: $ver" ;;
esac
"$work/cilium-operator-generic" --help 2>&1 | grep -q -- --cluster-pool-ipv4-cidr ||
  die "built cilium-operator-generic has no --cluster-pool-ipv4-cidr"

rm -f "$work/build.log"
rm -rf "$out"
mv "$work" "$out"
trap - EXIT
find "$cache" -maxdepth 1 -name 'cilium-operator-generic-*' -type d ! -name '*.tmp.*' ! -path "$out" -exec rm -rf {} +
link
log "cilium-operator-generic built in $((SECONDS - t0)) s: $out/cilium-operator-generic ($(du -m "$out/cilium-operator-generic" | cut -f1) MB)"
