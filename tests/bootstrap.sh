#!/usr/bin/env bash
# Install what netleash needs on a fresh Debian or Ubuntu machine, build it,
# and run either the demo or the whole test suite.
#
#   bash tests/bootstrap.sh demo   # build, then `netleash demo` on the bundled example
#   bash tests/bootstrap.sh test   # build, then every test (the privileged ones too)
#
# Must run as root: enforcement is tested with real packets in network
# namespaces, which needs CAP_NET_ADMIN and CAP_SYS_ADMIN.
set -euo pipefail

usage() { echo "usage: bash tests/bootstrap.sh demo|test" >&2; exit 2; }
[ $# -eq 1 ] || usage
mode=$1
case "$mode" in demo|test) ;; *) usage ;; esac

if [ "$(id -u)" -ne 0 ]; then
    echo "error: run as root (network namespaces and nftables need CAP_NET_ADMIN); try: sudo bash tests/bootstrap.sh $mode" >&2
    exit 2
fi

cd "$(dirname "$0")/.."

# Debian packages: the C libraries nftnl/mnl bind to, nft for `nft -c`
# validation, iproute2 for namespaces, capsh for the no-CAP_NET_ADMIN test,
# runc, podman and busybox for the OCI tests, curl/ca-certificates for rustup.
packages=(build-essential pkg-config libnftnl-dev libmnl-dev nftables iproute2 libcap2-bin
          procps ca-certificates curl runc podman busybox-static)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The Rust build: edition 2024 needs Rust 1.85 or newer. Use the toolchain on
# PATH or in ~/.cargo; install one with rustup only when there is none.
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
rust_ok() {
    command -v cargo >/dev/null 2>&1 || return 1
    local v; v=$(rustc --version | awk '{print $2}')
    [ "$(printf '%s\n1.85.0\n' "$v" | sort -V | head -n1)" = "1.85.0" ]
}
if ! rust_ok; then
    echo "==> installing the Rust toolchain with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    . "$HOME/.cargo/env"
fi

case "$mode" in
    demo)
        cargo build --release --locked
        ./target/release/netleash demo
        ;;
    test)
        # One run: unit tests, the integration binary (golden files, bad-input
        # corpus, `nft -c` validation, privileged end-to-end tests in network
        # namespaces) and doc tests.
        cargo test --locked
        ;;
esac
