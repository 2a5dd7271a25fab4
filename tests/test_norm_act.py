"""batchnorm.torch.BatchNormAct2d (timm's norm_act interface) and its fused torch.library ops:
forward, gradients and running statistics against torch's BatchNorm2d + add + ReLU, eval
mode, non-ReLU activations, torch.library.opcheck and torch.compile(fullgraph=True)."""
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

import batchnorm.torch as bt  # noqa: E402
from batchnorm.torch import BatchNormAct2d, batch_norm_act  # noqa: E402


def _reference(m):
    ref = torch.nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, dtype=m.weight.dtype)
    ref.load_state_dict(m.state_dict())
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_batchnorm_add_relu(dtype, channels_last, residual):
    g = torch.Generator().manual_seed(3)
    m = BatchNormAct2d(12, dtype=dtype)
    assert isinstance(m, torch.nn.BatchNorm2d)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2, generator=g)
        m.bias.normal_(generator=g)
    ref = _reference(m)
    x = torch.randn(6, 12, 7, 5, generator=g, dtype=dtype) * 2 + 1
    r = torch.randn(6, 12, 7, 5, generator=g, dtype=dtype) if residual else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(6, 12, 7, 5, generator=g, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for step in range(2):  # running statistics over two steps
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ra = r.clone().requires_grad_() if residual else None
        rb = r.clone().requires_grad_() if residual else None
        y = m(xa, ra)
        yr = torch.relu(ref(xb) + rb) if residual else torch.relu(ref(xb))
        torch.testing.assert_close(y, yr, **tol)
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
        y.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, **tol)
        if residual:
            torch.testing.assert_close(ra.grad, rb.grad, rtol=0, atol=0)
        torch.testing.assert_close(m.weight.grad, ref.weight.grad, **tol)
        torch.testing.assert_close(m.bias.grad, ref.bias.grad, **tol)
        torch.testing.assert_close(m.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(m.running_var, ref.running_var, **tol)
    m.eval()
    ref.eval()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = m(xa, r)
    yr = torch.relu(ref(xb) + r) if residual else torch.relu(ref(xb))
    torch.testing.assert_close(y, yr, **tol)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)


def test_other_activation_and_no_act():
    x = torch.randn(4, 3, 5, 5)
    m = BatchNormAct2d(3, act_layer=torch.nn.SiLU)
    ref = _reference(m)
    torch.testing.assert_close(m(x), torch.nn.functional.silu(ref(x)), rtol=1e-5, atol=1e-6)
    m = BatchNormAct2d(3, apply_act=False)
    ref = _reference(m)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-6)
    assert isinstance(m.act, torch.nn.Identity)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["silu", "relu-with-drop", "no-act-then-inplace"])
