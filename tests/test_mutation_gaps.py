"""Tests for the gaps mutation testing of the C++ core found (issue #10): deliberate bugs the
suite did not catch, or caught with one test only. Half-precision outputs are checked bit for
bit against the float32 result rounded once (a truncating bfloat16 store passed a 2e-2
tolerance); fold with a conv bias, merges with empty shards and the multi-thread plans are
each checked in several configurations against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from helpers import HAVE_TORCH, assert_close, assert_output, ref_backward, ref_fold, ref_merge_statistics
from helpers import ref_normalize, ref_statistics, to_f64, torch

HALVES = ["float16"] + (["bfloat16"] if HAVE_TORCH else [])


def half_input(values: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    return values.astype(dtype)


def round_once(y32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to `dtype` with round-to-nearest-even, as raw 16-bit words."""
    if dtype == "bfloat16":
        return torch.from_numpy(y32).to(torch.bfloat16).view(torch.int16).numpy()
    return y32.astype(np.float16).view(np.int16)


def words(a) -> np.ndarray:
    if HAVE_TORCH and isinstance(a, torch.Tensor):
        return a.contiguous().view(torch.int16).numpy()
    return np.ascontiguousarray(a).view(np.int16)


SHAPES = [((4, 3, 37, 29), 1), ((64, 8, 7, 7), 1), ((6, 7, 5, 40), -1), ((300, 33), 1), ((2, 3, 3000), 1)]


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_half_outputs_are_the_float32_result_rounded_once(dtype, shape, axis):
    """y = (x - mean) * scale + shift in float32 (scale = invstd * weight, each rounded to
    float32 as the kernels do, no FMA), then one round-to-nearest-even: exactly these bits."""
    rng = np.random.default_rng(len(shape) * 31 + shape[1])
    C = shape[axis]
    x = half_input(rng.standard_normal(shape) * 3 + 1, dtype)
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    x32 = (x.float().numpy() if dtype == "bfloat16" else x.astype(np.float32))
    bshape = [1] * len(shape)
    bshape[axis] = C

    y, mean, invstd = bn.forward_training(x, w, b, axis=axis)
    mean32, invstd32 = (np.asarray(a.numpy() if HAVE_TORCH and isinstance(a, torch.Tensor) else a, np.float32)
                        for a in (mean, invstd))
    scale = (invstd32 * w).reshape(bshape)
    y32 = (x32 - mean32.reshape(bshape)) * scale + b.reshape(bshape)
    np.testing.assert_array_equal(words(y), round_once(y32, dtype), err_msg="training output")

    var = rng.uniform(0.5, 2, C)
    yi = bn.forward_inference(x, mean32, var, w, b, axis=axis)
    scale = (1.0 / np.sqrt(var + 1e-5)).astype(np.float32) * w  # 1/sqrt in float64, rounded, then * weight
    y32 = (x32 - mean32.reshape(bshape)) * scale.reshape(bshape) + b.reshape(bshape)
    np.testing.assert_array_equal(words(yi), round_once(y32, dtype), err_msg="inference output")


# float32 bit patterns whose bfloat16 rounding is easy to get wrong: ties to even either way,
# just below and above a tie, subnormals (no flush to zero), the carry into the exponent, the
# largest floats (overflow to infinity), infinities, and NaNs (quiet, whatever the payload).
BF16_EDGES = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x00008000, 0x00018000, 0x00007FFF, 0x0000FFFF,
              0x00000001, 0x007FFFFF, 0x3FFFFFFF, 0x7F7FFFFF, 0x7F7F7FFF, 0x7F800000, 0x7F800001, 0x7FC00000,
              0x7FFFFFFF, 0x00000000]


