#!/usr/bin/env bash
# Builds the TEST-ONLY control plane: kube-apiserver, kube-controller-manager,
# kube-scheduler and kubelet from the Go module k8s.io/kubernetes (wrapper
# module scripts/kube), and etcd + etcdctl from go.etcd.io/etcd/{server,etcdctl}/v3
# (wrapper module scripts/etcd), both pinned below.
#
# Upstream's code comes from the Go module proxy into the Go module cache under
# $CILIUM_RS_CACHE; only our wrapper modules are in the repository. The
# binaries are cached in $CILIUM_RS_CACHE, one directory per component, keyed
# by version, recipe number and a hash of the wrapper module, so a second run
# takes a second:
#   $CILIUM_RS_CACHE/k8s-<KUBE_VERSION>-r<RECIPE>-<hash>/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet}
#   $CILIUM_RS_CACHE/etcd-<ETCD_VERSION>-r<RECIPE>-<hash>/{etcd,etcdctl}
# (--floor: k8sfloor-<version>-..., a prefix of its own, so that each build's
# cleanup of older versions keeps the other.)
#
# Usage: build-kube.sh [--floor] [--link DIR]
#   Prints the two directories on stdout as `kube=DIR` and `etcd=DIR`;
#   --link DIR also symlinks the binaries into DIR (e.g. .tools/bin).
#   --floor builds the oldest supported Kubernetes instead (FLOOR_VERSION,
#   wrapper module scripts/kube-floor: kube-apiserver and
#   kube-controller-manager only, cached as k8sfloor-<version>-...), for the
#   lighter test tier; etcd is the same.
#   BUILD_JOBS=N limits `go build -p` (default: all cores); GOMAXPROCS is
#   passed through.
#
# Needs Go >= 1.26 (/usr/local/go/bin/go or go in PATH) and the Go module proxy
# (proxy.golang.org + sum.golang.org) on a cold module cache. Measured with
# Go 1.26.8 on this project's machine kind, BUILD_JOBS=1 GOMAXPROCS=1 (one
# core), modules already downloaded (~45 s more when not): cold ~13 min
# (kube-apiserver 7.3 min, then kube-controller-manager 2 min, kubelet 1.1 min,
# kube-scheduler 0.4 min reusing its packages; etcd 1.8 min, etcdctl 0.5 min);
# warm 0.1 s. Adds ~2.8 GB to the Go build cache (and ~1 GB of modules);
# binaries ~350 MB (kube) + 45 MB (etcd).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CILIUM_RS_CACHE:-/var/cache/cilium-rs}

