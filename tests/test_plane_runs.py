"""Short channels-first planes lying back to back (contiguous NCHW with 4x4 to 8x8 planes) are
mapped as runs: a block of channels' rows of one outer index is one run of vectors that span
plane boundaries, each coefficient repeated over its channel's plane (cpu/kernels/map.h,
map_run_block; a streamed pass of its own takes 8 runs at a time piece by piece,
map_run_streams), streamed by whole cache lines; and reduced as runs (cpu/kernels/plane_runs.h:
the statistics from 16 rows a call, the backward's sums from 8), each lane of the run summing
one value of one plane. The same values laid out with planes apart go row by row
(map_row_block, ShortRow's reductions): every op must give the same bits either way, streamed
or not, into outputs at any alignment, in place too, at any thread count; and match the float64
reference."""
import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _C
from helpers import HAVE_TORCH, TOLERANCE, assert_close, bits, cast, dtype_params, every_op, ref_normalize, to_f64, torch

# (shape, what it reaches): plane 49 with a last block of 5 channels (float32: under the run's
# 1 KB, so row by row beside runs); planes of 16, 25 and 64 values; a 3-D array; many blocks per
# thread; few channels and many rows (3 threads: groups of rows that start inside a plane); over
# 8192 values a channel (the reductions and the fused backward then sum in partial pieces).
# Reduced as runs: 40 rows of blocks of 16, 16 and 5 channels (a run's partial last vector);
# 5x5 planes (float64's short rows too) with a last block of 4; 12 rows (the backward's sums as
# runs, the statistics as rows); 340 rows of 17 channels, each channel's 16660 values cut
# mid-row by the pieces of 8192 (the second piece: a partial first row, 166 whole rows as runs,
# a partial last row).
SHAPES = [(6, 37, 7, 7), (3, 20, 4, 4), (5, 18, 5, 5), (4, 17, 8, 8), (7, 33, 49), (2, 300, 7, 7), (400, 2, 7, 7),
          (200, 20, 64), (40, 37, 7, 7), (24, 20, 5, 5), (12, 18, 6, 6), (340, 17, 7, 7)]


@pytest.fixture(params=[False, True], ids=["cached", "streamed"])
def streamed(request):
    _C._set_stream_threshold(0 if request.param else -1)
    yield request.param
    _C._set_stream_threshold(-1)


def planes_apart(a):
    """The same values with one spare value after every plane: channel stride plane + 1."""
    N, C = a.shape[:2]
    plane = int(np.prod(a.shape[2:]))
    if HAVE_TORCH and isinstance(a, torch.Tensor):
        buf = torch.zeros((N, C, plane + 1), dtype=a.dtype)
    else:
        buf = np.zeros((N, C, plane + 1), dtype=a.dtype)
    view = buf[:, :, :plane]
    view[...] = a.reshape(N, C, plane)
    return view.reshape(a.shape) if a.ndim == 3 else view.reshape(N, C, *a.shape[2:])


def inputs(rng, shape, dtype):
    C = shape[1]
    loc = rng.uniform(-3, 3, C).reshape((1, C) + (1,) * (len(shape) - 2))
    x = cast(rng.standard_normal(shape) * 2 + loc, dtype)
    dy = cast(rng.standard_normal(shape), dtype)
    r = cast(rng.standard_normal(shape), dtype)
    return x, dy, r, rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_runs_give_the_bits_of_rows_at_any_thread_count(rng, dtype, shape, streamed):
    x, dy, r, w, b = inputs(rng, shape, dtype)
    apart = [planes_apart(a) for a in (x, dy, r)]
    assert bits(apart[0]) == bits(x)
    want = every_op(*apart, w, b, 1)
    for threads in (1, 2, 3):
        got = every_op(x, dy, r, w, b, threads)
        for k, v in want.items():
            assert bits(got[k]) == bits(v), f"{k}: runs differ from rows at {threads} threads"
    ref = ref_normalize(x, got["rm"], 1 / np.sqrt(to_f64(got["rv"]) + 1e-5), w, b)
    assert_close(got["y_inf"], ref, TOLERANCE["output"][dtype], what="inference against the float64 reference")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("offset", [0, 1, 3, 8, 13])
