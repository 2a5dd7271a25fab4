"""The training variants on the torch route: BatchNorm1d/2d(renorm=, ghost_batch=,
skip_nonfinite=, running_var_unbiased=) against float64 torch implementations of the papers
(autograd through torch ops, r and d detached as the paper says), over steps, memory formats
and devices; torch.library.opcheck of the variant ops and torch.compile(fullgraph=True)."""
import math
import re

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from batchnorm.torch import BatchNorm1d, BatchNorm2d  # noqa: E402
from helpers import torch_device_params  # noqa: E402


class PaperRenorm(torch.nn.Module):
    """Batch renormalization (Ioffe 2017, Algorithm 1) written with torch ops, float64:
    r and d from the running statistics before the update, detached; running variance
    unbiased (torch's convention)."""

    def __init__(self, C, rmax, dmax, momentum=0.1, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(C, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.zeros(C, dtype=torch.float64))
        self.register_buffer("running_mean", torch.zeros(C, dtype=torch.float64))
        self.register_buffer("running_var", torch.ones(C, dtype=torch.float64))
        self.rmax, self.dmax, self.momentum, self.eps = rmax, dmax, momentum, eps

    def forward(self, x):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        mu = x.mean(dims)
        var = x.var(dims, unbiased=False)
        sigma = torch.sqrt(var + self.eps)
        sigma_run = torch.sqrt(self.running_var + self.eps)
        r = (sigma / sigma_run).clamp(1 / self.rmax, self.rmax).detach()
        d = ((mu - self.running_mean) / sigma_run).clamp(-self.dmax, self.dmax).detach()
        xhat = (x - mu.view(shape)) / sigma.view(shape)
        y = self.weight.view(shape) * (xhat * r.view(shape) + d.view(shape)) + self.bias.view(shape)
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mu)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * n / (n - 1))
        return y


