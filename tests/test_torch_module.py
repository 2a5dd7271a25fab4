"""batchnorm.torch against torch.nn: the layers' semantics (train/eval, momentum=None,
track_running_stats=False, affine=False, bias=False, empty batches, input errors,
num_batches_tracked, device=/dtype=), convert(), the ops' opcheck / gradcheck in float64,
torch.compile(fullgraph=True), and the ImportError without torch."""
from __future__ import annotations

import copy
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="batchnorm.torch needs PyTorch")

import batchnorm  # noqa: E402
import batchnorm.torch as bt  # noqa: E402

pytestmark = pytest.mark.torch

# CUDA runs need a GPU, a CUDA build of torch and a CUDA build of batchnorm.
HAVE_CUDA = torch.cuda.is_available() and batchnorm.info()["cuda"]["available"]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA")])]

nn, ops = torch.nn, torch.ops.batchnorm
TORCH_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OUR_CLASSES = {1: bt.BatchNorm1d, 2: bt.BatchNorm2d, 3: bt.BatchNorm3d}
SHAPES = {1: [(6, 5), (6, 5, 7)], 2: [(4, 5, 6, 7)], 3: [(3, 5, 4, 3, 5)]}
# max |ours - torch's| / max |torch's|, by dtype: a few ulps of each, as one layer's sums are
# ordered differently; half types round y to 8 or 11 bits.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def pair(dim, *args, **kwargs):
    torch.manual_seed(0)
    theirs = TORCH_CLASSES[dim](*args, **kwargs)  # device= in kwargs places both
    if theirs.weight is not None:  # parameters away from 1 and 0
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            if theirs.bias is not None:
                theirs.bias.uniform_(-0.5, 0.5)
    ours = OUR_CLASSES[dim](*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def run(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [p.grad for p in (module.weight, module.bias) if p is not None]
    return [y, x.grad, *grads]


def compare(ours, theirs, x, steps=3, rtol=None):
    """Forward + backward `steps` times, then eval: outputs, gradients, buffers all match."""
    rtol = rtol or RTOL[x.dtype]
    for i in range(steps + 1):
        if i == steps:
            ours.eval(), theirs.eval()
        dy = torch.randn_like(x)
        got, want = run(ours, x, dy), run(theirs, x, dy)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert rel_err(a, b) < rtol
        assert got[0].stride() == want[0].stride()
        for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
            assert rel_err(a, b) < rtol if a.is_floating_point() else torch.equal(a, b), name
        for p in (*ours.parameters(), *theirs.parameters()):
            p.grad = None
        x = x * 1.5 + 0.25  # new batch statistics each step


# ---- the layers against torch.nn's ----------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}, {"bias": False}, {"eps": 1e-3, "momentum": 0.3}],
    ids=["default", "momentum_none", "untracked", "no_affine", "no_bias", "eps_momentum"],
)
def test_layers_match_torch(dim, kwargs):
    for shape in SHAPES[dim]:
        ours, theirs = pair(dim, shape[1], dtype=torch.float64, **kwargs)
        compare(ours, theirs, torch.randn(shape, dtype=torch.float64) * 2 + 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dtypes_and_memory_formats(device, dtype, channels_last):
    for dim in (2, 3):
        fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dim] if channels_last else torch.contiguous_format
        ours, theirs = pair(dim, 5, dtype=dtype, device=device)
        x = torch.randn(SHAPES[dim][0], dtype=torch.float64).to(device, dtype).contiguous(memory_format=fmt)
        compare(ours, theirs, x)
        assert ours(x).is_contiguous(memory_format=fmt)


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA")
def test_cuda_side_stream_and_graph_capture():
    ours, theirs = pair(2, 8, device="cuda")
    x = torch.randn(16, 8, 12, 12, device="cuda").contiguous(memory_format=torch.channels_last)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the kernels run on torch's current stream: this one
        compare(ours, theirs, x)
    torch.cuda.current_stream().wait_stream(side)
    # Outputs come from torch's caching allocator and work is enqueued on the capturing
    # stream, so a CUDA graph can capture a training forward and backward.
    ours.train(), theirs.train()
    static_x = x.clone().requires_grad_()
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up on the side stream, as torch's docs ask
            ours(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = ours(static_x)
        static_y.sum().backward()
    static_x.data.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    theirs.load_state_dict(ours.state_dict())
    assert rel_err(static_y, theirs(x * 2)) < RTOL[torch.float32]


def test_float32_parameters_with_half_input():
    ours, theirs = pair(2, 5)  # float32 parameters and buffers, float16 x (as under autocast)
    compare(ours, theirs, torch.randn(4, 5, 3, 3).half(), rtol=RTOL[torch.float16])


def test_strided_input():
    ours, theirs = pair(2, 5, dtype=torch.float64)
    x = torch.randn(4, 10, 6, 9, dtype=torch.float64)[:, ::2, :, ::3]  # neither layout
    compare(ours, theirs, x)


def test_is_a_torch_batch_norm_with_torch_state():
    ours, theirs = pair(2, 7)
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert repr(ours).endswith(repr(theirs)[len("BatchNorm2d"):])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    theirs.load_state_dict(ours.state_dict())  # both ways
    assert ours.train() is ours and ours.eval() is ours


def test_num_batches_tracked_and_eval_without_running_statistics():
    ours, theirs = pair(2, 3, momentum=None)
    x = torch.randn(4, 3, 2, 2)
    for _ in range(4):
        ours(x), theirs(x)
    assert int(ours.num_batches_tracked) == 4 == int(theirs.num_batches_tracked)
    ours, theirs = pair(2, 3, track_running_stats=False)
    ours.eval(), theirs.eval()  # batch statistics in eval too
    assert rel_err(ours(x), theirs(x)) < RTOL[torch.float32]
    assert ours.running_mean is None and ours.num_batches_tracked is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(training):
    ours, theirs = pair(2, 3)
    ours.train(training), theirs.train(training)
    x = torch.randn(0, 3, 4, 4)
    got, want = run(ours, x, torch.randn_like(x)), run(theirs, x, torch.randn_like(x))
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)  # empty y and dx, zero gradients
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
        assert torch.equal(a, b), name  # running statistics untouched, num_batches_tracked + 1


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_input_errors_are_torch_errors(dim):
    bad = [torch.randn(*([2] * rank)) for rank in range(1, 7) if not (rank - 2 in (0, 1) if dim == 1 else rank == dim + 2)]
    bad.append(torch.randn(1, 4) if dim == 1 else torch.randn(1, 4, *([1] * dim)))  # one value per channel
    for x in bad:
        errors = []
        for cls in (OUR_CLASSES[dim], TORCH_CLASSES[dim]):
            with pytest.raises(Exception) as info:
                cls(x.shape[1] if x.dim() > 1 else 2)(x)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1]


