#!/usr/bin/env bash
# The main job on an embedded default: sets everything up on a fresh machine
# (scripts/setup.sh), builds, then starts a local control plane, the operator
# replicas and prints their status. Pass --keep to leave it running.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
bash scripts/setup.sh
echo "[demo] building (first build takes a few minutes)" >&2
cargo build --workspace --bins --locked --quiet
exec "$here/target/debug/demo" "$@"
