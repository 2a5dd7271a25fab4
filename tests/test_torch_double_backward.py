"""Second derivatives through batchnorm.torch (backward with create_graph=True): gradgradcheck
in float64 of the plain and fused training and inference calls, eager and through the
registered ops, channels-first and channels_last; torch's own double backward on a gradient
penalty; the first-order gradient unchanged by create_graph; the kernels kept for a plain
backward under torch.compile; the training variants' second derivatives and tangents against
references in torch operations (SyncBatchNorm's refusal is checked across ranks in dist_worker.py)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="batchnorm.torch needs PyTorch")

import batchnorm.torch as bt  # noqa: E402

pytestmark = pytest.mark.torch
F, ops = torch.nn.functional, torch.ops.batchnorm
EPS = 1e-5


def _plain_training(route):
    def f(x, w, b):
        if route == "eager":
            return bt.batch_norm(x, None, None, w, b, training=True, eps=EPS)
        return ops.forward_training(x, w, b, None, None, 0.1, EPS)[0]

    return f


def _fused_training(route, residual):
    def f(x, w, b):
        if route == "eager":
            return bt.batch_norm_act(x, None, None, w, b, training=True, eps=EPS, residual=residual)
        return ops.forward_training_act(x, residual, w, b, None, None, 0.1, EPS, True)[0]

    return f


def _inference(route, fused, mean, var, residual):
    def f(x, w, b):
        if fused:
            if route == "eager":
                return bt.batch_norm_act(x, mean, var, w, b, eps=EPS, residual=residual)
            return ops.forward_inference_act(x, residual, mean, var, w, b, EPS, True)
        if route == "eager":
            return bt.batch_norm(x, mean, var, w, b, eps=EPS)
        return ops.forward_inference(x, mean, var, w, b, EPS)

    return f


def _inputs(channels_last: bool):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(4, dtype=torch.float64) + 0.5
    b = torch.randn(4, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, w, b)]


CASES = ["training", "training-act", "training-act-residual", "inference", "inference-act-residual"]


def _call(case, route, x):
    # Residuals and statistics are constants here; the residual's own gradient is checked below.
    torch.manual_seed(1)
    r = torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
    mean, var = torch.randn(4, dtype=x.dtype), torch.rand(4, dtype=x.dtype) + 0.5
    return {
        "training": _plain_training(route),
        "training-act": _fused_training(route, None),
        "training-act-residual": _fused_training(route, r),
        "inference": _inference(route, False, mean, var, None),
        "inference-act-residual": _inference(route, True, mean, var, r),
    }[case]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("route", ["eager", "op"])
@pytest.mark.parametrize("case", CASES)
def test_gradgradcheck(case, route, channels_last):
    x, w, b = _inputs(channels_last)
    f = _call(case, route, x)
    # ReLU's kink: the fused cases' finite differences need no value of bn(x) + residual near 0
    # (the inputs above have none within 1e-3).
    assert torch.autograd.gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("route", ["eager", "op"])
def test_residual_gradient_is_differentiable(route):
    x, w, b = _inputs(False)
    r = (torch.randn(x.shape, dtype=x.dtype) + 0.5).requires_grad_()

    def f(x, r):
        if route == "eager":
            return bt.batch_norm_act(x, None, None, w, b, training=True, eps=EPS, residual=r)
        return ops.forward_training_act(x, r, w, b, None, None, 0.1, EPS, True)[0]

    assert torch.autograd.gradgradcheck(f, (x, r), eps=1e-6, atol=1e-5, rtol=1e-4)
    v = torch.randn(x.shape, dtype=x.dtype)
    plain = torch.autograd.grad((f(x, r) * v).sum(), (x, r))
    graph = torch.autograd.grad((f(x, r) * v).sum(), (x, r), create_graph=True)
    for a, g in zip(plain, graph):
        assert torch.allclose(a, g.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gradient_penalty_is_torch_s(dtype):
    """A WGAN-GP style penalty ||d out / d x||^2 through a conv-BN-ReLU-conv network, its
    gradient with respect to every parameter against the same network on torch's BatchNorm2d."""
    torch.manual_seed(0)

    def net(norm):
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, padding=1), norm(6), torch.nn.ReLU(), torch.nn.Conv2d(6, 2, 3)
        ).to(dtype)

    theirs = net(torch.nn.BatchNorm2d)
    ours = net(bt.BatchNorm2d)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 3, 6, 6, dtype=dtype)

    def penalty(model):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        p = g.square().sum()
        return p.detach(), torch.autograd.grad(p, list(model.parameters()))

    p_ours, g_ours = penalty(ours)
    p_theirs, g_theirs = penalty(theirs)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 8e-2}[dtype]
    assert abs(float(p_ours) - float(p_theirs)) <= tol * abs(float(p_theirs))
    # Against the largest gradient of all: the conv bias before the norm has a zero gradient
    # in exact arithmetic, rounding noise in both.
    scale = max(float(b.double().abs().max()) for b in g_theirs)
    for (name, _), a, b in zip(ours.named_parameters(), g_ours, g_theirs):
        err = float((a.double() - b.double()).abs().max()) / scale
        assert err <= tol, (name, err)
    for name in ("running_mean", "running_var"):  # one update per forward, as torch's
        a, b = getattr(ours[1], name).double(), getattr(theirs[1], name).double()
        assert float((a - b).abs().max() / b.abs().max()) <= tol, name


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("route", ["eager", "op"])
@pytest.mark.parametrize("case", CASES)
def test_create_graph_keeps_the_first_order_gradient(case, route, channels_last):
    """gradgradcheck differentiates the create_graph gradient against finite differences of
    itself; this pins that gradient to the kernels' (gradcheck'd in test_torch_module.py)."""
    x, w, b = _inputs(channels_last)
    f = _call(case, route, x)
    v = torch.randn(x.shape, dtype=x.dtype)

    def loss(y):  # nonzero where a ReLU output is 0, so a lost mask shows
        return (y * v).sum() + y.square().sum()

    plain = torch.autograd.grad(loss(f(x, w, b)), (x, w, b))
    graph = torch.autograd.grad(loss(f(x, w, b)), (x, w, b), create_graph=True)
    for a, g in zip(plain, graph):
        assert g.requires_grad
        assert torch.allclose(a, g.detach(), rtol=1e-12, atol=1e-12)
    # A constant incoming gradient (y.sum()) and x requiring grad: still a graph through x.
    (g,) = torch.autograd.grad(f(x, w, b).sum(), x, create_graph=True)
    assert g.grad_fn is not None


