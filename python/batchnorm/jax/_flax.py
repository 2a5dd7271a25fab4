"""What batchnorm.jax's two Flax drop-ins share (linen.py for flax.linen.BatchNorm, nnx.py for
flax.nnx.BatchNorm): the call's refusals, one normalization of x already in the computation
dtype (inference with the running statistics, or training on the batch's, Flax's case of one
value per channel included) and the running averages' update in Flax's convention (momentum
is the decay, the biased variance). The dtypes and the variables are each module's own."""
from __future__ import annotations

import numbers
from typing import Any, Optional, Tuple

import jax.numpy as jnp
from jax import lax

from .functional import Variants, check_variants, inference, skip_mask, skipped, training


def check_call(module: Any, mask: Any) -> Variants:
    """The options neither module supports, refused by name, and the training variants checked
    (with Flax's biased running variance)."""
    name = type(module).__name__
    if mask is not None:
        raise ValueError(f"mask is not supported by batchnorm.jax's {name}, got a mask; use Flax's own BatchNorm "
                         "for masked statistics")
    if module.axis_index_groups is not None:
        raise ValueError(f"axis_index_groups is not supported by batchnorm.jax's {name}, got "
                         f"{module.axis_index_groups!r}")
    if not isinstance(module.axis, numbers.Integral) or isinstance(module.axis, bool):  # (NumPy's ints too)
        raise TypeError(f"axis must be an int (one feature axis), got {module.axis!r}")
    return check_variants(running_var_unbiased=False, renorm=module.renorm, ghost_batch=module.ghost_batch,
                          skip_nonfinite=module.skip_nonfinite, axis_name=module.axis_name)


def normalize(x, scale, bias, running_mean, running_var, *, use_running_average: bool, eps: float, axis: int,
              axis_name: Optional[str], residual, activation: Optional[str], v: Variants,
              initializing: bool = False) -> Tuple[Any, Any, Any]:
    """(y, batch mean, biased batch variance) of x in its own dtype, the statistics in the
    kernels' accumulation dtype; with use_running_average, (y, None, None) from the running
    statistics. `initializing` (linen's init) lets fewer than two values per channel through,
    as Flax does then."""
    if x.ndim == 1 and axis in (0, -1):
        # One example's features, Flax's way of writing a model for one example and vmapping
        # it (with axis_name for the batch's statistics): a batch of one row, as the kernels
        # take it.
        r = None if residual is None else residual[None]
        y, mean, var = normalize(x[None], scale, bias, running_mean, running_var,
                                 use_running_average=use_running_average, eps=eps, axis=1, axis_name=axis_name,
                                 residual=r, activation=activation, v=v, initializing=initializing)
        return y[0], mean, var
    if use_running_average:
        y = inference(x, scale, bias, running_mean, running_var, eps=eps, axis=axis, residual=residual,
                      activation=activation)
        return y, None, None
    ndim = x.ndim
    valid = ndim >= 1 and -ndim <= axis < ndim
    channels = x.shape[axis] if valid else 0
    values = x.size // max(channels, 1) * (lax.axis_size(axis_name) if axis_name is not None else 1)
    if isinstance(values, int):
        few = values == 1 or (initializing and values < 2)
    else:  # a symbolic batch (jax.export): init, whose output only sizes the variables, takes
        few = initializing  # Flax's formula; training the kernels (which refuse one value at run time)
    if valid and few and v.renorm is None and not v.ghost:
        # One value per channel, which the kernels' training refuses (no variance to take):
        # Flax's batch norm of it, y = act(bias + residual) since x - mean = 0, the statistics
        # (x, 0); a model's init with a dummy batch of one, or a batch of one in training.
        mean, var = _one_value_statistics(x, axis % ndim)
        return _one_value_output(x, mean, scale, bias, eps, axis % ndim, residual, activation), mean, var
    # Batch renorm compares the batch with the running statistics as they are now.
    running = (running_mean, running_var) if v.renorm is not None else (None, None)
    y, mean, var, _, _ = training(x, scale, bias, eps=eps, axis=axis, axis_name=axis_name, running_mean=running[0],
                                  running_var=running[1], residual=residual, activation=activation, variants=v)
    return y, mean, var


def running_averages(running_mean, running_var, mean, var, momentum: float, v: Variants) -> Tuple[Any, Any]:
    """Flax's update, momentum * running + (1 - momentum) * batch; with skip_nonfinite a channel
    whose batch statistics are not finite, or whose update would spoil a finite running
    statistic, keeps its running ones (functional.skipped)."""
    new_mean = momentum * running_mean + (1 - momentum) * mean
    new_var = momentum * running_var + (1 - momentum) * var
    return skipped(skip_mask(mean, var, v), running_mean, running_var, new_mean, new_var)


def _one_value_statistics(x, axis):
    """(mean, biased variance) of at most one value per channel, as Flax takes them: the value
    and 0 (NaN for none; NaN where it is not finite, as x - mean is)."""
    mean = jnp.mean(x, axis=tuple(d for d in range(x.ndim) if d != axis))
    return mean, jnp.zeros_like(mean) * (mean - mean)


def _one_value_output(x, mean, scale, bias, eps, axis, residual, activation):
    """Flax's normalization of at most one value per channel, written in jnp: x - mean is 0,
    so y = act(bias + residual), NaN where x is not finite, the gradient of x 0 and of the
    scale 0 (xhat is 0), as Flax's (and the kernels' formula in the limit)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    y = (x - mean.reshape(shape)) * lax.rsqrt(jnp.asarray(eps, x.dtype))
    if scale is not None:
        y = y * scale.reshape(shape).astype(x.dtype)
    if bias is not None:
        y = y + bias.reshape(shape).astype(x.dtype)
    if residual is not None:
        y = y + residual
    if activation != "relu":
        return y
    # The kernels' ReLU (core/recipes.h): relu(NaN) = NaN, relu(-0) = -0, and no gradient
    # where y <= 0.
    return jnp.where(y <= 0, lax.stop_gradient(jnp.where(y < 0, jnp.zeros_like(y), y)), y)
