#!/usr/bin/env bash
# Builds the TEST-ONLY policy oracle (scripts/oracle): a small Go program that
# asks upstream Cilium's own policy engine (github.com/cilium/cilium, pinned
# below) for policy verdicts, so the Rust engine can be tested differentially.
# The protocol is described at the top of scripts/oracle/main.go.
#
# Upstream's code comes from the Go module proxy into the Go module cache under
# $CILIUM_RS_CACHE; only our wrapper module is in the repository. The binary is
# cached in $CILIUM_RS_CACHE keyed by Cilium version, recipe number and a hash
# of scripts/oracle/*, so a second run is instant, and linked as
# .tools/bin/policy-oracle.
#
# Needs Go >= 1.26 (/usr/local/go/bin/go or go in PATH) and the Go module proxy
# (proxy.golang.org + sum.golang.org) on a cold module cache. Cold build:
# ~2-3 min on 2 cores.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CILIUM_RS_CACHE:-/var/cache/cilium-rs}
src="$here/scripts/oracle"
bin="$here/.tools/bin"

log() { printf '[build-oracle] %s\n' "$*" >&2; }
die() { printf '[build-oracle] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=scripts/go-toolchain.sh
. "$here/scripts/go-toolchain.sh"

CILIUM_VERSION=v1.20.2
# Bump RECIPE when the build recipe below changes: it keys the cache (changes
# to scripts/oracle/* are picked up by the source hash on their own).
RECIPE=1

[ -f "$src/go.mod" ] && [ -f "$src/go.sum" ] && [ -f "$src/main.go" ] || die "$src is incomplete"
grep -Eq "^[[:space:]]*(require[[:space:]]+)?github.com/cilium/cilium $CILIUM_VERSION[[:space:]]*\$" "$src/go.mod" ||
  die "$src/go.mod does not require github.com/cilium/cilium $CILIUM_VERSION (update CILIUM_VERSION here too)"

src_hash=$(cd "$src" && find . -maxdepth 1 -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
name="policy-oracle-$CILIUM_VERSION-r$RECIPE-$src_hash"
out="$cache/$name"

link() {
  mkdir -p "$bin"
  ln -sfn "$out/policy-oracle" "$bin/policy-oracle"
}

if [ -x "$out/policy-oracle" ]; then
  link
  log "policy-oracle up to date ($out)"
  exit 0
fi

# ------------------------------------------------------------ toolchain
find_go
need_space "$cache" 2000

work=$(mktemp -d "$cache/$name.tmp.XXXXXX")
chmod 755 "$work" # mktemp makes it 0700; the cached binary is for every user
trap 'rm -rf "$work"' EXIT

log "building policy-oracle against github.com/cilium/cilium $CILIUM_VERSION with $("$go" env GOVERSION) (cold: ~2-3 min on 2 cores)"
t0=$SECONDS
# -mod=readonly: go.mod/go.sum are never rewritten; a missing go.sum entry fails.
# -buildvcs=false: the binary depends on the sources only, not on git state.
# GOTOOLCHAIN=local: never download another toolchain.
(cd "$src" &&
  GOTOOLCHAIN=local CGO_ENABLED=0 \
    GOFLAGS="-trimpath -mod=readonly -modcacherw -buildvcs=false" \
    GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" \
    "$go" build -ldflags="-s -w" -o "$work/policy-oracle" . >"$work/build.log" 2>&1) ||
  die "go build failed: $(tail -20 "$work/build.log")"

# Smoke test before the binary is cached: an empty request must answer with
# upstream's reserved identities.
smoke=$(printf '{}' | "$work/policy-oracle") || die "built policy-oracle does not run"
case "$smoke" in
  *'"reserved:host"'*) ;;
  *) die "built policy-oracle answered unexpectedly: $smoke" ;;
esac

rm -f "$work/build.log"
if [ -x "$out/policy-oracle" ]; then
  log "another build finished first; keeping $out"
else
  rm -rf "$out"
  mv "$work" "$out"
fi
trap - EXIT
rm -rf "$work"

# Older versions/recipes/sources are never used again by this checkout.
find "$cache" -maxdepth 1 -name 'policy-oracle-*' -type d ! -name '*.tmp.*' ! -path "$out" -exec rm -rf {} +

link
log "policy-oracle built in $((SECONDS - t0)) s: $out/policy-oracle ($(du -m "$out/policy-oracle" | cut -f1) MB)"
