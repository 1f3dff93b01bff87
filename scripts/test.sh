#!/usr/bin/env bash
# The project's test command: set up a fresh Debian machine, then run every test.
# Usage: scripts/test.sh [--quick]   (from anywhere; root or sudo for the set-up steps)
#   --quick: a newcomer's first check (a few minutes): fmt, clippy, rustdoc,
#            every unit test, the protocol, hostile-input, TLS and conformance
#            suites, the CLI's commands, boot.rs where KVM is; what it leaves
#            out (the other integration tests, the benchmarks, fuzzing, the
#            SoftRoCE VM) is listed as counted skips. CI runs the full suite.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac
# Each phase's wall time, printed at the end (also after a failure: the
# phases up to it), beside the skip summary.
phases=()
phase_start=$SECONDS
phase_done() {
  phases+=("$(printf '%-42s %5d s' "$1" $((SECONDS - phase_start)))")
  phase_start=$SECONDS
}
. scripts/setup.sh all
# A rerun builds only what changed: a clone without its own `target` builds
# into the user's cache (MIGRATE_TARGET_CACHE; as the fuzz smoke does), so
# a fresh clone of a new commit (CI's) rebuilds our crates, not the
# dependencies, and keeps the fetched boot sector. One test run at a time
# uses it (a lock held to the end: a run never tests another's binaries);
# a run that finds it busy builds in its clone. Past 24 GiB (old clones'
# artifacts pile up) it is emptied first.
if [ ! -e target ]; then
  cache="${MIGRATE_TARGET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/migrate-target}"
  mkdir -p "$cache"
  exec 9>"$cache.lock"
  if flock -n 9; then
    if [ "$(du -s --block-size=1G "$cache" | cut -f1)" -gt 24 ]; then
      echo "test: emptying the build cache $cache (over 24 GiB)" >&2
      rm -rf "$cache" && mkdir -p "$cache"
    fi
    ln -s "$cache" target
    # (Incremental state is per clone: of no use to the next one.)
    export CARGO_INCREMENTAL=0
    echo "test: building in $cache"
  else
    exec 9>&-
    echo "test: the build cache $cache is in use by another run: building in this clone" >&2
  fi
fi
phase_done "set-up (packages, toolchain)"

# A skipped test is an outcome: every skip is logged (fixtures::skip) and
# listed at the end. What this machine was checked to have, a test may not
# skip for lack of: MIGRATE_REQUIRE_<NEED> turns such a skip into a failure.
export MIGRATE_SKIP_LOG
MIGRATE_SKIP_LOG=$(mktemp)
summary() {
  # A failure while the VM runs in the background ends the VM too.
  if [ -n "${vm_pid:-}" ] && kill -0 "$vm_pid" 2>/dev/null; then kill -- "-$vm_pid" 2>/dev/null || true; fi
  echo "== phases (wall time)"
  local p
  for p in "${phases[@]}"; do echo "   $p"; done
  printf '   %-42s %5d s\n' "total" "$SECONDS"
  skip_summary
}
skip_summary() {
  # Skips (this machine lacks something) and N/A (a subject refuses the case
  # by design, as it documents, e.g. uffd-sync and a disk file), each counted.
  local n na
  n=$(grep -c '^SKIP' "$MIGRATE_SKIP_LOG" 2>/dev/null || true)
  na=$(grep -c '^N/A' "$MIGRATE_SKIP_LOG" 2>/dev/null || true)
  echo "== skipped tests: ${n:-0}"
  grep '^SKIP' "$MIGRATE_SKIP_LOG" 2>/dev/null | sort | uniq -c | sed 's/^/   /'
  echo "== not applicable by design: ${na:-0}"
  grep '^N/A' "$MIGRATE_SKIP_LOG" 2>/dev/null | sort | uniq -c | sed 's/^/   /'
  rm -f "$MIGRATE_SKIP_LOG"
}
trap summary EXIT
have() { echo "test: this machine has $1: tests that need it must run"; }
# Huge pages for the hugetlb tests: reserved here, then required.
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 64 ]; then
  echo 64 > /proc/sys/vm/nr_hugepages || true
