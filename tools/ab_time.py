"""A/B timing of two builds during a refactoring: catches a slowdown early (indicative only:
the lead's before/after benchmark on a quiet machine is the measurement that counts).

    python tools/ab_time.py /path/to/old/python /path/to/new/python

Child processes of the two interpreters alternate (old, new, old, new, ...), each timing
every case a few times on 2 threads; the medians over all of a side's samples (15 per case)
are compared. Cases: a few shapes of bench/run.py, forward training / inference / backward."""
from __future__ import annotations

import json
import subprocess
import sys

ROUNDS = 3
REPS = 5  # per round: 15 samples per case and side

CASES = [
    # (op, shape, layout, dtype)
    ("train", (32, 64, 56, 56), "cf", "float32"),
    ("train", (32, 64, 56, 56), "cl", "float32"),
    ("infer", (256, 2048, 7, 7), "cf", "float32"),
    ("train", (256, 2048, 7, 7), "cf", "float32"),
    ("backward", (256, 2048, 7, 7), "cf", "float32"),
    ("stats", (256, 2048, 7, 7), "cf", "float32"),
    ("infer", (32, 64, 56, 56), "cl", "float32"),
    ("backward", (32, 64, 56, 56), "cf", "float32"),
    ("backward", (4096, 1024), "nc", "float32"),
    ("train", (32, 64, 56, 56), "cf", "bfloat16"),
    ("infer", (4096, 1024), "nc", "float16"),
    ("train", (32, 64, 56, 56), "cf", "float16"),
    ("backward", (32, 64, 56, 56), "cf", "float16"),
    ("infer", (256, 2048, 7, 7), "cf", "float16"),
]


def child() -> None:
    import time

    import numpy as np
    import torch

    import batchnorm as bn

    bn.set_num_threads(2)
    rng = np.random.default_rng(0)
    out = {}
    for op, shape, layout, dtype in CASES:
        x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(getattr(torch, dtype))
        if layout == "cl":
            x = x.to(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        C = shape[1]
        w, b = torch.ones(C), torch.zeros(C)
        rm, rv = torch.zeros(C), torch.ones(C)
        _, sm, si = bn.forward_training(x, w, b)
        y = torch.empty_like(x)
        fn = {
            "train": lambda: bn.forward_training(x, w, b, running_mean=rm, running_var=rv, out=y),
            "infer": lambda: bn.forward_inference(x, rm, rv, w, b, out=y),
            "backward": lambda: bn.backward(dy, x, sm, si, w, out=y),
            "stats": lambda: bn.statistics(x),
        }[op]
        # Warm up (thread pool, first touches, caches) for 3 calls and at least 50 ms: with one
        # call, the first case of each child absorbed start-up costs and read as 1.4x slower.
        t0, calls = time.perf_counter(), 0
        while calls < 3 or time.perf_counter() - t0 < 0.05:
            fn()
            calls += 1
        samples = []
        for _ in range(REPS):
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
        out[f"{op} {'x'.join(map(str, shape))} {layout} {dtype}"] = samples
    print(json.dumps(out))


def main(old: str, new: str) -> None:
    import statistics

    samples = {"old": {}, "new": {}}
    for _ in range(ROUNDS):
        for side, py in (("old", old), ("new", new)):
            r = subprocess.run([py, __file__, "--child"], capture_output=True, text=True, check=True)
            for k, v in json.loads(r.stdout).items():
                samples[side].setdefault(k, []).extend(v)
    print(f"{'case':40s} {'old ms':>8s} {'new ms':>8s} {'new/old':>8s}")
    for k in samples["old"]:
        o = statistics.median(samples["old"][k]) * 1e3
        n = statistics.median(samples["new"][k]) * 1e3
        print(f"{k:40s} {o:8.3f} {n:8.3f} {n / o:8.3f}")


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        main(sys.argv[1], sys.argv[2])
