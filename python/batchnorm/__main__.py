"""`python -m batchnorm`: the package's command line. `info` prints the build and machine
facts; `selfcheck` runs a quick correctness check against a float64 NumPy reference."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _selfcheck() -> int:
    """Checks the accuracy promise of API.md: means to 1e-6 relative, variances to 1e-3."""
    import batchnorm as bn

    rng = np.random.default_rng(0)
    worst_mean = worst_var = 0.0
    start = time.perf_counter()
    for shape, axis in [((32, 16, 8, 8), 1), ((64, 8, 8, 16), -1), ((4096, 32), 1)]:
        x = rng.standard_normal(shape).astype(np.float32) * 3 + 1e4
        y, mean, invstd = bn.forward_training(x, axis=axis)
        red = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
        x64 = x.astype(np.float64)
        ref_mean = x64.mean(axis=red)
        ref_var = x64.var(axis=red)
        # Relative to |mean|: a float32 mean of 1e4 cannot be closer than half an ulp (5e-4),
        # which is 1.6e-4 of this data's std.
        worst_mean = max(worst_mean, float(np.max(np.abs(mean - ref_mean) / np.abs(ref_mean))))
        worst_var = max(worst_var, float(np.max(np.abs(1 / invstd.astype(np.float64) ** 2 - 1e-5 - ref_var) / ref_var)))
    ok = worst_mean < 1e-6 and worst_var < 1e-3
    print(f"self-check: worst relative error {worst_mean:.2e} (mean), {worst_var:.2e} (variance) over 3 shapes "
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
