"""`python -m batchnorm`: the package's command line. With no subcommand (or `paper`) it
reproduces the paper's MNIST experiment; `info` prints the build and machine facts;
`selfcheck` checks the kernels against a float64 NumPy reference; `bench` runs the benchmarks;
`--cmake-dir` prints the directory of the CMake package (batchnormConfig.cmake) for C/C++ hosts."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

PROG = "python -m batchnorm"


def _selfcheck() -> int:
    import batchnorm as bn

    rng = np.random.default_rng(0)
    worst_mean = worst_var = 0.0
    start = time.perf_counter()
    for shape, axis in [((32, 16, 8, 8), 1), ((64, 8, 8, 16), -1), ((4096, 32), 1)]:
        # A mean 3000x the standard deviation: where E[x^2] - E[x]^2 would lose every digit.
        x = rng.standard_normal(shape).astype(np.float32) * 3 + 1e4
        _, mean, invstd = bn.forward_training(x, axis=axis)
        red = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
        x64 = x.astype(np.float64)
        ref_mean = x64.mean(axis=red)
        ref_var = x64.var(axis=red)
        var = 1 / invstd.astype(np.float64) ** 2 - 1e-5
        # The contract's tolerances (API.md): the mean to ~1e-6 relative (a float32 mean of
        # 1e4 cannot be closer than half an ulp, 5e-4), the variance to 1e-3 relative.
        worst_mean = max(worst_mean, float(np.max(np.abs(mean - ref_mean) / np.abs(ref_mean))))
        worst_var = max(worst_var, float(np.max(np.abs(var - ref_var) / ref_var)))
    ok = worst_mean < 1e-6 and worst_var < 1e-3
    print(f"self-check: worst relative error {worst_mean:.1e} (mean, limit 1e-6), {worst_var:.1e} "
          f"(variance, limit 1e-3) over 3 shapes ({(time.perf_counter() - start) * 1e3:.1f} ms): "
          f"{'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def _info() -> int:
    import batchnorm as bn

    print(json.dumps(bn.info(), indent=2))
    return 0


def _cmake_dir() -> int:
    # The wheel installs libbatchnorm, its header and its CMake package inside the package
    # (CMakeLists.txt: batchnorm/lib/cmake/batchnorm); the path goes to CMAKE_PREFIX_PATH.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", "cmake", "batchnorm")
    if not os.path.isfile(os.path.join(path, "batchnormConfig.cmake")):
        print(f"{PROG} --cmake-dir: this installation has no CMake package ({path} is missing); "
              "install batchnorm with pip (a wheel or `pip install .`)", file=sys.stderr)
        return 1
    print(path)
    return 0


def _bench(argv: list[str]) -> int:
    # batchnorm._bench is written separately and may be absent from this build; ask for the
    # module before importing it, so that an ImportError inside it is not mistaken for absence.
    if importlib.util.find_spec("batchnorm._bench") is None:
        print(f"{PROG} bench: the benchmarks (module batchnorm._bench) are not part of this build; "
              "bench/ in the source tree has them", file=sys.stderr)
        return 2
    from batchnorm import _bench

    return int(_bench.main(argv) or 0)


def _parser() -> argparse.ArgumentParser:
    from batchnorm.paper.experiments import add_arguments

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Batch normalization kernels. With no command, reproduces the MNIST experiment "
                    "of Ioffe & Szegedy (2015) at laptop scale: the options below are those of `paper`.",
    )
    add_arguments(parser)
    parser.add_argument("--cmake-dir", action="store_true",
                        help="print the directory of batchnorm's CMake package (for CMAKE_PREFIX_PATH) and exit")
    sub = parser.add_subparsers(dest="command", metavar="{paper,info,selfcheck,bench}")
    # The subcommand repeats the options without defaults, so `--seed 3 paper` keeps the 3.
    add_arguments(sub.add_parser("paper", help="reproduce the paper's MNIST experiment (the default)"), defaults=False)
    sub.add_parser("info", help="print version, SIMD level, threads and CUDA status")
    sub.add_parser("selfcheck", help="check the kernels against a float64 reference")
    sub.add_parser("bench", help="run the benchmarks (batchnorm._bench); arguments after `bench` go to it",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        return _bench(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmake_dir:
        return _cmake_dir()
    if args.command in ("info", "selfcheck", "bench"):
        # Options before the command are the paper's: `--quick bench` ran the full benchmark
        # and `--out x bench` wrote elsewhere, silently.
        defaults = parser.parse_args([])
        given = [f"--{name}" for name in ("steps", "seed", "out", "quick", "data", "workers")
                 if getattr(args, name) != getattr(defaults, name)]
        if given:
            parser.error(f"the options before `{args.command}` ({', '.join(given)}) are the paper reproduction's"
                         + ("; the benchmark's go after `bench`" if args.command == "bench" else ""))
    if args.command == "info":
        return _info()
    if args.command == "selfcheck":
        return _selfcheck()
    if args.command == "bench":  # reached only with options before `bench`, refused above
        return _bench([])
    from batchnorm.paper.experiments import main as paper

    return paper(args)


def _run() -> int:
    try:
        code = main()
        sys.stdout.flush()  # a closed pipe surfaces here rather than at interpreter exit
        return code
    except BrokenPipeError:
        # `python -m batchnorm info | head`: the reader left; no traceback for that. stdout goes
        # to devnull so the interpreter's own final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(_run())
