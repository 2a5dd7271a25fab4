#!/usr/bin/env python3
"""What the output's alignment costs: forward_inference into `out=` arrays placed 0 and 16 bytes
past a page boundary (NumPy's large arrays sit at 16, batchnorm's own results at 0), with x at
either offset, calls of the two outputs alternated in one process.

    python bench/out_alignment.py [--threads 1]

Hot rows repeat in cache; "memory" rows scrub 64 MB between calls. Prints the median ms of each
output offset and their ratio (out at 16 over out at 0)."""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import batchnorm as bn

CASES = (((8192, 64), False, 301), ((64, 64, 8, 8), False, 301), ((65536, 64), True, 61),
         ((32, 64, 56, 56), True, 61))


def at_offset(shape, offset: int) -> np.ndarray:
    """A float32 array of `shape` starting `offset` bytes past a page boundary, zeroed (so faulted in)."""
    n = int(np.prod(shape))
    raw = np.empty(n * 4 + 8192, np.uint8)
    start = (-raw.ctypes.data) % 4096 + offset
    a = raw[start:start + n * 4].view(np.float32).reshape(shape)
    a[...] = 0
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    bn.set_num_threads(args.threads)
    print(f"threads {args.threads}; median ms of forward_inference into out= at page offset 0 and 16")
    for shape, from_memory, reps in CASES:
        rng = np.random.default_rng(0)
        for x_offset in (16, 0):
            x = at_offset(shape, x_offset)
            x[...] = rng.standard_normal(shape)
            mean, var = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
            outs = {0: at_offset(shape, 0), 16: at_offset(shape, 16)}
            scrub = np.ones((64 << 20) // 8) if from_memory else None
            times = {o: [] for o in outs}
            for out in outs.values():
                bn.forward_inference(x, mean, var, out=out)
            for r in range(reps):
                for o, out in (list(outs.items()) if r % 2 else list(outs.items())[::-1]):
                    if scrub is not None:
                        scrub += 1.0
                    t = time.perf_counter()
                    bn.forward_inference(x, mean, var, out=out)
                    times[o].append(time.perf_counter() - t)
            med = {o: statistics.median(s) * 1e3 for o, s in times.items()}
            name = "x".join(map(str, shape))
            print(f"{name:>14} {'memory' if from_memory else 'hot':>6} x at {x_offset:2d}: out at 0 {med[0]:.4f} ms, "
                  f"at 16 {med[16]:.4f} ms, ratio {med[16] / med[0]:.3f}", flush=True)


if __name__ == "__main__":
    main()
