#!/usr/bin/env python3
"""Per-call cost of tiny calls, where fixed costs are the whole time: the array API with NumPy
arrays (into out= and allocating its results), the same calls on torch tensors ("torch in":
out= but for statistics; their DLPack capsules and results), and PyTorch's own
(torch.batch_norm; for the backward the kernel its autograd calls; torch.var_mean), on shapes of a few hundred values at most. The (2, 16) rows are nearly all
overhead: the C call itself takes about a microsecond there.

    python bench/call_overhead.py [--threads 2] [--reps 15]

Each figure is the median over --reps batches of 2000 calls of the per-call mean (a single
call of 2 us is too short for the clock). ratio = PyTorch's time / ours with NumPy out=."""
from __future__ import annotations

import argparse
import statistics
import timeit

import numpy as np

import batchnorm as bn

SHAPES = [(2, 16), (16, 256), (8, 64, 4, 4)]
CALLS = 2000


def per_call_us(f, reps: int) -> float:
    f()
    return statistics.median(timeit.repeat(f, number=CALLS, repeat=reps)) / CALLS * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    bn.set_num_threads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    print(f"threads {args.threads}, float32, median of {args.reps} x {CALLS} calls, us per call; "
          "ratio = torch / ours (NumPy, out=)")
    print(f"{'shape':12s} {'op':10s} {'numpy out=':>10s} {'numpy new':>10s} {'torch in':>10s} "
          f"{'PyTorch':>8s} {'ratio':>6s}")
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        C = shape[1]
        x, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        out = np.empty_like(x)
        _, mean, invstd = bn.forward_training(x, w, b)
        ours = {
            "statistics": (None, lambda: bn.statistics(x)),
            "inference": (lambda: bn.forward_inference(x, rm, rv, w, b, out=out),
                          lambda: bn.forward_inference(x, rm, rv, w, b)),
            "training": (lambda: bn.forward_training(x, w, b, running_mean=rm, running_var=rv, out=out),
                         lambda: bn.forward_training(x, w, b, running_mean=rm, running_var=rv)),
            "backward": (lambda: bn.backward(dy, x, mean, invstd, w, out=out),
                         lambda: bn.backward(dy, x, mean, invstd, w)),
        }
        theirs = {}
        if torch is not None:
            tx, tdy, tw, tb, trm, trv, tout, tmean, tinv = (
                torch.from_numpy(a.copy()) for a in (x, dy, w, b, rm, rv, out, mean, invstd))
            backward = torch.ops.aten.native_batch_norm_backward
            dims = [d for d in range(len(shape)) if d != 1]
            theirs = {
                "statistics": (lambda: bn.statistics(tx), lambda: torch.var_mean(tx, dims, correction=0)),
                "inference": (lambda: bn.forward_inference(tx, trm, trv, tw, tb, out=tout),
                              lambda: torch.batch_norm(tx, tw, tb, trm, trv, False, 0.1, 1e-5, False)),
                "training": (lambda: bn.forward_training(tx, tw, tb, running_mean=trm, running_var=trv, out=tout),
                             lambda: torch.batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5, False)),
                "backward": (lambda: bn.backward(tdy, tx, tmean, tinv, tw, out=tout),
                             lambda: backward(tdy, tx, tw, trm, trv, tmean, tinv, True, 1e-5, [True] * 3)),
            }
        name = "x".join(map(str, shape))
        for op, (into, new) in ours.items():
            t_into = per_call_us(into, args.reps) if into else None
            t_new = per_call_us(new, args.reps)
            t_torch_into, t_pt = (None, None)
            if op in theirs:
                t_torch_into = per_call_us(theirs[op][0], args.reps) if theirs[op][0] else None
                t_pt = per_call_us(theirs[op][1], args.reps)
            ref = t_into if t_into is not None else t_new
            cells = [f"{v:10.2f}" if v is not None else f"{'-':>10s}" for v in (t_into, t_new, t_torch_into)]
            pt = f"{t_pt:8.2f} {t_pt / ref:6.2f}" if t_pt is not None else f"{'-':>8s} {'-':>6s}"
            print(f"{name:12s} {op:10s} {' '.join(cells)} {pt}", flush=True)


if __name__ == "__main__":
    main()
