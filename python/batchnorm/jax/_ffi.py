"""The XLA FFI targets of batchnorm._jax as jax functions, one per core op, and the trace-time
checks (the core's own, on shapes and dtypes). Targets are registered once, at import. Every
call uses vmap_method="broadcast_all": under vmap the handler sees leading batch dimensions and
normalizes each batch element on its own (see csrc/jax/handlers.cpp)."""
from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np

try:
    from .. import _jax
except ImportError as e:
    if importlib.util.find_spec("batchnorm._jax") is not None:
        raise  # there but not loadable (a libbatchnorm from another build): that error, as it is
    raise ModuleNotFoundError(  # pragma: no cover - a build with BATCHNORM_JAX=OFF
        "this build of batchnorm has no JAX extension (batchnorm._jax); reinstall it without "
        "BATCHNORM_JAX=OFF"
    ) from e

for _name, _platforms in _jax.registrations().items():
    for _platform, _capsule in _platforms.items():
        jax.ffi.register_ffi_target(_name, _capsule, platform=_platform, api_version=1)


def disabled_checks() -> list:
    """The jax.export safety checks to disable for a program that calls batchnorm's kernels:
    jax.export refuses custom calls it does not know to be stable. Pass this as
    `jax.export.export(fn, disabled_checks=batchnorm.jax.disabled_checks())`; the process that
    deserializes and runs the program must import batchnorm.jax (which registers the targets)
    and have a batchnorm of the same major version (the targets' names and attributes)."""
    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in _jax.registrations()]


class Symbols:
    """Stand-in sizes for one call's symbolic dimensions (jax.export's shape polymorphism: a
    batch of any size), so that the core's trace-time checks judge the rest: one size per
    distinct expression, odd, from 4099 up (small enough that five of them multiply within
    int64), none equal to a concrete dimension of the call's arrays or to one of its integer
    options (`taken`). A process-wide table had given a real 4099 the stand-in of the first
    symbol seen: a weight of the wrong length then passed, and messages named the symbol for
    the real size. The kernels see the real sizes at run time."""

    def __init__(self, *arrays, taken=()):
        shapes = [a.shape for a in arrays if a is not None]
        used = {d for shape in shapes for d in shape if isinstance(d, int)} | {int(n) for n in taken}
        self.sizes: dict = {}  # expression -> stand-in
        size = 4099
        for d in (d for shape in shapes for d in shape if not isinstance(d, int)):
            if str(d) not in self.sizes:
                while size in used:
                    size += 2
                self.sizes[str(d)] = size
                size += 2

    def spec(self, a):
        """(shape, dtype name) of an array or tracer, None for None: what the checks take, its
        symbolic dimensions as their stand-ins."""
        if a is None:
            return None
        return tuple(d if isinstance(d, int) else self.sizes[str(d)] for d in a.shape), jnp.dtype(a.dtype).name

    def named(self, err: Exception) -> Exception:
        """A check's error with the stand-ins written as their symbols (unchanged without any)."""
        if not self.sizes:
            return err
        names = {str(size): expression for expression, size in self.sizes.items()}
        text = re.sub(r"\b\d+\b", lambda m: names.get(m.group(0), m.group(0)), str(err))
        return type(err)(text)


def symbolic(a) -> bool:
    """Whether `a`'s shape has a symbolic dimension (jax.export's shape polymorphism)."""
    return not all(isinstance(d, int) for d in a.shape)


check_forward_training = _jax.check_forward_training
check_forward_inference = _jax.check_forward_inference


def varying_axes(a):
    """The mapped axes (inside shard_map) along which `a` differs between devices."""
    # jax 0.10 keeps them in aval.mat.varying; the releases around it named the set aval.vma.
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vary(a, axes):
    """`a` typed as varying along `axes` too (a no-op at run time)."""
    missing = tuple(sorted(axes - varying_axes(a), key=str))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def _call(target, results, *args, **attrs):
    outs = jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")(*args, **attrs)
    # XLA types FFI results as replicated; inside shard_map they vary as their inputs do.
    axes = frozenset().union(*(varying_axes(a) for a in args))
    if not axes:
        return outs
    return tuple(vary(o, axes) for o in outs) if isinstance(outs, (tuple, list)) else vary(outs, axes)


