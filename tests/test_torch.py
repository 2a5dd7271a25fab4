"""PyTorch interop through DLPack: torch in gives torch out, no copies on the way in (out= and
running statistics are written in place), results match F.batch_norm (forward and autograd's
backward) and nn.BatchNorm2d in training and evaluation, half types and channels_last tensors
included, on the CPU and on CUDA (skipped with the reason without a GPU)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the cross-check of these tests")
F = torch.nn.functional

import batchnorm as bn  # noqa: E402
from helpers import (  # noqa: E402
    OUT_RTOL,
    STAT_RTOL,
    assert_close,
    assert_output,
    ref_normalize,
    torch_device_params,
    ref_statistics,
    to_f64,
)

pytestmark = pytest.mark.torch
devices = pytest.mark.parametrize("device", torch_device_params())

TDTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@pytest.fixture
def trng(rng):
    """A torch generator seeded from the test's NumPy generator."""
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


def randn(trng, *shape, dtype=torch.float32, loc=0.0, device="cpu"):
    """Normal values drawn on the CPU (the same values on every device), then moved."""
    return (torch.randn(*shape, generator=trng, dtype=torch.float64) + loc).to(device=device, dtype=dtype)


def test_results_are_torch_tensors(trng):
    x = randn(trng, 4, 3, 5)
    dy = randn(trng, 4, 3, 5)
    y, mean, invstd = bn.forward_training(x)
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd)
    m, v, count = bn.statistics(x)
    yi = bn.forward_inference(x, m, v)
    k, b = bn.fold(randn(trng, 3, 2, 1, 1), None, m, v)
    mm, mv, mc = bn.merge_statistics([m, m], [v, v], [count, count])
    for t in (y, mean, invstd, dx, dweight, dbias, m, v, yi, k, b, mm, mv):
        assert isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32
    assert count == 20 and mc == 40
    assert y.shape == x.shape == dx.shape == yi.shape and mean.shape == (3,)


def test_results_are_independent_of_the_inputs(trng):
    """Each result owns its memory: writing to one changes neither the inputs nor the others."""
    x = randn(trng, 4, 3, 5)
    x0 = x.clone()
    y, mean, invstd = bn.forward_training(x)
    y.fill_(0)
    mean.fill_(0)
    assert torch.equal(x, x0) and not torch.equal(invstd, mean)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_out_tensor_is_filled_in_place(trng, dtype):
    td = TDTYPES[dtype]
    x = randn(trng, 4, 3, 6, dtype=td)
    big = torch.full((4, 3, 12), float("nan"), dtype=td)
    out = big[..., ::2]  # a non-contiguous view: only zero-copy writes reach `big`
    y, mean, invstd = bn.forward_training(x, axis=1, out=out)
    assert y is out
    assert_output(big[..., ::2], ref_normalize(x, mean, invstd), dtype, what="out")
    assert torch.isnan(big[..., 1::2].float()).all()
    # out=x, in place
    x_before = x.clone()
    y2, mean2, invstd2 = bn.forward_training(x, out=x)
    assert y2 is x
    assert_output(x, ref_normalize(x_before, mean2, invstd2), dtype, what="out=x")


def test_backward_out_is_dy(trng):
    x, dy = randn(trng, 4, 3, 5), randn(trng, 4, 3, 5)
    dy_before = dy.clone()
    _, mean, invstd = bn.forward_training(x)
    fresh, _, _ = bn.backward(dy_before, x, mean, invstd)
    dx, _, _ = bn.backward(dy, x, mean, invstd, out=dy)
    assert dx is dy
    assert torch.equal(dy, fresh)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
@devices
def test_matches_f_batch_norm_train_and_eval(trng, dtype, momentum, device):
    td = TDTYPES[dtype]
    C = 5
    x = randn(trng, 8, C, 4, 3, dtype=td, loc=2.0, device=device)
    w, b = randn(trng, C, dtype=td, device=device), randn(trng, C, dtype=td, device=device)
    rm_t, rv_t = randn(trng, C, dtype=td, device=device), randn(trng, C, dtype=td, device=device).abs() + 0.5
    rm, rv = rm_t.clone(), rv_t.clone()
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=momentum, eps=1e-4)
    y, _, _ = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, momentum=momentum, eps=1e-4)
    tol = OUT_RTOL[dtype] * (10 if dtype == "float32" else 1)
    assert_close(y, to_f64(y_t), tol, what="training y")
    assert_close(rm, to_f64(rm_t), tol, what="running_mean")  # updated in place: zero-copy in
    assert_close(rv, to_f64(rv_t), tol, what="running_var")
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=False, eps=1e-4)
    y = bn.forward_inference(x, rm, rv, w, b, eps=1e-4)
    assert_close(y, to_f64(y_t), tol, what="eval y")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@devices
