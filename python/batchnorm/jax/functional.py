"""batch_norm: the pure JAX function of API.md, differentiable in x, weight and bias (and a
fused op's residual) through jax.custom_vjp, whose passes over x are this library's kernels as
XLA FFI calls (_ffi.py). Only per-channel (C,) arithmetic is written here in jnp: the
running-statistics update, and with `axis_name` the exchange of the shards' statistics."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from ..functional import _activation_code
from . import _ffi

__all__ = ["batch_norm"]


def batch_norm(x, weight, bias, running_mean, running_var, *, training, momentum=0.1, eps=1e-5, axis=1,
               axis_name=None, residual=None, activation=None):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over every axis but `axis`; fused,
    y = act(that + residual) in the same passes (residual: x's shape and dtype, or None;
    activation: None or "relu"), differentiable in the residual too.

    Returns (y, new_running_mean, new_running_var). In training the statistics are the batch's
    (across `axis_name` too, inside shard_map or pmap) and the running statistics, when given,
    come back updated with PyTorch's convention: (1 - momentum) * running + momentum * batch,
    with the unbiased batch variance; in inference (running statistics required) they come back
    unchanged. weight and bias may be None. The running statistics are state, not inputs of the
    function being differentiated: their gradients are zero."""
    x = jnp.asarray(x)
    weight, bias, running_mean, running_var, residual = (
        None if a is None else jnp.asarray(a) for a in (weight, bias, running_mean, running_var, residual))
    if training:
        return _batch_norm_training(x, weight, bias, running_mean, running_var, momentum, eps, axis, axis_name,
                                    residual, activation)
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        if a is None:
            raise TypeError(f"{name} must be an array when training=False, got None")
    y = inference(x, weight, bias, running_mean, running_var, eps=eps, axis=axis,
                  names=("running_mean", "running_var"), residual=residual, activation=activation)
    return y, running_mean, running_var


def _batch_norm_training(x, weight, bias, running_mean, running_var, momentum, eps, axis, axis_name, residual,
                         activation):
    y, mean, var_unbiased, _ = training(x, weight, bias, eps=eps, axis=axis, axis_name=axis_name,
                                        running_mean=running_mean, running_var=running_var, momentum=momentum,
                                        residual=residual, activation=activation)
    if running_mean is None:
        return y, None, None
    new_mean = _running_update(running_mean, mean, momentum)
    new_var = _running_update(running_var, var_unbiased, momentum)
    return y, new_mean, new_var


def _running_update(running, batch, momentum):
    """(1 - momentum) * running + momentum * batch, computed in the statistics' accumulation
    dtype and stored in the running statistic's own dtype."""
    acc = jnp.promote_types(batch.dtype, running.dtype)
    return ((1 - momentum) * running.astype(acc) + momentum * batch.astype(acc)).astype(running.dtype)


# ---- training: batch statistics, optionally across a mapped axis ---------------------------