log() { printf '[build-kube] %s\n' "$*" >&2; }
die() { printf '[build-kube] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=scripts/go-toolchain.sh
. "$here/scripts/go-toolchain.sh"

KUBE_VERSION=v1.35.4 # staging modules k8s.io/*: v0.35.4
# The oldest Kubernetes upstream Cilium v1.20 supports (1.33-1.36), and the
# chart's kubeVersion floor.
FLOOR_VERSION=v1.33.13 # staging modules k8s.io/*: v0.33.13
ETCD_VERSION=v3.6.16
# Bump RECIPE when the build recipe below changes: it keys the cache (changes
# to scripts/kube/* and scripts/etcd/* are picked up by the source hash).
RECIPE=1
KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
ETCD_BINS=(etcd etcdctl)

link_dir=""
floor=0
while [ $# -gt 0 ]; do
  case "$1" in
    --floor) floor=1; shift ;;
    --link) [ $# -ge 2 ] || die "--link needs a directory"; link_dir=$2; shift 2 ;;
    --link=*) link_dir=${1#--link=}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (usage: build-kube.sh [--floor] [--link DIR])" ;;
  esac
done
kube_src="$here/scripts/kube"
kube_prefix=k8s
if [ "$floor" = 1 ]; then
  KUBE_VERSION=$FLOOR_VERSION
  KUBE_BINS=(kube-apiserver kube-controller-manager)
  kube_src="$here/scripts/kube-floor"
  kube_prefix=k8sfloor
fi

# ------------------------------------------------------------ wrapper checks
etcd_src="$here/scripts/etcd"
for s in "$kube_src" "$etcd_src"; do
  [ -f "$s/go.mod" ] && [ -f "$s/go.sum" ] || die "$s is incomplete (go.mod, go.sum)"
done
for b in "${KUBE_BINS[@]}"; do [ -f "$kube_src/cmd/$b/main.go" ] || die "$kube_src/cmd/$b/main.go missing"; done
for b in "${ETCD_BINS[@]}"; do [ -f "$etcd_src/cmd/$b/main.go" ] || die "$etcd_src/cmd/$b/main.go missing"; done

requires() { # go.mod module version
  grep -Eq "^[[:space:]]*(require[[:space:]]+)?$2 $3([[:space:]]|\$)" "$1"
}
requires "$kube_src/go.mod" k8s.io/kubernetes "$KUBE_VERSION" ||
  die "$kube_src/go.mod does not require k8s.io/kubernetes $KUBE_VERSION (update KUBE_VERSION here too)"
staging=v0.${KUBE_VERSION#v1.}
# Every staging replace must point at the matching v0.X.Y, or the build mixes releases.
bad=$(grep -E '^[[:space:]]*(replace[[:space:]]+)?k8s\.io/[^ ]+ => ' "$kube_src/go.mod" | grep -v " => k8s.io/[^ ]* $staging\$" || true)
[ -z "$bad" ] || die "$kube_src/go.mod: staging replaces not at $staging: $bad"
grep -q " => k8s.io/api $staging\$" "$kube_src/go.mod" || die "$kube_src/go.mod has no staging replaces (k8s.io/api => k8s.io/api $staging)"
for m in go.etcd.io/etcd/server/v3 go.etcd.io/etcd/etcdctl/v3; do
  requires "$etcd_src/go.mod" "$m" "$ETCD_VERSION" ||
    die "$etcd_src/go.mod does not require $m $ETCD_VERSION (update ETCD_VERSION here too)"
done

src_hash() { # dir: hash of go.mod, go.sum and every .go file under it
  (cd "$1" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
}
kube_out="$cache/$kube_prefix-$KUBE_VERSION-r$RECIPE-$(src_hash "$kube_src")"
etcd_out="$cache/etcd-$ETCD_VERSION-r$RECIPE-$(src_hash "$etcd_src")"

complete() { # dir bin...
  local d=$1 b
  shift
  for b in "$@"; do [ -x "$d/$b" ] || return 1; done
}

finish() {
  if [ -n "$link_dir" ]; then
    mkdir -p "$link_dir"
    local b
    for b in "${KUBE_BINS[@]}"; do ln -sfn "$kube_out/$b" "$link_dir/$b"; done
    for b in "${ETCD_BINS[@]}"; do ln -sfn "$etcd_out/$b" "$link_dir/$b"; done
    log "linked ${KUBE_BINS[*]} ${ETCD_BINS[*]} into $link_dir"
  fi
  printf 'kube=%s\netcd=%s\n' "$kube_out" "$etcd_out"
}

if complete "$kube_out" "${KUBE_BINS[@]}" && complete "$etcd_out" "${ETCD_BINS[@]}"; then
  log "kubernetes $KUBE_VERSION and etcd $ETCD_VERSION up to date ($kube_out, $etcd_out)"
  finish
  exit 0
fi

# ------------------------------------------------------------ toolchain
find_go
need_space "$cache" 6000

jobs=${BUILD_JOBS:-$(nproc)}
# -mod=readonly: go.mod/go.sum are never rewritten; a missing go.sum entry fails.
# -buildvcs=false: the binaries depend on the sources only, not on git state.
# GOTOOLCHAIN=local: never download another toolchain.
# CGO_ENABLED=0: static binaries (upstream builds kubelet with cgo; it runs
# without it, we need no cgo-only feature).
gobuild() { # module-dir log output ldflags tags package
  (cd "$1" &&
    GOTOOLCHAIN=local CGO_ENABLED=0 \
      GOFLAGS="-trimpath -mod=readonly -modcacherw -buildvcs=false -p=$jobs" \
      GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" \
      "$go" build -tags="$5" -ldflags="$4" -o "$3" "$6" >>"$2" 2>&1)
}

# Stale work directories of killed builds (a live one is younger than a day).
find "$cache" -maxdepth 1 \( -name 'k8s-*.tmp.*' -o -name 'k8sfloor-*.tmp.*' -o -name 'etcd-*.tmp.*' \) -type d -mmin +1440 -exec rm -rf {} + 2>/dev/null || true

publish() { # work out prefix bin...
  local work=$1 out=$2 prefix=$3
  shift 3
  rm -f "$work/build.log"
  if complete "$out" "$@"; then
    log "another build finished first; keeping $out"
    rm -rf "$work"
  else
    rm -rf "$out"
    mv "$work" "$out"
  fi
  # Older versions/recipes/sources are never used again by this checkout.
  find "$cache" -maxdepth 1 -name "$prefix-*" -type d ! -name '*.tmp.*' ! -path "$out" -exec rm -rf {} +
}

version_of() { # binary: first line of --version, or etcdctl's `version`
  case "$1" in
    */etcdctl) "$1" version 2>&1 | head -1 ;;
    *) "$1" --version 2>&1 | head -1 ;;
  esac
}

t_all=$SECONDS

# ------------------------------------------------------------ kubernetes
if ! complete "$kube_out" "${KUBE_BINS[@]}"; then
  name=$(basename "$kube_out")
  work=$(mktemp -d "$cache/$name.tmp.XXXXXX")
  chmod 755 "$work" # mktemp makes it 0700; the cached binaries are for every user
  trap 'rm -rf "$work"' EXIT
  log "building kubernetes $KUBE_VERSION (${KUBE_BINS[*]}) with $("$go" env GOVERSION), go build -p=$jobs"
  # Upstream's release recipe (hack/lib/golang.sh, hack/lib/version.sh): tags
  # selinux,notest,grpcnotrace; -s -w; version variables in both
  # k8s.io/component-base/version and k8s.io/client-go/pkg/version. The build
  # date is the release tag's commit time (reproducible); gitTreeState
  # "archive" and the default gitCommit are what upstream sets for a source
  # tree without git.
  (cd "$kube_src" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" \
    "$go" mod download k8s.io/kubernetes >"$work/build.log" 2>&1) ||
    die "go mod download k8s.io/kubernetes failed (module proxy reachable?): $(tail -20 "$work/build.log")"
  build_date=$(cd "$kube_src" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" \
    "$go" list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes 2>>"$work/build.log") ||
    die "go list -m k8s.io/kubernetes failed: $(tail -20 "$work/build.log")"
  [ -n "$build_date" ] || build_date=1970-01-01T00:00:00Z
  major=${KUBE_VERSION#v}
  major=${major%%.*}
  minor=${KUBE_VERSION#v*.}
  minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=archive -X $pkg.buildDate=$build_date"
  done
  for b in "${KUBE_BINS[@]}"; do
    t0=$SECONDS
    gobuild "$kube_src" "$work/build.log" "$work/$b" "$ldflags" selinux,notest,grpcnotrace "./cmd/$b" ||
      die "go build $b failed (module proxy reachable?): $(tail -20 "$work/build.log")"
    # Smoke test before the binary is cached.
    v=$(version_of "$work/$b") || die "built $b does not run: $v"
    [ "$v" = "Kubernetes $KUBE_VERSION" ] || die "built $b reports '$v', expected 'Kubernetes $KUBE_VERSION'"
    log "  $b: $((SECONDS - t0)) s, $(du -m "$work/$b" | cut -f1) MB"
  done
  publish "$work" "$kube_out" "$kube_prefix" "${KUBE_BINS[@]}"
  trap - EXIT
fi

# ------------------------------------------------------------ etcd
if ! complete "$etcd_out" "${ETCD_BINS[@]}"; then
  name=$(basename "$etcd_out")
  work=$(mktemp -d "$cache/$name.tmp.XXXXXX")
  chmod 755 "$work"
  trap 'rm -rf "$work"' EXIT
  log "building etcd $ETCD_VERSION (${ETCD_BINS[*]}) with $("$go" env GOVERSION), go build -p=$jobs"
  : >"$work/build.log"
  # Upstream's recipe (scripts/build_lib.sh): CGO_ENABLED=0 -trimpath, no tags.
  # version.GitSHA keeps its default: the module has no git metadata.
  for b in "${ETCD_BINS[@]}"; do
    t0=$SECONDS
    gobuild "$etcd_src" "$work/build.log" "$work/$b" "-s -w" "" "./cmd/$b" ||
      die "go build $b failed (module proxy reachable?): $(tail -20 "$work/build.log")"
    v=$(version_of "$work/$b") || die "built $b does not run: $v"
    case "$v" in
      *" ${ETCD_VERSION#v}") ;;
      *) die "built $b reports '$v', expected version ${ETCD_VERSION#v}" ;;
    esac
    log "  $b: $((SECONDS - t0)) s, $(du -m "$work/$b" | cut -f1) MB"
  done
  publish "$work" "$etcd_out" etcd "${ETCD_BINS[@]}"
  trap - EXIT
fi

log "kubernetes $KUBE_VERSION and etcd $ETCD_VERSION built in $((SECONDS - t_all)) s: $kube_out, $etcd_out"
finish
