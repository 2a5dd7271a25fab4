"""Many channels, few values each (BatchNorm1d on (N, features)): the per-channel loops run on
every thread in blocks (cpu/params.h, for_channels), the per-channel arrays and partial sums
come from the per-thread scratch cache (cpu/scratch.h) and some are never zero-filled. Every
op against the float64 reference, with strided and contiguous parameter vectors, the same
bits at 1-3 threads, and the same bits again after a call that filled the cache's blocks with
NaN (a value read before it is written would show)."""
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

# Per-channel arrays over the cache's 4 KB floor and for_channels' parallel threshold.
SHAPES = [(2, 40000), (5, 17000), (3, 9000, 1, 2), (4, 20000, 1)]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided-params"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_wide_channels(rng, shape, dtype, strided):
    C = shape[1]
    centers = rng.uniform(-3, 3, C).reshape((1, C) + (1,) * (len(shape) - 2))
    x = cast(rng.standard_normal(shape) * 2 + centers, dtype)
    dy = cast(rng.standard_normal(shape), dtype)
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    got = every_op(x, dy, dy, w, b, 1, strided)
    for threads in (2, 3):
        again = every_op(x, dy, dy, w, b, threads, strided)
        for k, v in got.items():
            assert bits(again[k]) == bits(v), f"{k}: other bits at {threads} threads"
    # NaN everywhere in the blocks the cache hands out next: nothing of it may reach a result.
    poison = cast(np.full(shape, np.nan), dtype)
    every_op(poison, poison, poison, np.full(C, np.nan, np.float32), np.full(C, np.nan, np.float32), 2, strided)
    again = every_op(x, dy, dy, w, b, 2, strided)
    for k, v in got.items():
        assert bits(again[k]) == bits(v), f"{k}: other bits after a NaN call"

    axes = tuple(d for d in range(len(shape)) if d != 1)
    rmean, rvar, count = ref_statistics(x)
    std = np.sqrt(rvar)
    mean_rtol, var_rtol, out_rtol = TOLERANCE["mean"][dtype], TOLERANCE["var"][dtype], OUT_RTOL[dtype]
    assert_close(got["mean"], rmean, mean_rtol, scale=std, what="saved mean")
    assert_close(got["invstd"], 1 / np.sqrt(rvar + 1e-5), var_rtol, what="saved invstd")
    assert_close(got["rm"], 0.5 * rmean, mean_rtol, scale=std, what="running mean")
    assert_close(got["rv"], 0.5 + 0.5 * rvar * count / (count - 1), var_rtol, what="running var")
    assert_close(got["y"], ref_normalize(x, got["mean"], got["invstd"], w, b), out_rtol, what="y")
    rv = to_f64(got["rv"])
    assert_close(got["y_inf"], ref_normalize(x, got["rm"], 1 / np.sqrt(rv + 1e-5), w, b), out_rtol, what="inference y")
    rdx, rdw, rdb = ref_backward(dy, x, got["mean"], got["invstd"], w)
    sum_tol = TOLERANCE["sum"][dtype] * 10
    scale = np.sqrt(np.abs(to_f64(dy)).sum(axis=axes)) * 4
    assert_close(got["dx"], rdx, out_rtol, what="dx")
    assert_close(got["dw"], rdw, sum_tol, scale=scale, what="dweight")
    assert_close(got["db"], rdb, sum_tol, scale=scale, what="dbias")
    assert_close(got["dx2"], rdx, out_rtol, what="backward_elemt dx")
    assert_close(got["yf"], np.maximum(ref_normalize(x, got["mean"], got["invstd"], w, b) + to_f64(dy), 0),
                 out_rtol, what="fused y")


def test_results_do_not_depend_on_the_cache_history(rng):
    """More shapes in turn than the scratch cache keeps blocks (32, from 4 KB: each shape's
    per-channel arrays), so blocks are handed out again across shapes, the smallest given back
    for larger ones (ascending channel counts) and smaller ones not kept (descending), each
    call after one of another shape on NaN inputs (whose NaN the cached blocks then hold):
    every op's bits equal those of the same call on an empty cache."""
    shapes = [(6, 1024 + 96 * k) for k in range(40)]
    data = []
    for shape in shapes:
        C = shape[1]
        x = (rng.standard_normal(shape) * 2 + rng.uniform(-3, 3, C)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
        data.append((x, dy, w, b))
    fresh = []
    for x, dy, w, b in data:
        bn.empty_cache()
        fresh.append(every_op(x, dy, dy, w, b, 2))
    for i in [*reversed(range(len(shapes))), *range(len(shapes))]:
        other = shapes[(i + 7) % len(shapes)]
        nan = np.full(other, np.nan, np.float32)
        every_op(nan, nan, nan, nan[0], nan[0], 2)
        x, dy, w, b = data[i]
        again = every_op(x, dy, dy, w, b, 2)
        for k, v in fresh[i].items():
            assert bits(again[k]) == bits(v), f"{shapes[i]} {k}: other bits after other shapes' calls"
    assert 0 < bn.empty_cache() <= 3 * (32 << 20)  # a cache per thread, 32 MB each at most
