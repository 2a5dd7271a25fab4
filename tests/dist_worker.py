"""One rank of the multi-process tests (test_distributed.py): the same checks under
torch.distributed (gloo, started by torch.multiprocessing.spawn) and MPI (started by
`mpirun python tests/dist_worker.py`). Each rank runs the SyncBatchNorm layer on its shard
and the plain BatchNorm on the whole batch (every rank builds the same batch from one
seed), asserts they agree, and that running statistics are bitwise equal across ranks;
then bad input on one rank must raise on every rank. Any failed assertion fails the run."""
from __future__ import annotations

import os
import sys

import numpy as np

import batchnorm as bn
from batchnorm._collectives import engine_for
from batchnorm.distributed import SyncBatchNorm, sync_backward, sync_statistics

# Tolerances against the single-process layer on the whole batch, relative to the largest
# |value| of the output: the statistics are merged in another order (rank by rank), which
# moves them by rounding only, so a few ulps of the dtype.
RTOL = {"float32": 2e-5, "float64": 1e-12}
# A whole model trained on shards: the convolutions' sums also run in another order, and two
# SGD steps carry the differences on.
DDP_RTOL = 1e-9
C = 3

# (library, dtype, axis, memory format, exchange): NCHW NumPy; NHWC torch with axis=-1; torch
# NCHW tensors in channels_last memory format with axis=1; both exchanges of the statistics.
VARIANTS = [
    ("numpy", "float32", 1, "contiguous", "allgather"),
    ("numpy", "float64", -1, "contiguous", "allreduce"),
    ("torch", "float64", -1, "contiguous", "allgather"),
    ("torch", "float32", 1, "channels_last", "allreduce"),
]


def as_library(a: np.ndarray, library: str, memory_format: str):
    if library == "numpy":
        return a
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else t


