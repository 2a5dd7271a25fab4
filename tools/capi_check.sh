#!/usr/bin/env bash
# The C library as other builders make it, tested against this machine's Python API: built with
# another toolchain, installed into a prefix, and tests/test_capi.py run against that install,
# which compares every output buffer with the installed Python package's bit for bit (the kernels
# compute the same bits whatever the compiler, ISA level or architecture: -ffp-contract=off, IEEE
# operations in a fixed order).
#   tools/capi_check.sh aarch64 [WORK_DIR]   AArch64 (the aarch64 wheels' library) with Debian's
#                                            cross GCC, its test programs run under QEMU user mode
#   tools/capi_check.sh clang [WORK_DIR]     x86-64 with clang 16 (LLVM's OpenMP), the levels this
#                                            machine runs (BATCHNORM_MAX_ISA=native)
# WORK_DIR defaults to build/capi-<target>. Needs the batchnorm Python package installed, pytest
# and cmake; the compilers come from apt (g++-aarch64-linux-gnu qemu-user; clang-16
# libomp-16-dev), installed with apt-get when missing and allowed (root).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-}"
work="${2:-build/capi-$target}"
need() {  # need COMMAND... -- PACKAGE...: install the packages unless every command is there and
          # (where dpkg says) every package is installed; then the commands must be there
  local commands=() packages=() seen=0 arg c missing=0
  for arg in "$@"; do
    if [ "$arg" = "--" ]; then seen=1; elif [ "$seen" -eq 0 ]; then commands+=("$arg"); else packages+=("$arg"); fi
  done
  for c in "${commands[@]}"; do command -v "$c" > /dev/null || missing=1; done
  if command -v dpkg > /dev/null; then
    for c in "${packages[@]}"; do dpkg -s "$c" > /dev/null 2>&1 || missing=1; done
  fi
  [ "$missing" -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get > /dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${packages[@]}" > /dev/null ||
      { apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends "${packages[@]}" > /dev/null; }
  fi
  for c in "${commands[@]}"; do
    command -v "$c" > /dev/null || { echo "error: needs $c (apt-get install ${packages[*]})" >&2; exit 2; }
  done
}
# (lib/, not lib64/ as GNUInstallDirs picks on some distributions: the tests look in <prefix>/lib.)
configure=(-DCMAKE_BUILD_TYPE=Release -DBATCHNORM_CUDA=OFF -DBATCHNORM_PYTHON=OFF -DBATCHNORM_JAX=OFF
           -DCMAKE_INSTALL_LIBDIR=lib)
launcher="" toolchain=""
case "$target" in
  aarch64)
    need aarch64-linux-gnu-g++ qemu-aarch64 -- g++-aarch64-linux-gnu qemu-user
    toolchain="$PWD/tools/aarch64-linux-gnu.cmake"
    configure+=(-DCMAKE_TOOLCHAIN_FILE="$toolchain")
    launcher="qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
  clang)
    need clang-16 clang++-16 -- clang-16 libomp-16-dev
    export CC=clang-16 CXX=clang++-16
    configure+=(-DBATCHNORM_MAX_ISA=native) ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2 ;;
esac
generator=()
if command -v ninja > /dev/null; then generator=(-G Ninja); fi
mkdir -p "$work"
cmake -S . -B "$work/build" "${generator[@]}" "${configure[@]}" | tee "$work/configure.log"
# OpenMP is optional to the build, not to this check: without it the threads go untested.
grep -q "batchnorm: OpenMP ON" "$work/configure.log" || { echo "error: the $target build has no OpenMP" >&2; exit 1; }
cmake --build "$work/build" --parallel
cmake --install "$work/build" --prefix "$work/prefix" > /dev/null
prefix="$(cd "$work/prefix" && pwd)"
# (The test programs are built with the same compilers: CC / CXX, or the toolchain file.)
BATCHNORM_CAPI_PREFIX="$prefix" BATCHNORM_CAPI_TOOLCHAIN="$toolchain" BATCHNORM_CAPI_LAUNCHER="$launcher" \
  python -m pytest -q -p no:cacheprovider tests/test_capi.py
