"""convert(): swaps torch.nn's batch norm layers in a model for batchnorm.torch's, reusing
the very Parameter and buffer objects (optimizers, devices, dtypes and requires_grad carry
over untouched)."""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Dict, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _Base
from .norm_act import BatchNormAct2d
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
    _carry_over(module, new)
    return new


# nn.Module's hook registries (forward, backward, state_dict...): those a fresh module has.
_HOOKS = tuple(name for name in vars(torch.nn.Module()) if "hook" in name)
# Instance attributes that are the old layer's code, not something given to it: an instance
# forward (accelerate's hooks and other wrappers set one, bound to the old layer) would keep
# running torch's forward on the shared buffers; Module.compile()'s compiled call is the old
# layer's forward compiled.
_CODE = ("forward", "_compiled_call_impl")


def _carry_over(module: torch.nn.Module, new: torch.nn.Module) -> None:
    """What else the model gave the layer: its hooks (the very registries, so the handles
    registered on the old layer still remove them, and each hook gets the new layer), the
    attributes set on it (qconfig, a user's tags; not its code, _CODE) and modules attached to
    it (observers). torch's convert_sync_batchnorm carries only qconfig: a feature-extraction
    hook went silent."""
    for name in _HOOKS:
        if name in vars(module):
            registry = getattr(module, name)
            setattr(new, name, registry)
            for hook in registry.values() if isinstance(registry, dict) else ():
                _rebind(hook, module, new)
    for name, value in vars(module).items():
        if name not in vars(new) and name not in _CODE and getattr(value, "__self__", None) is not module:
            new.__dict__[name] = value
    for name, child in module._modules.items():
        new._modules[name] = child


def _rebind(hook: Any, module: torch.nn.Module, new: torch.nn.Module) -> None:
    """torch keeps some hooks (register_load_state_dict_pre_hook's) with a weak reference to
    their module, which they are called with: the old layer's became a dead reference once it
    was collected ("the hook of a dead Module", in load_state_dict, deepcopy and pickle)."""
    ref = getattr(hook, "module", None)
    if getattr(hook, "with_module", False) and isinstance(ref, weakref.ref) and ref() is module:
        hook.module = weakref.ref(new)


def _check_process_group(process_group: Any) -> None:
    if process_group is None:
        return
    import torch.distributed as dist

    # new_group() gives the ranks outside it a marker (GroupMember.NON_GROUP_MEMBER, an int):
    # torch's converter and layer take it (those ranks run batch norm alone), and so do ours.
    non_member = getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None)
    if not isinstance(process_group, dist.ProcessGroup) and not (
        non_member is not None and type(process_group) is type(non_member) and process_group == non_member
    ):
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup or None, got {type(process_group).__name__}"
        )


def convert(module: torch.nn.Module, *, sync: bool = False, process_group: Any = None) -> torch.nn.Module:
    """Returns `module` with every torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm inside it
    replaced by batchnorm.torch's (in place; `module` itself is replaced when it is one).
    sync=False: each layer becomes its counterpart (torch's SyncBatchNorm ours, keeping its
    process group). sync=True: every batch norm layer, torch's or ours, becomes
    batchnorm.torch.SyncBatchNorm on `process_group` (None: the default group, or a
    SyncBatchNorm's own group), as torch.nn.SyncBatchNorm.convert_sync_batchnorm does; a
    layer with training variants on, or a BatchNormAct2d, is a ValueError (synchronized, it
    would compute something else), raised before anything is replaced, and a user's subclass
    of torch's layers is left as it is with a warning. A layer registered under several names
    stays one layer."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
    if process_group is not None and not sync:
        raise ValueError("process_group applies only with sync=True, got a process_group with sync=False")
    _check_process_group(process_group)
    return _convert(module, sync, process_group)


def _convert(module: torch.nn.Module, sync: bool, process_group: Any) -> torch.nn.Module:
    """Plans every replacement first (a refused layer raises before anything changed), one
    per module object (a layer registered under two names stays one layer), then applies them."""
    plan: Dict[int, torch.nn.Module] = {}
    _plan(module, "", sync, process_group, plan)
    return _apply(module, plan, set())


def _plan(module: torch.nn.Module, path: str, sync: bool, process_group: Any, plan: Dict[int, torch.nn.Module]) -> None:
    if id(module) in plan:
        return
    new = _replacing(module, path or "the model", sync, process_group)
    if new is not None:
        plan[id(module)] = new
        return
    for name, child in module.named_children():
        _plan(child, f"{path}.{name}" if path else name, sync, process_group, plan)


def _replacing(module: torch.nn.Module, where: str, sync: bool, process_group: Any) -> Optional[torch.nn.Module]:
    """The module's replacement, None to look inside it, or the ValueError of a layer
    sync=True cannot synchronize without changing what it computes."""
    if not sync:
        return _replacement(module, _OURS[type(module)], None) if type(module) in _OURS else None
    if type(module) in _SYNCED:
        variants = module._variant_options() if isinstance(module, _Base) else []
        if variants:
            raise ValueError(
                f"convert(sync=True): {where} ({type(module).__name__}) has {', '.join(variants)}, which SyncBatchNorm "
                "does not offer (batch renorm and ghost batch norm are per-process ideas); convert it with sync=False "
                "or drop those options, got such a layer"
            )
        return _replacement(module, SyncBatchNorm, process_group)
    if isinstance(module, BatchNormAct2d):
        raise ValueError(
            f"convert(sync=True): {where} is a BatchNormAct2d, which has no synchronized form (SyncBatchNorm would "
            "drop its activation); keep it per process with sync=False, got one"
        )
    if isinstance(module, _BatchNorm):
        warnings.warn(
            f"convert(sync=True) leaves {where} ({type(module).__name__}, a subclass of torch's batch norm that may "
            "have its own forward) unsynchronized", stacklevel=3
        )
    return None


def _apply(module: torch.nn.Module, plan: Dict[int, torch.nn.Module], seen: set) -> torch.nn.Module:
    if id(module) in plan:
        return plan[id(module)]
    if id(module) in seen:
        return module
    seen.add(id(module))
    for name, child in list(module._modules.items()):  # every name (named_children skips repeats)
        if child is None:
            continue
        new = _apply(child, plan, seen)
        if new is not child:
            setattr(module, name, new)
    return module
