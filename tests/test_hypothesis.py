"""Property tests: random rank (2..5), small shapes, any channel axis, and arbitrary strided
views (memory order permuted, every axis sliced with steps of +-1 or +-2) for statistics,
forward_training (with out= and running statistics) and backward against the reference, on
every device (NumPy on the CPU, CuPy and torch on CUDA; torch draws positive steps only)."""
from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis")
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import batchnorm as bn  # noqa: E402
from helpers import (  # noqa: E402
    NUMPY,
    cast,
    lib_params,
    STAT_RTOL,
    acc_dtype,
    assert_close,
    assert_output,
    bits,
    channel_values,
    ref_backward,
    ref_normalize,
    ref_running_update,
    ref_statistics,
    to_f64,
)

DTYPES = st.sampled_from(["float16", "float32", "float64"])


@st.composite
def shapes_and_axes(draw, min_count: int = 1):
    rank = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    count = int(np.prod(shape)) // shape[axis]
    assume(count >= min_count)
    return shape, axis


@st.composite
def layouts(draw, rank: int, axis: int, negative: bool = True):
    """(memory order of the logical axes, slicing step of each axis). Half of the draws put
    the channels innermost with unit step, the channels-last kernels' layout."""
    order = list(draw(st.permutations(range(rank))))
    steps = draw(st.lists(st.sampled_from([1, 1, 2, -1, -2] if negative else [1, 1, 2]), min_size=rank, max_size=rank))
    if draw(st.booleans()):
        ax = axis % rank
        order = [d for d in order if d != ax] + [ax]
        steps[ax] = 1
    return order, steps


def strided(values: np.ndarray, dtype: str, layout, fill: float = np.nan, xp=NUMPY):
    """`values` (logical shape) stored as `dtype` by `xp` in a buffer of the drawn memory order
    and viewed through the drawn steps; the gaps hold `fill`. The buffer is laid out on the
    host, moved once, and viewed with the library's own transpose and slicing."""
    order, steps = layout
    big_logical = [n * abs(s) for n, s in zip(values.shape, steps)]
    buf = np.full([big_logical[d] for d in order], fill)
    index = tuple(slice(None, None, s) for s in steps)
    buf.transpose(np.argsort(order))[index] = values
    out = xp.view(xp.permute(cast(buf, dtype, xp), np.argsort(order)), index)
    assert tuple(out.shape) == values.shape
    return out


def draw_layout(data, shape, axis, xp):
    return data.draw(layouts(len(shape), axis, negative=not xp.name.startswith("torch")))


arrays = pytest.mark.parametrize("xp", lib_params())


