"""BatchNormAct2d: batch norm fused with a residual add and a ReLU, with timm's interface
(timm.layers.norm_act.BatchNormAct2d: act_layer / apply_act / inplace / drop_layer) and its
forward(x) plus an optional `residual`: y = act(bn(x) + residual) in the passes of plain batch
norm. The fused ops are registered with torch.library (torch.ops.batchnorm.*_act, fake and
autograd kernels beside them), so torch.compile traces them."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.dlpack import to_dlpack

from .. import _C
from ..functional import _check_bool
from . import _func, _ops, _twice
from ._ops import _AXIS, _call, _cap, _dtypes, _inference_grads, _new_running, _train, _vector
from ._ops import per_channel, per_channel_results
from .modules import scripted_batch_norm

_lib = torch.library.Library("batchnorm", "FRAGMENT")
_lib.define(
    "forward_training_act(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? running_mean, "
    "Tensor? running_var, float momentum, float eps, bool relu) -> (Tensor y, Tensor saved_mean, "
    "Tensor saved_invstd, Tensor new_running_mean, Tensor new_running_var)", tags=_ops.TAGS
)
_lib.define(
    "forward_inference_act(Tensor x, Tensor? residual, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
    "float eps, bool relu) -> Tensor", tags=_ops.TAGS
)
_lib.define(
    "backward_act(Tensor dy, Tensor x, Tensor y, Tensor saved_mean, Tensor saved_invstd, Tensor? weight, "
    "bool relu, bool residual) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dresidual)", tags=_ops.TAGS
)


def _code(relu: bool) -> int:
    return 1 if relu else 0


@torch.library.impl(_lib, "forward_training_act", "CPU")
@torch.library.impl(_lib, "forward_training_act", "CUDA")
def _forward_training_act(x, residual, weight, bias, running_mean, running_var, momentum, eps, relu):
    new_mean, new_var = _new_running(x, running_mean, False), _new_running(x, running_var, False)
    y, mean, invstd = _train(x, weight, bias, None if running_mean is None else new_mean,
                             None if running_var is None else new_var, momentum, eps, residual, _code(relu))
    return y, mean, invstd, new_mean, new_var


def _residual_like_x(x: Tensor, residual: Optional[Tensor]) -> None:
    """The fused forward's residual check in its fake kernels (the core's words): traced by
    torch.export, a broadcast residual was exported, and refused only when the program ran."""
    if residual is None:
        return
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x, {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have the dtype of x, {str(x.dtype)[6:]}, got {str(residual.dtype)[6:]}")


@torch.library.register_fake("batchnorm::forward_training_act", lib=_lib)
def _forward_training_act_fake(x, residual, weight, bias, running_mean, running_var, momentum, eps, relu):
    _ops.on_x_device(x, residual=residual, weight=weight, bias=bias, running_mean=running_mean,
                     running_var=running_var)
    _residual_like_x(x, residual)
    C = _ops.fake_channels(x, weight, bias)
    new_mean, new_var = _new_running(x, running_mean, True), _new_running(x, running_var, True)
    return torch.empty_like(x), _vector(x, C), _vector(x, C), new_mean, new_var


@torch.library.impl(_lib, "forward_inference_act", "CPU")
@torch.library.impl(_lib, "forward_inference_act", "CUDA")
def _forward_inference_act(x, residual, mean, var, weight, bias, eps, relu):
    y = torch.empty_like(x)
    _C.forward_inference(
        to_dlpack(x), to_dlpack(mean), to_dlpack(var), _cap(weight), _cap(bias), eps, _AXIS, to_dlpack(y), _call(x),
        _cap(residual), _code(relu),
    )  # fmt: skip
    return y


@torch.library.register_fake("batchnorm::forward_inference_act", lib=_lib)
def _forward_inference_act_fake(x, residual, mean, var, weight, bias, eps, relu):
    _ops.on_x_device(x, residual=residual, mean=mean, var=var, weight=weight, bias=bias)
    _residual_like_x(x, residual)
    return torch.empty_like(x)


@torch.library.impl(_lib, "backward_act", "CPU")
@torch.library.impl(_lib, "backward_act", "CUDA")
def _backward_act(dy, x, y, saved_mean, saved_invstd, weight, relu, residual):
    C = _ops.channels(x)
    dx = torch.empty_like(x)
    if _ops.batchless(x):
        return dx, _vector(x, C).zero_(), _vector(x, C).zero_(), torch.empty_like(x) if residual else _vector(x, 0)
    dres = torch.empty_like(x) if residual else _vector(x, 0)
    grads = per_channel(x, C)
    results = _C.backward(
        to_dlpack(dy), to_dlpack(x), to_dlpack(saved_mean), to_dlpack(saved_invstd), _cap(weight), _AXIS,
        to_dlpack(dx), _call(x), _cap(grads[0]), _cap(grads[1]), to_dlpack(y) if relu else None, _code(relu),
        residual, to_dlpack(dres) if residual else None,
    )  # fmt: skip
    return (dx, *per_channel_results(grads, results[1:3]), dres)


@torch.library.register_fake("batchnorm::backward_act", lib=_lib)
def _backward_act_fake(dy, x, y, saved_mean, saved_invstd, weight, relu, residual):
    _ops.on_x_device(x, dy=dy, y=y, saved_mean=saved_mean, saved_invstd=saved_invstd, weight=weight)
    C = _ops.fake_channels(x, weight, saved_mean)
    return torch.empty_like(x), _vector(x, C), _vector(x, C), torch.empty_like(x) if residual else _vector(x, 0)


# vmap: the vmapped dim folded into the channels (_func._FOLDS)
for _name in ("forward_training_act", "forward_inference_act", "backward_act"):
    _func.rule(_name)


def _mask_source(y: Tensor, relu: bool) -> Optional[Tensor]:
    """What the backward keeps of the output: y for the ReLU's mask, nothing without one, so
    that an in-place op on the output (an activation after BN, out += shortcut) does not
    invalidate a saved tensor the backward never reads."""
    return y if relu else None


def _training_setup(ctx, inputs, output):
    x, residual, weight, bias = inputs[:4]
    ctx.relu, ctx.eps = inputs[8], inputs[7]
    ctx.residual = residual is not None
    y, mean, invstd, new_mean, new_var = output
    ctx.save_for_backward(x, _mask_source(y, ctx.relu), weight, mean, invstd)
    _dtypes(ctx, weight, bias)
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)


def _training_grads(ctx, dy, backward):
    """(dx, dresidual, dweight, dbias), each None unless needed, from `backward` (the op, or
    its kernel), or differentiable again when a second derivative may follow (_twice)."""
    dy = _ops.resolved(dy)
    x, y, weight, mean, invstd = ctx.saved_tensors
    needs_x, needs_r, needs_w, needs_b = ctx.needs_input_grad[:4]
    # y carries the residual and bias into the ReLU's gradient.
    if _ops.differentiated_again(dy, x, weight, y if ctx.relu else None):
        dres = _twice.masked(dy, y) if ctx.relu else dy
        dx, dweight, dbias = _twice.training(dres, x, mean, invstd, weight, ctx.eps)
    else:
        dx, dweight, dbias, dres = _ops.unrecorded(  # nothing differentiates it (see _ops._inference_grads)
            backward, dy, x, y if ctx.relu else x, mean, invstd, weight, ctx.relu, ctx.residual and needs_r
        )  # (without the ReLU y is not read, nor kept: x stands in for the op's Tensor argument)
    return (dx if needs_x else None, dres if ctx.residual and needs_r else None,
            *_ops.param_grads(ctx, dweight, dbias, needs_w, needs_b))


def _training_backward(ctx, dy, _dmean, _dinvstd, _dnew_mean, _dnew_var):
    return _training_grads(ctx, dy, torch.ops.batchnorm.backward_act) + (None,) * 5


torch.library.register_autograd(
    "batchnorm::forward_training_act", _training_backward, setup_context=_training_setup, lib=_lib
)


def _inference_setup(ctx, inputs, output):
    x, residual, mean, var, weight, bias, eps, relu = inputs
    ctx.eps, ctx.relu, ctx.residual = eps, relu, residual is not None
    ctx.save_for_backward(x, _mask_source(output, relu), mean, var, weight)
    _dtypes(ctx, weight, bias)


def _inference_backward(ctx, dy):
    # y = act((x - mean) * s * weight + bias + residual), s = 1 / sqrt(var + eps): with g the
    # gradient through the activation, dx is the inference op itself on g with a zero mean,
    # the residual's gradient is g, and the parameter gradients are the training backward's
    # reductions of g taken with (mean, s).
    x, y, mean, var, weight = ctx.saved_tensors
    needs_x, needs_r, needs_mean, needs_var, needs_w, needs_b = ctx.needs_input_grad[:6]
    g = torch.ops.aten.threshold_backward(dy, y, 0) if ctx.relu else dy
    dx, gw, gb = _inference_grads(ctx, g, x, mean, var, weight, (needs_x, needs_mean, needs_var, needs_w, needs_b))
    return dx, (g if ctx.residual and needs_r else None), None, None, gw, gb, None, None


torch.library.register_autograd(
    "batchnorm::forward_inference_act", _inference_backward, setup_context=_inference_setup, lib=_lib
)


class _TrainingAct(torch.autograd.Function):
    """forward_training_act's autograd without the dispatcher, for eager calls (see
    _ops.eager); the running statistics as in _ops._Training."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running, momentum, eps, relu):
        y, mean, invstd = _train(x, weight, bias, *running, momentum, eps, residual, _code(relu))
        _ops.bump_versions(x, running)
        ctx.relu, ctx.residual, ctx.eps = relu, residual is not None, eps
        ctx.save_for_backward(x, _mask_source(y, relu), weight, mean, invstd)
        _dtypes(ctx, weight, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        backward = _backward_act if _ops.kernel_takes(dy) else torch.ops.batchnorm.backward_act
        return _training_grads(ctx, dy, backward) + (None,) * 4


_training_act_apply = _ops.direct_apply(_TrainingAct)


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    relu: bool = True,
) -> Tensor:
    """relu(batch_norm(input, ...) + residual) (relu=False: without the ReLU; residual None:
    without the add) as one op, with torch.nn.functional.batch_norm's arguments. Under
    torch.jit.script: torch's batch norm, add and ReLU."""
    if torch.jit.is_scripting():
        return _unfused(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu)
    return _batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu)


