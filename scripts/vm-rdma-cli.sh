#!/usr/bin/env bash
# Runs INSIDE the SoftRoCE VM (scripts/rdma-vm.sh --netns): migrate-cli over
# RDMA on rxe0 (loopback), then between two network namespaces joined by a
# veth pair with an rxe device on each end; each run must report
# "transport": "rdma", "verified": true.
# Usage (in the VM): scripts/vm-rdma-cli.sh BIN [compare]
#   compare: also print RDMA vs TCP migration throughput and ib_write_bw at
#            the same message size (1 MiB), from this one boot.
set -euo pipefail
bin=$1; mode=${2:-check}
tmp=$(mktemp -d)
fail=0

auth=()   # credentials given to both ends of the next migrate call
json_get() { python3 -c "import json,sys; print(json.load(open('$1'))$2)"; }

migrate() { # label transport src_ns dst_ns listen_ip size guest-args...
  local label=$1 transport=$2 sns=$3 dns=$4 ip=$5 size=$6; shift 6
  local sx="" dx=""
  [ -n "$sns" ] && sx="ip netns exec $sns"
  [ -n "$dns" ] && dx="ip netns exec $dns"
  $dx "$bin" dest --listen "$ip:0" --transport "$transport" "${auth[@]}" --json "$tmp/$label-d.json" > "$tmp/$label-d.out" 2>&1 &
  local dpid=$!
  for _ in $(seq 1 100); do grep -q "listening on" "$tmp/$label-d.out" 2>/dev/null && break; sleep 0.1; done
  local addr; addr=$(sed -n 's/^listening on //p' "$tmp/$label-d.out")
  if ! $sx "$bin" source --connect "$addr" --transport "$transport" --memory "$size" --progress never \
        "${auth[@]}" --json "$tmp/$label-s.json" "$@" > "$tmp/$label-s.out" 2>&1; then
    echo "FAIL $label: source failed"; cat "$tmp/$label-s.out"; cat "$tmp/$label-d.out"; fail=1
    wait $dpid || true; return
  fi
  wait $dpid || { echo "FAIL $label: destination failed"; cat "$tmp/$label-d.out"; fail=1; return; }
  local t v; t=$(json_get "$tmp/$label-s.json" "['transport']"); v=$(json_get "$tmp/$label-s.json" "['verified']")
  if [ "$t" != "$transport" ] || { [[ " $* " == *" --verify "* ]] && [ "$v" != "True" ]; }; then
    echo "FAIL $label: transport=$t verified=$v"; cat "$tmp/$label-s.json"; fail=1; return
  fi
  echo "ok $label: $(json_get "$tmp/$label-s.json" "['total_ms']") ms total, $(json_get "$tmp/$label-s.json" "['downtime_ms']") ms downtime, $(json_get "$tmp/$label-s.json" "['throughput_mbps']") Mbit/s, $(json_get "$tmp/$label-s.json" "['rounds']") rounds"
}

# `check` judges this host fit for RDMA, and names the device it would use.
if "$bin" check --transport rdma --memory 32M > "$tmp/check.out" 2>&1 && grep -q "would use rxe" "$tmp/check.out"; then
  echo "ok check: $(grep -o 'would use [^;]*' "$tmp/check.out")"
else
  echo "FAIL check: the SoftRoCE VM was not judged fit for RDMA"; cat "$tmp/check.out"; fail=1
fi
migrate rdma-lo rdma "" "" 127.0.0.1 32M --guest dirty --dirty-rate 2000 --verify
# Between the two hosts, authenticated: mutual TLS for RDMA (the rkeys
# travel over it), a pre-shared key for TCP.
"$bin" tls-gen --dir "$tmp/tls" --server-name 10.198.0.2 > /dev/null
head -c 32 /dev/urandom | base64 > "$tmp/psk"
auth=(--tls-dir "$tmp/tls")
migrate rdma-two-hosts rdma mig-src mig-dst 10.198.0.2 32M --guest bank --dirty-rate 2000 --verify
# TLS in the emulated CPU moves ~35 Mbit/s: a gentler guest, or
# auto-converge works for a minute and a half.
auth=(--psk-file "$tmp/psk")
migrate tcp-two-hosts tcp mig-src mig-dst 10.198.0.2 32M --guest bank --dirty-rate 500 --verify
auth=()
# Over the network without credentials: refused before it starts.
if ip netns exec mig-dst "$bin" dest --listen 10.198.0.2:0 --transport rdma > "$tmp/noauth.out" 2>&1; then
  echo "FAIL rdma-no-auth: a destination listened on a network address without credentials"; fail=1
