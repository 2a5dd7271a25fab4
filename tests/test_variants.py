"""The training variants of forward_training / backward (API.md "Training variants"): batch
renorm against a float64 implementation of Ioffe 2017's algorithm and against Keras' renorm
formulas, ghost batch norm against plain batch norm on each group, skip_nonfinite,
running_var_unbiased, and the Keras convention of the BatchNorm layer against
tf.keras.layers.BatchNormalization's documented formulas; over dtypes, layouts, axes and
array libraries (CUDA ones collected and skipped without a device)."""
from __future__ import annotations

import re

import numpy as np
import pytest

import batchnorm as bn
from helpers import (
    LAYOUTS,
    OUT_RTOL,
    TOLERANCE,
    acc_dtype,
    bits,
    cast,
    channel_values,
    dtype_params,
    lib_params,
    place,
    to_f64,
)

# ---- float64 references ----------------------------------------------------------------------


def _reduce_axes(ndim, axis):
    return tuple(d for d in range(ndim) if d != axis % ndim)


def _bc(v, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v, np.float64).reshape(shape)


def renorm_reference(x, w, b, rm, rv, momentum, eps, rmax, dmax, axis):
    """Algorithm 1 of Ioffe 2017 in float64: (y, mean, invstd, r, d, new rm, new rv), running
    variance updated with the unbiased batch variance (PyTorch's convention)."""
    red = _reduce_axes(x.ndim, axis)
    n = x.size // x.shape[axis % x.ndim]
    mu = x.mean(axis=red)
    var = x.var(axis=red)
    sigma_b = np.sqrt(var + eps)
    sigma_r = np.sqrt(rv + eps)
    r = np.clip(sigma_b / sigma_r, 1 / rmax, rmax)
    d = np.clip((mu - rm) / sigma_r, -dmax, dmax)
    xhat = (x - _bc(mu, x.ndim, axis)) / _bc(sigma_b, x.ndim, axis)
    y = _bc(w, x.ndim, axis) * (xhat * _bc(r, x.ndim, axis) + _bc(d, x.ndim, axis)) + _bc(b, x.ndim, axis)
    new_rm = (1 - momentum) * rm + momentum * mu
    new_rv = (1 - momentum) * rv + momentum * var * n / (n - 1)
    return y, mu, 1 / sigma_b, r, d, new_rm, new_rv


def renorm_backward_reference(dy, x, w, r, d, eps, axis):
    """The gradients of y = w * (x_hat * r + d) + b with r and d constant (stop_gradient), in
    float64: the plain backward with w * r, dweight = sum(dy * (x_hat * r + d))."""
    red = _reduce_axes(x.ndim, axis)
    mu = x.mean(axis=red, keepdims=True)
    invstd = 1 / np.sqrt(x.var(axis=red, keepdims=True) + eps)
    xhat = (x - mu) * invstd
    g = dy * _bc(w * r, x.ndim, axis)
    dx = invstd * (g - g.mean(axis=red, keepdims=True) - xhat * (g * xhat).mean(axis=red, keepdims=True))
    dweight = (dy * (xhat * _bc(r, x.ndim, axis) + _bc(d, x.ndim, axis))).sum(axis=red)
    return dx, dweight, dy.sum(axis=red)


def assert_close(got, want, rtol, what):
    want = np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(to_f64(got) - want).max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:.1g} x scale {scale:.3g}"


# ---- batch renorm ----------------------------------------------------------------------------


