"""Every op of the contract against the float64 NumPy reference of helpers.py, over shapes,
channel axes, memory layouts, dtypes, parameter variants and `out=`, on every device: the array
library `xp` is a parameter (NumPy on the CPU; CuPy and torch on CUDA, skipped with the reason
where there is no GPU), and only the creation of the inputs differs between devices. Plus
merge_statistics, fold (checked by running the folded conv) and the numerical-stability
promises."""
from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from helpers import (
    LAYOUTS,
    NUMPY,
    OUT_RTOL,
    CONTRACT_MEAN_RTOL,
    CONTRACT_VAR_RTOL,
    STAT_RTOL,
    acc_dtype,
    assert_close,
    assert_output,
    assert_same_kind,
    assert_statistics,
    base_of,
    bcast,
    bits,
    cast,
    channel_values,
    dtype_name,
    dtype_params,
    empty_like_dtype,
    lib_params,
    make_input,
    place,
    ref_backward,
    ref_fold,
    ref_forward_inference,
    ref_merge_statistics,
    ref_normalize,
    ref_running_update,
    ref_statistics,
    to_f64,
    to_host,
    vector,
)

# (shape, axis): (N,C), (N,C,L), (N,C,H,W), (N,C,D,H,W) with axis 1, -1 and a middle axis.
SHAPE_AXES = [
    ((6, 5), 1),
    ((6, 5), -1),
    ((6, 5), 0),
    ((4, 3, 7), 1),
    ((4, 3, 7), -1),
    ((3, 4, 5, 6), 1),
    ((3, 4, 5, 6), -1),
    ((3, 4, 5, 6), 2),
    ((2, 3, 3, 4, 5), 1),
    ((2, 3, 3, 4, 5), -1),
    ((2, 3, 3, 4, 5), -3),
    ((180, 3, 7, 7), 1),  # short rows (49 values) that the 8192-value blocks cut mid-row
    # Channels-last with whole SIMD channel blocks and a tail (16 float / 8 double lanes).
    ((6, 5, 37), -1),
    ((3, 4, 5, 20), -1),
    ((40, 17), 1),
]
# Sized for the CUDA kernels' paths, in contiguous memory only: few channels with many values
# (reductions split over blocks), channels-last tiles, many channels with few values, one
# channel, two values per channel.
CONTIGUOUS_SHAPE_AXES = [
    ((2, 3, 40, 56), 1), ((16, 9, 9, 24), -1), ((2, 2048, 3, 1), 1), ((1, 1, 2, 3), 1), ((2, 3, 1), 1),
]


def shape_id(shape, axis) -> str:
    return f"{'x'.join(map(str, shape))}-axis{axis}"


shape_axis_layout = pytest.mark.parametrize(
    "shape,axis,layout",
    [pytest.param(s, a, lay, id=f"{lay}-{shape_id(s, a)}") for (s, a) in SHAPE_AXES for lay in LAYOUTS]
    + [pytest.param(s, a, "contiguous", id=f"contiguous-{shape_id(s, a)}") for (s, a) in CONTIGUOUS_SHAPE_AXES],
)
all_dtypes = pytest.mark.parametrize("dtype", dtype_params())
# weight/bias: absent; of x's dtype; of another dtype (float64, or float32 for float64 x) as
# stride-2 views.
AFFINE = ("none", "same", "other-strided")
affine = pytest.mark.parametrize("params", AFFINE)
# The array library (and so the device) of a test's arrays.
arrays = pytest.mark.parametrize("xp", lib_params())


def other_dtype(dtype: str) -> str:
    return "float32" if dtype == "float64" else "float64"


def parameters(rng, C: int, dtype: str, variant: str, xp=NUMPY):
    if variant == "none":
        return None, None
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    if variant == "same":
        return vector(w, dtype, xp=xp), vector(b, dtype, xp=xp)
    return vector(w, other_dtype(dtype), True, xp), vector(b, other_dtype(dtype), True, xp)


def assert_vector(v, x, dtype: str, C: int) -> None:
    assert_same_kind(v, x, dtype, (C,))


# ---- statistics ---------------------------------------------------------------------------------


@shape_axis_layout
@all_dtypes
@arrays
def test_statistics(rng, shape, axis, layout, dtype, xp):
    x = make_input(rng, shape, dtype, layout, axis, xp)
    before = bits(x)
    mean, var, count = bn.statistics(x, axis=axis)
    C = shape[axis]
    ref_mean, ref_var, ref_count = ref_statistics(x, axis)
    assert type(count) is int and count == ref_count
    assert_vector(mean, x, acc_dtype(dtype), C)
    assert_vector(var, x, acc_dtype(dtype), C)
    assert_statistics(mean, var, ref_mean, ref_var, dtype)
    assert bits(x) == before
    # The CPU path on a host copy of the same values agrees to the same tolerance.
    cpu_mean, cpu_var, _ = bn.statistics(to_host(x), axis=axis)
    assert_statistics(mean, var, cpu_mean, cpu_var, dtype, what="vs CPU")


def test_statistics_default_axis_is_1(rng):
    x = make_input(rng, (4, 3, 5), "float64")
    a = bn.statistics(x)
    b = bn.statistics(x, axis=1)
    assert bits(a[0]) == bits(b[0]) and bits(a[1]) == bits(b[1]) and a[2] == b[2] == 20


# ---- forward_training ---------------------------------------------------------------------------


