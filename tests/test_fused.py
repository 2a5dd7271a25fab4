"""Fused batch norm (API.md, "Fused batch norm"): forward_training / forward_inference with
residual= and activation="relu", and backward(..., y=, activation=, residual=True), against
the float64 reference and against PyTorch's unfused sequence (batch_norm, add, relu)."""
import numpy as np
import pytest

import batchnorm as bn
from helpers import (
    HAVE_TORCH,
    LAYOUTS,
    assert_close,
    assert_output,
    bits,
    cast,
    channel_values,
    dtype_params,
    is_torch,
    lib_params,
    place,
    ref_backward,
    ref_normalize,
    to_f64,
    vector,
)

if HAVE_TORCH:
    import torch

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")

SHAPES = [((6, 5, 7, 9), 1), ((64, 37), 1), ((4, 6, 5, 12), -1), ((3, 4, 11), 2), ((2, 3, 9000), 1)]


def _ref_fused(x, mean, invstd, w, b, r, axis, relu):
    y = ref_normalize(x, mean, invstd, w, b, axis)
    if r is not None:
        y = y + to_f64(r)
    if relu:
        y = np.where(np.isnan(y), y, np.maximum(y, 0.0))
    return y


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("x_layout,r_layout", [("contiguous", "contiguous"), ("transposed", "contiguous"),
                                               ("sliced", "transposed"), ("reversed", "sliced")])
@pytest.mark.parametrize("residual,relu", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("xp", lib_params())
def test_forward_training_fused(rng, xp, dtype, shape, axis, x_layout, r_layout, residual, relu):
    x = place(channel_values(rng, shape, axis), dtype, x_layout, axis, xp)
    r = place(rng.standard_normal(shape), dtype, r_layout, axis, xp) if residual else None
    C = shape[axis]
    w = vector(rng.uniform(0.5, 2, C), "float32", xp=xp)
    b = vector(rng.standard_normal(C), "float64", strided=True, xp=xp)
    rm, rv = cast(np.zeros(C), "float32", xp), cast(np.ones(C), "float32", xp)
    rm0, rv0 = cast(np.zeros(C), "float32", xp), cast(np.ones(C), "float32", xp)
    y, mean, invstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis, residual=r,
                                          activation="relu" if relu else None)
    # The statistics and the running update are those of plain batch norm: bit for bit when
    # the residual is laid out like x (the walk of x, hence the reduction order, follows the
    # memory order of every array walked together, as it does for out=).
    y0, mean0, invstd0 = bn.forward_training(x, w, b, running_mean=rm0, running_var=rv0, axis=axis)
    if not residual or x_layout == r_layout:
        assert bits(mean) == bits(mean0) and bits(invstd) == bits(invstd0)
        assert bits(rm) == bits(rm0) and bits(rv) == bits(rv0)
    else:
        for a, e in ((mean, mean0), (invstd, invstd0), (rm, rm0), (rv, rv0)):
            assert_close(a, to_f64(e), 1e-5 if dtype != "float64" else 1e-12, what="statistics")
    ref = _ref_fused(x, mean, invstd, w, b, r, axis, relu)
    assert_output(y, ref, dtype, what="y")
    if relu:
        assert (to_f64(y) >= 0).all()


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", SHAPES[:4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_inference_fused(rng, dtype, shape, axis, layout):
    x = place(channel_values(rng, shape, axis), dtype, layout, axis)
    r = place(rng.standard_normal(shape), dtype, "contiguous", axis)
    C = shape[axis]
    mean, var = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    y = bn.forward_inference(x, mean, var, w, b, axis=axis, residual=r, activation="relu")
    ref = _ref_fused(x, mean, 1 / np.sqrt(var + 1e-5), w, b, r, axis, True)
    assert_output(y, ref, dtype, what="y")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("xp", lib_params())
