"""batchnorm.torch under torch.func transforms and forward-mode AD, in float64 against batch
norm written in torch operations (and torch's layers where they are right): grad, vjp, jacrev, hessian (jacfwd over jacrev), jacrev over jacrev, jvp,
jacfwd, vmap (over x, over stacked parameters and buffers, at any dim, channels_last) and
vmap over grad (per-sample gradients), for batch_norm, batch_norm_act and the layers through
functional_call; torch.autograd.forward_ad on eager calls; the kernels still running first-order
gradients under grad (the same bits as eager autograd); vmap through the ops' batching rules
(no per-sample fallback). The variants' are in test_torch_double_backward.py."""
from __future__ import annotations

import re
import warnings

import pytest

torch = pytest.importorskip("torch", reason="batchnorm.torch needs PyTorch")

import batchnorm.torch as bt  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    # torch's forward-mode AD loads its decompositions through torch.jit.script the first time
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]
F, func = torch.nn.functional, torch.func
EPS = 1e-5
D = torch.float64


def _close(ours, theirs, rtol=1e-9, atol=1e-10):
    if isinstance(theirs, (tuple, list)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _close(a, b, rtol, atol)
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys()
        for k in theirs:
            _close(ours[k], theirs[k], rtol, atol)
    else:
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)


def _data(shape=(3, 4, 3, 2), channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, dtype=D, generator=g) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(C, dtype=D, generator=g) + 0.5
    b = torch.randn(C, dtype=D, generator=g)
    r = torch.randn(shape, dtype=D, generator=g)
    mean = torch.randn(C, dtype=D, generator=g)
    var = torch.rand(C, dtype=D, generator=g) + 0.5
    return x, w, b, r, mean, var


def _reference(x, w, b, mean=None, var=None):
    """Batch norm written in torch operations (statistics from x in training, given in
    inference): the exact derivatives to every order. torch's own F.batch_norm gets the
    weight-x block of jacrev(jacrev) wrong in torch 2.13 (H_wx != H_xw^T) and drops the given
    statistics' tangents."""
    dims, shape = [0] + list(range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    if mean is None:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + EPS) * w.view(shape) + b.view(shape)


# The functions under test, ours and the reference, as f(x, w, b) with everything else fixed.
def _cases(r, mean, var):
    return {
        "training": (
            lambda x, w, b: bt.batch_norm(x, None, None, w, b, training=True, eps=EPS),
            _reference,
        ),
        "inference": (
            lambda x, w, b: bt.batch_norm(x, mean, var, w, b, eps=EPS),
            lambda x, w, b: _reference(x, w, b, mean, var),
        ),
        "training_act": (
            lambda x, w, b: bt.batch_norm_act(x, None, None, w, b, training=True, eps=EPS, residual=r),
            lambda x, w, b: F.relu(_reference(x, w, b) + r),
        ),
        "inference_act": (
            lambda x, w, b: bt.batch_norm_act(x, mean, var, w, b, eps=EPS, residual=r),
            lambda x, w, b: F.relu(_reference(x, w, b, mean, var) + r),
        ),
        "training_relu": (
            lambda x, w, b: bt.batch_norm_act(x, None, None, w, b, training=True, eps=EPS),
            lambda x, w, b: F.relu(_reference(x, w, b)),
        ),
    }


CASES = ["training", "inference", "training_act", "inference_act", "training_relu"]


def _loss(f):
    # cubed and weighted, so the second derivatives are not those of a quadratic
    return lambda x, w, b: (f(x, w, b) ** 3 * torch.linspace(-1, 2, x.numel(), dtype=D).view(x.shape)).sum()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_reverse_mode(case, channels_last):
    x, w, b, r, mean, var = _data(channels_last=channels_last)
    ours, theirs = _cases(r, mean, var)[case]
    for transform in (
        lambda f: func.grad(_loss(f), argnums=(0, 1, 2)),
        lambda f: lambda x, w, b: func.vjp(f, x, w, b)[1](x.cos()),
        lambda f: func.jacrev(f, argnums=(0, 1, 2)),
        lambda f: func.jacrev(func.jacrev(_loss(f), argnums=(1, 2)), argnums=(0, 1, 2)),
    ):
        _close(transform(ours)(x, w, b), transform(theirs)(x, w, b))


