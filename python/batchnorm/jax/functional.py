"""batch_norm: the pure JAX function of API.md, differentiable in x, weight and bias (and a
fused op's residual) through jax.custom_vjp, whose passes over x are this library's kernels as
XLA FFI calls (_ffi.py). Only per-channel (C,) arithmetic is written here in jnp: the
running-statistics update (with skip_nonfinite's choice), and with `axis_name` the exchange of
the shards' statistics. The training variants (API.md "Training variants": batch renorm, ghost
batch norm, skip_nonfinite, the biased running variance) run in the core's kernels."""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from .._arrays import check_axis, check_real
from ..functional import _activation_code, _check_bool, _ghost, _renorm_limits
from . import _ffi

__all__ = ["batch_norm"]


class Variants(NamedTuple):
    """The training variants of one call, checked (hashable: a static argument of the custom_vjp)."""

    unbiased: bool = True  # the running variance takes the unbiased batch variance (PyTorch)
    renorm: Optional[Tuple[float, float]] = None  # (rmax, dmax): batch renorm
    ghost: int = 0  # samples per ghost batch; 0: off
    skip_nonfinite: bool = False


def check_variants(*, running_var_unbiased=True, renorm=None, ghost_batch=None, skip_nonfinite=False, axis_name=None):
    """The variants as batchnorm.forward_training checks their types (the core checks their
    values while tracing). Batch renorm and ghost batch norm compare or group one device's
    samples: with `axis_name` they are not offered (as in batchnorm.distributed)."""
    unbiased = _check_bool(running_var_unbiased, "running_var_unbiased")
    skip = _check_bool(skip_nonfinite, "skip_nonfinite")
    limits = None if renorm is None else _renorm_limits(renorm)
    ghost = _ghost(ghost_batch)
    if axis_name is not None and (limits is not None or ghost):
        given = "renorm" if limits is not None else "ghost_batch"
        raise ValueError(f"{given} is not supported with axis_name (statistics across devices); got {given}="
                         f"{tuple(renorm) if limits is not None else ghost} and axis_name={axis_name!r}")
    return Variants(unbiased, limits, ghost, skip)


PLAIN = Variants()


