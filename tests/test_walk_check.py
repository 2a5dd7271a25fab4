"""The CUDA index walks checked on the host: builds CMake's `batchnorm_cuda_walk_check` target
(csrc/cuda/walk_check.cpp, compiled by the host C++ compiler against the CUDA toolkit's
headers; no GPU needed) from this checkout and runs it. It emulates every block and thread of
the walks over random shapes, axes and strided / transposed / flipped / multi-array layouts
and fails on any element visited other than once, a wrong channel or a misaligned pack.
Skipped, with the reason, where the CUDA toolkit or a C++ compiler is missing."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET = "batchnorm_cuda_walk_check"
pytestmark = pytest.mark.slow  # a CMake configure with CUDA (~20 s) and two C++ files


def cuda_compiler():
    """The nvcc CMake would find (CUDACXX, PATH, the default toolkit folder), or None."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


# The build tools and the host program are not under test: CI's sanitizer run preloads the ASan
# runtime into Python, and it must not reach cmake, nvcc or the compiler.
ENV = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def run(cmd) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, f"{cmd[:3]} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def walk_check() -> Path:
    cmake = shutil.which("cmake")
    assert cmake, "building walk_check needs cmake on PATH (pip install cmake, in the test extra)"
    nvcc = cuda_compiler()
    if nvcc is None:
        pytest.skip("walk_check includes cuda_runtime.h: no CUDA toolkit (nvcc) found (set CUDACXX)")
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no host C++ compiler (c++, g++, clang++ or CXX)")
    # A build folder beside scikit-build-core's: reruns reconfigure and rebuild only what changed.
    build = ROOT / "build" / "walk_check"
    run([cmake, "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={nvcc}",
         "-DBATCHNORM_CUDA=ON", "-DBATCHNORM_PYTHON=OFF", "-DBATCHNORM_JAX=OFF"])
    run([cmake, "--build", build, "--target", TARGET, "--parallel", "2"])
    programs = [p for p in build.rglob(TARGET) if p.is_file() and os.access(p, os.X_OK)]
    assert len(programs) == 1, f"expected one {TARGET} under {build}, found {programs}"
    return programs[0]


def test_cuda_walks_visit_every_element_once(walk_check):
    done = subprocess.run([str(walk_check)], capture_output=True, text=True, timeout=300, env=ENV)
    out = done.stdout
    assert done.returncode == 0, f"walk_check failed ({done.returncode}):\n{out[-4000:]}\n{done.stderr[-2000:]}"
    summary = re.search(r"^(\d+) random layouts, (\d+) failures$", out, re.M)
    assert summary, f"no summary line in walk_check's output:\n{out[-2000:]}"
    assert int(summary.group(2)) == 0
    assert int(summary.group(1)) >= 1000, "too few random layouts were checked"
    # Each walk (channels-first and channels-last, and their packed / split / generic variants)
    # was reached: a walk the random cases never take checks nothing.
    paths = dict((name, int(n)) for name, n in re.findall(r"^([a-z][a-z -]*): (\d+)$", out, re.M))
    assert any(p.startswith("channels-first") for p in paths) and any(p.startswith("channels-last") for p in paths), out
    unreached = [p for p, n in paths.items() if n == 0]
    assert not unreached, f"walks never taken: {unreached}"