@pytest.mark.parametrize("case", CASES)
def test_forward_mode(case):
    x, w, b, r, mean, var = _data()
    ours, theirs = _cases(r, mean, var)[case]
    tangents = (x.sin(), w.cos(), b.exp())
    _close(func.jvp(ours, (x, w, b), tangents), func.jvp(theirs, (x, w, b), tangents))
    _close(func.jvp(lambda x: ours(x, w, b), (x,), (x.sin(),)), func.jvp(lambda x: theirs(x, w, b), (x,), (x.sin(),)))
    _close(func.jacfwd(ours, argnums=(0, 1, 2))(x, w, b), func.jacfwd(theirs, argnums=(0, 1, 2))(x, w, b))
    hessian = [func.hessian(_loss(f), argnums=(0, 1, 2))(x, w, b) for f in (ours, theirs)]
    _close(*hessian)


@pytest.mark.parametrize("case", CASES)
def test_forward_ad_on_eager_calls(case):
    # torch.autograd.forward_ad's dual tensors, outside torch.func
    import torch.autograd.forward_ad as fwAD

    x, w, b, r, mean, var = _data()
    results = []
    for f in _cases(r, mean, var)[case]:
        with fwAD.dual_level():
            y = f(fwAD.make_dual(x, x.sin()), fwAD.make_dual(w, w.cos()), b)
            results.append(tuple(fwAD.unpack_dual(y)))
    _close(results[0], results[1])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("in_dims", [(0, None, None), (None, 0, 0), (0, 0, 0), (2, None, 0)])
@pytest.mark.parametrize("shape", [(3, 4, 3, 2), (5, 4), (3, 4, 5)])
def test_vmap(case, in_dims, shape):
    x, w, b, r, mean, var = _data(shape)
    if in_dims[0] == 2 and len(shape) == 2:
        in_dims = (1,) + in_dims[1:]
    B = 3
    xs = torch.stack([x * (k + 1) - k for k in range(B)], dim=in_dims[0] or 0)
    ws, bs = torch.stack([w + k for k in range(B)]), torch.stack([b - k for k in range(B)])
    args = [xs if in_dims[0] is not None else x, ws if in_dims[1] is not None else w,
            bs if in_dims[2] is not None else b]
    ours, theirs = _cases(r, mean, var)[case]
    with warnings.catch_warnings():
        # a fallback to torch's per-sample loop warns "There is a performance drop"
        warnings.simplefilter("error")
        got = func.vmap(ours, in_dims=in_dims)(*args)
    _close(got, func.vmap(theirs, in_dims=in_dims)(*args))


@pytest.mark.parametrize("case", CASES)
def test_per_sample_gradients(case):
    # vmap over grad: each sample's gradient, as torch's own per-sample gradient recipe
    x, w, b, r, mean, var = _data(shape=(4, 3, 2, 2))
    ours, theirs = _cases(r[:1], mean, var)[case]

    def per_sample(f):
        return func.vmap(func.grad(lambda x, w, b: _loss(f)(x.unsqueeze(0), w, b), argnums=(0, 1, 2)),
                         in_dims=(0, None, None))

    if case.startswith("training"):  # a batch of one has no spread: take pairs
        xs = x.view(2, 2, 3, 2, 2)
        ours, theirs = _cases(r[:2], mean, var)[case]

        def per_sample(f):  # noqa: F811
            return func.vmap(func.grad(_loss(f), argnums=(0, 1, 2)), in_dims=(0, None, None))

        _close(per_sample(ours)(xs, w, b), per_sample(theirs)(xs, w, b))
    else:
        _close(per_sample(ours)(x, w, b), per_sample(theirs)(x, w, b))


