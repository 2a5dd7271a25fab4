"""Synchronized batch norm across processes, on existing engines (mpi4py, torch.distributed):
the statistics and input gradients of a batch split over every rank of a group.

Forward: each rank reduces its shard to per-channel (count, mean, biased var) in float64 with
the library's kernels, one allgather exchanges them with a small header, and every rank
merges the rows in rank order with merge_statistics (Chan), so all ranks hold bitwise the
same statistics (exchange="allreduce": two allreduces of O(C) values instead, for many ranks). Backward: backward_reduce per rank, one allreduce of (sum dy,
sum dy * (x - mean)), backward_elemt. Every local check runs before a collective and its
outcome travels in the collective's buffer, so bad input on one rank raises on every rank
instead of leaving the others waiting."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from . import functional as F
from ._arrays import DTYPES, _from_dlpack_of, _library, check_int
from ._collectives import Engine, check_group, copy_sharing_group, engine_for
from .layer import _DEFAULT, BatchNorm, _as_state, _device_of, _to_device_like, _to_numpy

__all__ = ["SyncBatchNorm", "sync_backward", "sync_statistics"]

# Header of each rank's row: status (0, or the error below), ndim, dtype code, count.
_HEADER = 4
_ERRORS = {1: ValueError, 2: TypeError}
_STATUS = {ValueError: 1, TypeError: 2}


def _status(err: Exception) -> int:
    """The status a rank reports for its error. Every error met before a collective is
    reported (an AttributeError from a non-array, a sparse tensor's NotImplementedError...),
    not only the checks' ValueError and TypeError: one left out hung the other ranks in the
    collective. The failing rank re-raises its own; the others raise a TypeError for a
    TypeError, else a ValueError."""
    return _STATUS[TypeError] if isinstance(err, TypeError) else _STATUS[ValueError]


def _raise_everywhere(status: np.ndarray, own: Optional[Exception], what: str, size: int) -> None:
    """After a collective whose rows carry each rank's status: the failing ranks re-raise their
    own error, the others one of the same type naming the first failing rank."""
    failed = np.flatnonzero(status)
    if failed.size == 0:
        return
    if own is not None:
        raise own
    rank = int(failed[0])
    raise _ERRORS.get(int(status[rank]), ValueError)(_rejected(what, f"rank {rank}", size, "was", "its error says"))


def _rejected(what: str, where: str, size: int, are: str, says: str) -> str:
    """The message of the ranks whose own input was fine after another rank's was rejected."""
    return f"{what} on {where} of {size} {are} rejected ({says} why); every rank raises so that none is left waiting " \
        "in a collective"


# The status an allreduce carries (it only sums): one count of failing ranks per error type,
# and the sum of (rank + 1) over the failing ranks, which names the rank when one failed.
_FLAGS = 3


def _flags(own: Optional[Exception], rank: int) -> list:
    flags = [0.0] * _FLAGS
    if own is not None:
        flags[_status(own) - 1] = 1.0
        flags[2] = rank + 1.0
    return flags


def _raise_from_sums(failed: np.ndarray, own: Optional[Exception], what: str, size: int, are: str = "was") -> None:
    """After an allreduce that carried _flags: the failing ranks re-raise their own error, the
    others a TypeError if every failure was one, else a ValueError, naming the failing rank
    when a single one failed."""
    count = int(failed[0] + failed[1])
    if count == 0:
        return
    if own is not None:
        raise own
    kind = TypeError if failed[1] and not failed[0] else ValueError
    if count == 1:
        raise kind(_rejected(what, f"rank {int(failed[2]) - 1}", size, are, "its error says"))
    raise kind(_rejected(what, f"{count} ranks", size, are, "their errors say"))


def _validate(x: Any, axis: int, channels: Optional[int]) -> Tuple[int, int, int, int]:
    """(ndim, dtype code, normalized axis, count per channel) of a shard, or the error a
    batchnorm function would raise for it (empty shards included, which the kernels skip)."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    shape = tuple(int(s) for s in shape)
    dtype = str(getattr(x, "dtype", "")).replace("torch.", "")
    if dtype not in DTYPES:
        names = f"{', '.join(DTYPES[:-1])} or {DTYPES[-1]}"
        raise TypeError(f"x must have dtype {names}, got {dtype or type(x).__name__}")
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got {ndim} with shape {shape}")
    axis = check_int(axis, "axis")  # (here, inside the exchange: a bad axis on one rank raises on every rank)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim - 1}] for an array of rank {ndim}, got {axis}")
    axis = axis % ndim
    c = shape[axis]
    if channels is not None and c != channels:
        raise ValueError(f"x must have {channels} channels along axis {axis}, got shape {shape}")
    if c < 1:
        raise ValueError(f"x must have at least one channel, got shape {shape}")
    return ndim, DTYPES.index(dtype), axis, int(np.prod(shape, dtype=np.int64)) // c


def _local_moments(x: Any, axis: int, c: int, own: Optional[Exception]):
    """This rank's part of an exchange: (its error or None, (ndim, dtype code, count), float64
    mean, float64 biased var), zeros for an empty or rejected shard. `own`: an error this rank
    already met, reported through the exchange like a bad x."""
    header, mean, var = (0, 0, 0), np.zeros(c), np.zeros(c)
    try:
        if own is not None:
            raise own
        ndim, code, axis, count = _validate(x, axis, c)
        header = (ndim, code, count)
        if count > 0:
            m, v, _ = F.statistics(x, axis=axis, dtype="float64")
            mean, var = _to_numpy(m, "mean").astype(np.float64), _to_numpy(v, "var").astype(np.float64)
    except Exception as err:  # noqa: BLE001 (any error: reported, not left to hang the others)
        return err, header, mean, var
    return None, header, mean, var


def _check_total(total: int, per_rank: str) -> None:
    if total < 2:
        raise ValueError(
            "x must have at least 2 values per channel over every rank of the group in training (the batch "
            f"variance needs two), got {total} ({per_rank})"
        )


def _exchange(
    engine: Engine, x: Any, axis: int, channels: int, device: Any, own: Optional[Exception] = None,
    how: str = "allgather", what: str = "x",
) -> Tuple[np.ndarray, np.ndarray, int]:
    """The global (mean, biased var) in float64 on the host and the total count. `what`: the
    rejected input as the other ranks' errors name it."""
    own, (ndim, code, count), mean, var = _local_moments(x, axis, channels, own)
    if how == "allreduce":
        return _by_allreduce(engine, own, ndim, code, count, mean, var, device, what)
    return _by_allgather(engine, own, ndim, code, count, mean, var, device, what)


