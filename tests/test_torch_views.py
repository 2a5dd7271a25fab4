"""torch tensors whose memory is not simply their values, and in-place writes autograd must
see: a tensor with torch's negative bit (a lazily negated view: torch._neg_view, the .imag of a
conjugate) holds its values negated, which DLPack hands over as they are (torch's own exporter
drops the bit); the array API, batchnorm.torch's eager paths and SyncBatchNorm resolve such
inputs and refuse such outputs. Tensors the array API writes in place (out=, running
statistics) get their version bumped as torch's in-place ops do."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch tensors")

import batchnorm as bn  # noqa: E402
import batchnorm.torch as bt  # noqa: E402

pytestmark = pytest.mark.torch


def negated(t):
    """A tensor equal to t whose memory holds -t (the negative bit set)."""
    n = torch._neg_view(t.neg())
    assert n.is_neg() and torch.equal(n, t)
    return n


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 5, generator=g) + 1.0
    return x, torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g), torch.randn(4, 3, 5, generator=g)


ARRAY_API = {
    "statistics": lambda x, w, b, dy: bn.statistics(x),
    "forward_training": lambda x, w, b, dy: bn.forward_training(x, w, b),
    "forward_training_fused": lambda x, w, b, dy: bn.forward_training(x, w, b, residual=dy, activation="relu"),
    "forward_inference": lambda x, w, b, dy: bn.forward_inference(x, b, w, w, b),
    "backward": lambda x, w, b, dy: bn.backward(dy, x, b, w, w),
}


@pytest.mark.parametrize("op, negate", [(op, name) for op in ARRAY_API for name in ("x", "weight", "dy")
                                        if not (op == "statistics" and name != "x")
                                        and not (op in ("forward_training", "forward_inference") and name == "dy")])
def test_array_api_reads_negative_bit_tensors_as_their_values(op, negate):
    x, w, b, dy = _inputs()
    args = {"x": x, "weight": w, "dy": dy}
    args[negate] = negated(args[negate])
    got = ARRAY_API[op](args["x"], args["weight"], b, args["dy"])
    want = ARRAY_API[op](x, w, b, dy)
    for g, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        if isinstance(e, torch.Tensor):
            assert torch.equal(g, e)
        else:
            assert g == e


@pytest.mark.parametrize("name", ["out", "running_mean"])
def test_written_negative_bit_tensors_are_refused(name):
    x, _, _, _ = _inputs()
    target = negated(torch.zeros_like(x) if name == "out" else torch.zeros(3))
    running = {"running_mean": target, "running_var": torch.ones(3)} if name == "running_mean" else {}
    before = target.clone()
    with pytest.raises(TypeError, match=f"{name} must be a tensor without torch's negative bit"):
        bn.forward_training(x, out=target if name == "out" else None, **running)
    assert torch.equal(target, before)


def test_torch_layers_read_negative_bit_tensors_as_their_values():
    x, _, _, dy = _inputs(1)
    x4, dy4 = x.reshape(4, 3, 5, 1), dy.reshape(4, 3, 5, 1)
    for make in (lambda: bt.BatchNorm2d(3), lambda: bt.BatchNormAct2d(3)):
        results = []
        for view in (False, True):
            layer, leaf = make(), x4.clone().requires_grad_()
            y = layer(torch._neg_view(leaf.neg()) if view else leaf)  # with the view, a graph through it
            y.backward(dy4)
            results.append((y.detach(), leaf.grad, layer.weight.grad, layer.running_mean.clone()))
        for a, b in zip(*results):
            assert torch.equal(a, b)
    y = bt.batch_norm(negated(x), torch.zeros(3), torch.ones(3), training=False)
    assert torch.equal(y, bt.batch_norm(x, torch.zeros(3), torch.ones(3), training=False))
    res = bt.batch_norm_act(x, None, None, training=True, residual=negated(dy))
    assert torch.equal(res, bt.batch_norm_act(x, None, None, training=True, residual=dy))


@pytest.mark.parametrize("make, relu", [(lambda: bt.BatchNorm2d(3), False),
                                        (lambda: bt.BatchNormAct2d(3, apply_act=False), False),
                                        (lambda: bt.BatchNormAct2d(3), True)], ids=["plain", "norm_act", "norm_act_relu"])
def test_a_negative_bit_incoming_gradient_is_read_as_its_values(make, relu):
    # A layer's output fed to a complex op: the backward of the conjugate's imaginary part hands
    # the layer a gradient with the negative bit; the eager backward read it negated.
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=g)
    a = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    w = torch.randn(x0.shape, dtype=torch.complex128, generator=g)
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU()) if relu else torch.nn.BatchNorm2d(3)
    grads = []
    for layer in (make().double(), theirs.double()):
        x = x0.clone().requires_grad_()
        (torch.complex(a, layer(x)).conj() * w).real.sum().backward()
        bn_layer = layer[0] if isinstance(layer, torch.nn.Sequential) else layer
        grads.append((x.grad, bn_layer.weight.grad, bn_layer.bias.grad))
    for ours, want in zip(*grads):
        torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-12)


def test_array_api_writes_bump_versions():
    x, _, _, _ = _inputs()
    w = torch.randn(4, 3, 5, requires_grad=True)
    out = torch.randn(4, 3, 5)
    loss = (w * out).sum()  # autograd saves out
    rm, rv = torch.zeros(3), torch.ones(3)
    versions = (out._version, rm._version, rv._version)
    bn.forward_training(x, out=out, running_mean=rm, running_var=rv)
    assert (out._version, rm._version, rv._version) > versions and rm._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    for write in (lambda o: bn.forward_inference(x, rm, rv, out=o), lambda o: bn.backward(x, x, rm, rv, out=o)[0]):
        o = torch.zeros(4, 3, 5)
        v = o._version
        assert write(o) is o and o._version > v


@pytest.mark.parametrize("lead", ["numpy", "torch"])
def test_mixed_libraries_resolve_negative_bits_and_bump_versions(lead):
    """A NumPy x with torch tensors beside it: a negative-bit mean was read negated, and torch
    running statistics and outputs were written without a version bump (only a torch x's call
    did either). fold and merge_statistics read negated tensors as they were, whatever the lead."""
    x, w, b, _ = _inputs(2)
    xs = x.numpy() if lead == "numpy" else x
    mean = torch.full((3,), -2.0)
    want = bn.forward_inference(x.numpy(), mean.numpy(), w.numpy(), w.numpy(), b.numpy())
    got = bn.forward_inference(xs, negated(mean), w, negated(w), b)
    assert torch.equal(torch.as_tensor(got), torch.from_numpy(want))
    rm, rv, out = torch.zeros(3), torch.ones(3), torch.zeros(x.shape)
    versions = (rm._version, rv._version, out._version)
    bn.forward_training(xs, w, b, running_mean=rm, running_var=rv, out=out.numpy() if lead == "numpy" else out)
    assert rm._version > versions[0] and rv._version > versions[1]
    bn.forward_inference(xs, rm, rv, out=out)
    assert out._version > versions[2]
    kernel = torch.full((3, 2), -1.0)
    folded = bn.fold(negated(kernel), negated(torch.full((3,), -3.0)), negated(mean), w, w, b)
    plain = bn.fold(kernel, torch.full((3,), -3.0), mean, w, w, b)
    assert all(torch.equal(torch.as_tensor(f), torch.as_tensor(p)) for f, p in zip(folded, plain))
    merged = bn.merge_statistics([negated(mean), mean], [w, negated(w)], [2, 3])
    assert torch.equal(torch.as_tensor(merged[0]), mean) and torch.allclose(torch.as_tensor(merged[1]), w)


def test_array_api_refuses_to_write_inference_tensors_outside_inference_mode():
    x = _inputs()[0]
    with torch.inference_mode():
        rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="running_mean is a torch inference tensor"):
        bn.forward_training(x, running_mean=rm, running_var=rv)
    assert torch.equal(rm, torch.zeros(3))
    with torch.inference_mode():
        bn.forward_training(x, running_mean=rm, running_var=rv)
    assert not torch.equal(rm, torch.zeros(3))
