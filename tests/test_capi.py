"""The C ABI from C and C++ hosts: builds tests/capi with CMake against the installed package
(find_package(batchnorm) with `python -m batchnorm --cmake-dir`), runs every op through the C
and the C++ program on contiguous, channels-last and strided (offset, negative stride) layouts,
and compares every buffer, gaps included, with the same call through the Python API, bit for
bit; the fused ops (the *_ex functions, 1.1) also against a float64 reference, and the training
variants (1.2: members appended to the options structs) against the Python API's variants and
the float64 references of test_variants.py. Bad input must return the status and message of the
Python error and change nothing."""
from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pytest

import batchnorm as bn

SOURCES = Path(__file__).parent / "capi"
pytestmark = pytest.mark.slow  # a CMake build of the C and C++ programs first (seconds)
PROGRAMS = ("capi_c", "capi_cxx")
STATUS = {ValueError: 1, TypeError: 2}
N, C, H, W = 4, 3, 5, 6

# A tensor of a case: its whole buffer and the function that takes the op's view of it.
Tensor = Tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]


def c_words(error: Exception) -> str:
    """A Python error's message as the C ABI words it: an array not given is NULL there, not None."""
    return str(error).replace("got None", "got NULL")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


# Another build of the C library (tools/capi_check.sh: AArch64 under QEMU, or clang's): the
# prefix it was installed into (`cmake --install`), the CMake toolchain file that builds the
# programs for it, and the emulator that runs them. Its results are then compared with the
# installed Python package's bit for bit, as that package's own library's are.
CROSS_PREFIX = os.environ.get("BATCHNORM_CAPI_PREFIX", "")
CROSS_TOOLCHAIN = os.environ.get("BATCHNORM_CAPI_TOOLCHAIN", "")
LAUNCHER = shlex.split(os.environ.get("BATCHNORM_CAPI_LAUNCHER", ""))
native_only = pytest.mark.skipif(bool(CROSS_PREFIX), reason="checks that the Python module runs on the "
                                 "installed package's library, not another build's")


def _cmake_dir() -> Path:
    """The installed package's CMake config folder, <pkg>/lib/cmake/batchnorm (or the cross
    build's, <prefix>/lib/cmake/batchnorm)."""
    if CROSS_PREFIX:
        return Path(CROSS_PREFIX) / "lib" / "cmake" / "batchnorm"
    return Path(_run([sys.executable, "-m", "batchnorm", "--cmake-dir"]).stdout.strip())


def _installed_library() -> Path:
    """The installed libbatchnorm.so.1, in <pkg>/lib beside the CMake config."""
    return _cmake_dir().parent.parent / "libbatchnorm.so.1"


def _launch(cmd, **kw) -> subprocess.CompletedProcess:
    """_run of a test program (through the emulator of a cross build)."""
    return _run([*LAUNCHER, *cmd], **kw)


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> Dict[str, Path]:
    cmake = shutil.which("cmake")
    assert cmake, "building the C ABI tests needs cmake on PATH (pip install cmake)"
    cmake_dir = _cmake_dir()
    build = tmp_path_factory.mktemp("capi-build")
    toolchain = [f"-DCMAKE_TOOLCHAIN_FILE={CROSS_TOOLCHAIN}"] if CROSS_TOOLCHAIN else []
    _run([cmake, "-S", SOURCES, "-B", build, f"-DCMAKE_PREFIX_PATH={cmake_dir}", "-DCMAKE_BUILD_TYPE=Release",
          *toolchain])
    _run([cmake, "--build", build])
    return {name: build / name for name in PROGRAMS}


@pytest.fixture(params=PROGRAMS)
def program(request, programs) -> Path:
    return programs[request.param]


# ---- layouts: the logical (N, C, H, W) array as a view of a buffer ----------------------------

def _whole(b: np.ndarray) -> np.ndarray:
    return b


def layout(rng, name: str, dtype=np.float32, fill: Optional[float] = None) -> Tensor:
    """`contiguous` (passed with NULL strides), `channels_last` (NHWC memory), `strided` (every
    other W, channels reversed: a byte offset and a negative stride)."""
    shapes = {"contiguous": (N, C, H, W), "channels_last": (N, H, W, C), "strided": (N, C, H, 2 * W + 1)}
    views = {"contiguous": _whole, "channels_last": lambda b: b.transpose(0, 3, 1, 2),
             "strided": lambda b: b[:, ::-1, :, 1::2]}
    base = rng.standard_normal(shapes[name]) if fill is None else np.full(shapes[name], fill)
    return base.astype(dtype), views[name]


def vector(values) -> Tensor:
    return np.ascontiguousarray(values), _whole


def zeros(n: int = C, dtype=np.float32) -> Tensor:
    return np.full(n, -7.0, dtype), _whole  # a sentinel: outputs must overwrite it


# ---- running a case through a program and through Python --------------------------------------

