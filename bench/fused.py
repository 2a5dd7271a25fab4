#!/usr/bin/env python3
"""Fused BN + add + ReLU (training forward, and its backward) against PyTorch's unfused
sequence (batch_norm, add, relu, and autograd's backward of it) on the CPU benchmark's shapes.

    python bench/fused.py [--threads 2] [--reps 15] [--quick]

Both sides run on torch tensors with the same thread count; each row is the median of
`reps` timed calls after a warm-up, the two sides interleaved call by call, and the ratio is
PyTorch's time over ours (> 1: ours faster). The backward row times the gradient of
y = relu(bn(x) + r) with respect to x, weight, bias and r."""
from __future__ import annotations

import torch

import batchnorm as bn
from _timing import QUICK, SHAPES, against_torch, layouts, median_pair

def main() -> None:
    args, dtype = against_torch(__doc__, reps=15, quick=True)
    print(f"{'case':28s} {'pass':9s} {'ours ms':>9s} {'torch ms':>9s} {'ratio':>6s}")
    for shape in QUICK if args.quick else SHAPES:
        for layout in layouts(shape):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(dtype)
            r = torch.randn(shape, generator=g).to(dtype)
            dy = torch.randn(shape, generator=g).to(dtype)
            if layout == "cl":
                x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))
            C = shape[1]
            w, b = torch.ones(C), torch.zeros(C)
            rm, rv = torch.zeros(C), torch.ones(C)
            y = torch.empty_like(x)

            def ours_fwd():
                return bn.forward_training(x, w, b, running_mean=rm, running_var=rv, residual=r,
                                           activation="relu", out=y)

            def torch_fwd():
                return torch.relu_(torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True) + r)

            t_o, t_t = median_pair(ours_fwd, torch_fwd, args.reps)
            name = f"{'x'.join(map(str, shape))} {layout}"
            print(f"{name:28s} {'forward':9s} {t_o * 1e3:9.3f} {t_t * 1e3:9.3f} {t_t / t_o:6.2f}", flush=True)

            _, mean, invstd = ours_fwd()
            dx = torch.empty_like(x)

            def ours_bwd():
                return bn.backward(dy, x, mean, invstd, w, y=y, activation="relu", residual=True, out=dx)

            xt, rt = x.clone().requires_grad_(), r.clone().requires_grad_()
            wt, bt = w.clone().requires_grad_(), b.clone().requires_grad_()
            yt = torch.relu(torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True) + rt)

            def torch_bwd():
                return torch.autograd.grad(yt, (xt, wt, bt, rt), dy, retain_graph=True)

            t_o, t_t = median_pair(ours_bwd, torch_bwd, args.reps)
            print(f"{name:28s} {'backward':9s} {t_o * 1e3:9.3f} {t_t * 1e3:9.3f} {t_t / t_o:6.2f}", flush=True)


if __name__ == "__main__":
    main()
