#!/usr/bin/env bash
# The release binaries the benchmark, the SoftRoCE VM's tests and the demo
# run, built as one set: cargo unifies features across the packages it
# builds together, so building a subset (only -p migrate-cli) would build
# the shared crates again with other features.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo build --release --locked -p migrate-cli -p benches -p mini-vmm \
  --bin migrate-cli --bin migrate-bench --bin mini-vmm "$@"
