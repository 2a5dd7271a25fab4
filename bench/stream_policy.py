#!/usr/bin/env python3
"""The streaming-store policy (cpu/plan.h: stream_output, stream_rereads) measured on this
machine: each op timed with its output streamed past half the last-level cache ("half")
against past the whole of it ("whole"), in the two settings that disagree.

    python bench/stream_policy.py [--threads 2] [--reps 60] [--blocks 6]

- between: each call between PyTorch's same op and a copy of x, as in the CPU benchmark, so
  the op's arrays come from wherever those leave them; the two policies alternate, neither
  ever right after the other (the second would find the first's inputs in cache).
- hot: blocks of --reps calls of the same op back to back (one output, reused), the policies'
  blocks alternating; x and the output stay in cache when they fit.
- chain: a producer writing x (torch.mul into it), the op, a consumer reading its output
  (torch.clamp_min into another array), timed together, the policies alternating: what a
  network's layer around the op sees.
The policy is switched in process with the testing hook (batchnorm._C._set_stream_threshold):
training and backward, which read their inputs again after a reduction, stream past half the
threshold by default, so "whole" sets twice it; inference streams past the whole threshold
by default, so "half" sets half of it. ratio = half's median time / whole's (< 1: streaming
past half the cache is faster). Shapes of 16-40 MB of arrays, where the two policies differ.

    python bench/stream_policy.py --against 67108864 [--sizes mid]

compares the default threshold (on a machine whose store probe streams past the L2s, those;
cpu/plan.h, store_probe_ratio) with the given one in bytes instead, for every op; ratio =
default's time / the given threshold's. --sizes mid adds shapes of 3-13 MB of arrays.
Needs torch (the ops run on torch tensors through DLPack)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import batchnorm as bn
from batchnorm import _C

# (shape, layout, dtype, op)
CASES = [
    ((4096, 1024), "nc", "float32", "train"),
    ((65536, 64), "nc", "float32", "train"),
    ((8, 32, 112, 112), "cf", "float32", "train"),
    ((16, 64, 56, 56), "cf", "float32", "train"),
    ((32, 64, 56, 56), "cf", "bfloat16", "train"),
    ((32, 64, 56, 56), "cf", "float16", "train"),
    ((8, 32, 96, 96), "cf", "float32", "backward"),
    ((36000, 64), "nc", "float32", "backward"),
    ((2400, 1024), "nc", "float32", "backward"),
    ((36000, 64), "nc", "float32", "inference"),
    ((65536, 64), "nc", "float32", "inference"),
    ((32, 64, 56, 56), "cf", "bfloat16", "inference"),
]
# Below the cache-capped threshold, where a store probe's L2 threshold streams and the cap did not.
MID_CASES = [
    ((16, 64, 28, 28), "cf", "float32", "inference"),
    ((16, 64, 28, 28), "cf", "float32", "train"),
    ((16, 64, 28, 28), "cl", "float32", "backward"),
    ((2048, 1024), "nc", "float32", "inference"),
    ((2048, 1024), "nc", "float32", "train"),
    ((2048, 1024), "nc", "float32", "backward"),
    ((32, 256, 14, 14), "cf", "float32", "inference"),
    ((32, 256, 14, 14), "cl", "float32", "train"),
    ((64, 512, 7, 7), "cf", "float32", "backward"),
    ((64, 512, 7, 7), "cf", "bfloat16", "inference"),
    ((8, 32, 112, 112), "cf", "float32", "inference"),
    ((8, 32, 112, 112), "cl", "float32", "inference"),
    ((4096, 1024), "nc", "float32", "inference"),
]


def case_calls(shape, layout, dtype, op):
    """(ours, PyTorch's same op, a copy of x): callables on torch tensors."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(getattr(torch, dtype))
    dy = torch.randn(shape, generator=g).to(x.dtype)
    if layout == "cl":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    C = shape[1]
    w, b, rm, rv = torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
    out, copied = torch.empty_like(x), torch.empty_like(x)
    _, mean, invstd = bn.forward_training(x, w, b)

    def ours():
        if op == "train":
            bn.forward_training(x, w, b, running_mean=rm, running_var=rv, out=out)
        elif op == "inference":
            bn.forward_inference(x, rm, rv, w, b, out=out)
        else:
            bn.backward(dy, x, mean, invstd, w, out=out)

    def theirs():
        with torch.no_grad():
            if op == "backward":
                return torch.ops.aten.native_batch_norm_backward(dy, x, w, rm, rv, mean, invstd, True, 1e-5,
                                                                 [True, True, True])
            return torch.nn.functional.batch_norm(x, rm, rv, w, b, training=op == "train")

    src, after = x.clone(), torch.empty_like(x)

    def chained():
        torch.mul(src, 1.0, out=x)  # the producer writes x
        ours()
        torch.clamp_min(out, 0.0, out=after)  # the consumer reads it

    return ours, theirs, lambda: copied.copy_(x), chained


def thresholds(op):
    """(whole, half): the thresholds under which `op` streams past the whole cache and past half."""
    default = _C._stream_threshold()
    return (2 * default, default) if op in ("train", "backward") else (default, default // 2)


def between(ours, theirs, copy, th, reps):
    def under(t):
        def f():
            _C._set_stream_threshold(t)
            ours()
        return f

    cols = [under(th[0]), under(th[1]), theirs, copy]
    times = [[] for _ in cols]
    for f in cols:
        f()
    for r in range(reps):
        for i in ([0, 2, 1, 3] if r % 2 == 0 else [1, 2, 0, 3]):
            t = time.perf_counter()
            cols[i]()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def chain(chained, th, reps):
    times = ([], [])
    for f in range(2):
        _C._set_stream_threshold(th[f])
        chained()
    for r in range(reps):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            _C._set_stream_threshold(th[k])
            t = time.perf_counter()
            chained()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def hot(ours, th, reps, blocks):
    times = ([], [])
    for blk in range(2 * blocks):
        k = blk % 2
        _C._set_stream_threshold(th[k])
        ours()  # the block's first call finds the other policy's cache state: not timed
        for _ in range(reps):
            t = time.perf_counter()
            ours()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=60, help="timed calls per policy (between); calls per block (hot)")
    ap.add_argument("--blocks", type=int, default=6, help="hot blocks per policy")
    ap.add_argument("--against", type=int, default=None,
                    help="compare the default threshold with this one (bytes) instead of half / whole")
    ap.add_argument("--sizes", choices=["large", "mid"], default="large",
                    help="mid: shapes of 3-13 MB of arrays too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bn.set_num_threads(args.threads)
    default = _C._stream_threshold()
    # (label of the first policy, of the second): the ratio is the second's time over the first's.
    names = ("whole", "half") if args.against is None else ("given", "default")
    print(f"threads {args.threads}, streaming threshold {default / 2**20:g} MiB (store probe "
          f"{_C._store_probe():.2f}); medians in ms; ratio = {names[1]} / {names[0]}")
    print(f"{'case':32s} {'op':9s} | {names[0]:>7s} {names[1]:>7s} {'ratio':>6s} {'torch':>7s} {'copy':>7s} | "
          f"{'hot ' + names[0]:>9s} {names[1]:>7s} {'ratio':>6s} | {'chain ' + names[0]:>11s} {names[1]:>7s} {'ratio':>6s}")
    try:
        for shape, layout, dtype, op in CASES + (MID_CASES if args.sizes == "mid" else []):
            ours, theirs, copy, chained = case_calls(shape, layout, dtype, op)
            th = thresholds(op) if args.against is None else (args.against, default)
            w, h, t, c = between(ours, theirs, copy, th, args.reps)
            hw, hh = hot(ours, th, args.reps, args.blocks)
            cw, ch = chain(chained, th, args.reps)
            name = f"{'x'.join(map(str, shape))} {layout} {dtype}"
            print(f"{name:32s} {op:9s} | {w * 1e3:7.3f} {h * 1e3:7.3f} {h / w:6.2f} {t * 1e3:7.3f} {c * 1e3:7.3f} | "
                  f"{hw * 1e3:9.3f} {hh * 1e3:7.3f} {hh / hw:6.2f} | {cw * 1e3:11.3f} {ch * 1e3:7.3f} {ch / cw:6.2f}",
                  flush=True)
    finally:
        _C._set_stream_threshold(-1)


if __name__ == "__main__":
    main()
