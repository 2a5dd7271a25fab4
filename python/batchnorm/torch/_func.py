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


def _function(name: str, op: Callable, setup: Callable, backward: Callable, jvp: Callable, saved: Callable,
              vmap: Callable) -> type:
    """A new-style autograd.Function around `op` with the op's registered setup_context and
    backward; `jvp(ctx, *tangents)` reads the tensors saved(inputs, output) picks, the same
    that setup saves for the backward (ctx.saved_tensors in both); `vmap(fn, info, in_dims,
    *args)` batches it, calling the Function fn again on the unbatched arguments (so that outer
    transforms see it). A vmap rule of our own rather than generate_vmap_rule: a generated rule
    batches the jvp, which returns no tangent for the statistics, and jvp over vmap then fails
    an internal assert in torch 2.13."""

    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.save_for_forward(*saved(inputs, output))

    def tangents(ctx, *args):
        _no_nested_forward()
        return jvp(ctx, *args)

    fn = type(name, (torch.autograd.Function,), {
        "__doc__": f"torch.ops.batchnorm's op {name} under functorch transforms (see the module).",
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(tangents),
    })
    fn.vmap = staticmethod(lambda info, in_dims, *args: vmap(fn, info, in_dims, *args))
    return fn


def _no_nested_forward() -> None:
    """torch does not differentiate an autograd.Function's jvp again in an outer forward level
    (jvp of jvp, jacfwd of jacfwd): the result would be silently zero, so refuse it."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    if sum(i.key() == torch._C._functorch.TransformType.Jvp for i in stack) > 1:
        raise NotImplementedError(
            "batchnorm.torch: no forward mode over forward mode (jvp of jvp, jacfwd of jacfwd): torch does not "
            "differentiate an autograd.Function's jvp again; jacfwd(jacrev(f)) (hessian) and jacrev(jacrev(f)) work"
        )


# ---- tangents: each op's y from the tangents of its inputs; its other outputs (statistics,
# running statistics) are non-differentiable, as in the backward ----------------------------


def _training_jvp(ctx, tx, tw, tb, *_):
    x, weight, mean, invstd = ctx.saved_tensors
    t = _twice.finish_tangent(_twice.training_tangent(x, ctx.eps, weight, tx, tw, tb), x, None, None)
    return t, None, None, None, None


def _variant_jvp(ctx, tx, tw, tb, *_):
    x, weight, mean, invstd, r, d = ctx.saved_tensors
    r, d = (r, d) if ctx.renorm else (None, None)
    t = _twice.variant_tangent(x, ctx.eps, weight, r, d, ctx.ghost_batch, tx, tw, tb)
    return (_twice.finish_tangent(t, x, None, None),) + (None,) * 6


def _inference_jvp(ctx, tx, tmean, tvar, tw, tb, _teps):
    x, mean, var, weight = ctx.saved_tensors
    t = _twice.inference_tangent(x, mean, var, weight, ctx.eps, tx, tmean, tvar, tw, tb)
    return _twice.finish_tangent(t, x, None, None)


def _training_act_jvp(ctx, tx, tres, tw, tb, *_):
    x, y, weight, mean, invstd = ctx.saved_tensors
    t = _twice.training_tangent(x, ctx.eps, weight, tx, tw, tb)
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
                                       lambda i, o: (i[0], i[1], o[1], o[2]), _training_vmap(0, None, 1, 2, 3)),
            forward_inference=_function("forward_inference", ops.forward_inference, _ops._inference_setup,
                                        _ops._inference_backward, _inference_jvp,
                                        lambda i, o: i[:4], _folded_vmap("forward_inference")),
            forward_training_act=_function("forward_training_act", ops.forward_training_act,
                                           norm_act._training_setup, norm_act._training_backward,
                                           _training_act_jvp, lambda i, o: (i[0], o[0], i[2], o[1], o[2]),
                                           _training_vmap(0, 1, 2, 3, 4)),
            forward_inference_act=_function("forward_inference_act", ops.forward_inference_act,
                                            norm_act._inference_setup, norm_act._inference_backward,
                                            _inference_act_jvp, lambda i, o: (i[0], o, *i[2:5]),
                                            _folded_vmap("forward_inference_act")),
            forward_training_variant=_function("forward_training_variant", ops.forward_training_variant,
                                               variants._setup, variants._autograd_backward, _variant_jvp,
                                               lambda i, o: (i[0], i[1], *o[1:5]), _looped_vmap),
        )
    return _functions


def call(name: str, *args: Any) -> Any:
    """torch.ops.batchnorm.<name>(*args), through its Function when active() holds."""
    if active():
        return _built()[name].apply(*args)
    return getattr(torch.ops.batchnorm, name)(*args)


# ---- vmap: batching rules that fold the vmapped dim B into the channels -------------------
# Batch norm of each of B stacked batches is batch norm of one batch with B * C channels:
# x (N, C, ...) vmapped at dim d becomes (N, B * C, ...), per-channel vectors (B * C,). One
# kernel call instead of B (torch's fallback loops over the batch, with a warning). Folding
# copies x-like inputs (a view only when the mapped dim lies next to the channels, d = 1; an
# unbatched x is expanded into B copies); the results unfold without copies.

# Per op: the positions of its x-like and per-channel arguments, and the kind of each output:
# 'x' (unfolds at dim 1), 'c' (a (B, C) view), 'c?' / 'x?' (the same, or an empty (0,)
# placeholder of an absent output, left unbatched).
_FOLDS = {
    "forward_training": ((0,), (1, 2, 3, 4), ("x", "c", "c", "c?", "c?")),
    "forward_inference": ((0,), (1, 2, 3, 4), ("x",)),
    "backward": ((0, 1), (2, 3, 4), ("x?", "c", "c")),
    "forward_training_act": ((0, 1), (2, 3, 4, 5), ("x", "c", "c", "c?", "c?")),
    "forward_inference_act": ((0, 1), (2, 3, 4, 5), ("x",)),
    "backward_act": ((0, 1, 2), (3, 4, 5), ("x", "c", "c", "x?")),
}


def _fold(t: Optional[Tensor], bdim: Optional[int], B: int, per_channel: bool) -> Optional[Tensor]:
    """(N, B * C, ...) of an x-like tensor, or (B * C,) of a per-channel one; None stays None."""
    if t is None:
        return None
    if per_channel:  # (C,) or (B, C)
        return t.repeat(B) if bdim is None else t.movedim(bdim, 0).reshape(-1)
    t = t.unsqueeze(1).expand(t.shape[0], B, *t.shape[1:]) if bdim is None else t.movedim(bdim, 1)
    return t.flatten(1, 2)


def _folded(name: str, call: Callable, B: int, in_dims: tuple, args: tuple) -> Tuple[Any, Any]:
    """call(*args) with op `name`'s arguments folded, and (results, out_dims) unfolded."""
    x_like, per_channel, outputs = _FOLDS[name]
    folded = list(args)
    for i in x_like:
        folded[i] = _fold(args[i], in_dims[i], B, False)
    for i in per_channel:
        folded[i] = _fold(args[i], in_dims[i], B, True)
    try:
        result = call(*folded)
    except (ValueError, TypeError):
        _raise_for_one_slice(call, in_dims, args)
        raise
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


