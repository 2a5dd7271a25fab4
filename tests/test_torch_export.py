"""batchnorm.torch in graphs that leave eager Python: torch.export (our registered ops in the
ExportedProgram, and bt.decompositions() turning them into torch's ATen batch norm),
torch.onnx.export with both exporters (our layers emit torch's own operations there, so the
ONNX graph is the one torch's layers give, checked in ONNX Runtime) and torch.jit.trace."""
from __future__ import annotations

import copy
import io
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="batchnorm.torch needs PyTorch")

import batchnorm.torch as bt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from resnet import resnet18  # noqa: E402

# torch's exporters warn about their own internals (pytree's LeafSpec, the TorchScript-based
# exporter's deprecation): not this package's to fix.
pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
nn = torch.nn
ops = torch.ops.batchnorm


class _Block(nn.Module):
    """conv, a fused BatchNormAct2d with a residual, BatchNorm2d, and a BatchNorm1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_act = bt.BatchNormAct2d(8)
        self.bn = bt.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.bn1d = bt.BatchNorm1d(5)

    def forward(self, x):
        y = self.bn(self.bn_act(self.conv(x), x.repeat(1, 3, 1, 1)[:, :8]))
        return self.bn1d(self.fc(y.mean((2, 3))))


def _trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The model after one training batch (running statistics away from 0 and 1)."""
    model.train()
    with torch.no_grad():
        model(x)
    return model


def _targets(graph) -> list:
    return [str(n.target) for n in graph.nodes if n.op == "call_function"]


# ---- torch.export --------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_export_runs_our_ops_and_decomposes_to_torchs(training):
    torch.manual_seed(0)
    model = _trained(_Block(), torch.randn(6, 3, 8, 8)).train(training)
    x = torch.randn(6, 3, 8, 8)
    expected_model = copy.deepcopy(model)
    expected = expected_model(x)
    ep = torch.export.export(copy.deepcopy(model), (x,))
    ours = [t for t in _targets(ep.graph) if t.startswith("batchnorm.")]
    kind = "training" if training else "inference"
    assert ours == [f"batchnorm.forward_{kind}_act.default"] + [f"batchnorm.forward_{kind}.default"] * 2
    # The ExportedProgram runs our kernels: the model's bits, running statistics included.
    exported = ep.module()
    assert torch.equal(exported(x), expected)
    if training:
        for name in ("bn_act.running_mean", "bn.running_var", "bn1d.running_mean"):
            assert torch.equal(exported.state_dict()[name], expected_model.state_dict()[name]), name
    # decompositions(): no op of ours left, torch's batch norm in their place, the same function.
    table = torch.export.default_decompositions()
    table.update(bt.decompositions())
    decomposed = torch.export.export(copy.deepcopy(model), (x,)).run_decompositions(table)
    assert not [t for t in _targets(decomposed.graph) if "batchnorm" in t.split(".")[0]]
    assert any("native_batch_norm" in t for t in _targets(decomposed.graph))
    module = decomposed.module()
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    if training:
        torch.testing.assert_close(module.state_dict()["bn.running_var"], expected_model.bn.running_var)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("layer", [bt.BatchNorm2d, bt.BatchNormAct2d])
def test_export_of_training_with_the_cumulative_average(layer, strict):
    # momentum=None: the program weighs each batch by the count it holds (torch's own layers
    # cannot be exported in training so: the count read as a number is data-dependent; ours
    # failed the same way).
    torch.manual_seed(0)
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 1), layer(4, momentum=None)), torch.randn(6, 3, 5, 5))
    exported = torch.export.export(copy.deepcopy(model), (torch.randn(6, 3, 5, 5),), strict=strict).module()
    for _ in range(3):
        x = torch.randn(6, 3, 5, 5)
        torch.testing.assert_close(exported(x), model(x))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, msg=name)
    assert int(exported.state_dict()["1.num_batches_tracked"]) == 4


