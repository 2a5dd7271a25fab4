"""The proof on a real model: torchvision's ResNet-18 (tests/resnet.py) converted with
batchnorm.torch.convert trains like the unconverted model for 3 SGD steps, NCHW and
channels_last: losses, parameters and running statistics step by step, every BN layer's
y / dx / gradients on the exact inputs that reached it, eval() outputs, state_dict both ways."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="batchnorm.torch needs PyTorch")

import batchnorm.torch as bt  # noqa: E402
from resnet import resnet18  # noqa: E402

pytestmark = pytest.mark.torch

F = torch.nn.functional
BATCH, SIZE, CLASSES, STEPS = 4, 32, 10, 3  # small: CI time

# Tolerances, calibrated on this test's data (observed maxima in brackets) and stated as
# max |ours - torch's| / max |torch's| per tensor:
# - float64, 3 free steps: only summation orders differ, but each step amplifies the previous
#   one's differences ~30x (batch 4 at 32x32 leaves 4 values per channel in layer4's BNs, whose
#   1/sigma magnifies them) [loss, parameters, running statistics, gradients after steps 1, 2, 3:
#   9e-13, 3e-11, 8e-10]; a bug shows up as 1e-3 or more.
FLOAT64_RTOL = (1e-11, 5e-10, 1e-8)
# - float32, one BN layer on the exact x and dy that reached it: y, dx, dweight, dbias and
#   the running statistics agree to float32 rounding of differently ordered sums [1.7e-6].
LAYER32_RTOL = 2e-5
# - float32, one whole step from the same starting state: loss [5e-6], and per tensor the
#   gradients, parameters and running statistics [1.3e-4: 1e-7 differences are amplified
#   through 20 layers, and may flip a ReLU or max-pool choice].
LOSS32_RTOL = 5e-5
STEP32_RTOL = 2e-3


@pytest.fixture(autouse=True)
def one_torch_thread():
    """A model this small runs fastest on one thread, and stays fast on a busy CI machine
    (two threads spin-wait each other when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: "torch.Tensor", b: "torch.Tensor") -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def memory_order(t: "torch.Tensor") -> tuple:
    """Strides of the dimensions longer than 1 (the others' strides do not matter)."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def setup(dtype, channels_last):
    torch.manual_seed(0)
    ref = resnet18(CLASSES).to(dtype)
    ours = bt.convert(copy.deepcopy(ref))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref, ours = ref.to(memory_format=fmt), ours.to(memory_format=fmt)
    x = torch.randn(BATCH, 3, SIZE, SIZE, dtype=dtype).contiguous(memory_format=fmt)
    target = torch.randint(0, CLASSES, (BATCH,))
    return ref, ours, x, target


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def step(model, opt, x, target):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads


def test_converted_resnet18_has_only_our_batch_norms():
    ref, ours, _, _ = setup(torch.float32, False)
    kinds = {type(m) for m in ours.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {bt.BatchNorm2d}
    assert sum(isinstance(m, bt.BatchNorm2d) for m in ours.modules()) == 20
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_resnet18_float64_three_free_steps(channels_last):
    ref, ours, x, target = setup(torch.float64, channels_last)
    ref_opt, our_opt = sgd(ref), sgd(ours)
    for rtol in FLOAT64_RTOL:
        ref_loss, ref_grads = step(ref, ref_opt, x, target)
        our_loss, our_grads = step(ours, our_opt, x, target)
        assert rel_err(our_loss, ref_loss) < rtol
        for name, g in our_grads.items():
            assert rel_err(g, ref_grads[name]) < rtol, name
        ref_state = ref.state_dict()
        for name, value in ours.state_dict().items():  # parameters and running statistics
            assert rel_err(value, ref_state[name]) < rtol, name
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < rtol


class LayerRecorder:
    """Records, for each of the model's BN layers, its state before the forward and the exact
    x and dy that reached it, to replay the layer alone."""

    def __init__(self, model):
        self.calls = []
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.register_forward_pre_hook(self.pre)
                m.register_forward_hook(self.post)

    def pre(self, module, args):
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.calls.append({"state": state, "x": args[0].detach().clone()})

    def post(self, module, args, output):
        if not output.requires_grad:  # eval under no_grad
            return
        call = self.calls[-1]
        # Fires with the gradient of this very output (before the in-place ReLU that follows).
        output.register_hook(lambda dy: call.__setitem__("dy", dy.clone()))


def replay(cls, state, x, dy):
    layer = cls(state["weight"].numel())
    layer.load_state_dict(state)
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return [y, x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var]


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_resnet18_float32_step_by_step(channels_last):
    ref, ours, x, target = setup(torch.float32, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref_opt, our_opt = sgd(ref), sgd(ours)
    recorder = LayerRecorder(ours)
    for _ in range(STEPS):
        # Both start from the same state: the reference's parameters, buffers and momenta.
        ours.load_state_dict(ref.state_dict())
        our_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # not shared momenta
        recorder.calls.clear()
        our_loss, our_grads = step(ours, our_opt, x, target)
        ref_loss, ref_grads = step(ref, ref_opt, x, target)
        assert rel_err(our_loss, ref_loss) < LOSS32_RTOL
        for name, g in our_grads.items():
            assert rel_err(g, ref_grads[name]) < STEP32_RTOL, name
        ref_params = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            assert rel_err(p, ref_params[name]) < STEP32_RTOL, name
        ref_buffers = dict(ref.named_buffers())
        for name, b in ours.named_buffers():
            if b.is_floating_point():
                assert rel_err(b, ref_buffers[name]) < STEP32_RTOL, name
            else:
                assert torch.equal(b, ref_buffers[name]), name
        # Each BN layer alone, on the very x and dy it saw in this step, against torch's.
        assert len(recorder.calls) == 20
        for i, call in enumerate(recorder.calls):
            assert call["x"].is_contiguous(memory_format=fmt)
            got = replay(bt.BatchNorm2d, call["state"], call["x"], call["dy"])
            want = replay(torch.nn.BatchNorm2d, call["state"], call["x"], call["dy"])
            assert memory_order(got[0]) == memory_order(want[0]) and memory_order(got[1]) == memory_order(want[1])
            for what, a, b in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), got, want):
                assert rel_err(a, b) < LAYER32_RTOL, (i, what)
    ref.eval(), ours.eval()
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < LAYER32_RTOL


def test_resnet18_state_dict_loads_both_ways():
    ref, ours, x, target = setup(torch.float32, False)
    step(ours, sgd(ours), x, target)  # running statistics and num_batches_tracked move
    fresh_ref = resnet18(CLASSES)
    fresh_ref.load_state_dict(ours.state_dict(), strict=True)
    back = bt.convert(resnet18(CLASSES))
    back.load_state_dict(fresh_ref.state_dict(), strict=True)
    for a, b, c in zip(ours.state_dict().values(), fresh_ref.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert list(ours.state_dict()) == list(ref.state_dict())