def test_device_and_dtype_arguments():
    m = bt.BatchNorm2d(4, device="cpu", dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in (m.weight, m.bias, m.running_mean, m.running_var))
    assert m.num_batches_tracked.dtype == torch.long
    meta = bt.BatchNorm3d(4, device="meta")
    assert meta.weight.device.type == "meta"
    y = meta(torch.empty(2, 4, 3, 3, 3, device="meta"))  # the fake kernels serve the meta device
    assert y.shape == (2, 4, 3, 3, 3) and y.device.type == "meta"
    m.to(torch.float32)
    assert m.weight.dtype == torch.float32


def test_functional_batch_norm_is_torch_s():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    their_stats = [s.clone() for s in stats]
    y = bt.batch_norm(x, *stats, w, b, training=True, momentum=0.2)
    want = torch.nn.functional.batch_norm(x, *their_stats, w, b, training=True, momentum=0.2)
    assert rel_err(y, want) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(stats, their_stats))
    y = bt.batch_norm(x, *stats, w, b)
    assert rel_err(y, torch.nn.functional.batch_norm(x, *their_stats, w, b)) < 1e-12


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shapes", [((1, 3), (3, 1)), ((3, 1, 1), (1, 3, 1))], ids=["2d", "3d"])
def test_functional_batch_norm_takes_weight_and_bias_of_any_shape_with_c_elements(shapes, training):
    """As torch's forward: weight and bias need C elements, not the shape (C,). Their gradients
    come back in their own shapes (torch's backward raises there: "TensorAccessor expected 1
    dims", so its reference gets (C,) views of them). Other sizes are refused naming the shape
    given."""
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    ours = [torch.rand(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    x2 = x.detach().clone().requires_grad_()
    stats, their_stats = ([torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)] for _ in "ab")
    y = bt.batch_norm(x, *stats, *ours, training=training)
    with torch.no_grad():  # torch's own forward takes them as they are
        assert rel_err(y, torch.nn.functional.batch_norm(x, *[s.clone() for s in their_stats], *theirs,
                                                         training=training)) < 1e-12
    want = torch.nn.functional.batch_norm(x2, *their_stats, *[t.reshape(-1) for t in theirs], training=training)
    assert rel_err(y, want) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(stats, their_stats))
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    for got, ref in zip([x, *ours], [x2, *theirs]):
        assert got.grad.shape == ref.grad.shape and rel_err(got.grad, ref.grad) < 1e-12
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\), got \(2, 3\)"):
        bt.batch_norm(x.detach(), *stats, torch.ones(2, 3, dtype=torch.float64), training=training)


# ---- convert --------------------------------------------------------------------------------


