"""The C ABI from C and C++ hosts: builds tests/capi with CMake against the installed package
(find_package(batchnorm) with `python -m batchnorm --cmake-dir`), runs every op through the C
and the C++ program on contiguous, channels-last and strided (offset, negative stride) layouts,
and compares every buffer, gaps included, with the same call through the Python API, bit for
bit. Bad input must return the status and message of the Python error and change nothing."""
from __future__ import annotations

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


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> Dict[str, Path]:
    cmake = shutil.which("cmake")
    assert cmake, "building the C ABI tests needs cmake on PATH (pip install cmake)"
    cmake_dir = _run([sys.executable, "-m", "batchnorm", "--cmake-dir"]).stdout.strip()
    build = tmp_path_factory.mktemp("capi-build")
    _run([cmake, "-S", SOURCES, "-B", build, f"-DCMAKE_PREFIX_PATH={cmake_dir}", "-DCMAKE_BUILD_TYPE=Release"])
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
    out = dict(line.split(" ", 1) for line in _run([program, case]).stdout.splitlines())
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


def python_op(op: str, v: Dict[str, np.ndarray], axis=1, eps=1e-5, momentum=0.1, counts=None) -> Optional[int]:
    """The same op through the Python API on the views `v`, its results stored into them."""
    get = v.get
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
    return {"weight": vector(rng.uniform(0.5, 2, C).astype(dtype)), "bias": vector(rng.standard_normal(C).astype(dtype))}


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
    assert (status, message) == (STATUS[python.type], str(python.value))
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
    tensors = training_tensors(rng)
    status, _, message, after = run_c(program, tmp_path, "forward_training", tensors, device="cuda")
    if cuda["compiled"]:
        assert (status, message) == (3, f"x is on cuda:0 but CUDA is unavailable: {cuda['reason']}")
    else:
        assert status == 2 and message.startswith("x is on cuda:0 but this build of batchnorm has no CUDA backend")
    for name, (base, _) in tensors.items():
        assert after[name].tobytes() == base.tobytes(), f"a failed call wrote into {name}"


# ---- versions and per-thread errors ---------------------------------------------------------

def test_version(program):
    out = dict(line.split() for line in _run([program, "--version"]).stdout.splitlines())
    assert out["header"] == out["library"] and int(out["library"]) >= 10000


def test_last_error_is_per_thread(programs):
    out = _run([programs["capi_cxx"], "--threads"]).stdout.splitlines()
    assert out == ["first 1 n must be an int >= 1, got 0", "second 0 "]


def test_python_module_runs_on_the_same_library(restore_threads):
    """One copy of the kernels: the module's thread setting is libbatchnorm's (the library the
    CMake package points at, loaded once by the module)."""
    import ctypes

    cmake_dir = Path(_run([sys.executable, "-m", "batchnorm", "--cmake-dir"]).stdout.strip())
    lib = ctypes.CDLL(str(cmake_dir.parent.parent / "libbatchnorm.so.1"))  # <pkg>/lib/cmake/batchnorm
    for n in (1, 3):
        bn.set_num_threads(n)
        assert lib.bn_get_num_threads() == n
    assert lib.bn_set_num_threads(2) == 0 and bn.get_num_threads() == 2