@pytest.mark.parametrize("route", ["eager", "op"])
def test_empty_batch_under_create_graph(route):
    # torch's native_batch_norm_backward divides by the count: an empty batch must not reach it.
    x = torch.randn(0, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    _, w, b = _inputs(False)
    y = _plain_training(route)(x, w, b)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b), create_graph=True)
    assert gx.shape == x.shape and not gw.any() and not gb.any()
    for g in (gx, gw):  # a penalty on each differentiates, to zero (torch's layer too)
        (gg,) = torch.autograd.grad(g.square().sum(), x, allow_unused=True)
        assert gg is None or not gg.any()


@pytest.mark.parametrize("module", [torch.nn.BatchNorm1d, bt.BatchNorm1d, bt.BatchNormAct2d], ids=["torch", "ours", "norm_act"])
def test_eval_gradient_of_x_alone_keeps_a_graph(module):
    # Eval mode without parameters: dx is constant in x, yet under create_graph torch's dx
    # requires grad, so a penalty on it runs (to no gradient); ours had no graph and raised
    # "element 0 of tensors does not require grad".
    layer = (module(3, affine=False) if module is not bt.BatchNormAct2d else module(3, affine=False, apply_act=False))
    layer.double().eval()
    x = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    x_in = x.view(4, 3) if module in (torch.nn.BatchNorm1d, bt.BatchNorm1d) else x
    (g,) = torch.autograd.grad((layer(x_in) * torch.randn(x_in.shape, dtype=x.dtype)).sum(), x, create_graph=True)
    assert g.requires_grad
    (g.norm() - 1).square().backward()
    assert x.grad is None or not x.grad.any()
    g.mul_(2)  # in place on the gradient, as torch's allows