def test_channels_last_memory_format(trng, dtype, device):
    td = TDTYPES[dtype]
    x = randn(trng, 4, 6, 5, 3, dtype=td, device=device).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    dy = randn(trng, 4, 6, 5, 3, dtype=td, device=device).to(memory_format=torch.channels_last)
    y, mean, invstd = bn.forward_training(x, axis=1)
    ref_mean, ref_var, _ = ref_statistics(x, 1)
    assert_close(mean, ref_mean, STAT_RTOL[dtype][0], scale=np.sqrt(ref_var))
    assert_output(y, ref_normalize(x, mean, invstd), dtype, what="y")
    dx, _, dbias = bn.backward(dy, x, mean, invstd, axis=1)
    assert dx.shape == x.shape and dx.dtype == td and dx.device == x.device
    assert_close(dbias, to_f64(dy).sum(axis=(0, 2, 3)), 1e-5, scale=np.abs(to_f64(dy)).sum(axis=(0, 2, 3)))


def test_torch_x_with_numpy_parameters(rng, trng):
    x = randn(trng, 6, 3, 4)
    w, b = rng.uniform(0.5, 2, 3), rng.standard_normal(3).astype(np.float32)
    rm, rv = np.zeros(3, np.float64), np.ones(3, np.float16)
    y, mean, invstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv)
    assert isinstance(y, torch.Tensor) and isinstance(mean, torch.Tensor)
    assert_output(y, ref_normalize(x, mean, invstd, w, b), "float32")
    assert (rm != 0).all() and (rv != 1).all()
    # and NumPy x with torch parameters gives NumPy results
    y2, mean2, _ = bn.forward_training(x.numpy(), torch.from_numpy(w), torch.from_numpy(b))
    assert isinstance(y2, np.ndarray) and isinstance(mean2, np.ndarray)
    np.testing.assert_array_equal(y2, y.numpy())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@devices
def test_half_tensors_match_torch(trng, dtype, device):
    td = TDTYPES[dtype]
    C = 4
    x = randn(trng, 16, C, 5, 5, dtype=td, loc=1.0, device=device)
    w, b = randn(trng, C, device=device), randn(trng, C, device=device)
    y, mean, invstd = bn.forward_training(x, w, b)
    assert y.dtype == td and mean.dtype == torch.float32 and invstd.dtype == torch.float32
    y_t = F.batch_norm(x.float(), None, None, w, b, training=True).to(td)  # torch via float32
    assert_close(y, to_f64(y_t), 2 * OUT_RTOL[dtype], what="y vs torch")
    assert_output(y, ref_normalize(x, mean, invstd, w, b), dtype, what="y vs reference")
    yi = bn.forward_inference(x, mean, 1 / invstd**2 - 1e-5, w, b)
    assert yi.dtype == td


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("channels_last", [False, True])
@devices
def test_matches_torch_training_forward_and_backward(trng, dtype, channels_last, device):
    """forward_training and backward against F.batch_norm and autograd: y, dx, dweight, dbias
    and the running statistics, every dtype (half x with float32 parameters, as torch mixes)."""
    C = 6
    td, pd = TDTYPES[dtype], (torch.float64 if dtype == "float64" else torch.float32)
    x = randn(trng, 8, C, 12, 10, dtype=td, loc=3.0, device=device) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = randn(trng, 8, C, 12, 10, dtype=td, device=device)
    w, b = randn(trng, C, dtype=pd, device=device), randn(trng, C, dtype=pd, device=device)
    rm_t, rv_t = torch.zeros(C, dtype=pd, device=device), torch.ones(C, dtype=pd, device=device)
    rm, rv = rm_t.clone(), rv_t.clone()
    xt, wt, bt = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    F.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, momentum=0.1, eps=1e-5).backward(dy)
    y_t = F.batch_norm(x, rm_t.clone(), rv_t.clone(), w, b, training=True, momentum=0.1, eps=1e-5)

    y, m, s = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, momentum=0.1, eps=1e-5)
    dx, dw, db = bn.backward(dy, x, m, s, w)
    assert y.device == dx.device == x.device
    half = dtype in ("float16", "bfloat16")
    # torch rounds y and dx once from float32 (half) or its own float32 / float64 arithmetic.
    tol = 2 * OUT_RTOL[dtype] if half else 10 * OUT_RTOL[dtype]
    assert_close(y, to_f64(y_t), tol, what="y vs torch")
    assert_close(dx, to_f64(xt.grad), tol, what="dx vs torch")
    assert_close(rm, to_f64(rm_t), 1e-5, what="running_mean vs torch")
    assert_close(rv, to_f64(rv_t), 1e-5, what="running_var vs torch")
    # torch's half-precision parameter gradients come from half dy * xhat products.
    grad_tol = 2e-2 if half else 1e-4
    for ours, theirs, what in ((db, bt.grad, "dbias"), (dw, wt.grad, "dweight")):
        assert_close(ours, to_f64(theirs), grad_tol, scale=np.abs(to_f64(theirs)).max() + 1.0, what=f"{what} vs torch")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@devices
def test_matches_torch_with_channels_on_the_last_axis(trng, dtype, device):
    x = randn(trng, 4, 7, 9, 16, dtype=TDTYPES[dtype], device=device)  # NHWC, C = 16
    y, _, _ = bn.forward_training(x, axis=-1)
    y_t = F.batch_norm(x.permute(0, 3, 1, 2), None, None, training=True).permute(0, 2, 3, 1)
    assert_close(y, to_f64(y_t), 2 * OUT_RTOL[dtype], what="y vs torch (NHWC)")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@devices
