#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests, and the end-to-end tests
# against a real control plane. Installs and builds what is missing first
# (scripts/setup.sh), so it works on a fresh machine.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

step() { printf '\n=== %s (%ds)\n' "$*" "$SECONDS" >&2; }

step "setup"
bash scripts/setup.sh

# A clean checkout builds about 5 GB (target/ and fuzz/target/); the
# end-to-end tests add up to 2 GB of etcd data and logs under /tmp. Say so up
# front instead of failing 40 tests with ENOSPC. Incremental caches help only
# an edit-build loop, not one full run, so they are off here.
export CARGO_INCREMENTAL=0
avail_mb=$(df -Pm "$here" | awk 'NR==2 {print $4}')
if [ "$avail_mb" -lt 8000 ]; then
  echo "error: $avail_mb MB free on the disk of $here; a full test run needs about 8000 MB" >&2
  exit 1
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "fuzz targets: fmt + clippy (they run in the bench tier: scripts/fuzz.sh)"
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --manifest-path fuzz/Cargo.toml --locked -- -D warnings

step "build"
cargo build --workspace --bins --tests --locked

step "unit tests"
cargo test --workspace --exclude e2e --locked

step "Helm chart checks (helm lint, kubernetes-validate, schema, promtool)"
bash scripts/chart-check.sh

step "end-to-end tests (real etcd, kube-apiserver, kubectl, Prometheus)"
cargo test -p e2e --locked -- --test-threads=2

# The lighter tier on the oldest supported Kubernetes (the chart's
# kubeVersion floor): the chart, the skeleton tests and the Star Wars
# datapath test against its kube-apiserver (scripts/setup.sh links it).
floor_bin="$here/.tools/floor/bin"
step "floor tier: $("$floor_bin/kube-apiserver" --version) (chart, skeleton, one datapath test)"
for filter in chart:: skeleton:: datapath::star_wars; do
  CILIUM_RS_TOOLS="$floor_bin" cargo test -p e2e --locked -- --test-threads=2 "$filter"
done

step "all tests passed in ${SECONDS}s"