@pytest.mark.parametrize("shape", [(6, 37, 7, 7), (4, 17, 8, 8), (3, 40, 5, 5)], ids=lambda s: "x".join(map(str, s)))
def test_outputs_at_any_alignment_get_the_same_bits(rng, dtype, shape, offset, streamed):
    """out= arrays `offset` elements past a 64-byte boundary (the run's first values before the
    first whole line, its last after the last, go one by one), nothing written outside them;
    and in place (y into x, dx into dy)."""
    x, dy, _, w, b = inputs(rng, shape, dtype)
    C = shape[1]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    if dtype == "float64":
        rm, rv = rm.astype(np.float64), rv.astype(np.float64)
    # References row by row: the same values with planes apart, regular stores.
    _C._set_stream_threshold(-1)
    xa, dya = planes_apart(x), planes_apart(dy)
    y_ref, mean, invstd = bn.forward_training(xa, w, b)
    inf_ref = bn.forward_inference(xa, rm, rv, w, b)
    dx_ref = bn.backward(dya, xa, mean, invstd, w)[0]
    yr_ref = bn.forward_training(xa, w, b, residual=dya, activation="relu")[0]
    if streamed:
        _C._set_stream_threshold(0)

    n = int(np.prod(shape))
    sentinel = -96.0
    buf = cast(np.full(n + 64 + offset, sentinel), dtype)
    lead = ((-buf.data_ptr()) if HAVE_TORCH and isinstance(buf, torch.Tensor) else (-buf.ctypes.data)) % 64
    start = lead // (2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize) + offset
    out = buf[start:start + n].reshape(shape)
    for call, ref in ((lambda: bn.forward_training(x, w, b, out=out), y_ref),
                      (lambda: bn.forward_inference(x, rm, rv, w, b, out=out), inf_ref),
                      (lambda: bn.backward(dy, x, mean, invstd, w, out=out), dx_ref),
                      (lambda: bn.forward_training(x, w, b, residual=dy, activation="relu", out=out), yr_ref)):
        call()
        assert bits(out) == bits(ref)
    outside = np.concatenate([to_f64(buf[:start]), to_f64(buf[start + n:])])
    assert (outside == sentinel).all(), "written outside the output"

    x2 = x.clone() if HAVE_TORCH and isinstance(x, torch.Tensor) else x.copy()
    bn.forward_inference(x2, rm, rv, w, b, out=x2)
    assert bits(x2) == bits(inf_ref)
    dy2 = dy.clone() if HAVE_TORCH and isinstance(dy, torch.Tensor) else dy.copy()
    bn.backward(dy2, x, mean, invstd, w, out=dy2)
    assert bits(dy2) == bits(dx_ref)



@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_outputs_off_the_value_size_are_written_value_by_value(rng, dtype, streamed):
    """An out= whose address is not a multiple of its value size (a NumPy view of a byte buffer
    at offset 1) never reaches a line boundary: no streaming store (a crash, misaligned), the
    same bits."""
    shape = (4, 40, 7, 7)
    x, dy, _, w, b = inputs(rng, shape, dtype)
    size = np.dtype(dtype).itemsize
    n = int(np.prod(shape))
    buf = np.zeros(n * size + 64, np.uint8)
    out = np.frombuffer(buf.data, dtype=dtype, count=n, offset=1).reshape(shape)
    assert not out.flags.aligned
    y, mean, invstd = bn.forward_training(x, w, b)
    bn.forward_training(x, w, b, out=out)
    assert bits(out) == bits(y)
    dx = bn.backward(dy, x, mean, invstd, w)[0]
    bn.backward(dy, x, mean, invstd, w, out=out)
    assert bits(out) == bits(dx)
