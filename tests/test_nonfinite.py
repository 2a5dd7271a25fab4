"""Non-finite values (API.md, "Non-finite values"): a NaN or Inf in a channel makes that
channel's variance, saved_invstd, running variance and outputs NaN and its mean non-finite,
and leaves every other channel bit-identical to the same call without the bad value. Checked
over the determinism tests' shapes (every CPU path: channels-first pieces and groups, many
channels, channels-last, short 7x7 rows, odd sizes, strided), every dtype, 1 and 2 threads,
and on CUDA where a device is present; the ISA levels are compared in test_determinism."""
from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
import test_determinism as td
from helpers import HAVE_TORCH, torch

DTYPES = ["float16", "float32", "float64"] + (["bfloat16"] if HAVE_TORCH else [])
CUDA = bn.info()["cuda"]["available"] and HAVE_TORCH and torch.cuda.is_available()


def host(a) -> np.ndarray:
    """float64 host copy of a NumPy array or torch tensor (NaN payloads do not matter here)."""
    if HAVE_TORCH and isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def on(values: np.ndarray, dtype: str, device: str):
    """values as `dtype` on `device`: NumPy on the CPU, torch for bfloat16 and CUDA."""
    if device == "cpu" and dtype != "bfloat16":
        return values.astype(dtype)
    t = torch.from_numpy(np.ascontiguousarray(values).astype(np.float32 if dtype == "bfloat16" else dtype))
    return t.to(device=device, dtype=getattr(torch, dtype))


def channel_index(ndim: int, axis: int, c: int, position: int, shape) -> tuple:
    """The index of value `position` (in C order over the reduced axes) of channel c."""
    ax = axis % ndim
    reduced = [shape[d] for d in range(ndim) if d != ax]
    idx = list(np.unravel_index(position, reduced))
    idx.insert(ax, c)
    return tuple(int(i) for i in idx)


def poison(x: np.ndarray, axis: int) -> dict:
    """Copies of x with a NaN at the last value of channel 1 (a row's tail, a partial vector)
    and +Inf at the first value of channel 2 (a row's head); returns {channel: bad copy}."""
    ndim = x.ndim
    count = x.size // x.shape[axis]
    bad = x.copy()
    bad[channel_index(ndim, axis, 1, count - 1, x.shape)] = np.nan
    marked = [1]
    if x.shape[axis] > 2:
        bad[channel_index(ndim, axis, 2, 0, x.shape)] = np.inf
        marked.append(2)
    return {"x": bad, "channels": marked}


def run(x, dy, axis):
    C = x.shape[axis]
    w = np.linspace(0.5, 2, C)
    b = np.linspace(-1, 1, C).astype(np.float32)
    if not isinstance(x, np.ndarray):
        w, b = (torch.as_tensor(v, device=x.device) for v in (w, b))
    rm = np.zeros(C, np.float32) if isinstance(x, np.ndarray) else torch.zeros(C, device=x.device)
    rv = np.ones(C, np.float32) if isinstance(x, np.ndarray) else torch.ones(C, device=x.device)
    mean, var, _ = bn.statistics(x, axis=axis)
    y, smean, sinvstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis)
    yi = bn.forward_inference(x, mean, var, w, b, axis=axis)
    dx, dw, db = bn.backward(dy, x, smean, sinvstd, w, axis=axis)
    return dict(mean=mean, var=var, y=y, saved_mean=smean, saved_invstd=sinvstd, running_mean=rm, running_var=rv,
                y_inference=yi, dx=dx, dweight=dw, dbias=db)


def select(a: np.ndarray, axis: int, channels) -> np.ndarray:
    return np.take(a, channels, axis=axis % a.ndim)