def test_first_order_gradients_run_the_kernels():
    # Under grad the backward is the kernels' (the same bits as eager autograd), not the
    # composite that a second derivative needs.
    for dtype in (torch.float32, torch.float64):
        x, w, b, r, _, _ = (t.to(dtype) for t in _data(shape=(8, 5, 4, 3)))
        for f in (lambda x, w, b: bt.batch_norm(x, None, None, w, b, training=True),
                  lambda x, w, b: bt.batch_norm_act(x, None, None, w, b, training=True, residual=r)):
            g = func.grad(lambda x, w, b: (f(x, w, b) * r).sum(), argnums=(0, 1, 2))(x, w, b)
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            (f(*leaves) * r).sum().backward()
            for got, leaf in zip(g, leaves):
                assert torch.equal(got, leaf.grad)


@pytest.mark.parametrize("layer", ["BatchNorm2d", "BatchNormAct2d"])
@pytest.mark.parametrize("track", [False, True])
def test_layers_through_functional_call(layer, track):
    # grad over the parameters with the buffers passed in (torch's recipe for functional
    # training), and model ensembling: vmap over stacked parameters and buffers
    torch.manual_seed(0)
    ours = getattr(bt, layer)(4, track_running_stats=track).double()
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(4, track_running_stats=track), torch.nn.ReLU()).double() \
        if layer == "BatchNormAct2d" else torch.nn.BatchNorm2d(4, track_running_stats=track).double()
    x = _data()[0]

    def state(m):
        return {k: v.detach().clone() for k, v in m.named_parameters()}, \
            {k.replace("0.", ""): v.clone() for k, v in m.named_buffers()}

    def loss(m, names):
        def f(params, buffers, x):
            p = {names.get(k, k): v for k, v in {**params, **buffers}.items()}
            return _loss(lambda x, w, b: func.functional_call(m, p, (x,)))(x, None, None)
        return f

    theirs_names = {"weight": "0.weight", "bias": "0.bias", "running_mean": "0.running_mean",
                    "running_var": "0.running_var", "num_batches_tracked": "0.num_batches_tracked"} \
        if layer == "BatchNormAct2d" else {}
    (p, buf), (_, tbuf) = state(ours), state(theirs)
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        if not training and not track:
            continue
        g = func.grad(loss(ours, {}), argnums=(0, 2))(p, buf, x)
        tg = func.grad(loss(theirs, theirs_names), argnums=(0, 2))(p, tbuf, x)
        _close(g, tg)
        _close(buf, tbuf)  # the running statistics, updated alike
        # an ensemble of 3 layers
        stacked_p = {k: torch.stack([v * (i + 1) for i in range(3)]) for k, v in p.items()}
        stacked_b = {k: torch.stack([v.clone() for _ in range(3)]) for k, v in buf.items()}
        stacked_tb = {k: torch.stack([v.clone() for _ in range(3)]) for k, v in tbuf.items()}
        ys = func.vmap(lambda p, b, x: func.functional_call(ours, {**p, **b}, (x,)), in_dims=(0, 0, None))(
            stacked_p, stacked_b, x)
        tys = func.vmap(
            lambda p, b, x: func.functional_call(theirs, {theirs_names.get(k, k): v for k, v in {**p, **b}.items()},
                                                 (x,)), in_dims=(0, 0, None))(stacked_p, stacked_tb, x)
        _close(ys, tys)
        _close(stacked_b, stacked_tb)


def test_running_statistics_captured_under_grad_refused_like_torch():
    # A transform refuses the in-place update of a captured buffer, for torch's layer as for ours.
    x = _data()[0]
    for m in (bt.BatchNorm2d(4).double(), torch.nn.BatchNorm2d(4).double()):
        p = dict(m.named_parameters())
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
            func.grad(lambda p: func.functional_call(m, p, (x,)).sum())(p)


