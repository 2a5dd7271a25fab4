#!/usr/bin/env bash
# The C library on AArch64, from this x86-64 machine: built with the cross GCC, installed into a
# prefix, and tests/test_capi.py run against it with its programs under QEMU user mode, which
# compares every output with this machine's Python API bit for bit (the kernels' baseline level
# computes the same bits on any architecture: -ffp-contract=off, IEEE operations in a fixed
# order). The aarch64 wheels of pyproject's cibuildwheel table build this same library.
#   tools/cross_check.sh [WORK_DIR]      (default: build/aarch64; needs the batchnorm Python
#                                         package installed, pytest and cmake)
# Needs g++-aarch64-linux-gnu and qemu-user (apt); installs them with apt-get when missing and
# allowed (root). CMake arguments for the library's configure: CROSS_CMAKE_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-build/aarch64}"
if ! command -v aarch64-linux-gnu-g++ > /dev/null || ! command -v qemu-aarch64 > /dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get > /dev/null; then
    apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user > /dev/null ||
      { apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user > /dev/null; }
  else
    echo "error: needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)" >&2
    exit 2
  fi
fi
toolchain="$PWD/tools/aarch64-linux-gnu.cmake"
# shellcheck disable=SC2086
generator=()
if command -v ninja > /dev/null; then generator=(-G Ninja); fi
cmake -S . -B "$work/build" "${generator[@]}" -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DCMAKE_BUILD_TYPE=Release \
  -DBATCHNORM_CUDA=OFF -DBATCHNORM_PYTHON=OFF -DBATCHNORM_JAX=OFF ${CROSS_CMAKE_ARGS:-}
cmake --build "$work/build" --parallel
cmake --install "$work/build" --prefix "$work/prefix" > /dev/null
prefix="$(cd "$work/prefix" && pwd)"
file -L "$prefix/lib/libbatchnorm.so.1" 2> /dev/null || true
BATCHNORM_CAPI_PREFIX="$prefix" BATCHNORM_CAPI_TOOLCHAIN="$toolchain" \
  BATCHNORM_CAPI_LAUNCHER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
  python -m pytest -q -p no:cacheprovider tests/test_capi.py
