"""The build's BATCHNORM_MAX_ISA option (csrc/CMakeLists.txt): which ISA levels' kernel objects a
configure plans, the native probe against the level this machine runs, and the refusals. CMake
configures only (about 2 s each, no compiling of the kernels); the library built so is exercised by
CI's sanitizer stage, which builds native and runs the suite, every BATCHNORM_ISA cap included."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ISA_LEVELS

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # CMake configures (seconds)
CMAKE = shutil.which("cmake")
needs_cmake = pytest.mark.skipif(CMAKE is None, reason="cmake is not on PATH")
X86 = os.uname().machine in ("x86_64", "AMD64", "amd64")


def _configure(build: Path, max_isa: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CMAKE, "-S", str(ROOT), "-B", str(build), "-DBATCHNORM_CUDA=OFF", "-DBATCHNORM_PYTHON=OFF",
         "-DBATCHNORM_JAX=OFF", f"-DBATCHNORM_MAX_ISA={max_isa}"],
        capture_output=True, text=True)


def _planned_levels(build: Path) -> set:
    """The levels whose kernel objects the generated build compiles (one target per level and dtype)."""
    found = set()
    for target in (build / "csrc" / "CMakeFiles").glob("batchnorm_kernels_*.dir"):
        m = re.fullmatch(r"batchnorm_kernels_(?:float16|bfloat16|float32|float64)_(\w+)\.dir", target.name)
        assert m, target.name
        found.add(m.group(1))
    return found


def _reported_levels(result: subprocess.CompletedProcess) -> list:
    m = re.search(r"batchnorm: CPU kernels for ISA levels ([\w, ]+) \(BATCHNORM_MAX_ISA=", result.stdout)
    assert m, result.stdout
    return m.group(1).split(", ")


def _cpuinfo_level() -> str:
    """The highest level this machine runs by the kernel's flags in /proc/cpuinfo (an oracle apart
    from the build's probe; Linux drops the flags of registers the OS does not save)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if not {"avx2", "fma", "f16c", "bmi2"} <= flags:
        return "baseline"
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx2"
    return "avx512_bf16" if "avx512_bf16" in flags else "avx512"


@needs_cmake
def test_max_isa_plans_the_levels_up_to_the_one_named(tmp_path):
    # One build folder reconfigured: each value replaces the last one's plan entirely.
    build = tmp_path / "build"
    r = _configure(build, "all")
    assert r.returncode == 0, r.stderr
    every = _reported_levels(r)
    assert every[0] == "baseline" and every == list(ISA_LEVELS[: len(every)])
    if X86:
        assert every[:3] == ["baseline", "avx2", "avx512"]  # avx512_bf16 where the compiler has it
    assert _planned_levels(build) == set(every)
    for top in every:
        # (a reconfigure of the same folder: the stale targets' folders are cleared so the
        # planned set is this configure's alone)
        for stale in (build / "csrc" / "CMakeFiles").glob("batchnorm_kernels_*.dir"):
            shutil.rmtree(stale)
        r = _configure(build, top)
        assert r.returncode == 0, r.stderr
        expected = every[: every.index(top) + 1]
        assert _reported_levels(r) == expected
        assert _planned_levels(build) == set(expected)


@needs_cmake
@pytest.mark.skipif(not (X86 and Path("/proc/cpuinfo").exists()), reason="reads x86 flags from /proc/cpuinfo")
def test_max_isa_native_builds_what_this_machine_runs(tmp_path):
    every = _reported_levels(_configure(tmp_path / "all", "all"))
    r = _configure(tmp_path / "native", "native")
    assert r.returncode == 0, r.stderr
    levels = _reported_levels(r)
    # Up to the machine's level, or the compiler's top where it cannot build that one.
    top = min(ISA_LEVELS.index(_cpuinfo_level()), len(every) - 1)
    assert levels == list(ISA_LEVELS[: top + 1])
    assert _planned_levels(tmp_path / "native") == set(levels)


@needs_cmake
@pytest.mark.parametrize("value", ["sse4", "AVX2", "", "avx2;avx512"])
def test_max_isa_refuses_what_it_does_not_know(tmp_path, value):
    r = _configure(tmp_path / "build", value)
    assert r.returncode != 0
    message = " ".join(r.stderr.split())
    assert ("BATCHNORM_MAX_ISA must be all, native, baseline, avx2, avx512 or avx512_bf16, "
            f"got '{value}'") in message, r.stderr


@needs_cmake
@pytest.mark.skipif(X86, reason="x86-64 compilers build every level")
def test_max_isa_refuses_a_level_the_compiler_cannot_build(tmp_path):  # pragma: no cover - not x86
    r = _configure(tmp_path / "build", "avx2")
    assert r.returncode != 0
    assert "but this compiler and target build only baseline" in " ".join(r.stderr.split())