def test_in_place_ops_after_the_norm_backpropagate(act, training):
    """timm's default inplace=True activations (SiLU, ...), a drop layer before a ReLU, and an
    in-place add on an un-activated output modify the norm's output in place: the backward must
    not have kept it (only the fused ReLU reads it), as torch's BatchNorm2d does not."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, 5, generator=g)
    shortcut = torch.randn(4, 3, 5, 5, generator=g)
    if act == "silu":
        m = BatchNormAct2d(3, act_layer=torch.nn.SiLU)
        after = torch.nn.SiLU(inplace=True)
    elif act == "relu-with-drop":
        m = BatchNormAct2d(3, drop_layer=lambda: torch.nn.Dropout(0.0, inplace=True))
        after = torch.nn.ReLU(inplace=True)
    else:
        m = BatchNormAct2d(3, apply_act=False)
        after = None
    ref = _reference(m)
    m.train(training)
    ref.train(training)
    outs = []
    for layer in (m, ref):
        xr = x.clone().requires_grad_()
        out = layer(xr)
        if layer is ref and after is not None:
            out = after(out)
        if after is None:
            out += shortcut  # in place on the norm's output
            out = torch.relu(out)
        out.square().sum().backward()
        outs.append((out, xr.grad, layer.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_swapped_act_and_hooks_take_effect():
    """.act and .drop are read at every call (timm's forward calls them): swapping the ReLU for
    nn.Identity removes it, and a hook on .act fires (the fused op would skip both)."""
    x = torch.randn(4, 3, 5, 5)
    m = BatchNormAct2d(3)
    ref = _reference(m)
    assert (m(x) >= 0).all()
    m.act = torch.nn.Identity()
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-6)
    m.act = torch.nn.ReLU()
    seen = []
    m.act.register_forward_hook(lambda mod, inp, out: seen.append(out))
    y = m(x)
    assert len(seen) == 1 and seen[0] is y
    torch.testing.assert_close(y, torch.relu(ref(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,module", [("silu", torch.nn.SiLU), ("gelu", torch.nn.GELU), ("hard_swish", torch.nn.Hardswish),
                                         ("relu6", torch.nn.ReLU6), ("identity", torch.nn.Identity),
                                         ("gelu_tanh", lambda: torch.nn.GELU(approximate="tanh")),
                                         ("quick_gelu", lambda: lambda x: x * torch.sigmoid(1.702 * x)),
                                         ("hard_mish", lambda: lambda x: x * torch.clamp(x + 2, 0, 2) / 2),
                                         (None, torch.nn.Identity), ("", torch.nn.Identity)])  # (timm's: no activation)
def test_activation_names_as_timm_takes_them(name, module):
    m = BatchNormAct2d(3, act_layer=name)
    if isinstance(module, type):
        assert type(m.act) is module
    x = torch.randn(4, 3, 5, 5) * 3
    ref = _reference(m)
    torch.testing.assert_close(m(x), module()(ref(x)), rtol=1e-5, atol=1e-6)
    if name == "hard_mish":  # its pieces: 0 below -2, x (x + 2) / 2 between, x above 0
        t = torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.5])
        torch.testing.assert_close(m.act(t), torch.tensor([0.0, 0.0, -0.5, 0.0, 1.5]))
    with pytest.raises(ValueError, match="act_layer must be .* one of .*'silu'.* got 'sigmoidal'"):
        BatchNormAct2d(3, act_layer="sigmoidal")


def test_opcheck():
    x = torch.randn(4, 3, 5, 5)
    r = torch.randn(4, 3, 5, 5)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    torch.library.opcheck(torch.ops.batchnorm.forward_training_act, (x, r, w, b, rm, rv, 0.1, 1e-5, True))
    torch.library.opcheck(torch.ops.batchnorm.forward_inference_act, (x, r, rm, rv, w, b, 1e-5, True))
    y, mean, invstd, _, _ = torch.ops.batchnorm.forward_training_act(x, r, w, b, None, None, 0.1, 1e-5, True)
    torch.library.opcheck(torch.ops.batchnorm.backward_act, (torch.randn_like(x), x, y, mean, invstd, w, True, True))


def test_compile_fullgraph():
    m = BatchNormAct2d(8)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    r = torch.randn(4, 8, 6, 6, requires_grad=True)
    ref = BatchNormAct2d(8)
    ref.load_state_dict(m.state_dict())
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x, r)
    y.sum().backward()
    xe, re_ = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    ye = ref(xe, re_)
    ye.sum().backward()
    torch.testing.assert_close(y, ye)
    torch.testing.assert_close(x.grad, xe.grad)
    torch.testing.assert_close(r.grad, re_.grad)


def test_functional_errors():
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(ValueError, match="running_mean and running_var must be given"):
        batch_norm_act(x, None, None, training=False)
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        batch_norm_act(x, None, None, training=True, residual=torch.randn(4, 3, 5, 5, dtype=torch.float64))
    # relu is a flag: "no" was a ReLU on three routes and the dispatcher's error on the fourth
    for training in (True, False):
        for wants_grad in (False, True):
            with pytest.raises(TypeError, match="relu must be a bool, got str"):
                batch_norm_act(x.clone().requires_grad_(wants_grad), torch.zeros(3), torch.ones(3),
                               training=training, relu="no")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_weight_and_bias_of_any_shape_with_c_elements(training):
    """As batch_norm (torch's F.batch_norm): a (1, C) weight and a (C, 1) bias are its (C,)
    vectors, with their gradients in their own shapes; other sizes are refused by name."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    r = torch.randn_like(x)
    shaped = [torch.rand(1, 3, dtype=torch.float64, requires_grad=True),
              torch.rand(3, 1, dtype=torch.float64, requires_grad=True)]
    flat = [t.detach().reshape(-1).clone().requires_grad_() for t in shaped]
    ys = [batch_norm_act(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), *p,
                         training=training, residual=r) for p in (shaped, flat)]
    assert torch.equal(ys[0], ys[1])
    g = torch.randn_like(x)
    for y in ys:
        y.backward(g)
    for a, b in zip(shaped, flat):
        assert a.grad.shape == a.shape and torch.equal(a.grad.reshape(-1), b.grad)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\), got \(1, 2\)"):
        batch_norm_act(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                       torch.ones(1, 2, dtype=torch.float64), training=training)


