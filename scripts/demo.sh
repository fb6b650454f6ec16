#!/usr/bin/env bash
# The main job on an embedded default: sets everything up on a fresh machine
# (scripts/setup.sh), builds release binaries (the chart's image is made of
# them), then runs the Star Wars demo on a local cluster of real nodes with
# our chart installed (e2e/src/bin/demo.rs). Pass --keep to leave it running.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
bash scripts/setup.sh
echo "[demo] building release binaries (the first build takes several minutes)" >&2
cargo build --release --workspace --bins --locked --quiet
exec "$here/target/release/demo" "$@"