def _by_allgather(engine, own, ndim, code, count, mean, var, device, what="x"):
    """One allgather of size x (4 + 2C) values, merged in rank order on every rank
    (merge_statistics): bitwise the same result everywhere, by construction."""
    c = mean.size
    row = np.concatenate([[_status(own) if own else 0, ndim, code, count], mean, var])
    rows = engine.allgather(row, device)
    _raise_everywhere(rows[:, 0], own, what, engine.size)
    ndims, codes = rows[:, 1].astype(np.int64), rows[:, 2].astype(np.int64)
    if (ndims != ndims[0]).any() or (codes != codes[0]).any():
        got = ", ".join(f"rank {r}: {int(n)}-d {DTYPES[int(k)]}" for r, (n, k) in enumerate(zip(ndims, codes)))
        raise ValueError(f"x must have the same rank and dtype on every rank of the group, got {got}")
    counts = [int(n) for n in rows[:, 3]]
    total = sum(counts)
    _check_total(total, f"per rank: {counts}")
    means = [rows[r, _HEADER : _HEADER + c] for r in range(engine.size)]
    vars_ = [rows[r, _HEADER + c :] for r in range(engine.size)]
    mean, var, _ = F.merge_statistics(means, vars_, counts)
    return mean, var, total


# Past this magnitude (a shard's |mean| or standard deviation) the allreduce's sums of
# count x mean and count x M2 may overflow double where the statistics fit (the core's merge
# scales such shards from the same point, kMergeHeadroom in core/recipes.h): below it every
# term stays under 2^961 for counts up to 2^63.
_HEADROOM = 2.0**448