def host(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def close(actual, expected, dtype: str, what: str, rtol: float = 0.0) -> None:
    rtol = rtol or RTOL[dtype]
    a, e = host(actual).astype(np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    scale = np.max(np.abs(e)) if e.size else 0.0
    err = np.max(np.abs(a - e)) if e.size else 0.0
    assert err <= rtol * (scale + 1e-300), f"{what}: max error {err} > {rtol} * {scale}"


def check_layer(group, sizes, variant, momentum) -> None:
    library, dtype, axis, memory_format, exchange = variant
    engine = engine_for(group)
    rank = engine.rank
    assert engine.size == len(sizes)
    rng = np.random.default_rng(7)  # the same batch on every rank
    n = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    shape = (n, C, 4, 5) if axis == 1 else (n, 4, 5, C)
    layer = SyncBatchNorm(C, group=group, momentum=momentum, axis=axis, dtype=dtype, exchange=exchange)
    ref = bn.BatchNorm(C, momentum=momentum, axis=axis, dtype=dtype)
    w, b = rng.uniform(0.5, 2, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    for m in (layer, ref):
        m.weight, m.bias = w.copy(), b.copy()
    cshape = [1] * 4
    cshape[axis] = C
    for step in range(2):
        x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, C).reshape(cshape) + 5.0).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        what = f"rank {rank}, sizes {sizes}, {library} {dtype} axis {axis} {memory_format} {exchange}, step {step}"
        y = layer(as_library(x[lo:hi], library, memory_format))
        dx = layer.backward(as_library(dy[lo:hi], library, memory_format))
        close(y, host(ref(x))[lo:hi], dtype, f"y ({what})")
        close(dx, host(ref.backward(dy))[lo:hi], dtype, f"dx ({what})")
        close(layer.running_mean, ref.running_mean, dtype, f"running_mean ({what})")
        close(layer.running_var, ref.running_var, dtype, f"running_var ({what})")
        assert layer.num_batches_tracked == ref.num_batches_tracked == step + 1
        # Parameter gradients stay per rank: their sum over ranks is the whole batch's.
        total = engine.allreduce(np.concatenate([host(layer.grad_weight), host(layer.grad_bias)]).astype(np.float64))
        close(total[:C], ref.grad_weight, dtype, f"dweight summed over ranks ({what})")
        close(total[C:], ref.grad_bias, dtype, f"dbias summed over ranks ({what})")
        # Bitwise the same running statistics on every rank.
        mine = np.concatenate([host(layer.running_mean), host(layer.running_var)]).astype(np.float64)
        every = engine.allgather(mine)
        assert (every.view(np.int64) == mine.view(np.int64)).all(), f"running statistics differ across ranks ({what})"
    # Eval never communicates: only rank 0 calls it here, and nothing waits for the others.
    if rank == 0:
        layer.eval()
        close(layer(as_library(x, library, memory_format)), host(ref.eval()(x)), dtype, f"eval ({what})")


def check_sync_statistics(group, sizes, exchange="allgather") -> None:
    engine = engine_for(group)
    rank = engine.rank
    rng = np.random.default_rng(11)
    x = rng.standard_normal((sum(sizes), 4, 6)) * 1e-2 + 1e4  # |mean| = 1e6 std
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    mean, var, count = sync_statistics(x[lo:hi], group, axis=1, exchange=exchange)
    assert count == sum(sizes) * 6 and mean.dtype == np.float64
    ref_mean, ref_var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-15)
    np.testing.assert_allclose(var, ref_var, rtol=1e-9)
    every = engine.allgather(np.concatenate([mean, var]))
    assert (every == every[0]).all()
    # One collective instead of two when the channel count is agreed beforehand: same bits.
    mean2, var2, count2 = sync_statistics(x[lo:hi], group, axis=1, channels=4, exchange=exchange)
    assert count2 == count and (mean2 == mean).all() and (var2 == var).all()
    # float64 values about +-2^510 (variance about 1e307, rank 0's shard scaled twice the
    # others'): the sums of count x variance overflow (Inf) where the variance fits. The
    # allreduce exchange then takes the allgather's merge on every rank, whose merge scales.
    def spread(r):
        return np.ldexp((x[sum(sizes[:r]) : sum(sizes[: r + 1])] - 1e4) * 100, 510 if r == 0 else 509)

    mean3, var3, count3 = sync_statistics(spread(rank), group, axis=1, exchange=exchange)
    scaled = np.ldexp(np.concatenate([spread(r) for r in range(len(sizes))]), -510)
    assert count3 == count and np.isfinite(var3).all(), f"rank {rank}: {var3}"
    np.testing.assert_allclose(np.ldexp(mean3, -510), scaled.mean(axis=(0, 2)), rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.ldexp(var3, -1020), scaled.var(axis=(0, 2)), rtol=1e-12)
    every = engine.allgather(np.concatenate([mean3, var3]))
    assert (every == every[0]).all()


def expect_error(kind, pattern, fn) -> None:
    import re

    try:
        fn()
    except kind as err:
        assert re.search(pattern, str(err)), f"{kind.__name__} {str(err)!r} does not match {pattern!r}"
        return
    raise AssertionError(f"expected {kind.__name__} matching {pattern!r}, nothing raised")


class _Broken:
    """An array-like whose shape raises something other than a ValueError or TypeError."""

    @property
    def shape(self):
        raise RuntimeError("a broken array")