def _slice(in_dims: tuple, args: tuple, i: int) -> list:
    """The arguments of mapped slice i (unbatched ones as they are)."""
    return [a.select(d, i) if isinstance(a, Tensor) and d is not None else a for a, d in zip(args, in_dims)]


def _stacked(slices: list) -> Tuple[tuple, tuple]:
    """Each result of the slices' calls stacked along a new dim 0, and its out_dims."""
    return tuple(torch.stack(r) for r in zip(*slices)), (0,) * len(slices[0])


def _raise_for_one_slice(call: Callable, in_dims: tuple, args: tuple) -> None:
    """Raises the error of the first mapped slice, if it has one: the shapes a user passed
    under vmap are those of one slice ("weight must have shape (4,), got (5,)"), not the folded
    ones (which would read (12,) and (15,) for 3 slices)."""
    try:
        call(*_slice(in_dims, args, 0))
    except (ValueError, TypeError) as e:
        raise e.with_traceback(None) from None


def rule(name: str) -> None:
    """Registers the batching rule of torch.ops.batchnorm.<name> (its folds in _FOLDS)."""
    op = getattr(torch.ops.batchnorm, name)
    torch.library.register_vmap(f"batchnorm::{name}",
                                lambda info, in_dims, *args: _folded(name, op, info.batch_size, in_dims, args),
                                lib=_ops._lib)


