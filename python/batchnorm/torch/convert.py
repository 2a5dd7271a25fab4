"""convert(): swaps torch.nn's batch norm layers in a model for batchnorm.torch's, reusing
the very Parameter and buffer objects (optimizers, devices, dtypes and requires_grad carry
over untouched)."""
from __future__ import annotations

from typing import Any

import torch

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm

# Exact types: a user's subclass of torch's layers may have its own forward.
_OURS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.SyncBatchNorm: SyncBatchNorm,
}
# What sync=True replaces: torch's layers and ours.
_SYNCED = (*_OURS, BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)


def _replacement(module: torch.nn.Module, cls: type, process_group: Any) -> torch.nn.Module:
    # Built on the meta device (nothing allocated), then given the original tensors.
    args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    if cls is SyncBatchNorm:
        group = process_group if process_group is not None else getattr(module, "process_group", None)
        args = (*args, group)
    new = cls(*args, device="meta", bias=module.bias is not None or not module.affine)
    for name in ("weight", "bias"):
        setattr(new, name, getattr(module, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(module, name))
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def _check_process_group(process_group: Any) -> None:
    if process_group is None:
        return
    import torch.distributed as dist

    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup or None, got {type(process_group).__name__}"
        )


def convert(module: torch.nn.Module, *, sync: bool = False, process_group: Any = None) -> torch.nn.Module:
    """Returns `module` with every torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm inside it
    replaced by batchnorm.torch's (in place; `module` itself is replaced when it is one).
    sync=False: each layer becomes its counterpart (torch's SyncBatchNorm ours, keeping its
    process group). sync=True: every batch norm layer, torch's or ours, becomes
    batchnorm.torch.SyncBatchNorm on `process_group` (None: the default group, or a
    SyncBatchNorm's own group), as torch.nn.SyncBatchNorm.convert_sync_batchnorm does."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
    if process_group is not None and not sync:
        raise ValueError("process_group applies only with sync=True, got a process_group with sync=False")
    _check_process_group(process_group)
    return _convert(module, sync, process_group)


def _convert(module: torch.nn.Module, sync: bool, process_group: Any) -> torch.nn.Module:
    if sync and type(module) in _SYNCED:
        return _replacement(module, SyncBatchNorm, process_group)
    if not sync and type(module) in _OURS:
        return _replacement(module, _OURS[type(module)], None)
    for name, child in module.named_children():
        new = _convert(child, sync, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