@shape_axis_layout
@all_dtypes
@affine
@arrays
def test_forward_training(rng, shape, axis, layout, dtype, params, xp):
    x = make_input(rng, shape, dtype, layout, axis, xp)
    C = shape[axis]
    weight, bias = parameters(rng, C, dtype, params, xp)
    before = [bits(a) for a in (x, weight, bias) if a is not None]
    # With affine parameters of x's dtype, float32 running statistics are updated too: the
    # update's reductions on every shape and layout (their dtypes and strides vary below).
    rm0, rv0 = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2.0, C).astype(np.float32)
    running = params == "same"
    rm, rv = (vector(rm0, "float32", xp=xp), vector(rv0, "float32", xp=xp)) if running else (None, None)
    eps = 1e-3
    y, saved_mean, saved_invstd = bn.forward_training(x, weight, bias, running_mean=rm, running_var=rv,
                                                      momentum=0.25, eps=eps, axis=axis)
    assert_same_kind(y, x, dtype, shape)
    assert_vector(saved_mean, x, acc_dtype(dtype), C)
    assert_vector(saved_invstd, x, acc_dtype(dtype), C)
    ref_mean, ref_var, count = ref_statistics(x, axis)
    mt, vt = STAT_RTOL[dtype]
    assert_close(saved_mean, ref_mean, mt, scale=np.sqrt(ref_var), what="saved_mean")
    assert_close(saved_invstd, 1 / np.sqrt(ref_var + eps), vt, scale=0.0, what="saved_invstd")
    # y against float64 arithmetic on the *returned* statistics: a few ulps of y's dtype.
    assert_output(y, ref_normalize(x, saved_mean, saved_invstd, weight, bias, axis), dtype, what="y")
    assert [bits(a) for a in (x, weight, bias) if a is not None] == before
    if running:
        e_rm, e_rv = ref_running_update(rm0, rv0, ref_mean, ref_var, count, 0.25)
        rtol = max(OUT_RTOL["float32"], STAT_RTOL[dtype][1])
        assert_close(rm, e_rm, rtol, what="running_mean")
        assert_close(rv, e_rv, rtol, what="running_var")


@pytest.mark.parametrize("x_dtype", dtype_params())
@pytest.mark.parametrize("running_dtype", dtype_params())
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
@arrays
def test_forward_training_running_stats(rng, x_dtype, running_dtype, strided, xp):
    shape, axis = (5, 4, 3, 3), 1
    x = make_input(rng, shape, x_dtype, "contiguous", axis, xp)
    rm0 = rng.standard_normal(4)
    rv0 = rng.uniform(0.5, 2.0, 4)
    running_mean = vector(rm0, running_dtype, strided, xp)
    running_var = vector(rv0, running_dtype, strided, xp)
    rm_start, rv_start = to_f64(running_mean), to_f64(running_var)
    momentum = 0.25
    y, saved_mean, _ = bn.forward_training(x, running_mean=running_mean, running_var=running_var, momentum=momentum)
    ref_mean, ref_var, count = ref_statistics(x, axis)
    exp_rm, exp_rv = ref_running_update(rm_start, rv_start, ref_mean, ref_var, count, momentum)
    rtol = max(OUT_RTOL[running_dtype], STAT_RTOL[x_dtype][1])
    assert dtype_name(running_mean) == running_dtype and dtype_name(running_var) == running_dtype
    assert_close(running_mean, exp_rm, rtol, what="running_mean")
    assert_close(running_var, exp_rv, rtol, what="running_var")
    if strided:  # the gaps between the strided elements are untouched (NaN)
        for r in (running_mean, running_var):
            parent = to_f64(base_of(r))
            assert np.isnan(parent[1::2]).all() and not np.isnan(parent[::2]).any()


@pytest.mark.parametrize("dtype", dtype_params(["float32", "float64"]))
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_running_stats_momentum_0_and_1(rng, dtype, layout):
    shape, axis = (6, 3, 4), 1
    x = make_input(rng, shape, dtype, layout, axis)
    rm, rv = rng.standard_normal(3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    bn.forward_training(x, running_mean=rm, running_var=rv, momentum=0.0)
    assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes(), "momentum 0 must keep the running stats"
    _, saved_mean, saved_invstd = bn.forward_training(x, running_mean=rm, running_var=rv, momentum=1.0)
    np.testing.assert_array_equal(rm, saved_mean.astype(dtype))  # momentum 1: the batch mean itself
    ref_mean, ref_var, count = ref_statistics(x, axis)
    assert_close(rv, ref_var * count / (count - 1), STAT_RTOL[dtype][1], scale=0.0, what="unbiased running_var")


@arrays
def test_parameter_vectors_of_any_dtype_and_stride(rng, xp):
    """weight float16 with stride 2, bias float64 with stride -1, running_mean float16 updated in
    float16, running_var float64 with stride 3 whose other elements stay as they were."""
    C = 7
    x = make_input(rng, (6, C, 11), "float32", xp=xp)
    w_np, b_np = rng.standard_normal(C), rng.standard_normal(C)
    rm_np, rv_np = rng.standard_normal(C), rng.random(C) + 0.5
    w = xp.view(cast(np.repeat(w_np, 2), "float16", xp), (slice(None, None, 2),))
    b = place(b_np[None, :], "float64", "reversed", 1, xp)[0]  # stride -1
    rm = cast(rm_np, "float16", xp)
    rv_big = cast(np.repeat(rv_np, 3), "float64", xp)
    rv = xp.view(rv_big, (slice(None, None, 3),))
    y, mean, invstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, momentum=0.5)
    ref_mean, ref_var, n = ref_statistics(x)
    assert_output(y, ref_normalize(x, mean, invstd, w, b_np), "float32", what="y")
    expect_rm = (0.5 * rm_np.astype(np.float16).astype(np.float64) + 0.5 * ref_mean).astype(np.float16)
    assert_close(rm, expect_rm, 2e-3, what="float16 running_mean")
    assert_close(rv, 0.5 * rv_np + 0.5 * ref_var * n / (n - 1), 1e-6, scale=0.0, what="strided running_var")
    np.testing.assert_array_equal(to_f64(rv_big).reshape(C, 3)[:, 1:], np.repeat(rv_np, 3).reshape(C, 3)[:, 1:])


def test_running_stats_accumulate_over_steps(rng):
    x1, x2 = make_input(rng, (8, 3, 5), "float64"), make_input(rng, (3, 3, 2), "float64")
    rm, rv = np.zeros(3), np.ones(3)
    bn.forward_training(x1, running_mean=rm, running_var=rv, momentum=0.3)
    bn.forward_training(x2, running_mean=rm, running_var=rv, momentum=0.3)
    m1, v1, n1 = ref_statistics(x1)
    m2, v2, n2 = ref_statistics(x2)
    e_rm, e_rv = ref_running_update(np.zeros(3), np.ones(3), m1, v1, n1, 0.3)
    e_rm, e_rv = ref_running_update(e_rm, e_rv, m2, v2, n2, 0.3)
    assert_close(rm, e_rm, 1e-12, what="running_mean")
    assert_close(rv, e_rv, 1e-12, what="running_var")


