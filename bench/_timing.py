"""Shared by the comparison benchmarks (bench/fused.py, bench/small.py, bench/variants.py,
bench/call_by_call.py, bench/torch_pages.py): the CPU benchmark's shapes, their memory layouts,
the interleaved timing of two callables, the command line and set-up of a comparison against
PyTorch, and the three ops of both libraries on one case's torch tensors."""
from __future__ import annotations

import argparse
import statistics
import time

SHAPES = [(32, 64, 56, 56), (256, 2048, 7, 7), (4096, 1024)]
QUICK = [(32, 64, 56, 56), (4096, 1024)]


def layouts(shape):
    """'nc' for a 2-d shape, else channels-first and channels-last."""
    return ["nc"] if len(shape) == 2 else ["cf", "cl"]


def median_pair(f_a, f_b, reps, before=None):
    """Median seconds of f_a and of f_b over `reps` calls each, interleaved call by call after
    one warm-up call of each (so drifts of the machine hit both sides alike). With `before`
    (e.g. a cache scrub), it runs untimed before every call, and the two sides take turns
    going first."""
    f_a(), f_b()
    a, b = [], []
    for rep in range(reps):
        pairs = ((f_a, a), (f_b, b)) if before is None or rep % 2 == 0 else ((f_b, b), (f_a, a))
        for f, times in pairs:
            if before is not None:
                before()
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def against_torch(doc: str, reps: int, quick: bool = False):
    """The command line of a comparison with PyTorch (--threads, --reps, --dtype, and --quick
    when it has a quick set): both libraries set to the thread count and the header printed.
    Returns the parsed arguments and the torch dtype."""
    import torch

    import batchnorm as bn

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=reps)
    if quick:
        ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bn.set_num_threads(args.threads)
    print(f"threads {args.threads}, dtype {args.dtype}, median of {args.reps}; ratio = torch / ours")
    return args, getattr(torch, args.dtype)


def torch_case_ops(shape, layout, dtype):
    """x of `shape` (channels_last memory for layout 'cl'), dy, per-channel tensors and an out=
    buffer, all torch tensors; returns (x, {op: (ours, PyTorch's)}) for inference, training and
    backward, ours writing into the buffer, PyTorch's allocating as its callers do."""
    import torch

    import batchnorm as bn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    if layout == "cl":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    C = shape[1]
    w, b = torch.ones(C), torch.zeros(C)
    mean, var = torch.zeros(C), torch.ones(C)
    rm, rv, trm, trv = torch.zeros(C), torch.ones(C), torch.zeros(C), torch.ones(C)
    out = torch.empty_like(x)
    _, smean, sinvstd = bn.forward_training(x, w, b)
    F = torch.nn.functional
    backward = torch.ops.aten.native_batch_norm_backward
    return x, {
        "inference": (lambda: bn.forward_inference(x, mean, var, w, b, out=out),
                      lambda: F.batch_norm(x, mean, var, w, b, training=False)),
        "training": (lambda: bn.forward_training(x, w, b, running_mean=rm, running_var=rv, out=out),
                     lambda: F.batch_norm(x, trm, trv, w, b, training=True)),
        "backward": (lambda: bn.backward(dy, x, smean, sinvstd, w, out=out),
                     lambda: backward(dy, x, w, None, None, smean, sinvstd, True, 1e-5, [True] * 3)),
    }
