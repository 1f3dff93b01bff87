#!/usr/bin/env bash
# Runs INSIDE the SoftRoCE VM (scripts/rdma-vm.sh --netns): migrate-cli over
# RDMA on rxe0 (loopback), then between two SoftRoCE devices whose RoCE
# packets cross a veth link (scripts/roce-fabric.sh), and TCP between two
# network namespaces; each run must report "transport": "rdma" (or "tcp"),
# "verified": true.
# Usage (in the VM): scripts/vm-rdma-cli.sh BIN [compare]
#   compare: also print RDMA vs TCP migration throughput and ib_write_bw at
#            the same message size (1 MiB), from this one boot.
set -euo pipefail
bin=$1; mode=${2:-check}
tmp=$(mktemp -d)
fail=0

auth=()      # credentials given to both ends of the next migrate call
dest_args=() # more arguments for the destination of the next migrate call
json_get() { python3 -c "import json,sys; print(json.load(open('$1'))$2)"; }

# Wait (up to 2 minutes) until FILE says PATTERN; fail the run if it never does.
wait_for() { # file pattern label
  local until=$((SECONDS + 120))
  while [ $SECONDS -lt $until ]; do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "FAIL $3: never saw '$2'"; cat "$1"; fail=1; return 1
}

# Wait (up to 2 minutes) until COMMAND prints a number at least MIN: pages
# flowing, seen in a byte or packet counter rather than assumed after a sleep.
wait_count() { # label min command...
  local label=$1 min=$2 until=$((SECONDS + 120)); shift 2
  while [ $SECONDS -lt $until ]; do [ "$("$@")" -ge "$min" ] && return 0; sleep 0.1; done
  echo "FAIL $label: the counter never reached $min"; fail=1; return 1
}
fab_tx() { cat /sys/class/net/fab-a/statistics/tx_bytes; }
rxe_sent() { rdma statistic show link "$1/1" | grep -o 'sent_pkts [0-9]*' | awk '{print $2}'; }

