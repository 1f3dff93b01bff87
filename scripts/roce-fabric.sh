#!/usr/bin/env bash
# A RoCE fabric between two SoftRoCE devices whose packets really cross a
# link: rxe-a on fab-a (10.199.0.1) and rxe-b on fab-b (10.199.0.2), the two
# ends of one veth pair, in this network namespace. Run as root, in the
# SoftRoCE VM (scripts/rdma-vm.sh --netns does it).
#
# Why not two namespaces: the VM's Linux 6.1 rxe routes and receives RoCE in
# the initial namespace only, so rxe devices on veth ends inside two
# namespaces do not reach each other (ib_write_bw between them moves
# nothing; measured). Two devices on one host normally talk through the
# local route (the loopback device, where rxe short-cuts the packet), so
# policy routing sends whatever leaves with fab-a's address out of fab-a
# and vice versa, and the receiving end accepts a local source address.
# The result: every RoCE packet of a migration from rxe-a to rxe-b leaves
# fab-a and arrives on fab-b, where `tc` can stop it, while TCP between
# 10.199.0.1 and .2 (the control connection) keeps the local route.
# Usage: scripts/roce-fabric.sh up|down
set -euo pipefail
case "${1:-}" in
  up)
    ip link add fab-a type veth peer name fab-b
    ip addr add 10.199.0.1/32 dev fab-a; ip addr add 10.199.0.2/32 dev fab-b
    ip link set fab-a up; ip link set fab-b up
    for k in all default fab-a fab-b; do
      sysctl -qw "net.ipv4.conf.$k.accept_local=1" "net.ipv4.conf.$k.rp_filter=0"
    done
    ip rule add pref 10 oif fab-a lookup 101; ip route add 10.199.0.2 dev fab-a table 101
    ip rule add pref 11 oif fab-b lookup 102; ip route add 10.199.0.1 dev fab-b table 102
    ip rule add pref 100 lookup local; ip rule del pref 0
    ip neigh replace 10.199.0.2 lladdr "$(cat /sys/class/net/fab-b/address)" dev fab-a nud permanent
    ip neigh replace 10.199.0.1 lladdr "$(cat /sys/class/net/fab-a/address)" dev fab-b nud permanent
    rdma link add rxe-a type rxe netdev fab-a
    rdma link add rxe-b type rxe netdev fab-b
    ;;
  down)
    rdma link delete rxe-a 2>/dev/null || true
    rdma link delete rxe-b 2>/dev/null || true
    ip link del fab-a 2>/dev/null || true
    ip rule del pref 10 2>/dev/null || true
    ip rule del pref 11 2>/dev/null || true
    ip rule add pref 0 lookup local 2>/dev/null || true
    ip rule del pref 100 2>/dev/null || true
    ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