def _bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_calls_give_the_bits_of_the_registered_ops(monkeypatch, dtype, residual, training):
    # As the plain layers (test_torch_module): eager calls skip the dispatcher (an
    # autograd.Function in training, inference without autograd when no gradient is wanted),
    # with the bits of the registered ops: outputs, gradients (the residual's too), buffers.
    import copy

    import batchnorm.torch._ops as _ops

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 12, 5, 4, generator=g) * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    r = torch.randn(6, 12, 5, 4, generator=g).to(dtype) if residual else None
    dy = torch.randn(6, 12, 5, 4, generator=g).to(dtype)
    m = BatchNormAct2d(12, dtype=dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2, generator=g), m.bias.normal_(generator=g)
    m.train(training)
    m_ops = copy.deepcopy(m)

    def step(layer):
        if not training:
            with torch.no_grad():
                return [layer(x, r), layer.running_mean, layer.running_var]
        xg = x.clone().requires_grad_()
        rg = r.clone().requires_grad_() if residual else None
        y = layer(xg, rg)
        y.backward(dy)
        grads = [xg.grad, layer.weight.grad, layer.bias.grad] + ([rg.grad] if residual else [])
        return [y, layer.running_mean, layer.running_var, layer.num_batches_tracked] + grads

    calls = []
    real = _ops.eager
    monkeypatch.setattr(_ops, "eager", lambda *t: calls.append(real(*t)) or calls[-1])
    fast = step(m)
    assert calls == [True], calls
    monkeypatch.setattr(_ops, "eager", lambda *t: False)
    slow = step(m_ops)
    for i, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert _bits(a) == _bits(b), i


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # (torch 2.13 deprecates them)
def test_quantized_input_is_refused_by_name():
    # Eager-mode quantization keeps our layers (it maps torch's types only): DLPack's BufferError.
    q = torch.quantize_per_tensor(torch.randn(2, 3, 4, 4), 0.1, 0, torch.quint8)
    for m in (bt.BatchNorm2d(3).eval(), BatchNormAct2d(3).eval(), bt.BatchNorm2d(3)):
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got a quantized one"):
            m(q)


def test_export_refuses_a_residual_the_op_refuses():
    # The fake kernels checked devices alone: a broadcast residual was exported, and refused
    # when the program ran (ONNX: no translation of our op for it).
    m = BatchNormAct2d(4).eval()
    x, r = torch.randn(2, 4, 3, 3), torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match=r"residual must have the shape of x, \(2, 4, 3, 3\), got \(1, 4, 1, 1\)"):
        torch.export.export(m, (x, r))
    with pytest.raises(TypeError, match="residual must have the dtype of x, float32, got float64"):
        torch.export.export(m.train(), (x, r.expand(2, 4, 3, 3).double()))


def test_jit_trace_of_the_fused_layer_warns_nothing():
    # _same() compared shapes before as_torchs() said no (four TracerWarnings a trace).
    import warnings

    m = BatchNormAct2d(4).eval()  # (in training torch's own batch-size check warns, for its layers too)
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(m, (x, r), check_trace=False)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