OUT_KINDS = ("contiguous", "strided", "transposed", "x")


def make_out(x, dtype: str, kind: str, axis: int, xp=NUMPY):
    """A preallocated output like x: dense, a stride-2 view (NaN gaps), other strides, or x."""
    if kind == "x":
        return x
    shape = tuple(x.shape)
    if kind == "contiguous":
        return empty_like_dtype(shape, dtype, xp=xp)
    return place(np.full(shape, np.nan), dtype, "sliced" if kind == "strided" else "transposed", axis, xp)


def gaps_untouched(out, kind: str) -> None:
    """A strided out's parent buffer (NaN-filled) changed exactly at out's elements."""
    if kind != "strided":
        return
    parent = base_of(out)
    assert parent is not None
    written = ~np.isnan(to_f64(parent))
    assert int(written.sum()) == int(np.prod(out.shape)), "out= wrote outside its elements"


@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), 1), ((3, 4, 5, 6), -1)], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@all_dtypes
@pytest.mark.parametrize("kind", OUT_KINDS)
@arrays
def test_forward_training_out(rng, shape, axis, layout, dtype, kind, xp):
    x = make_input(rng, shape, dtype, layout, axis, xp)
    x_ref = to_f64(x)
    C = shape[axis]
    weight, bias = parameters(rng, C, dtype, "other-strided", xp)
    out = make_out(x, dtype, kind, axis, xp)
    y, saved_mean, saved_invstd = bn.forward_training(x, weight, bias, axis=axis, out=out)
    assert y is out
    ref_mean, ref_var, _ = ref_statistics(x_ref, axis)
    assert_close(saved_mean, ref_mean, STAT_RTOL[dtype][0], scale=np.sqrt(ref_var), what="saved_mean")
    assert_output(out, ref_normalize(x_ref, saved_mean, saved_invstd, weight, bias, axis), dtype, what="out")
    gaps_untouched(out, kind)


# ---- forward_inference --------------------------------------------------------------------------


def inference_stats(rng, C: int, dtype: str, variant: str, xp=NUMPY):
    mean, var = rng.standard_normal(C), rng.uniform(0.3, 3.0, C)
    if variant == "none":
        return vector(mean, "float32", xp=xp), vector(var, "float32", xp=xp)
    if variant == "same":
        return vector(mean, dtype, xp=xp), vector(var, dtype, xp=xp)
    return vector(mean, other_dtype(dtype), True, xp), vector(var, other_dtype(dtype), True, xp)


@shape_axis_layout
@all_dtypes
@affine
@arrays
def test_forward_inference(rng, shape, axis, layout, dtype, params, xp):
    x = make_input(rng, shape, dtype, layout, axis, xp)
    C = shape[axis]
    weight, bias = parameters(rng, C, dtype, params, xp)
    mean, var = inference_stats(rng, C, dtype, params, xp)
    before = [bits(a) for a in (x, mean, var, weight, bias) if a is not None]
    y = bn.forward_inference(x, mean, var, weight, bias, eps=1e-4, axis=axis)
    assert_same_kind(y, x, dtype, shape)
    assert_output(y, ref_forward_inference(x, mean, var, weight, bias, 1e-4, axis), dtype, what="y")
    assert [bits(a) for a in (x, mean, var, weight, bias) if a is not None] == before


@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), 1), ((3, 4, 5, 6), -1), ((7, 5), 0)], ids=["NCHW", "NHWC", "CN"])
@all_dtypes
@pytest.mark.parametrize("kind", OUT_KINDS)
@arrays
def test_forward_inference_out(rng, shape, axis, dtype, kind, xp):
    x = make_input(rng, shape, dtype, "contiguous", axis, xp)
    x_ref = to_f64(x)
    C = shape[axis]
    # Parameters of four different dtypes (the contract allows any of the four for each).
    mean = vector(rng.standard_normal(C), "float32", xp=xp)
    var = vector(rng.uniform(0.3, 3.0, C), other_dtype(dtype), True, xp)
    weight = vector(rng.uniform(0.5, 2.0, C), "float16", xp=xp)
    bias = vector(rng.standard_normal(C), "float64", True, xp)
    out = make_out(x, dtype, kind, axis, xp)
    y = bn.forward_inference(x, mean, var, weight, bias, axis=axis, out=out)
    assert y is out
    assert_output(out, ref_forward_inference(x_ref, mean, var, weight, bias, 1e-5, axis), dtype, what="out")
    gaps_untouched(out, kind)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 4, 4), 1), ((2, 0, 3), -1), ((0, 4, 3), -1)])
def test_forward_inference_empty_batch(dtype, shape, axis):
    C = shape[axis]
    x = cast(np.zeros(shape), dtype)
    y = bn.forward_inference(x, np.zeros(C), np.ones(C), axis=axis)
    assert_same_kind(y, x, dtype, shape)
    out = cast(np.zeros(shape), dtype)
    assert bn.forward_inference(x, np.zeros(C), np.ones(C), axis=axis, out=out) is out


def test_forward_inference_eps_zero_and_default(rng):
    x = make_input(rng, (4, 3), "float64")
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([1.0, 4.0, 0.25])
    assert_output(bn.forward_inference(x, mean, var, eps=0), (to_f64(x) - mean) / np.sqrt(var), "float64")
    assert_output(bn.forward_inference(x, mean, var), (to_f64(x) - mean) / np.sqrt(var + 1e-5), "float64")


# ---- backward -----------------------------------------------------------------------------------


def assert_backward(dx, dweight, dbias, dy, x, mean, invstd, weight, axis, dtype, what=""):
    e_dx, e_dw, e_db = ref_backward(dy, x, mean, invstd, weight, axis)
    dy64, x64 = to_f64(dy), to_f64(x)
    nd = x64.ndim
    C = x64.shape[axis % nd]
    w = np.ones(C) if weight is None else to_f64(weight)
    # dx can cancel to ~0 (two values per channel): measure it against dy's scale too.
    dx_scale = max(np.max(np.abs(e_dx)), np.max(np.abs(dy64 * bcast(w * to_f64(invstd), nd, axis))))
    assert_output(dx, e_dx, dtype, scale=dx_scale, what=f"{what} dx")
    red = tuple(d for d in range(nd) if d != axis % nd)
    xhat = (x64 - bcast(to_f64(mean), nd, axis)) * bcast(to_f64(invstd), nd, axis)
    acc = OUT_RTOL[acc_dtype(dtype)]
    assert_close(dweight, e_dw, acc, scale=np.abs(dy64 * xhat).sum(axis=red), what=f"{what} dweight")
    assert_close(dbias, e_db, acc, scale=np.abs(dy64).sum(axis=red), what=f"{what} dbias")


