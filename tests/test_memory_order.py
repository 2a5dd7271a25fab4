"""Walks of the forward's elementwise pass (cpu/plan.h, walks_memory_order): channel blocks, or
memory order (every channel of one outer index, then the next) once its arrays pass half the
streaming threshold (three quarters for short rows), or the streamed walks past it (memory
order for rows of 512 bytes or more: 28x28 at any dtype, 14x14 float32 and float64, 9x9
float64, (7, 33, 200) float32; channel blocks below: 14x14 half types); and a block
whose channels are one piece each (N = 1) as one kernel call. Each value's formula is the same
whichever the walk: every walk must give the same bits, at any thread count, and match the
float64 reference. The threshold is the testing hook, so that small arrays reach each walk."""
import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _C
from helpers import TOLERANCE, assert_close, bits, cast, dtype_params, ref_normalize, to_f64

# Short rows (7x7, 5x5), rows between them and 1024 values (14x14, 28x28), a 3-D array, one
# outer index (N = 1: the block-per-call pass), few channels with many rows.
SHAPES = [(6, 37, 7, 7), (5, 18, 5, 5), (6, 37, 14, 14), (3, 9, 28, 28), (7, 33, 200), (1, 37, 14, 14),
          (1, 40, 7, 7), (64, 3, 9, 9)]


def itemsize(dtype):
    return 2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize


@pytest.fixture(autouse=True)
def default_threshold():
    threads = bn.get_num_threads()
    yield
    _C._set_stream_threshold(-1)
    bn.set_num_threads(threads)


# (name, bytes of the pass's arrays as a multiple of x's: inputs + output) -> threshold factor:
# the default (-1, blocks in cache), 1.2x the pass's bytes (memory order, regular stores: the
# pass is past three quarters of it), 3x (blocks: below half), 0 (streamed).
WALKS = {"default": None, "memory order": 1.2, "blocks": 3.0, "streamed": 0.0}


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_walk_gives_the_same_bits(rng, dtype, shape):
    C = shape[1]
    loc = rng.uniform(-3, 3, C).reshape((1, C) + (1,) * (len(shape) - 2))
    x = cast(rng.standard_normal(shape) * 2 + loc, dtype)
    r = cast(rng.standard_normal(shape), dtype)
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    if dtype == "float64":
        rm, rv = rm.astype(np.float64), rv.astype(np.float64)
    n = int(np.prod(shape)) * itemsize(dtype)
    calls = {
        "inference": (2, lambda: bn.forward_inference(x, rm, rv, w, b)),
        "inference relu": (2, lambda: bn.forward_inference(x, rm, rv, w, b, activation="relu")),
        "inference residual relu": (3, lambda: bn.forward_inference(x, rm, rv, w, b, residual=r, activation="relu")),
    }
    for name, (arrays, call) in calls.items():
        got = {}
        for walk, factor in WALKS.items():
            _C._set_stream_threshold(-1 if factor is None else int(factor * arrays * n))
            for threads in (1, 2, 3):
                bn.set_num_threads(threads)
                got[walk, threads] = call()
        want = got["default", 1]
        for key, y in got.items():
            assert bits(y) == bits(want), f"{name}: {key[0]} walk at {key[1]} threads differs from the default"
        if name == "inference":
            ref = ref_normalize(x, rm, 1 / np.sqrt(to_f64(rv) + 1e-5), w, b)
            assert_close(got["memory order", 2], ref, TOLERANCE["output"][dtype],
                         what="memory-order inference against the float64 reference")


def test_one_outer_index_maps_as_its_rows_in_a_larger_batch(rng):
    """N = 1 (one kernel call per block of channels) gives each value the bits it gets as the
    first image of a batch of two (the channel-block walk, one row per channel per image)."""
    x2 = rng.standard_normal((2, 37, 14, 14)).astype(np.float32) * 3 + 1
    C = x2.shape[1]
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    for threads in (1, 2):
        bn.set_num_threads(threads)
        one = bn.forward_inference(np.ascontiguousarray(x2[:1]), rm, rv, w, b)
        two = bn.forward_inference(x2, rm, rv, w, b)
        assert bits(one) == bits(np.ascontiguousarray(two[:1]))
