"""What depends on where arrays live, for every device it applies to: the devices info() lists,
the memory batchnorm keeps for results and empty_cache() gives back (host cache and CUDA
pools), work ordered on the caller's CUDA stream or on `stream=`, and arrays of two devices in
one call. CUDA cases are collected everywhere and skipped, with the reason, without a GPU."""
from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from helpers import (
    CUDA_LIBS,
    CUDA_SKIP_REASON,
    HAVE_CUDA,
    assert_close,
    assert_output,
    bits,
    cast,
    lib_params,
    ref_normalize,
    ref_statistics,
    to_f64,
    to_host,
    torch,
    vector,
)

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_CUDA, reason=CUDA_SKIP_REASON)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_info_reports_the_device(device):
    info = bn.info()["cuda"]
    if device == "cpu":  # every build runs on the CPU; an unavailable CUDA says why
        assert info["available"] or info["reason"]
        return
    assert info["compiled"] is True and info["available"] is True
    assert len(info["devices"]) >= 1 and all(isinstance(d, str) and d for d in info["devices"])


@pytest.mark.parametrize("xp", lib_params(("numpy", "torch") + CUDA_LIBS))
def test_empty_cache_returns_the_memory_of_freed_results(xp):
    """A freed 64 MiB result goes back to batchnorm's cache (host cache or CUDA pool, after the
    queued work); empty_cache() returns it to the system, and the cache grows again on use."""
    x = cast(np.ones((64, 64, 64, 64)), "float32", xp)
    mean, var = vector(np.zeros(64), "float32", xp=xp), vector(np.ones(64), "float32", xp=xp)
    y = bn.forward_inference(x, mean, var)
    y_bytes = 64 * 64 * 64 * 64 * 4
    del y
    bn.empty_cache()  # whatever earlier tests left
    y = bn.forward_inference(x, mean, var)
    del y
    released = bn.empty_cache()
    assert released >= y_bytes
    assert bn.empty_cache() < y_bytes  # nothing left to give back
    z = bn.forward_inference(x, mean, var)
    assert float(to_f64(z).mean()) == pytest.approx(1 / np.sqrt(1 + 1e-5), rel=1e-6)


def test_empty_cache_returns_the_cpu_temporaries():
    """A call with many channels keeps its per-channel arrays in the threads' scratch cache
    (three 800 KB arrays here, with out= so that no result is cached); empty_cache() frees
    them, and the next call works from fresh blocks."""
    C = 200_000
    x, y = np.ones((2, C), np.float32), np.empty((2, C), np.float32)
    mean, var = np.zeros(C, np.float32), np.ones(C, np.float32)
    bn.empty_cache()
    bn.forward_inference(x, mean, var, out=y)
    assert bn.empty_cache() >= 3 * 4 * C
    assert bn.empty_cache() == 0
    bn.forward_inference(x + 1, mean, var, out=y)
    assert np.allclose(y, 2 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_empty_cache_reaches_the_workers_after_the_thread_count_drops():
    """The worker threads' temporaries (channels-last scratch of 3 floats a channel per task)
    are freed by empty_cache() even when called with fewer threads than made them."""
    old = bn.get_num_threads()
    try:
        x = np.ones((8, 1 << 18), np.float32)
        x[0] = 2
        bn.set_num_threads(2)
        bn.empty_cache()
        bn.forward_training(x, out=np.empty_like(x))
        bn.set_num_threads(1)
        assert bn.empty_cache() > 0
        bn.set_num_threads(2)
        assert bn.empty_cache() == 0
    finally:
        bn.set_num_threads(old)


@pytest.mark.parametrize("xp", lib_params(CUDA_LIBS))
def test_mixing_cpu_and_gpu_arrays_is_a_type_error(rng, xp):
    x = cast(rng.standard_normal((4, 3, 5)), "float32", xp)
    x_cpu = to_host(x)
    w_cpu = np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError):
        bn.forward_training(x, w_cpu)
    with pytest.raises(TypeError):
        bn.forward_inference(x, np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(TypeError):
        bn.backward(x_cpu, x, np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(TypeError):
        bn.forward_training(x_cpu, vector(np.ones(3), "float32", xp=xp))


@pytest.mark.parametrize("xp", lib_params(["torch-cuda"]))
def test_runs_on_the_callers_torch_stream(rng, xp):
    x = cast(rng.standard_normal((64, 8, 64, 64)), "float32", xp)
    expected = to_f64(x) * 2
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(50_000_000)  # keeps the stream busy: a kernel on another stream would race
        x.mul_(2)
        y, m, s = bn.forward_training(x)
        mean, var, _ = bn.statistics(x)
    side.synchronize()
    ref_mean, ref_var, _ = ref_statistics(expected)
    ref_y = ref_normalize(expected, ref_mean, 1 / np.sqrt(ref_var + 1e-5))
    assert_output(y, ref_y, "float32", what="y on a side stream")
    assert_close(mean, ref_mean, 1e-6, scale=np.sqrt(ref_var), what="mean on a side stream")


@pytest.mark.parametrize("xp", lib_params(["cupy"]))
def test_runs_on_the_stream_argument(rng, xp):
    import cupy as cp

    x = cast(rng.standard_normal((32, 4, 50, 50)), "float32", xp)
    xp.synchronize()
    expected = to_f64(x) * 3
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x *= 3
    mean, var, _ = bn.statistics(x, stream=stream)  # ordered after the multiply by `stream=`
    y = bn.forward_inference(x, mean, var, stream=stream)
    stream.synchronize()
    ref_mean, ref_var, _ = ref_statistics(expected)
    assert_close(mean, ref_mean, 1e-6, scale=np.sqrt(ref_var), what="mean on stream=")
    assert_output(y, ref_normalize(expected, ref_mean, 1 / np.sqrt(ref_var + 1e-5)), "float32", what="y on stream=")
    with stream:  # the current CuPy stream is used when no stream= is given
        y2 = bn.forward_inference(x, mean, var)
    stream.synchronize()
    assert bits(y2) == bits(y)


@pytest.mark.parametrize("xp", lib_params(["cupy"]))
def test_results_outlive_the_stream_they_were_made_on(rng, xp):
    """Results are freed on the stream they were made on; they keep that stream's object alive,
    since CuPy destroys a stream with its object (a result dropped after its stream crashed the
    process on an H200: the free was queued on a destroyed stream)."""
    import gc
    import weakref

    import cupy as cp

    x = cast(rng.standard_normal((16, 4, 20, 20)), "float32", xp)
    xp.synchronize()

    def on_a_stream_of_their_own():
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:  # the current CuPy stream
            y, mean, invstd = bn.forward_training(x)
        var = bn.statistics(x, stream=stream)[1]  # stream= given
        stream.synchronize()
        try:
            ref = weakref.ref(stream)
        except TypeError:  # a stream type without weak references: the crash test alone
            ref = None
        return (y, mean, invstd, var), ref

    results, ref = on_a_stream_of_their_own()
    gc.collect()
    assert ref is None or ref() is not None, "the stream went while its results live"
    assert_output(results[0], bn.forward_training(x)[0], "float32", what="y")
    del results
    gc.collect()
    cp.cuda.Device().synchronize()
    assert ref is None or ref() is None, "the results did not let their stream go"
