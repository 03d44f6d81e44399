#!/usr/bin/env bash
# Install the Debian/Ubuntu packages dsconv-tvm needs: the host and cross C++ compilers that link the
# exported .so files, qemu-user-static (runs aarch64/armv7 binaries in tests), qemu-user (the
# dynamically linked qemu-aarch64, which loads TCG plugins: tools/arm_count.py counts instructions
# with one), llvm-19 (llvm-mca with a
# Cortex-A76-class (Neoverse N1) scheduling model, for tools/arm_mca.py), the Fashion-MNIST data set, `file` and cmake.  Idempotent: if every package is already installed, apt is not touched.
#
# Usage: sudo tools/install_system_deps.sh      (or as root; uses sudo itself when available)
set -euo pipefail

PACKAGES=(
    g++
    g++-aarch64-linux-gnu
    g++-arm-linux-gnueabihf
    qemu-user-static
    qemu-user
    llvm-19
    dataset-fashion-mnist
    file
    cmake
)

log() { printf 'install_system_deps: %s\n' "$*"; }
die() { printf 'install_system_deps: error: %s\n' "$*" >&2; exit 1; }

command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found; this script supports Debian/Ubuntu only"

installed() {
    # "install ok installed" only; a removed package with leftover config files does not count
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
    log "all packages already installed: ${PACKAGES[*]}"
    exit 0
fi
log "missing packages: ${missing[*]}"

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        die "not running as root and sudo is not available; re-run as root"
    fi
fi

export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
${SUDO[@]+"${SUDO[@]}"} apt-get update
log "apt-get install ${missing[*]}"
${SUDO[@]+"${SUDO[@]}"} apt-get install -y --no-install-recommends "${missing[@]}"

still=()
for pkg in "${missing[@]}"; do
    installed "$pkg" || still+=("$pkg")
done
[ "${#still[@]}" -eq 0 ] || die "still not installed after apt-get: ${still[*]}"
log "done"
