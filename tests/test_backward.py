"""backward is the gradient of forward_training: checked by central finite differences in
float64 (loss = sum(y * g)), and against PyTorch autograd of F.batch_norm(training=True) in
float32 / float64, channels-first and channels-last."""
from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from helpers import OUT_RTOL, TOLERANCE, assert_close, bcast, make_input, ref_backward, to_f64


def loss(x, w, b, g, axis):
    y, _, _ = bn.forward_training(x, w, b, axis=axis, eps=1e-3)
    return float(np.sum(y * g))


def numerical_gradient(f, a, h=1e-6):
    """Central differences of scalar f over every element of float64 array `a` (in place)."""
    grad = np.zeros_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        v = flat[i]
        flat[i] = v + h
        up = f()
        flat[i] = v - h
        down = f()
        flat[i] = v
        gflat[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("shape,axis", [((4, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 2), -1), ((2, 2, 3, 2), 2)])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
def test_finite_differences(rng, shape, axis, with_weight):
    C = shape[axis]
    x = rng.standard_normal(shape) * 2 + 1
    g = rng.standard_normal(shape)
    w = rng.uniform(0.5, 2, C) * rng.choice([-1, 1], C) if with_weight else None
    b = rng.standard_normal(C)
    _, mean, invstd = bn.forward_training(x, w, b, axis=axis, eps=1e-3)
    dx, dweight, dbias = bn.backward(g, x, mean, invstd, w, axis=axis)
    num_dx = numerical_gradient(lambda: loss(x, w, b, g, axis), x)
    assert_close(dx, num_dx, 1e-6, what="dx vs finite differences")
    w_for_fd = np.ones(C) if w is None else w  # dweight is returned whether or not weight was given
    assert_close(dweight, numerical_gradient(lambda: loss(x, w_for_fd, b, g, axis), w_for_fd), 1e-6,
                 what="dweight vs finite differences")
    assert_close(dbias, numerical_gradient(lambda: loss(x, w, b, g, axis), b), 1e-6,
                 what="dbias vs finite differences")


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 16, 7, 7), (3, 5, 1, 1)])
def test_against_torch_autograd(rng, dtype, memory, shape):
    torch = pytest.importorskip("torch", reason="PyTorch autograd is the reference here")
    F = torch.nn.functional
    tdtype = getattr(torch, dtype)
    C = shape[1]
    x = torch.from_numpy(make_input(rng, shape, "float64")).to(tdtype)
    g = torch.from_numpy(rng.standard_normal(shape)).to(tdtype)
    if memory == "channels_last":
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    w = torch.from_numpy(rng.uniform(0.5, 2, C)).to(tdtype)
    b = torch.from_numpy(rng.standard_normal(C)).to(tdtype)
    xt, wt, bt = (t.clone().requires_grad_(True) for t in (x, w, b))
    yt = F.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
    yt.backward(g)

    y, mean, invstd = bn.forward_training(x, w, b, axis=1)
    dx, dweight, dbias = bn.backward(g, x, mean, invstd, w, axis=1)
    assert isinstance(dx, torch.Tensor) and dx.dtype == tdtype and tuple(dx.shape) == shape
    tol = OUT_RTOL[dtype] * (10 if dtype == "float32" else 1)  # torch has its own rounding too
    assert_close(y, to_f64(yt), tol, what="y vs torch")
    assert_close(dx, to_f64(xt.grad), tol, what="dx vs torch autograd")
    # The parameter gradients are sums over each channel: errors scale with the summed terms.
    g64, red = to_f64(g), (0, 2, 3)
    xhat = (to_f64(x) - bcast(to_f64(mean), 4, 1)) * bcast(to_f64(invstd), 4, 1)
    assert_close(dweight, to_f64(wt.grad), tol, scale=np.abs(g64 * xhat).sum(axis=red), what="dweight vs torch")
    assert_close(dbias, to_f64(bt.grad), tol, scale=np.abs(g64).sum(axis=red), what="dbias vs torch")



# Channels-last rows wider than one register tile (64 channels) are reduced in blocks of 8
# positions whose sums carry over from block to block and restart at each run of 256 positions.
# A call reduces one group of positions (at most 64 groups): 333 positions make 6 groups of
# 55-56 (a partial last block); 21312 make 64 groups of 333, a full run then one of 77. 200 and
# 1000 channels: full tiles, smaller tiles and (float32, float16) channels past the last full
# vector; 136: a one-vector tile for float64.
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("shape,axis", [((37, 3, 3, 200), -1), ((333, 1000), 1), ((21312, 136), 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_wide_channels_last_rows_against_the_reference(rng, dtype, shape, axis, threads, restore_threads):
    bn.set_num_threads(threads)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w = rng.standard_normal(C).astype(np.float32 if dtype != "float64" else dtype)
    _, mean, invstd = bn.forward_training(x, w, axis=axis)
    dx, dw, db = bn.backward(dy, x, mean, invstd, w, axis=axis)
    rdx, rdw, rdb = ref_backward(dy, x, mean, invstd, w, axis=axis)
    sum_rtol = TOLERANCE["sum"][dtype] * 10
    assert_close(db, rdb, sum_rtol, scale=np.sqrt(x.size / C), what="dbias")
    assert_close(dw, rdw, sum_rtol, scale=np.sqrt(x.size / C), what="dweight")
    assert_close(dx, rdx, OUT_RTOL[dtype], what="dx")


# dy and x in different layouts: the input that dx does not walk like is copied into dx first
# (dx takes dy's layout when allocated; out= may take x's), then the backward runs in place, every
# array alike. The copy is exact, so the bits are those of that input given in dx's layout.
def _like(a, template):
    b = np.empty_like(template)
    b[...] = a
    return b


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("case", ["dy-nchw-x-nhwc", "dy-nhwc-x-nchw", "out-like-x", "dy-broadcast-out-like-x"])
def test_dy_and_x_in_different_layouts_give_the_bits_of_one_layout(rng, dtype, case, restore_threads):
    bn.set_num_threads(2)
    shape = (6, 40, 9, 11)
    nchw = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    nhwc = _like(nchw, np.empty((6, 9, 11, 40), dtype).transpose(0, 3, 1, 2))
    g = rng.standard_normal(shape).astype(dtype)
    g_nhwc = _like(g, nhwc)
    x, dy = (nchw, g_nhwc) if case == "dy-nhwc-x-nchw" else (nhwc, g)
    if case == "dy-broadcast-out-like-x":  # the gradient of y.sum(): one value, stride 0
        dy = np.broadcast_to(np.asarray(1.5, dtype), shape)
    assert x.strides != dy.strides
    w = np.linspace(0.5, 1.5, shape[1]).astype(np.float32 if dtype != "float64" else dtype)
    _, mean, invstd = bn.forward_training(x, w)
    out = np.empty_like(x) if case.endswith("out-like-x") else None
    got = bn.backward(dy, x, mean, invstd, w, out=out)
    if out is None:  # dx in dy's layout: x copied into it
        assert np.asarray(got[0]).strides == dy.strides
        want = bn.backward(dy, _like(x, dy), mean, invstd, w)
    else:  # dx in x's layout: dy copied into it
        assert got[0] is out
        want = bn.backward(_like(dy, x), x, mean, invstd, w)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # (scale 1: dx is of order 1, or about 0 for the constant dy)
    assert_close(got[0], ref_backward(dy, x, mean, invstd, w)[0], OUT_RTOL[dtype], scale=1.0, what="dx")
