"""The wheel as users get it: tools/build_wheel.sh builds and repairs a CPU-only wheel, which must
carry a manylinux tag, install into a fresh virtual environment, pass the self-check there, load
libbatchnorm and the vendored libgomp from the wheel itself (never the system's) yet share one
OpenMP runtime with a libgomp loaded before it, and serve a C program built against its CMake
package. Slow (a full build): runs with `pytest -m wheel`."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.wheel


def _run(cmd, **kw) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def ctypes_util_finds_gomp() -> bool:
    import ctypes.util

    return ctypes.util.find_library("gomp") is not None


def resolved(elf: Path, name: str) -> list:
    """The real paths ldd resolves the dependencies of `elf` whose name contains `name` to."""
    lines = [line for line in _run(["ldd", elf]).splitlines() if "=>" in line and name in line.split("=>")[0]]
    return [Path(os.path.realpath(line.split("=>")[1].split(" (")[0].strip())) for line in lines]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    # CPU only, with the JAX module (compiled against jax 0.10.2's FFI headers, which pip brings
    # into the isolated build as pyproject's BATCHNORM_JAX=ON override says).
    env = dict(os.environ, BATCHNORM_CUDA="OFF", BATCHNORM_JAX="ON", PYTHON=sys.executable)
    log = _run(["bash", ROOT / "tools" / "build_wheel.sh", out], env=env, cwd=ROOT)
    wheels = list(out.glob("batchnorm-*.whl"))
    assert len(wheels) == 1, log
    return wheels[0]


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    env_dir = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys.executable, "-m", "venv", env_dir])  # no system site-packages: only what the wheel needs
    python = env_dir / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", wheel])
    return env_dir


def test_manylinux_tag_and_vendored_libgomp(wheel):
    assert re.search(r"-manylinux_2_\d+_x86_64\.whl$|-manylinux_2_\d+_aarch64\.whl$", wheel.name), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    # Vendored under its own soname (tools/wheel_libgomp.py), not auditwheel's hashed one.
    assert "batchnorm.libs/libgomp.so.1" in names, names
    assert "batchnorm/lib/libbatchnorm.so.1" in names
    assert "batchnorm/include/batchnorm/batchnorm.h" in names
    assert "batchnorm/lib/cmake/batchnorm/batchnormConfig.cmake" in names
    # One copy of the kernels: the modules link libbatchnorm instead of carrying their own.
    libraries = sorted(n for n in names if n.endswith(".so") or ".so." in n)
    assert len(libraries) == 4 and any("/_jax." in n for n in libraries), libraries  # _C, _jax, libbatchnorm, libgomp


def test_installed_wheel_runs_and_resolves_its_own_libraries(venv):
    python = venv / "bin" / "python"
    out = _run([python, "-c", "import batchnorm; print(batchnorm.__file__)"],
               cwd=venv)  # not the source tree: the installed package
    package = Path(out.strip()).parent
    assert package.is_relative_to(venv), out
    assert "ok" in _run([python, "-m", "batchnorm", "selfcheck"], cwd=venv)
    module, jax_module = next(package.glob("_C*.so")), next(package.glob("_jax*.so"))
    library = package / "lib" / "libbatchnorm.so.1"
    libs = package.parent / "batchnorm.libs"
    # The loader's view: libbatchnorm from the package, libgomp from batchnorm.libs.
    for elf, name, home in ((module, "libbatchnorm.so.1", library.parent),
                            (jax_module, "libbatchnorm.so.1", library.parent), (library, "libgomp", libs)):
        paths = resolved(elf, name)
        assert paths and all(p.parent == home.resolve() for p in paths), f"{elf.name}: {paths}"
    # The JAX module loads (its build check against libbatchnorm passes) without jax installed.
    targets = _run([python, "-c", "import batchnorm._jax as j; print(sorted(j.registrations()))"], cwd=venv)
    assert "batchnorm_forward_training" in targets, targets
    dynamic = _run(["readelf", "-d", library])
    assert re.search(r"NEEDED.*\[libgomp\.so\.1\]", dynamic), dynamic
    assert "$ORIGIN/../../batchnorm.libs" in dynamic, dynamic


# A process that loads another libgomp.so.1 (torch's, here the system's standing in for it)
# before or after batchnorm, then runs an op and the other runtime: both must be one library.
_ONE_RUNTIME = """
import ctypes, ctypes.util, sys
name = ctypes.util.find_library("gomp")
def other():
    ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL).omp_get_max_threads()
if sys.argv[1] == "before":
    other()
import batchnorm, numpy as np
batchnorm.forward_training(np.ones((64, 256), np.float32))
if sys.argv[1] == "after":
    other()
print(sorted({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}))
"""


@pytest.mark.skipif(not ctypes_util_finds_gomp(), reason="no libgomp.so.1 on this system to load beside the wheel's")
@pytest.mark.parametrize("order", ["before", "after"])
def test_one_openmp_runtime_beside_another_libgomp(venv, order):
    """One OpenMP runtime per process: the wheel's libgomp keeps its soname, so the loader
    shares whichever libgomp.so.1 comes first (a hashed copy made two, each with threads
    spinning on the same cores)."""
    python = venv / "bin" / "python"
    mapped = eval(_run([python, "-c", _ONE_RUNTIME, order], cwd=venv))
    assert len(mapped) == 1, mapped
    libs = (venv / "lib").resolve()
    assert (Path(mapped[0]).resolve().is_relative_to(libs)) == (order == "after"), (order, mapped)


def test_c_program_against_the_wheels_cmake_package(venv, tmp_path):
    cmake = shutil.which("cmake")
    assert cmake, "needs cmake on PATH (pip install cmake)"
    cmake_dir = _run([venv / "bin" / "python", "-m", "batchnorm", "--cmake-dir"], cwd=venv).strip()
    assert Path(cmake_dir).is_relative_to(venv)
    build = tmp_path / "build"
    _run([cmake, "-S", ROOT / "tests" / "capi", "-B", build, f"-DCMAKE_PREFIX_PATH={cmake_dir}"])
    _run([cmake, "--build", build, "--target", "capi_c"])
    out = _run([build / "capi_c", "--version"])
    assert out.splitlines()[0].split()[1] == out.splitlines()[1].split()[1]
    paths = resolved(build / "capi_c", "gomp") + resolved(build / "capi_c", "batchnorm")
    assert len(paths) == 2 and all(p.is_relative_to(venv.resolve()) for p in paths), paths