def check_nonfinite(name: str, dtype: str, device: str = "cpu") -> dict:
    x64, dy64, axis = td.case_input(name, "float64")
    x64, dy64 = np.ascontiguousarray(x64), np.ascontiguousarray(dy64)
    index = td.CASES[name][2]
    bad = poison(x64, axis)

    def prepared(values):
        if index is None:
            return on(values, dtype, device)
        # Keep the case's strided view: poison the logical values, then store them strided.
        big_shape = td.CASES[name][0]
        big = np.zeros(big_shape)
        big[index] = values
        return on(big, dtype, device)[index]

    clean = {k: host(v) for k, v in run(prepared(x64), prepared(dy64), axis).items()}
    dirty = {k: host(v) for k, v in run(prepared(bad["x"]), prepared(dy64), axis).items()}
    C = x64.shape[axis]
    marked = bad["channels"]
    others = [c for c in range(C) if c not in marked]
    for key in ("var", "saved_invstd", "running_var"):
        assert np.isnan(dirty[key][marked]).all(), f"{key} of a poisoned channel is {dirty[key][marked]}, not NaN"
    for key in ("mean", "saved_mean", "running_mean"):
        assert not np.isfinite(dirty[key][marked]).any(), f"{key} of a poisoned channel is finite: {dirty[key][marked]}"
    for key in ("y", "dx"):
        assert np.isnan(select(dirty[key], axis, marked)).all(), f"{key} of a poisoned channel is not all NaN"
    assert np.isnan(dirty["dweight"][marked]).all()
    for key in clean:
        a, b = clean[key], dirty[key]
        if a.ndim == 1:
            a, b = a[others], b[others]
        else:
            a, b = select(a, axis, others), select(b, axis, others)
        np.testing.assert_array_equal(b, a, err_msg=f"{key} of a clean channel changed")
    return dirty


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(td.CASES))
def test_nonfinite_channel_poisons_only_itself(name, dtype, restore_threads):
    results = {}
    for threads in (1, 2):
        bn.set_num_threads(threads)
        results[threads] = check_nonfinite(name, dtype)
    for key in results[1]:
        np.testing.assert_array_equal(results[1][key], results[2][key], err_msg=f"{key}: 1 vs 2 threads")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and torch")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("name", list(td.CASES))
def test_nonfinite_channel_poisons_only_itself_cuda(name, dtype):
    check_nonfinite(name, dtype, "cuda")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape,axis", [((8, 4, 5, 5), 1), ((8, 4), 1), ((8, 5, 5, 4), -1)])