def check_failures(group) -> None:
    """Bad input on one rank only raises on every rank, and the group stays usable."""
    engine = engine_for(group)
    rank, size = engine.rank, engine.size
    layer = SyncBatchNorm(C, group=group)
    good = np.random.default_rng(rank).standard_normal((4, C, 5)).astype(np.float32)
    bad_rank = size - 1
    elsewhere = rf"x on rank {bad_rank} of {size} was rejected"
    # Wrong channel count on one rank.
    x = good[:, :2] if rank == bad_rank else good
    expect_error(ValueError, r"x must have 3 channels along axis 1" if rank == bad_rank else elsewhere, lambda: layer(x))
    # A wrong dtype on one rank.
    x = good.astype(np.int32) if rank == bad_rank else good
    expect_error(TypeError, r"x must have dtype" if rank == bad_rank else elsewhere, lambda: layer(x))
    # Different dtypes on different ranks (each fine alone).
    x = good.astype(np.float64) if rank == bad_rank else good
    expect_error(ValueError, r"x must have the same rank and dtype on every rank", lambda: layer(x))
    # Fewer than 2 values per channel over all ranks (one value on rank 0, none elsewhere).
    x = good[:1, :, :1] if rank == 0 else good[:0]
    expect_error(ValueError, r"at least 2 values per channel over every rank .* got 1", lambda: layer(x))
    # The same through the allreduce exchange, whose header is sums.
    by_sums = SyncBatchNorm(C, group=group, exchange="allreduce")
    expect_error(ValueError, r"at least 2 values per channel over every rank .* got 1", lambda: by_sums(x))
    x = good[:, :2] if rank == bad_rank else good
    own = r"x must have 3 channels along axis 1"
    expect_error(ValueError, own if rank == bad_rank else elsewhere, lambda: by_sums(x))
    if size > 2:  # two failing ranks: counted, not named (an allreduce only sums)
        x = good[:, :2] if rank > 0 else good
        expect_error(ValueError, own if rank > 0 else rf"x on {size - 1} ranks of {size} was rejected \(their errors",
                     lambda: by_sums(x))
    x = good.astype(np.float64) if rank == bad_rank else good
    expect_error(ValueError, r"x must have the same rank and dtype on every rank", lambda: by_sums(x))
    assert by_sums.num_batches_tracked == 0
    # A channel count below one, given on every rank, and on one rank only (which raised before
    # the collective, leaving the others waiting in it): every rank raises.
    expect_error(ValueError, r"channels must be a positive int .* got 0", lambda: sync_statistics(good, group, channels=0))
    bad = r"channels must be a positive int .* got 0" if rank == bad_rank else \
        rf"x or channels on rank {bad_rank} of {size} was rejected"
    expect_error(ValueError, bad, lambda: sync_statistics(good, group, channels=0 if rank == bad_rank else C))
    expect_error(ValueError, bad, lambda: sync_statistics(good, group, channels=0 if rank == bad_rank else C,
                                                          exchange="allreduce"))
    # sync_statistics with different channel counts.
    x = good[:, :2] if rank == bad_rank else good
    expect_error(ValueError, r"the same number of channels on every rank", lambda: sync_statistics(x, group))
    # A bad dy on one rank in backward.
    layer(good)
    dy = good[:2] if rank == bad_rank else good
    own = r"dy must have the shape of x"
    others = rf"the backward's arguments on rank {bad_rank} of {size} were rejected \(its error says why\)"
    expect_error(ValueError, own if rank == bad_rank else others, lambda: layer.backward(dy))
    assert layer.num_batches_tracked == 1  # the rejected forward calls changed nothing
    # sync_backward's weight and count, which only its last step reads, are checked before its
    # allreduce: one rank raising after it left the others in their next collective.
    mean, var, count = sync_statistics(good, group)
    _, m, s = bn.forward_training(good, batch_statistics=(mean, var, count))
    w = np.ones(2 if rank == bad_rank else C, np.float32)
    own = r"weight must have shape \(3,\), got \(2,\) \(x has shape \(4, 3, 5\)"
    expect_error(ValueError, own if rank == bad_rank else others,
                 lambda: sync_backward(good, good, m, s, count, group, weight=w))
    n = float(count) if rank == bad_rank else count
    expect_error(TypeError, r"count must be an int, got float" if rank == bad_rank else others,
                 lambda: sync_backward(good, good, m, s, n, group))
    # An axis of the wrong type on one rank: a TypeError on every rank (it was raised before the
    # collective, and the others waited in it).
    axis = 1.0 if rank == bad_rank else 1
    expect_error(TypeError, r"axis must be an int, got float" if rank == bad_rank else elsewhere,
                 lambda: sync_statistics(good, group, axis=axis))
    expect_error(TypeError, r"axis must be an int, got float" if rank == bad_rank else others,
                 lambda: sync_backward(good, good, m, s, count, group, axis=axis))
    # An axis in range but not the channels', and an x of other channels, on one rank: the
    # allreduce was sized by x there (gloo aborted the process, MPI truncated the message).
    expect_error(ValueError, r"mean must have shape \(5,\), got \(3,\)" if rank == bad_rank else others,
                 lambda: sync_backward(good, good, m, s, count, group, axis=2 if rank == bad_rank else 1))
    wide = np.concatenate([good, good[:, :1]], axis=1) if rank == bad_rank else good
    expect_error(ValueError, r"mean must have shape \(4,\), got \(3,\)" if rank == bad_rank else others,
                 lambda: sync_backward(wide, wide, m, s, count, group))
    # An error that is neither a ValueError nor a TypeError (a broken array object) is reported
    # through the exchange too, instead of leaving the others waiting in it.
    x = _Broken() if rank == bad_rank else good
    expect_error(RuntimeError if rank == bad_rank else ValueError,
                 r"a broken array" if rank == bad_rank else elsewhere, lambda: sync_statistics(x, group))
    expect_error(RuntimeError if rank == bad_rank else ValueError,
                 r"a broken array" if rank == bad_rank else elsewhere, lambda: layer(x))
    # Still in step: a good forward and backward on every rank.
    layer(good)
    layer.backward(good)
    # The count stops at int64's largest, as the plain layer's (it ran past what state_dict stores).
    layer.load_state_dict({**layer.state_dict(), "num_batches_tracked": 2**63 - 1})
    layer(good)
    assert layer.num_batches_tracked == 2**63 - 1 and layer.state_dict()["num_batches_tracked"] == 2**63 - 1


