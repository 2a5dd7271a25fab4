"""convert(): swaps torch.nn's batch norm layers in a model for batchnorm.torch's, reusing
the very Parameter and buffer objects (optimizers, devices, dtypes and requires_grad carry
over untouched)."""
from __future__ import annotations

from typing import Any

import torch

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

# Exact types: a user's subclass of torch's layers may have its own forward.
_OURS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d}


def _replacement(module: torch.nn.Module) -> torch.nn.Module:
    cls = _OURS[type(module)]
    # Built on the meta device (nothing allocated), then given the original tensors.
    new = cls(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
        device="meta", bias=module.bias is not None or not module.affine,
    )  # fmt: skip
    for name in ("weight", "bias"):
        setattr(new, name, getattr(module, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(module, name))
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert(module: torch.nn.Module, *, sync: bool = False, process_group: Any = None) -> torch.nn.Module:
    """Returns `module` with every torch.nn.BatchNorm1d/2d/3d inside it replaced by
    batchnorm.torch's (in place; `module` itself is replaced when it is one). sync=True
    (SyncBatchNorm) is not available yet; torch.nn.SyncBatchNorm layers are left as they are."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if sync:
        raise NotImplementedError(
            "batchnorm.torch.convert(sync=True) needs batchnorm.torch.SyncBatchNorm, which this version "
            "does not have yet; use sync=False, or torch.nn.SyncBatchNorm for now"
        )
    if process_group is not None:
        raise ValueError("process_group applies only with sync=True, got a process_group with sync=False")
    if type(module) in _OURS:
        return _replacement(module)
    for name, child in module.named_children():
        new = convert(child)
        if new is not child:
            setattr(module, name, new)
    return module
