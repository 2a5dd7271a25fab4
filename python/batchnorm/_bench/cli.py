"""The benchmark's command line and run order: peak memory (in a forked child), every case
timed with its columns interleaved, the size sweep; then the table, the target summary, and
the JSON, .txt and PNG under --out."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, List, Optional, Sequence

import numpy as np

import batchnorm as bn

from . import cases as C
from . import memory, report, scaling
from .columns import agreement, make_columns
from .timing import run_interleaved

DEFAULT_REPS = 15
QUICK_REPS = 5
# `python -m batchnorm bench` writes into this folder of the current directory, named like the
# paper's ./batchnorm-paper; bench/run.py in a checkout passes the checkout's bench/results.
DEFAULT_OUT = "batchnorm-bench"


def _all_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _parse_threads(text: str) -> List[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            n = _all_threads() if part in ("all", "max") else int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"thread counts are ints or 'all', got {part!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {part}")
        out.append(n)
    if not out:  # ("," fell back to the default thread counts without a word)
        raise argparse.ArgumentTypeError(f"expected at least one thread count, got {text!r}")
    return sorted(set(out))


def _parse_shapes(text: str) -> List[tuple]:
    """--shapes: argparse shows only an ArgumentTypeError's words (a ValueError's became
    "invalid <lambda> value"); a training case needs 2 values per channel."""
    shapes = []
    for part in (t for t in text.split(",") if t.strip()):
        try:
            shape = C.parse_shape(part)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1) < 2:
            raise argparse.ArgumentTypeError(f"a shape must hold at least 2 values per channel (training), got {part!r}")
        shapes.append(shape)
    return shapes


def _parse_name(text: str) -> str:
    """--name: a file stem in --out, not a path (a folder in it met open()'s error after all
    the measuring)."""
    if not text or os.sep in text or (os.altsep and os.altsep in text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"a file stem without folders, got {text!r} (--out chooses the folder)")
    return text


def _parse_ops(text: str) -> List[str]:
    ops = []
    for part in text.split(","):
        op = C.OP_ALIASES.get(part.strip(), part.strip())
        if op not in C.OPS:
            raise argparse.ArgumentTypeError(
                f"unknown op {part!r}; choose from {', '.join(C.OPS)} (or inf, train, bwd)")
        ops.append(op)
    return [op for op in C.OPS if op in ops]


def _parse_list(choices: Sequence[str]):
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        if not items:  # ("," ran no case, and still wrote and overwrote its results)
            raise argparse.ArgumentTypeError(f"expected at least one of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def _non_negative(kind: type):
    """--retries, --retry-above, --retry-pause: a finite number >= 0, refused before any timing
    (a negative pause raised in time.sleep after the measuring, and no results were written)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} >= 0, got {text!r}") from None
        if not (0 <= value < float("inf")):
            raise argparse.ArgumentTypeError(f"expected a finite {kind.__name__} >= 0, got {text!r}")
        return value
    return parse


