#!/usr/bin/env bash
# The project's main job: a live migration demo on this machine (loopback TCP,
# built-in guest dirtying its memory, progress bar, verified summary).
# Usage: scripts/demo.sh [migrate-cli demo options, e.g. --memory 1G --dirty-rate 12800]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh demo
cargo build --release --locked -p migrate-cli
exec ./target/release/migrate-cli demo "$@"