def _folded_vmap(name: str) -> Callable:
    """A Function's vmap: its op's fold around the Function itself."""
    return lambda fn, info, in_dims, *args: _folded(name, fn.apply, info.batch_size, in_dims, args)


def _shared_statistics(in_dims: tuple, x: int, running: int) -> bool:
    """Whether x and the running statistics are unbatched: their update is then one for every
    mapped slice, and must come back unbatched (folded or looped, each of the B identical
    copies would come back as a batched update that an unbatched buffer cannot take)."""
    return in_dims[x] is None and in_dims[running] is None and in_dims[running + 1] is None


def _training_vmap(x: int, residual: Optional[int], weight: int, bias: int, running: int) -> Callable:
    """A training Function's vmap: folded, unless x and the running statistics are unbatched
    (_shared_statistics; the residual's sum does not touch the statistics). Then, as torch's own
    rule, the statistics update once through the Function on the first slice and x̂, computed
    from x in torch operations in the accumulation dtype (one rounding to x's dtype at the end),
    takes the batched weight, bias or residual."""

    def vmap(fn, info, in_dims, *args):
        if not _shared_statistics(in_dims, x, running):
            return _folded(fn.__name__, fn.apply, info.batch_size, in_dims, args)
        xt, eps = args[x], args[running + 3]
        # The first slice's call: every argument checked as an eager call checks it (a wrong
        # weight shape or dtype raises the same error), the statistics and their one update.
        _, mean, invstd, new_mean, new_var = fn.apply(*_slice(in_dims, args, 0))
        xhat, _, _, shape = _twice._normalized(xt, eps)

        def lead(t, d, per_channel):  # batched (B, ...) first, or broadcastable unbatched
            if t is None:
                return None
            t = (t.movedim(d, 0) if d is not None else t.unsqueeze(0)).to(xhat.dtype)
            return t.reshape((t.shape[0],) + tuple(shape)) if per_channel else t

        out = xhat.unsqueeze(0)
        w, b = lead(args[weight], in_dims[weight], True), lead(args[bias], in_dims[bias], True)
        out = out if w is None else out * w
        out = out if b is None else out + b
        if residual is not None:
            r = lead(args[residual], in_dims[residual], False)
            out = out if r is None else out + r
            out = torch.relu(out) if args[-1] else out
        out = out.expand((info.batch_size,) + tuple(xt.shape)).to(xt.dtype)
        return (out, mean, invstd, new_mean, new_var), (0, None, None, None, None)

    return vmap


def _looped_vmap(fn, info, in_dims, *args):
    """The variants' vmap: the Function on each mapped slice, the results stacked; with
    _shared_statistics, the statistics and their update are every slice's: the first's, unbatched."""
    slices = [fn.apply(*_slice(in_dims, args, i)) for i in range(info.batch_size)]
    if _shared_statistics(in_dims, 0, 3):
        return (torch.stack([s[0] for s in slices]),) + tuple(slices[0][1:]), (0,) + (None,) * 6
    return _stacked(slices)


def looped_rule(name: str) -> None:
    """Registers a batching rule of torch.ops.batchnorm.<name> that calls it on each mapped
    slice and stacks the results: the variants' backward. Folded, B slices of 32x64x28x28
    float32 (vmap of grad through ghost batch norm, B = 8, AMD EPYC, 2 threads) took 238-265 ms
    against 174-179 ms for torch's per-slice fallback: the fold copies dy and x (mapped at dim 0)
    and the unfolded gradients are strided. The loop is the fallback without its warning."""
    op = getattr(torch.ops.batchnorm, name)

    def vmap(info, in_dims, *args):
        return _stacked([op(*_slice(in_dims, args, i)) for i in range(info.batch_size)])

    torch.library.register_vmap(f"batchnorm::{name}", vmap, lib=_ops._lib)


# The plain ops' rules; norm_act.py and variants.py register those of their ops beside their
# definitions.
for _name in ("forward_training", "forward_inference", "backward"):
    rule(_name)
