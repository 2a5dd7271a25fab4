"""Non-temporal (streaming) stores: taken for outputs larger than the last-level cache, here
forced on small arrays with the testing hook (_C._set_stream_threshold) or the
BATCHNORM_STREAM_BYTES variable. Outputs must be bit-identical to regular stores whatever the
output's strides and alignment: channels-last rows padded by a few elements once crashed
every op (a streaming store to a misaligned position), and no test reached these paths."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _C
from helpers import HAVE_TORCH, ISA_LEVELS, torch

SENTINEL = -96.0  # exact in every dtype, far from any normalized output
DTYPES = ["float16", "float32", "float64"] + (["bfloat16"] if HAVE_TORCH else [])


@pytest.fixture
def streaming():
    _C._set_stream_threshold(0)
    yield
    _C._set_stream_threshold(-1)


def numpy_of(a) -> np.ndarray:
    if HAVE_TORCH and isinstance(a, torch.Tensor):
        a = a.detach().contiguous()
        return (a.view(torch.int16) if a.dtype == torch.bfloat16 else a).numpy().copy()
    return np.array(a)


def padded(shape, pad: int, dtype: str, align_elems_off: int = 0):
    """A channels-last (N, C) view whose rows are C + pad apart, starting `align_elems_off`
    elements past a 64-byte boundary, inside a buffer filled with SENTINEL. Returns
    (view, buffer)."""
    N, C = shape
    item = 2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize
    n = N * (C + pad)
    extra = 64 // item + align_elems_off
    if dtype == "bfloat16":
        buf = torch.full((n + extra,), SENTINEL, dtype=torch.bfloat16)
        base = buf.data_ptr()
    else:
        buf = np.full(n + extra, SENTINEL, dtype=dtype)
        base = buf.ctypes.data
    off = ((-base) % 64) // item + align_elems_off
    view = buf[off:off + n].reshape(N, C + pad)[:, :C]
    return view, buf


def make(values: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    return values.astype(dtype)


def layout_of(a) -> tuple:
    """(data address, element strides) of a NumPy array or torch tensor."""
    if HAVE_TORCH and isinstance(a, torch.Tensor):
        return a.data_ptr(), a.stride(), a.element_size()
    return a.ctypes.data, tuple(s // a.itemsize for s in a.strides), a.itemsize


def sentinels_intact(buf, view) -> None:
    """Every element of the 1-D buffer outside the 2-D `view` still holds SENTINEL."""
    whole = buf.to(torch.float64).numpy() if HAVE_TORCH and isinstance(buf, torch.Tensor) else buf.astype(np.float64)
    base, _, item = layout_of(buf)
    start, (row, col), _ = layout_of(view)
    inside = np.zeros(whole.shape, bool)
    first = (start - base) // item
    for r in range(view.shape[0]):
        inside[first + r * row:first + r * row + view.shape[1] * col:col] = True
    assert (whole[~inside] == SENTINEL).all(), "a write landed outside the output"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,pad,off", [(16, 1, 0), (16, 16, 0), (32, 3, 0), (13, 3, 0), (16, 0, 1), (64, 1, 0)])
def test_padded_channels_last_outputs(dtype, C, pad, off, streaming):
    """Every op writing into a padded channels-last view, streaming forced: same bits as the
    regular stores into a dense array, nothing written outside the view."""
    rng = np.random.default_rng(C * 100 + pad)
    N = 300
    xv = rng.standard_normal((N, C)) * 2 + 1
    dyv = rng.standard_normal((N, C))
    x, dy = make(xv, dtype), make(dyv, dtype)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)

    _C._set_stream_threshold(-1)  # the reference: regular stores into dense arrays
    ref_y, mean, invstd = bn.forward_training(x, running_mean=rm.copy(), running_var=rv.copy())
    var = 1 / np.asarray(numpy_of(invstd), np.float64) ** 2
    ref_inf = bn.forward_inference(x, mean, var)
    ref_dx = bn.backward(dy, x, mean, invstd)[0]
    _C._set_stream_threshold(0)

    out, buf = padded((N, C), pad, dtype, off)
    assert bn.forward_inference(x, mean, var, out=out) is out
    np.testing.assert_array_equal(numpy_of(out), numpy_of(ref_inf))
    sentinels_intact(buf, out)

    out, buf = padded((N, C), pad, dtype, off)
    bn.backward(dy, x, mean, invstd, out=out)
    np.testing.assert_array_equal(numpy_of(out), numpy_of(ref_dx))
    sentinels_intact(buf, out)

    xv_view, buf = padded((N, C), pad, dtype, off)
    xv_view[...] = x
    y, _, _ = bn.forward_training(xv_view, running_mean=rm, running_var=rv, out=xv_view)  # in place
    assert y is xv_view
    np.testing.assert_array_equal(numpy_of(xv_view), numpy_of(ref_y))
    sentinels_intact(buf, xv_view)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape,offset", [((4, 3, 37, 41), 0), ((4, 3, 37, 41), 1), ((2, 2, 2000), 3), ((64, 8, 7, 7), 1),
                                          ((2, 5, 28, 28), 8), ((2, 5, 28, 28), 0)])
def test_channels_first_streaming_matches_regular_stores(dtype, shape, offset, streaming):
    """Channels-first rows: values one by one up to the vector alignment, regular vectors up to
    the first cache line, whole lines streamed, regular stores after the last. Outputs start
    `offset` elements past an aligned address so the head is exercised; 28x28 planes of a half
    type are 24.5 lines, so neighbouring planes share a line (offset 8: 16 bytes, where NumPy
    puts large arrays). Inference walks the planes in memory order, training in blocks."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = np.linspace(0.5, 1.5, shape[1]), np.linspace(-1, 1, shape[1])
    _C._set_stream_threshold(-1)
    ref = bn.forward_training(x, w, b)
    ref_dx = bn.backward(dy, x, ref[1], ref[2], w)[0]
    ref_inf = bn.forward_inference(x, ref[1], 1 / ref[2] ** 2, w, b)
    _C._set_stream_threshold(0)
    n = x.size
    buf = np.full(n + 64 + offset, SENTINEL, dtype=dtype)
    start = ((-buf.ctypes.data) % 64) // buf.itemsize + offset
    out = buf[start:start + n].reshape(shape)
    bn.forward_training(x, w, b, out=out)
    np.testing.assert_array_equal(out, ref[0])
    bn.backward(dy, x, ref[1], ref[2], w, out=out)
    np.testing.assert_array_equal(out, ref_dx)
    bn.forward_inference(x, ref[1], 1 / ref[2] ** 2, w, b, out=out)
    np.testing.assert_array_equal(out, ref_inf)
    assert (buf[:start] == SENTINEL).all() and (buf[start + n:] == SENTINEL).all()


