"""The training variants on the torch route (README "Variants"): ops registered with
torch.library (torch.ops.batchnorm.forward_training_variant / backward_variant, with fake and
autograd kernels, so torch.compile traces them) carrying running_var_unbiased, skip_nonfinite,
batch renorm (r and d returned, constants to the gradient) and ghost batch norm, and
batch_norm_variant, the functional form the modules' forward calls when a variant is on."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _C
from ..functional import _renorm_limits
from . import _func, _ops, _twice  # noqa: F401  (_ops: the plain ops, and the helpers below)
from ._ops import _AXIS, _acc, _call, _cap, _new_running, _vector

_lib = torch.library.Library("batchnorm", "FRAGMENT")
_lib.define(
    "forward_training_variant(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
    "float momentum, float eps, bool running_var_unbiased, bool skip_nonfinite, float[]? renorm, int ghost_batch) "
    "-> (Tensor y, Tensor saved_mean, Tensor saved_invstd, Tensor r, Tensor d, Tensor new_running_mean, "
    "Tensor new_running_var)", tags=_ops.TAGS
)
_lib.define(
    "backward_variant(Tensor dy, Tensor x, Tensor saved_mean, Tensor saved_invstd, Tensor? weight, Tensor? r, "
    "Tensor? d, int ghost_batch) -> (Tensor dx, Tensor dweight, Tensor dbias)", tags=_ops.TAGS
)


def _saved_shape(x: Tensor, ghost_batch: int) -> Sequence[int]:
    """(C,), or one row per group with ghost batch norm (the core checks that G divides N)."""
    C = _ops.channels(x)
    if ghost_batch > 0 and x.dim() > _AXIS and x.shape[0] % ghost_batch == 0:
        return (x.shape[0] // ghost_batch, C)
    return (C,)


def _outputs(x, running_mean, running_var, renorm, ghost_batch, fake):
    if renorm is not None:  # (the op's own callers too: a list of 3 met "too many values to unpack")
        _renorm_limits(renorm)
    shape = _saved_shape(x, ghost_batch)
    mean = torch.empty(shape, dtype=_acc(x.dtype), device=x.device)
    invstd = torch.empty(shape, dtype=_acc(x.dtype), device=x.device)
    C = _ops.channels(x) if renorm is not None else 0
    r, d = _vector(x, C), _vector(x, C)
    new_mean, new_var = _new_running(x, running_mean, fake), _new_running(x, running_var, fake)
    return torch.empty_like(x), mean, invstd, r, d, new_mean, new_var


@torch.library.impl(_lib, "forward_training_variant", "CPU")
@torch.library.impl(_lib, "forward_training_variant", "CUDA")
def _forward(x, weight, bias, running_mean, running_var, momentum, eps, unbiased, skip, renorm, ghost_batch):
    y, mean, invstd, r, d, new_mean, new_var = _outputs(x, running_mean, running_var, renorm, ghost_batch, False)
    if _ops.batchless(x):  # an empty batch (torch's rule): empty y, running statistics unchanged
        nan = float("nan")
        return y, mean.fill_(nan), invstd.fill_(nan), r.fill_(nan), d.fill_(nan), new_mean, new_var
    rmax, dmax = renorm if renorm is not None else (1.0, 0.0)
    results = _C.forward_training(
        _cap(x), _cap(weight), _cap(bias),
        _cap(None if running_mean is None else new_mean), _cap(None if running_var is None else new_var),
        momentum, eps, _AXIS, _cap(y), None, None, 0, _call(x), _cap(mean), _cap(invstd),
        None, 0, unbiased, skip, renorm is not None, rmax, dmax, ghost_batch,
    )  # fmt: skip
    if renorm is not None:  # the core allocates r and d (C,) itself
        r, d = torch.from_dlpack(results[3]), torch.from_dlpack(results[4])
    return y, mean, invstd, r, d, new_mean, new_var


@torch.library.register_fake("batchnorm::forward_training_variant", lib=_lib)
def _forward_fake(x, weight, bias, running_mean, running_var, momentum, eps, unbiased, skip, renorm, ghost_batch):
    _ops.on_x_device(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    return _outputs(x, running_mean, running_var, renorm, ghost_batch, True)


@torch.library.impl(_lib, "backward_variant", "CPU")
@torch.library.impl(_lib, "backward_variant", "CUDA")
def _backward(dy, x, saved_mean, saved_invstd, weight, r, d, ghost_batch):
    C = _ops.channels(x)
    dx, dweight, dbias = torch.empty_like(x), _vector(x, C), _vector(x, C)
    if _ops.batchless(x):
        return dx, dweight.zero_(), dbias.zero_()
    _C.backward(
        _cap(dy), _cap(x), _cap(saved_mean), _cap(saved_invstd), _cap(weight), _AXIS, _cap(dx), _call(x),
        _cap(dweight), _cap(dbias), None, 0, False, None, _cap(r), _cap(d), ghost_batch,
    )  # fmt: skip
    return dx, dweight, dbias


@torch.library.register_fake("batchnorm::backward_variant", lib=_lib)
def _backward_fake(dy, x, saved_mean, saved_invstd, weight, r, d, ghost_batch):
    _ops.on_x_device(x, dy=dy, saved_mean=saved_mean, saved_invstd=saved_invstd, weight=weight, r=r, d=d)
    C = _ops.fake_channels(x, weight, saved_mean)
    return torch.empty_like(x), _vector(x, C), _vector(x, C)


# vmap of a gradient: the op on each mapped slice (_func.looped_rule says why not folded).
_func.looped_rule("backward_variant")


def _setup(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.eps = inputs[6]
    ctx.renorm = inputs[9] is not None
    ctx.ghost_batch = inputs[10]
    y, mean, invstd, r, d, new_mean, new_var = output
    ctx.save_for_backward(x, weight, mean, invstd, r, d)
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, invstd, r, d, new_mean, new_var)


def _autograd_backward(ctx, dy, *_unused):
    x, weight, mean, invstd, r, d = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    r, d = (r, d) if ctx.renorm else (None, None)
    if _ops.differentiated_again(dy, x, weight):  # a gradient differentiated again (_twice)
        dx, dweight, dbias = _twice.variant_training(dy, x, mean, invstd, weight, ctx.eps, r, d, ctx.ghost_batch)
    else:
        with torch.no_grad():
            dx, dweight, dbias = torch.ops.batchnorm.backward_variant(dy, x, mean, invstd, weight, r, d,
                                                                      ctx.ghost_batch)
    return (dx if needs_x else None, *_ops.param_grads(ctx, dweight, dbias, needs_w, needs_b)) + (None,) * 8


torch.library.register_autograd(
    "batchnorm::forward_training_variant", _autograd_backward, setup_context=_setup, lib=_lib
)


def batch_norm_variant(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    running_var_unbiased: bool = True,
    skip_nonfinite: bool = False,
    renorm: Optional[Sequence[float]] = None,
    ghost_batch: Optional[int] = None,
) -> Tensor:
    """Training-mode batch norm with the variants of batchnorm.forward_training (the running
    statistics, when given, updated in place). Evaluation is plain batch norm (batch_norm)."""
    try:
        _ops.check_running(running_mean, running_var)
        _ops.check_separate_running(running_mean, running_var)
        _ops.check_scalars(True, momentum, eps)
        if not _ops.eager(input) and _ops.exporting_onnx():  # (export traces: eager() is False, and cheap)
            raise RuntimeError(
                "torch.onnx.export of batch norm with training variants on batch statistics is not supported (ONNX "
                "has no renorm, ghost batches, skip_nonfinite or biased running variance); export the model in eval "
                "mode (model.eval()) with running statistics, where these layers are plain batch norm"
            )
        momentum, eps = _ops.plain_scalars(momentum, eps)
        renorm_list = None if renorm is None else list(_renorm_limits(renorm))
        y, _, _, _, _, new_mean, new_var = _func.call(
            "forward_training_variant", input, weight, bias, running_mean, running_var, momentum, eps,
            running_var_unbiased, skip_nonfinite, renorm_list, 0 if ghost_batch is None else int(ghost_batch),
        )  # fmt: skip
        _ops.write_running(running_mean, new_mean, running_var, new_var)
        return y
    except (AttributeError, RuntimeError, BufferError):
        _ops.check_tensors(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
        raise