@pytest.mark.parametrize("xp", lib_params())
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("axis", [1, -1])
def test_renorm_against_the_paper(xp, dtype, layout, axis):
    rng = np.random.default_rng(7)
    shape = (6, 5, 4, 3) if axis == 1 else (6, 4, 3, 5)
    x64 = channel_values(rng, shape, axis, loc=0.5)
    C = shape[axis]
    w = rng.uniform(0.5, 2, C)
    b = rng.uniform(-1, 1, C)
    # Running statistics chosen so that some channels clip r, some d, some neither.
    rm = np.array([0.0, 3.0, -3.0, 0.1, 0.2])
    rv = np.array([1.0, 0.01, 50.0, 1.5, 0.8])
    rmax, dmax = 1.5, 0.75
    x = place(x64, dtype, layout, axis, xp)
    xq = to_f64(x)  # the values as stored
    acc = acc_dtype(dtype)
    running_mean, running_var = cast(rm, acc, xp), cast(rv, acc, xp)
    y, mean, invstd, r, d = bn.forward_training(
        x, cast(w, acc, xp), cast(b, acc, xp), running_mean=running_mean, running_var=running_var,
        momentum=0.25, eps=1e-3, axis=axis, renorm=(rmax, dmax),
    )  # fmt: skip
    want = renorm_reference(xq, w, b, rm, rv, 0.25, 1e-3, rmax, dmax, axis)
    rt = TOLERANCE["var"][dtype]
    assert_close(r, want[3], rt, "r")
    assert_close(d, want[4], max(rt, 1e-6), "d")
    assert np.any(to_f64(r) == rmax) and np.any(to_f64(r) == 1 / np.float32(rmax)) or dtype == "float64"
    assert np.any(np.abs(to_f64(d)) == dmax)
    assert_close(y, want[0], OUT_RTOL[dtype] * 4, "y")
    assert_close(mean, want[1], TOLERANCE["mean"][dtype] * 10, "saved_mean")
    assert_close(invstd, want[2], TOLERANCE["var"][dtype], "saved_invstd")
    assert_close(running_mean, want[5], TOLERANCE["var"][dtype], "running_mean")
    assert_close(running_var, want[6], TOLERANCE["var"][dtype], "running_var")
    # Backward with r and d as constants.
    dy64 = rng.standard_normal(shape)
    dy = place(dy64, dtype, layout, axis, xp)
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd, cast(w, acc, xp), axis=axis, renorm=(r, d))
    wdx, wdw, wdb = renorm_backward_reference(to_f64(dy), xq, w, to_f64(r), to_f64(d), 1e-3, axis)
    assert_close(dx, wdx, OUT_RTOL[dtype] * 8, "dx")
    assert_close(dweight, wdw, TOLERANCE["sum"][dtype] * 10, "dweight")
    assert_close(dbias, wdb, TOLERANCE["sum"][dtype] * 10, "dbias")