def _huge(mean: np.ndarray, var: np.ndarray) -> bool:
    """Whether a shard's finite statistics pass _HEADROOM (NaN and Inf propagate as they are)."""
    with np.errstate(invalid="ignore"):
        return bool((np.abs(mean[np.isfinite(mean)]) >= _HEADROOM).any()
                    or (var[np.isfinite(var)] >= _HEADROOM * _HEADROOM).any())


def _by_allreduce(engine, own, ndim, code, count, mean, var, device, what="x"):
    """Two allreduces of C + 9 and C values, whatever the number of ranks: sum(n mean) gives
    the global mean, then sum(M2 + n (mean - global mean)^2) the global M2 (Chan's formula
    summed over every shard at once: each term >= 0, so as stable as the pairwise merge).
    Every rank gets the same bits as far as the engine's allreduce gives every rank the same
    sum (NCCL, gloo and Open MPI do). The header travels as sums: the status (_flags), the
    count, sum(v), sum(v^2) of ndim and dtype, which agree everywhere iff P sum(v^2) ==
    sum(v)^2, and the number of ranks whose statistics pass _HEADROOM: with any, every rank
    takes the allgather's merge instead (overflow-safe), one more collective only then."""
    size = engine.size
    huge = 1.0 if own is None and _huge(mean, var) else 0.0
    head = [*_flags(own, engine.rank), count, ndim, ndim * ndim, code, code * code, huge]
    with np.errstate(over="ignore"):  # huge shards' sums may overflow: they are not used then
        first = engine.allreduce(np.concatenate([head, count * mean]), device)
    _raise_from_sums(first[:_FLAGS], own, what, size)
    n, n2, k, k2, any_huge = first[_FLAGS + 1 : _FLAGS + 6]
    if size * n2 != n**2 or size * k2 != k**2:
        raise ValueError("x must have the same rank and dtype on every rank of the group, got different ones")
    total = int(first[_FLAGS])
    _check_total(total, "over all ranks")
    if any_huge:
        return _by_allgather(engine, None, ndim, code, count, mean, var, device)
    global_mean = first[len(head) :] / total
    m2 = count * var + count * (mean - global_mean) ** 2
    return global_mean, engine.allreduce(m2, device) / total, total


def _merge_everywhere(engine: Engine, mean: Any, var: Any, count: int, channels: int, own: Optional[Exception],
                      what: str) -> Tuple[Any, Any, int]:
    """Moments held by every rank (float64 host vectors; count 0 for none) merged in rank order
    after one allgather of P x (2C + 1) values: bitwise the same (mean, biased var, count) on
    every rank, (None, None, 0) when no rank has a value. A rank's error (`own`) travels as a
    negative count, minus its status (_status: a TypeError stays one on the other ranks), and
    raises on every rank."""
    row = np.zeros(2 * channels + 1)
    row[0] = -_status(own) if own is not None else count
    if own is None and count > 0:
        row[1 : 1 + channels], row[1 + channels :] = mean, var
    rows = engine.allgather(row, None)
    _raise_everywhere(np.where(rows[:, 0] < 0, -rows[:, 0], 0).astype(np.int64), own, what, engine.size)
    counts = [int(n) for n in rows[:, 0]]
    if sum(counts) == 0:
        return None, None, 0
    return F.merge_statistics(
        [np.ascontiguousarray(r[1 : 1 + channels]) for r in rows], [np.ascontiguousarray(r[1 + channels :]) for r in rows],
        counts,
    )


_EXCHANGES = ("allgather", "allreduce")