@pytest.mark.parametrize("layer", ["module", "act", "variant"])
def test_vmap_of_a_batched_input_into_unbatched_running_statistics_says_so_like_torch(layer):
    """torch's own message (the running statistics do not fit the batched input), not vmap's
    about in-place arithmetic; the buffers untouched."""
    xs = torch.randn(5, 4, 3, 5, 5)
    m = {"module": bt.BatchNorm2d(3), "act": bt.BatchNormAct2d(3), "variant": bt.BatchNorm2d(3, skip_nonfinite=True)}[layer]
    with pytest.raises(RuntimeError) as theirs:
        func.vmap(torch.nn.BatchNorm2d(3))(xs)
    with pytest.raises(RuntimeError, match=re.escape(str(theirs.value).splitlines()[0])):
        func.vmap(m)(xs)
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_var, torch.ones(3))


def test_variants_with_parameters_that_require_grad():
    # A Parameter that requires grad may be differentiated again by autograd around the
    # transform: the gradient is then the composite one, equal to torch's within rounding
    x, *_ = _data()
    m = bt.BatchNorm2d(4, skip_nonfinite=True, track_running_stats=False).double()
    loss = _loss(lambda x, w, b: func.functional_call(m, {"weight": w, "bias": b}, (x,)))
    g = func.grad(loss, argnums=(1, 2))(x, m.weight, m.bias)
    tg = func.grad(_loss(lambda x, w, b: F.batch_norm(x, None, None, w, b, True, eps=EPS)), argnums=(1, 2))(
        x, m.weight.detach(), m.bias.detach())
    _close(g, tg)


def test_running_statistics_in_forward_and_reverse_mode():
    # Forward mode counts the given statistics' tangents (functorch hands zeros to arguments
    # without one; torch's own batch norm drops them, returning zero); reverse mode refuses a
    # gradient with respect to them, as torch's does, naming the argument.
    x, w, b, r, mean, var = _data()

    def reference(x, m, v):
        shape = (1, -1, 1, 1)
        return (x - m.view(shape)) * torch.rsqrt(v.view(shape) + EPS) * w.view(shape) + b.view(shape)

    tangents = (x.sin(), mean.cos(), var.exp())
    _close(func.jvp(lambda x, m, v: bt.batch_norm(x, m, v, w, b), (x, mean, var), tangents),
           func.jvp(reference, (x, mean, var), tangents))
    _close(func.jvp(lambda x, m, v: bt.batch_norm_act(x, m, v, w, b, residual=r), (x, mean, var), tangents),
           func.jvp(lambda x, m, v: F.relu(reference(x, m, v) + r), (x, mean, var), tangents))
    with pytest.raises(ValueError, match="running_mean must not require grad"):
        func.grad(lambda m: bt.batch_norm(x, m, var, w, b).sum())(mean)
    with pytest.raises(ValueError, match="running_var must not require grad"):
        func.grad(lambda v: bt.batch_norm_act(x, mean, v, w, b).sum())(var)


def test_half_dtypes_under_grad_and_vmap():
    # float32 parameters with half inputs (torch's mixed form), against the float64 reference
    x, w, b, r, mean, var = _data(shape=(6, 4, 3, 3))
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        f = lambda x, w, b: bt.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
        g = func.grad(lambda x, w, b: (f(x, w, b).float() * r.float()).sum(), argnums=(0, 1, 2))(
            xh, w.float(), b.float())
        ref = func.grad(lambda x, w, b: (F.batch_norm(x, None, None, w, b, True) * r).sum(), argnums=(0, 1, 2))(
            xh.double(), w, b)
        for got, want in zip(g, ref):
            assert got.dtype == (dtype if got.dim() == 4 else torch.float32)
            torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
        ys = func.vmap(f, in_dims=(0, None, None))(torch.stack([xh, xh * 2]), w.float(), b.float())
        assert ys.dtype == dtype and ys.shape == (2,) + x.shape
        torch.testing.assert_close(ys[1].double(), F.batch_norm(xh.double() * 2, None, None, w, b, True),
                                   rtol=2e-2, atol=2e-2)


# ---- compositions the review found wrong, and their references ------------------------------


