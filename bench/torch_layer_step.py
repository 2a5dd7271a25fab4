#!/usr/bin/env python3
"""One layer's eager training step on small CPU inputs, where the Python around the kernels is
most of the time: forward + backward of batchnorm.torch's BatchNorm2d against torch.nn's, and
of BatchNormAct2d (residual and ReLU fused) against torch's BatchNorm2d + add + ReLU; also
forward alone, with grad and in eval under no_grad. The two sides alternate call by call in
one process.

    python bench/torch_layer_step.py [--threads 2] [--reps 15]

Each figure is the median over --reps batches of --calls steps of the per-step mean, in us;
ratio = torch's / ours (above 1: ours faster)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import batchnorm.torch as bt

SHAPES = [(2, 16, 2, 2), (8, 64, 8, 8), (8, 512, 2, 2), (32, 64, 8, 8)]


def make(kind: str, side: str, C: int, x, r):
    """(the module, its call on x (and r)): BatchNorm2d, or for "act" relu(bn(x) + r) fused
    (ours) or as torch's three ops."""
    if kind == "bn":
        m = (bt.BatchNorm2d if side == "ours" else torch.nn.BatchNorm2d)(C)
        return m, lambda: m(x)
    if side == "ours":
        m = bt.BatchNormAct2d(C)
        return m, lambda: m(x, r)
    m = torch.nn.BatchNorm2d(C)
    return m, lambda: torch.relu(m(x) + r)


def timed(call, what: str, g):
    if what == "fwd+bwd":
        return lambda: call().backward(g)
    if what == "fwd":
        return call

    def eval_forward():
        with torch.no_grad():
            call()

    return eval_forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, median of {args.reps} x {args.calls} "
          "steps, us per step; ratio = torch / ours")
    print(f"{'shape':12s} {'layer':6s} {'what':8s} {'ours':>8s} {'torch':>8s} {'ratio':>6s}")
    for shape in SHAPES:
        C = shape[1]
        g = torch.randn(shape)
        x = torch.randn(shape, requires_grad=True)
        r = torch.randn(shape, requires_grad=True)
        for kind in ("bn", "act"):
            made = {side: make(kind, side, C, x, r) for side in ("ours", "torch")}
            for what in ("fwd+bwd", "fwd", "eval"):
                for m, _ in made.values():
                    m.train(what != "eval")
                fns = {side: timed(call, what, g) for side, (_, call) in made.items()}
                samples = {side: [] for side in fns}
                for fn in fns.values():
                    for _ in range(20):
                        fn()
                for _ in range(args.reps):
                    for side, fn in fns.items():
                        t = time.perf_counter()
                        for _ in range(args.calls):
                            fn()
                        samples[side].append((time.perf_counter() - t) / args.calls * 1e6)
                ours, theirs = statistics.median(samples["ours"]), statistics.median(samples["torch"])
                name = "x".join(map(str, shape))
                print(f"{name:12s} {kind:6s} {what:8s} {ours:8.1f} {theirs:8.1f} {theirs / ours:6.2f}", flush=True)


if __name__ == "__main__":
    main()
