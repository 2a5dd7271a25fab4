"""The functions of the batchnorm contract (../shared/API.md), over NumPy arrays or any
DLPack array. Each call returns the caller's kind of array, on the caller's device; the
native core (batchnorm._C) validates every argument and does the work without the GIL."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

from . import _C
from ._arrays import check_axis, check_int, check_out, check_real, check_written, foreign_args, kind_of

Array = Any


def statistics(x: Array, *, axis: int = 1, dtype: Any = None, stream: Any = None) -> Tuple[Array, Array, int]:
    """Per-channel batch mean and biased variance of `x` (channel axis `axis`), in the
    accumulation type (float32 for float16/bfloat16/float32, float64 for float64), and the
    number of values per channel. Numerically stable at any magnitude. dtype="float64" (or
    NumPy's / torch's float64) returns the kernels' float64 moments unrounded, for shards
    that are merged later (merge_statistics, batchnorm.distributed)."""
    axis = check_axis(axis, x)
    wide = _wide_dtype(dtype)
    kind = kind_of(x, stream)
    mean, var, count = _C.statistics(kind.args(x)[0], axis, wide, kind.call)
    return kind.wrap(mean), kind.wrap(var), count


def _wide_dtype(dtype: Any) -> bool:
    """statistics' dtype: None (the accumulation type) or float64 under any library's name."""
    if dtype is None:
        return False
    if str(dtype).replace("torch.", "") in ("float64", "double"):
        return True
    try:
        import numpy as np

        if np.dtype(dtype) == np.float64:
            return True
    except TypeError:
        pass
    raise TypeError(f"dtype must be None (the accumulation type) or float64, got {dtype!r}")


def merge_statistics(
    means: Sequence[Array], vars: Sequence[Array], counts: Sequence[int], *, stream: Any = None
) -> Tuple[Array, Array, int]:
    """Combines per-shard (mean, biased var, count) exactly as if the statistics had been
    computed over the concatenated shards (Chan's formula). Shards with count 0 are ignored."""
    lead = means[0] if isinstance(means, (list, tuple)) and len(means) > 0 else None
    kind = kind_of(lead, stream, "means[0]")
    if isinstance(means, (list, tuple)) and isinstance(vars, (list, tuple)):  # (else the core names them)
        means, vars = foreign_args(means), foreign_args(vars)
    mean, var, count = _C.merge_statistics(means, vars, counts, kind.call)
    return kind.wrap(mean), kind.wrap(var), count


def forward_training(
    x: Array,
    weight: Optional[Array] = None,
    bias: Optional[Array] = None,
    *,
    running_mean: Optional[Array] = None,
    running_var: Optional[Array] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    out: Optional[Array] = None,
    batch_statistics: Optional[Tuple[Array, Array, int]] = None,
    residual: Optional[Array] = None,
    activation: Optional[str] = None,
    running_var_unbiased: bool = True,
    renorm: Optional[Tuple[float, float]] = None,
    ghost_batch: Optional[int] = None,
    skip_nonfinite: bool = False,
    stream: Any = None,
) -> Tuple[Array, ...]:
    """Training-mode batch norm: y = (x - mean) * invstd * weight + bias with the batch
    statistics. Returns (y, saved_mean, saved_invstd). When given, running_mean and
    running_var are updated in place with PyTorch's momentum convention:
    running = (1 - momentum) * running + momentum * batch (unbiased variance).

    batch_statistics=(mean, var, count): the statistics of a batch that x is a part of
    (x may be empty), e.g. from batchnorm.distributed.sync_statistics; x is then not
    reduced, and count (values per channel of the whole batch) makes the unbiased variance
    of the running update. Everything else is as with x's own statistics.

    Fused: y = act(bn(x) + residual) in the passes of plain batch norm (plus the read of
    `residual`, an array of x's shape and dtype), activation None or "relu".

    Training variants (README "Variants"), each in the passes of plain batch norm:
    running_var_unbiased=False updates running_var with the biased batch variance (Keras,
    Flax). renorm=(rmax, dmax): batch renormalization (Ioffe 2017), y = weight * (x_hat * r +
    d) + bias with r = clip(sigma_B / sigma_run, 1/rmax, rmax) and d = clip((mean_B -
    mean_run) / sigma_run, -dmax, dmax) from the running statistics before this step (needed);
    returns (y, saved_mean, saved_invstd, r, d) and backward takes renorm=(r, d).
    ghost_batch=G: statistics per group of G consecutive samples along axis 0 (G divides N);
    saved_mean / saved_invstd are (N // G, C), backward takes ghost_batch=G, and the running
    statistics are updated once with the whole batch's. skip_nonfinite=True: a channel whose
    batch statistics are NaN or Inf keeps its running statistics bit for bit."""
    momentum = check_real(momentum, "momentum")
    eps = check_real(eps, "eps")
    axis = check_axis(axis, x)
    code = _activation_code(activation)
    check_out(out)
    check_written(running_mean, "running_mean")
    check_written(running_var, "running_var")
    running_var_unbiased = _check_bool(running_var_unbiased, "running_var_unbiased")
    skip_nonfinite = _check_bool(skip_nonfinite, "skip_nonfinite")
    rmax, dmax = _renorm_limits(renorm)
    ghost = _ghost(ghost_batch)
    batch_mean = batch_var = None
    batch_count = 0
    if batch_statistics is not None:
        if not isinstance(batch_statistics, (tuple, list)) or len(batch_statistics) != 3:
            raise TypeError(
                "batch_statistics must be a (mean, var, count) tuple, got "
                f"{type(batch_statistics).__name__}"
                + (f" of length {len(batch_statistics)}" if isinstance(batch_statistics, (tuple, list)) else "")
            )
        batch_mean, batch_var, batch_count = batch_statistics
        batch_count = check_int(batch_count, "batch_statistics count")
    kind = kind_of(x, stream)
    xa, wa, ba, rma, rva, outa, bma, bva, resa = kind.args(
        x, weight, bias, running_mean, running_var, out, batch_mean, batch_var, residual
    )
    # Every argument by position: pybind11 matches keywords by building each name's string
    # (5 us of a small training call's overhead).
    results = _C.forward_training(
        xa, wa, ba, rma, rva, momentum, eps, axis, outa, bma, bva, batch_count, kind.call, None, None, resa, code,
        running_var_unbiased, skip_nonfinite, renorm is not None, rmax, dmax, ghost,
    )  # fmt: skip
    kind.written(out, running_mean, running_var)
    return kind.results(results, out)


def _check_bool(value: Any, name: str) -> bool:
    """A flag: a bool, or NumPy's (np.True_; a bool itself, its type is also named "bool")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _ghost(ghost_batch: Any) -> int:
    """ghost_batch as the core's group size (0: off)."""
    if ghost_batch is None:
        return 0
    g = check_int(ghost_batch, "ghost_batch")
    if g < 1:
        raise ValueError(f"ghost_batch must be a positive int (samples per group) or None, got {g}")
    return g


def _renorm_limits(renorm: Any) -> Tuple[float, float]:
    """renorm=(rmax, dmax) as two reals (the core checks rmax >= 1 and dmax >= 0); None is off."""
    if renorm is None:
        return 1.0, 0.0
    if not isinstance(renorm, (tuple, list)) or len(renorm) != 2:
        raise TypeError(
            "renorm must be None or an (rmax, dmax) pair of numbers, got "
            + (f"a sequence of length {len(renorm)}" if isinstance(renorm, (tuple, list)) else type(renorm).__name__)
        )
    return check_real(renorm[0], "renorm rmax"), check_real(renorm[1], "renorm dmax")


def _layer_renorm(renorm: Any) -> Optional[Tuple[float, float]]:
    """A layer's renorm option, checked when the layer is built (the functions leave the
    values to the core): None, or (rmax >= 1, dmax >= 0)."""
    if renorm is None:
        return None
    rmax, dmax = _renorm_limits(renorm)
    if not (rmax >= 1.0 and dmax >= 0.0):
        raise ValueError(f"renorm must be (rmax >= 1, dmax >= 0), got {tuple(renorm)}")
    return rmax, dmax


def forward_inference(
    x: Array,
    mean: Array,
    var: Array,
    weight: Optional[Array] = None,
    bias: Optional[Array] = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    out: Optional[Array] = None,
    residual: Optional[Array] = None,
    activation: Optional[str] = None,
    stream: Any = None,
) -> Array:
    """Inference-mode batch norm with given statistics:
    y = (x - mean) / sqrt(var + eps) * weight + bias; fused, act(y + residual) in one pass
    (activation None or "relu")."""
    eps = check_real(eps, "eps")
    axis = check_axis(axis, x)
    code = _activation_code(activation)
    check_out(out)
    kind = kind_of(x, stream)
    xa, ma, va, wa, ba, outa, resa = kind.args(x, mean, var, weight, bias, out, residual)
    y = _C.forward_inference(xa, ma, va, wa, ba, eps, axis, outa, kind.call, resa, code)  # by position
    if out is not None:
        kind.written(out)
        return out
    return kind.wrap(y)


def backward(
    dy: Array,
    x: Array,
    saved_mean: Array,
    saved_invstd: Array,
    weight: Optional[Array] = None,
    *,
    axis: int = 1,
    out: Optional[Array] = None,
    y: Optional[Array] = None,
    activation: Optional[str] = None,
    residual: bool = False,
    renorm: Optional[Tuple[Array, Array]] = None,
    ghost_batch: Optional[int] = None,
    stream: Any = None,
) -> Tuple[Array, ...]:
    """Gradients of forward_training: (dx, dweight, dbias), where dweight = sum(dy * x_hat)
    and dbias = sum(dy) per channel (always returned). `out` receives dx (it may be dy).

    Of the fused forward: activation="relu" takes the mask from `y`, the fused forward's
    output; residual=True also returns the residual's gradient, (dx, dweight, dbias,
    dresidual). Equal to differentiating act(bn(x) + residual).

    Of the training variants: renorm=(r, d), the batch-renorm forward's r and d, taken as
    constants; ghost_batch=G with that forward's (N // G, C) saved statistics."""
    axis = check_axis(axis, x)
    code = _activation_code(activation)
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool (return the residual's gradient), got {type(residual).__name__}")
    r = d = None
    if renorm is not None:
        if not isinstance(renorm, (tuple, list)) or len(renorm) != 2:
            raise TypeError(f"renorm must be None or the forward's (r, d) pair of arrays, got {type(renorm).__name__}")
        r, d = renorm
    ghost = _ghost(ghost_batch)
    check_out(out)
    kind = kind_of(x, stream)
    dya, xa, ma, sa, wa, outa, ya, ra, da = kind.args(dy, x, saved_mean, saved_invstd, weight, out, y, r, d)
    results = _C.backward(
        dya, xa, ma, sa, wa, axis, outa, kind.call, None, None, ya, code, residual, None, ra, da, ghost
    )  # by position, as in forward_training
    kind.written(out)
    return kind.results(results, out)


_ACTIVATIONS = {None: 0, "relu": 1}


def _activation_code(activation: Any) -> int:
    """The core's code of a fused op's activation (None or "relu")."""
    if isinstance(activation, str) or activation is None:
        code = _ACTIVATIONS.get(activation)
        if code is not None:
            return code
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    raise TypeError(f"activation must be None or 'relu', got {type(activation).__name__}")


def backward_reduce(
    dy: Array, x: Array, mean: Array, invstd: Array, *, axis: int = 1, stream: Any = None
) -> Tuple[Array, Array, Array, Array]:
    """The reduce step of backward, for batches split across processes (torch's
    batch_norm_backward_reduce): this shard's per-channel sum(dy) and sum(dy * (x - mean))
    in float64, which the caller adds up over every shard, and this shard's dweight =
    sum(dy * x_hat) and dbias = sum(dy) in the accumulation type. `mean` / `invstd` are the
    forward's saved_mean / saved_invstd. An empty shard gives zeros.
    Returns (sum_dy, sum_dy_xmu, dweight, dbias)."""
    axis = check_axis(axis, x)
    kind = kind_of(x, stream)
    results = _C.backward_reduce(*kind.args(dy, x, mean, invstd), axis, kind.call)
    return kind.results(results)  # type: ignore[return-value]


def backward_elemt(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    sum_dy: Array,
    sum_dy_xmu: Array,
    count: int,
    weight: Optional[Array] = None,
    *,
    axis: int = 1,
    out: Optional[Array] = None,
    stream: Any = None,
) -> Array:
    """The elementwise step of backward (torch's batch_norm_backward_elemt): dx of this
    shard from the sums of backward_reduce added up over every shard and `count`, the values
    per channel over every shard. On a single shard, backward_reduce then backward_elemt give
    backward's dx bit for bit."""
    axis = check_axis(axis, x)
    count = check_int(count, "count")
    check_out(out)
    kind = kind_of(x, stream)
    dya, xa, ma, sa, sdya, sdxa, wa, outa = kind.args(dy, x, mean, invstd, sum_dy, sum_dy_xmu, weight, out)
    dx = _C.backward_elemt(dya, xa, ma, sa, sdya, sdxa, count, wa, axis, outa, kind.call)
    if out is not None:
        kind.written(out)
        return out
    return kind.wrap(dx)


def fold(
    kernel: Array,
    conv_bias: Optional[Array],
    mean: Array,
    var: Array,
    weight: Optional[Array] = None,
    bias: Optional[Array] = None,
    *,
    eps: float = 1e-5,
    axis: int = 0,
    stream: Any = None,
) -> Tuple[Array, Array]:
    """Folds an inference batch norm into the preceding conv / linear layer. `axis` is the
    kernel's output-channel axis (0 for Conv/Linear in PyTorch layout, 1 for ConvTranspose).
    Returns (kernel', bias') in the kernel's dtype, computed in float64."""
    eps = check_real(eps, "eps")
    axis = check_axis(axis, kernel)
    kind = kind_of(kernel, stream, "kernel")
    kernel, conv_bias, mean, var, weight, bias = foreign_args((kernel, conv_bias, mean, var, weight, bias))
    k, b = _C.fold(kernel, conv_bias, mean, var, weight, bias, eps, axis, kind.call)
    return kind.wrap(k), kind.wrap(b)


def info() -> dict:
    """Version, the CPU ISA level in use, the CPU thread count and the CUDA status."""
    return _C.info()


def set_num_threads(n: int) -> None:
    """Sets the process-wide thread count of the CPU kernels (an int >= 1)."""
    _C.set_num_threads(n)


def empty_cache() -> int:
    """Returns the memory batchnorm keeps for reuse to the system: freed host result buffers
    of 1 MiB and more (up to BATCHNORM_HOST_CACHE_MB, default 512), the CPU threads' cached
    temporaries (blocks of 4 KiB and more, up to 32 of them and 32 MiB a thread) and, with
    CUDA, the unused part of batchnorm's device memory pools (after the GPU finishes the queued
    work). Returns the bytes released."""
    return _C.empty_cache()


def get_num_threads() -> int:
    """The process-wide thread count of the CPU kernels."""
    return _C.get_num_threads()
