"""Derivatives in torch operations, which every autograd and functorch transform can
differentiate or batch again: the gradients of a backward whose result is differentiated again
(create_graph=True on tensors that require grad: gradient penalties, Hessian-vector products,
meta-learning; torch.func's hessian or grad of grad), and the forward-mode tangents (_func.py).
The kernels' backward is a constant to autograd, so a second derivative through it would be
zero. In training, the gradient is torch's own native_batch_norm_backward on the statistics
our forward saved: PyTorch differentiates that op again in C++, accounting for the batch
statistics' dependence on x, to any order. Inference is an affine map of x, written here in
torch operations. A first-order backward never comes here, torch.func.grad's included
unless autograd may differentiate its result again (a Parameter that requires grad).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ._ops import _acc, differentiated_again


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
    if _functorch(dy, x, weight):
        return _training_from_x(dy, x, weight, eps)
    w = None if weight is None else weight.to(acc)
    dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
        dy, x, w, None, None, mean.to(acc), invstd.to(acc), True, eps, [True, weight is not None, True]
    )
    return dx, dweight, dbias


def _functorch(*tensors: Optional[Tensor]) -> bool:
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and wrapped(t) for t in tensors)


def _normalized(x: Tensor, eps: float) -> Tuple[Tensor, Tensor, list, list]:
    """(x̂, s = 1 / sqrt(var + eps)) of training batch norm in the accumulation dtype, the
    statistics computed from x in torch operations (so that their dependence on x is recorded),
    with _layout(x)."""
    dims, shape = _layout(x)
    xa = x.to(_acc(x.dtype))
    centered = xa - xa.mean(dims, keepdim=True)
    s = torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)
    return centered * s, s, dims, shape


def _training_from_x(dy: Tensor, x: Tensor, weight: Optional[Tensor], eps: float) -> Tuple[Tensor, ...]:
    """training()'s gradients written in torch operations from x alone. Under torch.func, the
    batched double backward of native_batch_norm_backward gets the weight-x block of a Hessian
    wrong (jacrev over jacrev: H_wx != H_xw^T, torch 2.13, its own batch norm alike)."""
    xhat, s, dims, shape = _normalized(x, eps)
    g = dy.to(xhat.dtype)
    dbias = g.sum(dims)
    dweight = (g * xhat).sum(dims)
    gw = g if weight is None else g * weight.to(xhat.dtype).view(shape)
    dx = s * (gw - gw.mean(dims, keepdim=True) - xhat * (gw * xhat).mean(dims, keepdim=True))
    return dx.to(x.dtype), None if weight is None else dweight, dbias


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
    grads = [(g * scale).to(x.dtype), (g * xhat).sum(dims), g.sum(dims)]
    # torch's gradients require grad whenever x or the weight does (its double-backward node
    # takes both), constant as some are in them: so must ours, or a penalty on them raises.
    anchor = next((t for t in (x, weight) if t is not None and t.requires_grad), None)
    if anchor is not None and torch.is_grad_enabled() and not _functorch(dy, x, weight):
        grads = [v if v.requires_grad else _ConstantIn.apply(v, anchor) for v in grads]
    return grads[0], grads[1], grads[2]


class _ConstantIn(torch.autograd.Function):
    """value, recorded as a function of x (or the weight) with no gradient to it: inference's
    gradients are constant in x (an affine map) and its dweight and dbias in the weight, but
    under create_graph torch's own still require grad when x or the weight does (its
    double-backward node takes them), so a penalty on them differentiates (to no gradient)
    instead of raising "does not require grad"."""

    @staticmethod
    def forward(value: Tensor, x: Tensor) -> Tensor:
        return value.detach()  # (not a view: in-place ops on the gradient stay allowed)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None]:
        return grad, None

    @staticmethod
    def jvp(ctx: Any, tvalue: Optional[Tensor], tx: Optional[Tensor]) -> Optional[Tensor]:
        return tvalue


def refuse(what: str, grads: tuple, *tensors: Optional[Tensor]) -> tuple:
    """grads as they are, unless differentiated_again(*tensors): then aliases whose own backward raises, so
    that a second derivative through `what` (whose backward is a constant to autograd) is an
    error rather than a silent zero. torch's once_differentiable looks at the incoming
    gradients only and misses the saved x that requires grad."""
    if not differentiated_again(*tensors):
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    message = f"batchnorm.torch: no double backward (create_graph=True) through {what}; batch_norm, " \
              "batch_norm_act and the BatchNorm/BatchNormAct2d layers without variants have one"
    if _functorch(*tensors):
        raise RuntimeError(message)  # under torch.func (hessian, grad of grad): nothing to delay
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


# ---- forward mode (jvp): torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad ----------
# The tangent of y from the tangents of the inputs (None where an input has none), in torch
# operations so that every transform can differentiate or batch it again; None when no input
# has a tangent. With x̂ = (x - mean) * s, the tangent of training's x̂ is
# s * (tx - mean(tx) - x̂ * mean(x̂ * tx)) (the batch statistics move with x), inference's is
# s * tx plus the given statistics' share.


def _affine_tangent(txhat: Optional[Tensor], xhat: Tensor, weight: Optional[Tensor], tw: Optional[Tensor],
                    tb: Optional[Tensor], shape: list) -> Optional[Tensor]:
    t = None
    if txhat is not None:
        t = txhat if weight is None else txhat * weight.to(xhat.dtype).view(shape)
    if tw is not None:
        t = tw.to(xhat.dtype).view(shape) * xhat if t is None else t + tw.to(xhat.dtype).view(shape) * xhat
    if tb is not None:
        t = tb.to(xhat.dtype).view(shape).expand_as(xhat) if t is None else t + tb.to(xhat.dtype).view(shape)
    return t


def _xhat_tangent(x: Tensor, eps: float, tx: Optional[Tensor]):
    """(x̂, its tangent or None, the (C,)-broadcasting shape) of training batch norm, in the
    accumulation dtype, from x itself (not the saved statistics: a reverse mode over this
    forward mode, grad of jvp, needs their dependence on x)."""
    xhat, s, dims, shape = _normalized(x, eps)
    txhat = None
    if tx is not None:
        g = tx.to(xhat.dtype)
        txhat = s * (g - g.mean(dims, keepdim=True) - xhat * (xhat * g).mean(dims, keepdim=True))
    return xhat, txhat, shape


def training_tangent(x: Tensor, eps: float, weight: Optional[Tensor], tx: Optional[Tensor], tw: Optional[Tensor],
                     tb: Optional[Tensor]) -> Optional[Tensor]:
    """The tangent of training batch norm's y (before any add or activation), in the
    accumulation dtype."""
    xhat, txhat, shape = _xhat_tangent(x, eps, tx)
    return _affine_tangent(txhat, xhat, weight, tw, tb, shape)


def inference_tangent(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], eps: float,
                      tx: Optional[Tensor], tmean: Optional[Tensor], tvar: Optional[Tensor], tw: Optional[Tensor],
                      tb: Optional[Tensor]) -> Optional[Tensor]:
    """The tangent of inference batch norm's y (before any add or activation), in the
    accumulation dtype. The statistics' tangents count too (functorch hands every tensor
    argument a tangent, zeros where it has none): that of x̂ is s * (tx - tmean) - x̂ * s^2 *
    tvar / 2."""
    acc = _acc(x.dtype)
    _, shape = _layout(x)
    s = torch.rsqrt(var.to(acc) + eps).view(shape)
    xhat = (x.to(acc) - mean.to(acc).view(shape)) * s
    txhat = None if tx is None else tx.to(acc) * s
    if tmean is not None:
        tm = tmean.to(acc).view(shape) * s
        txhat = -tm if txhat is None else txhat - tm
    if tvar is not None:
        tv = xhat * (tvar.to(acc).view(shape) * s * s * 0.5)
        txhat = -tv if txhat is None else txhat - tv
    return _affine_tangent(txhat, xhat, weight, tw, tb, shape)


def finish_tangent(t: Optional[Tensor], x: Tensor, tres: Optional[Tensor], y: Optional[Tensor]) -> Optional[Tensor]:
    """The tangent of act(bn + residual) in x's dtype: the residual's tangent added, then masked
    by a ReLU whose output is y (None: no ReLU)."""
    if tres is not None:
        t = tres.to(t.dtype) + t if t is not None else tres
    if t is None:
        return None
    t = t.to(x.dtype)
    return t if y is None else masked(t, y)


# ---- the training variants (variants.py) --------------------------------------------------------
# Their y is plain batch norm's, but for batch renorm, y = w * (x̂ r + d) + b with r and d
# constants, and ghost batch norm, whose groups of G samples are the channels of one batch of G:
# group k's channel c is channel k * C + c of (G, groups * C, ...), the saved (groups, C)
# statistics flattened alike. The running-statistics options change no derivative.


def _ghost_fold(t: Tensor, groups: int) -> Tensor:
    return t.unflatten(0, (groups, -1)).movedim(0, 1).flatten(1, 2)


def _ghost_unfold(t: Tensor, groups: int) -> Tensor:
    return t.unflatten(1, (groups, -1)).movedim(1, 0).flatten(0, 1)


def variant_training(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], eps: float,
                     r: Optional[Tensor], d: Optional[Tensor], ghost_batch: int) -> Tuple[Tensor, Tensor, Tensor]:
    """training()'s (dx, dweight, dbias) for the variants: r and d given with renorm, ghost_batch
    > 0 with ghost batch norm."""
    if ghost_batch > 0 and x.numel() > 0:
        groups = x.shape[0] // ghost_batch
        w = None if weight is None else weight.repeat(groups)
        dx, dw, db = training(_ghost_fold(dy, groups), _ghost_fold(x, groups), mean.reshape(-1),
                              invstd.reshape(-1), w, eps)
        return _ghost_unfold(dx, groups), None if dw is None else dw.view(groups, -1).sum(0), db.view(groups, -1).sum(0)
    if r is None or x.numel() == 0:
        return training(dy, x, mean, invstd, weight, eps)
    acc = _acc(x.dtype)
    rr, dd = r.to(acc), d.to(acc)
    # dx is plain batch norm's with the weight w * r; dweight = sum(dy * (x̂ r + d))
    dx, dxhat, db = training(dy, x, mean, invstd, rr if weight is None else weight.to(acc) * rr, eps)
    return dx, dxhat * rr + db * dd, db


def variant_tangent(x: Tensor, eps: float, weight: Optional[Tensor], r: Optional[Tensor], d: Optional[Tensor],
                    ghost_batch: int, tx: Optional[Tensor], tw: Optional[Tensor],
                    tb: Optional[Tensor]) -> Optional[Tensor]:
    """training_tangent() for the variants (see variant_training)."""
    if ghost_batch > 0 and x.numel() > 0:
        groups = x.shape[0] // ghost_batch

        def rep(v: Optional[Tensor]) -> Optional[Tensor]:
            return None if v is None else v.repeat(groups)

        t = training_tangent(_ghost_fold(x, groups), eps, rep(weight),
                             None if tx is None else _ghost_fold(tx, groups), rep(tw), rep(tb))
        return None if t is None else _ghost_unfold(t, groups)
    if r is None:
        return training_tangent(x, eps, weight, tx, tw, tb)
    xhat, txhat, shape = _xhat_tangent(x, eps, tx)
    rr, dd = r.to(xhat.dtype).view(shape), d.to(xhat.dtype).view(shape)
    return _affine_tangent(None if txhat is None else txhat * rr, xhat * rr + dd, weight, tw, tb, shape)
