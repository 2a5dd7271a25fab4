"""What torch.compile traces of batchnorm.torch: torch's own batch norm, which Inductor fuses
into its neighbours (and freezing folds into the convolution in inference), but for the
training variants and parameters torch refuses, which keep our ops (tagged flexible_layout:
Inductor's channels_last convolution outputs go in as they are). torch.export keeps our ops.
Values, gradients and running statistics against eager."""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="batchnorm.torch needs PyTorch")

import batchnorm.torch as bt  # noqa: E402
from batchnorm.torch.variants import batch_norm_variant  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from resnet import resnet18  # noqa: E402

# Inductor's own use of torch.jit warns in torch 2.13 (not ours; warnings are errors here).
pytestmark = [pytest.mark.torch,
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")]
nn = torch.nn
F = torch.nn.functional


def _traced(fn, *args):
    """fn compiled with fullgraph=True by a backend that records the call targets of the graph
    Dynamo hands it, then runs that graph: (output, targets)."""
    targets = []

    def backend(gm, inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)(*args), targets


def _ours(targets) -> list:
    return [t for t in targets if str(t).startswith("batchnorm.")]


def _with_stats(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in m.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.running_mean.normal_(generator=g)
                layer.running_var.uniform_(0.5, 2, generator=g)
                if layer.affine:
                    layer.weight.uniform_(0.5, 2, generator=g)
                    layer.bias.normal_(generator=g)
    return m


_EVAL_LAYERS = {
    "BatchNorm2d": lambda: bt.BatchNorm2d(6),
    "BatchNorm1d": lambda: bt.BatchNorm1d(6),
    "variants": lambda: bt.BatchNorm2d(6, renorm=(3.0, 5.0), skip_nonfinite=True, running_var_unbiased=False),
    "SyncBatchNorm": lambda: bt.SyncBatchNorm(6),
    "no affine": lambda: bt.BatchNorm2d(6, affine=False),
}


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(_EVAL_LAYERS))
def test_inference_traces_torchs_batch_norm(name, grad):
    m = _with_stats(_EVAL_LAYERS[name]()).eval()
    x = torch.randn(4, 6, 5, 3) if name != "BatchNorm1d" else torch.randn(4, 6)
    x.requires_grad_(grad)
    expected = copy.deepcopy(m)(x)
    with torch.set_grad_enabled(grad):
        y, targets = _traced(m, x)
    assert F.batch_norm in targets and not _ours(targets), targets
    torch.testing.assert_close(y, expected)
    if grad:
        xe = x.detach().clone().requires_grad_()
        copy.deepcopy(m)(xe).square().sum().backward()
        y.square().sum().backward()
        torch.testing.assert_close(x.grad, xe.grad)


@pytest.mark.parametrize("name", ["BatchNorm2d", "SyncBatchNorm", "no affine"])
def test_training_traces_torchs_batch_norm(name):
    m = _with_stats(_EVAL_LAYERS[name]()).train()
    expected = copy.deepcopy(m)
    x = torch.randn(4, 6, 5, 3, requires_grad=True)
    xe = x.detach().clone().requires_grad_()
    y, targets = _traced(m, x)
    assert F.batch_norm in targets and not _ours(targets), targets
    ye = expected(xe)
    torch.testing.assert_close(y, ye)
    y.square().sum().backward()
    ye.square().sum().backward()
    torch.testing.assert_close(x.grad, xe.grad)
    for (name, a), b in zip(m.named_buffers(), expected.buffers()):  # running statistics, batch count
        torch.testing.assert_close(a, b, msg=name)


def test_training_variants_keep_our_op():
    m = _with_stats(bt.BatchNorm2d(6, skip_nonfinite=True)).train()
    expected = copy.deepcopy(m)
    x = torch.randn(4, 6, 5, 3)
    y, targets = _traced(m, x)
    assert F.batch_norm not in targets and _ours(targets), targets
    torch.testing.assert_close(y, expected(x))
    torch.testing.assert_close(m.running_var, expected.running_var)


_CUMULATIVE = {
    "BatchNorm2d": lambda: bt.BatchNorm2d(6, momentum=None),
    "BatchNormAct2d": lambda: bt.BatchNormAct2d(6, momentum=None),
    "SyncBatchNorm": lambda: bt.SyncBatchNorm(6, momentum=None),
    "skip_nonfinite": lambda: bt.BatchNorm2d(6, momentum=None, skip_nonfinite=True),
    "renorm": lambda: bt.BatchNorm2d(6, momentum=None, renorm=(3.0, 5.0)),
}


@pytest.mark.parametrize("name", sorted(_CUMULATIVE))
def test_cumulative_average_compiles_once(name):
    # momentum=None read num_batches_tracked as a float: Dynamo broke the graph there and
    # recompiled for each count until its limit (8). Now one graph, fullgraph for the plain
    # layers; the variants run as a graph break each step, never recompiled.
    m = _with_stats(_CUMULATIVE[name]()).train()
    expected = copy.deepcopy(m)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    variant = name in ("skip_nonfinite", "renorm")
    compiled = torch.compile(m, backend=backend, fullgraph=not variant)
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        x = torch.randn(4, 6, 5, 3, generator=g)
        if step == 3 and variant:
            x[:, 1] = float("inf")  # a batch skip_nonfinite skips
        torch.testing.assert_close(compiled(x), expected(x), equal_nan=True)
        if step == 1:
            compiled_after_two = len(graphs)
    assert len(graphs) == compiled_after_two <= 2, [str(gm.graph) for gm in graphs]
    for (buffer, a), b in zip(m.named_buffers(), expected.buffers()):  # running statistics, batch count
        torch.testing.assert_close(a, b, msg=buffer, equal_nan=True)
    assert int(m.num_batches_tracked) == 6


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_batch_of_one_value_per_channel_is_refused_uncounted_when_compiled(momentum):
    # Dynamo traced the layer's test for an interrupted call (the running statistics' version)
    # in the refused call's error path as a data-dependent count, and counted the batch.
    m = bt.BatchNorm2d(4, momentum=momentum)
    compiled = torch.compile(m, backend="aot_eager")
    torch._dynamo.reset()
    compiled(torch.randn(4, 4, 3, 3))
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        compiled(torch.randn(1, 4, 1, 1))
    for name, value in m.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("layer", [bt.BatchNorm2d, bt.BatchNormAct2d])
def test_cumulative_average_counts_an_empty_batch_and_keeps_the_running_statistics(layer):
    # The fresh buffers an empty batch leaves at 0 were averaged in (running_mean halved; a
    # first empty batch set running_var to 0); compiled with dynamic shapes and exported with a
    # batch that may be 0.
    from torch.export import Dim

    batches = [torch.randn(0, 3, 5, 5), torch.randn(4, 3, 5, 5) + 3, torch.randn(0, 3, 5, 5), torch.randn(6, 3, 5, 5)]
    m = layer(3, momentum=None)
    eager, exported = copy.deepcopy(m), copy.deepcopy(m)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", dynamic=True)
    program = torch.export.export(exported, (batches[1],), dynamic_shapes=({0: Dim("b", min=0, max=64)},)).module()
    for x in batches:
        compiled(x), eager(x), program(x)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(m.state_dict()[name], value, msg=name)
        torch.testing.assert_close(program.state_dict()[name], value, msg=name)
    assert int(m.num_batches_tracked) == 4


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # (Dynamo's own, at a graph break)
@pytest.mark.parametrize("kind", ["0-d tensor", "numpy.float32"])
def test_momentum_and_eps_of_other_real_types_compile(kind):
    # Eagerly taken as torch's batch_norm takes them; compiled, our ops' float arguments
    # refused them (a FakeTensor), where torch's batch_norm compiles.
    import numpy as np

    make = torch.tensor if kind == "0-d tensor" else np.float32
    x = torch.randn(4, 3, 5, 3)
    for layer in (bt.BatchNorm2d(3, momentum=make(0.3), eps=make(1e-3)),
                  bt.BatchNorm2d(3, momentum=make(0.3), eps=make(1e-3), skip_nonfinite=True),
                  bt.BatchNormAct2d(3, momentum=make(0.3), eps=make(1e-3))):
        expected = copy.deepcopy(layer)
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager")
        for training in (True, False):
            layer.train(training), expected.train(training)
            torch.testing.assert_close(compiled(x), expected(x))
        torch.testing.assert_close(layer.running_var, expected.running_var)


def test_cumulative_average_takes_the_first_batch_over_non_finite_buffers():
    # The first batch weighs 1: eagerly it replaces whatever the buffers held (torch.empty's
    # NaN, to_empty()); compiled, 0 * Inf made NaN.
    m = bt.BatchNorm2d(3, momentum=None)
    with torch.no_grad():
        m.running_mean.fill_(float("nan"))
        m.running_var.fill_(float("inf"))
    expected = copy.deepcopy(m)
    x = torch.randn(4, 3, 2, 2)
    torch._dynamo.reset()
    torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    expected(x)
    torch.testing.assert_close(m.running_mean, expected.running_mean)
    torch.testing.assert_close(m.running_var, expected.running_var)
    assert torch.isfinite(m.running_var).all()


def test_export_of_a_training_variant_with_the_cumulative_average_fails_clearly():
    # Non-strict export compiles without Dynamo: the variants' disabled call recursed.
    m = bt.BatchNorm2d(3, momentum=None, skip_nonfinite=True)
    with pytest.raises(Exception) as info:
        torch.export.export(m, (torch.randn(4, 3, 2, 2),), strict=False)
    assert not isinstance(info.value, RecursionError) and "data-dependent" in str(info.value)
    assert int(m.num_batches_tracked) == 0


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_layer_traces_batch_norm_add_relu(residual, training):
    m = _with_stats(bt.BatchNormAct2d(6)).train(training)
    x = torch.randn(4, 6, 5, 3)
    r = torch.randn(4, 6, 5, 3) if residual else None
    expected = copy.deepcopy(m)
    y, targets = _traced(m, x, r)
    assert F.batch_norm in targets and not _ours(targets), targets
    torch.testing.assert_close(y, expected(x, r))
    torch.testing.assert_close(m.running_mean, expected.running_mean)


def test_fused_layer_refuses_a_broadcast_residual_when_compiled_as_eagerly():
    m = _with_stats(bt.BatchNormAct2d(6)).eval()
    x, r = torch.randn(4, 6, 5, 3), torch.randn(1, 6, 1, 1)
    with pytest.raises(ValueError, match="residual"):
        m(x, r)
    with pytest.raises(Exception, match="residual"):  # Dynamo wraps the op's error
        _traced(m, x, r)


def test_functions_trace_torchs_ops():
    x, rm, rv = torch.randn(4, 6, 5), torch.randn(6), torch.rand(6) + 0.5
    w, b, r = torch.randn(6), torch.randn(6), torch.randn(4, 6, 5)
    y, targets = _traced(lambda *a: bt.batch_norm(*a, training=False), x, rm, rv, w, b)
    assert F.batch_norm in targets and not _ours(targets)
    torch.testing.assert_close(y, bt.batch_norm(x, rm, rv, w, b))
    y, targets = _traced(lambda *a: bt.batch_norm_act(*a, training=False, residual=r), x, rm, rv, w, b)
    assert F.batch_norm in targets and not _ours(targets)
    torch.testing.assert_close(y, bt.batch_norm_act(x, rm, rv, w, b, training=False, residual=r))
    rm2, rv2 = rm.clone(), rv.clone()
    y, targets = _traced(lambda *a: bt.batch_norm(*a, training=True), x, rm, rv, w, b)
    assert F.batch_norm in targets and not _ours(targets)
    torch.testing.assert_close(y, bt.batch_norm(x, rm2, rv2, w, b, training=True))
    torch.testing.assert_close((rm, rv), (rm2, rv2))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("x_dtype, stats, params", [
    (torch.float32, torch.float64, torch.float64),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.bfloat16),  # one dtype for all, torch's CPU kernels say
])
def test_parameters_torch_refuses_keep_our_op(x_dtype, stats, params, training):
    # torch's batch norm takes parameters of one dtype, x's or float32 with a half x; ours any.
    x = torch.randn(4, 6, 5, dtype=x_dtype)
    rm, rv = torch.randn(6, dtype=stats), torch.rand(6, dtype=stats) + 0.5
    w, b = torch.rand(6, dtype=params) + 0.5, torch.randn(6, dtype=params)
    want = bt.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)
    y, targets = _traced(lambda *a: bt.batch_norm(*a, training=training), x, rm, rv, w, b)
    assert F.batch_norm not in targets and _ours(targets), targets
    torch.testing.assert_close(y, want)