def _vector(c, acc):
    return jax.ShapeDtypeStruct((c,), acc)


def statistics(x, axis, channels, acc):
    """(mean, biased var) per channel, in the accumulation dtype."""
    out = (_vector(channels, acc),) * 2
    return _call("batchnorm_statistics", out, x, rank=np.int64(x.ndim), axis=np.int64(axis))


def merge(means, variances, counts):
    """Chan's merge of per-shard (k, C) means and biased variances with the k counts."""
    out = (_vector(means.shape[-1], means.dtype),) * 2
    return _call("batchnorm_merge", out, means, variances, counts=np.asarray(counts, np.int64))


def _given(*arrays):
    """The optional trailing buffers of a target: those that are not None."""
    return tuple(a for a in arrays if a is not None)


def forward_training(x, weight, bias, axis, eps, channels, acc, residual=None, activation=0, unbiased=True,
                     renorm=None, running=None, ghost_batch=0):
    """(y, saved_mean, saved_invstd, batch var, batch mean, r, d): the core's training pass,
    fused (y = act(bn(x) + residual), activation the core's code) when asked; the batch
    variance unbiased, or biased with unbiased=False. Variants:
    renorm=(rmax, dmax) with running=(running_mean, running_var), which r and d (else None)
    compare the batch with; ghost_batch=G > 0, saved_mean / saved_invstd then (N // G, C) and
    the batch statistics the whole batch's."""
    saved = jax.ShapeDtypeStruct(_jax.saved_shape(Symbols(x).spec(x), axis, ghost_batch), acc)
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), saved, saved) + (_vector(channels, acc),) * (4 if renorm else 2)
    # The handler reads the running statistics for renorm only (as copies in `acc`).
    rm, rv = (a.astype(acc) for a in running) if renorm else (jnp.zeros((channels,), acc),) * 2
    rmax, dmax = renorm if renorm else (1.0, 0.0)
    y, mean, invstd, var, batch_mean, *rd = _call(
        "batchnorm_forward_training", out, x, weight, bias, rm, rv, *_given(residual), rank=np.int64(x.ndim),
        axis=np.int64(axis), eps=np.float64(eps), activation=np.int64(activation), unbiased=np.int64(bool(unbiased)),
        renorm=np.int64(bool(renorm)),
        rmax=np.float64(rmax), dmax=np.float64(dmax), ghost_batch=np.int64(ghost_batch))
    r, d = rd if renorm else (None, None)
    return y, mean, invstd, var, batch_mean, r, d


def forward_inference(x, mean, var, weight, bias, axis, eps, residual=None, activation=0):
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return _call("batchnorm_forward_inference", out, x, mean, var, weight, bias, *_given(residual),
                 rank=np.int64(x.ndim), axis=np.int64(axis), eps=np.float64(eps), activation=np.int64(activation))


def backward(dy, x, saved_mean, saved_invstd, weight, axis, channels, acc, y=None, activation=0, dresidual=False,
             renorm=None, ghost_batch=0):
    """(dx, dweight = sum(g * x_hat), dbias = sum(g)) over this array's values, g = dy through
    the fused forward's activation (its mask from y); with dresidual=True, g as a fourth
    result (the residual's gradient). Variants: renorm=(r, d), the batch-renorm forward's, as
    constants (dweight = sum(g * (x_hat * r + d))); ghost_batch=G > 0 with the ghost forward's
    (N // G, C) saved statistics."""
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype),) + (_vector(channels, acc),) * 2
    if dresidual:
        out += (jax.ShapeDtypeStruct(x.shape, x.dtype),)
    # The optional arguments in the handler's order: y (activation relu), then r and d.
    rd = tuple(renorm) if renorm is not None else ()
    return _call("batchnorm_backward", out, dy, x, saved_mean, saved_invstd, weight, *_given(y), *rd,
                 rank=np.int64(x.ndim), axis=np.int64(axis), activation=np.int64(activation),
                 renorm=np.int64(renorm is not None), ghost_batch=np.int64(ghost_batch))