@torch.jit.unused
def _batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    residual: Optional[Tensor],
    relu: bool,
) -> Tensor:
    if _ops.has_torch_function_variadic(input, running_mean, running_var, weight, bias, residual):
        tensors = (input, running_mean, running_var, weight, bias)  # as torch.nn.functional's: FX, modes
        return _ops.handle_torch_function(batch_norm_act, tensors + (residual,), *tensors, training, momentum, eps,
                                          residual=residual, relu=relu)
    try:
        _ops.check_running(running_mean, running_var)
        _ops.check_scalars(training, momentum, eps)
        relu = _check_bool(relu, "relu")  # ("no" was a ReLU on three routes, the dispatcher's error on one)
        weight, bias = _ops.flat_affine(input, weight, bias)
        if training:
            if input.dim() > 1:  # (as batch_norm's)
                F._verify_batch_size(input.size())
            if _ops.eager(input, residual, weight, bias, running_mean, running_var):
                _ops.check_inference_tensors(input, weight, bias, (running_mean, running_var))
                u = _ops.unwrap_dead
                return _training_act_apply(
                    u(input), u(residual), u(weight), u(bias), (running_mean, running_var), momentum, eps, relu
                )
            _ops.check_separate_running(running_mean, running_var)
            momentum, eps = _ops.plain_scalars(momentum, eps)
            if _ops.as_torchs(input, weight, bias, running_mean, running_var, momentum, eps) and _same(input, residual):
                return _unfused(input, running_mean, running_var, weight, bias, True, momentum, eps, residual, relu)
            y, _, _, new_mean, new_var = _func.call(
                "forward_training_act", input, residual, weight, bias, running_mean, running_var, momentum, eps, relu
            )
            _ops.write_running(running_mean, new_mean, running_var, new_var)
            return y
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given when training=False, got None")
        try:
            if not _ops.wants_grad(input, residual, weight, bias) and \
                    _ops.eager(input, residual, weight, bias, running_mean, running_var):
                return _forward_inference_act(input, residual, running_mean, running_var, weight, bias, eps, relu)
            eps = _ops.plain_scalar(eps)
            if _ops.as_torchs(input, weight, bias, running_mean, running_var, None, eps) and _same(input, residual):
                return _unfused(input, running_mean, running_var, weight, bias, False, momentum, eps, residual, relu)
            return _func.call("forward_inference_act", input, residual, running_mean, running_var, weight, bias, eps,
                              relu)
        except (ValueError, TypeError) as e:
            raise _ops.named_running(e) from None
    except (AttributeError, RuntimeError, BufferError):
        _ops.check_tensors(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
                           residual=residual)
        raise


