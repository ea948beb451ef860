#!/usr/bin/env bash
# The main job: build snatgw and show what it makes of the reference configuration
# (per instance: scenario, public IP, preallocated ports and block, and the deciding rule).
# Usage: scripts/main.sh [CONFIG]   (default examples/reference.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p snatgw
exec ./target/release/snatgw show --config "${1:-examples/reference.toml}"