@pytest.mark.skipif(not HAVE_TORCH, reason="bfloat16 arrays are torch tensors")
@pytest.mark.parametrize("plane,streamed,offset", [((5, 8), False, 0), ((10, 10), False, 0), ((7, 7), False, 0),
                                                   ((7, 7), True, 0), ((7, 7), True, 5), ((7, 7), True, 11)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_store_rounds_edge_values(channels_last, plane, streamed, offset):
    """y = shift exactly (x = mean = 0), one channel per edge value and its negative: every SIMD
    store lane gives torch's round-to-nearest-even of the float32, NaN as its own quiet NaN
    (the high half with the quiet bit set, at every ISA level)."""
    from batchnorm import _C
    # (not -0.0: 0 * scale + -0.0 is +0.0)
    edge_bits = np.array(BF16_EDGES + [v | 0x80000000 for v in BF16_EDGES if v], np.uint32)
    edges = edge_bits.view(np.float32)
    C = edges.size
    # Planes of 40 (short rows: full vectors and an overlapping tail), of 100 (a 4-value tail:
    # one masked vector under AVX-512, value by value elsewhere) and of 49 (NCHW: runs of a
    # block's planes, map_run; streamed into an out= `offset` values past a line, its vectors
    # start on other values of the run).
    x = torch.zeros((3, C) + plane, dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    buf = torch.zeros(x.numel() + 64, dtype=torch.bfloat16)
    start = (-buf.data_ptr()) % 64 // 2 + offset
    out = buf[start:start + x.numel()].view(x.permute(0, 2, 3, 1).shape if channels_last else x.shape)
    if channels_last:
        out = out.permute(0, 3, 1, 2)
    _C._set_stream_threshold(0 if streamed else -1)
    try:
        y = bn.forward_inference(x, np.zeros(C, np.float32), np.ones(C, np.float32), None, edges, out=out)
    finally:
        _C._set_stream_threshold(-1)
    got = y.contiguous().view(torch.int16).numpy().astype(np.uint16)
    want = np.broadcast_to(round_once(edges, "bfloat16").astype(np.uint16)[None, :, None, None], got.shape)
    nan = np.isnan(edges)[None, :, None, None] & np.ones(got.shape, bool)
    quiet = np.broadcast_to(((edge_bits >> 16) | 0x40).astype(np.uint16)[None, :, None, None], got.shape)
    np.testing.assert_array_equal(got[nan], quiet[nan])
    np.testing.assert_array_equal(got[~nan], want[~nan])


@pytest.mark.skipif(not HAVE_TORCH, reason="bfloat16 arrays are torch tensors")
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("shape,axis", [((8, 24, 7, 7), 1), ((4, 24, 10, 10), 1), ((8, 24, 2, 44), 1),
                                        ((5, 6, 6, 72), -1), ((200, 40), 1), ((96, 64), 1)])
def test_bfloat16_subnormal_outputs_in_pairs_of_vectors(shape, axis, streamed):
    """bfloat16 outputs below float32's smallest normal in some channels only (weights 2^-131
    in every third channel, 1 elsewhere): the avx512_bf16 level stores two vectors by one
    conversion, which flushes subnormals, and takes a pair with a subnormal lane vector by
    vector; the pairs here have it in both, one or neither of their vectors. Every value is
    the float32 result rounded once, with regular and with streaming stores."""
    from batchnorm import _C
    rng = np.random.default_rng(17)
    C = shape[axis]
    x = half_input(rng.standard_normal(shape), "bfloat16")
    w = np.where(np.arange(C) % 3 == 0, np.float32(2.0 ** -131), np.float32(1)).astype(np.float32)
    b = np.zeros(C, np.float32)
    mean = rng.standard_normal(C).astype(np.float32) * 0.1
    var = rng.uniform(0.5, 2, C)
    bshape = [1] * len(shape)
    bshape[axis] = C
    if streamed:
        _C._set_stream_threshold(0)
    try:
        y = bn.forward_inference(x, mean, var, w, b, axis=axis)
    finally:
        _C._set_stream_threshold(-1)
    scale = ((1.0 / np.sqrt(var + 1e-5)).astype(np.float32) * w).reshape(bshape)
    y32 = (x.float().numpy() - mean.reshape(bshape)) * scale + b.reshape(bshape)
    assert np.any((y32 != 0) & (np.abs(y32) < np.finfo(np.float32).tiny)), "no subnormal outputs"
    np.testing.assert_array_equal(words(y), round_once(y32, "bfloat16"))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("kernel_shape,axis", [((5, 3, 3, 3), 0), ((3, 5, 2, 2), 1), ((7, 4), 0)])
def test_fold_with_conv_bias(dtype, kernel_shape, axis):
    rng = np.random.default_rng(5)
    C = kernel_shape[axis]
    k = rng.standard_normal(kernel_shape).astype(dtype)
    cb = rng.standard_normal(C).astype(dtype)
    mean, var = rng.standard_normal(C), rng.uniform(0.2, 3.0, C)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    k2, b2 = bn.fold(k, cb, mean, var, w, b, eps=1e-3, axis=axis)
    e_k, e_b = ref_fold(k, cb, mean, var, w, b, 1e-3, axis)
    assert_output(k2, e_k, dtype, what="kernel'")
    assert_output(b2, e_b, dtype, what="bias'")
    # The bias term must use the conv bias: (cb - mean) * s + b, not (-mean) * s + b.
    _, b_without = bn.fold(k, None, mean, var, w, b, eps=1e-3, axis=axis)
    assert not np.allclose(to_f64(b2), to_f64(b_without))


@pytest.mark.parametrize("empty_at", [(0,), (1,), (3,), (0, 2), (1, 2, 3)])
def test_merge_statistics_with_empty_shards(empty_at):
    """Shards of count 0 are ignored wherever they stand (their mean and var may be garbage)."""
    rng = np.random.default_rng(11)
    C = 6
    shards = [rng.standard_normal((n, C)) * (i + 1) + i for i, n in enumerate([5, 3, 9, 4])]
    means, variances, counts = [], [], []
    for i, s in enumerate(shards):
        m, v, n = ref_statistics(s, 1)
        if i in empty_at:
            m, v, n = np.full(C, 1e30), np.full(C, np.nan), 0
        means.append(m.astype(np.float64))
        variances.append(v.astype(np.float64))
        counts.append(n)
    kept = [s for i, s in enumerate(shards) if i not in empty_at]
    mean, var, count = bn.merge_statistics(means, variances, counts)
    e_mean, e_var, e_count = ref_statistics(np.concatenate(kept), 1)
    assert count == e_count
    assert_close(mean, e_mean, 1e-12, what="mean")
    assert_close(var, e_var, 1e-12, what="var")
    r_mean, r_var, _ = ref_merge_statistics([m for m, n in zip(means, counts) if n],
                                            [v for v, n in zip(variances, counts) if n], [n for n in counts if n])
    assert_close(mean, r_mean, 1e-12)


@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize("shape,axis", [((2, 3, 160, 160), 1), ((3, 5, 100, 100), 1), ((8, 256, 6, 6), 1),
                                        ((20000, 3), 1), ((16, 12, 12, 24), -1)])
def test_thread_plans_against_the_reference(threads, shape, axis, restore_threads):
    """Every plan (grouped channels, channel-parallel blocks, channels-last groups) at thread
    counts other than the machine's, checked against float64 rather than only against 1 thread."""
    bn.set_num_threads(threads)
    rng = np.random.default_rng(threads)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 2, C)
    y, mean, invstd = bn.forward_training(x, w, axis=axis)
    e_mean, e_var, _ = ref_statistics(x, axis)
    assert_close(mean, e_mean, 1e-6, scale=np.sqrt(e_var), what="mean")
    assert_close(invstd, 1 / np.sqrt(e_var + 1e-5), 1e-5, scale=0.0, what="invstd")
    assert_output(y, ref_normalize(x, mean, invstd, w, None, axis), "float32", what="y")
    dx, dw, db = bn.backward(dy, x, mean, invstd, w, axis=axis)
    e_dx, _, e_db = ref_backward(dy, x, mean, invstd, w, axis)
    assert_output(dx, e_dx, "float32", scale=np.abs(e_dx).max() + np.abs(dy).max() * np.abs(w).max() * 3,
                  what="dx")
    red = tuple(d for d in range(len(shape)) if d != axis % len(shape))
    assert_close(db, e_db, 1e-5, scale=np.abs(dy.astype(np.float64)).sum(axis=red), what="dbias")


def _channels_last_moments(x: np.ndarray, run: int):
    """The channels-last statistics of one group of positions (rows of x), emulated step by
    step: per run of `run` rows, in x's dtype, the run's sum in row order, its mean, then the
    sums of deviations and of their squares; the runs' moments merged in float64 in order
    (Chan), each with the first-order correction."""
    total_n, mean, m2 = 0.0, None, None
    for r0 in range(0, x.shape[0], run):
        rows = x[r0:r0 + run]
        n = rows.shape[0]
        s = np.zeros(x.shape[1], x.dtype)
        for row in rows:
            s = s + row
        center = s / x.dtype.type(n)
        e = np.zeros_like(s)
        q = np.zeros_like(s)
        for row in rows:
            d = row - center
            e = e + d
            q = q + d * d
        e64 = e.astype(np.float64)
        bmean = center.astype(np.float64) + e64 / n
        bm2 = np.maximum(q.astype(np.float64) - e64 * e64 / n, 0.0)
        if total_n == 0:
            mean, m2 = bmean, bm2
        else:
            wb = n / (total_n + n)
            aw = total_n * wb
            delta = bmean - mean
            mean = mean + delta * wb
            m2 = m2 + bm2 + delta * delta * aw
        total_n += n
    return mean.astype(x.dtype), (m2 / total_n).astype(x.dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("channels", [1024, 2048])
@pytest.mark.parametrize("positions", [64, 56, 48, 1])
def test_channels_last_run_statistics_bit_for_bit(dtype, channels, positions, restore_threads):
    # At most 64 positions (float32; 32 at float64): one group. A run is 256 KB of rows: 64
    # and 32 positions of 1024 channels, 32 and 16 of 2048, so one run or several, merged.
    # A run of a power-of-two count divides by multiplying with the exact reciprocal; both
    # kinds, in the first run and in later ones, must give the division's bits.
    itemsize = np.dtype(dtype).itemsize
    positions = max(1, positions * 4 // itemsize)
    run = (256 << 10) // (channels * itemsize)
    x = (np.random.default_rng(positions).standard_normal((positions, channels)) * 3 + 1e3).astype(dtype)
    want_mean, want_var = _channels_last_moments(x, run)
    for threads in (1, 2):
        bn.set_num_threads(threads)
        mean, var, count = bn.statistics(x, axis=1)
        assert count == positions
        np.testing.assert_array_equal(np.asarray(mean), want_mean)
        np.testing.assert_array_equal(np.asarray(var), want_var)
