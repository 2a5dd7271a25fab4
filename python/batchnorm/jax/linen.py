"""BatchNorm: a drop-in for flax.linen.BatchNorm (same fields, defaults, collections and
update rule) whose normalization runs on this library's kernels (functional.py). Swapping
`nn.BatchNorm` for `batchnorm.jax.BatchNorm` in a model keeps its variables and checkpoints."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import initializers
from flax.linen.dtypes import canonicalize_dtype

from ._flax import check_call, normalize, running_averages

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
        v = check_call(self, mask)
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
        # Flax leaves the mapped axis out while initializing (there may be none).
        y, mean, var = normalize(xc, scale, bias, ra_mean.value, ra_var.value,
                                 use_running_average=bool(use_running_average), eps=self.epsilon, axis=self.axis,
                                 axis_name=None if self.is_initializing() else self.axis_name, residual=r,
                                 activation=self.activation, v=v, initializing=self.is_initializing())
        if not use_running_average and not self.is_initializing():
            # The statistics in Flax's dtype for them (dtype, else x's, at least float32 under
            # force_float32_reductions), so batch_stats keep the dtypes Flax gives them (a
            # scan carrying them needs that); the kernels' are in the accumulation dtype.
            stats = jnp.dtype(self.dtype) if self.dtype is not None else jnp.result_type(x)
            if self.force_float32_reductions:
                stats = jnp.promote_types(stats, jnp.float32)
            ra_mean.value, ra_var.value = running_averages(ra_mean.value, ra_var.value, mean.astype(stats),
                                                           var.astype(stats), self.momentum, v)
        return y.astype(out_dtype)