def test_renorm_identity_when_running_equals_batch():
    """r = 1 and d = 0 when the running statistics are the batch's: plain batch norm's y."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 3, 5))
    mu, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    y, _, _, r, d = bn.forward_training(x, running_mean=mu.copy(), running_var=var.copy(), renorm=(3.0, 5.0))
    plain, _, _ = bn.forward_training(x)
    np.testing.assert_allclose(r, 1.0, rtol=1e-14)
    np.testing.assert_allclose(d, 0.0, atol=1e-14)
    np.testing.assert_allclose(y, plain, rtol=1e-13, atol=1e-13)


def test_renorm_against_keras_formulas():
    """tf.keras.layers.BatchNormalization(renorm=True, renorm_clipping={rmax, rmin=1/rmax,
    dmax}, momentum=m) with its renorm moving statistics equal to ours (renorm_mean =
    moving_mean, renorm_stddev = sqrt(moving_variance + eps)): Keras' formulas written out.
    Keras updates its moving variance with the biased variance: running_var_unbiased=False."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, 6, 6, 4)) * [0.5, 1, 2, 4] + [0, 1, -1, 3]  # NHWC, Keras' layout
    gamma, beta = rng.uniform(0.5, 1.5, 4), rng.uniform(-0.5, 0.5, 4)
    moving_mean, moving_variance = np.array([0.0, 2.0, -1.0, 3.0]), np.array([1.0, 0.2, 9.0, 16.0])
    momentum, eps, rmax, dmax = 0.99, 1e-3, 2.0, 1.0
    # Keras (keras/layers/normalization/batch_normalization.py, _renorm_correction_and_moments):
    mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    stddev = np.sqrt(variance + eps)
    renorm_mean, renorm_stddev = moving_mean, np.sqrt(moving_variance + eps)
    k_r = np.clip(stddev / renorm_stddev, 1 / rmax, rmax)
    k_d = np.clip((mean - renorm_mean) / renorm_stddev, -dmax, dmax)
    k_y = (x - mean) / stddev * k_r + k_d
    k_y = k_y * gamma + beta
    k_moving_mean = moving_mean * momentum + mean * (1 - momentum)
    k_moving_variance = moving_variance * momentum + variance * (1 - momentum)
    rm, rv = moving_mean.copy(), moving_variance.copy()
    y, _, _, r, d = bn.forward_training(
        x, gamma, beta, running_mean=rm, running_var=rv, momentum=1 - momentum, eps=eps, axis=-1,
        renorm=(rmax, dmax), running_var_unbiased=False,
    )  # fmt: skip
    np.testing.assert_allclose(r, k_r, rtol=1e-13)
    np.testing.assert_allclose(d, k_d, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(y, k_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, k_moving_mean, rtol=1e-13)
    np.testing.assert_allclose(rv, k_moving_variance, rtol=1e-13)


def test_renorm_nan_propagates():
    x = np.ones((4, 2, 3))
    x[1, 0, 2] = np.nan
    y, _, _, r, d = bn.forward_training(x, running_mean=np.zeros(2), running_var=np.ones(2), renorm=(3.0, 5.0))
    assert np.isnan(r[0]) and np.isnan(d[0]) and np.isnan(y[:, 0]).all()
    assert np.isfinite(r[1]) and np.isfinite(y[:, 1]).all()


# ---- ghost batch norm ------------------------------------------------------------------------


@pytest.mark.parametrize("xp", lib_params())
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("fused", [False, True])
def test_ghost_equals_plain_per_group(xp, dtype, layout, fused):
    rng = np.random.default_rng(5)
    N, G, C = 12, 4, 3
    shape = (N, C, 5, 2)
    x64 = channel_values(rng, shape, 1, loc=2.0)
    x = place(x64, dtype, layout, 1, xp)
    acc = acc_dtype(dtype)
    w, b = cast(rng.uniform(0.5, 2, C), acc, xp), cast(rng.uniform(-1, 1, C), acc, xp)
    res = place(rng.standard_normal(shape), dtype, layout, 1, xp) if fused else None
    act = "relu" if fused else None
    rm, rv = cast(np.full(C, 0.5), acc, xp), cast(np.full(C, 2.0), acc, xp)
    y, mean, invstd = bn.forward_training(
        x, w, b, running_mean=rm, running_var=rv, momentum=0.3, ghost_batch=G, residual=res, activation=act
    )
    assert tuple(mean.shape) == tuple(invstd.shape) == (N // G, C)
    for g in range(N // G):
        sl = slice(g * G, (g + 1) * G)
        yg, mg, sg = bn.forward_training(
            x[sl], w, b, residual=None if res is None else res[sl], activation=act
        )
        assert bits(y[sl]) == bits(yg), f"group {g}: y differs from plain batch norm on the group"
        assert bits(mean[g]) == bits(mg) and bits(invstd[g]) == bits(sg)
    # Running statistics: once, with the whole batch's statistics.
    rm2, rv2 = cast(np.full(C, 0.5), acc, xp), cast(np.full(C, 2.0), acc, xp)
    bn.forward_training(x, w, b, running_mean=rm2, running_var=rv2, momentum=0.3)
    np.testing.assert_allclose(to_f64(rm), to_f64(rm2), rtol=TOLERANCE["var"][dtype], atol=1e-7)
    np.testing.assert_allclose(to_f64(rv), to_f64(rv2), rtol=TOLERANCE["var"][dtype])
    # Backward: each group's dx is plain backward's on the group; dweight/dbias the sums in group order.
    dy = place(rng.standard_normal(shape), dtype, layout, 1, xp)
    out = bn.backward(dy, x, mean, invstd, w, ghost_batch=G, y=y if fused else None, activation=act, residual=fused)
    dx, dw, db = out[:3]
    want_dw = want_db = None
    for g in range(N // G):
        sl = slice(g * G, (g + 1) * G)
        og = bn.backward(dy[sl], x[sl], mean[g], invstd[g], w, y=y[sl] if fused else None, activation=act,
                         residual=fused)  # fmt: skip
        assert bits(dx[sl]) == bits(og[0]), f"group {g}: dx differs"
        if fused:
            assert bits(out[3][sl]) == bits(og[3])
        want_dw = og[1] if want_dw is None else want_dw + og[1]
        want_db = og[2] if want_db is None else want_db + og[2]
    assert bits(dw) == bits(want_dw) and bits(db) == bits(want_db)


def test_ghost_single_group_is_plain_batch_norm():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 4, 6)).astype(np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y, m, s = bn.forward_training(x, running_mean=rm, running_var=rv, ghost_batch=8)
    rm2, rv2 = np.zeros(4, np.float32), np.ones(4, np.float32)
    y2, m2, s2 = bn.forward_training(x, running_mean=rm2, running_var=rv2)
    assert bits(y) == bits(y2) and bits(m[0]) == bits(m2) and bits(s[0]) == bits(s2)
    np.testing.assert_allclose(rm, rm2, rtol=1e-6)
    np.testing.assert_allclose(rv, rv2, rtol=1e-6)


# ---- skip_nonfinite and running_var_unbiased ---------------------------------------------------


@pytest.mark.parametrize("xp", lib_params())
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("ghost", [None, 2])
def test_skip_nonfinite_keeps_running_statistics(xp, dtype, bad, ghost):
    rng = np.random.default_rng(9)
    x64 = rng.standard_normal((4, 3, 5))
    x64[2, 1, 3] = bad
    x = cast(x64, dtype, xp)
    acc = acc_dtype(dtype)
    rm0, rv0 = rng.uniform(-1, 1, 3), rng.uniform(0.5, 2, 3)
    rm, rv = cast(rm0, acc, xp), cast(rv0, acc, xp)
    y, mean, _ = bn.forward_training(x, running_mean=rm, running_var=rv, skip_nonfinite=True, ghost_batch=ghost)
    # Channel 1 is non-finite: its running statistics are bit-identical, and its saved statistics show it.
    assert bits(rm[1]) == bits(cast(rm0, acc, xp)[1]) and bits(rv[1]) == bits(cast(rv0, acc, xp)[1])
    assert not np.isfinite(to_f64(mean)).all()
    # The other channels are updated exactly as without skip_nonfinite.
    rm_plain, rv_plain = cast(rm0, acc, xp), cast(rv0, acc, xp)
    bn.forward_training(x, running_mean=rm_plain, running_var=rv_plain, ghost_batch=ghost)
    for c in (0, 2):
        assert bits(rm[c]) == bits(rm_plain[c]) and bits(rv[c]) == bits(rv_plain[c])
    assert not np.isfinite(to_f64(rm_plain)[1]) or not np.isfinite(to_f64(rv_plain)[1])
    assert np.isfinite(to_f64(y)[:, [0, 2]]).all()


@pytest.mark.parametrize("xp", lib_params())
@pytest.mark.parametrize("dtype", dtype_params())
def test_running_var_biased(xp, dtype):
    rng = np.random.default_rng(4)
    x = cast(rng.standard_normal((5, 3, 4)), dtype, xp)
    acc = acc_dtype(dtype)
    xq = to_f64(x)
    rm, rv = cast(np.zeros(3), acc, xp), cast(np.ones(3), acc, xp)
    bn.forward_training(x, running_mean=rm, running_var=rv, momentum=0.4, running_var_unbiased=False)
    np.testing.assert_allclose(to_f64(rv), 0.6 + 0.4 * xq.var(axis=(0, 2)), rtol=TOLERANCE["var"][dtype])
    np.testing.assert_allclose(to_f64(rm), 0.4 * xq.mean(axis=(0, 2)), rtol=TOLERANCE["var"][dtype], atol=1e-7)


# ---- the Keras convention of the layer ---------------------------------------------------------


def keras_steps(batches, gamma, beta, momentum, eps):
    """tf.keras.layers.BatchNormalization's documented training and inference formulas, axis=-1."""
    moving_mean, moving_var = np.zeros(gamma.shape), np.ones(gamma.shape)
    outputs = []
    for x in batches:
        red = tuple(range(x.ndim - 1))
        mean, var = x.mean(axis=red), x.var(axis=red)
        outputs.append(gamma * (x - mean) / np.sqrt(var + eps) + beta)
        moving_mean = moving_mean * momentum + mean * (1 - momentum)
        moving_var = moving_var * momentum + var * (1 - momentum)
    return outputs, moving_mean, moving_var


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keras_convention_over_five_steps(dtype):
    rng = np.random.default_rng(6)
    C = 4
    layer = bn.BatchNorm(C, convention="keras", dtype=dtype)
    assert layer.eps == 1e-3 and layer.momentum == 0.99 and layer.axis == -1
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.uniform(-0.5, 0.5, C)
    layer.weight, layer.bias = gamma.astype(dtype), beta.astype(dtype)
    batches = [rng.standard_normal((6, 3, 3, C)) * 2 + 1 for _ in range(5)]
    want, want_mean, want_var = keras_steps(batches, gamma, beta, 0.99, 1e-3)
    rtol = 1e-12 if dtype == "float64" else 2e-5
    for x, w in zip(batches, want):
        assert_close(layer(x.astype(dtype)), w, rtol, "training output")
    assert_close(layer.running_mean, want_mean, rtol, "moving_mean")
    assert_close(layer.running_var, want_var, rtol, "moving_variance")
    layer.eval()
    x = rng.standard_normal((5, 2, 2, C))
    assert_close(layer(x.astype(dtype)), gamma * (x - want_mean) / np.sqrt(want_var + 1e-3) + beta, rtol, "inference")


def test_keras_convention_recompute_is_biased():
    rng = np.random.default_rng(8)
    batches = [rng.standard_normal((n, 3)) for n in (4, 7, 2)]
    layer = bn.BatchNorm(3, convention="keras", dtype="float64").recompute_statistics(batches)
    whole = np.concatenate(batches)
    np.testing.assert_allclose(layer.running_var, whole.var(axis=0), rtol=1e-12)


def test_layer_variants_train_and_backward():
    """The layer's renorm / ghost / skip options reach forward and backward."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((8, 3, 4))
    layer = bn.BatchNorm(3, dtype="float64", renorm=(1.5, 0.5))
    layer.running_mean[:] = [1.0, 0.0, -1.0]
    y = layer(x)
    want = renorm_reference(x, np.ones(3), np.zeros(3), np.array([1.0, 0, -1]), np.ones(3), 0.1, 1e-5, 1.5, 0.5, 1)
    np.testing.assert_allclose(y, want[0], rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    wdx, wdw, wdb = renorm_backward_reference(dy, x, np.ones(3), want[3], want[4], 1e-5, 1)
    np.testing.assert_allclose(dx, wdx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, wdw, rtol=1e-10)
    ghost = bn.BatchNorm(3, dtype="float64", ghost_batch=4)
    y = ghost(x)
    np.testing.assert_array_equal(y[:4], bn.forward_training(x[:4])[0])
    dx = ghost.backward(dy)
    np.testing.assert_array_equal(dx[4:], bn.backward(dy[4:], x[4:], *bn.forward_training(x[4:])[1:])[0])
    assert "ghost_batch=4" in repr(ghost) and "renorm=(1.5, 0.5)" in repr(layer)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(renorm=(0.5, 1.0)), ValueError, "rmax must be >= 1"),
        (dict(renorm=(2.0, -1.0)), ValueError, "dmax must be >= 0"),
        (dict(renorm=(float("nan"), 1.0)), ValueError, "rmax must be >= 1"),
        (dict(renorm=(2.0,)), TypeError, "renorm must be None or an (rmax, dmax) pair"),
        (dict(renorm="big"), TypeError, "renorm must be None or an (rmax, dmax) pair"),
        (dict(ghost_batch=5), ValueError, "ghost_batch must divide the batch size (x.shape[0] = 8)"),
        (dict(ghost_batch=0), ValueError, "ghost_batch must be a positive int"),
        (dict(ghost_batch=-2), ValueError, "ghost_batch must be a positive int"),
        (dict(ghost_batch=2.0), TypeError, "ghost_batch must be an int"),
        (dict(ghost_batch=4, renorm=(2.0, 1.0)), ValueError, "renorm and ghost_batch together are not supported"),
        (dict(ghost_batch=4, axis=0), ValueError, "must not be the channel axis"),
        (dict(skip_nonfinite=1), TypeError, "skip_nonfinite must be a bool"),
        (dict(running_var_unbiased=None), TypeError, "running_var_unbiased must be a bool"),
    ],
)
def test_errors_leave_running_statistics_untouched(kwargs, error, words):
    x = np.random.default_rng(0).standard_normal((8, 3, 2)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    if kwargs.get("axis") == 0:
        rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)
    before = (rm.tobytes(), rv.tobytes())
    with pytest.raises(error) as info:
        bn.forward_training(x, running_mean=rm, running_var=rv, **kwargs)
    assert words in str(info.value)
    assert (rm.tobytes(), rv.tobytes()) == before


def test_numpy_bools_are_flags():
    # np.True_ is NumPy's bool; the message said "must be a bool, got bool" for it.
    x = np.random.default_rng(0).standard_normal((8, 3, 2)).astype(np.float32)
    want = bn.forward_training(x, running_mean=np.zeros(3), running_var=np.ones(3), skip_nonfinite=True,
                               running_var_unbiased=False)
    got = bn.forward_training(x, running_mean=np.zeros(3), running_var=np.ones(3), skip_nonfinite=np.True_,
                              running_var_unbiased=np.False_)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_renorm_needs_running_statistics():
    with pytest.raises(ValueError, match="renorm needs running_mean and running_var"):
        bn.forward_training(np.ones((4, 2)), renorm=(2.0, 1.0))


def test_ghost_group_needs_two_values():
    with pytest.raises(ValueError, match="each ghost batch must have at least 2 values per channel"):
        bn.forward_training(np.ones((4, 2)), ghost_batch=1)


def test_ghost_with_batch_statistics_refused():
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match="ghost_batch and batch_statistics together"):
        bn.forward_training(x, batch_statistics=(np.zeros(2), np.ones(2), 8), ghost_batch=2)


def test_ghost_batch_of_an_empty_batch():
    # N = 0 has no groups: the checks took that count for "no ghost batch", so the backward
    # asked for (C,) saved statistics, and batch_statistics with ghost_batch went through.
    x = np.zeros((0, 3, 5), np.float32)
    empty = "at least {} value{} per channel {}, got 0 (shape (0, 3, 5), 3 channels)"
    with pytest.raises(ValueError, match=re.escape(empty.format(1, "", "for the backward pass"))):
        bn.backward(x, x, np.zeros((0, 3), np.float32), np.ones((0, 3), np.float32), ghost_batch=2)
    with pytest.raises(ValueError, match=r"saved_mean must have shape \(0, 3\) with ghost_batch"):
        bn.backward(x, x, np.zeros(3, np.float32), np.ones(3, np.float32), ghost_batch=2)
    with pytest.raises(ValueError, match=re.escape(empty.format(2, "s", "in training (the batch variance needs two)"))):
        bn.forward_training(x, ghost_batch=2)
    with pytest.raises(ValueError, match="ghost_batch and batch_statistics together"):
        bn.forward_training(x, batch_statistics=(np.zeros(3), np.ones(3), 8), ghost_batch=2)
    with pytest.raises(ValueError, match="renorm and ghost_batch together"):
        bn.forward_training(x, running_mean=np.zeros(3), running_var=np.ones(3), renorm=(2.0, 1.0), ghost_batch=2)


def test_ghost_backward_out_never_aliases_the_saved_statistics():
    # ghost_batch=1 on a 2-D x: the saved statistics are (N, C), x's own shape and strides, so
    # out=saved_mean passed as "in place"; the fused route wrote out before the groups read
    # them, and returned wrong dx and dweight.
    x = np.arange(1.0, 7.0, dtype=np.float32).reshape(2, 3)
    dy = np.array([[0.5, -1, 2], [1, 1, -3]], np.float32)
    mean = np.array([[0.5, 1, 2], [3, 4, 5]], np.float32)
    invstd = np.array([[1, 2, 3], [1, 2, 3]], np.float32)
    y = np.ones_like(x)
    for name in ("saved_mean", "saved_invstd"):
        m, s = mean.copy(), invstd.copy()
        out = m if name == "saved_mean" else s
        with pytest.raises(ValueError, match=f"out must not share memory with {name}"):
            bn.backward(dy, x, m, s, ghost_batch=1, y=y, activation="relu", out=out)
        assert m.tobytes() == mean.tobytes() and s.tobytes() == invstd.tobytes()


def test_backward_variant_errors():
    x = np.random.default_rng(1).standard_normal((8, 3))
    _, m, s = bn.forward_training(x, ghost_batch=4)
    with pytest.raises(ValueError, match=r"saved_mean must have shape \(2, 3\) with ghost_batch"):
        bn.backward(x, x, m[0], s, ghost_batch=4)
    with pytest.raises(ValueError, match=r"saved_mean must have shape \(4, 3\)"):
        bn.backward(x, x, m, s, ghost_batch=2)
    with pytest.raises(TypeError, match="renorm must be None or the forward's"):
        bn.backward(x, x, m[0], s[0], renorm=np.ones(3))
    with pytest.raises(ValueError, match="renorm and ghost_batch together"):
        bn.backward(x, x, m, s, ghost_batch=4, renorm=(np.ones(3), np.zeros(3)))
    with pytest.raises(ValueError, match=r"renorm r must have shape \(3,\)"):
        bn.backward(x, x, m[0], s[0], renorm=(np.ones(2), np.zeros(3)))


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="convention must be 'torch' or 'keras'"):
        bn.BatchNorm(3, convention="tf")
    with pytest.raises(ValueError, match="renorm needs running statistics"):
        bn.BatchNorm(3, renorm=(2, 1), track_running_stats=False)
    with pytest.raises(ValueError, match="momentum=None .* is PyTorch's"):
        bn.BatchNorm(3, convention="keras", momentum=None)
    with pytest.raises(ValueError, match="renorm and ghost_batch together"):
        bn.BatchNorm(3, renorm=(2, 1), ghost_batch=2)
    # The limits are checked when the layer is built (as the torch layers' are), not at the
    # first training step (eval steps ran with them).
    for limits in ((0.5, 1.0), (2.0, -1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match=r"renorm must be \(rmax >= 1, dmax >= 0\)"):
            bn.BatchNorm(3, renorm=limits)


@pytest.mark.parametrize("xp", lib_params())
def test_skip_nonfinite_judges_the_statistics_as_the_accumulation_type_holds_them(xp):
    # Finite float32 values about 3e38: their variance (9e76 in double) is Inf in float32, the
    # batch statistics' type; the channel was updated all the same, its running variance Inf.
    x64 = np.random.default_rng(2).standard_normal((4, 2, 5))
    x64[:, 0] = np.where(x64[:, 0] > 0, 3e38, -3e38)
    x = cast(x64, "float32", xp)
    rm, rv = cast(np.zeros(2), "float32", xp), cast(np.ones(2), "float32", xp)
    bn.forward_training(x, running_mean=rm, running_var=rv, skip_nonfinite=True)
    assert to_f64(rm)[0] == 0.0 and to_f64(rv)[0] == 1.0
    assert np.isfinite(to_f64(rv)[1]) and to_f64(rv)[1] != 1.0


@pytest.mark.parametrize("xp", lib_params())
@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
def test_skip_nonfinite_keeps_a_channel_its_running_dtype_would_store_as_inf(xp, x_dtype):
    # float16 running statistics: channel 0's batch variance (about 3.6e9) is finite in the
    # accumulation type but its update stores as Inf in float16, so the channel is kept; channel
    # 1 is updated. Without skip_nonfinite the Inf is stored, as PyTorch's layers store it.
    x64 = np.random.default_rng(3).standard_normal((6, 2, 5))
    x64[:, 0] = np.where(x64[:, 0] > 0, 6e4, -6e4)
    for skip in (True, False):
        x = cast(x64, x_dtype, xp)
        rm, rv = cast(np.zeros(2), "float16", xp), cast(np.ones(2), "float16", xp)
        bn.forward_training(x, running_mean=rm, running_var=rv, skip_nonfinite=skip, momentum=0.5)
        if skip:
            assert to_f64(rm)[0] == 0.0 and to_f64(rv)[0] == 1.0
        else:
            assert np.isinf(to_f64(rv)[0])
        assert np.isfinite(to_f64(rv)[1]) and to_f64(rv)[1] != 1.0
    # At the edge: an update that rounds to float16's largest value (65504) is stored.
    x = cast(np.array([[-1.0], [1.0]]) * np.sqrt(65510.0), "float32", xp)  # unbiased variance 131020
    rm, rv = cast(np.zeros(1), "float16", xp), cast(np.zeros(1), "float16", xp)
    bn.forward_training(x, running_mean=rm, running_var=rv, skip_nonfinite=True, momentum=0.5)
    assert to_f64(rv)[0] == 65504.0


@pytest.mark.parametrize("xp", lib_params())
@pytest.mark.parametrize("dtype,target,stored", [
    ("float16", 65520 - 2**-10, 65504.0),
    ("float16", 65520 - 2**-30, 65504.0),
    ("bfloat16", float.fromhex("0x1.ffp127") * (1 - 2**-30), float.fromhex("0x1.fep127")),
])
def test_skip_nonfinite_judges_a_half_update_as_its_one_rounding_stores_it(xp, dtype, target, stored):
    # An update just under the dtype's overflow threshold (65520 for float16) rounds once to its
    # largest value, and is stored; through a float (as the check had rounded it) it was the
    # threshold itself, which rounds to Inf: the channel was kept.
    if dtype == "bfloat16":
        pytest.importorskip("torch", reason="bfloat16 arrays are torch tensors")
    a = np.sqrt(target / 2)  # x = (-a, a): unbiased variance 2 a^2, momentum 1 takes it
    assert abs(2 * a * a - target) < target * 2**-50 and np.float32(2 * a * a) == np.float32(target)
    x = cast(np.array([[-a], [a]]), "float64", xp)
    rm, rv = cast(np.zeros(1), dtype, xp), cast(np.ones(1), dtype, xp)
    bn.forward_training(x, running_mean=rm, running_var=rv, skip_nonfinite=True, momentum=1.0)
    assert to_f64(rv)[0] == stored


@pytest.mark.parametrize("xp", lib_params())
def test_skip_nonfinite_updates_a_channel_whose_running_statistic_is_already_non_finite(xp):
    # A running mean already NaN (or variance already Inf) from before: the finite batch still
    # updates the channel's other statistic, as without skip_nonfinite (not a reason to keep it).
    x = cast(np.random.default_rng(4).standard_normal((8, 3)) + 1, "float32", xp)
    for skip in (False, True):
        rm, rv = cast(np.array([np.nan, 0, 0]), "float32", xp), cast(np.array([1, np.inf, 1]), "float32", xp)
        bn.forward_training(x, running_mean=rm, running_var=rv, momentum=0.1, skip_nonfinite=skip)
        m, v = to_f64(rm), to_f64(rv)
        assert np.isnan(m[0]) and v[0] != 1.0 and np.isinf(v[1]) and m[1] != 0.0
        if skip:
            np.testing.assert_array_equal(m, plain_m)
            np.testing.assert_array_equal(v, plain_v)
        plain_m, plain_v = m, v