def check_recompute(group, sizes) -> None:
    """SyncBatchNorm.recompute_statistics: every rank passes its own batches (rank r holds
    sizes[r] of them, none for an empty rank); the running statistics are those of all of
    them together, as the plain layer's over the concatenation, bitwise equal across ranks;
    bad batches on one rank raise on every rank."""
    engine = engine_for(group)
    rank, size = engine.rank, engine.size
    rng = np.random.default_rng(9)
    everyone = [[rng.standard_normal((1 + (i + r) % 3, C, 4)) * 2 + 1e3 for i in range(s)] for r, s in enumerate(sizes)]
    layer = SyncBatchNorm(C, group=group, dtype="float64")
    ref = bn.BatchNorm(C, dtype="float64").recompute_statistics(b for batches in everyone for b in batches)
    layer.recompute_statistics(everyone[rank])
    close(layer.running_mean, ref.running_mean, "float64", f"recomputed mean, rank {rank}")
    close(layer.running_var, ref.running_var, "float64", f"recomputed var, rank {rank}")
    mine = np.concatenate([layer.running_mean, layer.running_var])
    assert (engine.allgather(mine) == mine).all(), "recomputed statistics differ across ranks"
    bad = size - 1
    batches = [np.ones((2, C + 1, 4))] if rank == bad else everyone[rank]
    expect_error(ValueError, r"must have 3 channels" if rank == bad else rf"batches on rank {bad} of {size} was rejected",
                 lambda: layer.recompute_statistics(batches))
    batches = [np.ones((2, C, 4), np.int32)] if rank == bad else everyone[rank]  # a TypeError stays one everywhere
    expect_error(TypeError, r"batches\[0\] must have dtype" if rank == bad else rf"batches on rank {bad} of {size} was rejected",
                 lambda: layer.recompute_statistics(batches))


