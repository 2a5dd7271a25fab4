"""BatchNorm: a drop-in for flax.linen.BatchNorm (same fields, defaults, collections and
update rule) whose normalization runs on this library's kernels (functional.py). Swapping
`nn.BatchNorm` for `batchnorm.jax.BatchNorm` in a model keeps its variables and checkpoints."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
from jax import lax
from flax.linen import initializers
from flax.linen.dtypes import canonicalize_dtype

from .functional import check_variants, inference, skip_mask, training

__all__ = ["BatchNorm"]


class BatchNorm(nn.Module):
    """flax.linen.BatchNorm on batchnorm's kernels.

    Flax's conventions: `momentum` is the running average's decay (0.99 keeps 99% of the old
    value), the running variance is the biased batch variance, 'params' holds {scale, bias}
    and 'batch_stats' {mean, var} (float32), nothing is updated while initializing, and the
    output dtype is `dtype` or else that of x promoted with the parameters. `axis` is one
    feature axis. use_fast_variance is accepted for compatibility: the variance is always the
    exact one (Welford and Chan, never E[x^2] - E[x]^2). With `axis_name` the statistics span
    that mapped axis, merged exactly (never a mean of variances).

    Fused (timm's BatchNormAct2d; not a flax.linen.BatchNorm field): `activation="relu"` and the
    call's `residual=` (x's shape, taken in the computation dtype) give act(BN(x) + residual),
    what `nn.relu(nn.BatchNorm(...)(x) + residual)` computes, in the passes of plain batch norm;
    the running statistics are those of x alone.

    Training variants (API.md "Training variants"; not flax.linen.BatchNorm fields):
    `renorm=(rmax, dmax)`, batch renormalization (Ioffe 2017; Keras' renorm=True with
    renorm_clipping), r and d from 'batch_stats' as they are before the step; `ghost_batch=G`,
    statistics per group of G consecutive samples along axis 0 (ghost batch norm, Hoffer et al.
    2017), 'batch_stats' updated with the whole batch's; `skip_nonfinite=True`, a channel whose
    batch statistics are not finite keeps its 'batch_stats' (mixed precision's skipped steps).
    renorm and ghost_batch are not offered with axis_name."""

    use_running_average: Optional[bool] = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: Optional[str] = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    activation: Optional[str] = None  # None or "relu": applied after adding the call's residual
    renorm: Optional[Tuple[float, float]] = None  # (rmax, dmax): batch renorm
    ghost_batch: Optional[int] = None  # samples per ghost batch
    skip_nonfinite: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None, residual=None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        if mask is not None:
            raise ValueError("mask is not supported by batchnorm.jax.BatchNorm, got a mask; use "
                             "flax.linen.BatchNorm for masked statistics")
        if self.axis_index_groups is not None:
            raise ValueError("axis_index_groups is not supported by batchnorm.jax.BatchNorm, got "
                             f"{self.axis_index_groups!r}")
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise TypeError(f"axis must be an int (one feature axis), got {self.axis!r}")
        v = check_variants(running_var_unbiased=False, renorm=self.renorm, ghost_batch=self.ghost_batch,
                           skip_nonfinite=self.skip_nonfinite, axis_name=self.axis_name)
        x = jnp.asarray(x)
        ndim = x.ndim
        channels = x.shape[self.axis] if -ndim <= self.axis < ndim and ndim >= 1 else 0
        feature_shape = (channels,)
        ra_mean = self.variable("batch_stats", "mean",
                                lambda s: jnp.zeros(s, jnp.float32 if self.force_float32_reductions
                                                    else self.param_dtype), feature_shape)
        ra_var = self.variable("batch_stats", "var",
                               lambda s: jnp.ones(s, jnp.float32 if self.force_float32_reductions
                                                  else self.param_dtype), feature_shape)
        scale = self.param("scale", self.scale_init, feature_shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None

        # Flax computes in x promoted with the statistics and parameters and returns `dtype`
        # (default: x promoted with the parameters): run the kernels in the wider of the two.
        out_dtype = canonicalize_dtype(*[a for a in (x, scale, bias) if a is not None], dtype=self.dtype)
        xc = x.astype(jnp.promote_types(x.dtype, out_dtype))
        r = None if residual is None else jnp.asarray(residual).astype(xc.dtype)
        if use_running_average:
            y = inference(xc, scale, bias, ra_mean.value, ra_var.value, eps=self.epsilon, axis=self.axis,
                          residual=r, activation=self.activation)
        else:
            # Flax leaves the mapped axis out while initializing (there may be none).
            axis_name = None if self.is_initializing() else self.axis_name
            valid = ndim >= 1 and -ndim <= self.axis < ndim
            values = x.size // max(channels, 1) * (lax.axis_size(axis_name) if axis_name is not None else 1)
            if valid and (values == 1 or (self.is_initializing() and values < 2)) and v.renorm is None and not v.ghost:
                # One value per channel, which the kernels' training refuses (no variance to
                # take): Flax's batch norm of it, y = act(bias + residual) since x - mean = 0,
                # the statistics (x, 0); a model's init with a dummy batch of one, or a batch of
                # one in training. (Fewer while initializing: nothing is updated then.)
                mean, var = _one_value_statistics(xc, self.axis % ndim)
                y = _one_value_output(xc, mean, scale, bias, self.epsilon, self.axis % ndim, r, self.activation)
            else:
                # Batch renorm compares the batch with the running statistics as they are now.
                running = (ra_mean.value, ra_var.value) if v.renorm is not None else (None, None)
                y, mean, var, _, _ = training(xc, scale, bias, eps=self.epsilon, axis=self.axis, axis_name=axis_name,
                                              running_mean=running[0], running_var=running[1],
                                              residual=r, activation=self.activation,
                                              variants=v)
            if not self.is_initializing():
                # The statistics in Flax's dtype for them (dtype, else x's, at least float32 under
                # force_float32_reductions), so batch_stats keep the dtypes Flax gives them (a
                # scan carrying them needs that); the kernels' are in the accumulation dtype.
                stats = jnp.dtype(self.dtype) if self.dtype is not None else jnp.result_type(x)
                if self.force_float32_reductions:
                    stats = jnp.promote_types(stats, jnp.float32)
                mean, var = mean.astype(stats), var.astype(stats)
                keep = skip_mask(mean, var, v)
                new_mean = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                new_var = self.momentum * ra_var.value + (1 - self.momentum) * var
                if keep is not None:
                    new_mean, new_var = jnp.where(keep, ra_mean.value, new_mean), jnp.where(keep, ra_var.value, new_var)
                ra_mean.value, ra_var.value = new_mean, new_var
        return y.astype(out_dtype)


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
