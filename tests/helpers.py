"""What every test shares (conftest.py keeps only fixtures and hooks): the float64 NumPy
reference of every op of the contract, one tolerance table keyed by result kind and dtype, the
array libraries a test can run on (NumPy and torch on the CPU, CuPy and torch on CUDA), and
builders for inputs of any dtype in any memory layout, on any of those libraries."""
from __future__ import annotations

import importlib.util
from typing import Any, Optional, Sequence

import numpy as np
import pytest

import batchnorm as bn

try:  # torch is a test-only reference (and the only bfloat16 producer we rely on)
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

HAVE_TORCH = torch is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (bfloat16 and PyTorch cross-checks)")

# ---- dtypes and tolerances ----------------------------------------------------------------

DTYPES = ("float16", "bfloat16", "float32", "float64")
NUMPY_DTYPES = ("float16", "float32", "float64")
# The CPU ISA levels BATCHNORM_ISA names, lowest first; a level the CPU lacks runs the highest it has.
# avx512_bf16 changes bfloat16's kernels alone (the conversion instruction).
ISA_LEVELS = ("baseline", "avx2", "avx512", "avx512_bf16")


def dtype_params(names: Sequence[str] = DTYPES) -> list:
    """pytest params for dtypes; bfloat16 carries the torch marker and skips without torch."""
    return [pytest.param(n, marks=[pytest.mark.torch, needs_torch]) if n == "bfloat16" else n for n in names]


# The one tolerance table, for every device: relative bounds by result kind and x's dtype.
#   output: y, dx, folded kernels, running statistics, against float64 arithmetic on the
#           returned statistics: a few ulps of the output dtype, relative to the output's scale.
#   mean:   statistics' mean of well-conditioned data, relative to |mean| + std.
#   var:    statistics' variance (and saved_invstd), relative.
#   sum:    per-channel sums (dweight, dbias) in the accumulation dtype, relative to the sum of
#           the terms' magnitudes.
TOLERANCE = {
    "output": {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2},
    "mean": {"float64": 1e-12, "float32": 1e-6, "float16": 1e-6, "bfloat16": 1e-6},
    "var": {"float64": 1e-10, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5},
    "sum": {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5},
}
# Views of the table under the names the tests use.
OUT_RTOL = TOLERANCE["output"]
STAT_RTOL = {d: (TOLERANCE["mean"][d], TOLERANCE["var"][d]) for d in DTYPES}
# The contract's promise for float32 / half statistics at any conditioning (mean = 1e8 std).
CONTRACT_MEAN_RTOL = 1e-6
CONTRACT_VAR_RTOL = 1e-3


def acc_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


# ---- array libraries ------------------------------------------------------------------------
# A test takes an ArrayLib and makes its inputs with it; from there on the test body is the same
# for every library and device: the op is called on the arrays, and results are read back to
# float64 NumPy (to_f64, bits) for the one reference. Only creation and transfer differ.

_CUDA_INFO = bn.info()["cuda"]
HAVE_CUDA = bool(_CUDA_INFO["available"])
CUDA_SKIP_REASON = f"CUDA unavailable: {_CUDA_INFO['reason'] or 'not compiled'}"
HAVE_CUPY = importlib.util.find_spec("cupy") is not None