def training(x, weight, bias, *, eps, axis, axis_name=None, running_mean=None, running_var=None, momentum=0.1,
             residual=None, activation=None):
    """(y, batch mean, unbiased batch variance, count): the training forward shared by
    batch_norm and the Flax module, y = act(bn(x) + residual) when fused. The statistics (of
    x alone) are in the accumulation dtype and differentiable like y; `count` (a Python int)
    is the values per channel they cover."""
    code = _activation_code(activation)
    shards = 1 if axis_name is None else lax.axis_size(axis_name)

    # With a mapped axis the core judges the logical batch (the shards' values together).
    def checked(a):
        spec = _ffi.spec(a)
        if spec is None or shards == 1 or a.ndim < 2 or a.ndim != x.ndim:
            return spec
        shape = list(spec[0])
        first_reduced = 1 if axis in (0, -x.ndim) else 0
        shape[first_reduced] *= shards
        return (tuple(shape), spec[1])

    ax, channels, acc = _ffi.check_forward_training(
        checked(x), _ffi.spec(weight), _ffi.spec(bias), _ffi.spec(running_mean), _ffi.spec(running_var),
        float(momentum), float(eps), int(axis), residual=checked(residual), activation=code)
    acc = jnp.dtype(acc)
    w = jnp.ones((channels,), acc) if weight is None else weight
    b = jnp.zeros((channels,), acc) if bias is None else bias
    if axis_name is not None:
        # Inside shard_map the parameters are replicated and x is not: make them vary along
        # x's axes here, so their gradients come back from the custom_vjp per shard and JAX
        # sums them where the replicated value was broadcast (exactly as for jnp code).
        w, b = (_vary_like(a, x) for a in (w, b))
        residual = None if residual is None else _vary_like(residual, x)
    y, mean, var_unbiased = _train(x, w, b, residual, ax, float(eps), axis_name, channels, acc, code)
    return y, mean, var_unbiased, (x.size // channels) * shards


def _vary_like(a, x):
    return _ffi.vary(a, _ffi.varying_axes(x))


# r: the fused op's residual or None; act: the core's activation code (0 none, 1 relu).
@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _train(x, w, b, r, axis, eps, axis_name, channels, acc, act):
    return _train_forward(x, w, b, r, axis, eps, axis_name, channels, acc, act)[0]


def _train_forward(x, w, b, r, axis, eps, axis_name, channels, acc, act):
    if axis_name is None:
        y, mean, invstd, var_unbiased = _ffi.forward_training(x, w, b, axis, eps, channels, acc, r, act)
    else:
        mean, var = _global_statistics(x, axis, axis_name, channels, acc)
        invstd = lax.rsqrt(var + jnp.asarray(eps, acc))
        y = _ffi.forward_inference(x, mean, var, w, b, axis, eps, r, act)
        count = (x.size // channels) * lax.axis_size(axis_name)
        var_unbiased = var * jnp.asarray(count / (count - 1), acc)
    # The backward needs y only for the ReLU's mask, and of r only whether it was given.
    fused = (y if act else None, None if r is None else jnp.zeros((), r.dtype))
    return (y, mean, var_unbiased), (x, w, mean, invstd, jnp.zeros((), b.dtype), fused)


def _global_statistics(x, axis, axis_name, channels, acc):
    """Mean and biased variance of the shards' values together: each shard's (mean, var) is
    exchanged whole (a psum of rows that are zero but for the shard's own: exact, and the
    result is replicated) and the k rows are merged by the core with Chan's formula, as if
    computed on the concatenation. Shards hold equal shapes, so the counts are known."""
    mean, var = _ffi.statistics(x, axis, channels, acc)
    k = lax.axis_size(axis_name)
    row = lax.axis_index(axis_name)
    means = lax.psum(jnp.zeros((k, channels), acc).at[row].set(mean), axis_name)
    variances = lax.psum(jnp.zeros((k, channels), acc).at[row].set(var), axis_name)
    return _ffi.merge(means, variances, [x.size // channels] * k)


def _train_fwd(x, w, b, r, axis, eps, axis_name, channels, acc, act):
    return _train_forward(x.value, w.value, b.value, None if r is None else r.value, axis, eps, axis_name, channels,
                          acc, act)


def _train_bwd(axis, eps, axis_name, channels, acc, act, residuals, cotangents):
    x, w, mean, invstd, bias_like, (y, r_like) = residuals
    g_y, g_mean, g_var = cotangents
    dy = jnp.zeros(x.shape, x.dtype) if isinstance(g_y, SymbolicZero) else g_y
    # g: dy through the activation, the residual's gradient; the core's fused backward masks
    # dy with y and returns g when asked (needed too for the synced dx below).
    need_g = r_like is not None or (act and axis_name is not None)
    if act:
        dx, dw, db, *g = _ffi.backward(dy, x, mean, invstd, w, axis, channels, acc, y=y, activation=act,
                                       dresidual=need_g)
        g = g[0] if g else None
    else:
        dx, dw, db = _ffi.backward(dy, x, mean, invstd, w, axis, channels, acc)
        g = dy
    count = x.size // channels
    if axis_name is not None:
        # dx needs the sums over every shard; dweight / dbias stay this shard's share (JAX sums
        # the shares where the parameters were replicated, see _vary_like).
        count *= lax.axis_size(axis_name)
        dx = _dx_from_sums(g, x, mean, invstd, w, lax.psum(db, axis_name), lax.psum(dw, axis_name), count, axis)
    if not (isinstance(g_mean, SymbolicZero) and isinstance(g_var, SymbolicZero)):
        dx = dx.astype(acc) + _statistics_vjp(x, mean, g_mean, g_var, count, axis, acc)
    dr = None if r_like is None else g.astype(r_like.dtype)
    return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(bias_like.dtype), dr


_train.defvjp(_train_fwd, _train_bwd, symbolic_zeros=True)


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


def _statistics_vjp(x, mean, g_mean, g_var, count, axis, acc):
    """The part of dx that flows back from the returned batch mean and unbiased variance (only
    when something differentiates through them, e.g. the running statistics):
    d mean / dx = 1 / n and d var / dx = 2 (x - mean) / (n - 1)."""
    out = jnp.zeros(x.shape, acc)
    if not isinstance(g_mean, SymbolicZero):
        out = out + _per_channel(g_mean.astype(acc) / count, x.ndim, axis)
    if not isinstance(g_var, SymbolicZero):
        centered = x.astype(acc) - _per_channel(mean, x.ndim, axis)
        out = out + centered * _per_channel(g_var.astype(acc) * (2.0 / (count - 1)), x.ndim, axis)
    return out


# ---- inference: given statistics -----------------------------------------------------------

def inference(x, weight, bias, mean, var, *, eps, axis, names=("mean", "var"), residual=None, activation=None):
    """y with the given statistics (treated as constants), differentiable in x, weight, bias
    (and the residual); fused, y = act(bn(x) + residual). `names` are the statistics' argument
    names in error messages."""
    code = _activation_code(activation)
    ax, channels, acc = _ffi.check_forward_inference(
        _ffi.spec(x), _ffi.spec(mean), _ffi.spec(var), _ffi.spec(weight), _ffi.spec(bias), float(eps), int(axis),
        names[0], names[1], residual=_ffi.spec(residual), activation=code)
    acc = jnp.dtype(acc)
    w = jnp.ones((channels,), acc) if weight is None else weight
    b = jnp.zeros((channels,), acc) if bias is None else bias
    return _infer(x, w, b, residual, lax.stop_gradient(mean), lax.stop_gradient(var), ax, float(eps), channels, acc,
                  code)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _infer(x, w, b, r, mean, var, axis, eps, channels, acc, act):
    return _ffi.forward_inference(x, mean, var, w, b, axis, eps, r, act)


def _infer_fwd(x, w, b, r, mean, var, axis, eps, channels, acc, act):
    y = _ffi.forward_inference(x.value, mean.value, var.value, w.value, b.value, axis, eps,
                               None if r is None else r.value, act)
    # The parameter sums cost a pass over x: kept (b saved) only when w or b are differentiated.
    saved_b = b.value if (w.perturbed or b.perturbed) else None
    fused = (y if act else None, None if r is None else jnp.zeros((), r.value.dtype))
    return y, (x.value, w.value, saved_b, mean.value, var.value, fused)


def _infer_bwd(axis, eps, channels, acc, act, residuals, g_y):
    x, w, b, mean, var, (y, r_like) = residuals
    dy = jnp.zeros(x.shape, x.dtype) if isinstance(g_y, SymbolicZero) else g_y
    # g: dy through the ReLU (the core's relu_grad: zero where y <= 0, as torch's
    # threshold_backward; an elementwise select XLA fuses), the residual's gradient.
    g = jnp.where(y <= 0, jnp.zeros((), dy.dtype), dy) if act else dy
    # y is affine in x before the activation: dx = g * w / sqrt(var + eps) is the same kernel
    # with mean 0, bias 0.
    zeros = jnp.zeros((channels,), acc)
    dx = _ffi.forward_inference(g, zeros, var, w, zeros, axis, eps)
    dw = db = None  # zero cotangents
    if b is not None:
        invstd = lax.rsqrt(var.astype(acc) + jnp.asarray(eps, acc))
        _, dw, db = _ffi.backward(g, x, mean, invstd, w, axis, channels, acc)
        dw, db = dw.astype(w.dtype), db.astype(b.dtype)
    dr = None if r_like is None else g.astype(r_like.dtype)
    return dx, dw, db, dr, None, None


_infer.defvjp(_infer_fwd, _infer_bwd, symbolic_zeros=True)