def test_issue_example_statistics(shape, axis, value):
    """The reported case: one bad value in channel 1 of float32 data gave var 0.0."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x[channel_index(x.ndim, axis, 1, 3, shape)] = value
    mean, var, _ = bn.statistics(x, axis=axis)
    assert np.isnan(var[1]) and not np.isfinite(mean[1])
    assert np.isfinite(var[[0, 2, 3]]).all() and (var[[0, 2, 3]] > 0).all()
    running_mean, running_var = np.zeros(4, np.float32), np.ones(4, np.float32)
    y, _, invstd = bn.forward_training(x, running_mean=running_mean, running_var=running_var, axis=axis)
    assert np.isnan(invstd[1]) and np.isnan(running_var[1]) and np.isnan(select(y, axis, [1])).all()


def test_long_constant_channel_has_variance_exactly_zero():
    """Rounding leaves M2 of a long constant float32 channel slightly negative; the clamp must
    stay (mutation testing removed it unnoticed): 15437 copies of this value did it."""
    v = np.float32(3.736297607421875)
    for shape, axis in [((1, 1, 15437), 1), ((15437, 1), 1), ((15437, 3), -1)]:
        x = np.full(shape, v, np.float32)
        mean, var, _ = bn.statistics(x, axis=axis)
        assert (var == 0).all() and (mean == v).all(), (shape, mean, var)
        _, _, invstd = bn.forward_training(x, axis=axis, eps=0.0)
        assert np.isinf(invstd).all()  # 1 / sqrt(0): no NaN from a negative variance


@pytest.mark.skipif(not HAVE_TORCH, reason="bfloat16 arrays are made with torch")
@pytest.mark.parametrize("layout", ["nc", "nchw"])
def test_bfloat16_nan_lanes_stay_quiet_nans_with_their_payload(layout):
    """bfloat16 stores find NaN lanes by one compare of a vector's two halves and only then
    quiet them (simd.h): a NaN in any lane of either half, of either sign, signalling or quiet,
    with any payload, comes out as the same NaN made quiet (bit 6 set), a NaN statistic makes
    its channel NaN (not -0, which rounding its payload as a number gives), and every other
    value keeps the bits of the same call without NaNs."""
    rng = np.random.default_rng(5)
    shape = (40, 64) if layout == "nc" else (3, 8, 9, 9)
    clean = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(torch.bfloat16)
    bits = clean.view(torch.int16).numpy().copy()
    flat = bits.reshape(-1)
    # One NaN per 16-value vector at a lane that walks through both halves; payloads: quiet,
    # signalling (lowest bit only), all ones, negative.
    payloads = np.array([0x7FC0, 0x7F81, 0x7FFF, 0xFFC1, 0xFF80 | 0x15], dtype=np.uint16).view(np.int16)
    where = np.arange(3, flat.size, 17)
    flat[where] = payloads[np.arange(where.size) % payloads.size]
    x = torch.from_numpy(bits).view(torch.bfloat16)
    C = shape[1]
    mean, var = np.linspace(-0.5, 0.5, C), np.linspace(0.5, 2.0, C)
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    ref = bn.forward_inference(clean, mean, var, w, b).view(torch.int16).numpy().reshape(-1)
    got = bn.forward_inference(x, mean, var, w, b).view(torch.int16).numpy().reshape(-1)
    expected = ref.copy()
    expected[where] = flat[where] | 0x40
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
    # NaN statistics whose payload fills the mantissa: rounded as a number, such a NaN carries
    # into the sign bit and comes out as -0. Channels 5 and 27 sit in the low and the high half
    # of a vector of 16 channels-last channels (NCHW: whole planes).
    chans = [5, 27] if C > 27 else [1, 5]
    nan_mean = mean.copy()
    nan_mean[chans] = np.array([0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF], dtype=np.uint64).view(np.float64)
    y = bn.forward_inference(clean, nan_mean, var, w, b).to(torch.float32).numpy()
    y_ref = bn.forward_inference(clean, mean, var, w, b).to(torch.float32).numpy()
    poisoned = np.zeros(C, dtype=bool)
    poisoned[chans] = True
    assert np.isnan(np.moveaxis(y, 1, 0)[poisoned]).all()
    np.testing.assert_array_equal(np.moveaxis(y, 1, 0)[~poisoned], np.moveaxis(y_ref, 1, 0)[~poisoned])


# ---- huge finite values: statistics that fit the dtype stay finite ------------------------------

# Powers of two (exact scalings): float32 and bfloat16 values about 2^62 = 5e18 with variances
# about 1e37, near float32's largest (3.4e38); float64 ones about 1e151 with variances about 1e302
# (the moments keep the sum of squared deviations, count x variance, which must fit a double).
HUGE = {"float32": 2.0**60, "bfloat16": 2.0**60, "float64": 2.0**500}


@pytest.mark.parametrize("dtype", ["float32", "float64"] + (["bfloat16"] if HAVE_TORCH else []))
@pytest.mark.parametrize("name", list(td.CASES))
def test_huge_finite_values_give_finite_statistics(name, dtype, restore_threads):
    """Finite values whose variance the dtype holds give that variance, never Inf (invstd 0, y 0)
    or NaN: the kernels add blocks in the accumulation type, whose sums overflow first, and such
    channels are taken again in double (plan.h, rescued_statistics). x is a case's values times a
    power of two (its statistics the same multiples), one channel also shifted to about 1e37 (a
    float32 sum's overflow) where the dtype allows, on every CPU path, 1 and 2 threads."""
    x64, _, axis = td.case_input(name, "float64")
    x64 = np.array(x64) - 10  # centred: the spread, not the offset, makes the variance huge
    scale = HUGE[dtype]
    x = on(x64 * scale, dtype, "cpu")
    held = host(x) / scale  # the values the dtype holds, unscaled
    shift = np.zeros(x64.shape[axis])
    if dtype != "float64":
        shift[0] = 2.0**123  # 1.06e37: channel 0's sum overflows float32
        bshape = [1] * x64.ndim
        bshape[axis] = -1
        x = on(held * scale + shift.reshape(bshape), dtype, "cpu")
        held = host(x) / scale
    red = tuple(d for d in range(x64.ndim) if d != axis % x64.ndim)
    want_mean, want_var = held.mean(axis=red) * scale, held.var(axis=red) * scale**2
    for threads in (1, 2):
        bn.set_num_threads(threads)
        mean, var, _ = bn.statistics(x, axis=axis, dtype="float64")
        # The mean to float32's rounding of values of the channel's spread (float64: its own).
        close = 1e-6 if dtype != "float64" else 1e-12
        err = np.abs(host(mean) - want_mean) / (np.abs(want_mean) + np.sqrt(want_var))
        assert err.max() <= close, f"mean, {threads} threads: relative error {err.max()}"
        np.testing.assert_allclose(host(var), want_var, rtol=1e-5 if dtype != "float64" else 1e-9,
                                   err_msg=f"var, {threads} threads")
        y, _, invstd = bn.forward_training(x, axis=axis)
        assert np.isfinite(host(invstd)).all() and (host(invstd) > 0).all()
        bshape = [1] * x64.ndim
        bshape[axis % x64.ndim] = -1
        want_y = (held - (want_mean / scale).reshape(bshape)) * scale / np.sqrt(want_var + 1e-5).reshape(bshape)
        tol = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 2e-2}[dtype]
        np.testing.assert_allclose(host(y), want_y, rtol=tol, atol=tol, err_msg=f"y, {threads} threads")