def _is_cupy(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


class ArrayLib:
    """One array library on one device: makes arrays from float64 host values and views them."""

    name = ""
    device = "cpu"

    def skip_reason(self) -> Optional[str]:
        """Why this library cannot run here, or None."""
        return None

    def asarray(self, values: np.ndarray, dtype: str) -> Any:
        raise NotImplementedError

    def permute(self, a: Any, order: Sequence[int]) -> Any:
        return a.transpose(tuple(int(d) for d in order))

    def view(self, a: Any, index: tuple) -> Any:
        return a[index]

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        return self.name


class NumpyLib(ArrayLib):
    """NumPy; bfloat16 (which NumPy lacks) comes from torch on the CPU, as users get it."""

    name = "numpy"

    def asarray(self, values, dtype):
        if dtype == "bfloat16":
            return TORCH_CPU.asarray(values, dtype)
        return np.asarray(values).astype(dtype)

    def permute(self, a, order):
        return TORCH_CPU.permute(a, order) if is_torch(a) else super().permute(a, order)

    def view(self, a, index):
        return TORCH_CPU.view(a, index) if is_torch(a) else a[index]


class TorchLib(ArrayLib):
    def __init__(self, device: str):
        self.device = device
        self.name = "torch" if device == "cpu" else f"torch-{device}"

    def skip_reason(self):
        if not HAVE_TORCH:
            return "torch is not installed"
        if self.device == "cuda":
            if not HAVE_CUDA:
                return CUDA_SKIP_REASON
            if not torch.cuda.is_available():
                return "this torch has no CUDA device"
        return None

    def asarray(self, values, dtype):
        if not HAVE_TORCH:
            pytest.skip("torch is not installed")
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(
            device=self.device, dtype=getattr(torch, dtype))

    def permute(self, a, order):
        return a.permute(*[int(d) for d in order])

    def view(self, a, index):
        if any(isinstance(s, slice) and (s.step or 1) < 0 for s in index):
            pytest.skip("torch tensors cannot have negative strides")
        return a[index]

    def synchronize(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


class CupyLib(ArrayLib):
    name = "cupy"
    device = "cuda"

    def skip_reason(self):
        if not HAVE_CUDA:
            return CUDA_SKIP_REASON
        if not HAVE_CUPY:
            return "CuPy is not installed"
        return None

    def asarray(self, values, dtype):
        import cupy

        if dtype == "bfloat16":
            pytest.skip("CuPy has no bfloat16 (torch-cuda runs it)")
        return cupy.asarray(np.asarray(values).astype(dtype))

    def synchronize(self):
        import cupy

        cupy.cuda.get_current_stream().synchronize()


NUMPY = NumpyLib()
TORCH_CPU = TorchLib("cpu")
CUPY = CupyLib()
TORCH_CUDA = TorchLib("cuda")
ARRAY_LIBS = {lib.name: lib for lib in (NUMPY, TORCH_CPU, CUPY, TORCH_CUDA)}
CPU_LIBS = ("numpy", "torch")
CUDA_LIBS = ("cupy", "torch-cuda")


def lib_params(names: Sequence[str] = ("numpy",) + CUDA_LIBS) -> list:
    """pytest params of array libraries. CUDA ones carry the `cuda` marker and are collected
    and skipped, with the reason, where no device (or library) is present; torch-based ones
    carry the `torch` marker. The default is NumPy on the CPU plus both CUDA libraries. On the
    CPU, NumPy arrays enter through the array interface and torch tensors through DLPack, the
    CUDA arrays' route: the matrix's bfloat16 cases are torch tensors, so both routes run on
    every shape and layout without doubling the matrix; test_torch.py covers torch itself."""
    params = []
    for name in names:
        lib = ARRAY_LIBS[name]
        marks = [pytest.mark.cuda] if lib.device == "cuda" else []
        if name.startswith("torch"):
            marks.append(pytest.mark.torch)
        reason = lib.skip_reason()
        if reason is not None:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(lib, id=name, marks=marks))
    return params


def torch_device_params() -> list:
    """"cpu" and "cuda" for torch tests; "cuda" carries the `cuda` marker and skips with the
    reason where batchnorm or torch has no CUDA device."""
    reason = TORCH_CUDA.skip_reason()
    cuda_marks = [pytest.mark.cuda] + ([pytest.mark.skip(reason=reason)] if reason else [])
    return ["cpu", pytest.param("cuda", marks=cuda_marks)]


def library_of(a: Any) -> str:
    if is_torch(a):
        return "torch"
    return "cupy" if _is_cupy(a) else "numpy"


def device_type(a: Any) -> str:
    """'cpu' or 'cuda' for an array of any of the libraries."""
    if is_torch(a):
        return a.device.type
    return "cuda" if _is_cupy(a) else "cpu"


def dtype_name(a: Any) -> str:
    """'float32' etc. for an array of any of the libraries."""
    if is_torch(a):
        return str(a.dtype).replace("torch.", "")
    if _is_cupy(a):
        return a.dtype.name
    return np.asarray(a).dtype.name


def is_torch(a: Any) -> bool:
    return HAVE_TORCH and isinstance(a, torch.Tensor)


def base_of(a: Any) -> Any:
    """The array a view was taken from (None for an array that owns its memory)."""
    return a._base if is_torch(a) else a.base


def to_f64(a: Any) -> np.ndarray:
    """A float64 NumPy copy, on the host, of an array of any library (bfloat16 included)."""
    if is_torch(a):  # a copy even where .to() and .cpu() return the tensor itself (float64 on the CPU)
        return a.detach().cpu().to(torch.float64, copy=True).numpy()
    if _is_cupy(a):
        return a.get().astype(np.float64)
    return np.asarray(a, dtype=np.float64).copy()


def writable_like(values: Any, like: Any) -> Any:
    """`values` as a writable float32 array where the JAX array `like` lives: NumPy for the
    CPU, CuPy (else a torch tensor) for a GPU. For the running statistics that the eager API
    updates in place beside JAX inputs: bit-for-bit comparisons of batchnorm.jax with the
    eager API hold on one device, not across devices (the CPU and CUDA kernels reduce in
    different orders)."""
    host = np.array(values, np.float32)
    if next(iter(like.devices())).platform == "cpu":
        return host
    if HAVE_CUPY:
        import cupy

        return cupy.asarray(host)
    if HAVE_TORCH and torch.cuda.is_available():
        return torch.as_tensor(host, device="cuda")
    pytest.skip("the eager twin of a JAX array on a GPU needs CuPy or torch with CUDA")


def to_host(a: Any) -> Any:
    """The same values and dtype on the CPU: a NumPy array, or a torch tensor for bfloat16."""
    if is_torch(a):
        a = a.detach().cpu()
        return a if a.dtype == torch.bfloat16 else a.numpy()
    return a.get() if _is_cupy(a) else np.asarray(a)


def cast(values: np.ndarray, dtype: str, xp: ArrayLib = NUMPY) -> Any:
    """float64 values as an array of `dtype` made by `xp` (NumPy: torch for bfloat16)."""
    return xp.asarray(values, dtype)


def empty_like_dtype(shape: Sequence[int], dtype: str, fill: float = np.nan, xp: ArrayLib = NUMPY) -> Any:
    return cast(np.full(shape, fill), dtype, xp)


def bits(a: Any) -> bytes:
    """The exact bytes of an array's values (in logical order), for bitwise comparisons."""
    if is_torch(a):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.view(torch.int16)
        return a.contiguous().numpy().tobytes()
    if _is_cupy(a):
        a = a.get()
    return np.ascontiguousarray(a).tobytes()


def snapshot(*arrays: Any) -> list:
    return [None if a is None else bits(a) for a in arrays]


# ---- layouts --------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "sliced", "transposed", "reversed")


def memory_order(ndim: int, axis: int, layout: str) -> list:
    """Logical axes from outermost to innermost in memory."""
    ax = axis % ndim
    if layout != "transposed":
        return list(range(ndim))
    others = [d for d in range(ndim) if d != ax]
    # Channels-first logical views get channels-last memory and vice versa.
    return others + [ax] if ax != ndim - 1 else [ax] + others


def place(values: np.ndarray, dtype: str, layout: str, axis: int, xp: ArrayLib = NUMPY) -> Any:
    """`values` (float64, logical shape) stored as `dtype` by `xp` in `layout`; the returned
    view has the logical shape. The buffer is built on the host and moved once; the view is
    then taken with the library's own ops. Gaps of sliced layouts hold NaN, so reading one
    shows up.
      contiguous: C order;  sliced: every other element of the innermost reduced axis;
      transposed: channels-last memory for a channels-first view and vice versa;
      reversed:   the first and last axes walked backwards (negative strides)."""
    nd = values.ndim
    ax = axis % nd
    if layout == "contiguous":
        return xp.asarray(values, dtype)
    if layout == "transposed":
        order = memory_order(nd, axis, layout)
        stored = xp.asarray(np.ascontiguousarray(values.transpose(order)), dtype)
        return xp.permute(stored, np.argsort(order))
    if layout == "sliced":
        d = max(i for i in range(nd) if i != ax)  # the innermost reduced axis
        big_shape = list(values.shape)
        big_shape[d] *= 2
        big = np.full(big_shape, np.nan)
        index = tuple(slice(None, None, 2) if i == d else slice(None) for i in range(nd))
        big[index] = values
        return xp.view(xp.asarray(big, dtype), index)
    if layout == "reversed":
        if dtype == "bfloat16" and xp.name == "numpy":
            pytest.skip("torch tensors cannot have negative strides (bfloat16 arrays come from torch)")
        flip = (slice(None, None, -1),) + (slice(None),) * (nd - 2) + (slice(None, None, -1),)
        return xp.view(xp.asarray(np.ascontiguousarray(values[flip]), dtype), flip)
    raise AssertionError(f"unknown layout {layout}")


def channel_values(rng: np.random.Generator, shape: Sequence[int], axis: int, loc: float = 0.0,
                   spread: float = 1.0) -> np.ndarray:
    """float64 normal values with a different mean and scale per channel (catches channel mixups)."""
    shape = tuple(shape)
    ax = axis % len(shape)
    C = shape[ax]
    means = loc + spread * rng.uniform(-2, 2, C)
    scales = rng.uniform(0.5, 2.0, C)
    return rng.standard_normal(shape) * bcast(scales, len(shape), ax) + bcast(means, len(shape), ax)


def make_input(rng: np.random.Generator, shape: Sequence[int], dtype: str, layout: str = "contiguous",
               axis: int = 1, xp: ArrayLib = NUMPY, **kw: Any) -> Any:
    return place(channel_values(rng, shape, axis, **kw), dtype, layout, axis, xp)


def vector(values: np.ndarray, dtype: str, strided: bool = False, xp: ArrayLib = NUMPY) -> Any:
    """A (C,) parameter of `dtype`, optionally as a stride-2 view into a larger array."""
    if not strided:
        return xp.asarray(values, dtype)
    big = np.full(2 * len(values), np.nan)
    big[::2] = values
    return xp.view(xp.asarray(big, dtype), (slice(None, None, 2),))



def every_op(x: Any, dy: Any, r: Any, w: np.ndarray, b: np.ndarray, threads: int, strided: bool = False) -> dict:
    """Every CPU op on x (NumPy arrays; dy and the residual r of x's shape and dtype, weight w
    and bias b float32) at `threads` threads, by result name: statistics, training with
    running statistics (momentum 0.5), inference with the updated ones, backward, the fused
    forward and backward (residual, ReLU), backward_reduce and backward_elemt. `strided`: every
    parameter vector and the running statistics as stride-2 views."""
    old = bn.get_num_threads()
    try:
        bn.set_num_threads(threads)
        C = x.shape[1]
        acc = "float64" if dtype_name(x) == "float64" else "float32"
        rm, rv = vector(np.zeros(C), acc, strided), vector(np.ones(C), acc, strided)
        w, b = vector(w, "float32", strided), vector(b, "float32", strided)
        mean_s, var_s, _ = bn.statistics(x)
        y, mean, invstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, momentum=0.5)
        y_inf = bn.forward_inference(x, rm, rv, w, b)
        dx, dw, db = bn.backward(dy, x, mean, invstd, w)
        yf, mf, sf = bn.forward_training(x, w, b, residual=r, activation="relu")
        dxf, dwf, dbf, dres = bn.backward(dy, x, mf, sf, w, y=yf, activation="relu", residual=True)
        s1, s2, dw2, db2 = bn.backward_reduce(dy, x, mean, invstd)
        count = int(np.prod(x.shape)) // C
        dx2 = bn.backward_elemt(dy, x, mean, invstd, s1, s2, count, w)
        return dict(mean_s=mean_s, var_s=var_s, y=y, mean=mean, invstd=invstd, rm=rm, rv=rv, y_inf=y_inf, dx=dx,
                    dw=dw, db=db, yf=yf, mf=mf, sf=sf, dxf=dxf, dwf=dwf, dbf=dbf, dres=dres, s1=s1, s2=s2, dw2=dw2,
                    db2=db2, dx2=dx2)
    finally:
        bn.set_num_threads(old)