def _bad(name):
    x, rm, rv, w, b = torch.randn(4, 6, 5), torch.zeros(6), torch.ones(6), torch.ones(6), torch.zeros(6)
    return {
        "momentum 1.5": ((x, rm, rv, w, b), dict(training=True, momentum=1.5), "momentum"),
        "momentum nan": ((x, rm, rv, w, b), dict(training=True, momentum=float("nan")), "momentum"),
        "eps inf": ((x, rm, rv, w, b), dict(training=False, eps=float("inf")), "eps"),
        "weight (1, 5)": ((x, rm, rv, w[:5].reshape(1, 5), b), dict(training=True), "weight"),
        "bias (5,)": ((x, rm, rv, w, b[:5]), dict(training=False), "bias"),
        "running_mean alone": ((x, rm, None, w, b), dict(training=True), "running"),
    }[name]


@pytest.mark.parametrize("name", ["momentum 1.5", "momentum nan", "eps inf", "weight (1, 5)", "bias (5,)",
                                  "running_mean alone"])
def test_arguments_eager_refuses_are_refused_when_compiled(name):
    # torch's batch norm would run on most of these (a NaN momentum, NaN running statistics):
    # they keep our op, whose checks raise the eager call's error when the graph runs.
    args, kwargs, word = _bad(name)
    with pytest.raises(ValueError, match=word):
        bt.batch_norm(*args, **kwargs)
    with pytest.raises(ValueError, match=word):
        _traced(lambda *a: bt.batch_norm(*a, **kwargs), *args)
    assert torch.equal(args[1], torch.zeros(6))  # nothing written


