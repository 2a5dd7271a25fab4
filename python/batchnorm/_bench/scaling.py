"""Time versus size: one op (forward_training, float32, channels-first, all threads) on
(N, 64, 28, 28) with N chosen for ~1 MB .. ~400 MB, sizes interleaved like the columns of a
case, and the exponent b of the least-squares fit time ~ elements^b (linear: b ~ 1)."""
from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np

import batchnorm as bn

from .columns import Column
from .timing import run_interleaved, stats

SAMPLE_SHAPE = (64, 28, 28)  # one sample: 200,704 bytes of float32
FULL_BATCHES = (5, 12, 30, 75, 190, 480, 1200, 2000)  # 1.0 MB .. 401 MB
QUICK_BATCHES = (5, 20, 80, 320)  # 1.0 MB .. 64 MB
OP = "forward_training"


def sweep(batches: Sequence[int], rounds: int, threads: int, set_threads: Callable[[int], None]) -> dict:
    rng = np.random.default_rng(1)
    columns: List[Column] = []
    arrays = []
    for n in batches:
        x = rng.standard_normal((n,) + SAMPLE_SHAPE, dtype=np.float32)
        y = np.zeros_like(x)
        arrays.append((x, y))
        columns.append(Column("ours", OP, "out", threads,
                              (lambda x=x, y=y: bn.forward_training(x, axis=1, out=y)), rounds))
    run_interleaved(columns, rounds, set_threads)
    points = []
    for n, col, (x, _) in zip(batches, columns, arrays):
        s = stats(col.samples)
        points.append({"batch": n, "shape": [n, *SAMPLE_SHAPE], "elements": x.size, "bytes": x.nbytes,
                       "ns_per_element": s["median_s"] / x.size * 1e9,
                       "gb_per_s": 2 * x.nbytes / s["median_s"] / 1e9, **s})
    del arrays, columns
    elements = np.array([p["elements"] for p in points], dtype=np.float64)
    times = np.array([p["median_s"] for p in points])
    exponent, _ = np.polyfit(np.log(elements), np.log(times), 1)
    # Above L3 the memory system alone sets the pace: the fit there says whether the kernel
    # itself is linear, apart from the cache-resident small sizes.
    big = elements * 4 >= 64e6
    big_exponent = float(np.polyfit(np.log(elements[big]), np.log(times[big]), 1)[0]) if big.sum() >= 2 else None
    return {"op": OP, "dtype": "float32", "layout": "cf", "threads": threads, "rounds": rounds,
            "exponent": float(exponent), "exponent_above_64MB": big_exponent, "points": points}