def test_convert_keeps_parameters_buffers_and_modes():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(1), nn.BatchNorm1d(4 * 36, affine=False)),
        nn.SyncBatchNorm(5),
    )
    model[1].weight.requires_grad_(False)
    model[2][1].eval()
    model.double()
    originals = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    converted = bt.convert(model)
    assert converted is model
    assert type(model[1]) is bt.BatchNorm2d and type(model[2][1]) is bt.BatchNorm1d
    assert type(model[3]) is bt.SyncBatchNorm  # torch's SyncBatchNorm becomes ours, still synchronized
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t is originals[n], n  # the same objects: optimizers keep working
    assert not model[1].weight.requires_grad and model[1].training and not model[2][1].training
    assert model[2][1].weight is None and model[1].eps == 1e-5
    top = nn.BatchNorm3d(2, momentum=None, bias=False)
    new = bt.convert(top)
    assert type(new) is bt.BatchNorm3d and new.momentum is None and new.bias is None and new.weight is top.weight


def test_convert_errors():
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup or None, got int"):
        bt.convert(nn.BatchNorm2d(3), sync=True, process_group=3)
    with pytest.raises(TypeError, match="sync must be a bool, got str"):
        bt.convert(nn.BatchNorm2d(3), sync="yes")
    with pytest.raises(ValueError, match="process_group applies only with sync=True"):
        bt.convert(nn.BatchNorm2d(3), process_group=object())
    with pytest.raises(TypeError, match="positional"):
        bt.convert(nn.BatchNorm2d(3), False)  # keyword-only, as in API.md
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got int"):
        bt.convert(3)


def test_convert_sync_refuses_what_it_cannot_synchronize_before_changing_anything():
    """sync=True would drop a variant layer's options or BatchNormAct2d's activation: a
    ValueError naming the layer, the model untouched; a user's subclass of torch's layer is
    left as it is, with a warning (it may have its own forward)."""
    class Mine(nn.BatchNorm2d):
        pass

    for layer, match in ((bt.BatchNorm2d(4, skip_nonfinite=True, running_var_unbiased=False),
                          r"1.0 \(BatchNorm2d\) has skip_nonfinite=True, running_var_unbiased=False"),
                         (bt.BatchNorm2d(4, renorm=(3, 5)), r"renorm=\(3.0, 5.0\)"),
                         (bt.BatchNormAct2d(4), r"1.0 is a BatchNormAct2d, which has no synchronized form")):
        model = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(layer))
        with pytest.raises(ValueError, match=match):
            bt.convert(model, sync=True)
        assert type(model[0]) is nn.BatchNorm2d and model[1][0] is layer  # nothing replaced
    model = nn.Sequential(nn.BatchNorm2d(4), Mine(4))
    with pytest.warns(UserWarning, match=r"leaves 1 \(Mine, a subclass .*\) unsynchronized"):
        bt.convert(model, sync=True)
    assert type(model[0]) is bt.SyncBatchNorm and type(model[1]) is Mine
    assert type(bt.convert(nn.Sequential(bt.BatchNormAct2d(4)))[0]) is bt.BatchNormAct2d  # sync=False: as it is


@pytest.mark.parametrize("sync", [False, True])
def test_convert_keeps_hooks_attributes_and_attached_modules(sync):
    """A layer's hooks fire on its replacement with the replacement as their module, and the
    handles taken on the old layer remove them (torch's convert_sync_batchnorm drops hooks);
    attributes set on it and modules attached to it stay."""
    layer = nn.BatchNorm2d(3)
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(("pre", m)))
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(("post", m)))
    layer.register_forward_hook(lambda m, args, kwargs, out: seen.append(("kwargs", m)), with_kwargs=True)
    layer.register_full_backward_hook(lambda m, gin, gout: seen.append(("backward", m)))
    layer.register_state_dict_post_hook(lambda m, sd, prefix, local: sd.__setitem__(prefix + "tag", m.tag))
    layer.tag = "mine"
    layer.observer = nn.Identity()
    model = bt.convert(nn.Sequential(layer), sync=sync)
    new = model[0]
    assert type(new) is (bt.SyncBatchNorm if sync else bt.BatchNorm2d)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    model(x).sum().backward()
    assert seen == [("pre", new), ("post", new), ("kwargs", new), ("backward", new)]
    assert model.state_dict()["0.tag"] == "mine" and new.observer is layer.observer
    handle.remove()
    seen.clear()
    model(x)
    assert [kind for kind, _ in seen] == ["pre", "kwargs"]


_PRE_HOOK_SEEN: list = []


def _record_pre_hook(module, *args):  # (a module-level function: the model is pickled)
    _PRE_HOOK_SEEN.append(type(module))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # (Dynamo's import)
def test_convert_rebinds_hooks_kept_with_their_module_and_leaves_the_old_layers_code():
    # register_load_state_dict_pre_hook keeps a weak reference to its module: after the old
    # layer was collected, load_state_dict, deepcopy and pickle raised "dead Module". An
    # instance forward (a wrapper's) or Module.compile()'s call belong to the old layer: carried
    # over, the new layer ran torch's forward.
    import gc
    import pickle

    seen = _PRE_HOOK_SEEN
    seen.clear()
    model = nn.Sequential(nn.BatchNorm2d(3))
    model[0].register_load_state_dict_pre_hook(_record_pre_hook)
    old_forward = model[0].forward
    model[0].forward = lambda x: old_forward(x)  # a wrapper around the old layer's forward
    model[0].compile()
    bt.convert(model)
    gc.collect()
    model.load_state_dict(model.state_dict())
    assert seen == [bt.BatchNorm2d]
    copy.deepcopy(model).load_state_dict(model.state_dict())
    pickle.loads(pickle.dumps(model)).load_state_dict(model.state_dict())
    assert seen == [bt.BatchNorm2d] * 3
    assert "forward" not in vars(model[0]) and model[0]._compiled_call_impl is None
    model[0].skip_nonfinite = True  # ours runs: the Inf batch leaves the running statistics
    model(torch.full((2, 3, 2, 2), float("inf")))
    assert torch.equal(model[0].running_mean, torch.zeros(3))