def check_copies(group) -> None:
    """A layer copied after a synchronized step (deepcopy; pickle too on torch's default
    group, which is no object of its own) trains on in sync as the original does: the copy
    builds its own engine (the original's handles neither copy nor pickle) and shares the
    group."""
    import copy
    import pickle

    rank = engine_for(group).rank
    x = np.random.default_rng(rank).standard_normal((4, C, 2)).astype(np.float32)
    layer = SyncBatchNorm(C, group=group, momentum=0.5)
    layer(x)
    layer.backward(x)
    copies = [copy.deepcopy(layer)] + ([pickle.loads(pickle.dumps(layer))] if group is None else [])
    assert all(c.group is group for c in copies[:1])
    y, dx = layer(x * 2), layer.backward(x)
    for i, c in enumerate(copies):
        what = f"rank {rank}: copy {i}"
        close(c(x * 2), y, "float32", what)
        close(c.backward(x), dx, "float32", what)
        close(c.running_var, layer.running_var, "float32", what)


def run_all(group, sizes, libraries=("numpy", "torch")) -> None:
    for i, variant in enumerate(VARIANTS):
        if variant[0] in libraries:
            check_layer(group, sizes, variant, momentum=0.3 if i % 2 == 0 else None)
    check_sync_statistics(group, sizes, "allreduce")
    check_sync_statistics(group, sizes)
    check_recompute(group, sizes)
    check_failures(group)
    check_copies(group)


# ---- batchnorm.torch.SyncBatchNorm against torch's own BatchNorm on the whole batch ----------


def _torch_close(actual, expected, dtype: str, what: str) -> None:
    close(actual, host(expected), dtype, what)


def check_torch_module(group, sizes, dtype: str, channels_last: bool, momentum) -> None:
    """Every rank's output slice, dx, running statistics and (summed over ranks) parameter
    gradients against torch.nn.BatchNorm2d on the concatenated batch; running statistics
    bitwise equal across ranks."""
    import copy

    import torch
    import torch.distributed as dist

    import batchnorm.torch as bt

    rank, world = dist.get_rank(), dist.get_world_size()
    tdtype = getattr(torch, dtype)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    gen = torch.Generator().manual_seed(3)  # the same batch and parameters on every rank
    layer = bt.SyncBatchNorm(C, momentum=momentum, process_group=group, dtype=tdtype)
    ref = torch.nn.BatchNorm2d(C, momentum=momentum, dtype=tdtype)
    with torch.no_grad():
        for m in (layer, ref):
            m.weight.copy_(torch.rand(C, generator=gen, dtype=tdtype) + 0.5)
            m.bias.copy_(torch.randn(C, generator=gen, dtype=tdtype))
            gen.manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(2):
        what = f"rank {rank}, sizes {sizes}, torch module {dtype} channels_last={channels_last}, step {step}"
        x = torch.randn(sum(sizes), C, 4, 5, generator=gen, dtype=tdtype) * 2 + 3
        dy = torch.randn(x.shape, generator=gen, dtype=tdtype)
        xs = x[lo:hi].contiguous(memory_format=fmt).requires_grad_()
        xr = x.clone().contiguous(memory_format=fmt).requires_grad_()
        # The second step takes a lazily negated view of the same values (torch's negative
        # bit): its memory holds -x, which DLPack hands over as it is. (Not on an empty rank,
        # whose resolved copy need not keep channels_last strides.)
        y = layer(xs if step == 0 or hi == lo else torch._neg_view(xs.neg()))
        assert y.is_contiguous(memory_format=fmt), what
        y.backward(dy[lo:hi].contiguous(memory_format=fmt))
        want = ref(xr)
        want.backward(dy.contiguous(memory_format=fmt))
        _torch_close(y, want[lo:hi], dtype, f"y ({what})")
        _torch_close(xs.grad, xr.grad[lo:hi], dtype, f"dx ({what})")
        _torch_close(layer.running_mean, ref.running_mean, dtype, f"running_mean ({what})")
        _torch_close(layer.running_var, ref.running_var, dtype, f"running_var ({what})")
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1, what
        grads = torch.cat([layer.weight.grad, layer.bias.grad]).double()
        dist.all_reduce(grads, group=group)  # per-rank shares: their sum is the whole batch's
        _torch_close(grads[:C], ref.weight.grad, dtype, f"dweight summed over ranks ({what})")
        _torch_close(grads[C:], ref.bias.grad, dtype, f"dbias summed over ranks ({what})")
        mine = torch.cat([layer.running_mean, layer.running_var]).double()
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        assert all(torch.equal(e.view(torch.int64), mine.view(torch.int64)) for e in every), (
            f"running statistics differ across ranks ({what})"
        )
        for m in (layer, ref):
            m.weight.grad = m.bias.grad = None
    twin = copy.deepcopy(layer)  # after synchronized steps: the engine is rebuilt, not copied
    assert twin._engine is None and twin.process_group is layer.process_group
    assert torch.equal(twin.running_var, layer.running_var) and twin.running_var is not layer.running_var
    if rank == 0:  # eval never communicates: only rank 0 calls it
        layer.eval(), ref.eval()
        _torch_close(layer(x), ref(x), dtype, f"eval ({what})")


