"""PyTorch interop through DLPack: torch in gives torch out, no copies on the way in (out= and
running statistics are written in place), results match F.batch_norm and nn.BatchNorm2d in
training and evaluation, half types and channels_last tensors included."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the cross-check of these tests")
F = torch.nn.functional

import batchnorm as bn  # noqa: E402
from conftest import (  # noqa: E402
    OUT_RTOL,
    STAT_RTOL,
    assert_close,
    assert_output,
    ref_normalize,
    ref_statistics,
    to_f64,
)

pytestmark = pytest.mark.torch

TDTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@pytest.fixture
def trng(rng):
    """A torch generator seeded from the test's NumPy generator."""
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


def randn(trng, *shape, dtype=torch.float32, loc=0.0):
    return (torch.randn(*shape, generator=trng, dtype=torch.float64) + loc).to(dtype)


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
def test_matches_f_batch_norm_train_and_eval(trng, dtype, momentum):
    td = TDTYPES[dtype]
    C = 5
    x = randn(trng, 8, C, 4, 3, dtype=td, loc=2.0)
    w, b = randn(trng, C, dtype=td), randn(trng, C, dtype=td)
    rm_t, rv_t = randn(trng, C, dtype=td), randn(trng, C, dtype=td).abs() + 0.5
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
def test_channels_last_memory_format(trng, dtype):
    td = TDTYPES[dtype]
    x = randn(trng, 4, 6, 5, 3, dtype=td).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    dy = randn(trng, 4, 6, 5, 3, dtype=td).to(memory_format=torch.channels_last)
    y, mean, invstd = bn.forward_training(x, axis=1)
    ref_mean, ref_var, _ = ref_statistics(x, 1)
    assert_close(mean, ref_mean, STAT_RTOL[dtype][0], scale=np.sqrt(ref_var))
    assert_output(y, ref_normalize(x, mean, invstd), dtype, what="y")
    dx, _, dbias = bn.backward(dy, x, mean, invstd, axis=1)
    assert dx.shape == x.shape and dx.dtype == td
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
def test_half_tensors_match_torch(trng, dtype):
    td = TDTYPES[dtype]
    C = 4
    x = randn(trng, 16, C, 5, 5, dtype=td, loc=1.0)
    w, b = randn(trng, C), randn(trng, C)
    y, mean, invstd = bn.forward_training(x, w, b)
    assert y.dtype == td and mean.dtype == torch.float32 and invstd.dtype == torch.float32
    y_t = F.batch_norm(x.float(), None, None, w, b, training=True).to(td)  # torch via float32
    assert_close(y, to_f64(y_t), 2 * OUT_RTOL[dtype], what="y vs torch")
    assert_output(y, ref_normalize(x, mean, invstd, w, b), dtype, what="y vs reference")
    yi = bn.forward_inference(x, mean, 1 / invstd**2 - 1e-5, w, b)
    assert yi.dtype == td


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
