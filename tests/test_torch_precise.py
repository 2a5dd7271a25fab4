"""batchnorm.torch.recompute_statistics (PreciseBN for torch models): every layer's running
statistics become the exact float64 statistics of its inputs over the pass (captured here by
hooks and reduced by NumPy), for torch's layers and ours; the model's state is otherwise
unchanged. The cross-rank merge (sync=True) runs in test_distributed.py's gloo ranks."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="batchnorm.torch needs PyTorch")

import batchnorm.torch as bt  # noqa: E402

pytestmark = pytest.mark.torch
nn = torch.nn


class Net(nn.Sequential):
    """A Sequential with layers outside its data path: one never called, one without running
    statistics."""

    def __init__(self, *layers):
        super().__init__(*layers)
        self.aside = nn.ModuleDict({"unused": nn.BatchNorm1d(2), "untracked": nn.BatchNorm1d(2, track_running_stats=False)})

    def forward(self, x):
        for m in list(self)[:-1]:  # the last entry is the ModuleDict
            x = m(x)
        return x


def model_and_batches(ours: bool):
    torch.manual_seed(0)
    model = Net(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5, momentum=None),
        nn.Flatten(), nn.BatchNorm1d(5 * 4 * 4),
    )
    if ours:
        bt.convert(model)
    for _ in range(3):  # some momentum averages to replace
        model(torch.randn(4, 3, 8, 8) + 1)
    batches = [torch.randn(n, 3, 8, 8) * 2 + 5 for n in (3, 0, 7, 2, 5)]
    return model, batches


def inputs_seen(model, batches):
    """Each layer's inputs over the pass, as run in training mode (a copy of the model)."""
    twin = copy.deepcopy(model).train()
    seen = {}
    for name, m in twin.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].double()))
    with torch.no_grad():
        for b in batches:
            twin(b)
    return {name: torch.cat(xs).numpy() for name, xs in seen.items()}


@pytest.mark.parametrize("ours", [False, True], ids=["torch-layers", "our-layers"])
def test_running_statistics_are_the_population_s(ours):
    model, batches = model_and_batches(ours)
    model[1].eval()  # a mode to restore
    before = copy.deepcopy(model.state_dict())
    want = inputs_seen(model, batches)
    counts = bt.recompute_statistics(model, batches)
    after = model.state_dict()
    for name in ("1", "4", "6"):
        x = want[name]
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        assert counts[name] == x.size // x.shape[1]
        # float32 inputs reduced in float32 blocks and float32 buffers: a few float32 ulps of
        # the inputs' scale (a mean near 0 is not known to more digits than that).
        scale = np.abs(x).max()
        got_mean, got_var = after[f"{name}.running_mean"].double().numpy(), after[f"{name}.running_var"].double().numpy()
        np.testing.assert_allclose(got_mean, x.mean(axis=axes), rtol=1e-6, atol=1e-6 * scale)
        np.testing.assert_allclose(got_var, x.var(axis=axes, ddof=1), rtol=1e-5)
    assert counts["aside.unused"] == 0 and "aside.untracked" not in counts
    for key, value in before.items():  # nothing else moved: parameters, counters, unused layer
        if not key.endswith(("running_mean", "running_var")) or key.startswith("aside"):
            assert torch.equal(after[key], value), key
    assert not model[1].training and model[4].training and model[4].momentum is None and model[1].momentum == 0.1


def test_a_layer_tracking_the_biased_variance_gets_the_biased_one():
    """bt.BatchNorm2d(running_var_unbiased=False) keeps the biased variance in its steps: so
    does its recomputed statistic (it got the unbiased one)."""
    layer = bt.BatchNorm2d(3, running_var_unbiased=False)
    batches = [torch.randn(n, 3, 4, 4) * 2 + 1 for n in (2, 5)]
    bt.recompute_statistics(layer, batches)
    x = torch.cat(batches).double().numpy()
    np.testing.assert_allclose(layer.running_var.double().numpy(), x.var(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(layer.running_mean.double().numpy(), x.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_forward_callable_and_errors():
    model, batches = model_and_batches(False)
    counts = bt.recompute_statistics(model, [{"image": b} for b in batches], forward=lambda m, b: m(b["image"]))
    assert counts["1"] == 17 * 36
    # A batch the layers refuse in training (one value per channel): the error, and the model
    # as it was (modes, momenta, counters, statistics).
    model.eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bt.recompute_statistics(model, [batches[0], torch.randn(1, 3, 8, 8)])
    assert not any(m.training for m in model.modules()) and model[4].momentum is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        bt.recompute_statistics([], batches)
    with pytest.raises(ValueError, match="process_group applies only with sync=True"):
        bt.recompute_statistics(model, batches, process_group=object())


def test_a_failed_pass_with_an_infinite_value_leaves_the_statistics_as_they_were():
    # Momentum 0 keeps a statistic as it was, but 0 * Inf is NaN: the batch with an Inf turned
    # the running statistics to NaN before the next batch's error.
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), bt.BatchNorm2d(3))
    before = copy.deepcopy(model.state_dict())
    bad = torch.randn(4, 3, 5, 5)
    bad[0, 1, 0, 0] = float("inf")
    with pytest.raises(RuntimeError):  # the conv's error on 2 channels
        bt.recompute_statistics(model, [bad, torch.randn(4, 2, 5, 5)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_layers_called_with_their_input_by_keyword():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act = nn.BatchNorm1d(3), bt.BatchNormAct2d(3)

        def forward(self, x):
            return self.act(x=self.bn(input=x.flatten(2)).unflatten(2, x.shape[2:]))

    model = Keyword()
    x = torch.randn(6, 3, 2, 2) * 3 + 1
    counts = bt.recompute_statistics(model, [x])
    assert counts == {"bn": 24, "act": 24}
    want = x.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(model.bn.running_mean, want.mean(1).float())
    torch.testing.assert_close(model.bn.running_var, want.var(1).float())


def test_a_lazy_layer_not_made_yet():
    # Its running statistics are made by its first batch: the copies kept to restore them after
    # a failed pass were taken of uninitialized buffers ("Attempted to use an uninitialized
    # parameter").
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    x = torch.randn(8, 3, 4, 4)
    counts = bt.recompute_statistics(model, [x])
    assert counts == {"1": 8 * 16}
    h = model[0](x).detach().double()
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)).float(), rtol=1e-5, atol=1e-6)