@pytest.mark.parametrize("sync", [False, True])
def test_convert_keeps_a_shared_layer_one_layer(sync):
    """A layer registered under two names (here and in a nested module) is replaced by one
    layer everywhere, as one object it was."""
    shared = nn.BatchNorm2d(3)
    inner = nn.Sequential(shared)
    model = nn.Module()
    model.a, model.b, model.inner = shared, shared, inner
    bt.convert(model, sync=sync)
    assert type(model.a) is (bt.SyncBatchNorm if sync else bt.BatchNorm2d)
    assert model.a is model.b is model.inner[0]


# ---- the ops: opcheck, gradcheck, compile -----------------------------------------------------


def op_cases(dtype):
    g = torch.Generator().manual_seed(0)
    for shape, fmt in [((4, 3, 5, 5), torch.channels_last), ((4, 3, 5, 5), torch.contiguous_format), ((6, 3), None)]:
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        w = torch.rand(3, generator=g, dtype=torch.float64).to(dtype) + 0.5
        b = torch.randn(3, generator=g, dtype=torch.float64).to(dtype)
        yield x, w, b


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_every_op(dtype):
    for x, w, b in op_cases(dtype):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
        cases = [
            (ops.forward_training.default, (xg, wg, bg, rm, rv, 0.1, 1e-5)),
            (ops.forward_training.default, (xg, None, None, None, None, 0.1, 1e-5)),
            (ops.forward_inference.default, (xg, rm + 0.5, rv * 2, wg, bg, 1e-5)),
            (ops.forward_inference.default, (x, rm, rv, None, None, 1e-3)),
        ]
        _, mean, invstd, _, _ = ops.forward_training(x, w, b, None, None, 0.1, 1e-5)
        cases.append((ops.backward.default, (torch.randn_like(x), x, mean, invstd, w)))
        cases.append((ops.backward.default, (torch.randn_like(x), x, mean, invstd, w, False)))
        for op, args in cases:
            result = torch.library.opcheck(op, args)
            assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_parameter_gradients_alone(dtype):
    # backward(..., input_grad=False) runs the parameter gradients' reduction alone, with an
    # empty dx; autograd takes it when x needs no gradient (a frozen input, inference). The
    # same bits as the full backward when dy and x share a memory format; with channels_last x
    # and contiguous dy the full backward's walk also counts dx's format, and the two reduce in
    # different orders ((8, 5, 4, 3) float64: 7e-15 apart).
    g = torch.Generator().manual_seed(1)
    cases = list(op_cases(dtype))
    big = (torch.randn(8, 5, 4, 3, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    w5, b5 = cases[0][1][:1].repeat(5), cases[0][2][:1].repeat(5)
    cases += [(big, w5, b5), (big.contiguous(memory_format=torch.channels_last), w5, b5)]
    for x, w, b in cases:
        C = x.shape[1]
        w, b = w.float(), b.float()
        _, mean, invstd, _, _ = ops.forward_training(x, w, b, None, None, 0.1, 1e-5)
        for dy in (torch.randn(x.shape, generator=g).to(dtype), torch.randn(x.shape, generator=g).to(dtype).contiguous()):
            if dy.stride() != x.stride() and dy.is_contiguous() and x.dim() == 4:
                dy_like_x = dy.contiguous(memory_format=torch.channels_last) if not x.is_contiguous() else dy
            else:
                dy_like_x = dy
            same = dy_like_x.stride() == dy.stride()
            full = ops.backward(dy, x, mean, invstd, w)
            alone = ops.backward(dy, x, mean, invstd, w, False)
            assert alone[0].shape == (0,)
            for a, f in zip(alone[1:], full[1:]):
                assert torch.equal(a, f) if same else rel_err(a, f) < 1e-5
        for training in (True, False):
            m = (bt.BatchNorm2d(C) if x.dim() == 4 else bt.BatchNorm1d(C)).train(training)
            with torch.no_grad():
                m.weight.copy_(w), m.bias.copy_(b), m.running_mean.copy_(mean), m.running_var.copy_(invstd ** -2 - 1e-5)
            dy = torch.empty_like(x).copy_(torch.randn(x.shape, generator=g))  # in x's format
            (m(x).float() * dy.float()).sum().backward()  # x needs no gradient
            grads = (m.weight.grad, m.bias.grad)
            m.zero_grad()
            (m(x.clone().requires_grad_()).float() * dy.float()).sum().backward()
            for a, f in zip(grads, (m.weight.grad, m.bias.grad)):
                assert torch.equal(a, f)


@pytest.mark.slow
def test_gradcheck_float64():
    for x, w, b in op_cases(torch.float64):
        args = tuple(t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
        assert torch.autograd.gradcheck(lambda x, w, b: ops.forward_training(x, w, b, None, None, 0.1, 1e-5)[0], args)
        assert torch.autograd.gradcheck(lambda x, w, b: ops.forward_inference(x, rm, rv, w, b, 1e-5), args)
        m = bt.BatchNorm2d(3, dtype=torch.float64) if x.dim() == 4 else bt.BatchNorm1d(3, dtype=torch.float64)
        assert torch.autograd.gradcheck(m, args[:1])  # through the layer, running statistics updated


# Inductor's own use of torch.jit warns in torch 2.13 (not ours; warnings are errors here).
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = bt.convert(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ).to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    x = torch.randn(4, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        y, want = compiled(x), eager(x)
        y.square().sum().backward()
        want.square().sum().backward()
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(y, want) < 1e-5
        # torch.compile runs torch's batch norm (test_torch_compile), whose backward sums in
        # another order: the gradients within 1e-3 of the largest (the first convolution's come
        # through batch norm's cancellations; its bias's are zero up to rounding).
        scale = max(float(p.grad.abs().max()) for p in eager.parameters())
        for (name, a), b in zip(model.named_parameters(), eager.parameters()):
            assert float((a.grad - b.grad).abs().max()) <= 1e-3 * scale, name
        for (name, a), b in zip(model.named_buffers(), eager.buffers()):
            assert rel_err(a, b) < 1e-5 if a.is_floating_point() else torch.equal(a, b), name
    model.eval(), eager.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), eager(x)) < 1e-5


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(6,), (0,)])
def test_x_without_a_channel_axis_is_a_value_error(shape, training):
    # (Training raised an IndexError from the layer's own shape lookup before the core's check.)
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        bt.batch_norm(torch.randn(*shape), torch.zeros(6), torch.ones(6), training=training)


