"""BatchNorm: a drop-in for flax.nnx.BatchNorm (a subclass: same constructor, Param and
BatchStat variables, nnx.state / nnx.split / checkpoints, train() / eval() / nnx.view) whose
normalization runs on this library's kernels (functional.py)."""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

try:
    from flax import nnx
    from flax.nnx.nn import dtypes
except ImportError as error:  # flax is an optional dependency, as for batchnorm.jax.BatchNorm
    raise ImportError("batchnorm.jax.nnx needs flax: pip install 'batchnorm[flax]'") from error

from ..functional import _activation_code
from ._flax import check_call, normalize, running_averages
from .functional import check_variants

__all__ = ["BatchNorm"]

if "promote_dtype" not in inspect.signature(nnx.BatchNorm.__init__).parameters:  # pragma: no cover
    raise ImportError("batchnorm.jax.nnx needs a flax whose nnx.BatchNorm takes promote_dtype (flax >= 0.11): "
                      "pip install -U flax")


class BatchNorm(nnx.BatchNorm):
    """flax.nnx.BatchNorm on batchnorm's kernels.

    NNX's conventions: `momentum` is the running average's decay, the running variance is the
    biased batch variance, x and every variable are promoted together (`promote_dtype`, to
    `dtype` when given) and y comes back in that dtype; the batch statistics are at least
    float32. `axis` is one feature axis. use_fast_variance is accepted for compatibility: the
    variance is always the exact one (Welford and Chan). With `axis_name` the statistics span
    that mapped axis (nnx.vmap / shard_map), merged exactly.

    Beyond flax.nnx.BatchNorm, keyword-only: `activation="relu"` with the call's `residual=`
    (x's shape) gives relu(BN(x) + residual) in the passes of plain batch norm (the running
    statistics are those of x alone); `renorm=(rmax, dmax)`, `ghost_batch=G` and
    `skip_nonfinite=True` as in batchnorm.jax.BatchNorm (README "Variants")."""

    def __init__(self, num_features: int, *, activation: Optional[str] = None,
                 renorm: Optional[Sequence[float]] = None, ghost_batch: Optional[int] = None,
                 skip_nonfinite: bool = False, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        _activation_code(activation)  # None or "relu", else the functions' error
        v = check_variants(running_var_unbiased=False, renorm=renorm, ghost_batch=ghost_batch,
                           skip_nonfinite=skip_nonfinite, axis_name=self.axis_name)
        self.activation = activation
        self.renorm = v.renorm
        self.ghost_batch = v.ghost or None
        self.skip_nonfinite = v.skip_nonfinite

    def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None, residual=None):
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("No `use_running_average` argument was provided to BatchNorm: pass it to the "
                             "constructor or the call, or take a view with nnx.view(model, use_running_average=...)")
        v = check_call(self, mask)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        # NNX promotes x and every variable to one dtype (its promote_dtype, `dtype` when given)
        # and computes in it: so do the kernels.
        x, mean, var, scale, bias = self.promote_dtype((jnp.asarray(x), self.mean[...], self.var[...], scale, bias),
                                                       dtype=self.dtype)
        r = None if residual is None else jnp.asarray(residual).astype(x.dtype)
        y, batch_mean, batch_var = normalize(x, scale, bias, mean, var, use_running_average=bool(use_running_average),
                                             eps=self.epsilon, axis=self.axis, axis_name=self.axis_name, residual=r,
                                             activation=self.activation, v=v)
        if not use_running_average:
            # NNX's statistics dtype: `dtype`, else x's, at least float32.
            stats = jnp.promote_types(self.dtype if self.dtype is not None else x.dtype, jnp.float32)
            new_mean, new_var = running_averages(self.mean[...], self.var[...], batch_mean.astype(stats),
                                                 batch_var.astype(stats), self.momentum, v)
            # (NNX stops the gradient into array-ref variables, which an update would otherwise carry.)
            refs = getattr(self.mean, "_can_update", False) or getattr(self.var, "_can_update", False)
            stop = jax.lax.stop_gradient if refs else (lambda a: a)
            self.mean[...] = stop(new_mean)
            self.var[...] = stop(new_var)
        return y.astype(dtypes.canonicalize_dtype(*[a for a in (x, scale, bias) if a is not None], dtype=self.dtype))
