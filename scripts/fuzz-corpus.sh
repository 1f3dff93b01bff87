#!/usr/bin/env bash
# Takes the fuzz seed corpus (fuzz/corpus/*) from real migrations: migrate-cli
# (bank guest, --verify) and mini-vmm (a running KVM guest, when /dev/kvm
# works) through a proxy that records every connection, then cuts the
# recordings into what each fuzz target reads. Run once; the corpus is
# committed. Usage: scripts/fuzz-corpus.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p migrate-cli -p mini-vmm
tmp=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
corpus=fuzz/corpus

record() { # name port dest-command... ; then the source command reads $proxy
  local name=$1 port=$2; shift 2
  "$@" > "$tmp/$name-d.out" 2>&1 &
  for _ in $(seq 1 100); do grep -q "listening on" "$tmp/$name-d.out" 2>/dev/null && break; sleep 0.1; done
  local addr; addr=$(sed -n 's/^listening on //p' "$tmp/$name-d.out")
  python3 scripts/record-proxy.py "$port" "$addr" "$tmp/$name" > "$tmp/$name-p.out" 2>&1 &
  for _ in $(seq 1 50); do grep -q ready "$tmp/$name-p.out" 2>/dev/null && break; sleep 0.1; done
  proxy=127.0.0.1:$port
}

record cli 47001 target/release/migrate-cli dest --listen 127.0.0.1:0 --memory-file "$tmp/dest.mem" --memory 4M
target/release/migrate-cli source --connect "$proxy" --memory 4M --guest bank --dirty-rate 2000 \
  --streams 1 --verify --progress never > /dev/null
wait %1 || true
record zstd 47002 target/release/migrate-cli dest --listen 127.0.0.1:0
target/release/migrate-cli source --connect "$proxy" --memory 2M --guest dirty --mix 40:30:30 \
  --streams 1 --compress --progress never > /dev/null
wait %3 || true
if [ -w /dev/kvm ]; then
  record kvm 47003 target/release/mini-vmm dest --listen 127.0.0.1:0
  target/release/mini-vmm source --connect "$proxy" > /dev/null || true
fi
sleep 1
mkdir -p "$corpus"/{control_stream,message_payload,page_batch,machine_state,bank_ledger,tls_records}
python3 - "$tmp" "$corpus" <<'PY'
import glob, os, struct, sys, hashlib
tmp, corpus = sys.argv[1], sys.argv[2]
def put(target, data):
    name = hashlib.sha1(data).hexdigest()
    open(os.path.join(corpus, target, name), "wb").write(data)
def frames(b):
    """(kind, payload) of each frame after the 8-byte preamble."""
    i = 8
    while i + 16 <= len(b):
        kind, flags, _, length, _ = struct.unpack_from("<BBHIQ", b, i)
        yield kind, b[i + 16:i + 16 + length], b[i:i + 16 + length]
        i += 16 + length
for run in ("cli", "zstd", "kvm"):
    for path in sorted(glob.glob(f"{tmp}/{run}/conn*")):
        b = open(path, "rb").read()
        if not b:
            continue
        data_stream = False
        for kind, payload, frame in frames(b):
            if kind == 6:  # a page batch: this is a data stream
                data_stream = True
                break
        if data_stream:
            put("page_batch", b[:64 << 10])
            # The same bytes as TLS plaintext, sealed and opened by each
            # suite (first byte 3, 4, 5: see transport-tcp's record::fuzz).
            if run == "cli":
                for first in (3, 4, 5):
                    put("tls_records", bytes([first]) + b[:64 << 10])
            continue
        put("control_stream", b[:64 << 10])
        for kind, payload, frame in frames(b):
            if kind == 20:  # heartbeats: one is enough
                if getattr(sys, "_hb", False):
                    continue
                sys._hb = True
            put("message_payload", bytes([kind]) + payload[:16 << 10])
            if run == "kvm" and kind == 12:
                # DeviceState{last u8, chunk}: the chunk is mini-vmm's blob.
                put("machine_state", payload[1:])
mem = os.path.join(tmp, "dest.mem")
if os.path.exists(mem):
    put("bank_ledger", open(mem, "rb").read()[:64 << 10])
for t in sorted(os.listdir(corpus)):
    print(t, len(os.listdir(os.path.join(corpus, t))), "entries")
PY
