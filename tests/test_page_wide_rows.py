"""Channels-last rows of 4 KB or more (1024 float32 channels, 2048 half ones, 512 float64): the
statistics' first pass goes in blocks of 8 positions, every register tile of channels per
block, its sums parked between blocks and picked up again (kernels/moments.h, cl_moments), and
runs of positions restart them. A sum dropped at a block edge, a tile left out or the
channels past the last full vector missed move the float32 and half variances well past the
tolerance (sums that restart at each block left float32's variance 1e-4 off; float64's second
pass, deviations from that center, recovers all but 1e-13 of it, within its tolerance); the
same bits at 1 and 2 threads. tools/digest.py holds the bits of a page-wide case."""
import numpy as np
import pytest

import batchnorm as bn
from helpers import TOLERANCE, assert_close, bits, cast, dtype_params, ref_statistics

# (shape, axis): 333 positions (6 groups of 55-56, each a partial last block) of 1030 channels
# (float32 and wider: page-wide; a partial tile and 6 channels past the last full vector);
# 37x3x3 positions of 2050 channels (every dtype page-wide); 21312 positions (64 groups of 333:
# a full run of 32 or more, then a shorter one) of 520 channels (float64 page-wide).
CASES = [((333, 1030), 1), ((37, 3, 3, 2050), -1), ((21312, 520), 1)]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_page_wide_channels_last_statistics(rng, dtype, shape, axis, restore_threads):
    C = shape[axis]
    centers = rng.uniform(-50, 50, C)
    spread = rng.uniform(0.5, 3, C)
    x = cast(rng.standard_normal(shape) * spread + centers, dtype)
    bn.set_num_threads(1)
    mean, var, count = bn.statistics(x, axis=axis)
    bn.set_num_threads(2)
    mean2, var2, _ = bn.statistics(x, axis=axis)
    assert bits(mean2) == bits(mean) and bits(var2) == bits(var), "other bits at 2 threads"
    rmean, rvar, rcount = ref_statistics(x, axis)
    assert count == rcount
    assert_close(mean, rmean, TOLERANCE["mean"][dtype], scale=np.sqrt(rvar), what="mean")
    assert_close(var, rvar, TOLERANCE["var"][dtype], what="var")