@shape_axis_layout
@all_dtypes
@pytest.mark.parametrize("with_weight", [False, True], ids=["no-weight", "weight"])
@arrays
def test_backward(rng, shape, axis, layout, dtype, with_weight, xp):
    x = make_input(rng, shape, dtype, layout, axis, xp)
    dy = make_input(rng, shape, dtype, layout, axis, xp)
    C = shape[axis]
    weight = parameters(rng, C, dtype, "other-strided", xp)[0] if with_weight else None
    _, mean, invstd = bn.forward_training(x, weight, axis=axis)
    before = [bits(a) for a in (dy, x, mean, invstd, weight) if a is not None]
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd, weight, axis=axis)
    assert_same_kind(dx, x, dtype, shape)
    assert_vector(dweight, x, acc_dtype(dtype), C)
    assert_vector(dbias, x, acc_dtype(dtype), C)
    assert_backward(dx, dweight, dbias, dy, x, mean, invstd, weight, axis, dtype)
    assert [bits(a) for a in (dy, x, mean, invstd, weight) if a is not None] == before


@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("dy_layout", LAYOUTS)
@pytest.mark.parametrize("axis", [1, -1])
@arrays
def test_backward_mixed_layouts(rng, x_layout, dy_layout, axis, xp):
    shape = (3, 4, 5, 6)
    x = make_input(rng, shape, "float32", x_layout, axis, xp)
    dy = make_input(rng, shape, "float32", dy_layout, axis, xp)
    _, mean, invstd = bn.forward_training(x, axis=axis)
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd, axis=axis)
    assert_backward(dx, dweight, dbias, dy, x, mean, invstd, None, axis, "float32")


@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), 1), ((3, 4, 5, 6), -1)], ids=["NCHW", "NHWC"])
@all_dtypes
@pytest.mark.parametrize("kind", ["contiguous", "strided", "transposed", "dy"])
@arrays
def test_backward_out(rng, shape, axis, dtype, kind, xp):
    x = make_input(rng, shape, dtype, "contiguous", axis, xp)
    dy = make_input(rng, shape, dtype, "contiguous", axis, xp)
    dy_ref = to_f64(dy)
    weight = parameters(rng, shape[axis], dtype, "same", xp)[0]
    _, mean, invstd = bn.forward_training(x, weight, axis=axis)
    out = dy if kind == "dy" else make_out(x, dtype, kind, axis, xp)
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd, weight, axis=axis, out=out)
    assert dx is out
    assert_backward(out, dweight, dbias, cast(dy_ref, dtype), x, mean, invstd, weight, axis, dtype)
    gaps_untouched(out, kind)


def test_backward_with_arbitrary_statistics(rng):
    """backward is a function of its arguments: statistics need not be x's own."""
    x, dy = make_input(rng, (5, 3, 4), "float64"), make_input(rng, (5, 3, 4), "float64")
    mean, invstd = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd)
    assert_backward(dx, dweight, dbias, dy, x, mean, invstd, None, 1, "float64")


# ---- merge_statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", dtype_params(("float16", "float32", "float64")))
@pytest.mark.parametrize("axis", [1, -1])
@arrays
def test_merge_statistics_matches_whole_batch(rng, dtype, axis, xp):
    x = make_input(rng, (12, 4, 3, 5), dtype, "contiguous", axis, xp, loc=3.0)
    sizes = [3, 0, 1, 6, 2]  # a zero-count shard and a one-value-per-position shard
    means, vars, counts = [], [], []
    start = 0
    for size in sizes:
        C = x.shape[axis]
        if size == 0:  # garbage statistics that must be ignored
            means.append(cast(np.full(C, np.nan), "float32", xp))
            vars.append(cast(np.full(C, np.nan), "float32", xp))
            counts.append(0)
            continue
        m, v, n = bn.statistics(x[start:start + size], axis=axis)
        means.append(m)
        vars.append(v)
        counts.append(n)
        start += size
    mean, var, count = bn.merge_statistics(means, vars, counts)
    whole_mean, whole_var, whole_count = bn.statistics(x, axis=axis)
    ref_mean, ref_var, ref_count = ref_statistics(x, axis)
    assert count == whole_count == ref_count and type(count) is int
    assert dtype_name(mean) == acc_dtype(dtype) == dtype_name(var)
    assert_statistics(mean, var, ref_mean, ref_var, dtype, what="merged")
    assert_statistics(mean, var, to_f64(whole_mean), to_f64(whole_var), dtype, what="merged vs whole")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@arrays
def test_merge_statistics_of_many_shards(rng, dtype, xp):
    """45 shards (more than one launch's worth on CUDA) of 0..19 values, statistics of `dtype`,
    the variances as strided views; Chan's formula in float64 over the rounded shard values."""
    C = 9
    shards = [rng.standard_normal((int(rng.integers(0, 20)), C)) * 3 + 100 for _ in range(45)]
    shards[0] = rng.standard_normal((7, C))
    means = [cast(s.mean(axis=0) if len(s) else np.zeros(C), dtype, xp) for s in shards]
    vars = [vector(s.var(axis=0) if len(s) else np.zeros(C), dtype, True, xp) for s in shards]
    counts = [len(s) for s in shards]
    mean, var, count = bn.merge_statistics(means, vars, counts)
    assert count == sum(counts)
    assert_same_kind(mean, means[0], acc_dtype(dtype), (C,))
    e_mean, e_var, _ = ref_merge_statistics(means, vars, counts)
    tol = 1e-12 if dtype == "float64" else 1e-6  # results of a float64 merge, rounded once
    assert_close(mean, e_mean, tol, scale=0.0, what="mean")
    assert_close(var, e_var, tol, scale=0.0, what="var")
    # The CPU path on host copies agrees.
    cpu_mean, cpu_var, _ = bn.merge_statistics([to_host(m) for m in means], [to_host(v) for v in vars], counts)
    assert_close(mean, cpu_mean, tol, scale=0.0, what="mean vs CPU")
    assert_close(var, cpu_var, tol, scale=0.0, what="var vs CPU")