@arrays
@given(sa=shapes_and_axes(), dtype=DTYPES, data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_statistics_any_strides(xp, sa, dtype, data, seed):
    shape, axis = sa
    rng = np.random.default_rng(seed)
    x = strided(channel_values(rng, shape, axis, loc=5.0), dtype, draw_layout(data, shape, axis, xp), xp=xp)
    mean, var, count = bn.statistics(x, axis=axis)
    ref_mean, ref_var, ref_count = ref_statistics(x, axis)
    assert count == ref_count
    mt, vt = STAT_RTOL[dtype]
    assert_close(mean, ref_mean, mt, scale=np.sqrt(ref_var), what="mean")
    # One or two values per channel can give a variance at rounding level: measure against the
    # values' spread too.
    assert_close(var, ref_var, vt, scale=1e-6 * ref_mean**2 * (dtype != "float64"), what="var")


@arrays
@given(sa=shapes_and_axes(min_count=2), dtype=DTYPES, data=st.data(), seed=st.integers(0, 2**32 - 1),
       affine=st.booleans(), running=st.booleans(), use_out=st.sampled_from(["none", "fresh", "x"]))
def test_forward_training_any_strides(xp, sa, dtype, data, seed, affine, running, use_out):
    shape, axis = sa
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = strided(channel_values(rng, shape, axis), dtype, draw_layout(data, shape, axis, xp), xp=xp)
    x_ref = to_f64(x)
    weight = cast(rng.uniform(0.5, 2, C), "float64", xp) if affine else None
    bias = cast(rng.standard_normal(C), "float64", xp) if affine else None
    rm = cast(rng.standard_normal(C), "float32", xp) if running else None
    rv = cast(rng.uniform(0.5, 2, C), "float32", xp) if running else None
    rm0, rv0 = (to_f64(rm), to_f64(rv)) if running else (None, None)
    out = None
    if use_out == "fresh":
        out = strided(np.full(shape, np.nan), dtype, draw_layout(data, shape, axis, xp), xp=xp)
    elif use_out == "x":
        out = x
    y, mean, invstd = bn.forward_training(x, weight, bias, running_mean=rm, running_var=rv, axis=axis, out=out,
                                          momentum=0.2)
    if out is not None:
        assert y is out
    ref_mean, ref_var, count = ref_statistics(x_ref, axis)
    mt, vt = STAT_RTOL[dtype]
    assert_close(mean, ref_mean, mt, scale=np.sqrt(ref_var), what="saved_mean")
    assert_close(invstd, 1 / np.sqrt(ref_var + 1e-5), vt, scale=0.0, what="saved_invstd")
    assert_output(y, ref_normalize(x_ref, mean, invstd, weight, bias, axis), dtype, what="y")
    if running:
        e_rm, e_rv = ref_running_update(rm0, rv0, ref_mean, ref_var, count, 0.2)
        assert_close(rm, e_rm, 1e-5, what="running_mean")
        assert_close(rv, e_rv, 1e-5, what="running_var")


@arrays
@given(sa=shapes_and_axes(min_count=2), dtype=DTYPES, data=st.data(), seed=st.integers(0, 2**32 - 1),
       affine=st.booleans(), use_out=st.sampled_from(["none", "fresh", "dy"]))
def test_backward_any_strides(xp, sa, dtype, data, seed, affine, use_out):
    shape, axis = sa
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = strided(channel_values(rng, shape, axis), dtype, draw_layout(data, shape, axis, xp), xp=xp)
    dy = strided(rng.standard_normal(shape), dtype, draw_layout(data, shape, axis, xp), xp=xp)
    dy_ref, x_bits = to_f64(dy), bits(x)
    weight = cast(rng.uniform(0.5, 2, C) * rng.choice([-1, 1], C), "float64", xp) if affine else None
    _, mean, invstd = bn.forward_training(x, weight, axis=axis)
    out = None
    if use_out == "fresh":
        out = strided(np.full(shape, np.nan), dtype, draw_layout(data, shape, axis, xp), xp=xp)
    elif use_out == "dy":
        out = dy
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd, weight, axis=axis, out=out)
    if out is not None:
        assert dx is out
    assert bits(x) == x_bits
    e_dx, e_dw, e_db = ref_backward(dy_ref, x, mean, invstd, weight, axis)
    nd = len(shape)
    red = tuple(d for d in range(nd) if d != axis % nd)
    w = np.ones(C) if weight is None else to_f64(weight)
    shape_c = [1] * nd
    shape_c[axis] = C
    dx_scale = max(np.abs(e_dx).max(), (np.abs(dy_ref) * np.abs(w * to_f64(invstd)).reshape(shape_c)).max())
    assert_output(dx, e_dx, dtype, scale=dx_scale, what="dx")
    xhat = (to_f64(x) - to_f64(mean).reshape(shape_c)) * to_f64(invstd).reshape(shape_c)
    acc = 1e-12 if acc_dtype(dtype) == "float64" else 1e-5
    assert_close(dweight, e_dw, acc, scale=np.abs(dy_ref * xhat).sum(axis=red), what="dweight")
    assert_close(dbias, e_db, acc, scale=np.abs(dy_ref).sum(axis=red), what="dbias")
