"""What gets timed: one column per (implementation, op, variant, threads) of a case. Ours with
out= preallocated and without; PyTorch's CPU kernels (F.batch_norm, and the aten backward
that autograd runs); a straightforward NumPy implementation; np.copyto, the roofline."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

import batchnorm as bn

from .cases import EPS, CaseData


@dataclass
class Column:
    impl: str  # "ours", "torch", "numpy", "copy"
    op: str  # an op name, or "copy"
    variant: str  # "out" (preallocated) or "new" (allocates its result)
    threads: Optional[int]  # None: single-threaded whatever the setting (NumPy, np.copyto)
    fn: Callable[[], Any]
    reps: int
    samples: List[float] = field(default_factory=list)
    faults: List[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.impl}/{self.op}/{self.variant}/{self.threads or 1}"

    def due(self, rep: int, total: int) -> bool:
        """Spreads a column with fewer reps evenly over the interleaved rounds."""
        return (rep * self.reps) % total < self.reps


def ours(data: CaseData, op: str, with_out: bool) -> Callable[[], Any]:
    d, axis = data, data.case.axis
    out = d.out if with_out else None
    if op == "forward_inference":
        return lambda: bn.forward_inference(d.x, d.mean, d.var, d.weight, d.bias, eps=EPS, axis=axis, out=out)
    if op == "forward_training":
        return lambda: bn.forward_training(d.x, d.weight, d.bias, running_mean=d.running_mean,
                                           running_var=d.running_var, eps=EPS, axis=axis, out=out)
    return lambda: bn.backward(d.dy, d.x, d.saved_mean, d.saved_invstd, d.weight, axis=axis, out=out)


def torch_op(data: CaseData, op: str) -> Callable[[], Any]:
    """PyTorch allocates its outputs. Backward is the kernel autograd calls for a CPU batch
    norm (native_batch_norm_backward), called directly: no graph or engine overhead counted."""
    torch, d = data.torch, data
    F = torch.nn.functional
    if op == "forward_inference":
        return lambda: F.batch_norm(d.tx, d.tmean, d.tvar, d.tweight, d.tbias, training=False, eps=EPS)
    if op == "forward_training":
        return lambda: F.batch_norm(d.tx, d.trunning_mean, d.trunning_var, d.tweight, d.tbias, training=True,
                                    momentum=0.1, eps=EPS)
    backward = torch.ops.aten.native_batch_norm_backward
    mask = [True, True, True]
    return lambda: backward(d.tdy, d.tx, d.tweight, None, None, d.tsave_mean, d.tsave_invstd, True, EPS, mask)


def numpy_op(data: CaseData, op: str) -> Callable[[], Any]:
    """Batch norm as one would write it in NumPy (float32 throughout, broadcasting)."""
    d, red = data, data.case.reduce_axes
    bshape = [1] * len(d.case.memory_shape)
    bshape[d.case.axis] = d.case.channels
    w, b = d.weight.reshape(bshape), d.bias.reshape(bshape)
    n = d.case.elements // d.case.channels

    def inference() -> Any:
        scale = w / np.sqrt(d.var.reshape(bshape) + EPS)
        return (d.x - d.mean.reshape(bshape)) * scale + b

    def training() -> Any:
        mean = d.x.mean(axis=red, keepdims=True)
        var = d.x.var(axis=red, keepdims=True)
        invstd = 1.0 / np.sqrt(var + EPS)
        running_mean = 0.9 * d.running_mean + 0.1 * mean.ravel()
        running_var = 0.9 * d.running_var + 0.1 * var.ravel() * n / (n - 1)
        return (d.x - mean) * (invstd * w) + b, mean, invstd, running_mean, running_var

    def backward() -> Any:
        mean, invstd = d.saved_mean.reshape(bshape), d.saved_invstd.reshape(bshape)
        xhat = (d.x - mean) * invstd
        dbias = d.dy.sum(axis=red, keepdims=True)
        dweight = (d.dy * xhat).sum(axis=red, keepdims=True)
        dx = (w * invstd / n) * (n * d.dy - dbias - xhat * dweight)
        return dx, dweight, dbias

    return {"forward_inference": inference, "forward_training": training, "backward": backward}[op]


def copy(data: CaseData) -> Callable[[], Any]:
    return lambda: np.copyto(data.copy_dst, data.copy_src)


_POOLS: Dict[int, ThreadPoolExecutor] = {}


def copy_threads(data: CaseData, threads: int) -> Callable[[], Any]:
    """A copy of x's bytes over `threads` threads, the bandwidth all cores can draw (context
    only: the roofline stays the one-thread np.copyto). torch's copy_ when torch is there: it
    runs on the same OpenMP pool as the kernels, where Python threads would compete with that
    pool's spinning workers; else np.copyto in parts on a thread pool (NumPy releases the GIL)."""
    src, dst = data.copy_src.reshape(-1), data.copy_dst.reshape(-1)
    if data.torch is not None:
        tsrc, tdst = data.torch.from_numpy(src), data.torch.from_numpy(dst)
        return lambda: tdst.copy_(tsrc)
    pool = _POOLS.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="bench-copy"))
    bounds = [src.size * i // threads for i in range(threads + 1)]
    parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds, bounds[1:])]
    return lambda: list(pool.map(lambda p: np.copyto(*p), parts))


def make_columns(data: CaseData, ops: Sequence[str], threads: Sequence[int], reps: int, numpy_reps: int,
                 use_torch: bool, use_numpy: bool) -> List[Column]:
    cols = [Column("copy", "copy", "out", None, copy(data), reps)]
    cols += [Column("copy", "copy", "out", t, copy_threads(data, t), reps) for t in threads if t > 1]
    for op in ops:
        for t in threads:
            cols.append(Column("ours", op, "out", t, ours(data, op, True), reps))
            cols.append(Column("ours", op, "new", t, ours(data, op, False), reps))
            if use_torch:
                cols.append(Column("torch", op, "new", t, torch_op(data, op), reps))
        if use_numpy:
            cols.append(Column("numpy", op, "new", None, numpy_op(data, op), numpy_reps))
    return cols


def first_output(result: Any) -> Any:
    return result[0] if isinstance(result, tuple) else result


def as_float64(a: Any) -> np.ndarray:
    if not isinstance(a, np.ndarray):  # a torch tensor, already in ours' memory order
        a = a.detach().float().contiguous().numpy()
    return np.asarray(a, dtype=np.float64)


def agreement(data: CaseData, ops: Sequence[str], use_torch: bool, use_numpy: bool) -> dict:
    """Largest |ours - theirs| / max|theirs| of each op's main output, checked once per case so
    that every timed column is known to compute the same thing."""
    report = {}
    for op in ops:
        mine = as_float64(first_output(ours(data, op, False)()))
        entry = {}
        if use_torch:
            theirs = first_output(torch_op(data, op)())
            if data.case.layout == "cl":
                theirs = theirs.permute(0, 2, 3, 1)
            theirs = as_float64(theirs)
            entry["torch"] = float(np.max(np.abs(mine - theirs)) / max(np.max(np.abs(theirs)), 1e-30))
        if use_numpy:
            theirs = as_float64(first_output(numpy_op(data, op)()))
            entry["numpy"] = float(np.max(np.abs(mine - theirs)) / max(np.max(np.abs(theirs)), 1e-30))
        report[op] = entry
        del mine
    return report
