#!/usr/bin/env python3
"""What the output's pages cost: forward_inference from memory into `out=` arrays at the same
line offset as x, one a NumPy array and one a result of batchnorm's (its cached blocks ask
for transparent huge pages; so do NumPy's large allocations where the THP mode is `madvise`,
so both are usually on huge pages: bench/torch_pages.py compares 4 KB pages with them),
calls alternated in one process, a 64 MB scrub before each.

    python bench/out_pages.py [--threads 1] [--reps 31]

Prints each output's median ms and their ratio (ours over NumPy's)."""
from __future__ import annotations

import argparse

import numpy as np
import time

import batchnorm as bn

SHAPES = ((65536, 64), (4096, 1024), (32, 64, 56, 56), (8, 32, 112, 112))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=31)
    args = ap.parse_args()
    bn.set_num_threads(args.threads)
    scrub = np.ones(64 << 18, np.float32)
    print(f"threads {args.threads}; median ms of forward_inference into out=, data from memory")
    for shape in SHAPES:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        C = shape[1]
        mean, var = np.zeros(C, np.float32), np.ones(C, np.float32)
        ours = bn.forward_inference(x, mean, var)  # placed at x's line offset
        raw = np.zeros(x.nbytes + 128, np.uint8)
        start = (x.ctypes.data - raw.ctypes.data) % 64
        numpy_out = raw[start:start + x.nbytes].view(np.float32).reshape(shape)
        assert numpy_out.ctypes.data % 64 == ours.ctypes.data % 64 == x.ctypes.data % 64
        times = {"numpy": [], "ours": []}
        for r in range(args.reps):
            pair = (("numpy", numpy_out), ("ours", ours))
            for name, out in pair if r % 2 else pair[::-1]:
                scrub += 1
                t = time.perf_counter()
                bn.forward_inference(x, mean, var, out=out)
                times[name].append(time.perf_counter() - t)
        a, b = (float(np.median(times[k])) * 1e3 for k in ("numpy", "ours"))
        print(f"{'x'.join(map(str, shape)):>14s}  into a NumPy array {a:.3f} ms, into a result of ours {b:.3f} ms, "
              f"ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
