"""Interleaved timing: every column of a case is warmed up, then timed once per round, the
rounds rotating the column order, so that drift (other processes, clocks, thermals) hits every
column alike and ratios measured in the same run stay honest. Medians, min and max per column,
and the minor page faults of each call (first touches of freshly allocated outputs)."""
from __future__ import annotations

import gc
import os
import resource
import time
from typing import Callable, List, Optional, Sequence

import numpy as np

from .columns import Column

WARMUP_CALLS = 2
WARMUP_SECONDS = 0.05  # small shapes get more warm-up calls, up to WARMUP_MAX_CALLS
WARMUP_MAX_CALLS = 20


def runqueue_wait_s() -> Optional[float]:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux
    schedstat): on a machine with as many cores as our threads, that is other processes'
    doing, and it hurts multi-threaded columns far more than the single-threaded copy."""
    total = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                continue  # a thread that just exited
    except OSError:
        return None
    return total / 1e9


def run_interleaved(columns: Sequence[Column], rounds: int, set_threads: Callable[[int], None],
                    progress: Optional[Callable[[int], None]] = None) -> Optional[float]:
    """Fills each column's samples (seconds per call). A column's result is released after the
    clock stops, so freeing it is not timed; allocating it is (that is the no-out= cost).
    Returns the fraction of the timed rounds' wall time our threads spent waiting for a CPU."""
    current = [None]

    def threads_for(col: Column) -> None:
        if col.threads is not None and col.threads != current[0]:
            set_threads(col.threads)
            current[0] = col.threads

    for col in columns:
        threads_for(col)
        start, calls = time.perf_counter(), 0
        while calls < WARMUP_CALLS or (time.perf_counter() - start < WARMUP_SECONDS and calls < WARMUP_MAX_CALLS):
            result = col.fn()
            del result
            calls += 1
            if col.impl == "numpy":
                break
    gc.collect()
    gc.disable()
    wait0, wall0 = runqueue_wait_s(), time.perf_counter()
    try:
        clock = time.perf_counter
        usage = resource.getrusage
        self_ = resource.RUSAGE_SELF
        for r in range(rounds):
            k = r % len(columns)
            for col in list(columns[k:]) + list(columns[:k]):
                if not col.due(r, rounds):
                    continue
                threads_for(col)
                faults = usage(self_).ru_minflt
                t0 = clock()
                result = col.fn()
                t1 = clock()
                col.faults.append(usage(self_).ru_minflt - faults)
                del result
                col.samples.append(t1 - t0)
            if progress:
                progress(r)
    finally:
        gc.enable()
    wait1, wall1 = runqueue_wait_s(), time.perf_counter()
    return (wait1 - wait0) / (wall1 - wall0) if wait0 is not None and wait1 is not None else None


def stats(samples: List[float], faults: Optional[List[int]] = None) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    extra = {"page_faults_per_call": float(np.median(faults))} if faults else {}
    return {**extra,
        "median_s": float(np.median(a)),
        "min_s": float(a.min()),
        "max_s": float(a.max()),
        "reps": int(a.size),
        "samples_s": [float(v) for v in a],
    }
