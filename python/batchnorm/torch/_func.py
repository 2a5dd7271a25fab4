"""The ops under torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap and their
compositions) and under torch.autograd.forward_ad. The autograd that torch.library's
register_autograd attaches to an op refuses functorch transforms (its generated
autograd.Function has no setup_context staticmethod: pytorch/pytorch#168393) and has no
forward mode, so there the layers call each differentiable op through an autograd.Function
built here: the op itself forward, the op's own setup_context and backward (so the kernels
still run first-order backwards), the tangent rules of _twice, and vmap through the ops'
batching rules below, which fold the vmapped dim into the channels: one kernel call per op."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from . import _ops, _twice

def active() -> bool:
    """Whether a call must take this module's route: a functorch transform or a forward-mode AD
    level is active. (torch.compile traces the registered ops, as before.)"""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def _function(name: str, op: Callable, setup: Callable, backward: Callable, jvp: Callable,
              saved: Callable) -> type:
    """A new-style autograd.Function around `op` with the op's registered setup_context and
    backward; `jvp(ctx, *tangents)` reads the tensors saved(inputs, output) picks, the same
    that setup saves for the backward (ctx.saved_tensors in both)."""

    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.save_for_forward(*saved(inputs, output))

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"torch.ops.batchnorm's op {name} under functorch transforms (see the module).",
        "generate_vmap_rule": True,
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
    })


# ---- tangents: each op's y from the tangents of its inputs; its other outputs (statistics,
# running statistics) are non-differentiable, as in the backward ----------------------------


def _training_jvp(ctx, tx, tw, tb, *_):
    x, weight, mean, invstd = ctx.saved_tensors
    t = _twice.finish_tangent(_twice.training_tangent(x, mean, invstd, weight, tx, tw, tb), x, None, None)
    return t, None, None, None, None


def _variant_jvp(ctx, tx, tw, tb, *_):
    x, weight, mean, invstd, r, d = ctx.saved_tensors
    r, d = (r, d) if ctx.renorm else (None, None)
    t = _twice.variant_tangent(x, mean, invstd, weight, r, d, ctx.ghost_batch, tx, tw, tb)
    return (_twice.finish_tangent(t, x, None, None),) + (None,) * 6


def _inference_jvp(ctx, tx, tmean, tvar, tw, tb, _teps):
    x, mean, var, weight = ctx.saved_tensors
    t = _twice.inference_tangent(x, mean, var, weight, ctx.eps, tx, tmean, tvar, tw, tb)
    return _twice.finish_tangent(t, x, None, None)


def _training_act_jvp(ctx, tx, tres, tw, tb, *_):
    x, y, weight, mean, invstd = ctx.saved_tensors
    t = _twice.training_tangent(x, mean, invstd, weight, tx, tw, tb)
    return _twice.finish_tangent(t, x, tres, y if ctx.relu else None), None, None, None, None


def _inference_act_jvp(ctx, tx, tres, tmean, tvar, tw, tb, *_):
    x, y, mean, var, weight = ctx.saved_tensors
    t = _twice.inference_tangent(x, mean, var, weight, ctx.eps, tx, tmean, tvar, tw, tb)
    return _twice.finish_tangent(t, x, tres, y if ctx.relu else None)


_functions: dict = {}


def _built() -> dict:
    """The Functions, built on first use (norm_act and variants register their ops after _ops)."""
    if not _functions:
        from . import norm_act, variants

        ops = torch.ops.batchnorm
        _functions.update(
            forward_training=_function("forward_training", ops.forward_training, _ops._training_setup,
                                       _ops._training_backward, _training_jvp,
                                       lambda i, o: (i[0], i[1], o[1], o[2])),
            forward_inference=_function("forward_inference", ops.forward_inference, _ops._inference_setup,
                                        _ops._inference_backward, _inference_jvp,
                                        lambda i, o: i[:4]),
            forward_training_act=_function("forward_training_act", ops.forward_training_act,
                                           norm_act._training_setup, norm_act._training_backward,
                                           _training_act_jvp, lambda i, o: (i[0], o[0], i[2], o[1], o[2])),
            forward_inference_act=_function("forward_inference_act", ops.forward_inference_act,
                                            norm_act._inference_setup, norm_act._inference_backward,
                                            _inference_act_jvp, lambda i, o: (i[0], o, *i[2:5])),
            forward_training_variant=_function("forward_training_variant", ops.forward_training_variant,
                                               variants._setup, variants._autograd_backward, _variant_jvp,
                                               lambda i, o: (i[0], i[1], *o[1:5])),
        )
    return _functions


def call(name: str, *args: Any) -> Any:
    """torch.ops.batchnorm.<name>(*args), through its Function when active() holds."""
    if active():
        return _built()[name].apply(*args)
    return getattr(torch.ops.batchnorm, name)(*args)


# ---- vmap: batching rules that fold the vmapped dim B into the channels -------------------
# Batch norm of each of B stacked batches is batch norm of one batch with B * C channels:
# x (N, C, ...) vmapped at dim d becomes (N, B * C, ...), per-channel vectors (B * C,), and the
# results unfold without copies. One kernel call instead of B (torch's fallback loops over the
# batch, with a warning); only an x vmapped elsewhere than next to its channels is copied.


def _fold(t: Optional[Tensor], bdim: Optional[int], B: int, per_channel: bool) -> Optional[Tensor]:
    """(N, B * C, ...) of an x-like tensor, or (B * C,) of a per-channel one; None stays None."""
    if t is None:
        return None
    if per_channel:  # (C,) or (B, C)
        return t.repeat(B) if bdim is None else t.movedim(bdim, 0).reshape(-1)
    t = t.unsqueeze(1).expand(t.shape[0], B, *t.shape[1:]) if bdim is None else t.movedim(bdim, 1)
    return t.flatten(1, 2)


def rule(name: str, x_like: Tuple[int, ...], per_channel: Tuple[int, ...], outputs: Tuple[str, ...]) -> None:
    """Registers the batching rule of torch.ops.batchnorm.<name>: the arguments at x_like and
    per_channel are folded, the rest pass through; each output is 'x' (unfold at dim 1), 'c'
    (a (B, C) view), 'c?' or 'x?' (the same, or an empty (0,) placeholder of an absent output,
    left unbatched)."""
    op = getattr(torch.ops.batchnorm, name)

    def batched(info, in_dims, *args):
        B = info.batch_size
        folded = list(args)
        for i in x_like:
            folded[i] = _fold(args[i], in_dims[i], B, False)
        for i in per_channel:
            folded[i] = _fold(args[i], in_dims[i], B, True)
        result = op(*folded)
        single = not isinstance(result, tuple)
        values, dims = [], []
        for r, kind in zip((result,) if single else result, outputs):
            if kind == "x" or (kind == "x?" and r.dim() > 1):
                values.append(r.unflatten(1, (B, -1)))
                dims.append(1)
            elif kind.endswith("?") and r.dim() == 1 and r.numel() == 0:
                values.append(r)
                dims.append(None)
            else:
                values.append(r.view(B, -1))
                dims.append(0)
        return (values[0], dims[0]) if single else (tuple(values), tuple(dims))

    torch.library.register_vmap(f"batchnorm::{name}", batched, lib=_ops._lib)


# The plain ops' rules; norm_act.py registers those of the fused ops beside their definitions.
rule("forward_training", (0,), (1, 2, 3, 4), ("x", "c", "c", "c?", "c?"))
rule("forward_inference", (0,), (1, 2, 3, 4), ("x",))
rule("backward", (0, 1), (2, 3, 4), ("x?", "c", "c"))
