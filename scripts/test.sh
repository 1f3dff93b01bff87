#!/usr/bin/env bash
# The project's test command: set up a fresh Debian machine, then run every test.
# Usage: scripts/test.sh   (from anywhere; root or sudo for the set-up steps)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh all

# Huge pages for the hugetlb conformance tests (skipped with a reason without).
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 64 ]; then
  echo 64 > /proc/sys/vm/nr_hugepages || true
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
cargo test --workspace --locked
# The optional serde feature a VMM turns on to expose statistics and events.
cargo test -p migrate-core --features serde --lib --locked serde_tests
# Benchmarks compile and run once each in test mode (no timing).
cargo test -p benches --benches --locked
# The macro benchmark end to end, smallest matrix, host only (every run
# verified; the table and the plot are drawn), into a scratch folder.
if [ "$(id -u)" -eq 0 ]; then
  bench_tmp=$(mktemp -d)
  BENCH_RESULTS=$bench_tmp scripts/bench.sh --quick --host-only
  test -s "$bench_tmp/results.md" && test -s "$bench_tmp/results.png" && test -s "$bench_tmp/results-qemu.png"
  rm -rf "$bench_tmp"
fi
# Every decoder of a peer's bytes under libFuzzer, 20 s each from the
# committed corpus: regressions show here (scripts/fuzz.sh for long runs).
scripts/fuzz.sh 20
# RDMA over real SoftRoCE verbs, inside the emulated VM (the host has none).
scripts/test-rdma.sh