def _op_cases(x, w, b, rm, rv):
    r = torch.randn_like(x)
    y, mean, invstd, _, _ = ops.forward_training(x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)
    dy = torch.randn_like(x)
    return [
        (ops.forward_training.default, (x, w, b, rm, rv, 0.1, 1e-5)),
        (ops.forward_training.default, (x, None, None, None, None, 0.3, 1e-3)),
        (ops.forward_inference.default, (x, rm, rv, w, b, 1e-5)),
        (ops.forward_inference.default, (x, rm, rv, None, None, 1e-3)),
        (ops.forward_training_act.default, (x, r, w, b, rm, rv, 0.1, 1e-5, True)),
        (ops.forward_training_act.default, (x, None, w, None, None, None, 0.1, 1e-5, False)),
        (ops.forward_inference_act.default, (x, r, rm, rv, w, b, 1e-5, True)),
        (ops.forward_inference_act.default, (x, None, rm, rv, None, b, 1e-5, False)),
        (ops.backward.default, (dy, x, mean, invstd, w, True)),
        (ops.backward.default, (dy, x, mean, invstd, None, False)),
        (ops.backward_act.default, (dy, x, y, mean, invstd, w, True, True)),
        (ops.backward_act.default, (dy, x, y, mean, invstd, w, False, False)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "empty"])
@pytest.mark.parametrize("half_params", [False, True], ids=["acc_params", "x_dtype_params"])
def test_each_decomposition_returns_what_its_op_returns(dtype, layout, half_params):
    torch.manual_seed(1)
    x = torch.randn(0 if layout == "empty" else 4, 6, 5, 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":  # dense, but neither contiguous nor channels_last: the op keeps its strides
        x = x.permute(2, 1, 0, 3).contiguous().permute(2, 1, 0, 3)
    pdtype = dtype if half_params or dtype == torch.float64 else torch.float32
    w, b, rm = (torch.randn(6, dtype=pdtype) for _ in range(3))
    rv = torch.rand(6, dtype=pdtype) + 0.5
    table = bt.decompositions()
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    for op, args in _op_cases(x, w, b, rm, rv):
        if layout == "empty" and op in (ops.backward.default, ops.backward_act.default):
            args = (torch.empty_like(x), x, *args[2:])  # the op gives an empty batch NaN statistics
        got, want = table[op](*args), op(*args)
        got = (got,) if isinstance(got, torch.Tensor) else got
        want = (want,) if isinstance(want, torch.Tensor) else want
        assert len(got) == len(want), op
        for i, (g, e) in enumerate(zip(got, want)):
            where = f"{op} output {i}"
            assert (g.shape, g.dtype, g.device) == (e.shape, e.dtype, e.device), where
            if e.numel() > 1 and e.dim() == x.dim():
                assert g.stride() == e.stride(), where
            torch.testing.assert_close(g, e, rtol=tol, atol=tol, equal_nan=True, msg=where)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("x_dtype, params", [(torch.float32, torch.float64), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float16), (torch.float64, torch.float32)])
def test_decompositions_take_parameters_of_another_dtype_than_x(x_dtype, params, training):
    # Our ops take any mix (float64 running statistics for a float32 x); ATen's batch norm
    # refused it ("mixed dtype"): the decompositions hand it the accumulation dtype.
    torch.manual_seed(0)
    model = _trained(nn.Sequential(bt.BatchNormAct2d(4, dtype=params), bt.BatchNorm2d(4, dtype=params)),
                     torch.randn(6, 4, 5, 5, dtype=x_dtype)).train(training)
    x = torch.randn(6, 4, 5, 5, dtype=x_dtype)
    program = torch.export.export(copy.deepcopy(model), (x,)).module()
    decomposed = torch.export.export(copy.deepcopy(model), (x,)).run_decompositions(bt.decompositions()).module()
    tol = dict(rtol=2e-2, atol=2e-2) if x_dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decomposed(x), program(x), **tol)
    for name, value in program.state_dict().items():
        assert decomposed.state_dict()[name].dtype == value.dtype, name
        torch.testing.assert_close(decomposed.state_dict()[name], value, **tol, msg=name)


