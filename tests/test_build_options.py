"""The build's BATCHNORM_MAX_ISA option (csrc/CMakeLists.txt): which ISA levels' kernel objects a
configure plans, the native probe against the level this machine runs, and the refusals. CMake
configures only (about 2 s each, no compiling of the kernels); the library built so is exercised by
CI's sanitizer stage, which builds native and runs the suite, every BATCHNORM_ISA cap included."""
from __future__ import annotations

import json
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


def _configure(build: Path, max_isa: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CMAKE, "-S", str(ROOT), "-B", str(build), "-DBATCHNORM_CUDA=OFF", "-DBATCHNORM_PYTHON=OFF",
         "-DBATCHNORM_JAX=OFF", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", f"-DBATCHNORM_MAX_ISA={max_isa}", *extra],
        capture_output=True, text=True)


def _planned_levels(build: Path) -> set:
    """The levels whose kernel objects the generated build compiles (BN_ISA of each compile of
    cpu/kernels.cpp, one per level and dtype), checked against the top level the dispatcher
    (cpu/isa.cpp) is compiled for: the two must agree, or the library links a table it lacks."""
    commands = json.loads((build / "compile_commands.json").read_text())
    found, top = set(), None
    for entry in commands:
        defines = dict(re.findall(r"-D(BN_\w+)=(\w+)", entry["command"]))
        if entry["file"].endswith("cpu/kernels.cpp"):
            found.add(defines["BN_ISA"])
        elif entry["file"].endswith("cpu/isa.cpp"):
            top = int(defines["BN_TOP_LEVEL"])
    assert top is not None and found == set(ISA_LEVELS[: top + 1]), (top, found)
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
    for top in every:  # the same folder reconfigured: each value replaces the last one's plan
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


@needs_cmake
@pytest.mark.skipif(not X86, reason="the avx512_bf16 check exists on x86-64 only")
def test_max_isa_without_the_compilers_avx512_bf16(tmp_path):
    # The build's check preset to failed, as with a compiler that lacks the intrinsic: the level
    # cannot be asked for, and neither all nor native plans it.
    no_bf16 = "-DBN_HAVE_AVX512BF16=OFF"
    r = _configure(tmp_path / "asked", "avx512_bf16", no_bf16)
    assert r.returncode != 0
    assert ("BATCHNORM_MAX_ISA=avx512_bf16, but this compiler and target build only baseline, avx2, "
            "avx512") in " ".join(r.stderr.split()), r.stderr
    for value in ("all", "native"):
        r = _configure(tmp_path / value, value, no_bf16)
        assert r.returncode == 0, r.stderr
        assert "avx512_bf16" not in _reported_levels(r)
        assert "avx512_bf16" not in _planned_levels(tmp_path / value)
