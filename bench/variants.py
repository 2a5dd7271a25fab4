#!/usr/bin/env python3
"""The training variants beside plain batch norm (issue #16: each costs no more memory passes
than plain BN): training forward and backward of each variant against the plain op, on the CPU
benchmark's shapes, float32.

    python bench/variants.py [--threads 2] [--reps 15] [--quick] [--ghost 32]

Every case runs on NumPy arrays with preallocated outputs; the variant and the plain op are
interleaved call by call, each row is the median of `reps` timed calls after a warm-up, and
the ratio is the variant's time over plain's (1.00: no extra cost). Ghost batch norm uses
groups of --ghost samples (the batch dimension must divide by it)."""
from __future__ import annotations

import argparse
import os
import platform

import numpy as np

import batchnorm as bn
from _timing import QUICK, SHAPES, layouts, median_pair

def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ghost", type=int, default=32)
    args = ap.parse_args()
    bn.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{_cpu()}, ISA {bn.info()['simd']}, threads {args.threads}, float32, median of {args.reps}, "
          f"load {load:.2f}; ratio = variant / plain")
    print(f"{'case':22s} {'variant':22s} {'plain ms':>9s} {'variant ms':>10s} {'ratio':>6s}")
    for shape in QUICK if args.quick else SHAPES:
        for layout in layouts(shape):
            rng = np.random.default_rng(0)
            x = rng.standard_normal(shape, dtype=np.float32)
            dy = rng.standard_normal(shape, dtype=np.float32)
            axis = 1
            if layout == "cl":  # channels-last memory, the same logical (N, C, H, W) view
                x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
                dy = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
                axis = -1
            C = shape[1]
            w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            y, dx = np.empty_like(x), np.empty_like(x)
            name = f"{'x'.join(map(str, shape))} {layout}"

            def fwd(**kw):
                return bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis, out=y, **kw)

            forwards = {
                "biased running var": dict(running_var_unbiased=False),
                "skip_nonfinite": dict(skip_nonfinite=True),
                "renorm (3, 5)": dict(renorm=(3.0, 5.0)),
                f"ghost_batch={args.ghost}": dict(ghost_batch=args.ghost),
            }
            for label, kw in forwards.items():
                t_v, t_p = median_pair(lambda: fwd(**kw), fwd, args.reps)
                print(f"{name:22s} {'fwd ' + label:22s} {t_p * 1e3:9.3f} {t_v * 1e3:10.3f} {t_v / t_p:6.2f}", flush=True)
            _, mean, invstd = fwd()
            _, _, _, r, d = fwd(renorm=(3.0, 5.0))
            _, gmean, ginvstd = fwd(ghost_batch=args.ghost)

            def back(m, s, **kw):
                return bn.backward(dy, x, m, s, w, axis=axis, out=dx, **kw)

            backwards = {
                "renorm (r, d)": (lambda: back(mean, invstd, renorm=(r, d))),
                f"ghost_batch={args.ghost}": (lambda: back(gmean, ginvstd, ghost_batch=args.ghost)),
            }
            for label, f in backwards.items():
                t_v, t_p = median_pair(f, lambda: back(mean, invstd), args.reps)
                print(f"{name:22s} {'bwd ' + label:22s} {t_p * 1e3:9.3f} {t_v * 1e3:10.3f} {t_v / t_p:6.2f}", flush=True)


if __name__ == "__main__":
    main()