@pytest.mark.parametrize("device", torch_device_params())
@pytest.mark.parametrize("channels_last", [False, True])
def test_renorm_module_against_the_paper(device, channels_last):
    torch.manual_seed(0)
    C = 6
    ours = BatchNorm2d(C, renorm=(1.5, 0.5), dtype=torch.float64, device=device)
    ref = PaperRenorm(C, 1.5, 0.5).to(device)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2, C))
            m.bias.copy_(torch.linspace(-1, 1, C))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):  # the running statistics drift, so r and d clip differently each step
        x = (torch.randn(8, C, 5, 5, dtype=torch.float64, device=device) * 3 + step).to(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        dy = torch.randn_like(x)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-9, atol=1e-9)
    # Evaluation is plain batch norm with the running statistics.
    ours.eval()
    x = torch.randn(4, C, 3, 3, dtype=torch.float64, device=device)
    want = torch.nn.functional.batch_norm(x, ref.running_mean, ref.running_var, ref.weight, ref.bias, False)
    torch.testing.assert_close(ours(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", torch_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ghost_module_equals_torch_per_group(device, dtype):
    torch.manual_seed(1)
    N, G, C = 12, 4, 5
    ours = BatchNorm2d(C, ghost_batch=G, momentum=0.2, device=device)
    x = torch.randn(N, C, 4, 4, device=device).to(dtype)
    xa = x.clone().requires_grad_()
    y = ours(xa)
    groups = [x[g * G:(g + 1) * G].float().clone().requires_grad_() for g in range(N // G)]
    w = torch.ones(C, device=device, requires_grad=True)
    b = torch.zeros(C, device=device, requires_grad=True)
    want = torch.cat([torch.nn.functional.batch_norm(xg, None, None, w, b, training=True) for xg in groups])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), want, **tol)
    dy = torch.randn_like(want).to(dtype)  # the reference takes the same (rounded) dy
    y.backward(dy)
    want.backward(dy.float())
    torch.testing.assert_close(xa.grad.float(), torch.cat([xg.grad for xg in groups]), **tol)
    torch.testing.assert_close(ours.weight.grad, w.grad, **tol)
    torch.testing.assert_close(ours.bias.grad, b.grad, **tol)
    # Running statistics: one update with the whole batch's statistics.
    xf = x.float()
    torch.testing.assert_close(ours.running_mean, 0.2 * xf.mean((0, 2, 3)), **tol)
    torch.testing.assert_close(ours.running_var, 0.8 + 0.2 * xf.var((0, 2, 3), unbiased=True), **tol)
    assert ours.num_batches_tracked.item() == 1


def test_skip_nonfinite_and_biased_module():
    m = BatchNorm1d(3, skip_nonfinite=True, running_var_unbiased=False, momentum=0.5)
    x = torch.randn(6, 3)
    x[2, 1] = math.inf
    m(x)
    assert m.running_mean[1].item() == 0.0 and m.running_var[1].item() == 1.0
    for c in (0, 2):
        torch.testing.assert_close(m.running_mean[c], 0.5 * x[:, c].mean())
        torch.testing.assert_close(m.running_var[c], 0.5 + 0.5 * x[:, c].var(unbiased=False))
    assert "skip_nonfinite=True" in repr(m) and "running_var_unbiased=False" in repr(m)


def test_plain_module_state_dict_unchanged():
    """The variants are constructor options, not state: a variant module loads torch's state_dict."""
    ref = torch.nn.BatchNorm2d(4)
    m = BatchNorm2d(4, renorm=(3, 5))
    m.load_state_dict(ref.state_dict())
    assert set(m.state_dict()) == set(ref.state_dict())


def test_module_errors():
    with pytest.raises(ValueError, match="renorm needs running statistics"):
        BatchNorm2d(4, renorm=(3, 5), track_running_stats=False)
    with pytest.raises(ValueError, match=r"renorm must be \(rmax >= 1, dmax >= 0\)"):
        BatchNorm2d(4, renorm=(0.5, 5))
    with pytest.raises(ValueError, match="ghost_batch must be a positive int"):
        BatchNorm2d(4, ghost_batch=0)
    with pytest.raises(ValueError, match="renorm and ghost_batch together"):
        BatchNorm2d(4, renorm=(3, 5), ghost_batch=2)
    m = BatchNorm2d(4, ghost_batch=3)
    with pytest.raises(ValueError, match="ghost_batch must divide the batch size"):
        m(torch.randn(4, 4, 2, 2))


def test_op_and_function_name_a_renorm_of_the_wrong_length():
    # The raw op and batch_norm_variant unpacked it: "too many values to unpack (expected 2)".
    from batchnorm.torch.variants import batch_norm_variant

    x, rm, rv = torch.randn(8, 4), torch.zeros(4), torch.ones(4)
    for renorm in ([2.0, 1.0, 3.0], [2.0], []):
        words = f"renorm must be None or an (rmax, dmax) pair of numbers, got a sequence of length {len(renorm)}"
        with pytest.raises(TypeError, match=re.escape(words)):
            torch.ops.batchnorm.forward_training_variant(x, None, None, rm, rv, 0.1, 1e-5, True, False, renorm, 0)
        with pytest.raises(TypeError, match=re.escape(words)):
            batch_norm_variant(x, rm, rv, renorm=renorm)
    assert rm.eq(0).all() and rv.eq(1).all()


def test_opcheck():
    x = torch.randn(8, 3, 4, 4)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    op = torch.ops.batchnorm.forward_training_variant
    torch.library.opcheck(op, (x, w, b, rm, rv, 0.1, 1e-5, True, False, [2.0, 1.0], 0))
    torch.library.opcheck(op, (x, w, b, rm, rv, 0.1, 1e-5, False, True, None, 4))
    y, mean, invstd, r, d, _, _ = op(x, w, b, rm, rv, 0.1, 1e-5, True, False, [2.0, 1.0], 0)
    back = torch.ops.batchnorm.backward_variant
    torch.library.opcheck(back, (torch.randn_like(x), x, mean, invstd, w, r, d, 0))
    y, mean, invstd, *_ = op(x, w, b, rm, rv, 0.1, 1e-5, True, False, None, 4)
    torch.library.opcheck(back, (torch.randn_like(x), x, mean, invstd, w, None, None, 4))


def test_compile_fullgraph():
    torch.manual_seed(2)
    m = BatchNorm2d(4, renorm=(2.0, 1.0))
    ref = BatchNorm2d(4, renorm=(2.0, 1.0))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 4, 3, 3) + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = compiled(xa)
    yb = ref(xb)
    ya.sum().backward()
    (yb * 1).sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(m.running_var, ref.running_var)