def test_forward_mode_through_a_backward_without_create_graph():
    # Forward AD does not depend on grad mode: the gradient's tangent through a backward run
    # with create_graph=False, in eager forward AD and in jvp over a vjp function.
    import torch.autograd.forward_ad as fwAD

    x, w, b, r, *_ = _data()
    results = []
    for f in _cases(r, None, None)["training"]:
        with fwAD.dual_level():
            xd = fwAD.make_dual(x.clone().requires_grad_(), x.sin())
            (g,) = torch.autograd.grad((f(xd, w, b) ** 3 * r).sum(), xd)
            eager = fwAD.unpack_dual(g).tangent
        transformed = func.jvp(lambda x: func.vjp(lambda x: f(x, w, b) ** 2, x)[1](r, create_graph=False)[0],
                               (x,), (x.cos(),))[1]
        results.append((eager, transformed))
    _close(results[0], results[1])


@pytest.mark.parametrize("case", ["training", "training_act"])
def test_reverse_over_forward(case):
    # grad of jvp and jacrev of jacfwd: the tangent's dependence on x through the statistics
    x, w, b, r, *_ = _data()
    ours, theirs = _cases(r, None, None)[case]

    def grad_of_jvp(f):
        return func.grad(lambda x: (func.jvp(lambda x: f(x, w, b), (x,), (x.sin(),))[1] * r).sum())(x)

    def jacrev_of_jacfwd(f):
        return func.jacrev(func.jacfwd(lambda x, w: (f(x, w, b) ** 2).sum(dim=(0, 2, 3)), argnums=1))(x, w)

    for transform in (grad_of_jvp, jacrev_of_jacfwd):
        _close(transform(ours), transform(theirs))


def test_forward_over_forward_refused():
    # torch never differentiates an autograd.Function's jvp again: an error, not a silent zero
    x, w, b, *_ = _data()
    f = _cases(None, None, None)["training"][0]
    with pytest.raises(NotImplementedError, match="no forward mode over forward mode"):
        func.jacfwd(func.jacfwd(lambda w: f(x, w, b)))(w)


@pytest.mark.parametrize("case", CASES)
def test_forward_mode_over_vmap(case):
    x, w, b, r, mean, var = _data()
    xs = torch.stack([x, 2 * x - 1])
    results = [func.jvp(lambda xs: func.vmap(f, in_dims=(0, None, None))(xs, w, b), (xs,), (xs.sin(),))
               for f in _cases(r, mean, var)[case]]
    _close(*results)


def test_vmap_of_parameters_alone_updates_shared_running_statistics():
    # x and the running statistics unbatched, the weight (or the residual) batched: the running
    # statistics update once, as torch's rule does, where a fold would batch them
    x, _, _, r, *_ = _data()
    ws = torch.rand(2, 4, dtype=D) + 0.5
    rs = torch.stack([r, -r])
    got, want = [], []
    for bn, out in ((bt.batch_norm, got), (F.batch_norm, want)):
        rm, rv = torch.zeros(4, dtype=D), torch.ones(4, dtype=D)
        out += [func.vmap(lambda w: bn(x, rm, rv, w, None, training=True))(ws), rm, rv]
    _close(got, want)
    ours, theirs = bt.BatchNormAct2d(4).double(), torch.nn.BatchNorm2d(4).double()
    _close(func.vmap(lambda r: ours(x, r))(rs), func.vmap(lambda r: torch.relu(theirs(x) + r))(rs))
    _close((ours.running_mean, ours.running_var), (theirs.running_mean, theirs.running_var))


def test_torch_func_inside_forward_ad():
    # func.grad inside an eager forward-AD level: the gradient carries x's tangent
    import torch.autograd.forward_ad as fwAD

    x, w, b, r, *_ = _data()
    tangents = []
    for f in _cases(r, None, None)["training"]:
        with fwAD.dual_level():
            xd = fwAD.make_dual(x, x.sin())
            gw = func.grad(lambda w: (f(xd, w, b) ** 3 * r).sum())(w)
            tangents.append(fwAD.unpack_dual(gw).tangent)
    assert tangents[1] is not None
    _close(tangents[0], tangents[1])


