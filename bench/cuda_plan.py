"""How the CUDA work plan's sizes move the reductions: statistics, forward_training and backward
on torch CUDA tensors, channels-first and channels-last, under settings of the tuning overrides
(BATCHNORM_CUDA_ITEMS, BATCHNORM_CUDA_MIN_WORK, BATCHNORM_CUDA_MIN_WORK_CL, read once per
process, so one child process per setting). Prints, per case, each setting's median time over
the default's, and torch's time beside ours. Needs torch with CUDA and a GPU.

    python bench/cuda_plan.py                       # the default sweep (~1-2 min on an H200)
    python bench/cuda_plan.py --out DIR             # also DIR/cuda-plan.{txt,json}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = [
    {},
    {"BATCHNORM_CUDA_ITEMS": "512"},
    {"BATCHNORM_CUDA_ITEMS": "1024"},
    {"BATCHNORM_CUDA_ITEMS": "4096"},
    {"BATCHNORM_CUDA_ITEMS": "8192"},
    {"BATCHNORM_CUDA_MIN_WORK_CL": "8"},
    {"BATCHNORM_CUDA_MIN_WORK_CL": "128"},
    {"BATCHNORM_CUDA_MIN_WORK": "4"},
    {"BATCHNORM_CUDA_MIN_WORK": "32"},
]
SHAPES = [(32, 64, 56, 56), (64, 256, 28, 28), (256, 2048, 7, 7), (128, 64, 56, 56), (256, 64, 112, 112)]
OPS = ("statistics", "forward_training", "backward")
BURST, WARMUP = 10, 3


def child(reps: int) -> None:
    """Times every case under this process's environment; one JSON line on stdout."""
    import torch
    import batchnorm as bn

    F = torch.nn.functional
    dev = torch.device("cuda")
    out = {}
    for shape in SHAPES:
        for lay in ("cf", "cl"):
            g = torch.Generator(device=dev).manual_seed(0)
            n, c, h, w = shape
            x = torch.randn((n, h, w, c) if lay == "cl" else shape, device=dev, generator=g)
            axis = 3 if lay == "cl" else 1
            xt = x if lay == "cf" else x.permute(0, 3, 1, 2)
            wt, b = torch.randn(c, device=dev), torch.randn(c, device=dev)
            rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
            dy, y, dx = torch.randn_like(x), torch.empty_like(x), torch.empty_like(x)
            _, mean, invstd = bn.forward_training(x, wt, b, axis=axis)
            fns = {
                "statistics": lambda: bn.statistics(x, axis=axis),
                "forward_training": lambda: bn.forward_training(x, wt, b, running_mean=rm, running_var=rv,
                                                                axis=axis, out=y),
                "backward": lambda: bn.backward(dy, x, mean, invstd, wt, axis=axis, out=dx),
                "torch_training": lambda: F.batch_norm(xt, rm, rv, wt, b, training=True),
            }
            for name, fn in fns.items():
                for _ in range(WARMUP):
                    fn()
                times = []
                for _ in range(reps):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    e0.record()
                    for _ in range(BURST):
                        fn()
                    e1.record()
                    torch.cuda.synchronize()
                    times.append(e0.elapsed_time(e1) / BURST)
                times.sort()
                out[f"{'x'.join(map(str, shape))} {lay} {name}"] = times[len(times) // 2]
            del x, dy, y, dx
            torch.cuda.empty_cache()
    print(json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.reps)
        return 0
    runs = []
    for s in SETTINGS:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHNORM_CUDA_")}
        env.update(s)
        r = subprocess.run([sys.executable, __file__, "--child", "--reps", str(a.reps)], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"setting {s or 'default'} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        runs.append((s, json.loads(r.stdout.strip().splitlines()[-1])))
        print(f"ran {s or 'default'}", file=sys.stderr, flush=True)
    base = runs[0][1]
    names = [" ".join(f"{k.replace('BATCHNORM_CUDA_', '').lower()}={v}" for k, v in s.items()) or "default"
             for s, _ in runs]
    lines = ["Median ms per call (CUDA events, bursts of 10) under each plan setting: default's ms, then each "
             "other setting's time over the default's; torch = F.batch_norm training ms",
             f"{'case':38s} {'torch':>7s} {'default':>8s} " + " ".join(f"{n:>14s}" for n in names[1:])]
    for key in base:
        if key.endswith("torch_training"):
            continue
        torch_ms = base[key.rsplit(" ", 1)[0] + " torch_training"]
        row = f"{key:38s} {torch_ms:7.3f} {base[key]:8.3f} "
        row += " ".join(f"{r[key] / base[key]:14.2f}" for _, r in runs[1:])
        lines.append(row)
    text = "\n".join(lines)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "cuda-plan.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(a.out, "cuda-plan.json"), "w") as f:
            json.dump([{"setting": s, "ms": r} for s, r in runs], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
