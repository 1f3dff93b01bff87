#!/usr/bin/env bash
# Two network namespaces joined by a veth pair, as two hosts would be:
# mig-src (veth-src, 10.198.0.1/24) and mig-dst (veth-dst, 10.198.0.2/24).
# Usage: scripts/netns.sh up|down   (root)
set -euo pipefail
case "${1:-}" in
  up)
    ip netns add mig-src; ip netns add mig-dst
    ip link add veth-src type veth peer name veth-dst
    ip link set veth-src netns mig-src; ip link set veth-dst netns mig-dst
    ip -n mig-src addr add 10.198.0.1/24 dev veth-src
    ip -n mig-dst addr add 10.198.0.2/24 dev veth-dst
    for ns in mig-src mig-dst; do ip -n "$ns" link set lo up; done
    ip -n mig-src link set veth-src up; ip -n mig-dst link set veth-dst up
    ;;
  down)
    ip netns del mig-src 2>/dev/null || true
    ip netns del mig-dst 2>/dev/null || true
    ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