@pytest.mark.parametrize("shape, axis", [((4096, 3), 1), ((64, 3, 8, 8), 1), ((64, 8, 8, 3), -1), ((2, 3, 45, 47), 1)])
def test_float64_variance_whose_count_times_variance_overflows(shape, axis, restore_threads):
    """float64 values about +-2^510 (1e153): the variance (about 2^1020, 1.1e307) fits a double,
    the sum of squared deviations (count x variance, 2^1032 and more) does not. It came back Inf
    (invstd 0, y 0); the rescue takes the variance at its scale (rescued_statistics)."""
    rng = np.random.default_rng(7)
    values = np.where(rng.random(shape) < 0.5, -1.0, 1.0) * rng.uniform(0.5, 1.0, shape)
    x = np.ldexp(values, 510)
    red = tuple(d for d in range(len(shape)) if d != axis % len(shape))
    want_mean = np.ldexp(values.mean(axis=red), 510)
    want_var = np.ldexp(values.var(axis=red), 1020)
    count = values.size // shape[axis]
    assert np.isfinite(want_var).all() and (np.log2(want_var) + np.log2(count) > 1024).all()
    for threads in (1, 2):
        bn.set_num_threads(threads)
        mean, var, _ = bn.statistics(x, axis=axis)
        np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-12 * np.sqrt(want_var).max())
        np.testing.assert_allclose(var, want_var, rtol=1e-12, err_msg=f"{threads} threads")
        y, _, invstd = bn.forward_training(x, axis=axis)
        bshape = [1] * len(shape)
        bshape[axis] = -1
        want_y = (values - np.ldexp(want_mean, -510).reshape(bshape)) / np.sqrt(np.ldexp(want_var, -1020)).reshape(bshape)
        np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12, err_msg=f"y, {threads} threads")


