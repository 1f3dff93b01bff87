#!/usr/bin/env bash
# Run the RDMA tests over real SoftRoCE verbs inside the emulated VM
# (scripts/rdma-vm.sh), where they must not skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bins=$(cargo test -p transport-rdma --locked --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
[ -n "$bins" ] || { echo "test-rdma: no test binaries built" >&2; exit 1; }
script=""
for b in $bins; do script+="echo '== $(basename "$b")'; $b --test-threads=1 || exit 1; "; done
exec scripts/rdma-vm.sh bash -c "$script"