def build_parser(default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m batchnorm bench",
        description="CPU benchmark of batchnorm against np.copyto bandwidth, PyTorch and NumPy "
                    "(see bench/README.md for what each column means).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (this benchmark) or cuda (the GPU benchmark, its own options: --device cuda --help)")
    p.add_argument("--quick", action="store_true",
                   help="two shapes, 5 rounds, a short sweep (about a minute on 2 cores, torch included)")
    p.add_argument("--threads", type=_parse_threads, default=None,
                   help="comma list of thread counts, 'all' = every CPU (default: 1,all)")
    p.add_argument("--ops", type=_parse_ops, default=list(C.OPS), help="comma list of ops (default: all three)")
    p.add_argument("--shapes", type=_parse_shapes, default=None,
                   help="comma list like 32x64x56x56,4096x1024 (default: the issue's seven); every --dtypes "
                        "then runs on each")
    p.add_argument("--dtypes", type=_parse_list(C.DTYPES), default=list(C.DTYPES),
                   help="comma list of float32, bfloat16, float16 (half dtypes: two shapes by default)")
    p.add_argument("--layouts", type=_parse_list(C.LAYOUTS), default=list(C.LAYOUTS),
                   help="cf (channels-first) and/or cl (channels-last) for 4-d shapes")
    p.add_argument("--reps", type=int, default=None, help=f"timed rounds per case (default {DEFAULT_REPS}, "
                                                           f"--quick {QUICK_REPS})")
    p.add_argument("--out", default=default_out,
                   help=f"directory for the .json, .txt and .png results, created if missing (default {default_out}, "
                        "relative to the current directory)")
    p.add_argument("--name", type=_parse_name, default=None,
                   help="file stem of the results (default: full, quick or custom)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns (and bfloat16)")
    p.add_argument("--no-numpy", action="store_true", help="skip the NumPy implementation")
    p.add_argument("--no-sweep", action="store_true", help="skip the time-vs-size sweep")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--retries", type=_non_negative(int), default=1,
                   help="re-runs of a case whose threads waited for a CPU more than --retry-above (default 1)")
    p.add_argument("--retry-above", type=_non_negative(float), default=0.05,
                   help="fraction of wall time spent waiting for a CPU that counts as contended (default 0.05)")
    p.add_argument("--retry-pause", type=_non_negative(float), default=5.0, help="seconds to wait before a re-run (default 5)")
    return p


def _cache_sizes() -> dict:
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue

            def read(name: str) -> str:
                with open(os.path.join(base, entry, name)) as f:
                    return f.read().strip()

            if read("type") in ("Data", "Unified"):
                size = read("size")
                mult = {"K": 1024, "M": 1024 ** 2}.get(size[-1], 1)
                caches[f"L{read('level')}"] = int(size.rstrip("KM")) * mult
    except OSError:
        pass
    return caches


def machine_info(threads: Sequence[int], torch: Any) -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = bn.info()
    git = None
    # The commit of this package's checkout, else of the current folder's (bench/run.py from a
    # checkout measuring an installed build): only a repository that holds batchnorm's sources
    # counts (an install inside some other repository, pyenv's say, once recorded its commit).
    for where in (os.path.dirname(os.path.abspath(__file__)), os.getcwd()):
        try:
            top = subprocess.run(["git", "-C", where, "rev-parse", "--show-toplevel", "--short", "HEAD"],
                                 capture_output=True, text=True, timeout=5).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        if len(top) == 2 and os.path.isfile(os.path.join(top[0], "python", "batchnorm", "__init__.py")):
            git = top[1]
            break
    return {
        "cpu_model": model,
        "cpus": _all_threads(),
        "caches_bytes": _cache_sizes(),
        "simd": info["simd"],
        "batchnorm_isa_env": os.environ.get("BATCHNORM_ISA"),
        "threads": list(threads),
        "batchnorm": info["version"],
        "batchnorm_source": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "git_commit": git,
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "torch_parallel": (torch.__config__.parallel_info().splitlines()[-1].strip() if torch is not None else None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))},
        "loadavg_start": list(os.getloadavg()),
    }