@pytest.mark.parametrize("value", [1e200, 1.7e308, -1e308])
def test_constant_huge_float64_channel_has_variance_zero(value):
    """A constant float64 channel of huge values (its kernels' moments overflow, so it is
    rescued): mean the value, variance 0 (the rescue's scaled mean, rounded, made it Inf), as in
    a sync layer's merge."""
    for n in (3, 771):
        x = np.full((n, 2), value)
        x[:, 1] = np.linspace(-1, 1, n)
        mean, var, _ = bn.statistics(x)
        assert mean[0] == value and var[0] == 0.0, (n, mean, var)
        rm, rv = np.zeros(2), np.ones(2)
        y, _, invstd = bn.forward_training(x, running_mean=rm, running_var=rv, momentum=1.0)
        assert rv[0] == 0.0 and rm[0] == value and (y[:, 0] == 0).all()


def test_unbiased_running_variance_near_double_s_largest():
    """A biased batch variance about 1.2e308 (finite) gave an Inf unbiased running variance:
    var * n overflowed before the division by n - 1 (update_running, core/recipes.h)."""
    x = np.random.default_rng(2).standard_normal((8, 2, 4)) * 1e154
    _, var, n = bn.statistics(x)
    assert np.isfinite(var).all() and (var * (n / (n - 1)) < np.finfo(np.float64).max).all()
    for momentum in (1.0, 0.5):
        rm, rv = np.zeros(2), np.ones(2)
        bn.forward_training(x, running_mean=rm, running_var=rv, momentum=momentum)
        np.testing.assert_allclose(rv, (1 - momentum) + momentum * var * (n / (n - 1)), rtol=1e-15)


def _backward_reference(dy, x, mean, invstd, axis):
    """float64 sums, parameter gradients and dx of the backward at the given statistics."""
    dy, x = host(dy), host(x)
    bshape = [1] * x.ndim
    bshape[axis % x.ndim] = -1
    red = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
    m, s = host(mean).reshape(bshape), host(invstd).reshape(bshape)
    n = x.size / x.shape[axis]
    sdy, sdx = dy.sum(axis=red), (dy * (x - m)).sum(axis=red)
    dx = (dy - sdy.reshape(bshape) / n - (x - m) * (sdx.reshape(bshape) / n) * s * s) * s
    return sdy, sdx, sdx * host(invstd), dx


@pytest.mark.parametrize("dtype", ["float32"] + (["bfloat16"] if HAVE_TORCH else []))
@pytest.mark.parametrize("name", list(td.CASES))
def test_huge_finite_gradients_give_finite_backward(name, dtype, restore_threads):
    """dy about 5e18 and x - mean about 3e18 (float32, bfloat16): their products (1e37) and the
    sums of them overflow the kernels' float32 accumulators, and float32's range took the
    coefficients (sum(dy * (x - mean)) about 1e40 and more): dweight and dx came back NaN where
    every true result fits. Such channels' sums are taken again in double (backward.cpp,
    rescued_grad_sums) and their coefficients formed in double (widen_backward_coefficients), on
    every CPU path, 1 and 2 threads."""
    x64, dy64, axis = td.case_input(name, "float64")
    x = on((np.array(x64) - 10) * 2.0**60, dtype, "cpu")
    dy = on(np.array(dy64) * 2.0**62, dtype, "cpu")
    for threads in (1, 2):
        bn.set_num_threads(threads)
        _, mean, invstd = bn.forward_training(x, axis=axis)
        dx, dweight, dbias = bn.backward(dy, x, mean, invstd, axis=axis)
        sdy, sdx, want_dweight, want_dx = _backward_reference(dy, x, mean, invstd, axis)
        what = f"{threads} threads"
        tol = 1e-4 if dtype == "float32" else 2e-2
        np.testing.assert_allclose(host(dbias), sdy, rtol=tol, atol=tol * np.abs(sdy).max(), err_msg=f"dbias, {what}")
        np.testing.assert_allclose(host(dweight), want_dweight, rtol=tol, atol=tol * np.abs(want_dweight).max(),
                                   err_msg=f"dweight, {what}")
        np.testing.assert_allclose(host(dx), want_dx, rtol=tol, atol=tol * np.abs(want_dx).max(), err_msg=f"dx, {what}")
        # The split halves (SyncBatchNorm's): the same sums in double, the same dx.
        s1, s2, dw2, db2 = bn.backward_reduce(dy, x, mean, invstd, axis=axis)
        np.testing.assert_allclose(host(s1), sdy, rtol=1e-6, atol=1e-6 * np.abs(sdy).max(), err_msg=f"sum_dy, {what}")
        np.testing.assert_allclose(host(s2), sdx, rtol=1e-6, atol=1e-6 * np.abs(sdx).max(), err_msg=f"sum_dy_xmu, {what}")
        count = host(x).size // host(x).shape[axis]
        dx2 = bn.backward_elemt(dy, x, mean, invstd, s1, s2, count, axis=axis)
        np.testing.assert_allclose(host(dx2), want_dx, rtol=tol, atol=tol * np.abs(want_dx).max(), err_msg=f"dx, {what}")


