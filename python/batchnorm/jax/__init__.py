"""batchnorm.jax: this library's kernels inside XLA programs (jit, grad, vmap, shard_map).

`batch_norm` is a pure function (API.md, "JAX: batchnorm.jax"); `BatchNorm` is a drop-in for
flax.linen.BatchNorm, `batchnorm.jax.nnx.BatchNorm` one for flax.nnx.BatchNorm, and
`recompute_batch_stats` is PreciseBN for Flax models (all three need flax). The kernels run as
XLA FFI targets, zero-copy, on the CPU and, in a CUDA build, on the GPU; `disabled_checks()`
lets jax.export serialize programs that call them."""
try:
    import jax as _jax_module  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised without jax installed
    raise ImportError(
        "batchnorm.jax needs JAX: pip install 'batchnorm[jax]' (jax and jaxlib >= 0.10.2; "
        "'batchnorm[flax]' adds flax for batchnorm.jax.BatchNorm)"
    ) from e

from ._ffi import disabled_checks
from .functional import batch_norm

__all__ = ["BatchNorm", "batch_norm", "disabled_checks", "recompute_batch_stats"]


def __getattr__(name):
    # BatchNorm needs flax; importing it lazily keeps batch_norm usable with jax alone.
    if name in ("BatchNorm", "recompute_batch_stats"):
        try:
            from .linen import BatchNorm
            from .precise import recompute_batch_stats
        except ImportError as e:
            if getattr(e, "name", None) and e.name.split(".")[0] == "flax":
                raise ImportError(f"batchnorm.jax.{name} needs flax: pip install 'batchnorm[flax]'") from e
            raise
        return BatchNorm if name == "BatchNorm" else recompute_batch_stats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