_OPS = torch.ops.batchnorm
_R = torch.zeros(5), torch.ones(5)
_NO_CHANNEL_AXIS = {  # each op and function, with arguments that keep our op under compile
    "batch_norm": lambda x: bt.batch_norm(x, *_R, training=True, momentum=1.5),
    "batch_norm_act": lambda x: bt.batch_norm_act(x, *_R, training=True, momentum=1.5),
    "forward_training": lambda x: _OPS.forward_training(x, None, None, None, None, 0.1, 1e-5),
    "forward_inference": lambda x: _OPS.forward_inference(x, *_R, None, None, 1e-5),
    "backward": lambda x: _OPS.backward(x, x, *_R, None),
    "forward_training_act": lambda x: _OPS.forward_training_act(x, x, None, None, None, None, 0.1, 1e-5, True),
    "forward_inference_act": lambda x: _OPS.forward_inference_act(x, x, *_R, None, None, 1e-5, True),
    "backward_act": lambda x: _OPS.backward_act(x, x, x, *_R, None, True, True),
    "forward_training_variant": lambda x: _OPS.forward_training_variant(x, None, None, None, None, 0.1, 1e-5,
                                                                        False, False, None, 2),
    "backward_variant": lambda x: _OPS.backward_variant(x, x, *_R, None, None, None, 2),
}