def check_torch_failures(group) -> None:
    """Bad input on one rank raises on every rank (the check runs before the exchange), and
    the group stays usable."""
    import torch
    import torch.distributed as dist

    import batchnorm.torch as bt

    rank, world = dist.get_rank(), dist.get_world_size()
    bad = world - 1
    layer = bt.SyncBatchNorm(C, process_group=group)
    good = torch.randn(4, C, 5)
    elsewhere = rf"x on rank {bad} of {world} was rejected"
    cases = [
        (good[:, :2], ValueError, r"weight must have shape \(2,\)|x must have 3 channels"),  # channels
        (good[0, 0], ValueError, r"expected at least 2D input"),  # torch's own check
        (good.to(torch.int32), TypeError, r"x must have dtype"),
    ]
    for x, kind, own in cases:
        expect_error(kind, own if rank == bad else elsewhere, lambda: layer(x if rank == bad else good))
    # Not a tensor at all on one rank (it failed before the exchange, and the others waited in it).
    expect_error(TypeError, r"x must be a Tensor, got numpy.ndarray" if rank == bad else elsewhere,
                 lambda: layer(good.numpy() if rank == bad else good))
    # A sparse tensor: refused by name, and reported too.
    expect_error(TypeError, r"x must be a dense \(strided\) tensor" if rank == bad else elsewhere,
                 lambda: layer(good.to_sparse() if rank == bad else good))
    # Running statistics that require grad on one rank: refused on every rank.
    graded = bt.SyncBatchNorm(C, process_group=group)
    graded.running_var.requires_grad_(rank == bad)
    expect_error(ValueError, r"running_var must not require grad" if rank == bad else elsewhere, lambda: graded(good))
    assert torch.equal(graded.running_var, torch.ones(C)) and int(graded.num_batches_tracked) == 0
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.zeros(C))
    # A torch.func transform on one rank: refused on every rank, before the exchange.
    transformed = r"cannot run under torch.func transforms" if rank == bad else elsewhere
    expect_error(ValueError, transformed, lambda: torch.func.grad(lambda x: layer(x).sum())(good) if rank == bad
                 else layer(good))
    assert int(layer.num_batches_tracked) == 0
    layer(good).sum().backward()  # still in step
    assert int(layer.num_batches_tracked) == 1
    # A second derivative through the exchange is refused on every rank (the first-order
    # gradient under create_graph=True is the usual one), not a silent zero.
    x = good.clone().requires_grad_()
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    x2 = good.clone().requires_grad_()
    (want,) = torch.autograd.grad(layer(x2).square().sum(), x2)
    assert torch.equal(g.detach(), want)
    expect_error(RuntimeError, "no double backward .* through SyncBatchNorm", lambda: g.square().sum().backward())
    # The weight alone requiring grad reaches the refusal too (dx depends on it).
    x = good.clone().requires_grad_()
    (g,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    expect_error(RuntimeError, "no double backward .* through SyncBatchNorm",
                 lambda: torch.autograd.grad(g.square().sum(), layer.weight))


def check_ddp_resnet(group, sizes) -> None:
    """ResNet-18 converted with sync=True under DistributedDataParallel, 2 SGD steps on uneven
    shards, against torch's unconverted model on the whole batch in one process: outputs,
    losses, every parameter and buffer after the steps (float64; tolerance 1e-9 of scale)."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import batchnorm.torch as bt

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from resnet import resnet18

    rank, world = dist.get_rank(), dist.get_world_size()
    lo, hi, n = sum(sizes[:rank]), sum(sizes[: rank + 1]), sum(sizes)
    torch.manual_seed(0)
    ref = resnet18(num_classes=5).double()
    model = DDP(bt.convert(copy.deepcopy(ref), sync=True, process_group=group), process_group=group)
    assert sum(type(m) is bt.SyncBatchNorm for m in model.modules()) == 20
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, ref)]
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64)
        target = torch.randint(0, 5, (n,), generator=gen)
        for o in opts:
            o.zero_grad()
        out = model(x[lo:hi])
        # The whole batch's mean loss: DDP averages gradients over ranks, so each rank's share
        # of the sum is scaled by the number of ranks.
        loss = torch.nn.functional.cross_entropy(out, target[lo:hi], reduction="sum") * world / n
        loss.backward()
        want = ref(x)
        torch.nn.functional.cross_entropy(want, target).backward()
        close(out.detach(), want.detach()[lo:hi].numpy(), "float64", f"ResNet-18 logits, rank {rank}, step {step}", DDP_RTOL)
        for o in opts:
            o.step()
    mine = dict(model.module.named_parameters()) | dict(model.module.named_buffers())
    for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
        if t.is_floating_point():
            close(mine[name].detach(), t.detach().numpy(), "float64", f"ResNet-18 {name} after 2 steps, rank {rank}",
                  DDP_RTOL)
        else:
            assert torch.equal(mine[name], t), name


def check_torch_checkpointing(group) -> None:
    """Activation checkpointing (use_reentrant=False) stops the recomputed forward after the
    running statistics' update: that update is counted, as torch's layers count it, so that
    momentum=None's average matches a plain layer's on the same recomputation. And a rank
    outside a group (new_group's marker) converts like torch's converter: local batch norm."""
    import torch
    import torch.distributed as dist
    from torch.utils.checkpoint import checkpoint

    import batchnorm.torch as bt

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(11)
    xs = [torch.randn(4 * world, C, 3, 3, generator=gen) * (i + 1) + i for i in range(3)]
    synced = bt.SyncBatchNorm(C, momentum=None, process_group=group)
    whole = bt.BatchNorm2d(C, momentum=None)  # the whole batch in one process, recomputed the same way
    for x in xs:
        for layer, batch in ((synced, x[4 * rank : 4 * rank + 4]), (whole, x)):
            checkpoint(layer, batch.clone().requires_grad_(), use_reentrant=False).square().sum().backward()
    assert int(synced.num_batches_tracked) == int(whole.num_batches_tracked) == 6
    _torch_close(synced.running_mean, whole.running_mean, "float32", f"rank {rank}: checkpointed running mean")
    _torch_close(synced.running_var, whole.running_var, "float32", f"rank {rank}: checkpointed running var")
    alone = dist.new_group([0])  # every rank calls new_group; the last is no member
    converted = bt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(C)), sync=True, process_group=alone)
    assert type(converted[0]) is bt.SyncBatchNorm
    if rank != 0:  # outside the group: batch norm of its own batch, as torch's layer does
        y = converted(xs[0][:4])
        _torch_close(y, bt.BatchNorm2d(C)(xs[0][:4]), "float32", "non-member's local batch norm")
        # The NumPy layer and sync_statistics have no local form: refused naming the marker
        # (it was "group must be ... got int").
        marker = r"group must be a process group that holds this rank, got GroupMember.NON_GROUP_MEMBER"
        expect_error(ValueError, marker, lambda: sync_statistics(xs[0][:4].numpy(), alone))
        expect_error(ValueError, marker, lambda: SyncBatchNorm(C, group=alone)(xs[0][:4].numpy()))


def check_torch_recompute(group, sizes) -> None:
    """recompute_statistics(sync=True): every rank passes its own number of batches; the
    running statistics become those of every rank's batches together, bitwise equal across
    ranks."""
    import torch
    import torch.distributed as dist

    import batchnorm.torch as bt

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(5)
    # Rank r holds sizes[r] batches (none for an empty rank), of 1-3 samples each.
    everyone = [[torch.randn(1 + (i + r) % 3, C, 4, 4, generator=gen) * 3 + 7 for i in range(s)]
                for r, s in enumerate(sizes)]
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(C))
    counts = bt.recompute_statistics(model, everyone[rank], sync=True, process_group=group)
    whole = torch.cat([b for batches in everyone for b in batches]).double().numpy()
    assert counts["0"] == whole.size // C
    close(model[0].running_mean, whole.mean(axis=(0, 2, 3)), "float32", f"recomputed mean, rank {rank}")
    close(model[0].running_var, whole.var(axis=(0, 2, 3), ddof=1), "float32", f"recomputed var, rank {rank}")
    mine = torch.cat([model[0].running_mean, model[0].running_var]).double()
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    assert all(torch.equal(e, mine) for e in every), "recomputed statistics differ across ranks"


def check_default_group_made_again(rank: int, init_file: str, sizes) -> None:
    """Layers on torch's default group (group None) that ran a synchronized step, after that
    group is destroyed and each rank makes a one-rank group of its own: they follow the new
    group (a step on one rank's shard is plain batch norm of it) instead of the engine they
    cached for the old one, whose size no longer matches."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import batchnorm.torch as bt

    x = np.random.default_rng(rank).standard_normal((max(sizes[rank], 2), C, 3)).astype(np.float32)
    layers = (SyncBatchNorm(C, group=None), bt.SyncBatchNorm(C))
    layers[0](x)
    layers[1](torch.from_numpy(x))  # both engines built for the group of every rank
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{init_file}.alone{rank}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    expected = bn.forward_training(x, np.ones(C, np.float32), np.zeros(C, np.float32))[0]
    close(layers[0](x), expected, "float32", f"rank {rank}: NumPy layer on its new one-rank group")
    close(layers[1](torch.from_numpy(x)).detach().numpy(), expected, "float32",
          f"rank {rank}: torch layer on its new one-rank group")


def torch_main(rank: int, world: int, init_file: str, sizes, default_group: bool) -> None:
    """torch.multiprocessing.spawn's entry: one gloo rank, on torch's default group (group
    None) or on an explicit ProcessGroup."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    bn.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        group = None if default_group else dist.new_group(list(range(world)))
        run_all(group, sizes)
        for i, (dtype, channels_last) in enumerate([("float32", True), ("float64", False)]):
            check_torch_module(group, sizes, dtype, channels_last, momentum=None if i else 0.3)
        check_torch_failures(group)
        check_torch_checkpointing(group)
        check_torch_recompute(group, sizes)
        check_ddp_resnet(group, sizes)
        if default_group:
            check_default_group_made_again(rank, init_file, sizes)
    finally:
        dist.destroy_process_group()


def mpi_main() -> None:
    from mpi4py import MPI

    bn.set_num_threads(1)
    comm = MPI.COMM_WORLD
    for spec in sys.argv[1:]:  # NumPy arrays only: torch is the other engine's test
        run_all(comm, tuple(int(s) for s in spec.split(",")), libraries=("numpy",))
    # A rank that Split left out holds MPI.COMM_NULL: refused by name (it was MPI_ERR_COMM).
    part = comm.Split(0 if comm.Get_rank() == 0 else MPI.UNDEFINED, 0)
    if comm.Get_rank() != 0:
        null = r"group must be a communicator that holds this rank, got MPI.COMM_NULL"
        expect_error(ValueError, null, lambda: SyncBatchNorm(C, group=part)(np.ones((4, C, 2), np.float32)))
    else:
        part.Free()
    comm.Barrier()
    print(f"rank {comm.Get_rank()} of {comm.Get_size()}: ok", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mpi_main()