def _check_exchange(exchange: Any) -> str:
    if exchange not in _EXCHANGES:
        raise ValueError(f"exchange must be 'allgather' or 'allreduce', got {exchange!r}")
    return exchange


def _torch_device(x: Any) -> Any:
    return x.device if _library(x) == "torch" else None


def _like(a: np.ndarray, x: Any) -> Any:
    """A host result as x's kind of array, on x's device."""
    library = _library(x)
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack__"):
        return a
    device = _device_of(x)
    if device is not None and device[0] == "cuda":
        return _to_device_like(a, x)
    if library == "torch":
        import torch

        return torch.from_numpy(a)
    return _from_dlpack_of(library)(a)


def _agreed_channels(engine: Engine, x: Any, axis: int) -> int:
    """sync_statistics' first, 1-value allgather: the channel count, which sizes the second."""
    own: Optional[Exception] = None
    row = np.zeros(2, np.float64)
    try:
        ndim, _, axis, _ = _validate(x, axis, None)
        row[1] = x.shape[axis]
    except Exception as err:  # noqa: BLE001 (any error: reported, not left to hang the others)
        own = err
        row[0] = _status(err)
    rows = engine.allgather(row, _torch_device(x))
    _raise_everywhere(rows[:, 0], own, "x", engine.size)
    channels = rows[:, 1].astype(np.int64)
    if (channels != channels[0]).any():
        raise ValueError(
            f"x must have the same number of channels on every rank of the group, got {[int(c) for c in channels]}"
        )
    return int(channels[0])


def sync_statistics(
    x: Any, group: Any, *, axis: int = 1, channels: Optional[int] = None, exchange: str = "allgather"
) -> Tuple[Any, Any, int]:
    """Per-channel (mean, biased var, count) of the concatenation of every rank's `x` over
    the reduced axes, as statistics() would give on the whole batch; ranks may hold
    different batch sizes, including none. `group`: an mpi4py communicator or a
    torch.distributed process group (None: torch's default group). mean and var are float64
    (the exchanged moments unrounded), as x's kind of array; every rank gets bitwise the
    same. One allgather of P x (2C + 4) float64 values when every rank passes the same
    `channels` (a layer's num_features); without it a first 2-value allgather agrees on the
    channel count. exchange="allreduce": two allreduces of C + 9 and C values instead of the
    allgather, cheaper beyond a few dozen ranks (see the README's cost model), identical on
    every rank as far as the engine's allreduce is. Fewer than 2 values per channel over all
    ranks, or bad input on any rank, raises on every rank."""
    exchange = _check_exchange(exchange)
    engine = engine_for(group)
    own: Optional[Exception] = None
    given = channels
    if channels is None:
        channels = _agreed_channels(engine, x, axis)
    else:
        try:
            channels = check_int(channels, "channels")
            if channels < 1:
                raise ValueError(f"channels must be a positive int (x's channel count on every rank), got {channels}")
        except (TypeError, ValueError) as err:
            # Reported through the exchange, sized by x's channels (the others' count when x is
            # right): raised here, it left the other ranks waiting in their allgather.
            own, channels = err, _channels_of(x, None, axis) or 1
    what = "x" if given is None else "x or channels"
    mean, var, count = _exchange(engine, x, axis, channels, _torch_device(x), own=own, how=exchange, what=what)
    return _like(mean, x), _like(var, x), count


def _channels_of(x: Any, mean: Any, axis: int) -> int:
    """The channel count that sizes the backward's allreduce: the length of mean, which
    sync_statistics gave every rank alike, else (mean is no array: the error is reported
    through the allreduce) x's along axis. Sized by x first, one rank's wrong axis or x of
    other channels made its allreduce another size than the others' (gloo aborted the
    process, MPI truncated) instead of raising on every rank."""
    for a, dim in ((mean, -1), (x, axis)):
        try:
            return int(a.shape[dim])
        except Exception:  # noqa: BLE001
            continue
    return 0


