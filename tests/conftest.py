"""Shared test machinery: a float64 NumPy reference of every op of the contract, tolerances
keyed by dtype, seeded RNG fixtures, and builders for inputs of any dtype (bfloat16 through
torch) in any memory layout (contiguous, sliced, transposed, negative strides)."""
from __future__ import annotations

import os
import zlib
from typing import Any, Optional, Sequence

import numpy as np
import pytest

try:  # torch is a test-only reference (and the only bfloat16 producer we rely on)
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

try:
    from hypothesis import HealthCheck, settings

    # Derandomized so that CI runs are reproducible; BATCHNORM_HYPOTHESIS_EXAMPLES scales it.
    settings.register_profile(
        "batchnorm",
        max_examples=int(os.environ.get("BATCHNORM_HYPOTHESIS_EXAMPLES", "150")),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile("batchnorm")
except ImportError:  # pragma: no cover
    pass

HAVE_TORCH = torch is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (bfloat16 and PyTorch cross-checks)")

# ---- dtypes and tolerances ----------------------------------------------------------------

DTYPES = ("float16", "bfloat16", "float32", "float64")
NUMPY_DTYPES = ("float16", "float32", "float64")


def dtype_params(names: Sequence[str] = DTYPES) -> list:
    """pytest params for dtypes; bfloat16 carries the torch marker and skips without torch."""
    return [pytest.param(n, marks=[pytest.mark.torch, needs_torch]) if n == "bfloat16" else n for n in names]


# Outputs (y, dx, folded kernels) against a float64 computation from the returned statistics:
# a few ulps of the output dtype, relative to the output's scale.
OUT_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}
# Statistics of well-conditioned data: (mean relative to |mean| + std, var relative).
STAT_RTOL = {"float64": (1e-12, 1e-10), "float32": (1e-6, 1e-5), "float16": (1e-6, 1e-5), "bfloat16": (1e-6, 1e-5)}
# The contract's promise for float32 / half statistics at any conditioning (mean = 1e8 std).
CONTRACT_MEAN_RTOL = 1e-6
CONTRACT_VAR_RTOL = 1e-3


def acc_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def dtype_name(a: Any) -> str:
    """'float32' etc. for a NumPy array or a torch tensor."""
    if HAVE_TORCH and isinstance(a, torch.Tensor):
        return str(a.dtype).replace("torch.", "")
    return np.asarray(a).dtype.name


# ---- arrays of any library ----------------------------------------------------------------


def is_torch(a: Any) -> bool:
    return HAVE_TORCH and isinstance(a, torch.Tensor)


def to_f64(a: Any) -> np.ndarray:
    """A float64 NumPy copy of a NumPy array or a torch tensor (bfloat16 included)."""
    if is_torch(a):
        return a.detach().to(torch.float64).cpu().numpy()
    return np.asarray(a, dtype=np.float64).copy()


def cast(values: np.ndarray, dtype: str) -> Any:
    """float64 values as an array of `dtype`: NumPy for the NumPy dtypes, torch for bfloat16."""
    if dtype == "bfloat16":
        if not HAVE_TORCH:
            pytest.skip("bfloat16 arrays need torch")
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(torch.bfloat16)
    return np.asarray(values).astype(dtype)


def empty_like_dtype(shape: Sequence[int], dtype: str, fill: float = np.nan) -> Any:
    return cast(np.full(shape, fill), dtype)


def bits(a: Any) -> bytes:
    """The exact bytes of an array's values (in logical order), for bitwise comparisons."""
    if is_torch(a):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.view(torch.int16)
        return a.contiguous().numpy().tobytes()
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


def place(values: np.ndarray, dtype: str, layout: str, axis: int) -> Any:
    """`values` (float64, logical shape) stored as `dtype` in `layout`; the returned view has
    the logical shape. Gaps of sliced layouts hold NaN, so reading one shows up."""
    nd = values.ndim
    ax = axis % nd
    if layout == "contiguous":
        return cast(values, dtype)
    if layout == "transposed":
        order = memory_order(nd, axis, layout)
        stored = cast(np.ascontiguousarray(values.transpose(order)), dtype)
        inverse = list(np.argsort(order))
        return stored.permute(*inverse) if is_torch(stored) else stored.transpose(inverse)
    if layout == "sliced":
        d = max(i for i in range(nd) if i != ax)  # the innermost reduced axis
        big_shape = list(values.shape)
        big_shape[d] *= 2
        big = np.full(big_shape, np.nan)
        index = tuple(slice(None, None, 2) if i == d else slice(None) for i in range(nd))
        big[index] = values
        return cast(big, dtype)[index]
    if layout == "reversed":
        if dtype == "bfloat16":
            pytest.skip("torch tensors cannot have negative strides (bfloat16 arrays come from torch)")
        flip = (slice(None, None, -1),) + (slice(None),) * (nd - 2) + (slice(None, None, -1),)
        stored = np.ascontiguousarray(values[flip]).astype(dtype)
        return stored[flip]
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
               axis: int = 1, **kw: Any) -> Any:
    return place(channel_values(rng, shape, axis, **kw), dtype, layout, axis)


def vector(values: np.ndarray, dtype: str, strided: bool = False) -> Any:
    """A (C,) parameter of `dtype`, optionally as a stride-2 view into a larger array."""
    if not strided:
        return cast(values, dtype)
    big = np.full(2 * len(values), np.nan)
    big[::2] = values
    return cast(big, dtype)[::2]


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


def assert_close(actual: Any, expected: np.ndarray, rtol: float, scale: Optional[Any] = None, what: str = "") -> None:
    """|actual - expected| <= rtol * (|expected| + scale), elementwise; `scale` defaults to
    the largest |expected| (the output's scale) and may be per-element."""
    a = to_f64(actual)
    e = np.asarray(expected, dtype=np.float64)
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


def assert_statistics(mean: Any, var: Any, ref_mean: np.ndarray, ref_var: np.ndarray, dtype: str,
                      rtols: Optional[tuple] = None, what: str = "") -> None:
    mt, vt = STAT_RTOL[dtype] if rtols is None else rtols
    assert_close(mean, ref_mean, mt, scale=np.sqrt(ref_var), what=f"{what} mean")
    assert_close(var, ref_var, vt, scale=0.0, what=f"{what} var")


def assert_output(actual: Any, expected: np.ndarray, dtype: str, scale: Optional[Any] = None, what: str = "") -> None:
    assert_close(actual, expected, OUT_RTOL[dtype], scale=scale, what=what)


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: stable across runs, distinct across tests."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def restore_threads():
    import batchnorm as bn

    before = bn.get_num_threads()
    yield before
    bn.set_num_threads(before)