def test_backward_rescue_of_float64_deviations_past_double_s_range():
    """float64 x at +-1.7e308 with mean 8.5e307: x - mean overflows double though x, dy and mean
    are finite. The rescue scaled by the deviations' exponent, ilogb(Inf) (a signed overflow,
    undefined), and gave sum_dy_xmu -Inf; now x and mean share one scale."""
    x = np.array([[1.7e308], [1.7e308], [1.7e308], [-1.7e308]])
    dy = np.array([[4.0], [4.0], [-4.0], [1.0]])
    mean, invstd = np.array([0.85e308]), np.array([1e-308])
    _, s2, _, _ = bn.backward_reduce(dy, x, mean, invstd)
    want = 0.85e308  # 4 (x - mean) twice, minus once, plus 1 x (-2.55e308)
    np.testing.assert_allclose(s2, [want], rtol=1e-15)
    _, dweight, _ = bn.backward(dy, x, mean, invstd)
    np.testing.assert_allclose(dweight, [want * 1e-308], rtol=1e-15)


@pytest.mark.parametrize("name", list(td.CASES))
def test_float64_backward_sums_past_double_s_range(name, restore_threads):
    """float64 dy about 2^660 (1e198) with deviations about 2^400 (1e120): sum(dy * (x - mean))
    passes 1.8e308, while dweight = sum * invstd (about 2^660) and dx (about 2^260) fit. The
    rescue's sums came back Inf and so did dweight and dx; the finalize now takes them at their
    scale (scaled_param_grads, scaled_backward_coefficients), on every CPU path, 1 and 2
    threads, the plain, batch-renorm and fused backward and backward_reduce's dweight (its sum
    outputs are Inf: they do not fit)."""
    x64, dy64, axis = td.case_input(name, "float64")
    xs, dys = np.array(x64, dtype=np.float64), np.array(dy64, dtype=np.float64)
    x, dy = np.ldexp(xs, 400), np.ldexp(dys, 660)
    ax = axis % xs.ndim
    red = tuple(d for d in range(xs.ndim) if d != ax)
    bshape = [1] * xs.ndim
    bshape[ax] = -1
    n = xs.size // xs.shape[ax]
    r, d = np.full(xs.shape[ax], 1.5), np.full(xs.shape[ax], 0.25)
    for threads in (1, 2):
        bn.set_num_threads(threads)
        y, mean, invstd = bn.forward_training(x, axis=axis)
        # The reference at the values' scale: mean and invstd 2^400 times smaller and larger.
        ms, ss = np.ldexp(mean, -400).reshape(bshape), np.ldexp(invstd, 400).reshape(bshape)
        sdy, sdx = dys.sum(axis=red), (dys * (xs - ms)).sum(axis=red)
        assert (np.log2(np.abs(sdx)) + 1060 > 1024).any(), "the case must pass double's range"
        want_dbias = np.ldexp(sdy, 660)
        want_dweight = np.ldexp(sdx * ss.ravel(), 660)
        inner = dys - sdy.reshape(bshape) / n - (xs - ms) * (sdx.reshape(bshape) / n) * ss * ss
        want_dx = np.ldexp(inner * ss, 260)
        what = f"{name}, {threads} threads"

        def close(got, want, label):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max(), err_msg=f"{label}, {what}")

        dx, dweight, dbias = bn.backward(dy, x, mean, invstd, axis=axis)
        close(dbias, want_dbias, "dbias")
        close(dweight, want_dweight, "dweight")
        close(dx, want_dx, "dx")
        _, dweight_r, dbias_r = bn.backward(dy, x, mean, invstd, axis=axis, renorm=(r, d))
        close(dweight_r, 1.5 * want_dweight + 0.25 * want_dbias, "renorm dweight")
        close(dbias_r, want_dbias, "renorm dbias")
        _, s2, dweight2, _ = bn.backward_reduce(dy, x, mean, invstd, axis=axis)
        assert np.isinf(s2).any()
        close(dweight2, want_dweight, "backward_reduce dweight")
        # The fused backward: the ReLU mask from y (no residual), its masked dy rescued.
        gs = np.where(y > 0, dys, 0.0)
        sdy_g, sdx_g = gs.sum(axis=red), (gs * (xs - ms)).sum(axis=red)
        dxf, dweightf, dbiasf = bn.backward(dy, x, mean, invstd, axis=axis, y=y, activation="relu")
        close(dbiasf, np.ldexp(sdy_g, 660), "fused dbias")
        close(dweightf, np.ldexp(sdx_g * ss.ravel(), 660), "fused dweight")
        inner_g = gs - sdy_g.reshape(bshape) / n - (xs - ms) * (sdx_g.reshape(bshape) / n) * ss * ss
        close(dxf, np.ldexp(inner_g * ss, 260), "fused dx")