@pytest.mark.parametrize("wants", ["x", "w", "b", "xb", "wb", "xwb"])
def test_eval_parameter_gradients_keep_torch_s_graph(wants):
    # Eval mode, dy constant: torch's dweight and dbias require grad whenever x or the weight
    # does (constant as they are), so a penalty on them runs; ours had no graph where dy and x
    # carried none (only the weight wanting grad) and raised "does not require grad".
    x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    results = []
    for module in (torch.nn.BatchNorm2d, bt.BatchNorm2d):
        layer = module(3).double().eval()
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, -2.0, 3.0]))
            layer.running_var.fill_(2.0)
        layer.weight.requires_grad_("w" in wants)
        layer.bias.requires_grad_("b" in wants)
        x = x0.clone().requires_grad_("x" in wants)
        inputs = [t for t, key in ((x, "x"), (layer.weight, "w"), (layer.bias, "b")) if key in wants]
        grads = torch.autograd.grad(layer(x).sum(), inputs, create_graph=True)
        flags = [g.requires_grad for g in grads]
        if any(flags):
            sum(g.square().sum() for g in grads if g.requires_grad).backward()
        results.append((flags, [t.grad for t in inputs]))
    (want_flags, want_grads), (flags, grads) = results
    assert flags == want_flags == [("x" in wants or "w" in wants)] * len(wants)
    for g, want in zip(grads, want_grads):
        assert (g is None) == (want is None) and (g is None or torch.allclose(g, want, rtol=1e-12, atol=0))


@pytest.mark.parametrize("route", ["eager", "op"])
def test_residual_only_second_derivative_is_zero(route):
    # x constant, only the residual requires grad, a constant incoming gradient: the residual's
    # gradient depends on it only through the ReLU's mask, so its derivative is zero (as with
    # torch's relu), not an error.
    x, w, b = (t.detach() for t in _inputs(False))
    r = (torch.randn(x.shape, dtype=x.dtype) + 0.5).requires_grad_()
    y = (bt.batch_norm_act(x, None, None, w, b, training=True, eps=EPS, residual=r) if route == "eager"
         else ops.forward_training_act(x, r, w, b, None, None, 0.1, EPS, True)[0])
    (g,) = torch.autograd.grad(y.sum(), r, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), r, allow_unused=True)
    assert gg is None or not gg.any()


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
     (torch.float32, None), (torch.float64, None)],
    ids=["f16-f32w", "bf16-f32w", "f16-f16w", "f32-noweight", "f64-noweight"],
)
def test_second_derivative_dtypes_against_torch(x_dtype, w_dtype):
    """d/dx ||d loss / dx||^2 through training batch norm, ours against torch's batch_norm on
    the same inputs: half inputs with float32 or half weights, and no weight."""
    torch.manual_seed(0)
    x0 = torch.randn(6, 5, 4, 3) * 2 + 1
    w0 = torch.rand(5) + 0.5
    v = torch.randn(6, 5, 4, 3)

    def second(norm):
        x = x0.to(x_dtype).requires_grad_()
        w = None if w_dtype is None else w0.to(w_dtype).requires_grad_()
        y = norm(x, None, None, w, None, training=True, eps=EPS)
        (g,) = torch.autograd.grad((y.float() * v).sum() + y.float().square().sum(), x, create_graph=True)
        inputs = (x,) if w is None else (x, w)
        return [t.double() for t in torch.autograd.grad(g.float().square().sum(), inputs)]

    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float32: 1e-4, torch.float64: 1e-10}[x_dtype]
    for a, b in zip(second(bt.batch_norm), second(F.batch_norm)):
        assert float((a - b).abs().max() / b.abs().max()) <= tol


def test_compiled_backward_keeps_the_kernels():
    """Under torch.compile a plain backward is the kernels' ops, not the differentiable formula
    (AOT autograd traces the backward with grad mode off), not torch's backward op. (Layers
    that keep our ops under torch.compile: a training variant, parameters of another dtype.)"""
    from torch._dynamo.backends.common import aot_autograd

    seen: dict = {}

    def record(name):
        def compiler(gm, example_inputs):
            seen[name] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return gm.forward

        return compiler

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bt.BatchNorm2d(4, skip_nonfinite=True),
                                bt.BatchNormAct2d(4, dtype=torch.float64))
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw")))
    with pytest.warns(UserWarning, match="boxed"):
        compiled(torch.randn(2, 3, 8, 8, requires_grad=True)).sum().backward()
    assert {"batchnorm.backward_variant.default", "batchnorm.backward_act.default"} <= seen["bw"]
    assert not any("native_batch_norm_backward" in t for t in seen["bw"])