migrate() { # label transport src_ns dst_ns listen_ip size guest-args...
  local label=$1 transport=$2 sns=$3 dns=$4 ip=$5 size=$6; shift 6
  local sx="" dx=""
  [ -n "$sns" ] && sx="ip netns exec $sns"
  [ -n "$dns" ] && dx="ip netns exec $dns"
  $dx "$bin" dest --listen "$ip:0" --transport "$transport" "${auth[@]}" "${dest_args[@]}" --json "$tmp/$label-d.json" > "$tmp/$label-d.out" 2>&1 &
  local dpid=$!
  wait_for "$tmp/$label-d.out" "listening on" "$label" || { kill $dpid 2>/dev/null; wait $dpid 2>/dev/null; return; }
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
"$bin" tls-gen --dir "$tmp/tls" --server-name 10.199.0.2 > /dev/null
(umask 077; head -c 32 /dev/urandom | base64 > "$tmp/psk")
# RDMA between rxe-a and rxe-b: both "hosts" share the VM's namespace (see
# roce-fabric.sh), so each side is told its device; the destination would
# find rxe-b by its address anyway. The fabric link's counters prove the
# pages crossed it rather than rxe's internal loopback.
# Each end marks its queue pairs (the source by --dscp 46, traffic class
# 184; the destination by --traffic-class 40, DSCP 10): tc counters on each
# end of the link count the RoCE v2 packets (UDP 4791) leaving it with that
# DSCP and with any other; none may be unmarked. (tc, not nftables: rxe's
# packets do not pass netfilter.)
count_roce() { # dev tos
  tc qdisc add dev "$1" clsact
  tc filter add dev "$1" egress pref 1 protocol ip flower ip_proto udp dst_port 4791 ip_tos "$2/0xfc" action pass
  tc filter add dev "$1" egress pref 2 protocol ip flower ip_proto udp dst_port 4791 action pass
}
roce_pkts() { # dev pref
  tc -s filter show dev "$1" egress pref "$2" | grep -o 'Sent [0-9]* bytes [0-9]* pkt' | awk '{s+=$4} END {print s+0}'
}
count_roce fab-a 0xb8; count_roce fab-b 0x28
auth=(--tls-dir "$tmp/tls"); dest_args=(--rdma-device rxe-b --traffic-class 40)
before=$(fab_tx)
migrate rdma-two-hosts rdma "" "" 10.199.0.2 32M --rdma-device rxe-a --guest bank --dirty-rate 2000 --verify --dscp 46
crossed=$(( $(fab_tx) - before ))
if [ "$crossed" -ge $((32 << 20)) ]; then
  echo "ok rdma-two-hosts crossed the fabric link: $((crossed >> 20)) MiB left fab-a"
else
  echo "FAIL rdma-two-hosts: only $crossed bytes left fab-a for a 32 MiB guest"; fail=1
fi
for end in "fab-a source DSCP 46" "fab-b destination DSCP 10"; do
  read -r dev who d dscp <<< "$end"
  marked=$(roce_pkts "$dev" 1); other=$(roce_pkts "$dev" 2)
  if [ "$marked" -gt 1000 ] && [ "$other" = 0 ]; then
    echo "ok rdma-two-hosts marked: $marked RoCE packets of the $who carried $d $dscp, none without"
  else
    echo "FAIL rdma-two-hosts marking: the $who sent $marked RoCE packets with $d $dscp and $other without"; fail=1
  fi
  tc qdisc del dev "$dev" clsact
done
# Post-copy between the two hosts over RDMA, authenticated: a guest
# dirtying faster than a 1 MB/s cap goes to post-copy after two rounds (the
# read queue pair and the source's keys cross the TLS connection); both
# ends report post-copy and the digests are equal.
dest_args=(--rdma-device rxe-b --digest)
migrate rdma-postcopy rdma "" "" 10.199.0.2 4M --rdma-device rxe-a --guest dirty --dirty-rate 4000 \
  --pattern uniform --mix 0:0:1 --bandwidth-mbs 1 --downtime-ms 20 --postcopy auto \
  --postcopy-after-rounds 2 --digest
if [ -s "$tmp/rdma-postcopy-s.json" ] && [ -s "$tmp/rdma-postcopy-d.json" ]; then
  pcs=$(json_get "$tmp/rdma-postcopy-s.json" "['postcopy']")
  pcd=$(json_get "$tmp/rdma-postcopy-d.json" "['postcopy']")
  ds=$(json_get "$tmp/rdma-postcopy-s.json" "['memory_digest']")
  dd=$(json_get "$tmp/rdma-postcopy-d.json" "['memory_digest']")
  if [ "$pcs" = True ] && [ "$pcd" = True ] && [ "$ds" = "$dd" ]; then
    echo "ok rdma-postcopy: post-copy over RDMA, $(json_get "$tmp/rdma-postcopy-s.json" "['postcopy_pushed_pages']") pages pushed, digests equal"
  else
    echo "FAIL rdma-postcopy: postcopy=$pcs/$pcd digests $ds/$dd"; fail=1
  fi
fi
dest_args=()
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


# A fault for 5 s in round 0 of an authenticated two-host RDMA migration
# (I/O timeout 2 s): the migration must resume over new queue pairs and new
# keys once the fault is gone, and complete verified with a consistent ledger.
survives_fault() { # label fault-function what
  local label=$1 fault=$2 what=$3
  auth=(--tls-dir "$tmp/tls")
  "$bin" --log info dest --listen 10.199.0.2:0 --transport rdma "${auth[@]}" --rdma-device rxe-b \
    --io-timeout-s 2 --json "$tmp/$label-d.json" > "$tmp/$label-d.out" 2>&1 &
  local dpid=$! spid
  if wait_for "$tmp/$label-d.out" "listening on" "$label"; then
    local addr; addr=$(sed -n 's/^listening on //p' "$tmp/$label-d.out")
    port=${addr##*:}
    "$bin" --log warn source --connect "$addr" --transport rdma "${auth[@]}" --rdma-device rxe-a --memory 16M \
      --mix 0:0:1 --guest bank --dirty-rate 200 --bandwidth-mbs 2 --io-timeout-s 2 --verify \
      --progress never --json "$tmp/$label-s.json" > "$tmp/$label-s.out" 2>&1 &
    spid=$!
    # Round 0 is 8 s at 2 MB/s: the fault comes once a MiB crossed the
    # fabric, and holds until the source has found it (round 0 cannot end
    # meanwhile).
    if wait_count "$label" $(( $(fab_tx) + (1 << 20) )) fab_tx; then
      $fault
    fi
    if wait $spid && wait $dpid; then
      local r v c t
      r=$(json_get "$tmp/$label-s.json" "['reconnects']"); v=$(json_get "$tmp/$label-s.json" "['verified']")
      c=$(json_get "$tmp/$label-d.json" "['guest_consistent']"); t=$(json_get "$tmp/$label-s.json" "['transport']")
      if [ "$r" -ge 1 ] && [ "$v" = True ] && [ "$c" = True ] && [ "$t" = rdma ]; then
        echo "ok $label: resumed over RDMA after $what ($r reconnects), verified, ledger consistent"
      else
        echo "FAIL $label: reconnects=$r verified=$v consistent=$c transport=$t"; fail=1
      fi
    else
      echo "FAIL $label: a side failed"; cat "$tmp/$label-s.out" "$tmp/$label-d.out"; fail=1
      kill $dpid 2>/dev/null || true; wait $dpid 2>/dev/null || true
    fi
  fi
  auth=()
}

# Packets dropped by tc (below netfilter, which rxe's packets do not pass):
# RoCE v2 (UDP 4791) arriving on fab-b, as a fabric that loses them would
# (dropped on their way out instead, rxe retries each send at once, in a
# loop that starves the emulated CPUs), and TCP to and from the control
# port on the loopback device that carries it.
drop_roce() {
  tc qdisc add dev fab-b clsact
  tc filter add dev fab-b ingress protocol ip u32 match ip protocol 17 0xff match ip dport 4791 0xffff action drop
}
drop_control() {
  tc qdisc add dev lo clsact
  tc filter add dev lo egress protocol ip u32 match ip protocol 6 0xff match ip dport "$port" 0xffff action drop
  tc filter add dev lo egress protocol ip u32 match ip protocol 6 0xff match ip sport "$port" 0xffff action drop
}
dropped() { tc -s filter show dev "$1" "$2" | grep -o 'dropped [0-9]*' | awk '{s+=$2} END {print s+0}'; }
heal() { tc qdisc del dev fab-b clsact 2>/dev/null || true; tc qdisc del dev lo clsact 2>/dev/null || true; }

# The link between the two hosts cut for 5 s, RoCE and the control
# connection alike: both ends find the silence within the I/O timeout, the
# destination deregisters its memory (the old keys die), the source
# reconnects once the link is back over a new TLS connection.
# Hold the fault until the source reports its connection lost (within the
# I/O timeout, however slow the VM), two seconds more, then heal it.
hold() {
  local t0=$SECONDS
  wait_for "$tmp/$label-s.out" "connection to the destination lost" "$label" || true
  sleep 2
  held=$((SECONDS - t0))
}
cut_link() {
  drop_roce; drop_control; hold
  echo "   (cut for ${held} s: tc dropped $(dropped fab-b ingress) RoCE and $(dropped lo egress) control packets)"; heal
}
survives_fault rdma-cut cut_link "a cut"

# The RDMA fabric alone stops (the queue pairs complete nothing) while the
# control connection stays up and keeps its heartbeats. The source finds
# its queue pairs silent within the I/O timeout, treats it as a lost
# connection and resumes over new queue pairs.
stop_roce() {
  drop_roce; hold
  echo "   (RoCE stopped for ${held} s: tc dropped $(dropped fab-b ingress) packets)"; heal
}
survives_fault rdma-qp-stopped stop_roce "its queue pairs stopped under a live control connection"

# Post-copy over RDMA between the two hosts (the destination runs the
# guest and READs its missing pages from the source's memory) with the link
# cut once post-copy began, both RoCE and the control connection, for over
# twice the I/O timeout: both ends declare the other dead and keep what they
# hold, the source reconnects once the link is back, post-copy completes;
# both exit 0 with equal digests (the TCP test
# a_link_cut_during_postcopy_is_recovered, over RDMA).
label=rdma-postcopy-cut
"$bin" --log info dest --listen 10.199.0.2:0 --transport rdma --tls-dir "$tmp/tls" --rdma-device rxe-b \
  --io-timeout-s 2 --digest --json "$tmp/$label-d.json" > "$tmp/$label-d.out" 2>&1 &
pcd=$!
if wait_for "$tmp/$label-d.out" "listening on" "$label"; then
  pcaddr=$(sed -n 's/^listening on //p' "$tmp/$label-d.out")
  port=${pcaddr##*:}
  "$bin" --log warn source --connect "$pcaddr" --transport rdma --tls-dir "$tmp/tls" --rdma-device rxe-a \
    --memory 4M --guest dirty --dirty-rate 4000 --pattern uniform --mix 0:0:1 --bandwidth-mbs 1 \
    --downtime-ms 20 --postcopy auto --postcopy-after-rounds 2 --io-timeout-s 2 --digest \
    --events "$tmp/$label.events" --progress never --json "$tmp/$label-s.json" > "$tmp/$label-s.out" 2>&1 &
  pcs=$!
  if wait_for "$tmp/$label.events" '"event":"postcopy"' "$label"; then
    drop_roce; drop_control; hold
    echo "   (cut for ${held} s in post-copy: tc dropped $(dropped fab-b ingress) RoCE and $(dropped lo egress) control packets)"
    heal
  fi
  if wait $pcs && wait $pcd; then
    r=$(json_get "$tmp/$label-s.json" "['reconnects']"); p=$(json_get "$tmp/$label-d.json" "['postcopy']")
    ds=$(json_get "$tmp/$label-s.json" "['memory_digest']"); dd=$(json_get "$tmp/$label-d.json" "['memory_digest']")
    if [ "$r" -ge 1 ] && [ "$p" = True ] && [ "$ds" = "$dd" ]; then
      echo "ok $label: post-copy over RDMA resumed after a cut ($r reconnects), digests equal"
    else
      echo "FAIL $label: reconnects=$r postcopy=$p digests $ds/$dd"; fail=1
    fi
  else
    echo "FAIL $label: a side failed"; cat "$tmp/$label-s.out" "$tmp/$label-d.out"; fail=1
    kill $pcd 2>/dev/null || true; wait $pcd 2>/dev/null || true
  fi
fi

# A destination process killed mid-round (its queue pairs die with it): the
# source sees its control connection close (not only, after its 10 s I/O
# timeout, queue pairs that complete nothing), its reconnection is refused
# (the process is gone), so it fails at once with a clear error and its
# guest runs again.
"$bin" --log info dest --listen 127.0.0.1:0 --transport rdma > "$tmp/kill-d.out" 2>&1 &
kpid=$!
wait_for "$tmp/kill-d.out" "listening on" rdma-dest-killed
kaddr=$(sed -n 's/^listening on //p' "$tmp/kill-d.out")
"$bin" source --connect "$kaddr" --transport rdma --memory 64M --mix 0:0:1 --bandwidth-mbs 4 \
  --io-timeout-s 10 --progress never --json "$tmp/kill-s.json" > "$tmp/kill-s.out" 2>&1 &
spid=$!
# Round 0 is 16 s at 4 MB/s: killed once a MiB of RoCE packets went out.
wait_count rdma-dest-killed $(( $(rxe_sent rxe0) + 256 )) rxe_sent rxe0 || true
kill -9 $kpid 2>/dev/null || true
killed_at=$SECONDS
if wait $spid; then
  echo "FAIL rdma-dest-killed: the source did not notice"; fail=1
elif [ $((SECONDS - killed_at)) -ge 8 ]; then
  echo "FAIL rdma-dest-killed: the source took $((SECONDS - killed_at)) s to fail (I/O timeout 10 s)"; cat "$tmp/kill-s.out"; fail=1
elif grep -q "source guest is running again" "$tmp/kill-s.out"; then
  echo "ok rdma-dest-killed: failed $((SECONDS - killed_at)) s after the kill: $(json_get "$tmp/kill-s.json" "['error']")"
else
  echo "FAIL rdma-dest-killed: unexpected"; cat "$tmp/kill-s.out"; fail=1
fi
wait $kpid 2>/dev/null || true

# An unprivileged source whose RLIMIT_MEMLOCK cannot cover the guest is
# refused up front, with the numbers and how to raise the limit.
"$bin" dest --listen 127.0.0.1:0 --transport rdma > "$tmp/ml-d.out" 2>&1 &
mlpid=$!
wait_for "$tmp/ml-d.out" "listening on" memlock || true
mladdr=$(sed -n 's/^listening on //p' "$tmp/ml-d.out")
# (Run from a copy user nobody can reach: the build may live in root's
# home, e.g. the test command's cache.)
mlbin=$(mktemp -d)
chmod 755 "$mlbin" && cp "$bin" "$mlbin/migrate-cli" && chmod 755 "$mlbin/migrate-cli"
if setpriv --reuid=65534 --regid=65534 --clear-groups bash -c \
     "ulimit -l 1024; '$mlbin/migrate-cli' source --connect $mladdr --transport rdma --memory 32M --progress never" \
     > "$tmp/ml-s.out" 2>&1; then
  echo "FAIL memlock: an unprivileged source with ulimit -l 1024 was not refused"; fail=1
elif grep -q "RLIMIT_MEMLOCK" "$tmp/ml-s.out"; then
  echo "ok memlock: $(grep -o 'RLIMIT_MEMLOCK[^;]*' "$tmp/ml-s.out" | head -1)"
else
  echo "FAIL memlock: unexpected error"; cat "$tmp/ml-s.out"; fail=1
fi
kill $mlpid 2>/dev/null || true; wait $mlpid 2>/dev/null || true
rm -rf "$mlbin"

echo "== fault tolerance over RDMA (rxe-a -> rxe-b): the primary killed at five points"
scripts/vm-protect.sh "$bin" || fail=1

if [ "$mode" = compare ]; then
  echo "== one boot: RDMA vs TCP migration of an idle 64 MiB guest (random pages), and ib_write_bw at 1 MiB"
  for i in 1 2 3; do
    migrate "cmp-rdma-1qp-$i" rdma "" "" 127.0.0.1 64M --guest idle --mix 0:0:1 --streams 1
    migrate "cmp-rdma-2qp-$i" rdma "" "" 127.0.0.1 64M --guest idle --mix 0:0:1 --streams 2
    migrate "cmp-tcp-1conn-$i" tcp "" "" 127.0.0.1 64M --guest idle --mix 0:0:1 --streams 1
    migrate "cmp-tcp-2conn-$i" tcp "" "" 127.0.0.1 64M --guest idle --mix 0:0:1 --streams 2
  done
  ib_write_bw -d rxe0 -x 1 -s 1048576 -n 200 -F > "$tmp/bw-s.out" 2>&1 &
  bwpid=$!
  wait_for "$tmp/bw-s.out" "Waiting for client" ib_write_bw || true
  ib_write_bw -d rxe0 -x 1 -s 1048576 -n 200 -F 127.0.0.1 > "$tmp/bw-c.out" 2>&1 || true
  wait $bwpid || true
  echo "ib_write_bw (1 MiB messages, MB/s = 2^20 B/s):"; grep -A2 "#bytes" "$tmp/bw-c.out" || cat "$tmp/bw-c.out"
fi
rm -rf "$tmp"
exit $fail
