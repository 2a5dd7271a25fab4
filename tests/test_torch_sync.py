"""batchnorm.torch.SyncBatchNorm in one process: torch.nn.SyncBatchNorm's interface (constructor,
state_dict, input checks, convert_sync_batchnorm), BatchNorm behaviour without a process group
or on a group of one rank (no collective), convert(sync=True), and torch.compile. The
multi-rank behaviour (gloo, uneven and empty shards, DDP ResNet-18) is in test_distributed.py."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="batchnorm.torch needs PyTorch")

import batchnorm.torch as bt  # noqa: E402

pytestmark = pytest.mark.torch
nn = torch.nn


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def steps(module, x, n=2):
    """n training steps then eval: outputs, input and parameter gradients, buffers."""
    results = []
    for _ in range(n):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(torch.cos(y.detach()))
        results += [y, xi.grad, module.weight.grad, module.bias.grad]
        module.weight.grad = module.bias.grad = None
    module.eval()
    results += [module(x), module.running_mean, module.running_var, module.num_batches_tracked]
    return results


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7), (3, 4, 5, 6), (2, 4, 3, 4, 5)], ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_process_group_it_is_torch_s_sync_batch_norm(shape, momentum):
    # torch's SyncBatchNorm without an initialized process group falls back to batch_norm.
    torch.manual_seed(0)
    theirs = nn.SyncBatchNorm(4, momentum=momentum)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5), theirs.bias.uniform_(-0.5, 0.5)
    ours = bt.SyncBatchNorm(4, momentum=momentum)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape) * 3 + 2
    for got, want in zip(steps(ours, x), steps(theirs, x)):
        assert rel_err(got, want) < 2e-5


def test_interface_is_torch_s():
    ours = bt.SyncBatchNorm(3, 1e-3, None, True, False, None, dtype=torch.float64, bias=False)
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    # Not an nn.SyncBatchNorm: DistributedDataParallel refuses those on CPU.
    assert not isinstance(ours, nn.SyncBatchNorm)
    assert ours.eps == 1e-3 and ours.momentum is None and ours.running_mean is None and ours.bias is None
    assert ours.weight.dtype == torch.float64 and ours.process_group is None
    assert set(bt.SyncBatchNorm(3).state_dict()) == set(nn.SyncBatchNorm(3).state_dict())
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        bt.SyncBatchNorm(3)(torch.randn(3))


def test_convert_sync_true_and_convert_sync_batchnorm():
    group_marker = object()  # torch's SyncBatchNorm keeps whatever process_group it was given
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Sequential(nn.BatchNorm2d(3), bt.BatchNorm3d(4)), nn.SyncBatchNorm(5))
    model[2].process_group = group_marker
    model[1][0].eval()
    before = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert bt.convert(model, sync=True) is model
    assert [type(m) for m in (model[0], model[1][0], model[1][1], model[2])] == [bt.SyncBatchNorm] * 4
    assert model[2].process_group is group_marker and model[0].process_group is None
    assert not model[1][0].training and model[0].training
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t is before[n], n  # the same objects: optimizers keep working
    again = bt.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
    assert type(again[0]) is bt.SyncBatchNorm
    assert type(bt.convert(nn.SyncBatchNorm(2))) is bt.SyncBatchNorm  # sync=False too: it was synchronized


def test_one_rank_group_runs_no_collective(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        ours, plain = bt.SyncBatchNorm(4), bt.BatchNorm2d(4)
        x = torch.randn(3, 4, 5, 5)
        for got, want in zip(steps(ours, x), steps(plain, x)):
            assert torch.equal(got, want)  # the very same ops
        assert ours._engine is None  # never built an engine: nothing was exchanged
    finally:
        dist.destroy_process_group()


# Inductor's own use of torch.jit warns in torch 2.13 (not ours; warnings are errors here).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.slow
def test_compiles_without_a_process_group():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bt.SyncBatchNorm(4), nn.ReLU())
    eager = bt.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)  # no process group: the plain ops, no graph break
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(compiled(x), eager(x)) < 1e-5


def test_local_validation_quotes_the_caller_s_shape():
    # Checked on an empty slice of x before any exchange: the message quoted (0, 5, 2, 2).
    from batchnorm.torch import sync

    with pytest.raises(ValueError, match=r"weight must have shape \(5,\), got \(3,\) \(x has shape \(4, 5, 2, 2\)"):
        sync._validate_locally(torch.randn(4, 5, 2, 2), torch.ones(3), None, None, None, 0.1, 1e-5)
