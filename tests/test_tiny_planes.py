"""Channels-first planes shorter than a cache line (2x2, 3x3, ...: cpu/plan.h, tiny_planes) are
walked, from 4 positions and up to 2^16 view channels, as channels-last positions of C * plane
channels, and each channel's plane of partials is merged after the reduction; channels-last
rows with few positions are cut into blocks of channels. Every op on them, against the float64
reference, at any thread count with the same bits; the fused passes and the split backward
too; shapes on either side of the thresholds."""
import numpy as np
import pytest

import batchnorm as bn
from helpers import (
    OUT_RTOL,
    TOLERANCE,
    assert_close,
    bits,
    cast,
    dtype_params,
    every_op,
    ref_backward,
    ref_normalize,
    ref_statistics,
    to_f64,
)

# (shape, what it reaches): planes of 4-15 values (float64: up to 7) laid out channel after
# channel; one outer index or many; outer groups of 64 positions merged in order.
SHAPES = [
    (8, 40, 2, 2),      # ResNet's last stage at 64x64 input
    (5, 33, 3, 3),      # 9 values: tiny below float64
    (6, 7, 1, 5),       # a size-1 dim inside the plane
    (4, 6, 2, 1, 3),    # 3-D, the fewest positions walked as channels-last
    (9, 1, 3, 3),       # one channel
    (130, 9, 2, 7),     # 3 groups of positions, 14 values per plane
    (16, 600, 3, 3),    # 5400 view channels: cut into blocks of channels by the thread count
    (40, 2056),         # channels-last rows cut into blocks of channels (not a plane)
    (3, 12, 3, 3),      # too few positions: channel by channel
    (4, 8192, 3, 3),    # too many view channels: channel by channel
]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tiny_planes_against_the_reference_with_the_same_bits_at_any_thread_count(rng, dtype, shape):
    C = shape[1]
    axes = tuple(d for d in range(len(shape)) if d != 1)
    x = cast(rng.standard_normal(shape) * 2 + rng.uniform(-3, 3, C).reshape((1, C) + (1,) * (len(shape) - 2)), dtype)
    dy = cast(rng.standard_normal(shape), dtype)
    r = cast(rng.standard_normal(shape), dtype)
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    got = every_op(x, dy, r, w, b, 1)
    for threads in (2, 3):
        again = every_op(x, dy, r, w, b, threads)
        for k, v in got.items():
            assert bits(again[k]) == bits(v), f"{k}: other bits at {threads} threads"

    mean_rtol, var_rtol = TOLERANCE["mean"][dtype], TOLERANCE["var"][dtype]
    rmean, rvar, count = ref_statistics(x)
    std = np.sqrt(rvar)
    assert_close(got["mean_s"], rmean, mean_rtol, scale=std, what="statistics mean")
    assert_close(got["var_s"], rvar, var_rtol, what="statistics var")
    assert_close(got["mean"], rmean, mean_rtol, scale=std, what="saved mean")
    assert_close(got["invstd"], 1 / np.sqrt(rvar + 1e-5), var_rtol, what="saved invstd")
    assert_close(got["rm"], 0.5 * rmean, mean_rtol, scale=std, what="running mean")
    unbiased = rvar * count / (count - 1) if count > 1 else rvar
    assert_close(got["rv"], 0.5 + 0.5 * unbiased, var_rtol, what="running var")
    out_rtol = OUT_RTOL[dtype]
    ry = ref_normalize(x, got["mean"], got["invstd"], w, b)
    assert_close(got["y"], ry, out_rtol, what="y")
    assert_close(got["y_inf"], ref_normalize(x, got["rm"], 1 / np.sqrt(to_f64(got["rv"]) + 1e-5), w, b), out_rtol,
                 what="inference y")
    sum_tol = TOLERANCE["sum"][dtype] * 10
    scale = np.sqrt(np.abs(to_f64(dy)).sum(axis=axes)) * 4
    rdx, rdw, rdb = ref_backward(dy, x, got["mean"], got["invstd"], w)
    assert_close(got["dx"], rdx, out_rtol, what="dx")
    assert_close(got["dw"], rdw, sum_tol, scale=scale, what="dweight")
    assert_close(got["db"], rdb, sum_tol, scale=scale, what="dbias")
    assert bits(got["dw2"]) == bits(got["dw"]) and bits(got["db2"]) == bits(got["db"]), "backward_reduce"
    assert_close(got["s1"], to_f64(dy).sum(axis=axes), sum_tol, scale=scale, what="sum_dy")
    assert_close(got["dx2"], rdx, out_rtol, what="backward_elemt dx")
    # Fused: relu(normalize(x) + r), and its backward through the mask of y.
    ryf = np.maximum(ref_normalize(x, got["mf"], got["sf"], w, b) + to_f64(r), 0.0)
    assert_close(got["yf"], ryf, out_rtol, what="fused y")
    g = to_f64(dy) * (to_f64(got["yf"]) > 0)
    assert np.array_equal(to_f64(got["dres"]), g), "dresidual"
    fdx, fdw, fdb = ref_backward(g, x, got["mf"], got["sf"], w)
    assert_close(got["dxf"], fdx, out_rtol, what="fused dx")
    assert_close(got["dwf"], fdw, sum_tol, scale=scale, what="fused dweight")
    assert_close(got["dbf"], fdb, sum_tol, scale=scale, what="fused dbias")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiny_planes_normalize_with_the_bits_of_the_channel_walk(rng, dtype):
    # Inference is one map: walked as planes or channel by channel (a sliced output keeps the
    # arrays off the tiny-plane walk), each value gets the same formula, hence the same bits.
    x = cast(rng.standard_normal((16, 24, 3, 3)) * 3 + 1, dtype)
    C = x.shape[1]
    mean, var = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    y = bn.forward_inference(x, mean, var, w, b)
    wide = np.empty((16, 24, 3, 5), dtype)[..., :3]
    bn.forward_inference(x, mean, var, w, b, out=wide)
    assert bits(np.ascontiguousarray(wide)) == bits(y)