# ---- eager calls skip the registered ops ----------------------------------------------------


def _step(m, x, dy):
    """A training step's outputs, gradients and buffers; in eval, inference without autograd."""
    if not m.training:
        with torch.no_grad():
            return [m(x), m.running_mean, m.running_var]
    x = x.clone().requires_grad_()
    y = m(x)
    y.backward(dy)
    return [y, x.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var, m.num_batches_tracked]


def _bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_calls_give_the_bits_of_the_registered_ops(monkeypatch, dtype, channels_last, training):
    # The layers call the kernels directly in eager mode (an autograd.Function in training,
    # inference when no gradient is wanted); forced onto the registered ops they must give the
    # same bits: outputs, gradients, buffers.
    import batchnorm.torch._ops as _ops

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 5, 4, 3, generator=g) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(6, 5, 4, 3, generator=g).to(dtype)
    m = bt.BatchNorm2d(5, dtype=dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2, generator=g), m.bias.normal_(generator=g)
        m.running_mean.normal_(generator=g), m.running_var.uniform_(0.5, 2, generator=g)
    m.train(training)
    m_ops = copy.deepcopy(m)
    calls = []
    real = _ops.eager
    monkeypatch.setattr(_ops, "eager", lambda *t: calls.append(real(*t)) or calls[-1])
    fast = _step(m, x, dy)
    assert calls == [True], calls  # this step took the eager call
    monkeypatch.setattr(_ops, "eager", lambda *t: False)
    slow = _step(m_ops, x, dy)
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var", "batches"] if training else \
        ["y", "running_mean", "running_var"]
    for name, a, b in zip(names, fast, slow, strict=True):
        assert _bits(a) == _bits(b), name


def test_eager_training_bumps_buffer_versions():
    m = bt.BatchNorm2d(3)
    v0 = (m.running_mean._version, m.running_var._version)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    m(x)
    assert m.running_mean._version > v0[0] and m.running_var._version > v0[1]  # as an in-place op would


