#!/usr/bin/env python3
"""batchnorm.torch under torch.func against torch's BatchNorm2d, on the CPU benchmark's shapes:
a training step's gradient by torch.func.grad over functional_call (the parameters passed
detached, torch's recipe), and an ensemble of B layers by torch.func.vmap over stacked
parameters and buffers (forward in training mode; ours folds the B layers into the channels:
one kernel call), each timed interleaved with torch's, call by call.

    python bench/torch_func.py [--threads 2] [--reps 20] [--dtype float32] [--quick]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import QUICK, SHAPES, against_torch, median_pair  # noqa: E402


def main() -> None:
    args, dtype = against_torch(__doc__, reps=20, quick=True)
    import torch
    from torch import func

    import batchnorm.torch as bt

    B = 4
    print(f"{'shape':>16} {'layout':>6} {'case':>14} {'ours ms':>9} {'torch ms':>9} {'ratio':>6}")
    for shape in QUICK if args.quick else SHAPES:
        C = shape[1]
        for layout in ("cf", "cl") if len(shape) == 4 else ("nc",):
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
            r = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
            layers = []
            for make in (bt.BatchNorm1d if len(shape) == 2 else bt.BatchNorm2d,
                         torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d):
                m = make(C).to(dtype if dtype == torch.float64 else torch.float32)
                params = {k: v.detach() for k, v in m.named_parameters()}
                buffers = {k: v.clone() for k, v in m.named_buffers()}

                def loss(p, b, m=m):
                    return (func.functional_call(m, {**p, **b}, (x,)).float() * r.float()).sum()

                grad = func.grad(loss)
                stacked_p = {k: torch.stack([v] * B) for k, v in params.items()}
                stacked_b = {k: torch.stack([v] * B) for k, v in buffers.items()}
                ensemble = func.vmap(lambda p, b, m=m: func.functional_call(m, {**p, **b}, (x,)), in_dims=(0, 0))
                layers.append({
                    "grad": lambda grad=grad, params=params, buffers=buffers: grad(params, buffers),
                    f"vmap B={B}": lambda ensemble=ensemble, sp=stacked_p, sb=stacked_b: ensemble(sp, sb),
                })
            for case in layers[0]:
                reps = max(3, args.reps // (B if case.startswith("vmap") else 1))
                ours, theirs = median_pair(layers[0][case], layers[1][case], reps)
                name = "x".join(map(str, shape))
                print(f"{name:>16} {layout:>6} {case:>14} {ours * 1e3:9.2f} {theirs * 1e3:9.2f} {theirs / ours:6.2f}")


if __name__ == "__main__":
    main()
