"""CUDA backend tests: every function of the contract on CuPy arrays and torch CUDA tensors,
against a float64 NumPy reference computed from host copies of the same (rounded) values,
against torch.nn.functional.batch_norm on the GPU, and against batchnorm's own CPU path.
Skipped, with the reason, where CUDA, CuPy or torch is unavailable."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

bn = pytest.importorskip("batchnorm")

_CUDA = bn.info()["cuda"]
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _CUDA["available"], reason=f"CUDA unavailable: {_CUDA['reason'] or 'not compiled'}"),
]

DTYPES = ["float16", "bfloat16", "float32", "float64"]
# Outputs in x's dtype: error bound relative to the output's scale (max |ref|, at least 1).
OUT_TOL = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-5, "float64": 1e-12}
# Results in the accumulation dtype (statistics, dweight, dbias), compared with float64
# sums of the same rounded values.
ACC_TOL = {"float16": 1e-5, "bfloat16": 1e-5, "float32": 1e-5, "float64": 1e-12}


# ---- array libraries ---------------------------------------------------------------------


class CupyLib:
    name = "cupy"

    def __init__(self):
        self.cp = pytest.importorskip("cupy")

    def dtype(self, name):
        if name == "bfloat16":
            pytest.skip("CuPy has no bfloat16")
        return getattr(self.cp, name)

    def asarray(self, a, dtype):
        return self.cp.asarray(np.asarray(a, dtype=np.float64).astype(self.dtype(dtype)))

    def host(self, a):
        return self.cp.asnumpy(a).astype(np.float64)

    def raw(self, a):
        return self.cp.asnumpy(self.cp.ascontiguousarray(a)).tobytes()

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype=self.dtype(dtype))

    def transpose(self, a, d0, d1):
        return a.swapaxes(d0, d1)

    def zeros_like(self, a):
        return self.cp.zeros_like(a)

    def synchronize(self):
        self.cp.cuda.get_current_stream().synchronize()


class TorchLib:
    name = "torch"

    def __init__(self):
        self.torch = pytest.importorskip("torch")
        if not self.torch.cuda.is_available():
            pytest.skip("torch has no CUDA device")

    def dtype(self, name):
        return getattr(self.torch, name)

    def asarray(self, a, dtype):
        return self.torch.tensor(np.asarray(a, dtype=np.float64), dtype=self.dtype(dtype), device="cuda")

    def host(self, a):
        return a.detach().to(self.torch.float64).cpu().numpy()

    def raw(self, a):
        a = a.detach().contiguous()
        as_int = {2: self.torch.int16, 4: self.torch.int32, 8: self.torch.int64}[a.element_size()]
        return a.view(as_int).cpu().numpy().tobytes()

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=self.dtype(dtype), device="cuda")

    def transpose(self, a, d0, d1):
        return a.transpose(d0, d1)

    def zeros_like(self, a):
        return self.torch.zeros_like(a)

    def synchronize(self):
        self.torch.cuda.synchronize()


@pytest.fixture(params=["cupy", "torch"])
def lib(request):
    return CupyLib() if request.param == "cupy" else TorchLib()


@pytest.fixture
def torch_lib():
    return TorchLib()


@pytest.fixture
def cupy_lib():
    return CupyLib()


# ---- device arrays in various memory layouts -----------------------------------------------

LAYOUTS = ["contiguous", "channels_last_memory", "strided", "transposed", "negative"]


def make(lib, x, dtype, layout="contiguous"):
    """A device array with the values of NumPy `x` (rounded to dtype) in the given memory
    layout; its logical shape is always x.shape."""
    if layout == "contiguous":
        return lib.asarray(x, dtype)
    if layout == "channels_last_memory":  # channel axis 1 in memory last, as torch's channels_last
        perm = [0] + list(range(2, x.ndim)) + [1]
        inverse = [int(d) for d in np.argsort(perm)]
        dev = lib.asarray(np.ascontiguousarray(x.transpose(perm)), dtype)
        return dev.permute(*inverse) if lib.name == "torch" else dev.transpose(tuple(inverse))
    if layout == "strided":  # every other element of the last axis of a larger buffer
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],))
        big[..., ::2] = x
        return lib.asarray(big, dtype)[..., ::2]
    if layout == "transposed":  # the last two axes swapped in memory
        dev = lib.asarray(np.ascontiguousarray(np.swapaxes(x, -1, -2)), dtype)
        return lib.transpose(dev, -1, -2)
    if layout == "negative":
        if lib.name == "torch":
            pytest.skip("torch has no negative strides")
        return lib.asarray(np.ascontiguousarray(x[..., ::-1]), dtype)[..., ::-1]
    raise AssertionError(layout)


# ---- float64 reference ---------------------------------------------------------------------


def reduced_axes(ndim, axis):
    axis %= ndim
    return tuple(d for d in range(ndim) if d != axis)


def per_channel(v, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v).reshape(shape)


def ref_statistics(x, axis):
    red = reduced_axes(x.ndim, axis)
    return x.mean(axis=red), x.var(axis=red)


def ref_forward(x, w, b, eps, axis):
    mean, var = ref_statistics(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - per_channel(mean, x.ndim, axis)) * per_channel(invstd * w, x.ndim, axis) + per_channel(b, x.ndim, axis)
    return y, mean, var, invstd


def ref_backward(dy, x, mean, invstd, w, axis):
    red = reduced_axes(x.ndim, axis)
    n = x.size // x.shape[axis]
    xhat = (x - per_channel(mean, x.ndim, axis)) * per_channel(invstd, x.ndim, axis)
    dbias = dy.sum(axis=red)
    dweight = (dy * xhat).sum(axis=red)
    dx = (dy - per_channel(dbias / n, x.ndim, axis) - xhat * per_channel(dweight / n, x.ndim, axis)) * per_channel(
        invstd * w, x.ndim, axis
    )
    return dx, dweight, dbias


def assert_out_close(got, ref, dtype, what):
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    assert err <= OUT_TOL[dtype] * scale, f"{what}: max error {err:.3g} > {OUT_TOL[dtype]:.1g} * {scale:.3g} ({dtype})"


def assert_acc_close(got, ref, scale, dtype, what):
    err = np.abs(got - ref)
    bound = ACC_TOL[dtype] * np.maximum(scale, 1e-30)
    assert np.all(err <= bound), f"{what}: worst error {float((err / bound).max()):.3g} x the bound ({dtype})"


def rng_for(*key):
    """A generator seeded by the test's parameters (stable across processes, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