@pytest.mark.parametrize("case", ["residual", "transposed"])
def test_decompositions_of_a_joint_forward_backward_graph(case):
    """ExecuTorch's on-device training lowers torch.export's joint forward and backward graph:
    the decompositions wrote into fresh tensors in place (copy_), which it refuses (a fused
    layer's residual gradient; a transposed x's outputs in x's strides)."""
    from torch.export.experimental import _export_forward_backward

    class Net(torch.nn.Module):
        def __init__(self, ours):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 4, 1)
            self.c2 = torch.nn.Conv2d(3, 4, 1) if case == "residual" else None  # (every parameter needs a gradient)
            self.ours = ours
            self.bn = (bt.BatchNormAct2d(4) if case == "residual" else bt.BatchNorm2d(4)) if ours else \
                torch.nn.BatchNorm2d(4)

        def forward(self, x):
            if case == "transposed":
                return self.bn(self.c1(x).transpose(2, 3)).square().mean()
            if self.ours:
                return self.bn(self.c1(x), self.c2(x)).square().mean()
            return torch.relu(self.bn(self.c1(x)) + self.c2(x)).square().mean()

    x = torch.randn(4, 3, 5, 6)
    theirs, ours = Net(False), Net(True)
    table = torch.export.default_decompositions()
    table.update(bt.decompositions())
    for model in (theirs, ours):
        joint = _export_forward_backward(torch.export.export(model.train(), (x,)))
        decomposed = joint.run_decompositions(table)
        assert not [n for n in decomposed.graph.nodes if "batchnorm" in str(n.target)]
        assert not [n for n in decomposed.graph.nodes if str(n.target).endswith("copy_.default")]


def test_decompositions_cover_the_ops_with_an_aten_counterpart():
    table = bt.decompositions()
    assert set(table) == {
        ops.forward_training.default, ops.forward_inference.default, ops.backward.default,
        ops.forward_training_act.default, ops.forward_inference_act.default, ops.backward_act.default,
    }
    assert bt.decompositions() is not table  # a new dict each call: the caller may update it


# ---- torch.onnx.export -----------------------------------------------------------------------


def _onnx(model: nn.Module, x: torch.Tensor, dynamo: bool) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto.SerializeToString()
        f = io.BytesIO()
        torch.onnx.export(model, (x,), f, dynamo=False)
        return f.getvalue()


def _runs_in_onnx_runtime_as(model_bytes: bytes, model: nn.Module, x: torch.Tensor) -> None:
    """ONNX Runtime's output of the exported graph matches the model's, to 1e-4."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model_bytes)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def _op_types(model_bytes: bytes) -> list:
    onnx = pytest.importorskip("onnx")
    return [n.op_type for n in onnx.load_from_string(model_bytes).graph.node]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_gives_torchs_graph_and_values(dynamo):
    pytest.importorskip("onnxscript" if dynamo else "onnx")
    torch.manual_seed(2)
    theirs = _trained(resnet18(10), torch.randn(4, 3, 32, 32)).eval()
    ours = bt.convert(copy.deepcopy(theirs)).eval()
    x = torch.randn(2, 3, 32, 32)
    # Our layers emit torch's operations under export: the same ONNX graph as torch's layers.
    ours_bytes = _onnx(ours, x, dynamo)
    assert _op_types(ours_bytes) == _op_types(_onnx(theirs, x, dynamo))
    _runs_in_onnx_runtime_as(ours_bytes, ours, x)


def test_onnx_export_of_the_fused_layer_is_bn_add_relu():
    pytest.importorskip("onnxscript")
    torch.manual_seed(3)
    model = _trained(_Block(), torch.randn(6, 3, 8, 8)).eval()
    x = torch.randn(3, 3, 8, 8)
    model_bytes = _onnx(model, x, dynamo=True)
    types = _op_types(model_bytes)
    assert "Relu" in types and "Add" in types
    assert not [t for t in types if "batchnorm" in t.lower() and t != "BatchNormalization"]
    _runs_in_onnx_runtime_as(model_bytes, model, x)


def test_onnx_export_refuses_training_variants_and_takes_them_in_eval():
    pytest.importorskip("onnxscript")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bt.BatchNorm2d(4, ghost_batch=2))
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match="export the model in eval mode"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.train(), (x,), io.BytesIO(), dynamo=False, training=torch.onnx.TrainingMode.TRAINING)
    with pytest.raises(Exception):  # (the torch.export-based exporter wraps the error in its own)
        _onnx(model.train(), x, dynamo=True)
    # Eval without running statistics normalizes with the batch's too: refused the same way.
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 1), bt.BatchNorm2d(4, ghost_batch=2, track_running_stats=False)).eval()
    with pytest.raises(RuntimeError, match="export the model in eval mode"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(no_stats, (x,), io.BytesIO(), dynamo=False)
    theirs = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    theirs.load_state_dict(model.state_dict())
    for dynamo in (True, False):  # (the torch.export-based exporter folds BN into the Conv)
        assert _op_types(_onnx(model.eval(), x, dynamo)) == _op_types(_onnx(theirs.eval(), x, dynamo))


class _NumpyInForward(nn.Module):
    """A model torch.export's non-strict capture cannot trace (NumPy on a tensor), so
    torch.onnx.export retries under Dynamo, which folds torch.onnx.is_in_onnx_export() to False."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), bn

    def forward(self, x):
        return torch.tanh(self.bn(self.conv(x))) * float(np.float32(2.0))