def offset_buffer(n: int, dtype: str, offset: int):
    """n elements starting `offset` elements past a 64-byte boundary inside a SENTINEL-filled
    1-D buffer (a torch tensor for bfloat16). Returns (flat view, buffer, start)."""
    item = 2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize
    size = n + 64 // item + offset
    if dtype == "bfloat16":
        buf = torch.full((size,), SENTINEL, dtype=torch.bfloat16)
        base = buf.data_ptr()
    else:
        buf = np.full(size, SENTINEL, dtype=dtype)
        base = buf.ctypes.data
    start = ((-base) % 64) // item + offset
    return buf[start:start + n], buf, start


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,offset,threads", [((8, 16, 28, 28), 8, 2), ((4, 6, 14, 14), 3, 2),
                                                  ((2, 5, 28, 28), 1, 1), ((3, 4, 10, 10), 5, 2)])
def test_channels_first_streaming_in_place_on_threads(dtype, shape, offset, threads, streaming):
    """Streamed channels-first maps in place (y over x, dx over dy), on several threads whose
    tasks meet inside cache lines, into outputs `offset` elements past a line: the values
    before the first whole line and after the last one take regular stores, so no line is
    written by both kinds. The same bits as regular stores, nothing outside the output."""
    rng = np.random.default_rng(11)
    xv = rng.standard_normal(shape) * 2 - 1
    x, dy = make(xv, dtype), make(rng.standard_normal(shape), dtype)
    w, b = np.linspace(0.5, 1.5, shape[1]), np.linspace(-1, 1, shape[1])
    _C._set_stream_threshold(-1)
    _, mean, invstd = bn.forward_training(x, w, b)
    var = 1 / invstd ** 2
    ref_y = numpy_of(bn.forward_inference(x, mean, var, w, b))
    ref_dx = numpy_of(bn.backward(dy, x, mean, invstd, w)[0])
    before = bn.get_num_threads()
    bn.set_num_threads(threads)
    try:
        _C._set_stream_threshold(0)
        for src, run, ref in ((x, lambda v: bn.forward_inference(v, mean, var, w, b, out=v), ref_y),
                              (dy, lambda v: bn.backward(v, x, mean, invstd, w, out=v), ref_dx)):
            n = int(np.prod(shape))
            flat, buf, start = offset_buffer(n, dtype, offset)
            view = flat.reshape(shape)
            view[...] = src
            run(view)
            np.testing.assert_array_equal(numpy_of(view), ref)
            whole = numpy_of(buf)
            sentinel = numpy_of(make(np.array([SENTINEL]), dtype))[0]
            assert (whole[:start] == sentinel).all() and (whole[start + n:] == sentinel).all(), \
                "a write landed outside the output"
    finally:
        bn.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,pad,offset", [(640, 0, 1), (640, 0, 4), (600, 40, 3), (520, 0, 0), (640, 1, 2),
                                          (64, 0, 1), (48, 0, 3), (32, 0, 5), (64, 2, 1),
                                          (256, 0, 4), (512, 0, 1), (256, 0, 0)])
