#!/usr/bin/env python3
"""A TCP proxy that records every connection's bytes, each direction to its
own file: OUT/conn<N>-c2s and OUT/conn<N>-s2c. Used to take the fuzz seed
corpus from real migrations (scripts/fuzz-corpus.sh).
Usage: record-proxy.py LISTEN_PORT UPSTREAM_HOST:PORT OUT_DIR"""
import os, socket, sys, threading

port, upstream, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
host, uport = upstream.rsplit(":", 1)
os.makedirs(out, exist_ok=True)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(64)
print("ready", flush=True)


def pump(a, b, path):
    with open(path, "wb") as f:
        while True:
            try:
                d = a.recv(1 << 16)
            except OSError:
                d = b""
            if not d:
                break
            f.write(d)
            try:
                b.sendall(d)
            except OSError:
                break
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


n = 0
while True:
    c, _ = srv.accept()
    u = socket.create_connection((host, int(uport)))
    for a, b, d in ((c, u, "c2s"), (u, c, "s2c")):
        threading.Thread(target=pump, args=(a, b, f"{out}/conn{n}-{d}"), daemon=True).start()
    n += 1