def _same(x: Tensor, residual: Optional[Tensor]) -> bool:
    """Whether the residual (if any) has x's shape and dtype. One that has not takes our op, whose
    checks refuse it as the eager call does (torch's add would broadcast or promote it)."""
    return residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)


def _unfused(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    residual: Optional[Tensor],
    relu: bool,
) -> Tensor:
    """batch_norm_act in torch's own operations, for torch.onnx.export (BatchNormalization, Add
    and Relu, which ONNX runtimes fuse themselves), torch.compile (which Inductor fuses; see
    _ops.as_torchs) and TorchScript."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


class GELUTanh(nn.GELU):
    """GELU's tanh approximation (timm's "gelu_tanh")."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__(approximate="tanh")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), CLIP's GELU approximation (timm's "quick_gelu")."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class HardMish(nn.Module):
    """0.5 x clamp(x + 2, 0, 2), the piecewise-quadratic Mish (timm's "hard_mish")."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (x + 2).clamp(min=0, max=2)


# Activation names as timm's get_act_layer takes them: every name of its factory, as torch.nn's
# modules where torch has the function (timm's own classes compute the same).
_ACT_NAMES = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "celu": nn.CELU,
    "selu": nn.SELU, "gelu": nn.GELU, "gelu_tanh": GELUTanh, "quick_gelu": QuickGELU, "silu": nn.SiLU,
    "swish": nn.SiLU, "mish": nn.Mish, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hard_sigmoid": nn.Hardsigmoid,
    "hardsigmoid": nn.Hardsigmoid, "hard_swish": nn.Hardswish, "hardswish": nn.Hardswish, "hard_mish": HardMish,
    "prelu": nn.PReLU, "identity": nn.Identity,
}


def _make_act(act_layer: Any, act_kwargs: Optional[dict], inplace: bool) -> nn.Module:
    """The activation module, built as timm builds it (inplace where the class takes it); None
    or "" is no activation, as timm's get_act_layer makes them."""
    if act_layer is None or (isinstance(act_layer, str) and not act_layer):
        return nn.Identity()
    if isinstance(act_layer, str):
        if act_layer not in _ACT_NAMES:
            raise ValueError(f"act_layer must be an nn.Module class, a callable or one of {sorted(_ACT_NAMES)}, "
                             f"got {act_layer!r}")
        act_layer = _ACT_NAMES[act_layer]
    if isinstance(act_layer, type) and issubclass(act_layer, nn.Module):
        kwargs = dict(act_kwargs or {})
        try:
            return act_layer(inplace=inplace, **kwargs)
        except TypeError:
            return act_layer(**kwargs)
    if callable(act_layer):
        return _Callable(act_layer)
    raise TypeError(f"act_layer must be an nn.Module class, a callable or an activation name, got "
                    f"{type(act_layer).__name__}")