def test_merge_statistics_exact_formula(rng):
    means = [rng.standard_normal(5) * 10 ** k for k in range(4)]
    vars = [rng.uniform(0, 3, 5) for _ in range(4)]
    counts = [1, 7, 1000, 3]
    mean, var, count = bn.merge_statistics(means, vars, counts)
    e_mean, e_var, e_count = ref_merge_statistics(means, vars, counts)
    assert count == e_count == 1011
    assert_close(mean, e_mean, 1e-12, scale=np.sqrt(e_var), what="mean")
    assert_close(var, e_var, 1e-10, scale=0.0, what="var")


def test_merge_statistics_far_apart_means():
    """Shards 1e8 apart with tiny variances: Chan's formula, not E[x^2] - E[x]^2."""
    means = [np.array([1e8, -3.0]), np.array([1e8 + 1.0, -3.0])]
    vars = [np.array([0.25, 1e-12]), np.array([0.25, 1e-12])]
    mean, var, count = bn.merge_statistics(means, vars, [2, 2])
    np.testing.assert_allclose(mean, [1e8 + 0.5, -3.0], rtol=1e-15)
    np.testing.assert_allclose(var, [0.5, 1e-12], rtol=1e-9)


def exact_merge(means, vars, counts):
    """The merged (mean, biased variance) of float64 shards in exact rational arithmetic."""
    from fractions import Fraction

    total = sum(counts)
    out_mean, out_var = [], []
    for c in range(len(means[0])):
        s1 = sum(Fraction(float(m[c])) * n for m, n in zip(means, counts))
        s2 = sum((Fraction(float(v[c])) + Fraction(float(m[c])) ** 2) * n for m, v, n in zip(means, vars, counts))
        mean = s1 / total
        var = s2 / total - mean**2
        out_mean.append(float(mean))
        out_var.append(float(var) if var < Fraction(np.finfo(np.float64).max) else np.inf)
    return np.array(out_mean), np.array(out_var)


def assert_merged(mean, var, e_mean, e_var, what):
    """Merged statistics against exact ones: the mean to 1e-15 of its magnitude (or absolutely
    where it is 0), the variance to 1e-13 where finite and Inf where the exact one is past
    double's range."""
    assert_close(mean, e_mean, 1e-15, scale=np.where(e_mean == 0, 1.0, 0.0), what=f"mean of {what}")
    var, big = to_f64(var), np.isinf(e_var)
    assert (var[big] == np.inf).all(), f"var of {what}: {var} for {e_var}"
    assert_close(var[~big], e_var[~big], 1e-13, scale=0.0, what=f"var of {what}")


@arrays
def test_merge_statistics_at_double_s_limits(xp):
    """Finite shards whose plain Chan merge overflows though the result does not: means of
    opposite sign near 1.8e308 (their delta), a count x variance past it, delta^2 x weight
    past it. They gave a mean of -Inf (statistics of the concatenation: 0) and an Inf
    variance; the merge scales such shards by a power of two (merge_shard, core/recipes.h).
    Channels: [+-1e308: mean 0, variance 1e616 (Inf)], [+-1.7e308 over 3 and 5 values],
    [variance 1e305 over 10^4 and 3 x 10^4 values], [means +-1e154 over 10^6 values each: the
    variance 1e308 fits], [1.5 and 2.5 with variances 1 and 3: an ordinary channel beside them]."""
    means = [np.array([1e308, 1.7e308, 1e150, 1e154, 1.5]), np.array([-1e308, -1.7e308, -2e150, -1e154, 2.5])]
    vars = [np.array([0.0, 1e300, 1e305, 0.0, 1.0]), np.array([0.0, 2e290, 2e305, 0.0, 3.0])]
    counts = [[1, 3, 10**4, 10**6, 2], [1, 5, 3 * 10**4, 10**6, 2]]
    for c in range(5):  # one channel at a time: each has its own counts
        n = [counts[0][c], counts[1][c]]
        shard_means, shard_vars = [a[c : c + 1] for a in means], [a[c : c + 1] for a in vars]
        mean, var, count = bn.merge_statistics([cast(a, "float64", xp) for a in shard_means],
                                               [cast(a, "float64", xp) for a in shard_vars], n)
        assert count == sum(n)
        assert_merged(mean, var, *exact_merge(shard_means, shard_vars, n), f"channel {c}")
    # Review cases. A negative variance gives NaN also where the merge scales (scaled to -0 it
    # had passed for none: -0 or Inf), in either shard order.
    for shards in ([(2, 1e300, -1.0)], [(4, 1e305, 1e200), (5, 1.0, 1.0), (3, 1.0, -1.0)]):
        for order in (shards, shards[::-1]):
            _, var, _ = bn.merge_statistics([cast(np.array([m]), "float64", xp) for _, m, _ in order],
                                            [cast(np.array([v]), "float64", xp) for _, _, v in order],
                                            [n for n, _, _ in order])
            assert np.isnan(to_f64(var)).all(), f"{order}: {to_f64(var)}"
    # A tiny variance beside a huge mean keeps its bits where the plain merge is finite (the
    # scaled merge flushed it to 0).
    for mean_value, var_value in ((1e300, 1.0), (1.4e229, 4.6e-140)):
        m = [cast(np.array([mean_value]), "float64", xp)] * 2
        v = [cast(np.array([var_value]), "float64", xp)] * 2
        mean, var, _ = bn.merge_statistics(m[:1], v[:1], [2])
        assert to_f64(mean)[0] == mean_value and to_f64(var)[0] == var_value
        mean, var, _ = bn.merge_statistics(m, v, [2, 3])
        assert to_f64(mean)[0] == mean_value and to_f64(var)[0] == var_value
    # The mean of finite shards stays finite when the weight rounds to 1 at double's edge.
    big = np.finfo(np.float64).max
    for means, counts in (([np.nextafter(big, 0), -big], [1, 2**53]), ([-np.nextafter(big, 0), big], [3, 2**62])):
        mean, _, _ = bn.merge_statistics([cast(np.array([a]), "float64", xp) for a in means],
                                         [cast(np.array([0.0]), "float64", xp)] * 2, counts)
        assert np.isfinite(to_f64(mean)).all() and abs(to_f64(mean)[0]) >= np.nextafter(big, 0), to_f64(mean)
    # statistics of the concatenation agrees on the first channel's shards.
    whole_mean, whole_var, _ = bn.statistics(np.array([[1e308], [-1e308]]))
    assert whole_mean[0] == 0.0 and whole_var[0] == np.inf
    # Many shards (more than one CUDA launch's worth) of which one is huge: the scale rises part
    # way and the ordinary shards before it are rescaled exactly.
    rng = np.random.default_rng(3)
    ms = [rng.standard_normal(4) for _ in range(40)]
    vs = [rng.uniform(0, 2, 4) for _ in range(40)]
    ms[33] = np.array([1.6e308, -1.6e308, 1e150, 0.0])  # variances: Inf, Inf, finite, finite
    vs[33] = np.array([0.0, 1e307, 0.0, 1e300])
    ns = [int(k) for k in rng.integers(1, 50, 40)]
    mean, var, _ = bn.merge_statistics([cast(a, "float64", xp) for a in ms], [cast(a, "float64", xp) for a in vs], ns)
    assert_merged(mean, var, *exact_merge(ms, vs, ns), "40 shards")


