#!/usr/bin/env bash
# Runs INSIDE the SoftRoCE VM (scripts/rdma-vm.sh --netns), from
# vm-rdma-cli.sh: fault tolerance over RDMA between rxe-a and rxe-b (the
# RoCE fabric of scripts/roce-fabric.sh). Five times: a bank guest
# protected in epochs over RDMA, the primary SIGKILLed at a different
# point; the standby must take over (exit 0, "took-over", transport rdma),
# its ledger must hold, and the receipts both ends released must be
# contiguous from 0 with identical repeats only. The witness and both
# ends authenticate with mutual TLS.
# Usage (in the VM): scripts/vm-protect.sh BIN
set -euo pipefail
bin=$1
tmp=$(mktemp -d)
fail=0
json_get() { python3 -c "import json,sys; print(json.load(open('$1'))$2)"; }
wait_for() { # file pattern label
  local until=$((SECONDS + 120))
  while [ $SECONDS -lt $until ]; do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "FAIL $3: never saw '$2'"; cat "$1"; fail=1; return 1
}
# The receipts of the primary then the standby: contiguous when merged,
# a repeat identical, a line cut short by the kill a prefix of its whole.
receipts_hold() { # primary-out standby-out
  python3 - "$1" "$2" <<'PY'
import sys
seen = {}
cut = []
for f in sys.argv[1:]:
    text = open(f).read()
    lines = text.split("\n")
    if lines and lines[-1] != "":
        cut.append(lines[-1])
    nxt = None
    for line in lines[:-1]:
        seq = int(line.split(" ")[0])
        assert nxt is None or seq == nxt, f"{f}: gap or disorder at {line!r}"
        nxt = seq + 1
        assert seen.setdefault(seq, line) == line, f"receipt {seq} released twice, differently"
assert seen and max(seen) + 1 == len(seen), "receipts missing between the ends"
for c in cut:
    assert any(l.startswith(c) for l in seen.values()), f"cut-short {c!r} never released whole"
print(len(seen))
PY
}
"$bin" tls-gen --dir "$tmp/tls" --server-name 10.199.0.2 > /dev/null
tls=(--tls-dir "$tmp/tls")
"$bin" witness --listen 10.199.0.2:0 "${tls[@]}" > "$tmp/w.out" 2>&1 &
wpid=$!
wait_for "$tmp/w.out" "witness listening on" witness || exit 1
waddr=$(sed -n 's/^witness listening on //p' "$tmp/w.out")
for run in 1 2 3 4 5; do
  d="$tmp/ft$run"
  "$bin" standby --listen 10.199.0.2:0 --transport rdma --rdma-device rxe-b "${tls[@]}" \
    --witness "$waddr" --failover-after-ms 1000 --run-after-failover-s 1 \
    --output "$d-s.out" --json "$d-s.json" > "$d-s.log" 2>&1 &
  spid=$!
  wait_for "$d-s.log" "listening on" "protect-rdma-$run" || continue
  saddr=$(sed -n 's/^listening on //p' "$d-s.log")
  "$bin" protect --standby "$saddr" --transport rdma --rdma-device rxe-a "${tls[@]}" \
    --witness "$waddr" --memory 8M --guest bank --dirty-rate 300 --epoch-ms 50 \
    --failover-after-ms 1000 --output "$d-p.out" --json "$d-p.json" > "$d-p.log" 2>&1 &
  ppid=$!
  if ! wait_for "$d-p.log" "^protected:" "protect-rdma-$run"; then
    kill -9 $ppid $spid 2>/dev/null || true; wait $ppid $spid 2>/dev/null || true; cat "$d-s.log"; continue
  fi
  sleep "0.$((run * 17 % 10))"
  kill -9 $ppid; wait $ppid 2>/dev/null || true
  if ! wait $spid; then
    echo "FAIL protect-rdma-$run: standby failed"; cat "$d-s.log"; fail=1; continue
  fi
  st=$(json_get "$d-s.json" "['status']"); tr=$(json_get "$d-s.json" "['transport']")
  ck=$(json_get "$d-s.json" "['guest_check']")
  if [ "$st" != took-over ] || [ "$tr" != rdma ] || [ "$ck" != ok ]; then
    echo "FAIL protect-rdma-$run: status=$st transport=$tr guest_check=$ck"; cat "$d-s.json"; fail=1; continue
  fi
  if n=$(receipts_hold "$d-p.out" "$d-s.out"); then
    echo "ok protect-rdma-$run: took over from epoch $(json_get "$d-s.json" "['last_checkpoint']") in $(json_get "$d-s.json" "['failover_ms']") ms; $n receipts contiguous"
  else
    echo "FAIL protect-rdma-$run: the receipts"; fail=1
  fi
done
kill $wpid 2>/dev/null || true; wait $wpid 2>/dev/null || true
rm -rf "$tmp"
exit $fail