def run_c(program: Path, tmp: Path, op: str, tensors: Dict[str, Tensor], counts=None, **options):
    """Runs `op` in the program on copies of the buffers; returns (status, count, message,
    the buffers after the call)."""
    lines = [f"op {op}"] + [f"{k} {v}" for k, v in options.items()]
    if counts is not None:
        lines.append(f"counts {len(counts)} " + " ".join(map(str, counts)))
    for name, (base, view_of) in tensors.items():
        path = tmp / f"{name}.bin"
        base.tofile(path)
        view = view_of(base)
        offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        strides = "C" if view_of is _whole else " ".join(str(s // base.itemsize) for s in view.strides)
        lines.append(f"tensor {name} {base.dtype.name} {path} {offset} {view.ndim} "
                     + " ".join(map(str, view.shape)) + f" {strides}")
    case = tmp / "case.txt"
    case.write_text("\n".join(lines) + "\n")
    out = dict(line.split(" ", 1) for line in _launch([program, case]).stdout.splitlines())
    after = {name: np.fromfile(tmp / f"{name}.bin.out", base.dtype).reshape(base.shape)
             for name, (base, _) in tensors.items()}
    return int(out["status"]), int(out["count"]), out["error"], after


def views(tensors: Dict[str, Tensor]) -> Dict[str, np.ndarray]:
    """The op's views of copies of the buffers, for the Python call (which writes into them)."""
    return {name: view_of(base.copy()) for name, (base, view_of) in tensors.items()}


def buffer_of(view: np.ndarray) -> np.ndarray:
    while view.base is not None:
        view = view.base
    return view


def assert_same_buffers(after: Dict[str, np.ndarray], expected: Dict[str, np.ndarray]) -> None:
    for name, got in after.items():
        want = buffer_of(expected[name])
        assert got.tobytes() == want.tobytes(), f"{name} differs from the Python API's result"


ACTIVATIONS = {0: None, 1: "relu"}  # bn_activation -> the Python API's activation


def python_op(op: str, v: Dict[str, np.ndarray], axis=1, eps=1e-5, momentum=0.1, counts=None,
              activation=0, **ex_options) -> Optional[int]:
    """The same op through the Python API on the views `v`, its results stored into them. The
    *_ex ops are the plain ones with their options (`options null` is every default)."""
    get = v.get
    act = ACTIVATIONS[activation]
    ghost = int(ex_options.get("ghost_batch", 0)) or None
    if op == "forward_training_ex":
        renorm = tuple(map(float, ex_options["renorm"].split())) if "renorm" in ex_options else None
        out = bn.forward_training(v["x"], get("weight"), get("bias"), running_mean=get("running_mean"),
                                  running_var=get("running_var"), momentum=momentum, eps=eps, axis=axis, out=v["y"],
                                  residual=get("residual"), activation=act,
                                  running_var_unbiased=not ex_options.get("running_var_biased", 0),
                                  skip_nonfinite=bool(ex_options.get("skip_nonfinite", 0)), ghost_batch=ghost,
                                  renorm=renorm)
        v["saved_mean"][...], v["saved_invstd"][...] = out[1], out[2]
        if renorm is not None:
            v["renorm_r"][...], v["renorm_d"][...] = out[3], out[4]
        return None
    if op == "forward_inference_ex":
        bn.forward_inference(v["x"], v["mean"], v["var"], get("weight"), get("bias"), eps=eps, axis=axis, out=v["y"],
                             residual=get("residual"), activation=act)
        return None
    if op == "backward_ex":
        renorm = (v["renorm_r"], v["renorm_d"]) if "renorm_r" in v else None
        r = bn.backward(v["dy"], v["x"], v["saved_mean"], v["saved_invstd"], get("weight"), axis=axis, out=v["dx"],
                        y=get("y"), activation=act, residual="dresidual" in v, renorm=renorm, ghost_batch=ghost)
        v["dweight"][...], v["dbias"][...] = r[1], r[2]
        if "dresidual" in v:
            v["dresidual"][...] = r[3]
        return None
    if op == "statistics":
        mean, var, count = bn.statistics(v["x"], axis=axis)
        v["mean"][...], v["var"][...] = mean, var
        return count
    if op == "merge_statistics":
        k = len(counts)
        mean, var, count = bn.merge_statistics([v[f"means{i}"] for i in range(k)], [v[f"vars{i}"] for i in range(k)],
                                               counts)
        v["mean"][...], v["var"][...] = mean, var
        return count
    if op == "forward_training":
        _, sm, si = bn.forward_training(v["x"], get("weight"), get("bias"), running_mean=get("running_mean"),
                                        running_var=get("running_var"), momentum=momentum, eps=eps, axis=axis,
                                        out=v["y"])
        v["saved_mean"][...], v["saved_invstd"][...] = sm, si
    elif op == "forward_inference":
        bn.forward_inference(v["x"], v["mean"], v["var"], get("weight"), get("bias"), eps=eps, axis=axis, out=v["y"])
    elif op == "backward":
        _, dw, db = bn.backward(v["dy"], v["x"], v["saved_mean"], v["saved_invstd"], get("weight"), axis=axis,
                                out=v["dx"])
        v["dweight"][...], v["dbias"][...] = dw, db
    elif op == "fold":
        k, b = bn.fold(v["kernel"], get("conv_bias"), v["mean"], v["var"], get("weight"), get("bias"), eps=eps,
                       axis=axis)
        v["kernel_out"][...], v["bias_out"][...] = k, b
    return None


def check_same_as_python(program, tmp, op, tensors, counts=None, **options) -> None:
    status, count, message, after = run_c(program, tmp, op, tensors, counts=counts, **options)
    assert (status, message) == (0, ""), f"{op} failed in C: {message}"
    v = views(tensors)
    want_count = python_op(op, v, counts=counts, **options)
    if want_count is not None:
        assert count == want_count
    assert_same_buffers(after, v)


def params(rng, dtype=np.float32) -> Dict[str, Tensor]:
    return {"weight": vector(rng.uniform(0.5, 2, C).astype(dtype)),
            "bias": vector(rng.standard_normal(C).astype(dtype))}


def acc(dtype) -> type:
    return np.float64 if dtype == np.float64 else np.float32


# ---- every op on every layout -------------------------------------------------------------

LAYOUTS = ("contiguous", "channels_last", "strided")


@pytest.mark.parametrize("name", LAYOUTS)
def test_statistics(program, tmp_path, rng, name):
    check_same_as_python(program, tmp_path, "statistics", {"x": layout(rng, name), "mean": zeros(), "var": zeros()},
                         axis=1)


@pytest.mark.parametrize("name", LAYOUTS)
def test_forward_training(program, tmp_path, rng, name):
    tensors = {"x": layout(rng, name), **params(rng), "running_mean": vector(rng.standard_normal(C)),
               "running_var": vector(rng.uniform(0.5, 2, C)), "y": layout(rng, name, fill=7.0),
               "saved_mean": zeros(), "saved_invstd": zeros()}
    check_same_as_python(program, tmp_path, "forward_training", tensors, axis=1, eps=1e-3, momentum=0.25)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_forward_training_dtypes(program, tmp_path, rng, dtype):
    tensors = {"x": layout(rng, "channels_last", dtype), **params(rng, dtype), "y": layout(rng, "strided", dtype, 7.0),
               "saved_mean": zeros(dtype=acc(dtype)), "saved_invstd": zeros(dtype=acc(dtype))}
    check_same_as_python(program, tmp_path, "forward_training", tensors, axis=1)


@pytest.mark.parametrize("name", LAYOUTS)
def test_forward_inference(program, tmp_path, rng, name):
    tensors = {"x": layout(rng, name), "mean": vector(rng.standard_normal(C)), "var": vector(rng.uniform(0.5, 2, C)),
               **params(rng), "y": layout(rng, name, fill=7.0)}
    check_same_as_python(program, tmp_path, "forward_inference", tensors, axis=1, eps=1e-4)


@pytest.mark.parametrize("name", LAYOUTS)
def test_backward(program, tmp_path, rng, name):
    x = layout(rng, name)
    _, sm, si = bn.forward_training(x[1](x[0]))
    tensors = {"dy": layout(rng, name), "x": x, "saved_mean": vector(sm), "saved_invstd": vector(si),
               "weight": params(rng)["weight"], "dx": layout(rng, name, fill=7.0), "dweight": zeros(),
               "dbias": zeros()}
    check_same_as_python(program, tmp_path, "backward", tensors, axis=1)


def test_merge_statistics(program, tmp_path, rng):
    counts = [40, 0, 17]  # a shard with no values is ignored
    tensors = {}
    for i in range(len(counts)):
        tensors[f"means{i}"] = vector(rng.standard_normal(C).astype(np.float32))
        tensors[f"vars{i}"] = vector(rng.uniform(0.5, 2, C).astype(np.float32))
    tensors.update(mean=zeros(), var=zeros())
    check_same_as_python(program, tmp_path, "merge_statistics", tensors, counts=counts)


@pytest.mark.parametrize("axis", [0, 1])
def test_fold(program, tmp_path, rng, axis):
    # axis 0: a Conv kernel (C, I, kh, kw), contiguous; axis 1: a ConvTranspose kernel (I, C, kh,
    # kw) held transposed in memory, and a strided output.
    if axis == 0:
        kernel = (rng.standard_normal((C, 2, 3, 3)).astype(np.float32), _whole)
        out = (np.full((C, 2, 3, 3), 7.0, np.float32), _whole)
    else:
        kernel = (rng.standard_normal((3, 3, C, 2)).astype(np.float32), lambda b: b.transpose(3, 2, 0, 1))
        out = (np.full((2, C, 3, 6), 7.0, np.float32), lambda b: b[:, :, :, ::2])
    tensors = {"kernel": kernel, "conv_bias": vector(rng.standard_normal(C).astype(np.float32)),
               "mean": vector(rng.standard_normal(C)), "var": vector(rng.uniform(0.5, 2, C)), **params(rng),
               "kernel_out": out, "bias_out": zeros()}
    check_same_as_python(program, tmp_path, "fold", tensors, axis=axis, eps=1e-3)


# ---- bad input: the Python error's status and words, nothing written --------------------------

def training_tensors(rng) -> Dict[str, Tensor]:
    return {"x": layout(rng, "contiguous"), **params(rng), "running_mean": vector(rng.standard_normal(C)),
            "running_var": vector(rng.uniform(0.5, 2, C)), "y": layout(rng, "contiguous", fill=7.0),
            "saved_mean": zeros(), "saved_invstd": zeros()}


def bad_shape(rng):
    t = training_tensors(rng)
    t["weight"] = vector(np.ones(C + 1, np.float32))
    return "forward_training", t


def bad_dtype(rng):
    return "statistics", {"x": (np.ones((N, C, H), np.int32), _whole), "mean": zeros(), "var": zeros()}


def bad_dy_dtype(rng):
    x = layout(rng, "channels_last")
    return "backward", {"dy": layout(rng, "channels_last", np.float64), "x": x, "saved_mean": zeros(),
                        "saved_invstd": zeros(), "dx": layout(rng, "channels_last", fill=7.0), "dweight": zeros(),
                        "dbias": zeros()}


def bad_running_var(rng):
    t = training_tensors(rng)
    del t["running_var"]  # running_mean without running_var
    return "forward_training", t


def missing_mean(rng):
    return "forward_inference", {"x": layout(rng, "strided"), "var": vector(np.ones(C)),
                                 "y": layout(rng, "strided", fill=7.0)}


def missing_x(rng):
    t = training_tensors(rng)
    del t["x"]
    return "forward_training", t


@pytest.mark.parametrize("make", [bad_shape, bad_dtype, bad_dy_dtype, bad_running_var],
                         ids=lambda f: f.__name__)
def test_bad_input_as_python(program, tmp_path, rng, make):
    op, tensors = make(rng)
    status, _, message, after = run_c(program, tmp_path, op, tensors)
    with pytest.raises((ValueError, TypeError)) as python:
        python_op(op, views(tensors))
    assert (status, message) == (STATUS[python.type], c_words(python.value))
    for name, (base, _) in tensors.items():
        assert after[name].tobytes() == base.tobytes(), f"a failed call wrote into {name}"


def missing_out(rng):
    t = training_tensors(rng)
    del t["y"]
    return "forward_training", t


@pytest.mark.parametrize("make, message", [(missing_mean, "mean must be an array, got NULL"),
                                           (missing_x, "x must be an array, got NULL"),
                                           (missing_out, "out must be an array, got NULL")], ids=["mean", "x", "out"])
def test_null_required_array(program, tmp_path, rng, make, message):
    op, tensors = make(rng)
    status, _, got, after = run_c(program, tmp_path, op, tensors)
    assert (status, got) == (STATUS[TypeError], message)
    for name, (base, _) in tensors.items():
        assert after[name].tobytes() == base.tobytes(), f"a failed call wrote into {name}"


def test_cuda_tensor_without_a_gpu(program, tmp_path, rng):
    """A kDLCUDA tensor reaches the core's device routing: without a GPU (or without the CUDA
    backend) the call fails as the Python API would, naming x's device, before any access."""
    cuda = bn.info()["cuda"]
    if cuda["available"]:
        pytest.skip("a usable GPU would be handed host memory as device memory")
    compiled = cuda["compiled"]
    if CROSS_PREFIX:  # the tested build's own answer, from its CMake package (not the module's build)
        config = (_cmake_dir() / "batchnormConfig.cmake").read_text()
        compiled = re.search(r"set\(batchnorm_WITH_CUDA (\w+)\)", config).group(1).upper() in ("ON", "TRUE", "1")
        if compiled:
            pytest.skip("another build with CUDA: its reason for CUDA being unavailable is its own")
    tensors = training_tensors(rng)
    status, _, message, after = run_c(program, tmp_path, "forward_training", tensors, device="cuda")
    if compiled:
        assert (status, message) == (3, f"x is on cuda:0 but CUDA is unavailable: {cuda['reason']}")
    else:
        assert status == 2 and message.startswith("x is on cuda:0 but this build of batchnorm has no CUDA backend")
    for name, (base, _) in tensors.items():
        assert after[name].tobytes() == base.tobytes(), f"a failed call wrote into {name}"


# ---- versions and per-thread errors ---------------------------------------------------------

def test_version(program):
    out = dict(line.split() for line in _launch([program, "--version"]).stdout.splitlines())
    assert out["header"] == out["library"] and int(out["library"]) >= 10200  # 1.2: the training variants


def test_readme_example_builds_and_runs(tmp_path):
    """The README's "Use from C/C++" example as a user copies it: its CMakeLists.txt, app.c
    and build command, verbatim (app.c had no main, and the command failed to link)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Use from C/C++"):readme.index("## Wheels")]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    (tmp_path / "CMakeLists.txt").write_text(blocks[0][1])
    (tmp_path / "app.c").write_text(blocks[1][1])
    command = blocks[2][1]
    assert [blocks[0][0], blocks[1][0], blocks[2][0]] == ["cmake", "c", "bash"] and "./build/app" in command
    if CROSS_PREFIX:  # another build: its prefix and toolchain, the program through the emulator
        toolchain = f" -DCMAKE_TOOLCHAIN_FILE={shlex.quote(CROSS_TOOLCHAIN)}" if CROSS_TOOLCHAIN else ""
        command = command.replace('-DCMAKE_PREFIX_PATH="$(python -m batchnorm --cmake-dir)"',
                                  f"-DCMAKE_PREFIX_PATH={shlex.quote(str(_cmake_dir()))}{toolchain}")
        assert "--cmake-dir" not in command
        command = command.replace("./build/app", shlex.join([*LAUNCHER, "./build/app"]))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = _run(["bash", "-ec", command], cwd=tmp_path, env=env).stdout
    assert re.search(r"channel 0: mean -?[0-9.e+-]+, invstd [0-9.e+-]+", out), out


def test_last_error_is_per_thread(programs):
    out = _launch([programs["capi_cxx"], "--threads"]).stdout.splitlines()
    assert out == ["first 1 n must be an int >= 1, got 0", "second 0 "]


def test_ab_lib_times_two_copies_of_the_library(programs, tmp_path):
    """tools/ab_lib.c (built with the test programs) loads two copies of the installed library,
    each under its own settings, and times every op on both; with AB_BITS=1 it then compares
    their outputs byte for byte, which the machine's ISA level against the baseline level with
    every output streamed must leave the same. A setting the library refuses is its error, on
    stderr, with status 1 (an unknown BATCHNORM_ISA too: it used to pick a level)."""
    ab = programs["capi_c"].parent / "ab_lib"
    libs = [tmp_path / name for name in ("a.so", "b.so")]
    for lib in libs:
        shutil.copy(_installed_library(), lib)
    line = re.compile(r"^(\w+) +(\S+) +(\w+) (\w+) +T=(\d) +A ([\d.]+) ms +B ([\d.]+) ms +B/A ([\d.]+)( .*)?$")
    # Shapes that take the statistics' prefetching walks too: NCHW rows of 4 KB or more
    # (2x3x40x40), a channels-last run and its next (80x40x40x16 NHWC, 25600 positions); the
    # maps' page touches: (N, C) ops of 8 MB or more on the flat walk (2048x1040, 4096x512 with a
    # residual; on huge pages too, AB_THP; half types streamed, 32768x128, which B's settings
    # take flat on any host; 16 bytes past a line, AB_OFFSET), short planes streamed in tiles
    # (16x64x7x7).
    cases = [("stats", "4x3x5x6", "cl", "f32", 0, 0), ("train", "4x3x5x6", "cf", "bf16", 0, 0),
             ("inf", "64x32", "cf", "f16", 0, 0), ("bwd", "4x3x5x6", "cl", "f32", 0, 0),
             ("copy", "64x32", "cf", "f32", 0, 0), ("train", "2x3x40x40", "cf", "f32", 0, 0),
             ("stats", "80x16x40x40", "cl", "f16", 0, 0), ("fbwd", "4x8x9x9", "cf", "bf16", 0, 0),
             ("ftrain", "3x5x33x35", "cl", "f32", 0, 0), ("finf", "64x32", "cf", "f32", 0, 0),
             ("inf", "2048x1040", "cf", "f32", 0, 0), ("finf", "4096x512", "cf", "f32", 1, 0),
             ("inf", "16x64x7x7", "cf", "bf16", 0, 0), ("inf", "32768x128", "cf", "f16", 0, 0),
             ("bwd", "8192x512", "cf", "f32", 1, 16)]
    for op, shape, lay, dtype, thp, offset in cases:
        out = _launch([ab, libs[0], "-", libs[1], "baseline,BATCHNORM_STREAM_BYTES=0", op, shape, lay, dtype, 2, 3, 0],
                   env={**os.environ, "AB_BITS": "1", "AB_THP": str(thp), "AB_OFFSET": str(offset)}).stdout.strip()
        m = line.match(out)
        assert m and m.group(1, 2, 3, 4, 5) == (op, shape, lay, dtype, "2"), out
        assert float(m.group(8)) > 0
        assert m.group(9) == "  bits same", out
    # tools/ab_both.sh: each case in both orders, a line of the two new/old ratios and the bits
    # (the script runs ab_lib itself: natively only).
    if not LAUNCHER:
        both = SOURCES.parent.parent / "tools" / "ab_both.sh"
        cases = ["inf:64x32:cf:f32:1:0", "bwd:4x3x5x6:cl:bf16:2:0:-:baseline,BATCHNORM_STREAM_BYTES=0"]
        out = _run(["bash", both, ab, libs[0], libs[1], 3] + cases, env={**os.environ, "AB_BITS": "1"}).stdout
        pair = re.compile(r"^(\S+)  new/old ([\d.]+) \(new as B\), ([\d.]+) \(new as A\) bits same$")
        got = [pair.match(text) for text in out.strip().splitlines()]
        assert [m and m.group(1) for m in got] == cases, out
        assert all(float(m.group(2)) > 0 and float(m.group(3)) > 0 for m in got), out
    # A C host runs no import-time check: a bad setting is the first CPU op's ValueError.
    for setting, words in [("BATCHNORM_STREAM_BYTES=lots", "BATCHNORM_STREAM_BYTES must be a byte count (an "
                            "integer >= 0), got 'lots'"),
                           ("sse4", "BATCHNORM_ISA must be one of baseline, avx2, avx512, avx512_bf16 (or unset), "
                            "got 'sse4'")]:
        bad = subprocess.run([*LAUNCHER] + [str(c) for c in (ab, libs[0], "-", libs[1], setting, "inf", "8x4", "cf", "f32", 1, 3,
                                               0)], capture_output=True, text=True)
        assert (bad.returncode, bad.stdout, bad.stderr) == (1, "", f"ab_lib: library B: {words}\n")


@native_only
def test_python_module_runs_on_the_same_library(restore_threads):
    """One copy of the kernels: the module's thread setting is libbatchnorm's (the library the
    CMake package points at, loaded once by the module)."""
    lib = ctypes.CDLL(str(_installed_library()))
    for n in (1, 3):
        bn.set_num_threads(n)
        assert lib.bn_get_num_threads() == n
    assert lib.bn_set_num_threads(2) == 0 and bn.get_num_threads() == 2



# ---- the fused ops (1.1): bn_forward_training_ex, bn_forward_inference_ex, bn_backward_ex ------

def _c(v: np.ndarray, axis: int = 1) -> np.ndarray:
    """A (C,) vector shaped to broadcast along axis 1 of (N, C, H, W)."""
    return np.asarray(v, np.float64).reshape(1, -1, 1, 1)


def reference_forward(x, w, b, r, relu, eps):
    """act(bn(x) + r) in float64 with the batch statistics."""
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(x.var(axis=(0, 2, 3)) + eps)
    y = (x - _c(mean)) * _c(invstd) * _c(w) + _c(b)
    if r is not None:
        y = y + r.astype(np.float64)
    return (np.maximum(y, 0) if relu else y), mean, invstd


def reference_backward(dy, x, y, mean, invstd, w, relu):
    """The gradients of act(bn(x) + r) in float64: g = dy through the ReLU (the residual's
    gradient), then plain batch norm's backward of g."""
    g = np.where(y > 0, dy, 0).astype(np.float64) if relu else dy.astype(np.float64)
    x_hat = (x.astype(np.float64) - _c(mean)) * _c(invstd)
    dbias, dweight = g.sum(axis=(0, 2, 3)), (g * x_hat).sum(axis=(0, 2, 3))
    n = x.size // x.shape[1]
    dx = _c(np.asarray(w, np.float64) * invstd) * (g - _c(dbias / n) - x_hat * _c(dweight / n))
    return dx, dweight, dbias, g


def _tolerance(dtype) -> Dict[str, float]:
    return {np.float16: dict(rtol=2e-3, atol=4e-3), np.float32: dict(rtol=1e-5, atol=2e-5),
            np.float64: dict(rtol=1e-12, atol=1e-12)}[dtype]


FUSIONS = [(True, 1), (True, 0), (False, 1)]  # (residual, activation)


@pytest.mark.parametrize("residual, activation", FUSIONS, ids=["add_relu", "add", "relu"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_fused_forward_training(program, tmp_path, rng, name, residual, activation):
    tensors = {"x": layout(rng, name), **params(rng), "running_mean": vector(rng.standard_normal(C)),
               "running_var": vector(rng.uniform(0.5, 2, C)), "y": layout(rng, name, fill=7.0),
               "saved_mean": zeros(), "saved_invstd": zeros()}
    if residual:  # laid out unlike x: the residual takes any strides
        tensors["residual"] = layout(rng, LAYOUTS[(LAYOUTS.index(name) + 1) % 3])
    check_same_as_python(program, tmp_path, "forward_training_ex", tensors, axis=1, eps=1e-3, momentum=0.25,
                         activation=activation)
    status, _, _, after = run_c(program, tmp_path, "forward_training_ex", tensors, eps=1e-3, activation=activation)
    v = {k: view_of(after[k]) for k, (_, view_of) in tensors.items()}
    r = v["residual"] if residual else None
    want, mean, invstd = reference_forward(v["x"], v["weight"], v["bias"], r, activation == 1, 1e-3)
    assert status == 0
    np.testing.assert_allclose(v["y"], want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(v["saved_mean"], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v["saved_invstd"], invstd, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_fused_forward_training_dtypes(program, tmp_path, rng, dtype):
    tensors = {"x": layout(rng, "channels_last", dtype), **params(rng, dtype),
               "residual": layout(rng, "strided", dtype), "y": layout(rng, "strided", dtype, 7.0),
               "saved_mean": zeros(dtype=acc(dtype)), "saved_invstd": zeros(dtype=acc(dtype))}
    check_same_as_python(program, tmp_path, "forward_training_ex", tensors, axis=1, activation=1)
    _, _, _, after = run_c(program, tmp_path, "forward_training_ex", tensors, activation=1)
    v = {k: view_of(after[k]) for k, (_, view_of) in tensors.items()}
    want, _, _ = reference_forward(v["x"], v["weight"], v["bias"], v["residual"], True, 1e-5)
    np.testing.assert_allclose(v["y"].astype(np.float64), want, **_tolerance(dtype))


@pytest.mark.parametrize("residual, activation", FUSIONS, ids=["add_relu", "add", "relu"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_fused_forward_inference(program, tmp_path, rng, name, residual, activation):
    tensors = {"x": layout(rng, name), "mean": vector(rng.standard_normal(C)), "var": vector(rng.uniform(0.5, 2, C)),
               **params(rng), "y": layout(rng, name, fill=7.0)}
    if residual:
        tensors["residual"] = layout(rng, name)
    check_same_as_python(program, tmp_path, "forward_inference_ex", tensors, axis=1, eps=1e-4, activation=activation)
    _, _, _, after = run_c(program, tmp_path, "forward_inference_ex", tensors, eps=1e-4, activation=activation)
    v = {k: view_of(after[k]) for k, (_, view_of) in tensors.items()}
    want = (v["x"] - _c(v["mean"])) / np.sqrt(_c(v["var"]) + 1e-4) * _c(v["weight"]) + _c(v["bias"])
    if residual:
        want = want + v["residual"]
    np.testing.assert_allclose(v["y"], np.maximum(want, 0) if activation else want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("residual, activation", FUSIONS, ids=["add_relu", "add", "relu"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_fused_backward(program, tmp_path, rng, name, residual, activation):
    x, w = layout(rng, name), params(rng)["weight"]
    r = rng.standard_normal((N, C, H, W)).astype(np.float32) if residual else None
    y, sm, si = bn.forward_training(x[1](x[0]), w[0], residual=r, activation=ACTIVATIONS[activation])
    tensors = {"dy": layout(rng, name), "x": x, "saved_mean": vector(sm), "saved_invstd": vector(si), "weight": w,
               "dx": layout(rng, name, fill=7.0), "dweight": zeros(), "dbias": zeros()}
    if activation:
        tensors["y"] = vector(y)
    if residual:
        tensors["dresidual"] = layout(rng, name, fill=7.0)
    check_same_as_python(program, tmp_path, "backward_ex", tensors, axis=1, activation=activation)
    _, _, _, after = run_c(program, tmp_path, "backward_ex", tensors, activation=activation)
    v = {k: view_of(after[k]) for k, (_, view_of) in tensors.items()}
    dx, dweight, dbias, g = reference_backward(v["dy"], v["x"], y, sm, si, w[0], activation == 1)
    np.testing.assert_allclose(v["dx"], dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v["dweight"], dweight, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v["dbias"], dbias, rtol=1e-4, atol=1e-4)
    if residual:
        np.testing.assert_array_equal(v["dresidual"], g.astype(np.float32))


def test_fused_backward_without_dresidual(program, tmp_path, rng):
    """ReLU without dresidual_out: the masked gradient is staged in out (dx), same bits."""
    x = layout(rng, "channels_last")
    y, sm, si = bn.forward_training(x[1](x[0]), residual=np.ones(x[1](x[0]).shape, np.float32), activation="relu")
    tensors = {"dy": layout(rng, "channels_last"), "x": x, "saved_mean": vector(sm), "saved_invstd": vector(si),
               "y": vector(y), "dx": layout(rng, "strided", fill=7.0), "dweight": zeros(), "dbias": zeros()}
    check_same_as_python(program, tmp_path, "backward_ex", tensors, axis=1, activation=1)


def plain_training(rng) -> Dict[str, Tensor]:
    return {"x": layout(rng, "strided"), **params(rng), "running_mean": vector(rng.standard_normal(C)),
            "running_var": vector(rng.uniform(0.5, 2, C)), "y": layout(rng, "contiguous", fill=7.0),
            "saved_mean": zeros(), "saved_invstd": zeros()}


@pytest.mark.parametrize("options", [{"options": "null"}, {}, {"options_extra": 0}],
                         ids=["null", "init", "newer_caller_defaults"])
def test_default_options_are_the_plain_op(program, tmp_path, rng, options):
    """NULL options, BN_TRAINING_OPTIONS_INIT, and a newer header's larger struct whose unknown
    members are zero (their defaults) all give the plain op's bits."""
    tensors = plain_training(rng)
    _, _, _, plain = run_c(program, tmp_path, "forward_training", tensors)
    status, _, message, ex = run_c(program, tmp_path, "forward_training_ex", tensors, **options)
    assert (status, message) == (0, "")
    for name in tensors:
        assert ex[name].tobytes() == plain[name].tobytes(), name


# Each *_ex op's options struct: its type, its initializer, its size in 1.1 (the least a
# caller passes) and in 1.2, from the members as ctypes lays them out (the C compiler's ABI).
_SIZE, _PTR, _I32, _I64, _F64 = (ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64,
                                 ctypes.c_double)


def _sizeof(*members) -> int:
    fields = [(f"m{i}", t) for i, t in enumerate(members)]
    return ctypes.sizeof(type("S", (ctypes.Structure,), {"_fields_": fields}))


_TRAINING_11 = (_SIZE, _PTR, _I32, _I32)  # struct_size, residual, activation, reserved0
_BACKWARD_11 = (_SIZE, _PTR, _PTR, _I32, _I32)  # struct_size, y, dresidual_out, activation, reserved0
OPTIONS = {
    "forward_training_ex": ("bn_training_options", "BN_TRAINING_OPTIONS_INIT", _sizeof(*_TRAINING_11),
                            # running_var_biased, skip_nonfinite, ghost_batch, rmax, dmax, r_out, d_out
                            _sizeof(*_TRAINING_11, _I32, _I32, _I64, _F64, _F64, _PTR, _PTR)),
    "forward_inference_ex": ("bn_inference_options", "BN_INFERENCE_OPTIONS_INIT", _sizeof(_SIZE, _PTR, _I32, _I32),
                             _sizeof(_SIZE, _PTR, _I32, _I32)),
    "backward_ex": ("bn_backward_options", "BN_BACKWARD_OPTIONS_INIT", _sizeof(*_BACKWARD_11),
                    _sizeof(*_BACKWARD_11, _PTR, _PTR, _I64)),  # + renorm_r, renorm_d, ghost_batch
}


def _case(op, rng) -> Dict[str, Tensor]:
    if op == "forward_training_ex":
        return plain_training(rng)
    if op == "forward_inference_ex":
        return {"x": layout(rng, "contiguous"), "mean": zeros(), "var": vector(np.ones(C, np.float32)),
                "y": layout(rng, "contiguous", fill=7.0)}
    x = layout(rng, "contiguous")
    return {"dy": layout(rng, "contiguous"), "x": x, "saved_mean": zeros(), "saved_invstd": zeros(),
            "dx": layout(rng, "contiguous", fill=7.0), "dweight": zeros(), "dbias": zeros()}


def _fails_cleanly(program, tmp_path, op, tensors, **options) -> Tuple[int, str]:
    status, _, message, after = run_c(program, tmp_path, op, tensors, **options)
    for name, (base, _) in tensors.items():
        assert after[name].tobytes() == base.tobytes(), f"a failed call wrote into {name}"
    return status, message


@pytest.mark.parametrize("op", list(OPTIONS))
def test_bad_options(program, tmp_path, rng, op):
    """An uninitialized struct_size, a newer caller's non-default members, a reserved member or
    an unknown activation: BN_ERROR_VALUE naming the problem, nothing written."""
    type_name, init, first, size = OPTIONS[op]
    tensors = _case(op, rng)
    status, message = _fails_cleanly(program, tmp_path, op, tensors, options_size=0)
    assert (status, message) == (1, f"options->struct_size must be sizeof({type_name}) ({size} in batchnorm 1.2; "
                                    f"at least {first}), got 0: initialize the options with {init}")
    status, message = _fails_cleanly(program, tmp_path, op, tensors, options_extra=1)
    assert status == 1 and message.startswith(f"options ({type_name}, struct_size ") and message.endswith(
        "does not know: the program needs a newer libbatchnorm")
    status, message = _fails_cleanly(program, tmp_path, op, tensors, reserved=3)
    assert (status, message) == (1, "options->reserved0 must be 0, got 3")
    status, message = _fails_cleanly(program, tmp_path, op, tensors, activation=7)
    assert (status, message) == (1, "activation must be None or 'relu', got code 7")


def residual_shape(rng):
    t = plain_training(rng)
    t["residual"] = (np.zeros((N, C, H, W + 1), np.float32), _whole)
    return "forward_training_ex", t


def residual_dtype(rng):
    t = _case("forward_inference_ex", rng)
    t["residual"] = (np.zeros((N, C, H, W)), _whole)
    return "forward_inference_ex", t


def relu_without_y(rng):
    return "backward_ex", _case("backward_ex", rng)


def y_without_relu(rng):
    t = _case("backward_ex", rng)
    t["y"] = layout(rng, "contiguous")
    return "backward_ex", t


@pytest.mark.parametrize("make, activation", [(residual_shape, 1), (residual_dtype, 0), (relu_without_y, 1),
                                              (y_without_relu, 0)], ids=lambda f: getattr(f, "__name__", str(f)))
def test_bad_fused_input_as_python(program, tmp_path, rng, make, activation):
    op, tensors = make(rng)
    status, message = _fails_cleanly(program, tmp_path, op, tensors, activation=activation)
    with pytest.raises((ValueError, TypeError)) as python:
        python_op(op, views(tensors), activation=activation)
    assert (status, message) == (STATUS[python.type], c_words(python.value))


def test_symbol_versions(programs):
    """The 1.0 functions keep their version node; the 1.1 ones carry BATCHNORM_1.1, which a
    program calling them requires of the library it loads."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    symbols = _run([readelf, "--dyn-syms", "-W", _installed_library()]).stdout
    exported = dict(line.split()[7].split("@@") for line in symbols.splitlines()
                    if len(line.split()) >= 8 and line.split()[7].startswith("bn_") and "@@" in line.split()[7])
    public = {k: v for k, v in exported.items() if not k.startswith("bn_detail_")}
    ex = {"bn_forward_training_ex", "bn_forward_inference_ex", "bn_backward_ex"}
    assert {k for k, v in public.items() if v == "BATCHNORM_1.1"} == ex
    assert {k for k, v in public.items() if v == "BATCHNORM_1.0"} == {
        "bn_version", "bn_last_error", "bn_statistics", "bn_merge_statistics", "bn_forward_training",
        "bn_forward_inference", "bn_backward", "bn_fold", "bn_set_num_threads", "bn_get_num_threads"}
    needs = _run([readelf, "-V", "-W", programs["capi_c"]]).stdout
    assert "Name: BATCHNORM_1.1" in needs


# ---- the training variants (1.2): members appended to the options structs ----------------------

def _variant_training(rng, name="strided", dtype=np.float32) -> Dict[str, Tensor]:
    """A training case whose running statistics make batch renorm clip r in some channels and d
    in others."""
    return {"x": layout(rng, name, dtype), **params(rng, dtype), "running_mean": vector(np.array([0.0, 3.0, -0.1],
            acc(dtype))), "running_var": vector(np.array([1.0, 0.01, 1.2], acc(dtype))),
            "y": layout(rng, "contiguous", dtype, fill=7.0), "saved_mean": zeros(dtype=acc(dtype)),
            "saved_invstd": zeros(dtype=acc(dtype))}


def _ghost_saved(dtype=np.float32, groups=2) -> Dict[str, Tensor]:
    return {"saved_mean": (np.full((groups, C), -7.0, acc(dtype)), _whole),
            "saved_invstd": (np.full((groups, C), -7.0, acc(dtype)), _whole)}


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("variant", ["biased", "skip_nonfinite", "ghost", "renorm", "renorm_relu"])
def test_variant_forward_training(program, tmp_path, rng, name, variant):
    """Each variant through bn_forward_training_ex gives the Python API's bits in every buffer."""
    tensors = _variant_training(rng, name)
    options = {}
    if variant == "biased":
        options = dict(running_var_biased=1)
    elif variant == "skip_nonfinite":
        tensors["x"][1](tensors["x"][0])[1, 1, 2, 1] = np.nan  # channel 1 only (written through the view)
        options = dict(skip_nonfinite=1)
    elif variant == "ghost":
        tensors.update(_ghost_saved())
        options = dict(ghost_batch=2)
    else:
        tensors.update(renorm_r=zeros(), renorm_d=zeros())
        options = dict(renorm="1.5 0.75")
        if variant == "renorm_relu":
            tensors["residual"] = layout(rng, "channels_last")
            options["activation"] = 1
    check_same_as_python(program, tmp_path, "forward_training_ex", tensors, axis=1, eps=1e-3, momentum=0.25,
                         **options)
    if variant == "skip_nonfinite":  # the non-finite channel's running statistics are bit for bit the same
        _, _, _, after = run_c(program, tmp_path, "forward_training_ex", tensors, **options)
        bad = ~np.isfinite(after["saved_mean"])
        assert bad.any() and not bad.all()
        for stat in ("running_mean", "running_var"):
            assert after[stat][bad].tobytes() == tensors[stat][0][bad].tobytes()
            assert (after[stat][~bad] != tensors[stat][0][~bad]).all()


def test_renorm_against_the_paper(program, tmp_path, rng):
    """bn_forward_training_ex's renorm and bn_backward_ex with its r and d against the float64
    algorithm of Ioffe 2017 (test_variants.py's references)."""
    from test_variants import renorm_backward_reference, renorm_reference

    tensors = {**_variant_training(rng, "channels_last", np.float64), "renorm_r": zeros(dtype=np.float64),
               "renorm_d": zeros(dtype=np.float64)}
    status, _, message, after = run_c(program, tmp_path, "forward_training_ex", tensors, eps=1e-3, momentum=0.25,
                                      renorm="1.5 0.75")
    assert (status, message) == (0, "")
    v = {k: view_of(after[k]) for k, (_, view_of) in tensors.items()}
    x, w, b = (view_of(base) for base, view_of in (tensors["x"], tensors["weight"], tensors["bias"]))
    want = renorm_reference(x, w, b, tensors["running_mean"][0], tensors["running_var"][0], 0.25, 1e-3, 1.5, 0.75, 1)
    got = (v["y"], v["saved_mean"], v["saved_invstd"], v["renorm_r"], v["renorm_d"], v["running_mean"],
           v["running_var"])
    for what, g, w_ in zip(("y", "mean", "invstd", "r", "d", "running_mean", "running_var"), got, want):
        np.testing.assert_allclose(g, w_, rtol=1e-12, atol=1e-12, err_msg=what)
    assert (v["renorm_r"] == 1.5).any() and (np.abs(v["renorm_d"]) == 0.75).any()  # the clipping ran
    dy = layout(rng, "contiguous", np.float64)
    back = {"dy": dy, "x": tensors["x"], "saved_mean": vector(v["saved_mean"]),
            "saved_invstd": vector(v["saved_invstd"]), "weight": tensors["weight"],
            "renorm_r": vector(v["renorm_r"]), "renorm_d": vector(v["renorm_d"]),
            "dx": layout(rng, "strided", np.float64, fill=7.0), "dweight": zeros(dtype=np.float64),
            "dbias": zeros(dtype=np.float64)}
    check_same_as_python(program, tmp_path, "backward_ex", back, axis=1)
    _, _, _, after = run_c(program, tmp_path, "backward_ex", back)
    dx, dweight, dbias = renorm_backward_reference(dy[0], x, w, v["renorm_r"], v["renorm_d"], 1e-3, 1)
    np.testing.assert_allclose(back["dx"][1](after["dx"]), dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(after["dweight"], dweight, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(after["dbias"], dbias, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_ghost_forward_and_backward(program, tmp_path, rng, dtype):
    """Ghost batch norm forward (saved statistics (N / G, C)) and backward through the C ABI,
    bit for bit the Python API's; each group is plain batch norm of its samples."""
    tensors = {**_variant_training(rng, "channels_last", dtype), **_ghost_saved(dtype)}
    check_same_as_python(program, tmp_path, "forward_training_ex", tensors, axis=1, ghost_batch=2)
    _, _, _, after = run_c(program, tmp_path, "forward_training_ex", tensors, ghost_batch=2)
    x = tensors["x"][1](tensors["x"][0])
    y0, m0, s0 = bn.forward_training(x[:2], tensors["weight"][0], tensors["bias"][0])
    np.testing.assert_allclose(after["y"][:2].astype(np.float64), y0.astype(np.float64), **_tolerance(dtype))
    # The group's statistics as plain batch norm's (the reduction order over the group may differ).
    np.testing.assert_allclose(after["saved_mean"][0], m0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after["saved_invstd"][0], s0, rtol=1e-6)
    back = {"dy": layout(rng, "strided", dtype), "x": tensors["x"], "saved_mean": vector(after["saved_mean"]),
            "saved_invstd": vector(after["saved_invstd"]), "weight": tensors["weight"],
            "dx": layout(rng, "contiguous", dtype, fill=7.0), "dweight": zeros(dtype=acc(dtype)),
            "dbias": zeros(dtype=acc(dtype))}
    check_same_as_python(program, tmp_path, "backward_ex", back, axis=1, ghost_batch=2)


def test_old_struct_size_ignores_variants(program, tmp_path, rng):
    """A 1.1 caller's struct_size: the variant members (beyond it) are never read, so the call
    is the plain op even when the bytes there are set."""
    tensors = _variant_training(rng)
    _, _, _, plain = run_c(program, tmp_path, "forward_training", tensors)
    first = OPTIONS["forward_training_ex"][2]
    status, _, message, ex = run_c(program, tmp_path, "forward_training_ex", tensors, options_size=first,
                                   running_var_biased=1, skip_nonfinite=1, ghost_batch=2)
    assert (status, message) == (0, "")
    for name in tensors:
        assert ex[name].tobytes() == plain[name].tobytes(), name
    back = {"dy": layout(rng, "contiguous"), "x": tensors["x"], "saved_mean": vector(ex["saved_mean"]),
            "saved_invstd": vector(ex["saved_invstd"]), "dx": layout(rng, "contiguous", fill=7.0),
            "dweight": zeros(), "dbias": zeros()}
    _, _, _, plain = run_c(program, tmp_path, "backward", back)
    status, _, message, ex = run_c(program, tmp_path, "backward_ex", back, ghost_batch=3,
                                   options_size=OPTIONS["backward_ex"][2])
    assert (status, message) == (0, "")
    for name in back:
        assert ex[name].tobytes() == plain[name].tobytes(), name


def _renorm_case(rng):
    return {**_variant_training(rng), "renorm_r": zeros(), "renorm_d": zeros()}


def _no_running(t):
    del t["running_mean"], t["running_var"]
    return t


# (case, options): bad variant options that the Python API refuses too, with the same words.
BAD_VARIANTS = {
    "rmax": (_renorm_case, dict(renorm="0.5 1")),
    "dmax": (_renorm_case, dict(renorm="2 -1")),
    "rmax_nan": (_renorm_case, dict(renorm="nan 1")),
    "ghost_divides": (lambda rng: _variant_training(rng), dict(ghost_batch=3)),
    "ghost_and_renorm": (lambda rng: {**_renorm_case(rng), **_ghost_saved()}, dict(ghost_batch=2, renorm="2 1")),
    "renorm_without_running": (lambda rng: _no_running(_renorm_case(rng)), dict(renorm="2 1")),
}


@pytest.mark.parametrize("bad", list(BAD_VARIANTS))
def test_bad_variant_as_python(program, tmp_path, rng, bad):
    make, options = BAD_VARIANTS[bad]
    tensors = make(rng)
    status, message = _fails_cleanly(program, tmp_path, "forward_training_ex", tensors, **options)
    with pytest.raises((ValueError, TypeError)) as python:
        python_op("forward_training_ex", views(tensors), **options)
    assert (status, message) == (STATUS[python.type], c_words(python.value))


def test_bad_variant_backward_as_python(program, tmp_path, rng):
    x = layout(rng, "contiguous")
    _, sm, si = bn.forward_training(x[1](x[0]), ghost_batch=2)
    back = {"dy": layout(rng, "contiguous"), "x": x, "saved_mean": vector(sm), "saved_invstd": vector(si),
            "dx": layout(rng, "contiguous", fill=7.0), "dweight": zeros(), "dbias": zeros()}
    for options in (dict(ghost_batch=4), dict()):
        status, message = _fails_cleanly(program, tmp_path, "backward_ex", back, **options)
        with pytest.raises((ValueError, TypeError)) as python:
            python_op("backward_ex", views(back), **options)
        assert (status, message) == (STATUS[python.type], c_words(python.value))
    back.update(saved_mean=vector(sm[0]), saved_invstd=vector(si[0]), renorm_r=vector(np.ones(C + 1, np.float32)),
                renorm_d=zeros())
    status, message = _fails_cleanly(program, tmp_path, "backward_ex", back)
    with pytest.raises(ValueError) as python:
        python_op("backward_ex", views(back))
    assert (status, message) == (1, c_words(python.value))


@pytest.mark.parametrize("options, words", [
    (dict(running_var_biased=2), "options->running_var_biased must be 0 or 1, got 2"),
    (dict(skip_nonfinite=-1), "options->skip_nonfinite must be 0 or 1, got -1"),
    (dict(renorm="2 1"), "renorm_r_out must be an array, got NULL"),
    # The core's words (the Python API says "... or None" for its None).
    (dict(ghost_batch=-2), "ghost_batch must be a positive int (samples per group), got -2"),
], ids=["biased_flag", "skip_flag", "renorm_without_outputs", "ghost_negative"])
def test_bad_variant_members(program, tmp_path, rng, options, words):
    """The C-only rules of the new members: flags are 0 or 1; renorm needs its output arrays."""
    status, message = _fails_cleanly(program, tmp_path, "forward_training_ex", _variant_training(rng), **options)
    assert (status, message) == (STATUS[TypeError] if "NULL" in words else STATUS[ValueError], words)
