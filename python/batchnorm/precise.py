"""precise_statistics (PreciseBN): the exact per-channel statistics of a whole population of
batches, for replacing a trained model's running averages (which lag behind the weights) with
the statistics the final weights produce. Each batch is reduced by the kernels in float64 and
folded into the total with merge_statistics (Chan), one batch in memory at a time."""
from __future__ import annotations

from typing import Any, Iterable, Tuple

from . import functional as F
from ._arrays import check_int


def unbiased_variance(var: Any, count: int) -> Any:
    """The unbiased variance that running statistics hold (torch's convention), from a biased
    `var` over `count` values: the one place Python code makes this correction."""
    return var * (count / (count - 1))


def _named(err: Exception, where: str) -> Exception:
    """statistics' error about its argument `x` as one about the caller's `where`
    (batches[i]); any other error as it is."""
    message = str(err)
    if message.startswith(("x ", "x.")):
        return type(err)(where + message[1:])
    return err


def _count_of(x: Any, axis: int, where: str) -> Tuple[int, int]:
    """(channels, values per channel) of a batch from its shape alone."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{where} must be an array, got {type(x).__name__}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:  # (the core's words; an axis range for a 0-d batch read "[0, -1]")
        dims = f"{len(shape)} dimension{'' if len(shape) == 1 else 's'}"
        raise ValueError(f"{where} must have at least 2 dimensions (N, C, ...), got {dims} with shape {shape}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis must be in [{-len(shape)}, {len(shape) - 1}] for {where} of shape {shape}, got {axis}")
    c = shape[axis]
    total = 1
    for s in shape:
        total *= s
    return c, (total // c if c else 0)


def precise_statistics(batches: Iterable[Any], *, axis: int = 1) -> Tuple[Any, Any, int]:
    """Per-channel (mean, biased var, count) over every value of every array of `batches`
    (any iterable, e.g. a data loader's inputs to one layer), exactly as statistics() of their
    concatenation would give (to rounding: the merge runs in float64). Arrays without values
    are skipped; all others must have the same number of channels along `axis`. mean and var
    are float64 arrays of the first batch's library and device. Fewer than one value per
    channel over all batches is a ValueError."""
    axis = check_int(axis, "axis")
    mean = var = None
    count = 0
    channels = None
    for i, x in enumerate(batches):
        where = f"batches[{i}]"
        c, n = _count_of(x, axis, where)
        if n == 0:
            continue  # skipped, its channel count unchecked: it adds nothing
        if channels is None:
            channels = (c, i)
        elif c != channels[0]:
            raise ValueError(
                f"{where} must have {channels[0]} channels along axis {axis} (as batches[{channels[1]}]), "
                f"got shape {tuple(x.shape)}"
            )
        try:
            m, v, n = F.statistics(x, axis=axis, dtype="float64")
        except (TypeError, ValueError) as err:
            raise _named(err, where) from None
        if mean is None:
            mean, var, count = m, v, n
        else:
            mean, var, count = F.merge_statistics([mean, m], [var, v], [count, n])
    if mean is None:
        raise ValueError("batches must hold at least one value per channel, got none (no batch, or only empty ones)")
    return mean, var, count
