# Sourced by the README's commands: installs what a fresh Debian machine lacks.
#  - build: a C toolchain, pkg-config, cmake and libclang (the RDMA binding
#    builds a small part of rdma-core with bindgen);
#  - the SoftRoCE VM for the RDMA tests: QEMU, Debian's kernel, rdma-core and
#    its providers, perftest, busybox-static (Debian) and virtme-ng (PyPI);
#  - the benchmark's ceiling and plot: iperf3, and the DejaVu font;
#  - fault injection between network namespaces: nftables.
need_pkgs=()
for p in build-essential pkg-config cmake libclang-dev \
         qemu-system-x86 linux-image-amd64 rdma-core ibverbs-providers ibverbs-utils \
         perftest libibverbs-dev librdmacm-dev busybox-static iproute2 \
         iperf3 fonts-dejavu-core nftables; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "setup: installing ${need_pkgs[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if ! command -v vng >/dev/null; then
  echo "setup: installing virtme-ng" >&2
  python3 -m pip install -q virtme-ng >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages virtme-ng >/dev/null
  hash -r
fi
if ! command -v cargo >/dev/null; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# The fuzzers' driver (libFuzzer through cargo-fuzz; scripts/fuzz.sh).
if ! command -v cargo-fuzz >/dev/null; then
  echo "setup: installing cargo-fuzz" >&2
  cargo install -q cargo-fuzz --locked
fi