def test_channels_last_misaligned_output_streams_the_same_bits(dtype, C, pad, offset, streaming):
    """Channels-last outputs that start `offset` elements past a 64-byte boundary. Rows back
    to back (pad 0, C a multiple of the vector length) under 1 KiB, or under 2 KiB when
    misaligned, go as one flat run, its head one by one, vectors spanning rows: 64, 48, 32 and
    256 half; 640 and 512 half, 256 float32 misaligned. Other misaligned rows of at least 1 KiB
    whose positions share the misalignment (rows a multiple of 64 bytes apart) go position by
    position, each row's first channels one by one and the rest streamed: 640 and 512 float32,
    640, 512 and 256 float64, 600 with pad 40 in every dtype. Aligned rows of at least 1 KiB
    stream position by position from channel 0 (at offset 0: 256 float32 and float64, 520
    float64). Otherwise regular stores (pad 1 or 2; 520 in the narrower dtypes: rows not a
    multiple of the alignment apart). Half types' lanes are float's (16 under AVX-512, their
    alignment 32 bytes). Bits equal the regular stores' for the forward ops and the backward,
    and nothing outside the view is written."""
    N = 37
    rng = np.random.default_rng(11)
    x = make(rng.standard_normal((N, C)) * 2 + 3, dtype)
    dy = make(rng.standard_normal((N, C)), dtype)
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
    _C._set_stream_threshold(-1)
    ref_inf = bn.forward_inference(x, rm, rv, w, b, axis=-1)
    ref = bn.forward_training(x, w, b, axis=-1)
    ref_dx = bn.backward(dy, x, ref[1], ref[2], w, axis=-1)[0]
    _C._set_stream_threshold(0)
    out, buf = padded((N, C), pad, dtype, offset)
    bn.forward_inference(x, rm, rv, w, b, axis=-1, out=out)
    np.testing.assert_array_equal(numpy_of(out), numpy_of(ref_inf))
    bn.forward_training(x, w, b, axis=-1, out=out)
    np.testing.assert_array_equal(numpy_of(out), numpy_of(ref[0]))
    bn.backward(dy, x, ref[1], ref[2], w, axis=-1, out=out)
    np.testing.assert_array_equal(numpy_of(out), numpy_of(ref_dx))
    sentinels_intact(buf, out)


