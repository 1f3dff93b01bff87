# Sourced by the README's commands: installs what a fresh Debian or Ubuntu
# machine lacks, and no more than the command needs.
#   . scripts/setup.sh demo   what building migrate-cli needs: a C toolchain,
#                             pkg-config, cmake and libclang (the RDMA
#                             binding builds a small part of rdma-core with
#                             bindgen), and the Rust toolchain (rustup) when
#                             there is no cargo;
#   . scripts/setup.sh all    all that, and what the tests and the benchmark
#                             need: the SoftRoCE VM (QEMU, a distribution
#                             kernel, rdma-core and its providers, perftest,
#                             busybox-static, virtme-ng from PyPI), iperf3 and
#                             the DejaVu font (the benchmark's ceiling and
#                             plot), nftables (faults between namespaces),
#                             rustfmt, clippy, cargo-nextest and cargo-fuzz.
# (Sourced without arguments, $1 is the caller's: only "demo" counts.)
setup_mode=all
[ "${1:-}" = demo ] && setup_mode=demo
need_pkgs=()
want_pkgs=(build-essential pkg-config cmake libclang-dev)
if ! command -v cargo >/dev/null && [ ! -f "$HOME/.cargo/env" ]; then
  want_pkgs+=(curl ca-certificates)
fi
if [ "$setup_mode" = all ]; then
  # Debian names its kernel image package by architecture, Ubuntu "generic".
  kernel_pkg=linux-image-amd64
  if [ -r /etc/os-release ] && grep -qi '^ID=ubuntu' /etc/os-release; then
    kernel_pkg=linux-image-generic
  fi
  want_pkgs+=(qemu-system-x86 "$kernel_pkg" rdma-core ibverbs-providers ibverbs-utils
              perftest libibverbs-dev librdmacm-dev busybox-static iproute2 curl xz-utils
              iperf3 fonts-dejavu-core nftables python3-pip)
fi
for p in "${want_pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "setup: installing ${need_pkgs[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  [ -f "$HOME/.cargo/env" ] || {
    echo "setup: installing the Rust toolchain (rustup, minimal profile)" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --profile minimal >/dev/null
  }
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "setup: cargo not found after installing rustup" >&2; exit 1; }
if [ "$setup_mode" = all ]; then
  if ! command -v vng >/dev/null; then
    echo "setup: installing virtme-ng" >&2
    python3 -m pip install -q virtme-ng >/dev/null 2>&1 \
      || python3 -m pip install -q --break-system-packages virtme-ng >/dev/null
    hash -r
  fi
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
  # The test command's runner (cargo-nextest: every test its own process,
  # several at once, where cargo test runs one binary at a time): the
  # maintainers' pre-built binary, else from source. Without it the test
  # command falls back to cargo test (the same tests, slower) and says so.
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest" >&2
    curl -LsSf https://get.nexte.st/0.9/linux 2>/dev/null | tar zxf - -C "${CARGO_HOME:-$HOME/.cargo}/bin" 2>/dev/null \
      || cargo install -q cargo-nextest --locked || echo "setup: no cargo-nextest" >&2
  fi
  # The fuzzers' driver (libFuzzer through cargo-fuzz; scripts/fuzz.sh).
  if ! command -v cargo-fuzz >/dev/null; then
    echo "setup: installing cargo-fuzz" >&2
    cargo install -q cargo-fuzz --locked
  fi
fi
unset setup_mode need_pkgs want_pkgs kernel_pkg
