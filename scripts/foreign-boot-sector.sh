#!/usr/bin/env bash
# Fetch a PC boot sector that nobody here wrote: QEMU's own migration-test
# guest (tests/migration/i386/a-b-bootblock, GPL-2.0-or-later; it sweeps
# 1 MiB..100 MiB adding one to a byte of every page, printing A once and B
# every 64 sweeps on COM1), from Debian's qemu 7.2 source tarball, checked
# against pinned hashes. It is test input fetched at test time, never stored
# in this repository.
# Usage: scripts/foreign-boot-sector.sh [OUT]   prints the image's path
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/foreign/qemu-a-b-bootblock.img}
url=http://deb.debian.org/debian/pool/main/q/qemu/qemu_7.2+dfsg.orig.tar.xz
tar_sha=91aca71520040edc40b8d437aa3004dae614f58e286cf653ee8996c07af2962f
img_sha=e818909f35fda37141ec0f053e067a919a76b2db4149843f5adf0c6f8a96cb6b
if [ -s "$out" ] && echo "$img_sha  $out" | sha256sum -c --quiet 2>/dev/null; then
  echo "$out"; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
curl -fsS --retry 3 --max-time 300 -o "$tmp/qemu.tar.xz" "$url"
echo "$tar_sha  $tmp/qemu.tar.xz" | sha256sum -c --quiet
header=qemu-7.2.0/tests/migration/i386/a-b-bootblock.h
tar -xJf "$tmp/qemu.tar.xz" -C "$tmp" "$header"
# The header holds the image as a C array of bytes.
python3 - "$tmp/$header" "$tmp/img" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
body = text[text.index("{") + 1:text.index("}")]
open(sys.argv[2], "wb").write(bytes(int(x, 16) for x in re.findall(r"0x[0-9a-fA-F]{2}", body)))
PY
echo "$img_sha  $tmp/img" | sha256sum -c --quiet
mkdir -p "$(dirname "$out")"
mv "$tmp/img" "$out"
echo "$out"
