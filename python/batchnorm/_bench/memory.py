"""Peak memory of one call: the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) over the call minus the resident set before it, with glibc's mmap
threshold pinned and free heap trimmed so that every large block is fresh pages; tracemalloc's
peak for the Python side. Runs in a forked child before any timing: the pinned allocator, and
the heap that timings leave behind, stay out of each other's way."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import tracemalloc
from typing import Any, List, Optional, Sequence, Tuple

from .cases import ITEMSIZE, Case, CaseData
from .columns import ours

# Allowed beyond the outputs: allocator and page rounding, and scratch bounded by the channel
# count (per-group partial statistics), which does not grow with the batch.
PAGE_SLACK = 256 * 1024
PER_CHANNEL_SLACK = 2048
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD = 64 * 1024

METHOD = ("rss: VmHWM after the call minus VmRSS before it (the high-water mark reset through "
          "/proc/self/clear_refs), glibc mmap threshold pinned to 64 KiB with mallopt and free heap "
          "returned with malloc_trim before each call, so that every block above 64 KiB is fresh pages; "
          "python: tracemalloc peak (Python objects and NumPy-owned data)")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    if not m:
        raise OSError(f"no {field} in /proc/self/status")
    return int(m.group(1))


def _reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def available() -> Optional[str]:
    """None when the method works here, else why not."""
    try:
        _status_kib("VmHWM")
        _reset_high_water()
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
            return "no glibc mallopt / malloc_trim"
    except OSError as e:
        return f"cannot reset the RSS high-water mark: {e}"
    return None


def _pin_malloc() -> None:
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD)


def _release_free_heap() -> None:
    """Free chunks left in the heap by earlier phases would serve a large request from pages
    already resident (the mmap threshold only applies when the heap must grow): give them back."""
    ctypes.CDLL(None).malloc_trim(0)


def _output_bytes(case: Case, op: str, with_out: bool) -> int:
    """What the call must allocate: its per-channel vectors (float32), plus y / dx without out=."""
    vectors = 2 * case.channels * 4
    return vectors + (0 if with_out else case.elements * ITEMSIZE[case.dtype])


def measure(cases: Sequence[Case], ops: Sequence[str], threads: int, set_threads: Any, torch: Any) -> List[dict]:
    _pin_malloc()
    set_threads(threads)
    rows = []
    for case in cases:
        data = CaseData(case, torch if case.dtype == "bfloat16" else None)
        for op in ops:
            for with_out in (True, False):
                fn = ours(data, op, with_out)
                fn()  # thread stacks and first-call caches are not the call's memory
                gc.collect()
                _release_free_heap()
                tracemalloc.start()
                tracemalloc.reset_peak()
                rss_before = _status_kib("VmRSS")
                _reset_high_water()
                result = fn()
                peak = _status_kib("VmHWM")
                _, traced_peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                del result
                rss_bytes = max(0, peak - rss_before) * 1024
                outputs = _output_bytes(case, op, with_out)
                extra = max(0, rss_bytes - outputs)
                rows.append({
                    "shape": list(case.shape), "layout": case.layout, "dtype": case.dtype, "op": op,
                    "variant": "out" if with_out else "new", "threads": threads, "x_bytes": case.nbytes,
                    "rss_peak_delta_bytes": rss_bytes, "python_traced_peak_bytes": int(traced_peak),
                    "output_bytes": outputs, "extra_bytes": extra,
                    "extra_fraction_of_x": extra / case.nbytes,
                    "ok": extra <= PAGE_SLACK + PER_CHANNEL_SLACK * case.channels or extra <= 0.01 * case.nbytes,
                })
        del data
        gc.collect()
    return rows


def measure_in_child(cases: Sequence[Case], ops: Sequence[str], threads: int, set_threads: Any,
                     torch: Any) -> Tuple[Optional[List[dict]], Optional[str]]:
    """measure() in a forked child (call it before the parent has started any OpenMP threads:
    a child inherits none of them). Returns (rows, None) or (None, why not)."""
    why = available()
    if why:
        return None, why
    if not hasattr(os, "fork"):
        return None, "no os.fork on this platform"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        status = 0
        try:
            payload = {"rows": measure(cases, ops, threads, set_threads, torch)}
        except BaseException as e:  # reported by the parent, never raised into its code
            payload = {"error": f"{type(e).__name__}: {e}"}
            status = 1
        try:
            with os.fdopen(write_end, "w") as f:
                json.dump(payload, f)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    os.waitpid(pid, 0)
    try:
        payload = json.loads(text)
    except ValueError:
        return None, "the measuring child process died"
    return payload.get("rows"), payload.get("error")
