"""Gradients that autograd can differentiate again, for a backward run with create_graph=True
on tensors that require grad (gradient penalties, Hessian-vector products, meta-learning).
The kernels' backward is a constant to autograd, so a second derivative through it would be
zero. In training, the gradient is torch's own native_batch_norm_backward on the statistics
our forward saved: PyTorch differentiates that op again in C++, accounting for the batch
statistics' dependence on x, to any order. Inference is an affine map of x, written here in
torch operations. A first-order backward never comes here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._ops import _acc, wants_grad


def _layout(x: Tensor) -> Tuple[list, list]:
    """The reduced dims of (N, C, ...) and the shape that broadcasts a (C,) vector over x."""
    return [0] + list(range(2, x.dim())), [1, x.shape[1]] + [1] * (x.dim() - 2)


def masked(dy: Tensor, y: Tensor) -> Tensor:
    """The gradient through a ReLU whose output is y: torch's own threshold_backward, whose
    derivative in y is zero (the mask is piecewise constant) but recorded, so a gradient that
    depends on the residual or bias only through y still has a graph, as torch's ReLU gives."""
    return torch.ops.aten.threshold_backward(dy, y, 0)


def training(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of training batch norm on x with its saved (mean, invstd), the
    parameter gradients in the accumulation dtype (as the kernels return them). Half inputs
    take their weight in float32, torch's mixed-type form: the saved statistics stay float32
    (torch's same-dtype form would round them to the half type)."""
    acc = _acc(x.dtype)
    if x.numel() == 0:  # identically zero (and torch's kernel divides by the count: SIGFPE);
        # zeros made from the inputs keep a graph, so a penalty on them differentiates to zero
        dims, _ = _layout(x)
        zeros = (dy.to(acc) + x.to(acc)).sum(dims) * 0
        return (dy + x) * 0, zeros if weight is None else zeros + weight.to(acc) * 0, zeros.clone()
    w = None if weight is None else weight.to(acc)
    dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
        dy, x, w, None, None, mean.to(acc), invstd.to(acc), True, eps, [True, weight is not None, True]
    )
    return dx, dweight, dbias


def inference(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of inference batch norm, y = (x - mean) * s * weight + bias with
    s = 1 / sqrt(var + eps): an affine map of x."""
    acc = _acc(x.dtype)
    dims, shape = _layout(x)
    g = dy.to(acc)
    s = torch.rsqrt(var.to(acc) + eps).view(shape)
    xhat = (x.to(acc) - mean.to(acc).view(shape)) * s
    scale = s if weight is None else s * weight.to(acc).view(shape)
    return (g * scale).to(x.dtype), (g * xhat).sum(dims), g.sum(dims)


def refuse(what: str, grads: tuple, *tensors: Optional[Tensor]) -> tuple:
    """grads as they are, unless wants_grad(*tensors): then aliases whose own backward raises, so
    that a second derivative through `what` (whose backward is a constant to autograd) is an
    error rather than a silent zero. torch's once_differentiable looks at the incoming
    gradients only and misses the saved x that requires grad."""
    if not wants_grad(*tensors):
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    message = f"batchnorm.torch: no double backward (create_graph=True) through {what}; batch_norm, " \
              "batch_norm_act and the BatchNorm/BatchNormAct2d layers without variants have one"
    # The inputs that require grad join the error node's inputs: autograd then finds them
    # reachable and runs the node (which raises) instead of reporting them unused.
    sources = [t for t in tensors if t is not None and t.requires_grad]
    inputs = [grads[i].detach().requires_grad_() for i in present] + sources
    aliases = torch._C._functions.DelayedError(message.encode(), len(inputs))(*inputs)
    aliases = aliases if isinstance(aliases, tuple) else (aliases,)
    out = list(grads)
    for i, a in zip(present, aliases):
        out[i] = a
    return tuple(out)