@pytest.mark.parametrize("name", ["BatchNorm2d", "BatchNormAct2d", "renorm", "ghost_batch", "eval"])
def test_x_of_other_channels_than_the_layer_is_refused_when_compiled_with_gradients(name):
    # Parameters of 3 channels, x of 4: the fake backward sized the parameter gradients by x,
    # and AOT autograd failed at compile time ("returned an invalid gradient at index 1").
    m = {"BatchNorm2d": lambda: bt.BatchNorm2d(3), "BatchNormAct2d": lambda: bt.BatchNormAct2d(3),
         "renorm": lambda: bt.BatchNorm2d(3, renorm=(2.0, 1.0)), "ghost_batch": lambda: bt.BatchNorm2d(3, ghost_batch=2),
         "eval": lambda: bt.BatchNorm2d(3).eval()}[name]()
    x = torch.randn(2, 4, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"must have shape \(4,\), got \(3,\)"):
        m(x)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"must have shape \(4,\), got \(3,\)"):
        torch.compile(m, backend="aot_eager")(x)
    assert int(m.num_batches_tracked) == 0


@pytest.mark.parametrize("shape", [(5,), (0,), ()])
@pytest.mark.parametrize("name", sorted(_NO_CHANNEL_AXIS))
def test_x_without_a_channel_axis_is_refused_by_name_when_compiled(name, shape):
    # The fake kernels, traced first, took x.shape[1] (an IndexError at trace time); torch's
    # size check took x.shape[0] of a 0-d x; an empty 1-D x passed as an empty batch.
    call, x = _NO_CHANNEL_AXIS[name], torch.randn(shape)
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        call(x)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        torch.compile(call, backend="aot_eager", dynamic=False)(x)