def _check_elemt(dy: Any, x: Any, mean: Any, invstd: Any, count: int, weight: Any, axis: int, c: int) -> None:
    """backward_elemt's own checks (weight, count) before the allreduce, on empty slices of dy
    and x along a reduced axis: backward_reduce does not look at them, and after the allreduce
    one rank raised while the others went on to their next collective."""
    ndim = len(x.shape)
    along = 1 if axis % ndim == 0 else 0
    empty = tuple(slice(0, 0) if d == along else slice(None) for d in range(ndim))
    zeros = _to_device_like(np.zeros(c), x)
    x_empty = x[empty]
    try:
        F.backward_elemt(dy[empty], x_empty, mean, invstd, zeros, zeros, count, weight, axis=axis)
    except (ValueError, TypeError) as err:  # messages that quote x's shape quote the caller's
        shape = lambda a: str(tuple(int(n) for n in a.shape))  # noqa: E731
        raise type(err)(str(err).replace(f"x has shape {shape(x_empty)}", f"x has shape {shape(x)}")) from None


def sync_backward(
    dy: Any, x: Any, mean: Any, invstd: Any, count: int, group: Any, weight: Any = None, *, axis: int = 1
) -> Tuple[Any, Any, Any]:
    """The backward pass of batch norm over a batch split across `group`: backward_reduce on
    this rank, one allreduce of (sum dy, sum dy * (x - mean)) with three status values
    (2C + 3 float64 values), backward_elemt with the sums and `count` of every rank.
    `mean` / `invstd` are this rank's saved_mean / saved_invstd of forward_training with the
    synchronized statistics, `count` their total count. Returns (dx, dweight, dbias), the
    parameter gradients this rank's share (sum them, or average them with the other
    parameters' gradients, across ranks). A bad dy, x or axis on any rank raises on every
    rank; `mean` must have the same length on every rank (it sizes the allreduce: another one
    makes the engines' sizes differ, which gloo answers by aborting)."""
    # axis is checked by the backward's functions, inside the exchange (a bad one on one rank
    # raises on every rank).
    return _sync_backward(engine_for(group), dy, x, mean, invstd, count, weight, axis)


