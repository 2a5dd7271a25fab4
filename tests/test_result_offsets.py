"""Where batchnorm places the results it allocates: a result shaped like a dense input starts
as far past a 64-byte line as that input (binding offset_like), from malloc'd blocks and from
the host cache's huge-page blocks alike, for NumPy results and DLPack Buffers; small results
not shaped like an input are NumPy's own arrays."""
from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn


def _at_line_offset(shape, dtype, offset):
    """A dense C-order array of `shape` whose first element is `offset` bytes past a 64-byte
    line, filled with values."""
    n = int(np.prod(shape))
    item = np.dtype(dtype).itemsize
    raw = np.empty(n * item + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    a = raw[start:start + n * item].view(dtype).reshape(shape)
    a[...] = np.random.default_rng(offset).standard_normal(shape)
    return a


@pytest.mark.parametrize("shape", [(300, 64), (8, 16, 5, 5), (1 << 18, 4)])  # the last: 4 MB, a cached block
@pytest.mark.parametrize("offset", [0, 16, 48, 6])
def test_results_start_at_their_inputs_line_offset(shape, offset):
    """Results shaped like x start as far past a 64-byte line as x does (NumPy's large arrays
    sit 16 bytes past one), so the kernels' aligned output vectors align x's too; an input off
    its natural alignment (6 bytes into a float32 array) or not dense gets an aligned result.
    Values equal those written into out= arrays, and through DLPack the offset holds too."""
    x = _at_line_offset(shape, "float32", offset)
    dy = _at_line_offset(shape, "float32", offset)
    C = shape[1]
    want = offset if offset % 4 == 0 else 0
    y, mean, invstd = bn.forward_training(x)
    dx = bn.backward(dy, x, mean, invstd)[0]
    inf = bn.forward_inference(x, mean, 1 / np.asarray(invstd, np.float64) ** 2)
    for r in (y, dx, inf):
        assert r.ctypes.data % 64 == want, (r.ctypes.data % 64, want)
    out = np.empty_like(x)
    np.testing.assert_array_equal(bn.forward_training(x, out=out)[0], y)
    np.testing.assert_array_equal(bn.backward(dy, x, mean, invstd, out=out)[0], dx)
    # Per-channel results are not shaped like x: below the host cache's 1 MiB they are NumPy's
    # own arrays (a third of the cost of batchnorm's aligned blocks, which they do not need).
    assert mean.flags.owndata and mean.flags.c_contiguous and mean.flags.writeable
    strided = x[:, ::2] if C > 2 else x[::2]
    assert bn.forward_training(strided)[0].ctypes.data % 64 == 0
    # The Buffer a DLPack-only producer gets back: NumPy imports it without a copy.
    buf = bn.forward_training(_C_producer(x))[0]
    got = np.from_dlpack(buf)
    assert got.ctypes.data % 64 == want
    np.testing.assert_array_equal(got, y)


class _C_producer:
    """x behind __dlpack__ only (no __array__), so results come back as DLPack Buffers."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()
