"""decompositions(): batchnorm's registered ops written in torch's own ATen operations, for graphs
that leave this process's Python (a torch.export ExportedProgram for ONNX, ExecuTorch or
AOTInductor): `ep.run_decompositions(table)` replaces each op with the operations of torch's
own batch norm, which those runtimes know. The same function on torch's kernels: each
decomposition returns what the op returns (shapes, dtypes: the statistics and parameter
gradients in the accumulation dtype), checked against the op in tests/test_torch_export.py."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from . import norm_act as _norm_act  # noqa: F401  (defines the *_act ops)
from ._ops import _AXIS, _acc, _vector

aten = torch.ops.aten


def _act(y: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _like_x(t: Tensor, x: Tensor) -> Tensor:
    """`t` with the strides the op gives its outputs (torch.empty_like(x): x's own, where ATen
    returns a contiguous tensor for a transposed or permuted x). Where they agree, the copy is
    never made (the unused empty tensor is dead code in the graph)."""
    out = torch.empty_like(x)
    # aten.copy, not copy_: an in-place write into a fresh tensor is refused in a joint forward
    # and backward graph (torch.export's _export_forward_backward, ExecuTorch training).
    return t if out.stride() == t.stride() else aten.copy.default(out, t)


def _in(acc, *tensors: Optional[Tensor]) -> list:
    """The parameters and statistics in the accumulation dtype, which ATen's batch norm takes
    for any x (all of x's dtype, or float32 for a half x); the op takes any mix (float64 running
    statistics for a float32 x), which ATen refused ("mixed dtype"). A tensor already in it is
    itself (no node in the graph)."""
    return [None if t is None else t.to(acc) for t in tensors]


def _training(x, weight, bias, running_mean, running_var, momentum, eps, residual=None, relu=False):
    acc = _acc(x.dtype)
    C = x.shape[_AXIS]
    if x.numel() == 0:  # the op's empty batch: empty y, NaN statistics, running statistics unchanged
        nan = _vector(x, C).fill_(float("nan"))
        copies = [_vector(x, 0) if r is None else r.clone() for r in (running_mean, running_var)]
        return torch.empty_like(x), nan, nan.clone(), *copies
    weight, bias = _in(acc, weight, bias)
    if running_mean is None and running_var is None:  # (the op takes both or neither)
        y, mean, invstd = aten._native_batch_norm_legit.no_stats(x, weight, bias, True, momentum, eps)
        new_mean, new_var = _vector(x, 0), _vector(x, 0)  # the op's empty (0,) copies
    else:  # torch's functional batch norm: the running statistics' updated copies, as the op's
        y, mean, invstd, new_mean, new_var = aten._native_batch_norm_legit_functional.default(
            x, weight, bias, *_in(acc, running_mean, running_var), True, momentum, eps
        )
        new_mean, new_var = new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)
    return _like_x(_act(y, residual, relu), x), mean.to(acc), invstd.to(acc), new_mean, new_var


def _inference(x, mean, var, weight, bias, eps, residual=None, relu=False):
    if x.numel() == 0:
        return torch.empty_like(x)
    y = aten._native_batch_norm_legit_no_training.default(x, *_in(_acc(x.dtype), weight, bias, mean, var), 0.0, eps)[0]
    return _like_x(_act(y, residual, relu), x)


def _backward(dy, x, saved_mean, saved_invstd, weight, input_grad=True):
    acc = _acc(x.dtype)
    C = x.shape[_AXIS]
    if x.numel() == 0:  # the gradient of an empty batch's outputs (ATen's divides by the count)
        return torch.empty_like(x) if input_grad else _vector(x, 0), _vector(x, C).zero_(), _vector(x, C).zero_()
    # A half weight would make ATen's CPU kernel want half statistics: the weight in the
    # accumulation dtype, as the op computes (dx still comes back in x's dtype).
    weight = None if weight is None else weight.to(acc)
    dx, dweight, dbias = aten.native_batch_norm_backward.default(
        dy, x, weight, None, None, saved_mean, saved_invstd, True, 0.0, [input_grad, True, True]
    )
    return _like_x(dx, x) if input_grad else _vector(x, 0), dweight.to(acc), dbias.to(acc)


def _forward_training(x, weight, bias, running_mean, running_var, momentum, eps):
    return _training(x, weight, bias, running_mean, running_var, momentum, eps)


def _forward_training_act(x, residual, weight, bias, running_mean, running_var, momentum, eps, relu):
    return _training(x, weight, bias, running_mean, running_var, momentum, eps, residual, relu)


def _forward_inference_act(x, residual, mean, var, weight, bias, eps, relu):
    return _inference(x, mean, var, weight, bias, eps, residual, relu)


def _backward_act(dy, x, y, saved_mean, saved_invstd, weight, relu, residual):
    g = aten.threshold_backward.default(dy, y, 0) if relu else dy  # the ReLU's mask from y
    dx, dweight, dbias = _backward(g, x, saved_mean, saved_invstd, weight)
    dres = aten.copy.default(torch.empty_like(x), g) if residual else _vector(x, 0)  # (never dy itself; see _like_x)
    return dx, dweight, dbias, dres


def decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """{op: decomposition} for batchnorm's registered ops (torch.ops.batchnorm.forward_training,
    forward_inference, backward and their fused *_act forms), to pass to
    ExportedProgram.run_decompositions, alone or added to torch.export.default_decompositions().
    The training variants (forward_training_variant) have no ATen counterpart and stay ops."""
    ops = torch.ops.batchnorm
    return {
        ops.forward_training.default: _forward_training,
        ops.forward_inference.default: _inference,
        ops.backward.default: _backward,
        ops.forward_training_act.default: _forward_training_act,
        ops.forward_inference_act.default: _forward_inference_act,
        ops.backward_act.default: _backward_act,
    }