def test_renorm_backward_with_d_zero_and_an_overflowed_dbias():
    """Batch renorm's warm-up (d = 0) and sum(dy) past float32's range: dbias is Inf (the true
    overflow) and dweight = r * dweight + d * dbias was 0 x Inf = NaN; d = 0 adds nothing."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 2)).astype(np.float32)
    dy = (np.float32(2.0**123) * (1 + 0.1 * rng.standard_normal((64, 2)))).astype(np.float32)
    mean, invstd = x.mean(0).astype(np.float32), (1 / x.std(0)).astype(np.float32)
    r, d = np.full(2, 1.5, np.float32), np.zeros(2, np.float32)
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd, renorm=(r, d))
    assert (dbias == np.inf).all()
    want = 1.5 * (dy.astype(np.float64) * (x - mean)).sum(0) * invstd
    np.testing.assert_allclose(dweight, want, rtol=1e-4)


def test_huge_finite_gradients_through_the_fused_backward():
    """The fused backward (ReLU mask from y, the residual's gradient) rescues the masked dy's sums."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 3, 8, 8)) * 2.0**60).astype(np.float32)
    dy = (rng.standard_normal((64, 3, 8, 8)) * 2.0**62).astype(np.float32)
    y, mean, invstd = bn.forward_training(x, residual=np.zeros_like(x), activation="relu")
    dx, dweight, dbias, dres = bn.backward(dy, x, mean, invstd, y=y, activation="relu", residual=True)
    g = np.where(y > 0, dy, 0).astype(np.float32)
    np.testing.assert_array_equal(dres, g)
    sdy, _, want_dweight, want_dx = _backward_reference(g, x, mean, invstd, 1)
    np.testing.assert_allclose(dbias, sdy, rtol=1e-4, atol=1e-4 * np.abs(sdy).max())
    np.testing.assert_allclose(dweight, want_dweight, rtol=1e-4, atol=1e-4 * np.abs(want_dweight).max())
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4 * np.abs(want_dx).max())