SHAPES = [
    ((8, 3), 1),             # (N, C): channels adjacent in memory
    ((4, 5, 7), 1),          # count not a multiple of anything
    ((2, 3, 40, 56), 1),     # few channels, many values: split reductions
    ((3, 6, 5, 5), -1),      # channels-last
    ((16, 9, 9, 24), -1),    # channels-last, packable
    ((2, 2048, 3, 1), 1),    # many channels, few values each
    ((1, 1, 2, 3), 1),       # one channel
    ((2, 3, 1), 1),          # two values per channel (training minimum)
]


# ---- tests ---------------------------------------------------------------------------------


def test_info_reports_devices():
    info = bn.info()["cuda"]
    assert info["compiled"] is True
    assert info["available"] is True
    assert len(info["devices"]) >= 1 and all(isinstance(d, str) and d for d in info["devices"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_statistics(lib, dtype, shape, axis):
    rng = rng_for("stats", shape, axis, dtype)
    x = make(lib, rng.standard_normal(shape) * 3 + 2, dtype)
    mean, var, count = bn.statistics(x, axis=axis)
    xr = lib.host(x)
    rm, rv = ref_statistics(xr, axis)
    assert count == xr.size // xr.shape[axis]
    std = np.sqrt(rv)
    assert_acc_close(lib.host(mean), rm, np.abs(rm) + std, dtype, "mean")
    assert_acc_close(lib.host(var), rv, rv, dtype, "var")
    # Same results as the CPU path on the same values, to the same tolerance.
    cm, cv, _ = bn.statistics(xr.astype(np.float32 if dtype != "float64" else np.float64), axis=axis)
    assert_acc_close(lib.host(mean), np.asarray(cm, dtype=np.float64), np.abs(rm) + std, dtype, "mean vs CPU")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_statistics_huge_mean(cupy_lib, dtype):
    # The contract: a channel's mean may be 1e8 times its std (float32: 1e7, still below ulp scale).
    rng = rng_for("huge", dtype)
    center, spread = (1e3, 1e-4) if dtype == "float32" else (1e8, 1.0)
    x = make(cupy_lib, center + spread * rng.standard_normal((64, 2, 999)), dtype)
    mean, var, _ = bn.statistics(x)
    rm, rv = ref_statistics(cupy_lib.host(x), 1)
    np.testing.assert_allclose(cupy_lib.host(mean), rm, rtol=1e-6)
    np.testing.assert_allclose(cupy_lib.host(var), rv, rtol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_layouts(lib, dtype, layout):
    rng = rng_for("layouts", dtype, layout)
    x = make(lib, rng.standard_normal((4, 6, 10, 12)) - 1, dtype, layout)
    for axis in (1, -1, 0):
        mean, var, _ = bn.statistics(x, axis=axis)
        rm, rv = ref_statistics(lib.host(x), axis)
        assert_acc_close(lib.host(mean), rm, np.abs(rm) + np.sqrt(rv), dtype, f"mean axis={axis}")
        assert_acc_close(lib.host(var), rv, rv, dtype, f"var axis={axis}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_forward_training(lib, dtype, shape, axis):
    rng = rng_for("fwd", shape, axis, dtype)
    C = shape[axis]
    x = make(lib, rng.standard_normal(shape) * 2 - 1, dtype)
    w_np, b_np = rng.standard_normal(C), rng.standard_normal(C)
    rm_np, rv_np = rng.standard_normal(C), rng.random(C) + 0.5
    w, b = lib.asarray(w_np, "float32"), lib.asarray(b_np, "float32")
    rm, rv = lib.asarray(rm_np, "float32"), lib.asarray(rv_np, "float32")
    y, saved_mean, saved_invstd = bn.forward_training(
        x, w, b, running_mean=rm, running_var=rv, momentum=0.25, eps=1e-3, axis=axis
    )
    xr = lib.host(x)
    ry, mean, var, invstd = ref_forward(xr, lib.host(w), lib.host(b), 1e-3, axis)
    assert_out_close(lib.host(y), ry, dtype, "y")
    assert_acc_close(lib.host(saved_mean), mean, np.abs(mean) + np.sqrt(var), dtype, "saved_mean")
    assert_acc_close(lib.host(saved_invstd), invstd, invstd, dtype, "saved_invstd")
    n = xr.size // C
    f32 = "float32"
    assert_acc_close(lib.host(rm), 0.75 * rm_np.astype(np.float32) + 0.25 * mean, np.abs(rm_np) + 1, f32, "running_mean")
    assert_acc_close(
        lib.host(rv), 0.75 * rv_np.astype(np.float32) + 0.25 * var * n / (n - 1), rv_np + var, f32, "running_var"
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_training_layouts_and_out(lib, dtype, layout):
    rng = rng_for("fwd-layout", dtype, layout)
    x = make(lib, rng.standard_normal((3, 5, 8, 9)), dtype, layout)
    for axis in (1, -1):
        C = x.shape[axis]
        w_np = rng.standard_normal(C)
        y, _, _ = bn.forward_training(x, lib.asarray(w_np, "float32"), axis=axis)
        ry, *_ = ref_forward(lib.host(x), w_np.astype(np.float32), np.zeros(C), 1e-5, axis)
        assert_out_close(lib.host(y), ry, dtype, f"y axis={axis}")
        # out= a non-contiguous array, and out=x itself.
        out = make(lib, np.zeros(x.shape), dtype, "strided")
        res, _, _ = bn.forward_training(x, lib.asarray(w_np, "float32"), axis=axis, out=out)
        assert res is out
        assert_out_close(lib.host(out), ry, dtype, f"out= axis={axis}")
    x2 = make(lib, rng.standard_normal((3, 5, 8, 9)), dtype, layout)
    ry, *_ = ref_forward(lib.host(x2), np.ones(5), np.zeros(5), 1e-5, 1)
    res, _, _ = bn.forward_training(x2, out=x2)
    assert res is x2
    assert_out_close(lib.host(x2), ry, dtype, "out=x")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_forward_inference(lib, dtype, shape, axis):
    rng = rng_for("inf", shape, axis, dtype)
    C = shape[axis]
    x = make(lib, rng.standard_normal(shape) * 2 + 1, dtype)
    mean_np, var_np = rng.standard_normal(C), rng.random(C) + 0.1
    w_np, b_np = rng.standard_normal(C), rng.standard_normal(C)
    # Parameters of mixed dtypes (the contract allows any of the four for each).
    pdt = "float64" if lib.name == "cupy" else "bfloat16"
    mean, var = lib.asarray(mean_np, "float32"), lib.asarray(var_np, pdt)
    w, b = lib.asarray(w_np, "float16"), lib.asarray(b_np, "float64")
    y = bn.forward_inference(x, mean, var, w, b, eps=1e-4, axis=axis)
    xr = lib.host(x)
    m, v, wr, br = (lib.host(a) for a in (mean, var, w, b))
    nd = xr.ndim
    ry = (xr - per_channel(m, nd, axis)) / np.sqrt(per_channel(v, nd, axis) + 1e-4) * per_channel(wr, nd, axis)
    ry += per_channel(br, nd, axis)
    assert_out_close(lib.host(y), ry, dtype, "y")
    out = lib.zeros_like(x)
    assert bn.forward_inference(x, mean, var, w, b, eps=1e-4, axis=axis, out=out) is out
    assert_out_close(lib.host(out), ry, dtype, "out=")
    assert bn.forward_inference(x, mean, var, w, b, eps=1e-4, axis=axis, out=x) is x
    assert_out_close(lib.host(x), ry, dtype, "out=x")


def test_parameter_vectors_of_any_dtype_and_stride(cupy_lib):
    cp = cupy_lib.cp
    rng = rng_for("params")
    C = 7
    x = make(cupy_lib, rng.standard_normal((6, C, 11)), "float32")
    w_np, b_np = rng.standard_normal(C), rng.standard_normal(C)
    rm_np, rv_np = rng.standard_normal(C), rng.random(C) + 0.5
    w = cp.asarray(np.repeat(w_np, 2).astype(np.float16))[::2]                  # stride 2
    b = cp.asarray(b_np[::-1].copy())[::-1]                                       # stride -1, float64
    rm = cp.asarray(rm_np.astype(np.float16))                                     # updated in float16
    rv_big = cp.asarray(np.repeat(rv_np, 3))                                      # float64, stride 3
    rv = rv_big[::3]
    y, mean, invstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, momentum=0.5)
    xr = cupy_lib.host(x)
    ry, rmean, rvar, rinv = ref_forward(xr, cupy_lib.host(w), b_np, 1e-5, 1)
    assert_out_close(cupy_lib.host(y), ry, "float32", "y")
    n = xr.size // C
    expect_rm = (0.5 * rm_np.astype(np.float16).astype(np.float64) + 0.5 * rmean).astype(np.float16)
    np.testing.assert_allclose(cupy_lib.host(rm), expect_rm.astype(np.float64), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cupy_lib.host(rv), 0.5 * rv_np + 0.5 * rvar * n / (n - 1), rtol=1e-6)
    # The untouched elements of the strided running_var's buffer stay as they were.
    np.testing.assert_array_equal(cupy_lib.host(rv_big).reshape(C, 3)[:, 1:], np.repeat(rv_np, 3).reshape(C, 3)[:, 1:])


def check_backward(lib, dy, x, saved_mean, saved_invstd, w, axis, dtype):
    """bn.backward on the device against ref_backward on host copies of the same values."""
    dx, dweight, dbias = bn.backward(dy, x, saved_mean, saved_invstd, w, axis=axis)
    xr, dyr = lib.host(x), lib.host(dy)
    mean, invstd = lib.host(saved_mean), lib.host(saved_invstd)
    rdx, rdw, rdb = ref_backward(dyr, xr, mean, invstd, lib.host(w), axis)
    red = reduced_axes(xr.ndim, axis)
    xhat = (xr - per_channel(mean, xr.ndim, axis)) * per_channel(invstd, xr.ndim, axis)
    assert_acc_close(lib.host(dbias), rdb, np.abs(dyr).sum(axis=red), dtype, "dbias")
    assert_acc_close(lib.host(dweight), rdw, np.abs(dyr * xhat).sum(axis=red), dtype, "dweight")
    assert_out_close(lib.host(dx), rdx, dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_backward(lib, dtype, shape, axis):
    rng = rng_for("bwd", shape, axis, dtype)
    C = shape[axis]
    x = make(lib, rng.standard_normal(shape) * 2 + 0.5, dtype)
    dy = make(lib, rng.standard_normal(shape), dtype)
    w = lib.asarray(rng.standard_normal(C), "float32")
    _, saved_mean, saved_invstd = bn.forward_training(x, w, axis=axis)
    check_backward(lib, dy, x, saved_mean, saved_invstd, w, axis, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_layouts_and_out(lib, dtype, layout):
    rng = rng_for("bwd-layout", dtype, layout)
    shape = (3, 5, 8, 9)
    for axis in (1, -1):
        x = make(lib, rng.standard_normal(shape), dtype, layout)
        dy = make(lib, rng.standard_normal(shape), dtype, "transposed" if layout == "contiguous" else "contiguous")
        _, m, s = bn.forward_training(x, axis=axis)
        rdx, _, _ = ref_backward(lib.host(dy), lib.host(x), lib.host(m), lib.host(s), np.ones(shape[axis]), axis)
        dx, _, _ = bn.backward(dy, x, m, s, axis=axis)
        assert_out_close(lib.host(dx), rdx, dtype, f"dx axis={axis}")
        res, _, _ = bn.backward(dy, x, m, s, axis=axis, out=dy)  # dx written over dy
        assert res is dy
        assert_out_close(lib.host(dy), rdx, dtype, f"out=dy axis={axis}")


# Shapes large enough to take every path sized for the whole GPU: channels split over many
# blocks, channels-last tiles over many position ranges, many channels with few values.
LARGE_SHAPES = [
    ((32, 64, 56, 56), 1),
    ((4, 3, 224, 224), 1),
    ((16, 28, 28, 256), -1),
    ((65536, 64), 1),
    ((64, 2048, 7, 7), 1),
    ((8, 7, 7, 2048), -1),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape,axis", LARGE_SHAPES)
def test_large_shapes_every_op(torch_lib, dtype, shape, axis):
    lib = torch_lib
    rng = rng_for("large", shape, axis, dtype)
    C = shape[axis]
    x = make(lib, rng.standard_normal(shape, dtype=np.float32) * 2 + 3, dtype)
    dy = make(lib, rng.standard_normal(shape, dtype=np.float32), dtype)
    w_np, b_np = rng.standard_normal(C), rng.standard_normal(C)
    w, b = lib.asarray(w_np, "float32"), lib.asarray(b_np, "float32")
    rm, rv = lib.asarray(np.zeros(C), "float32"), lib.asarray(np.ones(C), "float32")
    y, saved_mean, saved_invstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis)
    xr = lib.host(x)
    ry, mean, var, invstd = ref_forward(xr, lib.host(w), lib.host(b), 1e-5, axis)
    assert_out_close(lib.host(y), ry, dtype, "y")
    assert_acc_close(lib.host(saved_mean), mean, np.abs(mean) + np.sqrt(var), dtype, "saved_mean")
    assert_acc_close(lib.host(saved_invstd), invstd, invstd, dtype, "saved_invstd")
    n = xr.size // C
    assert_acc_close(lib.host(rv), 0.9 + 0.1 * var * n / (n - 1), 1 + var, "float32", "running_var")
    yi = bn.forward_inference(x, saved_mean, lib.asarray(var, "float32"), w, b, axis=axis)
    assert_out_close(lib.host(yi), ry, dtype, "inference y")
    check_backward(lib, dy, x, saved_mean, saved_invstd, w, axis, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torch_training(torch_lib, dtype, channels_last):
    torch = torch_lib.torch
    F = torch.nn.functional
    rng = rng_for("torch", dtype, channels_last)
    shape, C = (8, 6, 12, 10), 6
    pdt = "float64" if dtype == "float64" else "float32"  # torch mixes only half inputs with float params
    x = torch_lib.asarray(rng.standard_normal(shape) * 2 + 3, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch_lib.asarray(rng.standard_normal(shape), dtype)
    w = torch_lib.asarray(rng.standard_normal(C), pdt)
    b = torch_lib.asarray(rng.standard_normal(C), pdt)
    rm_t = torch.zeros(C, device="cuda", dtype=torch_lib.dtype(pdt))
    rv_t = torch.ones(C, device="cuda", dtype=torch_lib.dtype(pdt))
    rm, rv = rm_t.clone(), rv_t.clone()

    xt, wt, bt = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    yt = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, momentum=0.1, eps=1e-5)
    yt.backward(dy)

    y, m, s = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, momentum=0.1, eps=1e-5)
    dx, dw, db = bn.backward(dy, x, m, s, w)
    assert_out_close(torch_lib.host(y), torch_lib.host(yt), dtype, "y vs torch")
    assert_out_close(torch_lib.host(dx), torch_lib.host(xt.grad), dtype, "dx vs torch")
    half = dtype in ("float16", "bfloat16")
    np.testing.assert_allclose(torch_lib.host(rm), torch_lib.host(rm_t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(torch_lib.host(rv), torch_lib.host(rv_t), rtol=1e-5, atol=1e-5)
    tol = 2e-2 if half else 1e-4
    scale = float(np.abs(torch_lib.host(db)).max()) + 1.0
    np.testing.assert_allclose(torch_lib.host(db), torch_lib.host(bt.grad), atol=tol * scale)
    scale = float(np.abs(torch_lib.host(dw)).max()) + 1.0
    np.testing.assert_allclose(torch_lib.host(dw), torch_lib.host(wt.grad), atol=tol * scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_channels_last_axis(torch_lib, dtype):
    torch = torch_lib.torch
    rng = rng_for("torch-nhwc", dtype)
    x = torch_lib.asarray(rng.standard_normal((4, 7, 9, 16)), dtype)  # NHWC, C = 16
    y, _, _ = bn.forward_training(x, axis=-1)
    yt = torch.nn.functional.batch_norm(x.permute(0, 3, 1, 2), None, None, training=True).permute(0, 2, 3, 1)
    assert_out_close(torch_lib.host(y), torch_lib.host(yt), dtype, "y vs torch (NHWC)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_inference(torch_lib, dtype):
    torch = torch_lib.torch
    rng = rng_for("torch-inf", dtype)
    C = 5
    pdt = "float64" if dtype == "float64" else "float32"  # torch mixes only half inputs with float params
    x = torch_lib.asarray(rng.standard_normal((3, C, 7, 7)), dtype)
    rm = torch_lib.asarray(rng.standard_normal(C), pdt)
    rv = torch_lib.asarray(rng.random(C) + 0.5, pdt)
    w = torch_lib.asarray(rng.standard_normal(C), pdt)
    b = torch_lib.asarray(rng.standard_normal(C), pdt)
    y = bn.forward_inference(x, rm, rv, w, b, eps=1e-5)
    yt = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
    assert_out_close(torch_lib.host(y), torch_lib.host(yt), dtype, "y vs torch")


def test_layer_matches_torch_module(torch_lib):
    torch = torch_lib.torch
    rng = rng_for("layer")
    C = 4
    ours = bn.BatchNorm(C)
    ref = torch.nn.BatchNorm2d(C).cuda()
    for step in range(3):
        x = torch_lib.asarray(rng.standard_normal((5, C, 6, 6)) + step, "float32")
        np.testing.assert_allclose(torch_lib.host(ours(x)), torch_lib.host(ref(x)), rtol=1e-4, atol=1e-5)
    state = ours.state_dict()
    np.testing.assert_allclose(state["running_mean"], ref.running_mean.cpu().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["running_var"], ref.running_var.cpu().numpy(), rtol=1e-5, atol=1e-6)
    ours.eval()
    ref.eval()
    x = torch_lib.asarray(rng.standard_normal((2, C, 3, 3)), "float32")
    np.testing.assert_allclose(torch_lib.host(ours(x)), torch_lib.host(ref(x)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_merge_statistics(cupy_lib, dtype):
    cp = cupy_lib.cp
    rng = rng_for("merge", dtype)
    C = 9
    shards = [rng.standard_normal((int(rng.integers(0, 20)), C)) * 3 + 100 for _ in range(45)]  # > 32: several launches
    shards[0] = rng.standard_normal((7, C))
    means = [cp.asarray(s.mean(axis=0) if len(s) else np.zeros(C)).astype(dtype) for s in shards]
    # The variances as strided views (every other element of a (C, 2) buffer).
    vars_ = [cp.asarray(np.repeat(s.var(axis=0) if len(s) else np.zeros(C), 2).astype(dtype))[::2] for s in shards]
    counts = [len(s) for s in shards]
    mean, var, count = bn.merge_statistics(means, vars_, counts)
    assert count == sum(counts)
    # Reference: Chan's formula in float64 over the rounded shard statistics.
    n_tot = sum(counts)
    ms = np.stack([cupy_lib.host(m) for m in means])
    vs = np.stack([cupy_lib.host(v) for v in vars_])
    ns = np.asarray(counts, dtype=np.float64)[:, None]
    rmean = (ns * ms).sum(axis=0) / n_tot
    rvar = ((ns * (vs + (ms - rmean) ** 2)).sum(axis=0)) / n_tot
    tol = 1e-12 if dtype == "float64" else 1e-6  # float32 results of a float64 merge
    np.testing.assert_allclose(cupy_lib.host(mean), rmean, rtol=tol)
    np.testing.assert_allclose(cupy_lib.host(var), rvar, rtol=tol)
    # And the CPU path agrees.
    cm, cv, _ = bn.merge_statistics([m.get() for m in means], [v.get() for v in vars_], counts)
    np.testing.assert_allclose(cupy_lib.host(mean), np.asarray(cm, dtype=np.float64), rtol=tol)
    np.testing.assert_allclose(cupy_lib.host(var), np.asarray(cv, dtype=np.float64), rtol=tol)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("axis", [0, 1])
def test_fold(cupy_lib, dtype, axis):
    cp = cupy_lib.cp
    rng = rng_for("fold", dtype, axis)
    kshape = (6, 4, 3, 3) if axis == 0 else (4, 6, 3, 3)
    C = kshape[axis]
    kernel = cupy_lib.asarray(rng.standard_normal(kshape), dtype)
    conv_bias = cp.asarray(rng.standard_normal(C))
    mean, var = cp.asarray(rng.standard_normal(C)), cp.asarray(rng.random(C) + 0.5).astype(np.float32)
    w, b = cp.asarray(rng.standard_normal(C)), cp.asarray(rng.standard_normal(C))
    k2, b2 = bn.fold(kernel, conv_bias, mean, var, w, b, eps=1e-3, axis=axis)
    s = cupy_lib.host(w) / np.sqrt(cupy_lib.host(var) + 1e-3)
    rk = cupy_lib.host(kernel) * per_channel(s, len(kshape), axis)
    rb = (cupy_lib.host(conv_bias) - cupy_lib.host(mean)) * s + cupy_lib.host(b)
    assert_out_close(cupy_lib.host(k2), rk, dtype, "kernel'")
    assert_out_close(cupy_lib.host(b2), rb, dtype, "bias'")
    # Strided kernel and no conv bias.
    kt = kernel[..., ::-1]
    k3, b3 = bn.fold(kt, None, mean, var, w, b, eps=1e-3, axis=axis)
    assert_out_close(cupy_lib.host(k3), cupy_lib.host(kt) * per_channel(s, len(kshape), axis), dtype, "strided kernel'")
    assert_out_close(cupy_lib.host(b3), -cupy_lib.host(mean) * s + cupy_lib.host(b), dtype, "bias' without conv_bias")


def test_mixing_cpu_and_gpu_arrays_is_a_type_error(lib):
    rng = rng_for("mix")
    x = make(lib, rng.standard_normal((4, 3, 5)), "float32")
    w_cpu = np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError):
        bn.forward_training(x, w_cpu)
    with pytest.raises(TypeError):
        bn.forward_inference(x, np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(TypeError):
        bn.backward(lib.host(x).astype(np.float32), x, np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(TypeError):
        bn.forward_training(lib.host(x).astype(np.float32), make(lib, np.ones(3), "float32"))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(lib, dtype, channels_last):
    rng = rng_for("det", dtype, channels_last)
    shape, axis = ((16, 64, 48, 8), -1) if channels_last else ((16, 3, 96, 128), 1)  # many split items
    x = make(lib, rng.standard_normal(shape) + 5, dtype)
    dy = make(lib, rng.standard_normal(shape), dtype)
    runs = []
    for _ in range(2):
        y, m, s = bn.forward_training(x, axis=axis)
        mean, var, _ = bn.statistics(x, axis=axis)
        dx, dw, db = bn.backward(dy, x, m, s, axis=axis)
        runs.append([lib.raw(a) for a in (y, m, s, mean, var, dx, dw, db)])
    assert runs[0] == runs[1]


def test_runs_on_the_callers_torch_stream(torch_lib):
    torch = torch_lib.torch
    rng = rng_for("stream-torch")
    x = torch_lib.asarray(rng.standard_normal((64, 8, 64, 64)), "float32")
    expected = torch_lib.host(x) * 2
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(50_000_000)  # keeps the stream busy: a kernel on another stream would race
        x.mul_(2)
        y, m, s = bn.forward_training(x)
        mean, var, _ = bn.statistics(x)
    side.synchronize()
    ry, rm, rv, _ = ref_forward(expected, np.ones(8), np.zeros(8), 1e-5, 1)
    assert_out_close(torch_lib.host(y), ry, "float32", "y on a side stream")
    assert_acc_close(torch_lib.host(mean), rm, np.abs(rm) + np.sqrt(rv), "float32", "mean on a side stream")


def test_runs_on_the_stream_argument(cupy_lib):
    cp = cupy_lib.cp
    rng = rng_for("stream-cupy")
    x = cupy_lib.asarray(rng.standard_normal((32, 4, 50, 50)), "float32")
    cp.cuda.get_current_stream().synchronize()
    expected = cupy_lib.host(x) * 3
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x *= 3
    mean, var, _ = bn.statistics(x, stream=stream)  # ordered after the multiply by `stream=`
    y = bn.forward_inference(x, mean, var, stream=stream)
    stream.synchronize()
    rm, rv = ref_statistics(expected, 1)
    assert_acc_close(cupy_lib.host(mean), rm, np.abs(rm) + np.sqrt(rv), "float32", "mean on stream=")
    ry = (expected - per_channel(rm, 4, 1)) / np.sqrt(per_channel(rv, 4, 1) + 1e-5)
    assert_out_close(cupy_lib.host(y), ry, "float32", "y on stream=")
    with stream:  # the current CuPy stream is used when no stream= is given
        y2 = bn.forward_inference(x, mean, var)
    stream.synchronize()
    assert cupy_lib.raw(y2) == cupy_lib.raw(y)


def test_empty_cache_returns_device_pool_memory(cupy_lib):
    cp = cupy_lib.cp
    x = cp.ones((64, 64, 64, 64), dtype=cp.float32)  # 64 MiB
    y = bn.forward_inference(x, cp.zeros(64, cp.float32), cp.ones(64, cp.float32))
    y_bytes = y.nbytes
    del y  # its block goes back to batchnorm's pool, on the stream
    released = bn.empty_cache()
    assert released >= y_bytes
    assert bn.empty_cache() < y_bytes  # nothing left to give back
    z = bn.forward_inference(x, cp.zeros(64, cp.float32), cp.ones(64, cp.float32))  # the pool grows again
    assert float(z.mean()) == pytest.approx(1.0, rel=1e-5)

