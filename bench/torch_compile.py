#!/usr/bin/env python3
"""ResNet-18 under torch.compile (Inductor) on the CPU with torch's BatchNorm2d and with
batchnorm.torch's (convert): eval-mode inference (default, and with Inductor's freezing, which
folds inference batch norm into the convolutions) and a training step (forward + backward),
NCHW and channels_last. Each configuration runs in a process of its own, torch's and ours
alternating, and reports the median step of the rounds after compilation.

    python bench/torch_compile.py                 # the full table (about 5 minutes on 2 CPUs)
    python bench/torch_compile.py --reps 3 --alternate 20 --out bench/results/torch_compile.txt
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [  # (mode, layout, freezing)
    ("eval", "nchw", False), ("eval", "channels_last", False),
    ("eval", "nchw", True), ("eval", "channels_last", True),
    ("train", "nchw", False), ("train", "channels_last", False),
]


def _setup(which: str, mode: str, layout: str, threads: int):
    """ResNet-18 (torch's layers, or ours by convert) in `mode` and its input, in `layout`;
    seeded, so both sides get the same weights and input."""
    import torch

    sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))  # the models live beside the tests
    import batchnorm.torch as bt
    from resnet import resnet18

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet18()
    if which == "ours":
        model = bt.convert(model)
    x = torch.randn(*((8, 3, 160, 160) if mode == "eval" else (8, 3, 128, 128)))
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model.train(mode == "train"), x


def child(which: str, mode: str, layout: str, freezing: bool, threads: int, steps: int) -> None:
    """One configuration: compile, warm up, time `steps` steps; prints a JSON line."""
    import torch

    torch._inductor.config.freezing = freezing
    model, x = _setup(which, mode, layout, threads)
    compiled = torch.compile(model)

    def step() -> None:
        if mode == "eval":
            with torch.no_grad():
                compiled(x)
        else:
            compiled(x).sum().backward()

    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(json.dumps({"median": statistics.median(times), "min": min(times), "compile": compile_s}))


def alternate(layout: str, threads: int, steps: int) -> str:
    """The training step of both models compiled in this process, alternating step by step
    (the host's drift cancels): the median step of each and their ratio."""
    import torch

    theirs, x = _setup("torch", "train", layout, threads)
    ours, _ = _setup("ours", "train", layout, threads)
    compiled = {"torch": torch.compile(theirs), "ours": torch.compile(ours)}
    times = {"torch": [], "ours": []}
    for i in range(steps + 2):
        for which in ("torch", "ours") if i % 2 == 0 else ("ours", "torch"):
            t = time.perf_counter()
            compiled[which](x).sum().backward()
            if i >= 2:  # the first two compile and warm up
                times[which].append(time.perf_counter() - t)
    t, o = statistics.median(times["torch"]), statistics.median(times["ours"])
    return (f"train {layout}, one process, {steps} steps each alternating: torch {t * 1e3:.1f} ms, "
            f"ours {o * 1e3:.1f} ms, {o / t:.3f}")


def run(which: str, case: tuple, threads: int, steps: int) -> dict:
    mode, layout, freezing = case
    cmd = [sys.executable, __file__, "--child", which, mode, layout, str(int(freezing)), str(threads), str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="processes per configuration and side (median of them)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("--alternate", type=int, default=0, metavar="STEPS",
                    help="also time the training step of both models in one process, alternating STEPS times")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        which, mode, layout, freezing, threads, steps = args.child
        child(which, mode, layout, freezing == "1", int(threads), int(steps))
        return
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    lines = [
        f"ResNet-18 under torch.compile (Inductor), torch {torch.__version__}, {cpu}, {args.threads} threads; "
        f"eval batch 8 at 160x160, train batch 8 at 128x128; median over {args.reps} processes per side "
        f"(each the median of {args.steps} steps after compiling), torch's and ours alternating",
        f"load average {os.getloadavg()[0]:.2f} at start",
        "",
        "| mode | layout | freezing | step torch (ms) | step ours (ms) | ours / torch |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for case in CASES:
        got = {"torch": [], "ours": []}
        for r in range(args.reps):
            for which in (("torch", "ours") if r % 2 == 0 else ("ours", "torch")):
                got[which].append(run(which, case, args.threads, args.steps)["median"])
        t, o = statistics.median(got["torch"]), statistics.median(got["ours"])
        row = f"| {case[0]} | {case[1]} | {'yes' if case[2] else 'no'} | {t * 1e3:.1f} | {o * 1e3:.1f} | {o / t:.3f} |"
        lines.append(row)
        print(row, flush=True)
    if args.alternate:
        lines.append("")
        for layout in ("nchw", "channels_last"):
            lines.append(alternate(layout, args.threads, args.alternate))
            print(lines[-1], flush=True)
    lines.append(f"\nload average {os.getloadavg()[0]:.2f} at end")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