def test_eager_training_takes_a_tensor_leaked_from_a_transform():
    """A tensor kept from inside torch.func.grad is a wrapper whose level has exited: the eager
    call (which skips torch's Function.apply wrapper) unwraps it as that wrapper does, instead
    of handing the core a tensor without storage."""
    leaked = []
    torch.func.grad(lambda x: leaked.append(x) or (x * x).sum())(torch.randn(4, 3, 2, 2))
    x = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(x)
    ours, theirs = bt.BatchNorm2d(3), nn.BatchNorm2d(3)
    y, y_ref = ours(x), theirs(x)
    torch.testing.assert_close(y, y_ref)
    (y * y).sum().backward()
    (y_ref * y_ref).sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    # The fused op's eager call, on a leaked input and residual.
    r = leaked[0] * 0.5
    y = bt.batch_norm_act(x, None, None, ours.weight, ours.bias, True, residual=r)
    torch.testing.assert_close(y, torch.relu(nn.functional.batch_norm(x, None, None, ours.weight, ours.bias, True) + r))


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("call", ["batch_norm", "batch_norm_act", "variant", "module"])
def test_running_statistics_that_require_grad_are_refused(call, training):
    """As torch's batch_norm refuses them (not differentiable in the running statistics):
    a ValueError before anything is written; under no_grad they are plain buffers."""
    if call == "variant" and not training:
        pytest.skip("the variants are training-only")
    x = torch.randn(4, 3, 2, 2)
    for name in ("running_mean", "running_var"):
        rm, rv = torch.zeros(3), torch.ones(3)
        (rm if name == "running_mean" else rv).requires_grad_()

        def f():
            if call == "batch_norm":
                return bt.batch_norm(x, rm, rv, training=training)
            if call == "batch_norm_act":
                return bt.batch_norm_act(x, rm, rv, training=training)
            if call == "variant":
                return bt.variants.batch_norm_variant(x, rm, rv, ghost_batch=2)
            m = bt.BatchNorm2d(3).train(training)
            m.running_mean, m.running_var = rm, rv
            return m(x)

        with pytest.raises(ValueError, match=f"{name} must not require grad .* got requires_grad=True"):
            f()
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
        with torch.no_grad():
            f()
        if training:
            assert not torch.equal(rm, torch.zeros(3)) and not torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("call", ["batch_norm", "batch_norm_act", "variant", "module"])
def test_eps_rules_are_torch_s(call, training):
    """torch.nn.functional.batch_norm's: eps > 0 in training, >= 0 otherwise, its ValueErrors
    (eps 0 gave NaN on a constant channel), nothing written."""
    if call == "variant" and not training:
        pytest.skip("the variants are training-only")
    x = torch.randn(4, 3, 2, 2)
    x[:, 1] = 5.0
    for eps in ([0.0, -1e-5] if training else [-1e-5]):
        rm, rv = torch.zeros(3), torch.ones(3)

        def f(layer):
            if call == "batch_norm":
                return layer(x, rm, rv, training=training, eps=eps)
            if call == "batch_norm_act":
                return bt.batch_norm_act(x, rm, rv, training=training, eps=eps)
            if call == "variant":
                return bt.variants.batch_norm_variant(x, rm, rv, eps=eps, ghost_batch=2)
            m = (bt.BatchNorm2d if layer is bt.batch_norm else nn.BatchNorm2d)(3, eps=eps).train(training)
            return m(x)

        with pytest.raises(ValueError) as theirs:
            f(nn.functional.batch_norm)
        with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
            f(bt.batch_norm)
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    if not training:  # eps 0 is fine in eval (the running variances are 1)
        eps = 0.0
        assert torch.isfinite(f(bt.batch_norm)).all()


@pytest.mark.parametrize("grad", [False, True], ids=["eager", "autograd"])
@pytest.mark.parametrize("call", ["batch_norm", "batch_norm_act", "module"])
def test_inference_errors_name_the_running_statistics(call, grad):
    """Inference normalizes with the running statistics: its errors name them running_mean and
    running_var, the caller's names, not the inference op's mean and var."""
    x = torch.randn(4, 3, 2, 2, requires_grad=grad)
    bad = [
        (torch.zeros(4), torch.ones(3), ValueError, r"^running_mean must have shape \(3,\), got \(4,\)"),
        (torch.zeros(3), torch.ones(3, 2), ValueError, r"^running_var must have shape \(3,\), got \(3, 2\)"),
        (torch.zeros(3, dtype=torch.int32), torch.ones(3), TypeError, r"^running_mean must "),
    ]
    for rm, rv, error, words in bad:
        if call == "batch_norm":
            f = lambda: bt.batch_norm(x, rm, rv, training=False)  # noqa: E731
        elif call == "batch_norm_act":
            f = lambda: bt.batch_norm_act(x, rm, rv, training=False)  # noqa: E731
        else:
            m = bt.BatchNorm2d(3).eval()
            m.running_mean, m.running_var = rm, rv
            f = lambda: m(x)  # noqa: E731
        with pytest.raises(error, match=words) as e:
            f()
        assert " mean " not in f" {e.value} " and " var " not in f" {e.value} ", str(e.value)


