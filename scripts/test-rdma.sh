#!/usr/bin/env bash
# Run the RDMA tests over real SoftRoCE verbs inside the emulated VM
# (scripts/rdma-vm.sh), where they must not skip, then migrate-cli over RDMA
# on loopback and between rxe-a and rxe-b on the two ends of one veth pair
# (scripts/roce-fabric.sh), with faults, and over TCP between the network
# namespaces mig-src and mig-dst.
# RDMA_COMPARE=1 also prints RDMA vs TCP vs ib_write_bw from the same boot.
# In the same boot, the dirty trackers' conformance suite for uffd-sync on
# the VM's older kernel (Debian's 6.1: no async write-protect, no markers).
set -euo pipefail
cd "$(dirname "$0")/.."
bins=$(cargo test -p transport-rdma --locked --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
[ -n "$bins" ] || { echo "test-rdma: no test binaries built" >&2; exit 1; }
scripts/build-release.sh
script=""
for b in $bins; do script+="echo '== $(basename "$b")'; $b --test-threads=1 || exit 1; "; done
# The RDMA micro benchmark once in test mode (no timing), over rxe0.
rdma_post=$(cargo bench --locked -p benches --bench rdma_post --no-run 2>&1 \
  | grep -o 'target/release/deps/rdma_post-[0-9a-f]*' | tail -n 1)
script+="echo '== rdma_post (test mode)'; CRITERION_HOME=/tmp/crit $rdma_post --test || exit 1; "
# The tracker an older kernel (the VM's) selects, without pte markers for
# unpopulated anonymous memory: uffd-sync, its whole conformance suite, and
# the selected set as the engine builds it there (about 2 minutes; the
# whole suite takes 5 in the emulated VM).
dirty=$(cargo test -p migrate-core --features test-utils --locked --test dirty_conformance --no-run 2>&1 \
  | grep -o 'target/debug/deps/dirty_conformance-[0-9a-f]*' | tail -n 1)
[ -n "$dirty" ] || { echo "test-rdma: no dirty_conformance binary built" >&2; exit 1; }
script+="echo '== dirty tracking on the VM kernel (uffd-sync, the selected set)'; $dirty --test-threads=1 uffd_sync selected_best || exit 1; "
# Kernel TLS: the VM's kernel has the tls module (this host's has not), so
# there the kernel's records and ours must read each other, and a guest
# must move byte for byte through them; a skip there is a failure.
tcp_bins=$(cargo test -p transport-tcp --locked --lib --test conformance --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"] + "=" + m["executable"])')
tcp_lib=$(echo "$tcp_bins" | sed -n 's/^transport_tcp=//p')
tcp_conf=$(echo "$tcp_bins" | sed -n 's/^conformance=//p')
[ -n "$tcp_lib" ] && [ -n "$tcp_conf" ] || { echo "test-rdma: no transport-tcp test binaries built" >&2; exit 1; }
script+="echo '== kernel TLS (the VM kernel has tls.ko)'; MIGRATE_REQUIRE_KTLS=1 $tcp_lib --test-threads=1 ktls:: record:: tls:: || exit 1; MIGRATE_REQUIRE_KTLS=1 $tcp_conf --test-threads=1 kernel_tls || exit 1; "
script+="echo '== migrate-cli over RDMA (loopback, a RoCE fabric link with faults) and TCP between two namespaces'; "
script+="scripts/vm-rdma-cli.sh target/release/migrate-cli ${RDMA_COMPARE:+compare} || exit 1"
exec scripts/rdma-vm.sh --netns bash -c "$script"
