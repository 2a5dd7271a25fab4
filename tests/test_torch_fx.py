"""batchnorm.torch under torch.fx: symbolic_trace keeps each of our layers as one call_module
node (as torch's own layers), records the functionals as call_function nodes, and the traced
GraphModule computes what the model computes; the functionals go through
__torch_function__ (modes and subclasses) as torch.nn.functional's do; FX quantization runs."""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="batchnorm.torch needs PyTorch")

import batchnorm.torch as bt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from resnet import resnet18  # noqa: E402

pytestmark = pytest.mark.torch
nn = torch.nn


def _nodes(graph_module: torch.fx.GraphModule) -> list:
    return [(n.op, str(n.target)) for n in graph_module.graph.nodes]


@pytest.mark.parametrize("training", [True, False])
def test_converted_resnet_traces_as_torchs(training):
    torch.manual_seed(0)
    theirs = resnet18(10).train(training)
    ours = bt.convert(copy.deepcopy(theirs)).train(training)
    traced = torch.fx.symbolic_trace(copy.deepcopy(ours))
    # The same graph as torch's layers give: one call_module node per layer.
    assert _nodes(traced) == _nodes(torch.fx.symbolic_trace(theirs))
    assert type(traced.get_submodule("layer1.0.bn1")) is bt.BatchNorm2d
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ours(x), traced(x2)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    y.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=0)
    traced_state = traced.state_dict()
    assert sorted(traced_state) == sorted(ours.state_dict())
    for name, a in ours.state_dict().items():
        torch.testing.assert_close(traced_state[name], a, rtol=0, atol=0, msg=name)  # running statistics too
    assert int(traced.bn1.num_batches_tracked) == int(training)


def test_norm_act_and_functionals_trace():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1)
            self.bn = bt.BatchNormAct2d(6)
            self.weight = nn.Parameter(torch.rand(6) + 0.5)
            self.bias = nn.Parameter(torch.randn(6))
            self.register_buffer("mean", torch.zeros(6))
            self.register_buffer("var", torch.ones(6))

        def forward(self, x):
            y = self.bn(self.conv(x), x)  # act(bn(conv(x)) + x)
            y = bt.batch_norm(y, self.mean, self.var, self.weight, self.bias, True, 0.1, 1e-5)
            return bt.batch_norm_act(y, None, None, self.weight, None, True, residual=x, relu=False)

    torch.manual_seed(1)
    model = Block()
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    calls = [(n.op, n.target) for n in traced.graph.nodes if n.op in ("call_module", "call_function")]
    assert calls == [("call_module", "conv"), ("call_module", "bn"),
                     ("call_function", bt.batch_norm), ("call_function", bt.batch_norm_act)]
    bn_node = next(n for n in traced.graph.nodes if n.target == "bn")
    assert [a.op for a in bn_node.args] == ["call_module", "placeholder"]  # the residual is an argument
    x = torch.randn(3, 6, 5, 4)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(traced.mean, model.mean, rtol=0, atol=0)  # updated in place by both


def test_a_layer_as_the_traced_root_is_a_clear_error():
    with pytest.raises(torch.fx.proxy.TraceError, match="BatchNorm2d cannot be the root of torch.fx.symbolic_trace"):
        torch.fx.symbolic_trace(bt.BatchNorm2d(3))


def test_sync_batchnorm_traces_as_one_node():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bt.SyncBatchNorm(4))
    traced = torch.fx.symbolic_trace(model)
    assert ("call_module", "1") in _nodes(traced)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)  # no process group: a batch norm


def test_functionals_reach_torch_function_modes():
    seen = []

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(4, 3), torch.rand(3)
    mean, var = torch.zeros(3), torch.ones(3)
    expected = bt.batch_norm_act(x, mean.clone(), var.clone(), w, None, True, residual=x)
    with Recorder():
        y = bt.batch_norm_act(x, mean, var, w, None, True, residual=x)
        bt.batch_norm(x, mean, var, w, None, False)
    assert bt.batch_norm_act in seen and bt.batch_norm in seen
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_functionals_reach_tensor_subclasses():
    class Logged(torch.Tensor):
        calls: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(4, 3).as_subclass(Logged)
    y = bt.batch_norm(x, None, None, None, None, True)
    assert Logged.calls[0] is bt.batch_norm and type(y) is Logged
    torch.testing.assert_close(y.as_subclass(torch.Tensor), bt.batch_norm(x.as_subclass(torch.Tensor), None, None,
                                                                          None, None, True), rtol=0, atol=0)


@pytest.mark.slow
def test_fx_quantization_runs_with_our_layers():
    # FX post-training quantization traces the model; our layers stay float modules between
    # (de)quantize nodes (its conv + BN fusion patterns match torch's types only).
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(2)
    model = bt.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(2, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        prepared(x)
        quantized = convert_fx(prepared)
    assert any(type(m) is bt.BatchNorm2d for m in quantized.modules())
    torch.testing.assert_close(quantized(x), model(x), rtol=0, atol=0.1)