fi
if [ "$(awk '/^HugePages_Free/ {print $2}' /proc/meminfo)" -ge 32 ]; then
  export MIGRATE_REQUIRE_HUGETLB=1; have "free huge pages"
fi
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then export MIGRATE_REQUIRE_KVM=1; have /dev/kvm; fi
# userfaultfd async write-protect with PAGEMAP_SCAN: Linux 6.7, and root or
# vm.unprivileged_userfaultfd=1.
kernel=$(uname -r | awk -F. '{printf "%d%03d", $1, $2}')
if [ "$kernel" -ge 6007 ] && { [ "$(id -u)" -eq 0 ] || [ "$(cat /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null)" = 1 ]; }; then
  export MIGRATE_REQUIRE_UFFD=1; have "userfaultfd write-protect trackers"
fi
if [ "$(id -u)" -eq 0 ] && ip netns add "migrate-probe-$$" 2>/dev/null; then
  ip netns del "migrate-probe-$$"
  export MIGRATE_REQUIRE_NETNS=1; have "network namespaces"
fi
probe=$(mktemp -d)
if [ "$(id -u)" -eq 0 ] && mount -t tmpfs -o size=1m migrate-probe "$probe" 2>/dev/null; then
  umount "$probe"
  export MIGRATE_REQUIRE_MOUNT=1; have "a tmpfs to mount"
fi
rmdir "$probe"
phase_done "probes (what this machine has)"

# A boot sector nobody here wrote (QEMU's migration-test guest), fetched
# from Debian's QEMU source with pinned hashes: once fetched, required.
if foreign=$(scripts/foreign-boot-sector.sh 2>&1); then
  export MINI_VMM_FOREIGN_BOOT_SECTOR="$PWD/$foreign" MIGRATE_REQUIRE_FOREIGN_GUEST=1
  have "QEMU's migration-test boot sector ($foreign)"
else
  echo "test: could not fetch QEMU's boot sector: $foreign" >&2
fi
phase_done "foreign boot sector"

cargo fmt --all -- --check
phase_done "fmt"
if [ $quick = 0 ]; then
  # RDMA over real SoftRoCE verbs, inside the emulated VM (the host has
  # none), from here on in the background: its emulated CPUs are the long
  # pole (about 10 minutes), and the host's phases below run beside it.
  # Its builds and the host's take turns (cargo's lock); its output follows once it ends. Every test on either side that needs
  # its guest to out-pace something, or a peer to answer within a timeout,
  # must hold on a loaded machine: this is where they share it.
  vm_log=$(mktemp)
  vm_start=$SECONDS
  setsid scripts/test-rdma.sh > "$vm_log" 2>&1 &
  vm_pid=$!