def test_backward_fused(rng, xp, dtype, shape, axis, layout, relu):
    x = place(channel_values(rng, shape, axis), dtype, layout, axis, xp)
    r = place(rng.standard_normal(shape), dtype, "contiguous", axis, xp)
    dy = place(rng.standard_normal(shape), dtype, layout, axis, xp)
    C = shape[axis]
    w = cast(rng.uniform(0.5, 2, C), "float32", xp)
    act = "relu" if relu else None
    y, mean, invstd = bn.forward_training(x, w, None, axis=axis, residual=r, activation=act)
    dx, dw, db, dres = bn.backward(dy, x, mean, invstd, w, axis=axis, y=y if relu else None, activation=act,
                                   residual=True)
    g = to_f64(dy) * (to_f64(y) > 0) if relu else to_f64(dy)
    rdx, rdw, rdb = ref_backward(g, x, mean, invstd, w, axis)
    assert_output(dres, g, dtype, what="dresidual")
    assert_output(dx, rdx, dtype, what="dx")
    tol = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-4, "bfloat16": 1e-4}[dtype]
    scale = np.sqrt(np.abs(g).sum(axis=tuple(d for d in range(len(shape)) if d != axis % len(shape))))
    assert_close(db, rdb, tol, scale=scale, what="dbias")
    assert_close(dw, rdw, tol, scale=scale, what="dweight")
    # Without residual=True: the same dx, dweight, dbias bit for bit.
    dx2, dw2, db2 = bn.backward(dy, x, mean, invstd, w, axis=axis, y=y if relu else None, activation=act)
    assert bits(dx2) == bits(dx) and bits(dw2) == bits(dw) and bits(db2) == bits(db)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,channels_last", [((4, 6, 64, 70), False), ((8, 40, 7, 7), False),
                                                 ((2, 3, 9000), False), ((8, 14, 14, 24), True), ((300, 48), True)])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_backward_interleaved_same_bits(rng, dtype, shape, channels_last, relu, threads):
    # Arrays with the same strides take the backend's interleaved walk (the masked gradient made
    # range by range ahead of the reduction); y in another memory order takes the two passes.
    # Both give the same bits, in place (out=dy) too.
    axis = -1 if channels_last else 1
    x = cast(channel_values(rng, shape, axis), dtype)
    dy = cast(rng.standard_normal(shape), dtype)
    act = "relu" if relu else None
    old = bn.get_num_threads()
    try:
        bn.set_num_threads(threads)
        y, mean, invstd = bn.forward_training(x, axis=axis, residual=cast(rng.standard_normal(shape), dtype),
                                              activation=act)
        # Same values in reversed memory order, other strides: the two-pass path.
        if is_torch(y):
            rev = list(reversed(range(y.ndim)))
            y_other = y.permute(rev).contiguous().permute(rev)
            assert y_other.stride() != y.stride()
        else:
            y_other = np.asfortranarray(y)
            assert y_other.strides != y.strides
        yy = (y, y_other) if relu else (None, None)
        one = bn.backward(dy, x, mean, invstd, axis=axis, y=yy[0], activation=act, residual=True)
        two = bn.backward(dy, x, mean, invstd, axis=axis, y=yy[1], activation=act, residual=True)
        assert [bits(a) for a in one] == [bits(a) for a in two]
        for residual in (True, False):
            d = dy.clone() if is_torch(dy) else dy.copy()
            got = bn.backward(d, x, mean, invstd, axis=axis, y=yy[0], activation=act, residual=residual, out=d)
            assert got[0] is d and [bits(a) for a in got] == [bits(a) for a in one[:len(got)]]
    finally:
        bn.set_num_threads(old)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_in_place(rng, dtype):
    shape, axis = (8, 6, 5, 5), 1
    x = cast(channel_values(rng, shape, axis), dtype)
    r = cast(rng.standard_normal(shape), dtype)
    dy = cast(rng.standard_normal(shape), dtype)
    y, mean, invstd = bn.forward_training(x, residual=r, activation="relu")
    # out=x and out=residual give the same bits as a fresh output.
    x2, r2 = x.copy(), r.copy()
    out = bn.forward_training(x2, residual=r2, activation="relu", out=x2)[0]
    assert out is x2 and bits(x2) == bits(y)
    x3, r3 = x.copy(), r.copy()
    bn.forward_training(x3, residual=r3, activation="relu", out=r3)
    assert bits(r3) == bits(y)
    dx, dw, db = bn.backward(dy, x, mean, invstd, y=y, activation="relu")
    for target in ("x", "dy"):
        x4, dy4 = x.copy(), dy.copy()
        o = x4 if target == "x" else dy4
        got = bn.backward(dy4, x4, mean, invstd, y=y, activation="relu", out=o)
        assert got[0] is o and bits(o) == bits(dx) and bits(got[1]) == bits(dw) and bits(got[2]) == bits(db)