def test_constant_channel_at_float32_s_largest_values():
    """The review's case: every value 1e38 (their float32 sum overflows): mean 1e38, variance 0,
    y the bias, not NaN."""
    x = np.full((4, 2), 1e38, np.float32)
    mean, var, _ = bn.statistics(x)
    np.testing.assert_array_equal(mean, np.float32(1e38))
    np.testing.assert_array_equal(var, 0)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    y, _, _ = bn.forward_training(x, bias=np.full(2, 0.5, np.float32), running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(y, 0.5)
    np.testing.assert_allclose(rm, 1e37, rtol=1e-6)


def test_variance_plus_eps_past_double_s_largest():
    """A float64 variance of 1e308 with eps 1e308: var + eps overflowed, invstd 1 / sqrt(Inf) = 0
    and y 0, where invstd = 1 / sqrt(2e308) = 7.07e-155 fits (and y +-1/sqrt(2)). The same in
    inference, in fold and in batch renorm's sigmas."""
    x = np.array([[1e154], [-1e154]] * 4)
    y, _, invstd = bn.forward_training(x, eps=1e308)
    np.testing.assert_allclose(invstd, 2**-0.5 * 1e-154, rtol=1e-15)
    np.testing.assert_allclose(y[:, 0], [2**-0.5, -(2**-0.5)] * 4, rtol=1e-15)
    y = bn.forward_inference(x, np.zeros(1), np.array([1e308]), eps=1e308)
    np.testing.assert_allclose(y[:, 0], [2**-0.5, -(2**-0.5)] * 4, rtol=1e-15)
    kernel, bias = bn.fold(np.ones((1, 3)), np.ones(1), np.zeros(1), np.array([1e308]), eps=1e308)
    np.testing.assert_allclose(kernel, 2**-0.5 * 1e-154, rtol=1e-15)
    np.testing.assert_allclose(bias, 2**-0.5 * 1e-154, rtol=1e-15)
    _, _, _, r, d = bn.forward_training(x, running_mean=np.zeros(1), running_var=np.array([1e308]), eps=1e308,
                                        renorm=(3.0, 5.0))
    np.testing.assert_allclose(r, 1.0, rtol=1e-15)
    np.testing.assert_array_equal(d, 0.0)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_double_values_round_once_to_half_types(dtype):
    """fold's outputs are formed in double and rounded to the kernel's dtype once: through a
    float first, a double a hair above a half-type tie (1 + 2**-11 + 2**-40 for float16) landed
    on the tie and went to even, 1 ulp low (about 1 value in 8000). With var 1 and eps 0 the
    folded kernel of ones is the weight itself, rounded once."""
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype, bits = ml_dtypes.bfloat16, 8
    else:
        bits = 11
    rng = np.random.default_rng(5)
    ties = 1 + (rng.integers(0, 2**bits, 2000) * 2 + 1) * 2.0 ** -(bits + 1)  # halfway between two values
    weights = np.concatenate([ties + 2.0**-40, ties - 2.0**-40, ties, rng.uniform(0.5, 2, 2000)])
    kernel, _ = bn.fold(np.ones((weights.size, 1), dtype), None, np.zeros(weights.size), np.ones(weights.size),
                        weights, eps=0.0)

    def once(v: float) -> float:  # v rounded to `bits` significant bits, ties to even (exact in double)
        e = np.frexp(v)[1]
        return round(v * 2.0 ** (bits - e)) * 2.0 ** (e - bits)

    np.testing.assert_array_equal(kernel[:, 0].astype(np.float64), [once(float(w)) for w in weights])