def test_variants_under_vmap():
    # The variants loop over the mapped slices: renorm's float list passes through; with x and
    # the running statistics unbatched (an ensemble over parameters) they update once
    x = _data(shape=(8, 3, 2, 2))[0]
    xs = torch.stack([x, 2 * x + 1])
    rms, rvs = torch.zeros(2, 3, dtype=D), torch.ones(2, 3, dtype=D)
    got = func.vmap(lambda x, rm, rv: bt.modules.batch_norm_variant(x, rm, rv, None, None, renorm=(2.0, 1.0)))(
        xs, rms, rvs)
    for i in range(2):
        rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
        _close(got[i], bt.modules.batch_norm_variant(xs[i], rm, rv, None, None, renorm=(2.0, 1.0)))
        _close((rms[i], rvs[i]), (rm, rv))
    for kwargs in (dict(ghost_batch=4), dict(skip_nonfinite=True), dict(running_var_unbiased=False)):
        m, ref = bt.BatchNorm2d(3, **kwargs).double(), bt.BatchNorm2d(3, **kwargs).double()
        p = {k: torch.stack([v.detach(), v.detach() + 1]) for k, v in m.named_parameters()}
        ys = func.vmap(lambda p: func.functional_call(m, p, (x,)))(p)
        for i in range(2):
            _close(ys[i], func.functional_call(ref, {k: v[i] for k, v in p.items()}, (x,)))
            if i == 0:  # one update, as the mapped call's
                _close((m.running_mean, m.running_var), (ref.running_mean, ref.running_var))