fi
cargo clippy --workspace --all-targets --locked -- -D warnings
phase_done "clippy$([ $quick = 1 ] || echo " (the VM's builds beside)")"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
phase_done "rustdoc"
if [ $quick = 1 ]; then
  omit() { echo "SKIP (quick) $1: scripts/test.sh without --quick runs it" >> "$MIGRATE_SKIP_LOG"; }
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --exclude transport-rdma --locked -E 'kind(lib) | kind(bin)
      | (package(transport-tcp) & (binary(hostile) | binary(tls) | binary(conformance)))
      | (package(migrate-core) & binary(dirty_conformance))
      | (package(migrate-cli) & binary(commands)) | (package(mini-vmm) & binary(boot))'
  else
    cargo test --workspace --exclude transport-rdma --locked --lib --bins
    cargo test -p transport-tcp --locked --test hostile --test tls --test conformance
    cargo test -p migrate-core --features test-utils --locked --test dirty_conformance
    cargo test -p migrate-cli --locked --test commands
    cargo test -p mini-vmm --locked --test boot
  fi
  phase_done "cargo test (quick: unit, suites, commands, boot)"
  for f in */tests/*.rs; do
    t="${f%%/*} $(basename "$f" .rs)"
    case "$t" in
      "transport-tcp hostile" | "transport-tcp tls" | "transport-tcp conformance" | \
        "migrate-core dirty_conformance" | "cli commands" | "mini-vmm boot") ;;
      *) omit "integration tests: $t" ;;
    esac
  done
  omit "doctests"
  omit "criterion benchmarks (test mode)"
  omit "bench smoke (host, quick)"
  omit "fuzz smoke"
  omit "SoftRoCE VM (RDMA, kernel TLS, uffd-sync)"
  exit 0
fi
# The host has no RDMA device: transport-rdma's integration tests and the
# RDMA micro benchmark run inside the SoftRoCE VM below (where they must
# not skip); its unit tests run here.
# cargo-nextest runs every test as its own process, three at once (.config/nextest.toml) across
# all test binaries (cargo test runs one binary at a time, and most of their
# time is spent waiting on peers, timeouts and faults: 1.07 cores of 2 on
# average); the doctests, which it does not run, follow with cargo test.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --exclude transport-rdma --locked
  cargo test --workspace --exclude transport-rdma --locked --doc
else
  echo "test: no cargo-nextest here (scripts/setup.sh installs it): cargo test, one binary at a time" >&2
  cargo test --workspace --exclude transport-rdma --locked
fi
phase_done "cargo test (workspace, host)"
cargo test -p transport-rdma --lib --locked
# The optional serde feature a VMM turns on to expose statistics and events.
cargo test -p migrate-core --features serde --lib --locked serde_tests
# Benchmarks compile and run once each in test mode (no timing).
cargo test -p benches --bench dirty_tracking --bench data_path --locked
phase_done "rdma unit, serde, criterion (test mode)"
# The release binaries the bench smoke and the VM run, as one set.
scripts/build-release.sh
phase_done "release build"
# The macro benchmark end to end, smallest matrix, host only (every run
# verified; the table and the plot are drawn), into a scratch folder.
if [ "$(id -u)" -eq 0 ]; then
  bench_tmp=$(mktemp -d)
  BENCH_RESULTS=$bench_tmp scripts/bench.sh --quick --host-only
  test -s "$bench_tmp/results.md" && test -s "$bench_tmp/results.png" && test -s "$bench_tmp/results-qemu.png"
  # The QEMU comparison measured the floor beside both engines.
  grep -q "| floor ms |" "$bench_tmp/results.md"
  # The scale comparison ran (its plot) or said why it skipped.
  grep -q "^## Scale" "$bench_tmp/results.md"
  # The fabric comparison: every case measured, the marked IP flow's
  # target stated, the rates plotted.
  grep -q "^## Sharing a link" "$bench_tmp/results.md" && grep -q "^Target: the IP flow in the high class" "$bench_tmp/results.md"
  test -s "$bench_tmp/results-fabric.png"
  test -s "$bench_tmp/results-scale.png" || grep -q " — skipped: " "$bench_tmp/results.md"
  rm -rf "$bench_tmp"
fi
# The committed results.md and the figures BENCHMARKS.md quotes are what
# the committed raw results give (the report redrawn in memory, compared).
cargo run --release --locked -q -p benches --bin migrate-bench -- report --check --prose BENCHMARKS.md
phase_done "bench smoke (host, quick)"
# Every decoder of a peer's bytes under libFuzzer, 20 s each from the
# committed corpus: regressions show here (scripts/fuzz.sh for long runs).
nice -n 10 scripts/fuzz.sh 20
phase_done "fuzz smoke (20 s a target)"
vm_status=0
wait "$vm_pid" || vm_status=$?
vm_pid=
cat "$vm_log"
rm -f "$vm_log"
phases+=("$(printf '%-42s %5d s' "SoftRoCE VM (from its start, beside)" $((SECONDS - vm_start)))")
phase_done "SoftRoCE VM (waited for after the host's)"
[ "$vm_status" = 0 ] || { echo "test: the SoftRoCE VM phase failed (exit $vm_status)" >&2; exit "$vm_status"; }
