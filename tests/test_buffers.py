"""Property tests over where arrays sit in memory: any memory order, steps, padding between
rows, byte offsets (including one byte off the natural alignment), out= into a wider buffer,
in place, and the streaming-store threshold forced to zero or left alone. Each result is
checked against the float64 reference, and every byte of the buffers outside the outputs
must be unchanged (the buffers start filled with a sentinel). The sanitizer CI run executes
these too, so an out-of-bounds or misaligned access shows up there as a report."""
from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis")
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import batchnorm as bn  # noqa: E402
from batchnorm import _C  # noqa: E402
from helpers import STAT_RTOL, assert_close, assert_output, channel_values, ref_backward, ref_normalize  # noqa: E402
from helpers import ref_running_update, ref_statistics, to_f64  # noqa: E402

SENTINEL_BYTE = 0xA5  # as float16/32/64 bytes: a large negative value no result can produce


@st.composite
def placements(draw, shape, axis):
    """How one array sits in a byte buffer: memory order, per-axis steps, extra elements
    (padding) on every dim, the byte offset of the view's origin."""
    rank = len(shape)
    order = list(draw(st.permutations(range(rank))))
    if draw(st.booleans()):  # channels innermost and dense: the channels-last kernels
        ax = axis % rank
        order = [d for d in order if d != ax] + [ax]
    steps = draw(st.lists(st.sampled_from([1, 1, 1, 2, -1]), min_size=rank, max_size=rank))
    pads = draw(st.lists(st.sampled_from([0, 0, 1, 3, 16]), min_size=rank, max_size=rank))
    misalign = draw(st.sampled_from([0, 0, 0, 1]))  # bytes past the natural alignment
    lead = draw(st.integers(0, 17))  # elements before the data
    return order, steps, pads, misalign, lead


class Placed:
    """An array of `shape` and `dtype` placed in a sentinel-filled byte buffer."""

    def __init__(self, shape, dtype, placement):
        order, steps, pads, misalign, lead = placement
        self.dtype = np.dtype(dtype)
        item = self.dtype.itemsize
        big = [n * abs(s) + p for n, s, p in zip(shape, steps, pads)]
        count = int(np.prod(big))
        self.raw = np.full((count + lead + 1) * item + 64 + misalign, SENTINEL_BYTE, np.uint8)
        start = (-self.raw.ctypes.data) % 64 + misalign + lead * item
        self.params = (shape, order, steps, big, start, count)

    def view(self, raw=None):
        shape, order, steps, big, start, count = self.params
        raw = self.raw if raw is None else raw
        flat = raw[start:start + count * self.dtype.itemsize].view(self.dtype)
        buf = flat.reshape([big[d] for d in order]).transpose(np.argsort(order))
        # The logical extent of each axis first (padding stays outside), then its step.
        region = buf[tuple(slice(0, n * abs(s)) for n, s in zip(shape, steps))]
        v = region[tuple(slice(None, None, s) for s in steps)]
        assert v.shape == tuple(shape), (v.shape, shape)
        return v

    def unchanged_outside(self, before_raw, view) -> None:
        """Every byte outside `view` equals its value in `before_raw`."""
        expected = before_raw.copy()
        self.view(expected)[...] = view
        assert np.array_equal(expected, self.raw), "a write landed outside the output's elements"


@st.composite
def cases(draw, min_count=2):
    rank = draw(st.integers(2, 4))
    shape = [draw(st.integers(1, 5)) for _ in range(rank)]
    axis = draw(st.integers(-rank, rank - 1))
    shape[axis] = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 33]))
    assume(int(np.prod(shape)) // shape[axis] >= min_count)
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    return tuple(shape), axis, dtype


@pytest.fixture(autouse=True)
def default_threshold():
    yield
    _C._set_stream_threshold(-1)


@given(case=cases(), data=st.data(), seed=st.integers(0, 2**32 - 1), stream=st.booleans(),
       out_mode=st.sampled_from(["placed", "x"]))
def test_forward_training_placed(case, data, seed, stream, out_mode):
    shape, axis, dtype = case
    _C._set_stream_threshold(0 if stream else -1)
    rng = np.random.default_rng(seed)
    C = shape[axis]
    px = Placed(shape, dtype, data.draw(placements(shape, axis)))
    x = px.view()
    x[...] = channel_values(rng, shape, axis, loc=3.0)
    x_ref = to_f64(x)
    x_raw = px.raw.copy()
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    po = px if out_mode == "x" else Placed(shape, dtype, data.draw(placements(shape, axis)))
    out = x if out_mode == "x" else po.view()
    out_raw = po.raw.copy()
    y, mean, invstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis, out=out,
                                          momentum=0.3)
    assert y is out
    ref_mean, ref_var, count = ref_statistics(x_ref, axis)
    mt, vt = STAT_RTOL[dtype]
    assert_close(mean, ref_mean, mt, scale=np.sqrt(ref_var), what="saved_mean")
    assert_close(invstd, 1 / np.sqrt(ref_var + 1e-5), vt, scale=0.0, what="saved_invstd")
    assert_output(y, ref_normalize(x_ref, mean, invstd, w, b, axis), dtype, what="y")
    e_rm, e_rv = ref_running_update(rm0, rv0, ref_mean, ref_var, count, 0.3)
    assert_close(rm, e_rm, 1e-5, what="running_mean")
    assert_close(rv, e_rv, 1e-5, what="running_var")
    po.unchanged_outside(out_raw, out)
    if out_mode != "x":
        assert np.array_equal(px.raw, x_raw), "x was modified"