def test_onnx_export_through_the_dynamo_retry_gives_torchs_graph():
    pytest.importorskip("onnxscript")
    torch.manual_seed(10)
    theirs = _trained(_NumpyInForward(nn.BatchNorm2d(4)), torch.randn(4, 3, 6, 6)).eval()
    ours = bt.convert(copy.deepcopy(theirs)).eval()
    x = torch.randn(2, 3, 6, 6)
    ours_bytes = _onnx(ours, x, dynamo=True)
    assert _op_types(ours_bytes) == _op_types(_onnx(theirs, x, dynamo=True))
    _runs_in_onnx_runtime_as(ours_bytes, ours, x)


# ---- torch.jit.trace --------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_jit_trace_records_our_ops(training):
    torch.manual_seed(4)
    model = _trained(_Block(), torch.randn(6, 3, 8, 8)).train(training)
    x = torch.randn(6, 3, 8, 8)
    expected_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(model), (x,), check_trace=False)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert {k for k in kinds if k.startswith("batchnorm::")}
    assert torch.equal(traced(x), expected_model(x))


# ---- torch.jit.script ------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_scripted_model_is_torchs_batch_norm(training):
    torch.manual_seed(5)
    theirs = _trained(resnet18(10), torch.randn(4, 3, 32, 32)).train(training)
    ours = bt.convert(copy.deepcopy(theirs)).train(training)
    scripted, reference = torch.jit.script(ours), torch.jit.script(theirs)
    kinds = {n.kind() for n in scripted.inlined_graph.nodes()}
    assert not {k for k in kinds if k.startswith("batchnorm::")}  # torch's ops only: runs in libtorch
    x = torch.randn(4, 3, 32, 32)
    y, expected = scripted(x), reference(x)
    assert torch.equal(y, expected)
    y.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(scripted.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(scripted.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), name


@pytest.mark.parametrize("options", [dict(momentum=None), dict(track_running_stats=False), dict(affine=False)])
def test_scripted_layer_options(options):
    torch.manual_seed(6)
    theirs = nn.BatchNorm2d(3, **options)
    ours = bt.BatchNorm2d(3, **options)
    ours.load_state_dict(theirs.state_dict())
    scripted, reference = torch.jit.script(ours), torch.jit.script(theirs)
    for _ in range(2):
        x = torch.randn(4, 3, 2, 2)
        assert torch.equal(scripted(x), reference(x))
    assert all(torch.equal(b, c) for b, c in zip(scripted.buffers(), reference.buffers()))
    scripted.eval(), reference.eval()
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(scripted(x), reference(x))
    with pytest.raises(Exception, match="expected 4D input"):
        scripted(torch.randn(4, 3))


@pytest.mark.parametrize("act", ["relu", "identity", "gelu"])
@pytest.mark.parametrize("training", [False, True])
def test_scripted_batch_norm_act(act, training):
    torch.manual_seed(7)
    layer = _trained(bt.BatchNormAct2d(4, act_layer=act), torch.randn(3, 4, 3, 3)).train(training)
    reference = copy.deepcopy(layer)
    scripted = torch.jit.script(layer)
    x, r = torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3)
    expected = reference.act(F_batch_norm(reference, x) + r)
    torch.testing.assert_close(scripted(x, r), expected)
    torch.testing.assert_close(scripted.running_mean, reference.running_mean)
    torch.testing.assert_close(scripted(x), reference(x))


