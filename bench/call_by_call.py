#!/usr/bin/env python3
"""Ours (out=) against PyTorch's CPU batch norm, call by call: each call after a 64 MB scrub
(both sides from memory), then back to back (x left in the cache by the other side's call).

    python bench/call_by_call.py [--threads 2] [--reps 30] [--quick] [--dtype float32]

The full benchmark (bench/run.py) times each column after the case's other columns, so which
arrays the column before left in the last-level cache moves the rows whose arrays fill it
((N, C) rows of 16 MB on a 32 MB cache: PyTorch's training 1.03-1.30 ms from run to run while
ours held); here the cache state is the same for both sides. Both sides run on the same torch
tensors; the ratio is PyTorch's time over ours (> 1: ours faster)."""
from __future__ import annotations

import numpy as np

from _timing import QUICK, SHAPES, against_torch, layouts, median_pair, torch_case_ops


def main() -> None:
    args, dtype = against_torch(__doc__, reps=30, quick=True)
    scrubber = np.empty(64 << 20, np.uint8)

    def scrub():
        scrubber[::64] += 1

    print(f"{'case':24s} {'op':9s} {'scrubbed: ours ms':>18s} {'torch ms':>9s} {'ratio':>6s}"
          f" {'back to back: ours ms':>22s} {'torch ms':>9s} {'ratio':>6s}")
    for shape in QUICK if args.quick else SHAPES:
        for layout in layouts(shape):
            _, ops = torch_case_ops(shape, layout, dtype)
            name = f"{'x'.join(map(str, shape))} {layout}"
            for op, (ours, theirs) in ops.items():
                cold = median_pair(ours, theirs, args.reps, before=scrub)
                hot = median_pair(ours, theirs, args.reps, before=lambda: None)
                print(f"{name:24s} {op:9s} {cold[0] * 1e3:18.3f} {cold[1] * 1e3:9.3f} {cold[1] / cold[0]:6.2f}"
                      f" {hot[0] * 1e3:22.3f} {hot[1] * 1e3:9.3f} {hot[1] / hot[0]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