elif grep -q "without authentication" "$tmp/noauth.out"; then
  echo "ok rdma-no-auth: $(grep -o 'refusing[^:]*' "$tmp/noauth.out" | head -1)"
else
  echo "FAIL rdma-no-auth: unexpected"; cat "$tmp/noauth.out"; fail=1
fi
if [ "$fail" = 0 ]; then
  grep -q '"guest_consistent": true' "$tmp/rdma-two-hosts-d.json" || { echo "FAIL: ledger not consistent after RDMA"; fail=1; }
fi

# Wait (up to 2 minutes) until FILE says PATTERN; fail the run if it never does.
wait_for() { # file pattern label
  for _ in $(seq 1 1200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "FAIL $3: never saw '$2'"; cat "$1"; fail=1; return 1
}

# The link between the two hosts down for 5 s in round 0, RoCE and the
# control connection alike: both ends find the silence within the I/O
# timeout (2 s), the destination deregisters its memory (the old keys die),
# the source reconnects once the link is back, new queue pairs and keys
# over a new TLS connection, and the migration completes verified.
auth=(--tls-dir "$tmp/tls")
ip netns exec mig-dst "$bin" --log info dest --listen 10.198.0.2:0 --transport rdma "${auth[@]}" \
  --io-timeout-s 2 --json "$tmp/cut-d.json" > "$tmp/cut-d.out" 2>&1 &
cpid=$!
if wait_for "$tmp/cut-d.out" "listening on" rdma-cut; then
  caddr=$(sed -n 's/^listening on //p' "$tmp/cut-d.out")
  ip netns exec mig-src "$bin" source --connect "$caddr" --transport rdma "${auth[@]}" --memory 32M \
    --mix 0:0:1 --guest bank --dirty-rate 200 --bandwidth-mbs 2 --io-timeout-s 2 --verify \
    --progress never --json "$tmp/cut-s.json" > "$tmp/cut-s.out" 2>&1 &
  spid=$!
  # Round 0 is 16 s at 2 MB/s: one second after the keys went out, pages flow.
  if wait_for "$tmp/cut-d.out" "registered for remote write" rdma-cut; then
    sleep 1
    ip -n mig-src link set veth-src down; sleep 5; ip -n mig-src link set veth-src up
  fi
  if wait $spid && wait $cpid; then
    r=$(json_get "$tmp/cut-s.json" "['reconnects']"); v=$(json_get "$tmp/cut-s.json" "['verified']")
    c=$(json_get "$tmp/cut-d.json" "['guest_consistent']"); t=$(json_get "$tmp/cut-s.json" "['transport']")
    if [ "$r" -ge 1 ] && [ "$v" = True ] && [ "$c" = True ] && [ "$t" = rdma ]; then
      echo "ok rdma-cut: resumed over RDMA after a 5 s cut ($r reconnects), verified, ledger consistent"
    else
      echo "FAIL rdma-cut: reconnects=$r verified=$v consistent=$c transport=$t"; fail=1
    fi
  else
    echo "FAIL rdma-cut: a side failed"; cat "$tmp/cut-s.out" "$tmp/cut-d.out"; fail=1
    kill $cpid 2>/dev/null || true; wait $cpid 2>/dev/null || true
  fi
fi
auth=()

# A destination process killed mid-round (its queue pairs die with it): the
# source's reconnection is refused (the process is gone), so it fails at
# once with a clear error and its guest runs again.
"$bin" --log info dest --listen 127.0.0.1:0 --transport rdma > "$tmp/kill-d.out" 2>&1 &
kpid=$!
wait_for "$tmp/kill-d.out" "listening on" rdma-dest-killed
kaddr=$(sed -n 's/^listening on //p' "$tmp/kill-d.out")
"$bin" source --connect "$kaddr" --transport rdma --memory 64M --mix 0:0:1 --bandwidth-mbs 4 \
  --io-timeout-s 10 --progress never --json "$tmp/kill-s.json" > "$tmp/kill-s.out" 2>&1 &
spid=$!
# Round 0 is 16 s at 4 MB/s: one second after the keys went out, pages flow.
wait_for "$tmp/kill-d.out" "registered for remote write" rdma-dest-killed && sleep 1
kill -9 $kpid 2>/dev/null || true
if wait $spid; then
  echo "FAIL rdma-dest-killed: the source did not notice"; fail=1
elif grep -q "source guest is running again" "$tmp/kill-s.out"; then
  echo "ok rdma-dest-killed: $(json_get "$tmp/kill-s.json" "['error']")"
else
  echo "FAIL rdma-dest-killed: unexpected"; cat "$tmp/kill-s.out"; fail=1
fi
wait $kpid 2>/dev/null || true

# An unprivileged source whose RLIMIT_MEMLOCK cannot cover the guest is
# refused up front, with the numbers and how to raise the limit.
"$bin" dest --listen 127.0.0.1:0 --transport rdma > "$tmp/ml-d.out" 2>&1 &
mlpid=$!
for _ in $(seq 1 100); do grep -q "listening on" "$tmp/ml-d.out" 2>/dev/null && break; sleep 0.1; done
mladdr=$(sed -n 's/^listening on //p' "$tmp/ml-d.out")
if setpriv --reuid=65534 --regid=65534 --clear-groups bash -c \
     "ulimit -l 1024; '$bin' source --connect $mladdr --transport rdma --memory 32M --progress never" \
     > "$tmp/ml-s.out" 2>&1; then
  echo "FAIL memlock: an unprivileged source with ulimit -l 1024 was not refused"; fail=1
elif grep -q "RLIMIT_MEMLOCK" "$tmp/ml-s.out"; then
  echo "ok memlock: $(grep -o 'RLIMIT_MEMLOCK[^;]*' "$tmp/ml-s.out" | head -1)"
else
  echo "FAIL memlock: unexpected error"; cat "$tmp/ml-s.out"; fail=1
fi
kill $mlpid 2>/dev/null || true; wait $mlpid 2>/dev/null || true

if [ "$mode" = compare ]; then
  echo "== one boot: RDMA vs TCP migration of an idle 64 MiB guest (random pages), and ib_write_bw at 1 MiB"
  for i in 1 2 3; do
    migrate "cmp-rdma-1qp-$i" rdma "" "" 127.0.0.1 64M --guest idle --mix 0:0:1 --streams 1
    migrate "cmp-rdma-2qp-$i" rdma "" "" 127.0.0.1 64M --guest idle --mix 0:0:1 --streams 2
    migrate "cmp-tcp-1conn-$i" tcp "" "" 127.0.0.1 64M --guest idle --mix 0:0:1 --streams 1
    migrate "cmp-tcp-2conn-$i" tcp "" "" 127.0.0.1 64M --guest idle --mix 0:0:1 --streams 2
  done
  ib_write_bw -d rxe0 -x 1 -s 1048576 -n 200 -F > "$tmp/bw-s.out" 2>&1 &
  sleep 1
  ib_write_bw -d rxe0 -x 1 -s 1048576 -n 200 -F 127.0.0.1 > "$tmp/bw-c.out" 2>&1 || true
  wait || true
  echo "ib_write_bw (1 MiB messages, MB/s = 2^20 B/s):"; grep -A2 "#bytes" "$tmp/bw-c.out" || cat "$tmp/bw-c.out"
fi
rm -rf "$tmp"
exit $fail