# ---- the float64 reference ------------------------------------------------------------------


def bcast(v: Any, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def reduced_axes(ndim: int, axis: int) -> tuple:
    return tuple(d for d in range(ndim) if d != axis % ndim)


def ref_statistics(x: Any, axis: int = 1):
    """Per-channel mean, biased variance (two-pass with correction, float64) and count."""
    x = to_f64(x)
    red = reduced_axes(x.ndim, axis)
    count = int(np.prod([x.shape[d] for d in red]))
    mean = x.mean(axis=red)
    dev = x - bcast(mean, x.ndim, axis)
    correction = dev.mean(axis=red)
    var = (dev**2).mean(axis=red) - correction**2
    return mean + correction, np.maximum(var, 0.0), count


def ref_normalize(x: Any, mean: Any, invstd: Any, weight: Any = None, bias: Any = None, axis: int = 1):
    """y = (x - mean) * invstd * weight + bias in float64 (statistics as given)."""
    x = to_f64(x)
    nd = x.ndim
    C = x.shape[axis % nd]
    w = np.ones(C) if weight is None else to_f64(weight)
    b = np.zeros(C) if bias is None else to_f64(bias)
    return (x - bcast(to_f64(mean), nd, axis)) * bcast(to_f64(invstd) * w, nd, axis) + bcast(b, nd, axis)


def ref_forward_inference(x, mean, var, weight=None, bias=None, eps=1e-5, axis=1):
    return ref_normalize(x, mean, 1.0 / np.sqrt(to_f64(var) + eps), weight, bias, axis)


def ref_running_update(running_mean, running_var, batch_mean, batch_var, count, momentum):
    """PyTorch's convention with the unbiased batch variance."""
    rm = (1 - momentum) * to_f64(running_mean) + momentum * to_f64(batch_mean)
    rv = (1 - momentum) * to_f64(running_var) + momentum * to_f64(batch_var) * count / (count - 1)
    return rm, rv


def ref_backward(dy, x, mean, invstd, weight=None, axis=1):
    """(dx, dweight, dbias) of training-mode batch norm, float64, with the given statistics."""
    dy, x = to_f64(dy), to_f64(x)
    nd = x.ndim
    red = reduced_axes(nd, axis)
    C = x.shape[axis % nd]
    n = x.size // C
    w = np.ones(C) if weight is None else to_f64(weight)
    invstd = to_f64(invstd)
    xhat = (x - bcast(to_f64(mean), nd, axis)) * bcast(invstd, nd, axis)
    dbias = dy.sum(axis=red)
    dweight = (dy * xhat).sum(axis=red)
    dx = bcast(w * invstd, nd, axis) * (dy - bcast(dbias / n, nd, axis) - xhat * bcast(dweight / n, nd, axis))
    return dx, dweight, dbias


def ref_fold(kernel, conv_bias, mean, var, weight=None, bias=None, eps=1e-5, axis=0):
    k = to_f64(kernel)
    C = k.shape[axis % k.ndim]
    w = np.ones(C) if weight is None else to_f64(weight)
    b = np.zeros(C) if bias is None else to_f64(bias)
    cb = np.zeros(C) if conv_bias is None else to_f64(conv_bias)
    s = w / np.sqrt(to_f64(var) + eps)
    return k * bcast(s, k.ndim, axis), (cb - to_f64(mean)) * s + b


def ref_merge_statistics(means, vars, counts):
    """Chan's combination in float64 (shards with count 0 ignored)."""
    total = sum(int(c) for c in counts)
    mean = sum(to_f64(m) * c for m, c in zip(means, counts) if c) / total
    m2 = sum((to_f64(v) + (to_f64(m) - mean) ** 2) * c for m, v, c in zip(means, vars, counts) if c)
    return mean, m2 / total, total


# ---- assertions -------------------------------------------------------------------------------


def assert_close(actual: Any, expected: Any, rtol: float, scale: Optional[Any] = None, what: str = "") -> None:
    """|actual - expected| <= rtol * (|expected| + scale), elementwise; `scale` defaults to
    the largest |expected| (the output's scale) and may be per-element. Arrays of any library."""
    a = to_f64(actual)
    e = to_f64(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if scale is None:
        scale = np.max(np.abs(e)) if e.size else 0.0
    bound = rtol * (np.abs(e) + scale)
    err = np.abs(a - e)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(bound, 1e-300), 0)), a.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.size} values off (rtol {rtol}); worst at {tuple(int(j) for j in i)}: "
            f"got {a[i]!r}, expected {e[i]!r}, bound {bound[i]!r}"
        )


def assert_statistics(mean: Any, var: Any, ref_mean: Any, ref_var: Any, dtype: str,
                      rtols: Optional[tuple] = None, what: str = "") -> None:
    mt, vt = STAT_RTOL[dtype] if rtols is None else rtols
    assert_close(mean, ref_mean, mt, scale=np.sqrt(to_f64(ref_var)), what=f"{what} mean")
    assert_close(var, ref_var, vt, scale=0.0, what=f"{what} var")


def assert_output(actual: Any, expected: Any, dtype: str, scale: Optional[Any] = None, what: str = "") -> None:
    assert_close(actual, expected, OUT_RTOL[dtype], scale=scale, what=what)


def assert_same_kind(result: Any, x: Any, dtype: str, shape: Sequence[int]) -> None:
    """`result` is an array of x's library, on x's device, of `dtype` and `shape`."""
    assert library_of(result) == library_of(x), f"result is {type(result).__name__}, x is {type(x).__name__}"
    assert device_type(result) == device_type(x), f"result on {device_type(result)}, x on {device_type(x)}"
    assert dtype_name(result) == dtype
    assert tuple(result.shape) == tuple(shape)