HOT_FLAT_SCRIPT = r"""
import json
import numpy as np
import batchnorm as bn
bn.set_num_threads(2)
same = []
for dtype in ("float16", "float32", "float64"):
    item = np.dtype(dtype).itemsize
    for C in (16, 48, 64, 128, 256):
        rng = np.random.default_rng(C)
        N = 203
        x = (rng.standard_normal((N, C)) * 2 + 3).astype(dtype)
        dy = rng.standard_normal((N, C)).astype(dtype)
        w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
        def outputs(offset, pad=0):
            buf = np.zeros(N * (C + pad) + 128, dtype)
            start = ((-buf.ctypes.data) % 64) // item + offset
            out = buf[start:start + N * (C + pad)].reshape(N, C + pad)[:, :C]
            got = [bn.forward_inference(x, np.zeros(C), np.ones(C), w, b, out=out).copy()]
            y, m, s = bn.forward_training(x, w, b, out=out)
            got += [y.copy()]
            got += [bn.backward(dy, x, m, s, w, out=out)[0].copy()]
            got += [bn.forward_training(x, w, b, residual=dy, activation="relu", out=out)[0].copy()]
            return got
        ref = outputs(0, pad=1)  # rows not back to back: position by position
        for offset in (0, 1, 2, 4, 5):
            if offset * item < 64:
                same.append(all(np.array_equal(a, r) for a, r in zip(outputs(offset), ref)))
print(json.dumps({"simd": bn.info()["simd"], "same": same}))
"""


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,offset", [(16, 1), (32, 3), (48, 4), (64, 1), (64, 4), (96, 2), (128, 1), (256, 4),
                                      (512, 3), (1024, 1), (40, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_flat_runs_in_cache_give_the_same_bits(dtype, C, offset, threads):
    """Outputs in cache (regular stores), rows back to back, aligned or `offset` elements past
    a 64-byte boundary: they go as one flat run (its head one by one, vectors spanning rows,
    coefficients rotated to the first vector's channel) at any width where a vector is one
    64-byte register (float32 and float64 under AVX-512), or of at most 8 vectors elsewhere
    (AVX2, half types: up to 128 float or 64 double channels); 40 channels (not a multiple of
    the 16 float lanes; flat in float64, 8 lanes) and the wider rows there go position by
    position. (A BATCHNORM_STREAM_BYTES setting, or a last-level cache small enough to stream
    the wider training and backward cases, sends those through the streamed paths instead.) Every op, the fused one and in place
    included, gives the bits of an output whose rows are one element apart (position by
    position), and nothing outside the view is written."""
    N = 301
    rng = np.random.default_rng(C + offset)
    x = make(rng.standard_normal((N, C)) * 2 + 3, dtype)
    dy = make(rng.standard_normal((N, C)), dtype)
    r = make(rng.standard_normal((N, C)), dtype)
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
    before = bn.get_num_threads()
    bn.set_num_threads(threads)
    try:
        def run(off, pad=0):
            got = []
            out, buf = padded((N, C), pad, dtype, off)
            got.append(numpy_of(bn.forward_inference(x, rm, rv, w, b, axis=-1, out=out)))
            y, m, s = bn.forward_training(x, w, b, axis=-1, out=out)
            got.append(numpy_of(y))
            got.append(numpy_of(bn.forward_training(x, w, b, axis=-1, residual=r, activation="relu", out=out)[0]))
            got.append(numpy_of(bn.backward(dy, x, m, s, w, axis=-1, out=out)[0]))
            sentinels_intact(buf, out)
            xin, buf = padded((N, C), pad, dtype, off)
            xin[...] = x
            bn.forward_inference(xin, rm, rv, w, b, axis=-1, out=xin)  # in place
            got.append(numpy_of(xin))
            sentinels_intact(buf, xin)
            return got
        ref = run(0, pad=1)  # rows not back to back: position by position
        for off in (offset, 0):
            for got, want in zip(run(off), ref):
                np.testing.assert_array_equal(got, want)
    finally:
        bn.set_num_threads(before)


def test_channels_last_flat_runs_in_cache_at_every_isa_level():
    """The in-cache flat runs at each ISA level (the vector length decides which rows go flat; a
    level the CPU lacks runs the highest it has): aligned and misaligned outputs give the bits
    of padded rows (position by position) for every op, float16 to float64."""
    for level in ISA_LEVELS:
        env = dict(os.environ, BATCHNORM_ISA=level)
        done = subprocess.run([sys.executable, "-c", HOT_FLAT_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{level}: exit {done.returncode}\n{done.stderr[-2000:]}"
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["same"] and all(result["same"]), (level, result)


STREAM_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import batchnorm as bn
digest = hashlib.sha256()
for dtype in ("float16", "float32", "float64"):
    for C, pad in ((16, 1), (16, 0), (13, 3)):
        N = 500
        x = np.ones((N, C), dtype); x[::2] = 3; x[1::3] = -2
        buf = np.zeros(N * (C + pad) + 64, dtype)
        off = ((-buf.ctypes.data) % 64) // buf.itemsize
        out = buf[off:off + N * (C + pad)].reshape(N, C + pad)[:, :C]
        bn.forward_inference(x, np.zeros(C), np.ones(C), out=out)
        y, m, s = bn.forward_training(x, out=out)
        digest.update(np.ascontiguousarray(out).tobytes())
        bn.backward(x, x, m, s, out=out)
        digest.update(np.ascontiguousarray(out).tobytes())
print(json.dumps({"simd": bn.info()["simd"], "digest": digest.hexdigest()}))
"""


def test_streaming_from_the_environment_at_every_isa_level():
    """BATCHNORM_STREAM_BYTES=0 forces streaming stores at import; each ISA level runs the
    issue's padded-output case without crashing, and all levels give the same bits."""
    results = {}
    for level in ISA_LEVELS:
        env = dict(os.environ, BATCHNORM_ISA=level, BATCHNORM_STREAM_BYTES="0")
        done = subprocess.run([sys.executable, "-c", STREAM_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{level}: exit {done.returncode}\n{done.stderr[-2000:]}"
        results[level] = json.loads(done.stdout.strip().splitlines()[-1])
    reached = {r["simd"]: r["digest"] for r in results.values()}
    assert len(set(reached.values())) == 1, reached


@pytest.mark.parametrize("value", ["-1", "lots", "1e9", " 5"])
def test_bad_stream_threshold_is_refused_at_import(value):
    env = dict(os.environ, BATCHNORM_STREAM_BYTES=value)
    done = subprocess.run([sys.executable, "-c", "import batchnorm"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert f"BATCHNORM_STREAM_BYTES must be a byte count (an integer >= 0), got '{value}'" in done.stderr


def _cache_field(cpu: int, level: int, field: str):
    """The library's reading of sysfs: the first word of the file `field` of CPU `cpu`'s data
    or unified cache of `level`, else None."""
    for i in range(8):
        d = f"/sys/devices/system/cpu/cpu{cpu}/cache/index{i}"
        try:
            with open(os.path.join(d, "level")) as f:
                lv = int(f.read())
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
        except OSError:
            return None
        if lv != level or kind == "Instruction":
            continue
        try:
            with open(os.path.join(d, field)) as f:
                words = f.read().split()
        except OSError:
            return None
        return words[0] if words else None
    return None


def _reported_cache_sizes() -> dict:
    """The library's reading of sysfs: CPU 0's data or unified cache size by level."""
    sizes = {}
    for level in (2, 3):
        size = _cache_field(0, level, "size")
        if size:
            sizes[level] = int(size.rstrip("KM")) * {"K": 1024, "M": 1 << 20}.get(size[-1], 1)
    return sizes


def _reported_last_level_cache() -> int:
    """The library's last-level cache: level 3, else level 2, else 32 MiB."""
    sizes = _reported_cache_sizes()
    return sizes.get(3) or sizes.get(2) or 32 << 20


def _reported_l2() -> int:
    """The library's L2: level 2, else 1 MiB."""
    return _reported_cache_sizes().get(2) or 1 << 20


def _usable_l2s() -> int:
    """The library's count of L2 caches among the CPUs this process may use: the distinct
    shared_cpu_list of their level-2 caches in sysfs, else one per CPU."""
    shared = [_cache_field(cpu, 2, "shared_cpu_list") for cpu in os.sched_getaffinity(0)]
    return len(shared) if None in shared else max(1, len(set(shared)))


def test_default_stream_threshold_is_the_cache_capped_per_cpu():
    """With no override, outputs stream above the last-level cache, at most 32 MiB per CPU the
    process may use (a VM may report its host's whole cache; training's and backward's outputs
    above half of it: cpu/plan.h, stream_rereads), and, where the reported cache passes that
    cap, at most those CPUs' L2 caches (one per set of CPUs sharing one) where the store probe
    found non-temporal stores faster than regular ones on arrays past one L2 (a cache within
    the cap is taken at its word); BATCHNORM_STREAM_BYTES replaces it."""
    if not hasattr(os, "sched_getaffinity") or not os.path.isdir("/sys/devices/system/cpu/cpu0/cache"):
        pytest.skip("needs Linux's sysfs cache description and CPU affinity")
    script = "from batchnorm import _C; print(_C._stream_threshold(), _C._store_probe())"
    env = {k: v for k, v in os.environ.items() if k != "BATCHNORM_STREAM_BYTES"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    threshold, probe = done.stdout.split()
    cpus = len(os.sched_getaffinity(0))

    def expected(probe: float) -> int:
        want = min(_reported_last_level_cache(), (32 << 20) * cpus)
        if platform.machine().lower() in ("x86_64", "amd64"):
            assert 0 < probe < 100, probe  # measured: a time ratio
            if probe < 1.0 and _reported_last_level_cache() > want:
                want = min(want, _reported_l2() * _usable_l2s())
        else:
            assert probe == 0  # not measured
        return want

    assert int(threshold) == expected(float(probe)), (threshold, probe)
    script = "from batchnorm import _C; print(_C._stream_threshold())"
    done = subprocess.run([sys.executable, "-c", script], env=dict(env, BATCHNORM_STREAM_BYTES="12345"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and int(done.stdout) == 12345, done.stderr
    # The testing hook overrides both, and -1 restores the default.
    _C._set_stream_threshold(7)
    try:
        assert _C._stream_threshold() == 7
    finally:
        _C._set_stream_threshold(-1)
    # This process's default, from its own probe (two processes may read either side of 1).
    assert _C._stream_threshold() == (int(os.environ["BATCHNORM_STREAM_BYTES"])
                                         if os.environ.get("BATCHNORM_STREAM_BYTES") else expected(_C._store_probe()))