class Output:
    """Prints and keeps lines for the .txt copy. Case tables are printed live as cases finish
    and kept once, in their final form, after any re-runs."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def __call__(self, *lines: str, live: bool = True) -> None:
        for line in lines:
            if live:
                print(line, flush=True)
            self.lines.append(line)

    def live(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)


def main(argv: Optional[Sequence[str]] = None, default_out: str = DEFAULT_OUT) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if "--device=cuda" in argv_list or any(a == "--device" and b == "cuda" for a, b in zip(argv_list, argv_list[1:])):
        from . import cuda

        return cuda.main(argv_list, default_out)
    args = build_parser(default_out).parse_args(argv)
    wall0 = time.perf_counter()
    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: F811
        except ImportError:
            print("torch is not importable: PyTorch columns and bfloat16 skipped", file=sys.stderr)
    dtypes = [d for d in args.dtypes if d != "bfloat16" or torch is not None]
    threads = args.threads or sorted({1, _all_threads()})
    reps = args.reps if args.reps is not None else (QUICK_REPS if args.quick else DEFAULT_REPS)
    if reps < 1:
        print(f"--reps must be >= 1, got {reps}", file=sys.stderr)
        return 2
    try:  # before minutes of measuring, not after
        os.makedirs(args.out, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=args.out)
        probe.close()
    except OSError as err:
        print(f"error: --out {args.out!r} is not a writable directory ({err.strerror or err})", file=sys.stderr)
        return 2
    numpy_reps = max(2, reps // 3)
    if args.shapes:
        shapes, half_shapes = args.shapes, args.shapes
    elif args.quick:
        shapes, half_shapes = C.QUICK_SHAPES, C.QUICK_HALF_SHAPES
    else:
        shapes, half_shapes = C.SHAPES, C.HALF_SHAPES
    cases = C.make_cases(shapes, half_shapes, dtypes, args.layouts)
    if not cases:  # (it ran nothing, exited 0, and overwrote the results of that name)
        dropped = " (bfloat16 needs torch, left out by --no-torch or not importable)" if "bfloat16" in args.dtypes \
            and "bfloat16" not in dtypes else ""
        print(f"error: --shapes, --dtypes and --layouts select no case{dropped}", file=sys.stderr)
        return 2
    name = args.name or ("quick" if args.quick else "full" if argv_is_default(args) else "custom")

    def set_threads(n: int) -> None:
        bn.set_num_threads(n)
        if torch is not None:
            torch.set_num_threads(n)

    if torch is not None:
        torch.set_grad_enabled(False)
    machine = machine_info(threads, torch)
    out = Output()
    out(f"batchnorm {machine['batchnorm']} ({machine['simd']}) on {machine['cpu_model']}, {machine['cpus']} CPUs; "
        f"threads {threads}; numpy {machine['numpy']}; torch {machine['torch'] or 'not run'}",
        f"{len(cases)} cases x {len(args.ops)} ops, {reps} interleaved rounds each "
        f"(NumPy implementation: {numpy_reps}); load average {machine['loadavg_start'][0]:.2f}",
        "Columns: out= ms = ours into a preallocated out (median; min - max); new ms = ours allocating; "
        "GB/s and xcopy = minimum bytes / out= time and its ratio to np.copyto's GB/s; xT = torch ms / ours ms; "
        "xNP = NumPy ms / ours out= ms", "", report.TABLE_HEADER)

    # Memory first, in a forked child: before this process has run any OpenMP region.
    mem_rows, mem_why = None, None
    if not args.no_memory:
        seen, mem_cases = set(), []
        for case in cases:  # threads do not change what a call allocates beyond per-thread scratch
            if (case.shape, case.layout, case.dtype) not in seen:
                seen.add((case.shape, case.layout, case.dtype))
                mem_cases.append(case)
        print(f"   [peak memory of {len(mem_cases)} cases ...]", file=sys.stderr, flush=True)
        mem_rows, mem_why = memory.measure_in_child(mem_cases, args.ops, max(threads), set_threads, torch)

    def time_case(case: C.Case) -> dict:
        t0 = time.perf_counter()
        set_threads(max(threads))
        data = C.CaseData(case, torch)
        use_numpy = not args.no_numpy and case.dtype == "float32"
        agree = agreement(data, args.ops, torch is not None, use_numpy)
        columns = make_columns(data, args.ops, threads, reps, numpy_reps, torch is not None, use_numpy)
        contention = run_interleaved(columns, reps, set_threads)
        res = report.case_result(case, columns, args.ops, threads, agree)
        res["seconds"] = time.perf_counter() - t0
        res["loadavg_1min"] = os.getloadavg()[0]
        res["cpu_wait"] = contention
        del data, columns
        gc.collect()
        return res

    def contended(res: dict) -> bool:
        return res["cpu_wait"] is not None and res["cpu_wait"] > args.retry_above

    results = []
    for i, case in enumerate(cases):
        res = time_case(case)
        results.append(res)
        out.live(*report.case_table(res))
        print(f"   [case {i + 1}/{len(cases)} in {res['seconds']:.1f} s]", file=sys.stderr, flush=True)
    # Other processes on the machine slow the multi-threaded columns far more than the
    # single-threaded copy: a case that waited long for CPUs runs again, the calmer run is kept.
    retried = [i for i, res in enumerate(results) if contended(res)]
    if retried and args.retries > 0:
        out.live("", f"Re-running {len(retried)} case(s) whose threads waited > {100 * args.retry_above:.0f}% "
                     f"of the time for a CPU (other processes running):")
    for i in retried:
        attempts = [results[i]]
        for _ in range(args.retries):
            time.sleep(args.retry_pause)
            attempts.append(time_case(cases[i]))
            out.live(*report.case_table(attempts[-1]))
            if not contended(attempts[-1]):
                break
        best = min(attempts, key=lambda r: r["cpu_wait"])
        best["attempts_cpu_wait"] = [a["cpu_wait"] for a in attempts]
        results[i] = best
    for res in results:
        out(*report.case_table(res), live=False)

    sweep = None
    if not args.no_sweep:
        batches = scaling.QUICK_BATCHES if args.quick else scaling.FULL_BATCHES
        sweep = scaling.sweep(batches, max(3, reps // 2 + 1), max(threads), set_threads)
        out("", *report.scaling_table(sweep))

    if mem_rows is not None:
        out("", f"Peak memory per call, {max(threads)} threads ({memory.METHOD}):", *report.memory_table(mem_rows))
    elif mem_why:
        out("", f"Peak memory not measured: {mem_why}")

    l2 = machine["caches_bytes"].get("L2", 1 << 20)
    targets = report.check_targets(results, threads, sweep, mem_rows, l2, machine["caches_bytes"].get("L3"))
    wall = time.perf_counter() - wall0
    machine["loadavg_end"] = list(os.getloadavg())
    out("", *report.targets_table(targets), "",
        f"wall time {wall:.0f} s; load average {machine['loadavg_start'][0]:.2f} at start, "
        f"{machine['loadavg_end'][0]:.2f} at end")

    stem = os.path.join(os.path.abspath(args.out), name)
    doc = {
        "schema": "batchnorm-cpu-bench/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "machine": machine,
        "config": {"reps": reps, "numpy_reps": numpy_reps, "ops": args.ops, "dtypes": dtypes,
                   "layouts": args.layouts, "threads": threads, "shapes": [list(s) for s in shapes],
                   "half_shapes": [list(s) for s in half_shapes], "eps": C.EPS,
                   "bytes": "forward: 2 x x.nbytes (x read, y written); backward: 3 x x.nbytes (dy, x read, dx "
                            "written); np.copyto: 2 x x.nbytes",
                   "memory_method": memory.METHOD},
        "wall_s": wall,
        "cases": results,
        "scaling": sweep,
        "memory": mem_rows,
        "targets": targets,
    }
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(stem + ".txt", "w") as f:
        f.write("\n".join(out.lines) + "\n")
    why = report.plot(results, max(threads), stem + ".png", chart_title(machine, max(threads)))
    print(f"\nwrote {stem}.json, {stem}.txt" + (f", {stem}.png" if not why else f" ({why})"), file=sys.stderr)
    return 0


def chart_title(machine: dict, threads: int) -> str:
    versus = f" vs PyTorch {machine['torch']}" if machine["torch"] else ""  # no "vs PyTorch None"
    return f"batchnorm {machine['simd']}{versus}: float32, {threads} threads, {machine['cpu_model']}"


def argv_is_default(args: argparse.Namespace) -> bool:
    return (args.shapes is None and args.threads is None and args.reps is None and args.ops == list(C.OPS)
            and args.dtypes == list(C.DTYPES) and args.layouts == list(C.LAYOUTS) and not args.no_torch
            and not args.no_numpy and not args.no_sweep and not args.no_memory)
