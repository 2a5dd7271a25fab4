"""recompute_batch_stats (PreciseBN for Flax models): the 'batch_stats' of every batch norm
module (flax.linen.BatchNorm or batchnorm.jax.BatchNorm) set to the exact statistics of its
inputs over a pass of data, in Flax's convention (the biased variance)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np

from .. import functional as F
from .linen import BatchNorm


def _is_batch_norm(module: Any) -> bool:
    return isinstance(module, (BatchNorm, nn.BatchNorm))


def _feature_axis(module: Any) -> int:
    axis = module.axis
    if isinstance(axis, (tuple, list)):
        if len(axis) != 1:
            raise ValueError(f"recompute_batch_stats handles one feature axis per module, got axis={axis!r} in {module.path}")
        axis = axis[0]
    return int(axis)


def _set(tree: Dict[str, Any], path: Tuple[str, ...], mean: np.ndarray, var: np.ndarray) -> None:
    node = tree
    for name in path:
        if name not in node:
            raise ValueError(f"variables must have 'batch_stats' for the batch norm module at {'/'.join(path)}, got none")
        node = node[name]
    node["mean"] = jax.numpy.asarray(mean, node["mean"].dtype)
    node["var"] = jax.numpy.asarray(var, node["var"].dtype)


def recompute_batch_stats(
    model: nn.Module,
    variables: Dict[str, Any],
    batches: Iterable[Any],
    *,
    apply: Optional[Callable[[Dict[str, Any], Any], Any]] = None,
) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """PreciseBN for Flax: runs the model over `batches` in training mode, catches each batch
    norm module's input, and returns (variables with new 'batch_stats', values per channel
    each module saw): every module's mean and biased variance over all its inputs (exact:
    float64 per batch, merged with Chan's formula), instead of the momentum averages of past
    steps. `apply(variables, batch)` runs one batch in training mode (default:
    `model.apply(variables, batch, use_running_average=False, mutable=['batch_stats'])`);
    it runs eagerly (not under jit), once per batch; empty batches are skipped. Modules that
    saw no value keep their statistics. `variables` itself is not modified."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}")
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:  # (a FrozenDict too)
        raise ValueError("variables must be a dict with a 'batch_stats' collection (the model's variables)")
    if apply is None:
        def apply(v, batch):
            return model.apply(v, batch, use_running_average=False, mutable=["batch_stats"])
    acc: Dict[Tuple[str, ...], Tuple[Any, Any, int]] = {}

    def catch(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and _is_batch_norm(module) and (args or "x" in kwargs):
            if kwargs.get("mask") is not None:  # (its statistics over the unmasked values: not one count a batch)
                raise ValueError(f"recompute_batch_stats does not support batch norm with a mask, got one for "
                                 f"{'/'.join(module.path)}; recompute that module's statistics yourself")
            x = np.asarray(args[0] if args else kwargs["x"])  # concrete: recompute_batch_stats runs eagerly
            if x.size:
                m, v, n = F.statistics(x, axis=_feature_axis(module), dtype="float64")
                path = tuple(module.path)
                if path in acc:
                    m0, v0, n0 = acc[path]
                    m, v, n = F.merge_statistics([m0, m], [v0, v], [n0, n])
                acc[path] = (m, v, n)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(catch):
        for batch in batches:
            # An empty batch adds no value to any module (and training on it raises): skipped.
            if all(np.size(leaf) == 0 for leaf in jax.tree.leaves(batch)):
                continue
            apply(variables, batch)
    stats = _unfreeze(variables["batch_stats"])
    for path, (mean, var, _) in acc.items():
        _set(stats, path, mean, var)
    return {**variables, "batch_stats": stats}, {"/".join(p): n for p, (_, _, n) in acc.items()}


def _unfreeze(tree: Any) -> Any:
    # Plain nested dicts (whatever mapping type the caller's variables use), new containers.
    if hasattr(tree, "items"):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree
