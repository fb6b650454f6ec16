#!/usr/bin/env bash
# Fuzzes the decode + decide paths with libFuzzer (cargo-fuzz), each target
# for a fixed time: the bench tier, not part of scripts/test.sh.
#
#   bash scripts/fuzz.sh              # every target, 120 s each
#   bash scripts/fuzz.sh 600 ipam_book
#
# Targets (fuzz/fuzz_targets/):
#   ipam_book       CiliumNode states (any strings) -> IPAM decisions
#   policy_compile  any JSON as CNP / CCNP / KNP spec -> compiled policy
#   kvstore_keys    etcd keys and values -> kvstore GC decisions, labels
#
# Works on the stable toolchain (`-s none`: no sanitizer, which would need
# nightly; Rust code is memory-safe, the crashes looked for are panics and
# failed invariants). Corpora are kept outside the repository in
# $CILIUM_RS_CACHE/fuzz so each run starts where the last one ended; a crash
# is written to fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
seconds=${1:-120}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(ipam_book policy_compile kvstore_keys)
cache=${CILIUM_RS_CACHE:-/var/cache/cilium-rs}

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked
cargo fuzz build -s none -O
for t in "${targets[@]}"; do
  corpus="$cache/fuzz/$t"
  mkdir -p "$corpus"
  [ -d "fuzz/seeds/$t" ] && cp -n fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  extra=()
  [ -f "fuzz/dict/$t.dict" ] && extra+=("-dict=fuzz/dict/$t.dict")
  echo "=== $t: ${seconds}s (corpus $corpus)" >&2
  cargo fuzz run -s none -O "$t" "$corpus" -- -max_total_time="$seconds" "${extra[@]}" 2>&1 |
    grep -E '^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs|panicked|SUMMARY|Test unit written|ERROR' || true
  if ls "fuzz/artifacts/$t"/crash-* >/dev/null 2>&1; then
    echo "=== $t: crash found, see fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
echo "=== fuzzing done: no crash in ${#targets[@]} target(s), ${seconds}s each" >&2