@pytest.mark.parametrize("variant", [False, True])
def test_one_tensor_as_both_running_statistics_is_refused(variant):
    # The ops return updated copies, written back one after the other: with one tensor for
    # both, the second write silently won (compiled, and the variants eagerly).
    x, r = torch.randn(4, 6, 5), torch.ones(6)
    kwargs = dict(skip_nonfinite=True) if variant else {}
    call = (lambda *a: batch_norm_variant(*a, **kwargs)) if variant else (lambda *a: bt.batch_norm(*a, training=True))
    with pytest.raises(ValueError, match="must not share memory"):
        call(x, r, r)
    with pytest.raises(Exception, match="must not share memory"):  # fullgraph: Dynamo's Unsupported says it
        _traced(call, x, r, r)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="must not share memory"):  # else a graph break, the eager call's error
        torch.compile(call)(x, r, r)
    assert torch.equal(r, torch.ones(6))


def test_layer_with_a_bad_momentum_is_refused_when_compiled():
    m = bt.BatchNorm2d(6, momentum=1.5).train()
    x = torch.randn(4, 6, 5, 3)
    with pytest.raises(ValueError, match="momentum"):
        m(x)
    with pytest.raises(ValueError, match="momentum"):
        _traced(m, x)
    assert torch.equal(m.running_mean, torch.zeros(6)) and int(m.num_batches_tracked) == 0


def test_half_input_with_float32_parameters_traces_torchs():
    x = torch.randn(4, 6, 5, dtype=torch.bfloat16)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    y, targets = _traced(lambda *a: bt.batch_norm(*a, training=False), x, rm, rv)
    assert F.batch_norm in targets and not _ours(targets), targets
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, bt.batch_norm(x, rm, rv))


@pytest.mark.parametrize("strict", [False, True])
def test_export_keeps_our_ops_in_inference(strict):
    m = _with_stats(bt.BatchNorm2d(6)).eval()
    ep = torch.export.export(m, (torch.randn(4, 6, 5, 3),), strict=strict)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any(t.startswith("batchnorm.forward_inference") for t in targets), targets


@pytest.mark.slow
@pytest.mark.parametrize("freezing", [False, True])
def test_inductor_inference_of_a_resnet_matches_eager(freezing):
    torch.manual_seed(0)
    model = _with_stats(bt.convert(resnet18(10))).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(freezing=freezing):
        y = torch.compile(model)(x)
        expected = model(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_inductor_hands_our_ops_the_convolutions_layout():
    # The ops are tagged flexible_layout: Inductor, which runs the convolutions channels_last,
    # passes their output as it is, where it copied it to the traced (NCHW) strides first.
    # (A training variant: plain batch norm is torch's under torch.compile.)
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    layer = bt.BatchNorm2d(8, skip_nonfinite=True)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), layer, nn.ReLU(), nn.Conv2d(8, 8, 3)).train()
    x = torch.randn(2, 4, 8, 8)
    torch._dynamo.reset()
    # (Not from a cache: Inductor's cache keys do not cover an op's tags.)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        y, codes = run_and_get_code(torch.compile(model), x)
    forward = next(c for c in codes if "batchnorm.forward_training_variant" in c)
    call = re.search(r"torch\.ops\.batchnorm\.forward_training_variant\.default\((\w+),", forward)
    assert call, forward
    assert re.search(rf"\b{call.group(1)} = extern_kernels\.convolution\(", forward), forward
    assert torch.allclose(y, copy.deepcopy(model)(x), rtol=1e-4, atol=1e-5)
