#!/usr/bin/env bash
# The benchmark, one command: the macro benchmark (migrate-bench) on this
# host over loopback and over a veth pair between two network namespaces,
# then QEMU's migration beside ours on the same image (host), then QEMU and
# mini-vmm live-migrating the same running boot sector (host, KVM), then a
# guest that out-dirties the link by pre-copy and by post-copy (host), then
# RDMA vs TCP and post-copy over both inside the SoftRoCE VM, the ceilings
# measured alongside; writes benches/results/{raw/*.json,
# raw/peer/{qemu,scale,boot-sector,postcopy-*,protect-*,fabric-*}.json,results.md,results.png,
# results-qemu.png,results-scale.png,results-boot-sector.png,results-postcopy.png,
# results-protect.png,results-fabric.png}.
# Usage: scripts/bench.sh [--quick] [--host-only|--vm-only]   (root)
#   BENCH_RESULTS=DIR: write there instead (the test command's smoke run).
# BENCHMARKS.md says how to read the results.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh all
quick=(); host=1; vm=1
for a in "$@"; do
  case "$a" in
    --quick) quick=(--quick --ceiling-secs 1) ;;  # the smoke run: 1 s per ceiling setting
    --host-only) vm=0 ;;
    --vm-only) host=0 ;;
    *) echo "usage: $0 [--quick] [--host-only|--vm-only]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "bench: run as root (network namespaces, the VM's RDMA devices)" >&2; exit 2; }
scripts/build-release.sh
results=${BENCH_RESULTS:-benches/results}
mkdir -p "$results/raw/micro"
cmd="scripts/bench.sh $*"

if [ "$host" = 1 ]; then
  scripts/netns.sh down
  trap 'scripts/netns.sh down' EXIT
  scripts/netns.sh up
  target/release/migrate-bench run --site host-loopback --site host-veth "${quick[@]}" \
    --out "$results/raw/host.json" --command-line "$cmd"
  scripts/netns.sh down
  # QEMU 7.2 multifd against migrate-cli on one image, one run: interleaved, then each alone
  # (the smoke run: a small image, once).
  if [ ${#quick[@]} = 0 ]; then peer=(--size-mib 1024 --repeat 5 --alone-repeat 5); else peer=(--size-mib 128 --repeat 1 --alone-repeat 1); fi
  target/release/migrate-bench qemu "${peer[@]}" --out "$results/raw/peer/qemu.json" --command-line "$cmd"
  # Ours at 1 GiB and at 8 GiB, interleaved: time, CPU and overhead per
  # GiB (skipped, and said so, without the memory; the smoke run: small).
  if [ ${#quick[@]} = 0 ]; then sc=(--base-mib 1024 --large-mib 8192 --repeat 3); else sc=(--base-mib 64 --large-mib 256 --repeat 1); fi
  target/release/migrate-bench scale "${sc[@]}" --out "$results/raw/peer/scale.json" --command-line "$cmd"
  # The same running boot sector (our sweeper) under QEMU with KVM and under
  # mini-vmm, migrated live (the smoke run: once).
  if [ -c /dev/kvm ]; then
    if [ ${#quick[@]} = 0 ]; then boot=(--repeat 5); else boot=(--repeat 1); fi
    target/release/migrate-bench boot-sector "${boot[@]}" --out "$results/raw/peer/boot-sector.json" --command-line "$cmd"
    # The same in post-copy: QEMU's postcopy-ram against mini-vmm's.
    target/release/migrate-bench boot-sector --postcopy "${boot[@]}" \
      --out "$results/raw/peer/boot-sector-postcopy.json" --command-line "$cmd"
  else
    echo "SKIP boot-sector comparison: no /dev/kvm on this machine" >&2
  fi
  # A guest that out-dirties the link: pre-copy (auto-converge) beside
  # post-copy, in-process over TCP (the smoke run: small, once).
  # (16 MiB at 100 MB/s converges in pre-copy, and a row says post-copy only
  # when the migration entered it: the smoke run caps the link at 50 MB/s.)
  if [ ${#quick[@]} = 0 ]; then pc=(--repeats 3); else pc=(--mib 16 --bandwidth-mbs 50 --repeats 1); fi
  target/release/migrate-bench postcopy --machine host "${pc[@]}" --results "$results"
  # Fault tolerance: epochs of 10 to 100 ms on the bank and the dirtying
  # guest at 64 MiB and 1 GiB, the failover after a silent link (the smoke
  # run: 16 MiB, 25 ms epochs).
  if [ ${#quick[@]} = 0 ]; then ft=(); else ft=(--mib 16 --epoch-ms 25 --seconds 1); fi
  target/release/migrate-bench protect --machine host "${ft[@]}" --results "$results"
  # One link shared: an iperf3 flow and a migration in HTB classes by
  # their DSCP, on a 1 Gbit/s veth between two namespaces (the smoke run:
  # a smaller guest, a shorter flow).
  if [ ${#quick[@]} = 0 ]; then fab=(); else fab=(--seconds 6); fi
  target/release/migrate-bench fabric --machine host "${fab[@]}" --results "$results"
  if [ ${#quick[@]} = 0 ]; then
    # Micro benchmarks (criterion): dirty harvest, per-page costs, zstd.
    crit=$(mktemp -d)
    CRITERION_HOME=$crit cargo bench --locked -p benches --bench dirty_tracking --bench data_path
    target/release/migrate-bench micro --criterion "$crit" --machine host --out "$results/raw/micro/host.json"
    rm -rf "$crit"
  fi
fi
if [ "$vm" = 1 ]; then
  # The RDMA micro benchmark runs in the VM: build it here.
  rdma_post=$(cargo bench --locked -p benches --bench rdma_post --no-run 2>&1 \
    | grep -o 'target/release/deps/rdma_post-[0-9a-f]*' | tail -n 1)
  # Inside the VM only $results/raw is writable; criterion writes to /tmp.
  micro=""
  [ ${#quick[@]} = 0 ] && micro="CRITERION_HOME=/tmp/crit $rdma_post --bench && \
    target/release/migrate-bench micro --criterion /tmp/crit --machine vm --out $results/raw/micro/vm.json && "
  # Post-copy there too, over TCP and over RDMA READ in the same boot
  # (the emulated CPUs: a smaller guest over a slower link).
  if [ ${#quick[@]} = 0 ]; then vpc="--repeats 3"; else vpc="--mib 8 --repeats 1"; fi
  # Fault tolerance there, RDMA beside TCP (the emulated CPUs: smaller
  # guests, a slower pace).
  if [ ${#quick[@]} = 0 ]; then vft="--mib 16,64 --epoch-ms 25,100"; else vft="--mib 8 --epoch-ms 50 --seconds 1"; fi
  mkdir -p "$results/raw/peer"
  scripts/rdma-vm.sh --rwdir "$results/raw" bash -c "$micro target/release/migrate-bench run \
    --site vm-loopback ${quick[*]} --out $results/raw/vm.json --command-line '$cmd' && \
    target/release/migrate-bench postcopy --machine vm --rdma --mib 16 --bandwidth-mbs 8 \
    --transfers-per-sec 20000 $vpc --results $results && \
    target/release/migrate-bench protect --machine vm --rdma --rate 1000 --failover-after-ms 1000 $vft \
    --results $results"
  # One link shared, in the VM: the RoCE fabric between two rxe devices
  # exists only with --netns, so in a boot of its own (run in the boot
  # above, it failed at once with "no rxe-a" and left the raw file of an
  # earlier run in place).
  if [ ${#quick[@]} = 0 ]; then vfab="--seconds 30"; else vfab="--seconds 6"; fi
  scripts/rdma-vm.sh --netns --rwdir "$results/raw" bash -c "target/release/migrate-bench fabric \
    --machine vm --rdma --link-mbit 100 --mib 16 $vfab --low-percent 20 --results $results" || \
    echo 'bench: the fabric comparison in the VM failed (above; results.md says which cases and why when it recorded them)' >&2
fi
# The committed results also write the figures BENCHMARKS.md quotes.
prose=()
[ "$results" = benches/results ] && prose=(--prose BENCHMARKS.md)
target/release/migrate-bench report --results "$results" "${prose[@]}"