# The variants against references written in torch operations: batch renorm's y = w * (x̂ r + d)
# + b with the op's own r and d as constants, ghost batch norm as torch's batch norm of each
# group, the running-statistics options as plain batch norm.
VARIANTS = {
    "renorm": dict(renorm=[3.0, 5.0], ghost=0, unbiased=True, skip=False),
    "ghost": dict(renorm=None, ghost=3, unbiased=True, skip=False),
    "ghost_biased_skip": dict(renorm=None, ghost=2, unbiased=False, skip=True),
    "skip": dict(renorm=None, ghost=0, unbiased=True, skip=True),
}


def _variant(name, route):
    v = VARIANTS[name]
    rm, rv = torch.randn(4, dtype=torch.float64) * 0.3, torch.rand(4, dtype=torch.float64) + 0.5

    def ours(x, w, b):
        if route == "module":
            m = bt.BatchNorm2d(4, dtype=torch.float64, renorm=v["renorm"], skip_nonfinite=v["skip"],
                               ghost_batch=v["ghost"] or None, running_var_unbiased=v["unbiased"])
            with torch.no_grad():
                m.running_mean.copy_(rm), m.running_var.copy_(rv)
            return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))
        return ops.forward_training_variant(x, w, b, rm.clone(), rv.clone(), 0.1, EPS, v["unbiased"], v["skip"],
                                            v["renorm"], v["ghost"])[0]

    def reference(x, w, b):
        if v["ghost"]:
            return torch.cat([F.batch_norm(g, None, None, w, b, True, eps=EPS) for g in x.split(v["ghost"])])
        if v["renorm"]:
            _, _, _, r, d, _, _ = ops.forward_training_variant(x.detach(), w.detach(), b.detach(), rm.clone(),
                                                               rv.clone(), 0.1, EPS, True, False, v["renorm"], 0)
            shape = (1, -1, 1, 1)
            xhat = F.batch_norm(x, None, None, None, None, True, eps=EPS)
            return w.view(shape) * (xhat * r.view(shape) + d.view(shape)) + b.view(shape)
        return F.batch_norm(x, None, None, w, b, True, eps=EPS)

    return ours, reference


@pytest.mark.parametrize("route", ["module", "op"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_double_backward(name, route):
    # A gradient penalty through the variants, against the references; gradgradcheck in float64.
    x, w, b = _inputs(False)
    x = x.detach().repeat(2, 1, 1, 1).requires_grad_()  # 6 samples: groups of 2 and 3
    ours, reference = _variant(name, route)
    results = []
    for f in (ours, reference):
        y = f(x, w, b)
        gx, gw = torch.autograd.grad((y * y.detach().cos()).sum(), (x, w), create_graph=True)
        penalty = gx.square().sum() + (gw * torch.arange(4.0, dtype=gw.dtype)).square().sum()
        results.append(torch.autograd.grad(penalty, (x, w, b), allow_unused=True, materialize_grads=True))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
    # renorm's r and d move with x, constants to its gradient by design; fast_mode: random
    # projections of the Jacobians (the comparison above checks every entry)
    if not VARIANTS[name]["renorm"] and route == "op":
        assert torch.autograd.gradgradcheck(ours, (x, w, b), fast_mode=True)


# torch's forward-mode AD loads its decompositions through torch.jit.script the first time
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_under_torch_func(name):
    # jvp, jacfwd over jacrev (hessian) and vmap of the variants, against the references.
    x, w, b = (t.detach() for t in _inputs(False))
    x = x.repeat(2, 1, 1, 1)
    ours, reference = _variant(name, "module")
    tangents = (x.sin(), w.cos(), b.exp())
    for a, e in zip(torch.func.jvp(ours, (x, w, b), tangents), torch.func.jvp(reference, (x, w, b), tangents)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
    hessians = [torch.func.hessian(lambda w, b, f=f: (f(x, w, b) ** 3).sum(), argnums=(0, 1))(w, b)
                for f in (ours, reference)]
    for a, e in zip(torch.utils._pytree.tree_leaves(hessians[0]), torch.utils._pytree.tree_leaves(hessians[1])):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