def batch_norm(x, weight, bias, running_mean, running_var, *, training, momentum=0.1, eps=1e-5, axis=1,
               axis_name=None, residual=None, activation=None, running_var_unbiased=True, renorm=None,
               ghost_batch=None, skip_nonfinite=False):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over every axis but `axis`; fused,
    y = act(that + residual) in the same passes (residual: x's shape and dtype, or None;
    activation: None or "relu"), differentiable in the residual too.

    Returns (y, new_running_mean, new_running_var). In training the statistics are the batch's
    (across `axis_name` too, inside shard_map or pmap) and the running statistics, when given,
    come back updated with PyTorch's convention: (1 - momentum) * running + momentum * batch,
    with the unbiased batch variance (running_var_unbiased=False: the biased one, as Flax and
    Keras); in inference (running statistics required) they come back unchanged. weight and
    bias may be None. In training the running statistics are state: y does not depend on them
    (a zero gradient through y); the updated ones are the jnp update of them (a factor
    1 - momentum) and of the batch mean and variance, differentiable like y. In inference y is
    differentiable in them too (as Flax's batch norm).

    Training variants (API.md): renorm=(rmax, dmax), batch renormalization (Ioffe 2017),
    y = (x_hat * r + d) * weight + bias with r and d from the running statistics (required) as
    they were before this call, constants to the gradient; then (y, new_running_mean,
    new_running_var, r, d) is returned (in inference too, with r = 1 and d = 0, what inference
    applies, so train and eval steps unpack alike). ghost_batch=G: statistics per group of G consecutive
    samples along axis 0, the running statistics updated with the whole batch's.
    skip_nonfinite=True: a channel whose batch statistics are not finite keeps its running
    statistics. renorm and ghost_batch are not offered with axis_name."""
    x = jnp.asarray(x)
    weight, bias, running_mean, running_var, residual = (
        None if a is None else jnp.asarray(a) for a in (weight, bias, running_mean, running_var, residual))
    v = check_variants(running_var_unbiased=running_var_unbiased, renorm=renorm, ghost_batch=ghost_batch,
                 skip_nonfinite=skip_nonfinite, axis_name=axis_name)
    if training:
        return _batch_norm_training(x, weight, bias, running_mean, running_var, momentum, eps, axis, axis_name,
                                    residual, activation, v)
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        if a is None:
            raise TypeError(f"{name} must be an array when training=False, got None")
    y = inference(x, weight, bias, running_mean, running_var, eps=eps, axis=axis,
                  names=("running_mean", "running_var"), residual=residual, activation=activation)
    if v.renorm is None:
        return y, running_mean, running_var
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32  # training's r and d dtype
    channels = x.shape[axis]
    return y, running_mean, running_var, jnp.ones(channels, acc), jnp.zeros(channels, acc)


def _batch_norm_training(x, weight, bias, running_mean, running_var, momentum, eps, axis, axis_name, residual,
                         activation, v):
    y, mean, var, _, rd = training(x, weight, bias, eps=eps, axis=axis, axis_name=axis_name,
                                   running_mean=running_mean, running_var=running_var, momentum=momentum,
                                   residual=residual, activation=activation, variants=v)
    if running_mean is None:
        return y, None, None
    new_mean, new_var = skipped(skip_mask(mean, var, v), running_mean, running_var,
                                _running_update(running_mean, mean, momentum),
                                _running_update(running_var, var, momentum))
    return (y, new_mean, new_var) + (rd if rd is not None else ())


def skip_mask(mean, var, v):
    """With skip_nonfinite, the channels whose batch statistics are not finite (a step a loss
    scaler skips): their running statistics stay as they are. None without skip_nonfinite."""
    if not v.skip_nonfinite:
        return None
    return ~(jnp.isfinite(mean) & jnp.isfinite(var))


def skipped(keep, running_mean, running_var, new_mean, new_var):
    """The running statistics after an update to (new_mean, new_var): with skip_nonfinite (keep
    not None) the old ones, bit for bit, in the channels `keep` marks and in those whose update
    stores a non-finite value where a finite one was (a float16 running variance past 65504),
    as the core keeps them (core/recipes.h, update_running)."""
    if keep is None:
        return new_mean, new_var
    def spoiled(old, new):
        return jnp.isfinite(old) & ~jnp.isfinite(new)

    keep = keep | spoiled(running_mean, new_mean) | spoiled(running_var, new_var)
    return jnp.where(keep, running_mean, new_mean), jnp.where(keep, running_var, new_var)


def _running_update(running, batch, momentum):
    """(1 - momentum) * running + momentum * batch, computed in the statistics' accumulation
    dtype and stored in the running statistic's own dtype."""
    acc = jnp.promote_types(batch.dtype, running.dtype)
    if momentum == 1:  # the batch's, whatever the running value held (core/recipes.h, running_update)
        return batch.astype(running.dtype)
    return ((1 - momentum) * running.astype(acc) + momentum * batch.astype(acc)).astype(running.dtype)


# ---- training: batch statistics, optionally across a mapped axis ---------------------------

def training(x, weight, bias, *, eps, axis, axis_name=None, running_mean=None, running_var=None, momentum=0.1,
             residual=None, activation=None, variants=PLAIN):
    """(y, batch mean, batch variance, count, (r, d) or None): the training forward shared by
    batch_norm and the Flax module, y = act(bn(x) + residual) when fused. The statistics (of
    x alone, of the whole batch with ghost_batch) are in the accumulation dtype and
    differentiable like y, the variance unbiased unless variants.unbiased is False; `count` (a
    Python int) is the values per channel they cover. With variants.renorm, r and d come from
    running_mean / running_var (constants to the gradient)."""
    code = _activation_code(activation)
    shards = 1 if axis_name is None else lax.axis_size(axis_name)

    symbols = _ffi.Symbols(x, weight, bias, running_mean, running_var, residual, taken=(variants.ghost,))

    # With a mapped axis the core judges the logical batch (the shards' values together).
    def checked(a):
        spec = symbols.spec(a)
        if spec is None or shards == 1 or a.ndim < 2 or a.ndim != x.ndim:
            return spec
        shape = list(spec[0])
        first_reduced = 1 if axis in (0, -x.ndim) else 0
        shape[first_reduced] *= shards
        return (tuple(shape), spec[1])

    _static_shape_for(x, axis, "ghost_batch" if variants.ghost else None, axis_name)
    rmax, dmax = variants.renorm or (1.0, 0.0)
    momentum, eps, axis = _static_real(momentum, "momentum"), _static_real(eps, "eps"), check_axis(axis, x)
    try:
        ax, channels, acc = _ffi.check_forward_training(
            checked(x), symbols.spec(weight), symbols.spec(bias), symbols.spec(running_mean), symbols.spec(running_var),
            momentum, eps, axis, residual=checked(residual), activation=code,
            running_var_unbiased=variants.unbiased, skip_nonfinite=variants.skip_nonfinite,
            renorm=variants.renorm is not None, rmax=rmax, dmax=dmax, ghost_batch=variants.ghost)
    except (ValueError, TypeError) as err:
        if shards == 1:
            raise symbols.named(err) from None
        # The message quotes the logical batch's shape: say what each shard holds.
        logical, shard = checked(x)[0], tuple(int(n) for n in x.shape)
        text = str(err).replace(
            f"x has shape {logical}",
            f"x has shape {shard} on each of {shards} shards of {axis_name!r}, {logical} together",
        )
        if "must have shape" in text and "channels on axis" in text:
            text += f" (every shard of {axis_name!r} must hold all channels: is the channel axis sharded?)"
        raise type(err)(text) from None
    acc = jnp.dtype(acc)
    w = jnp.ones((channels,), acc) if weight is None else weight
    b = jnp.zeros((channels,), acc) if bias is None else bias
    w, b, residual = _vary_like_x(x, w, b, residual)
    running = (running_mean, running_var) if variants.renorm is not None else (None, None)
    y, mean, var, rd = _train_call(x, w, b, residual, *running, ax, eps, axis_name, shards, channels, acc, code,
                                   variants)
    return y, mean, var, (x.size // channels) * shards, rd


def _static_shape_for(x, axis, option, axis_name):
    """Refuses the symbolic dimensions (jax.export shape polymorphism) the call cannot take:
    a symbolic channel axis (the per-channel arrays' size), and any with ghost_batch (the
    groups' shape) or axis_name (the shards' counts are attributes of the merge)."""
    if not _ffi.symbolic(x):
        return
    shape = tuple(x.shape)
    if isinstance(axis, int) and -x.ndim <= axis < x.ndim and not isinstance(shape[axis], int):
        raise ValueError(f"x's channel axis must have a size known when traced, got the symbolic shape {shape} "
                         f"(axis {axis}; jax.export shape polymorphism takes symbolic batch and spatial sizes)")
    for name, given in (("ghost_batch", option), ("axis_name", axis_name)):
        if given is not None:
            raise ValueError(f"{name} needs x's shape known when traced, got the symbolic shape {shape} "
                             "(jax.export shape polymorphism); export with concrete sizes")


def _static_real(value, name):
    """A real number fixed when the op is traced (the kernels take it as an attribute)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a Python number fixed at trace time (an attribute of the compiled op), "
                        f"got a traced value; pass it as a static argument")
    return check_real(value, name)


def _vary_like_x(x, *arrays):
    """The arrays (None for absent ones) typed as varying along x's mapped axes. Inside
    shard_map the parameters are often replicated where x is split: made to vary here, their
    gradients come back from the custom_vjps per shard (as the backward kernels compute them)
    and JAX sums them where the replicated value was broadcast, as for jnp code. With or
    without axis_name: the batch's statistics may be the device's own (a frozen or per-device
    batch norm in a data-parallel step), and a per-shard gradient of an unvarying input is a
    type error under check_vma."""
    axes = _ffi.varying_axes(x)
    return tuple(None if a is None else _ffi.vary(a, axes) for a in arrays)


# r: the fused op's residual or None; rm, rv: the running statistics for batch renorm, else
# None (state: zero gradients); shards: the size of axis_name's axis (1 without), taken where the
# axis is bound (in a backward traced while transposing a vmap it is not: lax.axis_size failed
# there); act: the core's activation code (0 none, 1 relu); v: Variants.
@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11, 12, 13))
def _train(x, w, b, r, rm, rv, axis, eps, axis_name, shards, channels, acc, act, v):
    return _train_forward(x, w, b, r, rm, rv, axis, eps, axis_name, shards, channels, acc, act, v)[0]


def _train_forward(x, w, b, r, rm, rv, axis, eps, axis_name, shards, channels, acc, act, v):
    rd = None
    if axis_name is None:
        y, saved_mean, invstd, var, mean, *rd = _ffi.forward_training(
            x, w, b, axis, eps, channels, acc, r, act, unbiased=v.unbiased, renorm=v.renorm, running=(rm, rv),
            ghost_batch=v.ghost)
        rd = None if v.renorm is None else tuple(lax.stop_gradient(a) for a in rd)
        if not v.ghost:
            mean = saved_mean  # the same bits, also where batch renorm's running statistics are not finite
    else:
        mean, var = _global_statistics(x, axis, axis_name, shards, channels, acc)
        saved_mean = mean
        invstd = lax.rsqrt(var + jnp.asarray(eps, acc))
        y = _ffi.forward_inference(x, mean, var, w, b, axis, eps, r, act)
        if v.unbiased:
            count = (x.size // channels) * shards
            var = var * jnp.asarray(count / (count - 1), acc)
    # The backward needs y only for the ReLU's mask, and of r only whether it was given.
    fused = (y if act else None, None if r is None else jnp.zeros((), r.dtype))
    return (y, mean, var, rd), (x, w, saved_mean, invstd, mean, rd, jnp.zeros((), b.dtype), fused)


def _global_statistics(x, axis, axis_name, k, channels, acc):
    """Mean and biased variance of the shards' values together: each shard's (mean, var) is
    exchanged whole (a psum of rows that are zero but for the shard's own: exact, and the
    result is replicated) and the k rows are merged by the core with Chan's formula, as if
    computed on the concatenation. Shards hold equal shapes, so the counts are known."""
    mean, var = _ffi.statistics(x, axis, channels, acc)
    row = lax.axis_index(axis_name)
    means = lax.psum(jnp.zeros((k, channels), acc).at[row].set(mean), axis_name)
    variances = lax.psum(jnp.zeros((k, channels), acc).at[row].set(var), axis_name)
    return _ffi.merge(means, variances, [x.size // channels] * k)


def _train_fwd(x, w, b, r, rm, rv, axis, eps, axis_name, shards, channels, acc, act, v):
    value = lambda a: None if a is None else a.value  # noqa: E731
    return _train_forward(x.value, w.value, b.value, value(r), value(rm), value(rv), axis, eps, axis_name, shards,
                          channels, acc, act, v)


def _train_bwd(axis, eps, axis_name, shards, channels, acc, act, v, residuals, cotangents):
    x, w, saved_mean, invstd, mean, rd, bias_like, (y, r_like) = residuals
    g_y, g_mean, g_var, _ = cotangents  # r and d are constants: their cotangents are dropped
    dy = jnp.zeros(x.shape, x.dtype) if isinstance(g_y, SymbolicZero) else g_y
    # g: dy through the activation, the residual's gradient; the core's fused backward masks
    # dy with y and returns g when asked (needed too for the synced dx below).
    need_g = r_like is not None or (act and axis_name is not None)
    variant = dict(renorm=rd, ghost_batch=v.ghost)
    if act:
        dx, dw, db, *g = _ffi.backward(dy, x, saved_mean, invstd, w, axis, channels, acc, y=y, activation=act,
                                       dresidual=need_g, **variant)
        g = g[0] if g else None
    else:
        dx, dw, db = _ffi.backward(dy, x, saved_mean, invstd, w, axis, channels, acc, **variant)
        g = dy
    count = x.size // channels
    if axis_name is not None:
        # dx needs the sums over every shard; dweight / dbias stay this shard's share (JAX sums
        # the shares where the parameters were replicated, see _vary_like_x).
        count *= shards
        dx = _dx_from_sums(g, x, mean, invstd, w, lax.psum(db, axis_name), lax.psum(dw, axis_name), count, axis)
    if not (isinstance(g_mean, SymbolicZero) and isinstance(g_var, SymbolicZero)):
        if axis_name is not None and not _typed_varying(x, axis_name):
            # The statistics are one value on every shard: their gradient is the sum of every
            # shard's cotangent, as psum's transpose gives jnp code. shard_map with check_vma
            # types them invariant and hands over that sum already; pmap, vmap(axis_name) and
            # check_vma=False hand each shard its own (1/shards of the gradient before).
            g_mean, g_var = (g if isinstance(g, SymbolicZero) else lax.psum(g, axis_name) for g in (g_mean, g_var))
        dx = dx.astype(acc) + _statistics_vjp(x, mean, g_mean, g_var, count, axis, acc, v.unbiased)
    dr = None if r_like is None else g.astype(r_like.dtype)
    # The running statistics (batch renorm's rm, rv) are state: no gradient.
    return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(bias_like.dtype), dr, None, None


_train.defvjp(_train_fwd, _train_bwd, symbolic_zeros=True)


def _typed_varying(x, axis_name):
    """Whether JAX's varying-axes typing (shard_map with check_vma) marks x as varying along
    every name of axis_name; without that typing nothing is marked."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return set(names) <= _ffi.varying_axes(x)


def _per_channel(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = v.shape[-1]
    return v.reshape(shape)


def _dx_from_sums(dy, x, mean, invstd, w, sum_dy, sum_dy_xhat, count, axis):
    """The input gradient of training batch norm from sums over the whole (sharded) batch:
    w * invstd * (dy - sum_dy / n - x_hat * sum_dy_xhat / n); the core's backward computes the
    same from the local sums (an elementwise pass XLA fuses; the core has no op taking sums)."""
    acc = invstd.dtype
    c = lambda v: _per_channel(v.astype(acc), x.ndim, axis)  # noqa: E731
    x_hat = (x.astype(acc) - c(mean)) * c(invstd)
    dx = c(w * invstd) * (dy.astype(acc) - c(sum_dy / count) - x_hat * c(sum_dy_xhat / count))
    return dx.astype(x.dtype)


def _statistics_vjp(x, mean, g_mean, g_var, count, axis, acc, unbiased=True):
    """The part of dx that flows back from the returned batch mean and variance (only when
    something differentiates through them, e.g. the running statistics): d mean / dx = 1 / n
    and d var / dx = 2 (x - mean) / (n - 1) for the unbiased variance, 2 (x - mean) / n for
    the biased one."""
    out = jnp.zeros(x.shape, acc)
    if not isinstance(g_mean, SymbolicZero):
        out = out + _per_channel(g_mean.astype(acc) / count, x.ndim, axis)
    if not isinstance(g_var, SymbolicZero):
        centered = x.astype(acc) - _per_channel(mean, x.ndim, axis)
        out = out + centered * _per_channel(g_var.astype(acc) * (2.0 / (count - 1 if unbiased else count)), x.ndim,
                                            axis)
    return out


# ---- inference: given statistics -----------------------------------------------------------

def inference(x, weight, bias, mean, var, *, eps, axis, names=("mean", "var"), residual=None, activation=None):
    """y with the given statistics, differentiable in x, weight, bias, the residual and the
    statistics (as Flax's batch norm, which differentiates the running statistics in inference;
    before, their gradient was a silent zero); fused, y = act(bn(x) + residual). `names` are
    the statistics' argument names in error messages."""
    code = _activation_code(activation)
    eps, axis = _static_real(eps, "eps"), check_axis(axis, x)
    _static_shape_for(x, axis, None, None)
    symbols = _ffi.Symbols(x, mean, var, weight, bias, residual)
    try:
        ax, channels, acc = _ffi.check_forward_inference(
            symbols.spec(x), symbols.spec(mean), symbols.spec(var), symbols.spec(weight), symbols.spec(bias), eps,
            axis, names[0], names[1], residual=symbols.spec(residual), activation=code)
    except (ValueError, TypeError) as err:
        raise symbols.named(err) from None
    acc = jnp.dtype(acc)
    w = jnp.ones((channels,), acc) if weight is None else weight
    b = jnp.zeros((channels,), acc) if bias is None else bias
    w, b, residual, mean, var = _vary_like_x(x, w, b, residual, mean, var)
    return _infer_call(x, w, b, residual, mean, var, ax, eps, channels, acc, code)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _infer(x, w, b, r, mean, var, axis, eps, channels, acc, act):
    return _ffi.forward_inference(x, mean, var, w, b, axis, eps, r, act)


def _infer_fwd(x, w, b, r, mean, var, axis, eps, channels, acc, act):
    y = _ffi.forward_inference(x.value, mean.value, var.value, w.value, b.value, axis, eps,
                               None if r is None else r.value, act)
    # The parameter sums cost a pass over x: kept (b saved) only when w, b or the statistics
    # are differentiated (the statistics' gradients are the same sums, scaled).
    stats = mean.perturbed or var.perturbed
    saved_b = b.value if (w.perturbed or b.perturbed or stats) else None
    fused = (y if act else None, None if r is None else jnp.zeros((), r.value.dtype))
    return y, (x.value, w.value, saved_b, mean.value, var.value, fused, jnp.zeros((), acc) if stats else None)


def _infer_bwd(axis, eps, channels, acc, act, residuals, g_y):
    x, w, b, mean, var, (y, r_like), stats = residuals
    dy = jnp.zeros(x.shape, x.dtype) if isinstance(g_y, SymbolicZero) else g_y
    # g: dy through the ReLU (the core's relu_grad: zero where y <= 0, as torch's
    # threshold_backward; an elementwise select XLA fuses), the residual's gradient.
    g = jnp.where(y <= 0, jnp.zeros((), dy.dtype), dy) if act else dy
    # y is affine in x before the activation: dx = g * w / sqrt(var + eps) is the same kernel
    # with mean 0, bias 0.
    zeros = jnp.zeros((channels,), acc)
    dx = _ffi.forward_inference(g, zeros, var, w, zeros, axis, eps)
    dw = db = dmean = dvar = None  # zero cotangents
    if b is not None and x.size == 0:  # an empty batch: no values, zero sums (the core wants one)
        dw, db = jnp.zeros_like(w), jnp.zeros_like(b)
        dmean, dvar = (None, None) if stats is None else (jnp.zeros_like(mean), jnp.zeros_like(var))
    elif b is not None:
        invstd = lax.rsqrt(var.astype(acc) + jnp.asarray(eps, acc))
        # sum g * x_hat and sum g, x_hat = (x - mean) * invstd
        _, sum_gx, sum_g = _ffi.backward(g, x, mean, invstd, w, axis, channels, acc)
        if stats is not None:  # y = x_hat * w + b: dy/dmean = -w invstd, dy/dvar = -(x - mean) w invstd^3 / 2
            scale = w.astype(acc) * invstd
            dmean, dvar = (-sum_g * scale).astype(mean.dtype), (-0.5 * sum_gx * scale * invstd).astype(var.dtype)
        dw, db = sum_gx.astype(w.dtype), sum_g.astype(b.dtype)
    dr = None if r_like is None else g.astype(r_like.dtype)
    return dx, dw, db, dr, dmean, dvar


_infer.defvjp(_infer_fwd, _infer_bwd, symbolic_zeros=True)

# The custom_vjps through jit: shard_map called eagerly (no jit around it) does not implement
# custom_vjp with symbolic_zeros; under a jit it does. Inside an outer jit these inline.
_train_call = jax.jit(_train, static_argnums=tuple(range(6, 14)))
_infer_call = jax.jit(_infer, static_argnums=tuple(range(6, 11)))