_RELU_FUNCTIONS = (F.relu, torch.relu)


def _hooked(module: nn.Module) -> bool:
    """Whether calling the module runs hooks (its own or every module's), which the fused path
    would skip."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    g = torch.nn.modules.module
    everyone = (g._global_forward_hooks, g._global_forward_pre_hooks, g._global_backward_hooks,
                g._global_backward_pre_hooks)
    return any(own) or any(everyone)


class _Callable(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d on batchnorm's fused kernels: BatchNorm2d followed by an optional
    drop layer and activation (apply_act, act_layer, act_kwargs, inplace, drop_layer as in
    timm; an instance of nn.BatchNorm2d with its parameters, buffers and state_dict keys).
    forward(x, residual=None) computes act(bn(x) + residual); with a ReLU (timm's default)
    and no drop layer, batch norm, the add and the ReLU are one fused op."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Any = nn.ReLU,
        act_kwargs: Optional[dict] = None,
        inplace: bool = True,
        drop_layer: Optional[Any] = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer, act_kwargs, inplace) if apply_act else nn.Identity()

    def _fused_relu(self) -> Optional[bool]:
        """Whether the fused op applies its ReLU (a plain ReLU, or no activation, with no drop
        layer in between), or None for the unfused path. Read from .drop and .act at every
        call, not at construction: a loop that swaps .act (for nn.Identity, another
        activation) or a hook on either module takes effect, as in timm's forward."""
        if type(self.drop) is not nn.Identity or _hooked(self.drop):
            return None
        act = self.act
        if _hooked(act):
            return None
        if type(act) is nn.Identity:
            return False
        if type(act) is nn.ReLU or (type(act) is _Callable and act.fn in _RELU_FUNCTIONS):
            return True
        return None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        if torch.jit.is_scripting():
            return self._scripted(x, residual)
        return self._forward(x, residual)

    def _scripted(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        """timm's forward in TorchScript, on torch's batch norm (see modules._Base._scripted)."""
        self._check_input_dim(x)
        y = scripted_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.num_batches_tracked, self.training, self.track_running_stats, self.momentum,
                                self.eps)
        y = self.drop(y)
        if residual is not None:
            y = y + residual
        return self.act(y)

    @torch.jit.unused
    def _forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if isinstance(x, _ops.Proxy) or isinstance(residual, _ops.Proxy):  # torch.fx.symbolic_trace
            return _ops.traced(self, x) if residual is None else _ops.traced(self, x, residual)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        counted = self.num_batches_tracked if self.training and self.track_running_stats else None
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        rm = self.running_mean if tracked else None
        rv = self.running_var if tracked else None
        relu = self._fused_relu()
        fused = relu is not None
        if counted is not None and self.momentum is None and rm is not None and rv is not None \
                and torch.compiler.is_compiling():  # (the cumulative average in the graph: modules.py)
            y = _ops.compiled_cumulative(
                lambda mean, var, momentum: _batch_norm_act(x, mean, var, self.weight, self.bias, True, momentum,
                                                            self.eps, residual if fused else None, bool(relu)),
                x, rm, rv, counted,
            )
        else:
            if counted is not None and self.momentum is None:  # counted once the batch has run (modules.py)
                factor = 1.0 / (float(counted) + 1.0)
            version = _ops.version(rm, counted)
            try:
                y = _batch_norm_act(x, rm, rv, self.weight, self.bias, bn_training, factor, self.eps,
                                    residual if fused else None, bool(relu))
            except BaseException:
                _ops.count_interrupted(counted, rm, version)
                raise
            if counted is not None:
                counted.add_(1)
        if fused:
            return y
        y = self.drop(y)
        if residual is not None:
            y = y + residual
        return self.act(y)
