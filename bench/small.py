#!/usr/bin/env python3
"""Small shapes against PyTorch on the CPU: the late stages of a ResNet at small inputs or
batches (planes of 2x2 to 7x7, tiny planes walked as channels-last rows), BatchNorm1d on few
rows of many features, channels-last with few positions, and the early stages of a
MobileNet-style network in NHWC (24 and 40 channels: rows that are not a whole number of
vectors). The main benchmark's shapes are
large; these are the per-layer calls of a real network, where fixed costs and one-thread
plans show.

    python bench/small.py [--threads 2] [--reps 200] [--dtype float32]

Both sides take the same torch tensors and thread count: ours through the array API with
out= (its per-call overhead included), PyTorch through torch.batch_norm and, for the
backward, the kernel its autograd calls (native_batch_norm_backward). Each row is the median
of `reps` calls, the two sides interleaved call by call; ratio = PyTorch's time / ours
(> 1: ours faster)."""
from __future__ import annotations

import statistics

import torch

import batchnorm as bn
from _timing import against_torch, median_pair

# (shape, channels_last)
SHAPES = [
    ((8, 512, 2, 2), False),
    ((64, 512, 2, 2), False),
    ((256, 512, 2, 2), False),
    ((8, 256, 4, 4), False),
    ((128, 256, 3, 3), False),
    ((32, 2048, 3, 3), False),
    ((8, 128, 8, 8), False),
    ((1, 256, 14, 14), False),
    ((8, 512, 7, 7), False),
    ((8, 2048, 7, 7), False),
    ((32, 2048, 7, 7), False),
    ((8, 512, 2, 2), True),
    ((8, 2048, 7, 7), True),
    ((8, 24, 56, 56), True),
    ((8, 40, 28, 28), True),
    ((16, 1024), False),
    ((32, 4096), False),
    ((64, 4096), False),
    ((32, 18432), False),
]


def main() -> None:
    args, dtype = against_torch(__doc__, reps=200)
    print(f"{'case':22s} {'pass':9s} {'ours us':>9s} {'torch us':>9s} {'ratio':>6s}")
    ratios = []
    for shape, channels_last in SHAPES:
        g = torch.Generator().manual_seed(0)
        x, dy = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
        if channels_last:
            x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
        C = shape[1]
        w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
        rm, rv = torch.zeros(C), torch.ones(C)
        y = torch.empty_like(x)
        dx = torch.empty_like(x)
        _, mean, invstd = bn.forward_training(x, w, b)
        passes = {
            "inference": (lambda: bn.forward_inference(x, rm, rv, w, b, out=y),
                          lambda: torch.batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5, False)),
            "training": (lambda: bn.forward_training(x, w, b, running_mean=rm, running_var=rv, out=y),
                         lambda: torch.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, False)),
            "backward": (lambda: bn.backward(dy, x, mean, invstd, w, out=dx),
                         lambda: torch.ops.aten.native_batch_norm_backward(dy, x, w, rm, rv, mean, invstd, True, 1e-5,
                                                                           [True, True, True])),
        }
        name = "x".join(map(str, shape)) + (" cl" if channels_last else "")
        for pname, (ours, theirs) in passes.items():
            t_o, t_t = median_pair(ours, theirs, args.reps)
            ratios.append(t_t / t_o)
            print(f"{name:22s} {pname:9s} {t_o * 1e6:9.1f} {t_t * 1e6:9.1f} {t_t / t_o:6.2f}", flush=True)
    slower = sum(r < 1 for r in ratios)
    print(f"median ratio {statistics.median(ratios):.2f}, min {min(ratios):.2f}, "
          f"{slower} of {len(ratios)} rows slower than PyTorch")


if __name__ == "__main__":
    main()
