"""recompute_statistics (PreciseBN for torch models): replaces every batch norm layer's running
averages with the exact statistics of its inputs over a pass of data, optionally merged
across the ranks of a process group."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from .._collectives import engine_for
from ..distributed import _merge_everywhere
from ..precise import unbiased_variance


class _Accumulator:
    """One layer's population statistics so far: float64 (mean, biased var, count), merged
    batch by batch with Chan's formula. A forward pre-hook with the call's keywords: a layer
    called as layer(input=x) has its x there (args[0] was an IndexError)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.mean: Any = None
        self.var: Any = None
        self.count = 0
        params = iter(inspect.signature(layer.forward).parameters)
        self.x_name = next(params, "input")  # forward's first parameter: input (torch's), x (BatchNormAct2d)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get(self.x_name)
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != module.num_features:
            return  # not an input the layer takes: its own forward raises its error
        x = x.detach()
        if x.numel() == 0:
            return
        m, v, n = F.statistics(x, axis=1, dtype="float64")
        if self.mean is None:
            self.mean, self.var, self.count = m, v, n
        else:
            self.mean, self.var, self.count = F.merge_statistics([self.mean, m], [self.var, v], [self.count, n])


def _copy(buffer: Any) -> Any:
    """A running statistic's copy to restore after a failed pass; None for a lazy layer's that
    is not made yet (its first batch makes it, at its initial value: nothing to restore)."""
    if isinstance(buffer, torch.nn.parameter.UninitializedBuffer):
        return None
    return buffer.clone()


def _merge_across(acc: Dict[str, _Accumulator], layers: Dict[str, _BatchNorm], process_group: Any) -> None:
    """Every rank's accumulators merged in rank order, a layer at a time: bitwise the same
    statistics on every rank."""
    engine = engine_for(process_group)
    for name, layer in layers.items():
        a = acc[name]
        host = (None, None) if a.mean is None else (a.mean.cpu().numpy(), a.var.cpu().numpy())
        mean, var, count = _merge_everywhere(engine, *host, a.count, layer.num_features, None, "batches")
        a.mean, a.var, a.count = (None, None, 0) if mean is None else (torch.from_numpy(mean), torch.from_numpy(var), count)


def recompute_statistics(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    forward: Optional[Callable[[torch.nn.Module, Any], Any]] = None,
    sync: bool = False,
    process_group: Any = None,
) -> Dict[str, int]:
    """PreciseBN: runs `model` over `batches` (in training mode, without gradients, as the
    layers see data in training) and sets the running statistics of every batch norm layer
    (torch's or batchnorm.torch's, any `_BatchNorm` tracking them) to the exact mean and
    unbiased variance of all its inputs, instead of the momentum averages of past steps.
    `forward(model, batch)` feeds a batch (default: `model(batch)`). sync=True merges every
    rank's statistics across `process_group` (None: the default group), so every rank gets
    the same bits; every rank must then call it (ranks may pass different numbers of
    batches, unless the model has SyncBatchNorm layers, which synchronize every forward). The model's modes, momenta and
    num_batches_tracked are restored. Returns the values per channel each layer saw; a layer
    that saw none keeps its running statistics (count 0)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable or None, got {type(forward).__name__}")
    if process_group is not None and not sync:
        raise ValueError("process_group applies only with sync=True, got a process_group with sync=False")
    layers = {
        name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats
    }
    acc = {name: _Accumulator(m) for name, m in layers.items()}
    modes = {m: m.training for m in model.modules()}
    # Momentum 0 leaves a running statistic as it was, but 0 * Inf is NaN: a batch with an Inf
    # value turned them to NaN, which a failed call then left behind. Restored from copies.
    saved = {name: (m.momentum, m.num_batches_tracked.clone(), _copy(m.running_mean), _copy(m.running_var))
             for name, m in layers.items()}
    hooks = [m.register_forward_pre_hook(acc[name], with_kwargs=True) for name, m in layers.items()]
    try:
        model.train()
        for m in layers.values():
            m.momentum = 0.0  # running = 1 * running + 0 * batch: as it was (but for Inf batch values)
        with torch.no_grad():
            for batch in batches:
                model(batch) if forward is None else forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for name, m in layers.items():
                m.momentum = saved[name][0]
                m.num_batches_tracked.copy_(saved[name][1])
                for buffer, copied in ((m.running_mean, saved[name][2]), (m.running_var, saved[name][3])):
                    if copied is not None:
                        buffer.copy_(copied)
    if sync:
        _merge_across(acc, layers, process_group)
    # The variance each layer tracks: unbiased (torch's), biased where a layer of ours keeps
    # the biased one (running_var_unbiased=False), as its own steps would.
    biased = {name: getattr(m, "running_var_unbiased", True) is False for name, m in layers.items()}
    one = [name for name in layers if acc[name].count == 1 and not biased[name]]
    if one:
        raise ValueError(
            f"every batch norm layer must see at least 2 values per channel (the unbiased variance needs two), "
            f"got 1 in {one}; nothing was changed"
        )
    with torch.no_grad():
        for name, m in layers.items():
            a = acc[name]
            if a.count == 0:
                continue
            var = a.var if biased[name] else unbiased_variance(a.var, a.count)
            m.running_mean.copy_(a.mean.to(m.running_mean.device))
            m.running_var.copy_(var.to(m.running_var.device))
    return {name: acc[name].count for name in layers}
