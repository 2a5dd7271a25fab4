"""Shared by the comparison benchmarks (bench/fused.py, bench/variants.py): the CPU benchmark's
shapes, their memory layouts, and the interleaved timing of two callables."""
from __future__ import annotations

import statistics
import time

SHAPES = [(32, 64, 56, 56), (256, 2048, 7, 7), (4096, 1024)]
QUICK = [(32, 64, 56, 56), (4096, 1024)]


def layouts(shape):
    """'nc' for a 2-d shape, else channels-first and channels-last."""
    return ["nc"] if len(shape) == 2 else ["cf", "cl"]


def median_pair(f_a, f_b, reps):
    """Median seconds of f_a and of f_b over `reps` calls each, interleaved call by call after
    one warm-up call of each (so drifts of the machine hit both sides alike)."""
    f_a(), f_b()
    a, b = [], []
    for _ in range(reps):
        t = time.perf_counter()
        f_a()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        f_b()
        b.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)