@given(case=cases(min_count=1), data=st.data(), seed=st.integers(0, 2**32 - 1), stream=st.booleans())
def test_forward_inference_placed(case, data, seed, stream):
    shape, axis, dtype = case
    _C._set_stream_threshold(0 if stream else -1)
    rng = np.random.default_rng(seed)
    C = shape[axis]
    px = Placed(shape, dtype, data.draw(placements(shape, axis)))
    x = px.view()
    x[...] = channel_values(rng, shape, axis)
    x_raw = px.raw.copy()
    mean, var = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    po = Placed(shape, dtype, data.draw(placements(shape, axis)))
    out = po.view()
    out_raw = po.raw.copy()
    assert bn.forward_inference(x, mean, var, w, b, axis=axis, out=out) is out
    assert_output(out, ref_normalize(to_f64(x), mean, 1 / np.sqrt(var + 1e-5), w, b, axis), dtype, what="y")
    po.unchanged_outside(out_raw, out)
    assert np.array_equal(px.raw, x_raw)


@given(case=cases(), data=st.data(), seed=st.integers(0, 2**32 - 1), stream=st.booleans(),
       out_mode=st.sampled_from(["placed", "dy"]))
def test_backward_placed(case, data, seed, stream, out_mode):
    shape, axis, dtype = case
    _C._set_stream_threshold(0 if stream else -1)
    rng = np.random.default_rng(seed)
    C = shape[axis]
    px, pdy = (Placed(shape, dtype, data.draw(placements(shape, axis))) for _ in range(2))
    x, dy = px.view(), pdy.view()
    x[...] = channel_values(rng, shape, axis)
    dy[...] = rng.standard_normal(shape)
    x_raw, dy_ref = px.raw.copy(), to_f64(dy)
    w = rng.uniform(0.5, 2, C)
    _, mean, invstd = bn.forward_training(x, w, axis=axis)
    po = pdy if out_mode == "dy" else Placed(shape, dtype, data.draw(placements(shape, axis)))
    out = dy if out_mode == "dy" else po.view()
    out_raw = po.raw.copy()
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd, w, axis=axis, out=out)
    assert dx is out
    e_dx, e_dw, e_db = ref_backward(dy_ref, x, mean, invstd, w, axis)
    nd = len(shape)
    shape_c = [1] * nd
    shape_c[axis] = C
    scale = max(np.abs(e_dx).max(), (np.abs(dy_ref) * np.abs(w * to_f64(invstd)).reshape(shape_c)).max())
    assert_output(dx, e_dx, dtype, scale=scale, what="dx")
    red = tuple(d for d in range(nd) if d != axis % nd)
    acc = 1e-12 if dtype == "float64" else 1e-5
    assert_close(dbias, e_db, acc, scale=np.abs(dy_ref).sum(axis=red), what="dbias")
    po.unchanged_outside(out_raw, out)
    assert np.array_equal(px.raw, x_raw)


class Guarded:
    """Arrays that end where the process may no longer read: each is placed at the end of a
    readable mapping, right before a page mapped with no access, so a kernel that reads a
    single byte past an array's last value (a row tail's vector load) faults. The sanitizer
    cannot show such reads when they are masked vector loads: this does."""

    def __init__(self):
        self.maps = []

    def array(self, values):
        import ctypes
        import mmap

        values = np.ascontiguousarray(values)
        page = mmap.PAGESIZE
        nbytes = values.nbytes
        total = (nbytes + page - 1) // page * page + page
        m = mmap.mmap(-1, total)
        raw = np.frombuffer(m, np.uint8)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(raw.ctypes.data + total - page, page, 0) == 0, ctypes.get_errno()
        a = raw[total - page - nbytes:total - page].view(values.dtype).reshape(values.shape)
        a[...] = values
        self.maps.append((m, raw))
        return a


# Rows whose last vector is partial (14x14 and 13x13 planes, 37- and 20-value rows), rows
# shorter than one vector, and (N, C) with a partial vector of channels; both layouts' walks.
GUARDED_SHAPES = [((1, 3, 14, 14), 1), ((2, 4, 13, 13), 1), ((3, 2, 37), 1), ((2, 3, 20), 1), ((4, 3, 10), 1),
                  ((5, 37), 1), ((2, 14, 14, 3), 3)]


@pytest.mark.parametrize("shape,axis", GUARDED_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_row_tails_read_nothing_past_the_array(shape, axis, dtype):
    # Every op reads x and dy, and writes its outputs, ending right before an unreadable page
    # (a read past the end is a crash); the results equal, bit for bit, those of the same
    # values in ordinary memory.
    rng = np.random.default_rng(7)
    C = shape[axis]
    x0 = rng.standard_normal(shape).astype(dtype)
    dy0 = rng.standard_normal(shape).astype(dtype)
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    g = Guarded()
    x, dy, out = g.array(x0), g.array(dy0), g.array(np.zeros(shape, dtype))
    for stream in (False, True):
        _C._set_stream_threshold(0 if stream else -1)
        mean, var, count = bn.statistics(x, axis=axis)
        want = bn.statistics(x0, axis=axis)
        assert np.array_equal(mean, want[0]) and np.array_equal(var, want[1])
        y, m, s = bn.forward_training(x, w, b, axis=axis, out=out)
        y0, m0, s0 = bn.forward_training(x0, w, b, axis=axis)
        assert np.array_equal(y, y0) and np.array_equal(m, m0) and np.array_equal(s, s0)
        yi = bn.forward_inference(x, m, s * s, w, b, axis=axis, out=out)
        assert np.array_equal(yi, bn.forward_inference(x0, m, s * s, w, b, axis=axis))
        dx, dw, db = bn.backward(dy, x, m, s, w, axis=axis, out=out)
        dx0, dw0, db0 = bn.backward(dy0, x0, m, s, w, axis=axis)
        assert np.array_equal(dx, dx0) and np.array_equal(dw, dw0) and np.array_equal(db, db0)