def F_batch_norm(layer, x):
    return torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                                          layer.training, layer.momentum, layer.eps)


def test_scripted_variants_and_sync_layers_run_in_eval_only():
    torch.manual_seed(8)
    x = torch.randn(4, 3, 2, 2)
    for layer in (bt.BatchNorm2d(3, renorm=(3.0, 5.0)), bt.BatchNorm2d(3, ghost_batch=2),
                  bt.BatchNorm2d(3, skip_nonfinite=True), bt.SyncBatchNorm(3)):
        scripted = torch.jit.script(layer.train())
        with pytest.raises(Exception, match="call it in eval mode"):
            scripted(x)
        assert int(scripted.num_batches_tracked) == 0  # refused before anything is counted
        scripted.eval()
        torch.testing.assert_close(scripted(x), F_batch_norm(layer.eval(), x))
    # Eval without running statistics normalizes with the batch's (ghost batches' here): refused.
    scripted = torch.jit.script(bt.BatchNorm2d(3, ghost_batch=2, track_running_stats=False).eval())
    with pytest.raises(Exception, match="call it in eval mode with running statistics"):
        scripted(x)


class _Functional(nn.Module):
    """A module calling the functions: bt.batch_norm, then bt.batch_norm_act with a residual."""

    def __init__(self, functions) -> None:
        super().__init__()
        self.bn, self.bn_act = functions
        self.weight, self.bias = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x, r: Optional[torch.Tensor] = None):
        y = self.bn(x, self.mean, self.var, self.weight, self.bias, self.training, 0.1, 1e-5)
        return self.bn_act(y, self.mean, self.var, self.weight, self.bias, self.training, 0.1, 1e-5, residual=r,
                           relu=True)


def _torch_batch_norm_act(x, mean, var, weight, bias, training: bool, momentum: float, eps: float,
                          residual: Optional[torch.Tensor] = None, relu: bool = True):
    y = torch.nn.functional.batch_norm(x, mean, var, weight, bias, training, momentum, eps)
    y = y if residual is None else y + residual
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("training", [True, False])
def test_the_functions_script_as_torchs(training):
    torch.manual_seed(11)
    ours = _Functional((bt.batch_norm, bt.batch_norm_act)).train(training)
    theirs = _Functional((torch.nn.functional.batch_norm, _torch_batch_norm_act)).train(training)
    theirs.load_state_dict(ours.state_dict())
    scripted, reference = torch.jit.script(ours), torch.jit.script(theirs)
    x, r = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(scripted(x, r), reference(x, r))
    assert torch.equal(scripted.mean, reference.mean) and torch.equal(scripted.var, reference.var)
    torch.testing.assert_close(scripted(x), ours(x))  # eager: our kernels


def test_saved_script_loads_without_batchnorm(tmp_path):
    import subprocess

    torch.manual_seed(9)
    model = bt.convert(_trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                                torch.randn(4, 3, 6, 6))).eval()
    x = torch.randn(2, 3, 6, 6)
    torch.jit.save(torch.jit.script(model), tmp_path / "m.pt")
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(tmp_path / 'm.pt')!r}); d = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "torch.testing.assert_close(m(d['x']), d['y'])\n"
        "assert not [k for k in sys.modules if k.startswith('batchnorm')]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
