#!/usr/bin/env bash
# Boot a software-emulated VM that shares this machine's files, create
# SoftRoCE (rxe) devices in it, and run a command there. The host kernel has
# no RDMA; Debian's kernel in the VM has rdma_rxe.
#
# Usage: scripts/rdma-vm.sh [--netns] [--rwdir DIR] COMMAND...
#   --netns: also create two network namespaces (mig-src, mig-dst) joined by a
#            veth pair (10.198.0.1/.2, scripts/netns.sh) for TCP between two
#            hosts, and a RoCE fabric: rxe-a (10.199.0.1) and rxe-b
#            (10.199.0.2) on the two ends of another veth pair, whose RoCE
#            packets cross that link (scripts/roce-fabric.sh says why not
#            namespaces for RDMA).
#   --rwdir DIR: DIR (on the host) is writable inside the VM too; the rest
#            of the host's files are read-only there.
# The command's exit status is this script's; its output is printed.
# Needs: qemu-system-x86, linux-image-amd64, rdma-core, ibverbs-providers,
# perftest (Debian) and virtme-ng (PyPI); scripts/setup.sh all installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
netns=0
rwdirs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --netns) netns=1; shift ;;
    --rwdir) mkdir -p "$2"; rwdirs+=(--rwdir "$(cd "$2" && pwd)"); shift 2 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--netns] COMMAND..." >&2; exit 2; }

kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$kernel" ] || { echo "rdma-vm: no Debian kernel in /boot (apt-get install linux-image-amd64)" >&2; exit 2; }
command -v vng >/dev/null || { echo "rdma-vm: vng not found (pip install virtme-ng)" >&2; exit 2; }

out=$(mktemp -d /tmp/rdma-vm.XXXXXX)
cmd=$(printf '%q ' "$@")
cat > "$out/inner.sh" <<INNER
set -u
modprobe rdma_rxe
rdma link add rxe0 type rxe netdev lo
if [ $netns = 1 ]; then
  bash $(pwd)/scripts/netns.sh up
  bash $(pwd)/scripts/roce-fabric.sh up
fi
ulimit -l unlimited
cd $(pwd)
export MIGRATE_REQUIRE_RDMA=1
# Skips are outcomes here too: logged where the host's summary reads them.
export MIGRATE_SKIP_LOG=$out/skips
# Huge pages for the hugetlb trackers' tests: reserved, then required.
echo 64 > /proc/sys/vm/nr_hugepages 2>/dev/null || true
if [ "\$(awk '/^HugePages_Free/ {print \$2}' /proc/meminfo)" -ge 32 ]; then
  export MIGRATE_REQUIRE_HUGETLB=1
fi
$cmd > $out/output 2>&1
echo \$? > $out/status
INNER
# --rwdir for the output folder; the rest of the host is read-only inside.
# `timeout` makes a process group of its own (vng, QEMU): a signal to ours
# (the test command ending early kills its VM phase's group) would not
# reach the VM, which then ran on for up to 50 minutes. Forward it.
timeout 3000 vng -r "$kernel" --disable-kvm --memory 2G --cpus 2 --rwdir "$out" "${rwdirs[@]}" \
  --exec "bash $out/inner.sh" > "$out/vng.log" 2>&1 &
vm=$!
trap 'kill -TERM -- "-$vm" 2>/dev/null; rm -rf "$out"; exit 143' TERM INT HUP
wait "$vm" || true
trap - TERM INT HUP
if [ ! -f "$out/status" ]; then
  echo "rdma-vm: the VM did not run the command; vng said:" >&2
  tail -n 30 "$out/vng.log" >&2
  exit 3
fi
cat "$out/output"
status=$(cat "$out/status")
# The VM's skips join the host's summary (scripts/test.sh), or are shown.
if [ -s "$out/skips" ]; then
  sed -e 's/^SKIP /SKIP (VM) /' -e 's|^N/A |N/A (VM) |' "$out/skips" >> "${MIGRATE_SKIP_LOG:-/dev/stdout}"
fi
rm -rf "$out"
exit "$status"
