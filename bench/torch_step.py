#!/usr/bin/env python3
"""One training step (forward + backward + SGD) of torchvision's ResNet-18 / ResNet-50 on the
CPU, with torch's own BatchNorm2d and with batchnorm.torch's (convert), NCHW and channels_last,
plus the time spent in batch norm alone per step. Checks the target of issue #11: the converted
step is faster by at least torch's BN share x (1 - our BN time / torch's BN time).

    python bench/torch_step.py            # batch 32, 224x224 (slow on few cores)
    python bench/torch_step.py --quick    # batch 8, 64x64
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))  # the models live beside the tests
import batchnorm  # noqa: E402
import batchnorm.torch as bt  # noqa: E402
from resnet import resnet18, resnet50  # noqa: E402

MODELS = {"resnet18": resnet18, "resnet50": resnet50}


class BatchNormClock:
    """Seconds spent in the model's batch norm layers: forward from the module's pre-hook to
    its hook (all Python included), backward from the BN autograd node's pre-hook to its
    hook. The CPU engine runs one node at a time, so the intervals do not overlap."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.total = 0.0
        self.handles = []
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                self.handles.append(m.register_forward_pre_hook(self._start))
                self.handles.append(m.register_forward_hook(self._stop))

    def _start(self, module, args) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        self.total += time.perf_counter() - self._t0
        node = output.grad_fn  # the BN node, before an in-place ReLU replaces grad_fn
        if node is not None:
            node.register_prehook(self._node_start)
            node.register_hook(self._node_stop)

    def _node_start(self, grad_outputs):
        self._b0 = time.perf_counter()

    def _node_stop(self, grad_inputs, grad_outputs):
        self.total += time.perf_counter() - self._b0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def train_step(model, opt, x, target) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), target).backward()
    opt.step()
    return time.perf_counter() - t0


def bench_case(name: str, channels_last: bool, batch: int, size: int, reps: int) -> dict:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    theirs = MODELS[name]().to(memory_format=fmt)
    ours = bt.convert(copy.deepcopy(theirs))
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,))
    variants = {"torch": theirs, "ours": ours}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in variants.items()}
    steps = {k: [] for k in variants}
    bn = {k: [] for k in variants}
    for k, m in variants.items():  # warm-up: allocator, oneDNN primitives, thread pools
        train_step(m, opts[k], x, target)
    for _ in range(reps):  # interleaved, so that machine noise hits both alike
        for k, m in variants.items():
            steps[k].append(train_step(m, opts[k], x, target))
        for k, m in variants.items():  # BN time in separate steps: hooks cost a little
            clock = BatchNormClock(m)
            train_step(m, opts[k], x, target)
            clock.remove()
            bn[k].append(clock.total)
    med = {k: statistics.median(v) for k, v in steps.items()}
    bn_med = {k: statistics.median(v) for k, v in bn.items()}
    share = bn_med["torch"] / med["torch"]
    target_gain = share * (1 - bn_med["ours"] / bn_med["torch"])
    gain = 1 - med["ours"] / med["torch"]
    return {
        "model": name, "layout": "channels_last" if channels_last else "nchw", "batch": batch, "size": size,
        "step_torch": med["torch"], "step_ours": med["ours"], "bn_torch": bn_med["torch"], "bn_ours": bn_med["ours"],
        "bn_share": share, "gain": gain, "target_gain": target_gain, "met": gain >= target_gain,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 8 at 64x64, 3 repetitions")
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--layouts", default="nchw,channels_last")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None, help="timed steps per variant (median)")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    batch = args.batch or (8 if args.quick else 32)
    size = args.size or (64 if args.quick else 224)
    reps = args.reps or (3 if args.quick else 5)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1]
    lines = [
        f"CPU: {cpu.strip() or platform.processor()}, {os.cpu_count()} CPUs; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), batchnorm {batchnorm.__version__} ({batchnorm.get_num_threads()} threads, "
        f"{batchnorm.info()['simd']}); float32, SGD momentum; median of {reps} steps, interleaved",
        "",
        "| model | layout | batch, size | step torch (s) | step ours (s) | BN torch (s) | BN ours (s) "
        "| BN share | step gain | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        for layout in args.layouts.split(","):
            r = bench_case(name, layout == "channels_last", batch, size, reps)
            row = (
                f"| {r['model']} | {r['layout']} | {batch}, {size}x{size} | {r['step_torch']:.3f} | {r['step_ours']:.3f} "
                f"| {r['bn_torch']:.3f} | {r['bn_ours']:.3f} | {r['bn_share']:.1%} | {r['gain']:+.1%} "
                f"| {r['target_gain']:+.1%} | {'yes' if r['met'] else 'no'} |"
            )
            lines.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
