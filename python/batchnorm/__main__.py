"""`python -m batchnorm`: the package's command line. `info` prints the build and machine
facts; `selfcheck` runs a quick correctness check against a float64 NumPy reference."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _selfcheck() -> int:
    import batchnorm as bn

    rng = np.random.default_rng(0)
    worst = 0.0
    start = time.perf_counter()
    for shape, axis in [((32, 16, 8, 8), 1), ((64, 8, 8, 16), -1), ((4096, 32), 1)]:
        x = rng.standard_normal(shape).astype(np.float32) * 3 + 1e4
        mean, var, _ = bn.statistics(x, axis=axis)
        y, _, invstd = bn.forward_training(x, axis=axis)
        red = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
        x64 = x.astype(np.float64)
        ref_mean = x64.mean(axis=red)
        ref_var = x64.var(axis=red)
        # The contract: mean to ~1e-6 relative, variance to 1e-3 relative, y to a few ulps
        # of a float64 computation with the returned statistics.
        worst = max(worst, float(np.max(np.abs(mean - ref_mean) / np.abs(ref_mean))) / 1e-6)
        worst = max(worst, float(np.max(np.abs(var - ref_var) / ref_var)) / 1e-3)
        shape = [1] * x.ndim
        shape[axis] = -1
        ref_y = (x64 - mean.astype(np.float64).reshape(shape)) * invstd.astype(np.float64).reshape(shape)
        # |y| stays below ~8 here, so 4 ulps of float32 at that scale:
        worst = max(worst, float(np.max(np.abs(y - ref_y))) / (4 * 8 * np.finfo(np.float32).eps))
    ok = worst < 1.0
    print(f"self-check: worst error {worst:.2e} of the contract's tolerance over 3 shapes "
          f"({(time.perf_counter() - start) * 1e3:.1f} ms): {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def _info() -> int:
    import batchnorm as bn

    print(json.dumps(bn.info(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print version, SIMD level, threads and CUDA status")
    sub.add_parser("selfcheck", help="check the kernels against a float64 reference")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "selfcheck":
        return _selfcheck()
    status = _info()
    return status or _selfcheck()


if __name__ == "__main__":
    sys.exit(main())