def _sync_backward(engine: Engine, dy: Any, x: Any, mean: Any, invstd: Any, count: int, weight: Any,
                   axis: int) -> Tuple[Any, Any, Any]:
    c = _channels_of(x, mean, axis)
    row = np.zeros(2 * c + _FLAGS, np.float64)
    own: Optional[Exception] = None
    dweight = dbias = None
    try:
        sum_dy, sum_dy_xmu, dweight, dbias = F.backward_reduce(dy, x, mean, invstd, axis=axis)
        row[:c] = _to_numpy(sum_dy, "sum_dy")
        row[c : 2 * c] = _to_numpy(sum_dy_xmu, "sum_dy_xmu")
        _check_elemt(dy, x, mean, invstd, count, weight, axis, c)
    except Exception as err:  # noqa: BLE001 (any error: reported, not left to hang the others)
        own = err
        row[2 * c :] = _flags(err, engine.rank)
    total = engine.allreduce(row, _torch_device(x))
    _raise_from_sums(total[2 * c :], own, "the backward's arguments", engine.size, are="were")
    dx = F.backward_elemt(
        dy, x, mean, invstd, _to_device_like(total[:c], x), _to_device_like(total[c : 2 * c], x), count, weight,
        axis=axis,
    )
    return dx, dweight, dbias


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose training statistics and input gradients span every rank of `group`
    (an mpi4py communicator, or a torch.distributed process group; None: torch's default
    group). Per training step: one allgather of size x (2C + 4) float64 values forward (or,
    with exchange="allreduce", two allreduces of C + 9 and C), one allreduce of 2C + 3
    backward. Running statistics come from the global unbiased variance
    and are bitwise identical on every rank; parameter gradients stay per rank (average
    them like any parameter's). Evaluation never communicates."""

    def __init__(
        self,
        num_features: int,
        *,
        group: Any,
        eps: Optional[float] = None,
        momentum: Any = _DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: Optional[int] = None,
        dtype: str = "float32",
        exchange: str = "allgather",
        convention: str = "torch",
        skip_nonfinite: bool = False,
    ) -> None:
        # Batch renorm and ghost batch norm are per-process ideas: not offered across processes.
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            axis=axis,
            dtype=dtype,
            convention=convention,
            skip_nonfinite=skip_nonfinite,
        )
        check_group(group)
        self.exchange = _check_exchange(exchange)
        self.group = group
        self._engine: Optional[Engine] = None

    def __getstate__(self) -> dict:
        # The engine holds the engine's handles (torch.distributed's module, a communicator),
        # which neither copy nor pickle: a copy (an EMA model, a checkpoint of the layer)
        # builds its own at its next synchronized step.
        return {**super().__getstate__(), "_engine": None}

    def __deepcopy__(self, memo: dict) -> "SyncBatchNorm":
        return copy_sharing_group(self, self.group, memo)

    def _group_engine(self) -> Engine:
        # Resolved at the first training step (torch's default group may be created after the
        # layer), again when that group was destroyed and made anew (its rank and size may differ).
        if self._engine is None or not self._engine.current():
            self._engine = engine_for(self.group)
        return self._engine

    def __call__(self, x: Any) -> Any:
        if not self.training:
            return super().__call__(x)  # running (or local batch) statistics, no communication
        engine = self._group_engine()
        own: Optional[Exception] = None
        try:
            self._follow(x)  # state next to x (GPU inputs); fails for libraries it cannot hold state in
        except Exception as err:  # noqa: BLE001 (any error: reported, not left to hang the others)
            own = err
        mean, var, count = _exchange(engine, x, self.axis, self.num_features, _torch_device(x), own, self.exchange)
        update = self.track_running_stats
        y, saved_mean, saved_invstd = F.forward_training(
            x,
            self.weight,
            self.bias,
            batch_statistics=(_to_device_like(mean, x), _to_device_like(var, x), count),
            **self._training_options(update),
        )
        if update:
            self._count_batch()  # (capped as the plain layer's: it ran past 2**63 - 1 here)
        self._saved = ("sync", x, saved_mean, saved_invstd, count)
        return y

    def backward(self, dy: Any) -> Any:
        if self._saved is None or self._saved[0] != "sync":
            return super().backward(dy)
        _, x, mean, invstd, count = self._saved
        dx, dweight, dbias = _sync_backward(self._group_engine(), dy, x, mean, invstd, count, self.weight, self.axis)
        if self.affine:
            # As BatchNorm.backward accumulates its gradients (this rank's share).
            dweight = _as_state(dweight, self.dtype, x)
            dbias = _as_state(dbias, self.dtype, x)
            self.grad_weight = dweight if self.grad_weight is None else self.grad_weight + dweight
            self.grad_bias = dbias if self.grad_bias is None else self.grad_bias + dbias
        return dx

    def recompute_statistics(self, batches: Any) -> "SyncBatchNorm":
        """PreciseBN over every rank's batches together (each rank passes its own, any number,
        none included): the running statistics become the exact statistics of all of them,
        bitwise the same on every rank. Every rank must call it; bad batches on one rank raise
        on every rank."""
        self._check_recompute()
        own: Optional[Exception] = None
        mean = var = None
        count = 0
        try:
            mean, var, count = self._local_population(batches)
        except Exception as err:  # noqa: BLE001 (any error: reported, not left to hang the others)
            own = err
        mean, var, count = _merge_everywhere(self._group_engine(), mean, var, count, self.num_features, own, "batches")
        self._set_running(mean, var, count)
        return self

    def __repr__(self) -> str:
        return (
            super().__repr__().replace("BatchNorm(", "SyncBatchNorm(", 1)[:-1]
            + f", exchange={self.exchange!r}, group={self.group!r})"
        )