def test_vmap_over_parameters_rounds_half_outputs_once():
    # x half, parameters float32 and mapped: correctly rounded but for a few values near a tie
    # (the statistics' own rounding), as the per-weight calls are; rounded twice (to the half
    # type, then after the affine), 30% of the values were not
    x, w, b, *_ = _data(shape=(8, 4, 5, 5))
    ws = torch.stack([w, w + 1]).float()
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        rm, rv = torch.zeros(4), torch.ones(4)
        got = func.vmap(lambda w: bt.batch_norm(xh, rm, rv, w, None, training=True))(ws)
        exact = torch.stack([_reference(xh.double(), wi.double(), torch.zeros(4, dtype=D)) for wi in ws])
        a = got.abs()
        ulp = (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()
        wrong = (got.double() - exact).abs() > 0.5 * ulp * (1 + 1e-3)
        assert wrong.double().mean() < 0.01, (dtype, wrong.double().mean().item())


@pytest.mark.parametrize("kwargs", [dict(renorm=(2.0, 1.0)), dict(ghost_batch=4), dict(skip_nonfinite=True)])
def test_variants_vmap_over_grad(kwargs):
    # Gradients of B stacked batches through a variant: the backward op's batching rule calls
    # it on each slice; without a rule torch's per-slice fallback warns (an error here). Each
    # slice against its own gradient.
    x, w, b, r, *_ = _data(shape=(8, 3, 2, 2))
    xs, rs = torch.stack([x, 2 * x + 1, x.cos()]), torch.stack([r, r.sin(), -r])
    # each batch's own running statistics (renorm's r and d come from them)
    rms, rvs = torch.randn(3, 3, dtype=D) * 0.1, torch.rand(3, 3, dtype=D) + 0.5

    def loss(w, b, x, r, rm, rv):
        y = bt.modules.batch_norm_variant(x, rm.clone(), rv.clone(), w, b, **kwargs)
        return (y ** 3 * r).sum()

    for argnums in ((0, 1), (0, 1, 2)):
        got = func.vmap(func.grad(loss, argnums=argnums), in_dims=(None, None, 0, 0, 0, 0))(w, b, xs, rs, rms, rvs)
        for i in range(3):
            _close(tuple(g[i] for g in got), func.grad(loss, argnums=argnums)(w, b, xs[i], rs[i], rms[i], rvs[i]))
    # an ensemble: stacked parameters over one batch (x and the statistics unbatched)
    ws, bs = torch.stack([w, w + 1, -w]), torch.stack([b, b - 1, b * 2])
    got = func.vmap(func.grad(loss, argnums=(0, 1, 2)), in_dims=(0, 0, None, None, None, None))(
        ws, bs, x, r, rms[0], rvs[0])
    for i in range(3):
        _close(tuple(g[i] for g in got), func.grad(loss, argnums=(0, 1, 2))(ws[i], bs[i], x, r, rms[0], rvs[0]))


def test_errors_under_vmap_name_one_slice():
    # A bad argument under vmap gets the eager call's error for one mapped slice: the shapes the
    # user passed, not those of the B slices folded into the channels ((12,) and (15,) here)
    xs, x = torch.randn(3, 8, 4, dtype=D), torch.randn(8, 4, dtype=D)
    short = "weight must have shape \\(4,\\), got \\(5,\\) \\(x has shape \\(8, 4\\)"
    cases = [
        (lambda x: bt.batch_norm(x, None, None, torch.ones(5, dtype=D), None, training=True), xs, short),
        (lambda x: bt.batch_norm(x, torch.zeros(4, dtype=D), torch.ones(4, dtype=D), torch.ones(5, dtype=D), None,
                                 training=False), xs, short),
        (lambda x: bt.batch_norm_act(x, None, None, torch.ones(5, dtype=D), None, training=True), xs, short),
        # an ensemble over parameters (x and the statistics shared): the first slice's call checks
        (lambda w: bt.batch_norm(x, None, None, w, None, training=True), torch.ones(3, 5, dtype=D), short),
        (lambda w: bt.batch_norm(x, torch.zeros(4, dtype=D), torch.ones(4, dtype=D), w, None, training=True),
         torch.ones(3, 4, dtype=torch.int32), "weight must have dtype float16, bfloat16, float32 or float64, got int32"),
        (lambda r: bt.batch_norm_act(x, None, None, None, None, training=True, residual=r), torch.ones(3, 8, 5, dtype=D),
         "residual must have"),
    ]
    for f, arg, message in cases:
        error = TypeError if "dtype" in message else ValueError
        with pytest.raises(error, match=message):
            func.vmap(f)(arg)
        if arg is xs:  # per-sample gradients: the forward's rule raises first, the same words
            with pytest.raises(error, match=message):
                func.vmap(func.grad(lambda x, f=f: f(x).sum()))(arg)


@pytest.mark.parametrize("layer", [bt.BatchNorm2d, bt.BatchNormAct2d])
def test_batched_gradients_of_an_eager_training_step(layer):
    # autograd.grad(is_grads_batched=True), the vectorized jacobian and hessian and gradcheck's
    # batched check run the backward of the eager Function under torch's legacy vmap: the
    # kernel was handed a batched dy without memory ("Cannot access data pointer").
    torch.manual_seed(0)
    m, ref = layer(3).double(), torch.nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=D, requires_grad=True)

    def ref_fn(t):
        return F.relu(ref(t)) if layer is bt.BatchNormAct2d else ref(t)

    v = torch.randn(5, *x.shape, dtype=D)
    (batched,) = torch.autograd.grad(m(x), x, v, is_grads_batched=True)
    looped = torch.stack([torch.autograd.grad(m(x), x, vi)[0] for vi in v])
    _close(batched, looped)
    _close(torch.autograd.functional.jacobian(m, x, vectorize=True),
           torch.autograd.functional.jacobian(ref_fn, x, vectorize=True))
    _close(torch.autograd.functional.hessian(lambda t: (m(t) ** 3).sum(), x, vectorize=True),
           torch.autograd.functional.hessian(lambda t: (ref_fn(t) ** 3).sum(), x, vectorize=True),
           rtol=1e-7, atol=1e-9)
    assert torch.autograd.gradcheck(m, (x,), check_batched_grad=True)
