#!/usr/bin/env python3
"""Ours and PyTorch's CPU batch norm on torch tensors whose memory lies on 4 KB pages (torch's
default) and on transparent huge pages (torch's allocator with THP_MEM_ALLOC_ENABLE=1), each
call after a 64 MB scrub (data from memory).

    python bench/torch_pages.py [--threads 2] [--reps 15] [--quick] [--dtype float32]

Each page kind runs in a process of its own (torch reads the variable once); the script
starts both and prints, per op, both sides' median ms on either kind and the 4 KB page
time over the huge page time (> 1: the small pages cost that much). NumPy's large arrays are
on huge pages already where the kernel's THP mode is `madvise` (numpy madvises them), so
bench/run.py's figures are the huge page ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def huge_page_mb(address: int, nbytes: int) -> float:
    """MB on transparent huge pages of the mappings that overlap [address, address + nbytes)
    (madvise splits a mapping where its advice starts: the array's first bytes may lie in a
    piece of their own), at most nbytes. NaN where /proc/self/smaps cannot say."""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                if not line.strip():
                    continue
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo < address + nbytes and address < hi
                elif inside and head == "AnonHugePages:":
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return float("nan")
    return min(total * 1024, nbytes) / 2**20  # a mapping may hold more than x (merged neighbours)


def child() -> None:
    import numpy as np

    from _timing import QUICK, SHAPES, against_torch, layouts, median_pair, torch_case_ops

    args, dtype = against_torch(__doc__, reps=15, quick=True)
    scrubber = np.empty(64 << 20, np.uint8)

    def scrub():
        scrubber[::64] += 1

    for shape in QUICK if args.quick else SHAPES:
        for layout in layouts(shape):
            x, ops = torch_case_ops(shape, layout, dtype)
            for op, (ours, theirs) in ops.items():
                t = median_pair(ours, theirs, args.reps, before=scrub)
                print(json.dumps({"case": f"{'x'.join(map(str, shape))} {layout}", "op": op,
                                  "ours": t[0], "torch": t[1], "huge_mb": huge_page_mb(x.data_ptr(), x.nbytes)}),
                      flush=True)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    for kind, value in (("4k", "0"), ("thp", "1")):
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE=value)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *sys.argv[1:]], env=env,
                              cwd=here, stdout=subprocess.PIPE, text=True, check=True)  # stderr shown
        lines = proc.stdout.splitlines()
        if kind == "4k":
            print(lines[0])  # threads, dtype, reps
        runs[kind] = [json.loads(line) for line in lines[1:]]
    held = {kind: sorted({round(r["huge_mb"]) for r in rows}) for kind, rows in runs.items()}
    print(f"MB of x on huge pages (per case, at most x's size): 4 KB run {held['4k']}, "
          f"huge page run {held['thp']}")
    print(f"{'case':18s} {'op':9s} {'ours 4K ms':>10s} {'ours THP':>9s} {'4K/THP':>6s}   "
          f"{'torch 4K ms':>11s} {'torch THP':>9s} {'4K/THP':>6s}   {'torch/ours 4K':>13s} {'THP':>5s}")
    for a, h in zip(runs["4k"], runs["thp"]):
        print(f"{a['case']:18s} {a['op']:9s} {a['ours'] * 1e3:10.3f} {h['ours'] * 1e3:9.3f} {a['ours'] / h['ours']:6.2f}"
              f"   {a['torch'] * 1e3:11.3f} {h['torch'] * 1e3:9.3f} {a['torch'] / h['torch']:6.2f}"
              f"   {a['torch'] / a['ours']:13.2f} {h['torch'] / h['ours']:5.2f}")


if __name__ == "__main__":
    if "--child" in sys.argv or "-h" in sys.argv or "--help" in sys.argv:
        if "--child" in sys.argv:
            sys.argv.remove("--child")
        child()
    else:
        main()