def test_eager_call_conditions():
    import batchnorm.torch._ops as _ops

    x = torch.randn(2, 3)
    assert _ops.eager(x, nn.Parameter(torch.ones(3)), None)
    assert not _ops.eager(torch.empty(2, 3, device="meta"))
    assert not _ops.eager(x.as_subclass(type("Sub", (torch.Tensor,), {})))
    assert not torch.func.vmap(lambda t: torch.tensor(_ops.eager(t)))(torch.randn(2, 3)).any()
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    with FakeTensorMode() as mode:
        assert not _ops.eager(mode.from_tensor(x))

    class Dispatch(TorchDispatchMode):  # as make_fx or FlopCounterMode: plain tensors, a mode
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Function(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    for mode in (Dispatch(), Function()):
        with mode:
            assert not _ops.eager(x), type(mode).__name__
    assert _ops.eager(x)


# ---- packaging ------------------------------------------------------------------------------


def test_import_without_torch_is_a_clear_import_error():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
        "import batchnorm\n"
        "try:\n    import batchnorm.torch\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "batchnorm.torch needs PyTorch" in out and "pip install 'batchnorm[torch]'" in out


def test_import_batchnorm_does_not_import_torch():
    code = "import sys, batchnorm; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("make, bad", [
    (lambda: bt.BatchNorm2d(3, momentum=None), lambda: torch.randn(1, 3, 1, 1)),  # one value per channel
    (lambda: bt.BatchNorm2d(3, momentum=None, ghost_batch=2), lambda: torch.randn(3, 3, 2, 2)),  # 2 does not divide 3
    (lambda: bt.BatchNormAct2d(3, momentum=None), lambda: torch.randn(1, 3, 1, 1)),
], ids=["plain", "ghost", "norm_act"])
def test_a_rejected_batch_leaves_the_layer_as_it_was(make, bad):
    """num_batches_tracked counts a batch once it has run (torch's layer counts it first, so its
    cumulative average, momentum=None, is off by one batch after a rejected one)."""
    layer, twin = make(), make()
    with pytest.raises(ValueError):
        layer(bad())
    assert int(layer.num_batches_tracked) == 0
    x = torch.randn(4, 3, 2, 2)
    layer(x), twin(x)
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name], value, rtol=0, atol=0, msg=name)
    theirs = nn.BatchNorm2d(3, momentum=None)
    theirs(x)
    torch.testing.assert_close(layer.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [lambda: bt.BatchNorm2d(3, momentum=None), lambda: bt.BatchNormAct2d(3, momentum=None)],
                         ids=["plain", "norm_act"])
def test_activation_checkpointing_counts_each_update_like_torch(make):
    """torch.utils.checkpoint (use_reentrant=False) stops the recomputed forward with an
    exception once autograd has saved the layer's tensors: after the running statistics were
    updated, before the count after the call. torch's layer, counting first, counts both.
    (The training variants, through the registered op, write their statistics back after
    autograd's save: there the stopped recomputation neither updates nor counts.)"""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, momentum=None))
    ours = copy.deepcopy(theirs)
    ours[1] = make()
    for step in range(3):
        x = torch.randn(4, 3, 5, 5) * (step + 1) + step
        for m in (theirs, ours):
            checkpoint(m, x.clone().requires_grad_(), use_reentrant=False).square().sum().backward()
    assert int(theirs[1].num_batches_tracked) == int(ours[1].num_batches_tracked) == 6
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1].running_var, theirs[1].running_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", [bt.BatchNorm2d, bt.BatchNormAct2d])
@pytest.mark.parametrize("made_under", ["x", "layer"])
def test_inference_tensors_outside_inference_mode_leave_the_layer_as_it_was(layer, made_under):
    """A batch made under torch.inference_mode cannot be saved for the backward, and a layer
    made there cannot update its buffers outside it: torch's errors, raised before the kernel
    (the running statistics were written, then the error raised)."""
    x = torch.randn(4, 3, 2, 2) + 5
    if made_under == "x":
        m = layer(3)
        with torch.inference_mode():
            x = x.clone()
    else:
        with torch.inference_mode():
            m = layer(3)
    with pytest.raises(RuntimeError, match="inference tensor"):
        with torch.no_grad() if made_under == "layer" else torch.enable_grad():
            m(x)
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_var, torch.ones(3))
    with torch.inference_mode():  # inside inference mode both run (no backward, in-place updates allowed)
        m(x)
    assert m.running_mean.gt(0.4).all()


_BAD_SCALARS = [("momentum", None, True), ("momentum", "0.1", True), ("eps", None, True), ("eps", "1e-5", False),
                ("training", None, None), ("training", "yes", None),
                # in eval too, where torch's batch_norm refuses them (ours took them, unused)
                ("momentum", None, False), ("momentum", "0.1", False)]


