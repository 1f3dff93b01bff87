#!/usr/bin/env bash
# Fuzzes every decoder that reads a peer's bytes (fuzz/fuzz_targets/*) with
# libFuzzer via cargo-fuzz, SECONDS per target (default 600), starting from
# the committed seed corpus (fuzz/corpus/, taken from real migrations by
# scripts/fuzz-corpus.sh). New inputs go to a scratch directory, so the
# committed corpus changes only on purpose. Prints executions and coverage
# per target; a crash leaves its input in fuzz/artifacts/ and fails.
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
secs=${1:-600}
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz on the stable toolchain (no sanitizer needs nightly); debug
# assertions on, so an arithmetic overflow is a crash too.
export RUSTC_BOOTSTRAP=1
# The build is kept outside the checkout (a fresh clone on the same machine
# builds only what changed): MIGRATE_FUZZ_TARGET, or the user's cache.
target="${MIGRATE_FUZZ_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/migrate-fuzz-target}"
mkdir -p "$target"
flags=(-s none -O -a --target-dir "$target")
cargo fuzz build "${flags[@]}"
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
fail=0
for t in $(cargo fuzz list); do
  mkdir -p "$scratch/$t" "corpus/$t"
  if cargo fuzz run "$t" "${flags[@]}" "$scratch/$t" "corpus/$t" -- \
       -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
       > "$scratch/$t.log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$t.log")
    cov=$(grep -o 'cov: [0-9]*' "$scratch/$t.log" | tail -1)
    ft=$(grep -o 'ft: [0-9]*' "$scratch/$t.log" | tail -1)
    echo "fuzz ok $t: ${runs:-?} executions in ${secs} s, ${cov:-cov: ?}, ${ft:-ft: ?}, 0 crashes"
  else
    echo "FAIL fuzz $t:"; tail -40 "$scratch/$t.log"; fail=1
  fi
done
exit $fail