def test_nonfinite_propagates(rng):
    x = channel_values(rng, (16, 4, 3, 3), 1).astype(np.float32)
    x[3, 2, 1, 1] = np.nan
    r = rng.standard_normal(x.shape).astype(np.float32)
    y, _, _ = bn.forward_training(x, residual=r, activation="relu")
    assert np.isnan(y[:, 2]).all()  # relu(NaN) is NaN, as torch.relu
    assert np.isfinite(np.delete(y, 2, axis=1)).all()


def test_deterministic_over_threads(rng):
    x = channel_values(rng, (32, 24, 14, 14), 1).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    old = bn.get_num_threads()
    try:
        for t in (1, 2, 3):
            bn.set_num_threads(t)
            y, m, s = bn.forward_training(x, residual=r, activation="relu")
            results.append([bits(a) for a in (y, m, s, *bn.backward(dy, x, m, s, y=y, activation="relu", residual=True))])
    finally:
        bn.set_num_threads(old)
    assert results[0] == results[1] == results[2]


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torch_unfused(dtype, channels_last):
    g = torch.Generator().manual_seed(5)
    tdt = getattr(torch, dtype)
    x = (torch.randn(8, 16, 9, 9, generator=g, dtype=torch.float64) * 2 + 1).to(tdt)
    r = torch.randn(8, 16, 9, 9, generator=g, dtype=torch.float64).to(tdt)
    if channels_last:
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    w = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(16, generator=g, dtype=torch.float64)
    rm, rv = torch.zeros(16), torch.ones(16)
    rm_t, rv_t = rm.clone().double(), rv.clone().double()
    y, mean, invstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, residual=r, activation="relu")
    assert isinstance(y, torch.Tensor) and y.dtype == tdt
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    # PyTorch's unfused sequence in float64 (its half kernels compute in float as well).
    xt = x.double().clone().requires_grad_()
    rt = r.double().clone().requires_grad_()
    wt = w.clone().requires_grad_()
    bt = b.clone().requires_grad_()
    yt = torch.relu(torch.nn.functional.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, momentum=0.1, eps=1e-5) + rt)
    assert_output(y, yt.detach().numpy(), dtype, what="y vs torch")
    torch.testing.assert_close(rm, rm_t.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, rv_t.float(), rtol=1e-5, atol=1e-6)
    if dtype == "float64":
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        yt.backward(dy)
        dx, dw, db, dres = bn.backward(dy, x, mean, invstd, w, y=y, activation="relu", residual=True)
        torch.testing.assert_close(dx, xt.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(dres, rt.grad, rtol=0, atol=0)
        torch.testing.assert_close(dw, wt.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(db, bt.grad, rtol=1e-9, atol=1e-9)


def test_errors(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    with pytest.raises(ValueError, match=r"residual must have the shape of x, \(4, 3, 5\), got \(4, 3, 6\)"):
        bn.forward_training(x, residual=np.zeros((4, 3, 6), np.float32))
    with pytest.raises(TypeError, match="residual must have the dtype of x, float32, got float64"):
        bn.forward_training(x, residual=np.zeros(x.shape))
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'gelu'"):
        bn.forward_inference(x, np.zeros(3), np.ones(3), activation="gelu")
    with pytest.raises(TypeError, match="activation must be None or 'relu', got int"):
        bn.forward_training(x, activation=1)
    y, m, s = bn.forward_training(x, activation="relu")
    with pytest.raises(TypeError, match="y must be an array .* with activation='relu', got None"):
        bn.backward(x, x, m, s, activation="relu")
    with pytest.raises(ValueError, match="y is the fused forward's output, for activation='relu' only"):
        bn.backward(x, x, m, s, y=y)
    with pytest.raises(TypeError, match="y must have the dtype of x, float32, got float64"):
        bn.backward(x, x, m, s, y=y.astype(np.float64), activation="relu")
    with pytest.raises(TypeError, match="residual must be a bool"):
        bn.backward(x, x, m, s, residual=1)
    # Nothing is written by a failed call.
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.full_like(x, 7.0)
    with pytest.raises(TypeError):
        bn.forward_training(x, running_mean=rm, running_var=rv, residual=np.zeros(x.shape), out=out)
    assert (rm == 0).all() and (rv == 1).all() and (out == 7).all()