@pytest.mark.parametrize("call, name, value, training", [
    (call, *case) for call in ("batch_norm", "batch_norm_act", "variant") for case in _BAD_SCALARS
    if call != "variant" or case[0] != "training"  # (the variants train; no such argument)
])
def test_scalar_arguments_of_the_wrong_type_are_named(call, name, value, training):
    """A TypeError naming the argument and the type given (the native call's conversion printed
    its whole signature; a training of None ran as inference)."""
    from batchnorm.torch.variants import batch_norm_variant

    x, rm, rv = torch.randn(4, 3, 2), torch.zeros(3), torch.ones(3)
    kwargs = {"training": training, "momentum": 0.1, "eps": 1e-5, name: value}
    if call == "variant":
        kwargs.pop("training")
        fn = lambda: batch_norm_variant(x, rm, rv, skip_nonfinite=True, **kwargs)  # noqa: E731
    else:
        fn = lambda: getattr(bt, call)(x, rm, rv, **kwargs)  # noqa: E731
    with pytest.raises(TypeError, match=f"^{name} must be a (float|bool), got {type(value).__name__}$"):
        fn()
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_numpy_scalars_traced_scalars_and_0d_tensors_are_numbers():
    # As torch's batch_norm takes them (the first type checks refused 0-d tensors and SymFloats).
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(4, 3, 2)
    want = bt.batch_norm(x, None, None, training=True, momentum=0.25, eps=1e-3)
    got = bt.batch_norm(x, None, None, training=True, momentum=torch.tensor(0.25), eps=torch.tensor(1e-3))
    torch.testing.assert_close(got, want)
    rm, rv = torch.zeros(3), torch.ones(3)
    traced = make_fx(lambda x, rm, rv: bt.batch_norm(x, rm, rv, training=True, momentum=1.0 / x.shape[0]),
                     tracing_mode="symbolic")(x, rm, rv)  # momentum: a SymFloat
    assert traced(x, rm, rv).shape == x.shape
    with pytest.raises(TypeError, match="training must be a bool, got numpy.bool"):
        bt.batch_norm(x, None, None, training=np.True_)  # (refused as torch refuses it; "got bool" said nothing)
    x = torch.randn(4, 3, 2)
    want = bt.batch_norm(x, None, None, training=True, momentum=0.25, eps=1e-3)
    got = bt.batch_norm(x, None, None, training=True, momentum=np.float32(0.25), eps=np.float32(1e-3))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="eps must be positive"):
        bt.batch_norm(x, None, None, training=True, eps=np.float32(-1.0))


@pytest.mark.parametrize("call, training", [("batch_norm", True), ("batch_norm", False), ("batch_norm_act", True),
                                            ("batch_norm_act", False), ("variant", True)])
@pytest.mark.parametrize("bad, words", [
    ("numpy input", "x must be a Tensor, got numpy.ndarray"),
    ("list weight", "weight must be a Tensor, got list"),
    ("meta weight", r"weight must be on the same device as x \(meta and cpu\)"),
    ("meta running_mean", r"running_mean must be on the same device as x \(meta and cpu\)"),
    ("sparse input", "x must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"),
])
def test_arguments_that_are_not_dense_tensors_on_x_s_device_are_named(call, training, bad, words):
    """An AttributeError, the dispatcher's schema error or DLPack's BufferError ("Cannot pack
    tensors on meta") / RuntimeError ("Cannot access data pointer") before."""
    from batchnorm.torch.variants import batch_norm_variant

    args = {"input": torch.randn(4, 3, 2), "running_mean": torch.zeros(3), "running_var": torch.ones(3),
            "weight": torch.ones(3)}
    what, name = bad.split(" ")
    args[name] = {"numpy": lambda: np.zeros((4, 3, 2), np.float32), "list": lambda: [1.0, 1.0, 1.0],
                  "meta": lambda: torch.zeros(3, device="meta"),
                  "sparse": lambda: torch.randn(4, 3, 2).to_sparse()}[what]()
    if call == "variant":
        fn = lambda: batch_norm_variant(**args, skip_nonfinite=True)  # noqa: E731
    else:
        fn = lambda: getattr(bt, call)(**args, training=training)  # noqa: E731
    with pytest.raises(TypeError, match=words):
        fn()


def test_ops_with_one_meta_argument_are_refused():
    """The dispatcher runs an op with a meta argument among CPU ones as its Meta kernel (the
    fake kernel): y and the running statistics came back as uninitialized memory."""
    x, rm, rv, meta = torch.randn(4, 3, 2), torch.zeros(3), torch.ones(3), torch.ones(3, device="meta")
    calls = {
        "forward_training": lambda: ops.forward_training(x, meta, None, rm, rv, 0.1, 1e-5),
        "forward_inference": lambda: ops.forward_inference(x, rm, rv, meta, None, 1e-5),
        "backward": lambda: ops.backward(x, x, rm, meta, None),
        "forward_training_act": lambda: ops.forward_training_act(x, None, meta, None, rm, rv, 0.1, 1e-5, True),
        "forward_inference_act": lambda: ops.forward_inference_act(x, None, rm, meta, None, None, 1e-5, True),
        "backward_act": lambda: ops.backward_act(x, x, x, meta, rv, None, True, False),
        "forward_training_variant": lambda: ops.forward_training_variant(x, meta, None, rm, rv, 0.1, 1e-5, True,
                                                                         True, None, 0),
        "backward_variant": lambda: ops.backward_variant(x, x, rm, rv, meta, None, None, 0),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=r"must be on the same device as x \(meta and cpu\)"):
            call()
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    on_meta = ops.forward_training(x.to("meta"), meta, None, rm.to("meta"), rv.to("meta"), 0.1, 1e-5)  # all meta: shapes
    assert on_meta[0].device.type == "meta" and on_meta[0].shape == x.shape