def test_merge_statistics_single_shard_and_mixed_inputs(rng):
    m, v = rng.standard_normal(3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
    mean, var, count = bn.merge_statistics([m], [v], [5])
    assert count == 5 and mean.dtype == np.float32
    np.testing.assert_array_equal(mean, m)
    np.testing.assert_allclose(var, v, rtol=1e-6)
    # Shards of other dtypes, strided vectors, NumPy integer counts and tuples are accepted;
    # the result follows means[0] (float64 here).
    m2 = np.repeat(rng.standard_normal(3), 2)[::2].astype(np.float16)
    mean, var, count = bn.merge_statistics((m.astype(np.float64), m2), (v, v.astype(np.float16)), (np.int64(5), 3))
    assert count == 8 and mean.dtype == np.float64 and var.dtype == np.float64
    e_mean, e_var, _ = ref_merge_statistics([m, m2], [v, v.astype(np.float16)], [5, 3])
    assert_close(mean, e_mean, 1e-12, scale=np.sqrt(e_var))
    assert_close(var, e_var, 1e-12, scale=0.0)


# ---- fold -----------------------------------------------------------------------------------------


def conv2d(x, k, b=None):
    """Valid, stride-1 cross-correlation (PyTorch's Conv2d): x (N,I,H,W), k (O,I,kh,kw)."""
    win = np.lib.stride_tricks.sliding_window_view(x, k.shape[2:], axis=(2, 3))  # N,I,H',W',kh,kw
    y = np.einsum("nihwpq,oipq->nohw", win, k)
    return y if b is None else y + b[None, :, None, None]


def conv_transpose2d(x, k, b=None):
    """Stride-1 transposed conv (PyTorch's ConvTranspose2d): x (N,I,H,W), k (I,O,kh,kw)."""
    N, _, H, W = x.shape
    _, O, kh, kw = k.shape
    y = np.zeros((N, O, H + kh - 1, W + kw - 1))
    for p in range(kh):
        for q in range(kw):
            y[:, :, p:p + H, q:q + W] += np.einsum("nihw,io->nohw", x, k[:, :, p, q])
    return y if b is None else y + b[None, :, None, None]


def bn_params(rng, C):
    return rng.standard_normal(C), rng.uniform(0.2, 3.0, C), rng.uniform(0.5, 2, C), rng.standard_normal(C)


@pytest.mark.parametrize("with_conv_bias", [True, False], ids=["conv-bias", "no-conv-bias"])
@pytest.mark.parametrize("kernel_layout", ["contiguous", "transposed", "reversed"])
@arrays
def test_fold_conv2d(rng, with_conv_bias, kernel_layout, xp):
    O, I = 4, 3
    k = place(rng.standard_normal((O, I, 3, 2)), "float64", kernel_layout, 0, xp)
    cb = vector(rng.standard_normal(O), "float64", xp=xp) if with_conv_bias else None
    mean, var, w, b = (vector(v, "float64", xp=xp) for v in bn_params(rng, O))
    k2, b2 = bn.fold(k, cb, mean, var, w, b, eps=1e-3, axis=0)
    assert_same_kind(k2, k, "float64", k.shape)
    assert_same_kind(b2, k, "float64", (O,))
    e_k, e_b = ref_fold(k, cb, mean, var, w, b, 1e-3, 0)
    assert_output(k2, e_k, "float64", what="kernel'")
    assert_output(b2, e_b, "float64", what="bias'")
    x = rng.standard_normal((2, I, 6, 5))
    cb_host = None if cb is None else to_f64(cb)
    bn_of_conv = bn.forward_inference(conv2d(x, to_f64(k), cb_host), *(to_host(v) for v in (mean, var, w, b)), eps=1e-3)
    assert_output(conv2d(x, to_f64(k2), to_f64(b2)), bn_of_conv, "float64", what="conv(x, k') + b'")


def test_fold_conv_transpose2d(rng):
    I, O = 3, 5
    k = rng.standard_normal((I, O, 2, 3))
    cb = rng.standard_normal(O)
    mean, var, w, b = bn_params(rng, O)
    k2, b2 = bn.fold(k, cb, mean, var, w, b, axis=1)
    e_k, e_b = ref_fold(k, cb, mean, var, w, b, 1e-5, 1)
    assert_output(k2, e_k, "float64", what="kernel'")
    assert_output(b2, e_b, "float64", what="bias'")
    x = rng.standard_normal((2, I, 4, 3))
    bn_of_conv = bn.forward_inference(conv_transpose2d(x, k, cb), mean, var, w, b)
    assert_output(conv_transpose2d(x, k2, b2), bn_of_conv, "float64", what="conv_transpose(x, k') + b'")


@pytest.mark.parametrize("dtype", dtype_params(("float16", "float32", "float64", "bfloat16")))
@pytest.mark.parametrize("axis", [0, 1])
@arrays
def test_fold_linear(rng, dtype, axis, xp):
    """A Linear weight (O, I) folded along axis 0, or its transpose (I, O) along axis 1, with
    parameters of mixed dtypes and strides."""
    O, I = 6, 4
    k = cast(rng.standard_normal((O, I)), dtype, xp)
    k = k if axis == 0 else k.T
    mean, var, w, b = bn_params(rng, O)
    mean = vector(mean, "float32", xp=xp)
    var, w, b = vector(var, "float32", xp=xp), vector(w, "float64", xp=xp), vector(b, "float64", True, xp)
    k2, b2 = bn.fold(k, None, mean, var, w, b, axis=axis)
    assert_same_kind(k2, k, dtype, k.shape)
    assert_same_kind(b2, k, dtype, (O,))
    e_k, e_b = ref_fold(k, None, mean, var, w, b, 1e-5, axis)
    # Computed in float64, rounded once to the kernel's dtype: within half an ulp.
    assert_output(k2, e_k, dtype, what="kernel'")
    assert_output(b2, e_b, dtype, what="bias'")
    x = rng.standard_normal((5, I))
    k_oi, k2_oi = (to_f64(a) if axis == 0 else to_f64(a).T for a in (k, k2))
    bn_of_linear = ref_forward_inference(x @ k_oi.T, mean, var, w, b)
    assert_output(x @ k2_oi.T + to_f64(b2), bn_of_linear, dtype, what="linear(x, k') + b'")


def test_fold_defaults(rng):
    """weight, bias and conv_bias None mean 1, 0 and 0; eps defaults to 1e-5."""
    k = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    k2, b2 = bn.fold(k, None, mean, var)
    e_k, e_b = ref_fold(k, None, mean, var)
    assert_output(k2, e_k, "float32")
    assert_output(b2, e_b, "float32")


# ---- numerical stability (float32 at extreme conditioning) -------------------------------------


def assert_contract_statistics(mean, var, x, axis, what=""):
    ref_mean, ref_var, _ = ref_statistics(x, axis)
    assert_close(mean, ref_mean, CONTRACT_MEAN_RTOL, scale=0.0, what=f"{what} mean")
    assert_close(var, ref_var, CONTRACT_VAR_RTOL, scale=0.0, what=f"{what} var")


@pytest.mark.parametrize("axis", [1, -1], ids=["channels-first", "channels-last"])
@arrays
def test_stability_mean_1e5_std_1e2(rng, axis, xp):
    shape = (64, 3, 40) if axis == 1 else (64, 40, 3)
    x = cast(1e5 + 1e-2 * rng.standard_normal(shape), "float32", xp)
    mean, var, _ = bn.statistics(x, axis=axis)
    assert_contract_statistics(mean, var, x, axis, "mean 1e5 std 1e-2")
    y, saved_mean, saved_invstd = bn.forward_training(x, axis=axis, eps=0.0)
    ref_mean, ref_var, _ = ref_statistics(x, axis)
    assert_close(saved_invstd, 1 / np.sqrt(ref_var), CONTRACT_VAR_RTOL, scale=0.0, what="saved_invstd")
    # x - mean is exact in float32 here: y keeps every digit of the tiny deviations.
    assert_output(y, ref_normalize(x, saved_mean, saved_invstd, axis=axis), "float32", what="y")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@arrays
def test_statistics_huge_mean(rng, dtype, xp):
    """The contract: a channel's mean may be 1e8 times its std (float32: 1e7, as the values'
    ulp allows); here over many values per channel, split over blocks on CUDA."""
    center, spread = (1e3, 1e-4) if dtype == "float32" else (1e8, 1.0)
    x = cast(center + spread * rng.standard_normal((64, 2, 999)), dtype, xp)
    mean, var, _ = bn.statistics(x)
    assert_contract_statistics(mean, var, x, 1, "huge mean")


def quantized_channels(rng, count, C, axis_last):
    """float32 channels whose mean is ~1e8 times their std: a power-of-two-scaled constant
    with a small fraction of values one ulp above it (the first value among them)."""
    cols = []
    for c in range(C):
        base = np.float32((1.5 + 0.1 * c) * 2.0 ** (20 + 3 * c)) * (-1 if c == 1 else 1)
        ulp = np.spacing(np.abs(base))
        bumps = rng.random(count) < 1e-3 * (c + 1)
        bumps[0] = True  # an off-centre first value
        cols.append((base + np.where(bumps, ulp, 0)).astype(np.float32))
    x = np.stack(cols, axis=1)  # (count, C)
    return x if axis_last else np.ascontiguousarray(x.T)[None]  # (1, C, count)


@pytest.mark.parametrize("axis", [1, -1], ids=["channels-first", "channels-last"])
def test_stability_mean_1e8_std(rng, axis):
    x = quantized_channels(rng, 60_000, 3, axis == -1)
    ref_mean, ref_var, _ = ref_statistics(x, axis)
    assert (np.abs(ref_mean) / np.sqrt(ref_var) > 1e8).any()
    mean, var, _ = bn.statistics(x, axis=axis)
    assert_contract_statistics(mean, var, x, axis, "mean 1e8 std")
    _, saved_mean, saved_invstd = bn.forward_training(x, axis=axis, eps=0.0)
    assert_close(saved_invstd, 1 / np.sqrt(ref_var), CONTRACT_VAR_RTOL, scale=0.0, what="saved_invstd")


@pytest.mark.parametrize("axis", [1, -1], ids=["channels-first", "channels-last"])
def test_stability_large_channels(rng, axis):
    n = 2_000_000
    shape = (2, 3, n // 2) if axis == 1 else (n, 3)
    x = (100.0 + rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    mean, var, count = bn.statistics(x, axis=axis)
    assert count == n
    assert_contract_statistics(mean, var, x, axis, "3 x 2e6")
    # Well within the contract for ordinary data at this size.
    ref_mean, ref_var, _ = ref_statistics(x, axis)
    assert_statistics(mean, var, ref_mean, ref_var, "float32", what="3 x 2e6")


@pytest.mark.parametrize("axis", [1, -1], ids=["channels-first", "channels-last"])
def test_stability_outlier_first_element(rng, axis):
    shape = (20_000, 3)
    x = (1000.0 + rng.standard_normal(shape)).astype(np.float32)
    x[0] = [0.0, 1e6, -3e4]  # a provisional centre far from the channel's mean
    if axis == 1:
        x = np.ascontiguousarray(x.T)[None]
    mean, var, _ = bn.statistics(x, axis=axis)
    assert_contract_statistics(mean, var, x, axis, "outlier first")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("axis", [1, -1], ids=["channels-first", "channels-last"])
def test_constant_channel_has_zero_variance(dtype, axis):
    values = np.broadcast_to(np.array([0.1, -7.3, 1e3]), (50, 3))
    x = cast(values if axis == -1 else np.ascontiguousarray(values.T)[None], dtype)
    mean, var, _ = bn.statistics(x, axis=axis)
    np.testing.assert_array_equal(to_f64(var), 0.0)
    np.testing.assert_allclose(to_f64(mean), ref_statistics(x, axis)[0], rtol=1e-7)
    y, _, invstd = bn.forward_training(x, bias=np.array([1.0, 2.0, 3.0]), axis=axis, eps=1e-2)
    assert_close(invstd, np.full(3, 10.0), 1e-6, what="invstd of a constant channel")
    assert_output(y, np.broadcast_to(bcast([1.0, 2.0, 3.0], 3 if axis == 1 else 2, axis), y.shape), dtype, what="y")


@pytest.mark.parametrize("shape,axis", [((1, 4), 1), ((1, 4, 1, 1), 1), ((1, 1, 4), -1)])
def test_statistics_of_one_value(rng, shape, axis):
    x = rng.standard_normal(shape).astype(np.float32)
    mean, var, count = bn.statistics(x, axis=axis)
    assert count == 1
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_array_equal(mean, x.reshape(-1))


# ---- unusual but valid memory -------------------------------------------------------------------


# Shapes large enough to take every path sized for a whole GPU: channels split over many
# blocks, channels-last tiles over many position ranges, many channels with few values. The
# CPU's counterparts (blocks cut mid-row, 2e6 values per channel) are above; these run on CUDA.
LARGE_SHAPES = [
    ((32, 64, 56, 56), 1),
    ((4, 3, 224, 224), 1),
    ((16, 28, 28, 256), -1),
    ((65536, 64), 1),
    ((64, 2048, 7, 7), 1),
    ((8, 7, 7, 2048), -1),
]


@pytest.mark.parametrize("dtype", dtype_params(["bfloat16", "float32"]))
@pytest.mark.parametrize("shape,axis", LARGE_SHAPES)
@pytest.mark.parametrize("xp", lib_params(["torch-cuda"]))
def test_large_shapes_every_op(rng, dtype, shape, axis, xp):
    C = shape[axis]
    x = cast(rng.standard_normal(shape, dtype=np.float32) * 2 + 3, dtype, xp)
    dy = cast(rng.standard_normal(shape, dtype=np.float32), dtype, xp)
    w, b = vector(rng.standard_normal(C), "float32", xp=xp), vector(rng.standard_normal(C), "float32", xp=xp)
    rm, rv = vector(np.zeros(C), "float32", xp=xp), vector(np.ones(C), "float32", xp=xp)
    y, saved_mean, saved_invstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis)
    ref_mean, ref_var, n = ref_statistics(x, axis)
    assert_close(saved_mean, ref_mean, STAT_RTOL[dtype][0], scale=np.sqrt(ref_var), what="saved_mean")
    assert_close(saved_invstd, 1 / np.sqrt(ref_var + 1e-5), STAT_RTOL[dtype][1], scale=0.0, what="saved_invstd")
    assert_output(y, ref_normalize(x, saved_mean, saved_invstd, w, b, axis), dtype, what="y")
    assert_close(rv, 0.9 + 0.1 * ref_var * n / (n - 1), OUT_RTOL["float32"], what="running_var")
    yi = bn.forward_inference(x, saved_mean, vector(ref_var, "float32", xp=xp), w, b, axis=axis)
    assert_output(yi, ref_forward_inference(x, saved_mean, ref_var.astype(np.float32), w, b, 1e-5, axis), dtype,
                  what="inference y")
    dx, dweight, dbias = bn.backward(dy, x, saved_mean, saved_invstd, w, axis=axis)
    assert_backward(dx, dweight, dbias, dy, x, saved_mean, saved_invstd, w, axis, dtype)


@pytest.mark.parametrize("axis", [1, -1])
def test_broadcast_inputs_with_zero_strides(rng, axis):
    """Read-only broadcast views (stride 0) are valid inputs, read without a copy."""
    x = np.broadcast_to(rng.standard_normal((6, 1, 5)).astype(np.float32), (6, 4, 5))
    x = x if axis == 1 else np.moveaxis(x, 1, -1)
    dy = np.broadcast_to(rng.standard_normal((1, 1, 1)).astype(np.float32), x.shape)
    mean, var, _ = bn.statistics(x, axis=axis)
    ref_mean, ref_var, _ = ref_statistics(x, axis)
    assert_statistics(mean, var, ref_mean, ref_var, "float32")
    y, m, s = bn.forward_training(x, axis=axis)
    assert_output(y, ref_normalize(x, m, s, axis=axis), "float32", what="y")
    dx, dweight, dbias = bn.backward(dy, x, m, s, axis=axis)
    assert_backward(dx, dweight, dbias, dy, x, m, s, None, axis, "float32")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("axis", [1, -1])
def test_misaligned_arrays(rng, dtype, axis):
    """Data one byte off its natural alignment (NumPy allows it): no aligned-load assumptions."""
    shape = (4, 3, 50) if axis == 1 else (4, 50, 3)

    def misaligned(values):
        a = np.ndarray(shape, dtype, buffer=bytearray(np.dtype(dtype).itemsize * values.size + 1), offset=1)
        a[...] = values
        assert not a.flags.aligned
        return a

    x = misaligned(channel_values(rng, shape, axis))
    dy = misaligned(rng.standard_normal(shape))
    out = misaligned(np.zeros(shape))
    y, mean, invstd = bn.forward_training(x, axis=axis, out=out)
    assert y is out
    assert_output(out, ref_normalize(x, mean, invstd, axis=axis), dtype, what="y")
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd, axis=axis, out=out)
    assert_backward(dx, dweight, dbias, dy, x, mean, invstd, None, axis, dtype)
