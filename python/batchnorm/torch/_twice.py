"""Gradients that autograd can differentiate again: the backward of batch norm written in
torch operations, for a backward run with create_graph=True on tensors that require grad
(gradient penalties, Hessian-vector products, meta-learning). The kernels' backward is a
constant to autograd, so a second derivative through it would be zero; here the batch
statistics are recomputed from x, which puts their dependence on x into the graph and makes
the result differentiable to any order. A first-order backward never comes here."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def wanted(*tensors: Optional[Tensor]) -> bool:
    """Whether a backward must build a graph: autograd enables grad mode inside a backward only
    under create_graph=True, and the graph matters only if one of these requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(x: Tensor) -> Tuple[list, list]:
    """The reduced dims of (N, C, ...) and the shape that broadcasts a (C,) vector over x."""
    return [0] + list(range(2, x.dim())), [1, x.shape[1]] + [1] * (x.dim() - 2)


def masked(dy: Tensor, y: Tensor) -> Tensor:
    """The gradient through a ReLU whose output is y. The mask is piecewise constant, so its
    own derivative is zero wherever it is defined (as torch's threshold_backward)."""
    return torch.where(y > 0, dy, torch.zeros((), dtype=dy.dtype, device=dy.device))


def training(dy: Tensor, x: Tensor, weight: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of training batch norm on x, the parameter gradients in the
    accumulation dtype (as the kernels return them). With M values per channel and
    xhat = (x - mean) * invstd:
        dx = weight * invstd * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)."""
    acc = _acc(x.dtype)
    dims, shape = _layout(x)
    xa, g = x.to(acc), dy.to(acc)
    var, mean = torch.var_mean(xa, dim=dims, correction=0, keepdim=True)
    invstd = torch.rsqrt(var + eps)
    xhat = (xa - mean) * invstd
    M = max(x.numel() // max(x.shape[1], 1), 1)
    sum_g = g.sum(dims, keepdim=True)
    sum_gx = (g * xhat).sum(dims, keepdim=True)
    scale = invstd if weight is None else invstd * weight.to(acc).view(shape)
    dx = scale * (g - sum_g / M - xhat * (sum_gx / M))
    return dx.to(x.dtype), sum_gx.reshape(-1), sum_g.reshape(-1)


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
    """grads as they are, unless wanted(*tensors): then aliases whose own backward raises, so
    that a second derivative through `what` (whose backward is a constant to autograd) is an
    error rather than a silent zero. torch's once_differentiable looks at the incoming
    gradients only and misses the saved x that requires grad."""
    if not wanted(*tensors):
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