def test_matches_torch_inference(trng, dtype, device):
    C = 5
    pd = torch.float64 if dtype == "float64" else torch.float32  # torch mixes only half x with float params
    x = randn(trng, 3, C, 7, 7, dtype=TDTYPES[dtype], device=device)
    rm, rv = randn(trng, C, dtype=pd, device=device), randn(trng, C, dtype=pd, device=device).abs() + 0.5
    w, b = randn(trng, C, dtype=pd, device=device), randn(trng, C, dtype=pd, device=device)
    y = bn.forward_inference(x, rm, rv, w, b, eps=1e-5)
    y_t = F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
    assert_close(y, to_f64(y_t), 2 * OUT_RTOL[dtype], what="y vs torch")


# ---- the BatchNorm layer against torch.nn.BatchNorm2d -------------------------------------------


def assert_layer_matches(layer, module, tol=1e-5):
    state = layer.state_dict()
    expected = module.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert isinstance(state[key], np.ndarray), key
        if key == "num_batches_tracked":
            assert int(state[key]) == int(value)
        else:
            assert_close(state[key], to_f64(value), tol, what=key)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layer_matches_batchnorm2d(trng, momentum, track, dtype):
    td = TDTYPES[dtype]
    C = 3
    module = torch.nn.BatchNorm2d(C, eps=1e-4, momentum=momentum, track_running_stats=track, dtype=td)
    layer = bn.BatchNorm(C, eps=1e-4, momentum=momentum, track_running_stats=track, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(randn(trng, C, dtype=td))
        module.bias.copy_(randn(trng, C, dtype=td))
    layer.weight[:] = module.weight.detach().numpy()
    layer.bias[:] = module.bias.detach().numpy()
    tol = 1e-5 if dtype == "float32" else 1e-12
    for step in range(4):
        x = randn(trng, 5 + step, C, 4, 3, dtype=td, loc=step)
        g = randn(trng, 5 + step, C, 4, 3, dtype=td)
        xt = x.clone().requires_grad_(True)
        y_t = module(xt)
        y_t.backward(g)
        y = layer(x)
        dx = layer.backward(g)
        assert isinstance(y, torch.Tensor) and isinstance(dx, torch.Tensor)
        assert_close(y, to_f64(y_t), tol, what=f"train step {step} y")
        assert_close(dx, to_f64(xt.grad), 10 * tol, what=f"train step {step} dx")
        assert_layer_matches(layer, module, tol)
    # accumulated over the steps, as torch's .grad
    assert_close(layer.grad_weight, to_f64(module.weight.grad), 10 * tol, scale=np.abs(to_f64(module.weight.grad)).max())
    assert_close(layer.grad_bias, to_f64(module.bias.grad), 10 * tol, scale=np.abs(to_f64(module.bias.grad)).max())
    assert layer.eval() is layer
    module.eval()
    x = randn(trng, 2, C, 4, 3, dtype=td, loc=1.0)
    assert_close(layer(x), to_f64(module(x).detach()), tol, what="eval y")
    assert_layer_matches(layer, module, tol)


@devices
def test_layer_on_device_tensors_matches_batchnorm2d(trng, device):
    """bn.BatchNorm fed tensors of `device` (its state stays NumPy) against nn.BatchNorm2d there."""
    C = 4
    ours = bn.BatchNorm(C)
    ref = torch.nn.BatchNorm2d(C).to(device)
    for step in range(3):
        x = randn(trng, 5, C, 6, 6, loc=step, device=device)
        y = ours(x)
        assert isinstance(y, torch.Tensor) and y.device == x.device
        assert_close(y, to_f64(ref(x)), 1e-5, what=f"step {step} y")
    assert_layer_matches(ours, ref, 1e-5)
    ours.eval()
    ref.eval()
    x = randn(trng, 2, C, 3, 3, device=device)
    assert_close(ours(x), to_f64(ref(x).detach()), 1e-5, what="eval y")


def test_load_state_dict_from_torch(trng):
    C = 4
    module = torch.nn.BatchNorm2d(C)
    module.train()
    for _ in range(3):
        module(randn(trng, 6, C, 3, 3, loc=2.0))
    with torch.no_grad():
        module.weight.copy_(randn(trng, C))
        module.bias.copy_(randn(trng, C))
    module.eval()
    layer = bn.BatchNorm(C).eval()
    layer.load_state_dict(module.state_dict())
    assert layer.num_batches_tracked == 3
    assert_layer_matches(layer, module, 0.0)
    x = randn(trng, 3, C, 5, 5)
    assert_close(layer(x), to_f64(module(x).detach()), 1e-5, what="eval after load_state_dict")
    # and back: torch accepts our state_dict
    fresh = torch.nn.BatchNorm2d(C)
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in layer.state_dict().items()})
    assert_layer_matches(layer, fresh, 0.0)
