#!/usr/bin/env python3
"""Per-step cost of synchronized batch norm over MPI: `python bench/sync.py` launches
`mpirun -n P` for each P of --ranks and prints one table (and bench/results/sync.{json,txt}).
Each rank times one training step of SyncBatchNorm (forward + backward) on its shard, split
into the time inside its two collectives (the forward allgather, the backward allreduce,
waiting for the other ranks included) and the rest (the local kernels: statistics, forward
with the merged statistics, backward_reduce, backward_elemt, and the Python around them),
next to a plain BatchNorm step on the same shard; and the bare collectives at this P:
allgather of P x (2C+4) float64 values vs allreduce of 2C+2. Medians over --reps steps, each
started by a barrier; a step counts as long as its slowest rank."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    from mpi4py import MPI

    import batchnorm as bn
    from batchnorm._collectives import MpiEngine
    from batchnorm.distributed import SyncBatchNorm

    class TimedEngine(MpiEngine):
        """The layer's engine, adding up the time spent inside its collectives (waiting for
        the other ranks included: that wait is part of what synchronization costs)."""

        spent = 0.0

        def allgather(self, buf, device=None):
            t = time.perf_counter()
            try:
                return super().allgather(buf, device)
            finally:
                self.spent += time.perf_counter() - t

        def allreduce(self, buf, device=None):
            t = time.perf_counter()
            try:
                return super().allreduce(buf, device)
            finally:
                self.spent += time.perf_counter() - t

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bn.set_num_threads(1)  # oversubscribed already: one thread per rank
    bare = MpiEngine(comm)
    rows = []
    for spec in args.shapes.split(","):
        shape = tuple(int(s) for s in spec.split("x"))
        C = shape[1]
        rng = np.random.default_rng(rank)
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        plain, sync = bn.BatchNorm(C), SyncBatchNorm(C, group=comm)
        engine = sync._engine = TimedEngine(comm)
        row_g, row_r = np.zeros(2 * C + 4), np.zeros(2 * C + 2)

        def timed(fn):
            """This rank's seconds for fn, started together by a barrier."""
            comm.Barrier()
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def step(layer):
            layer(x)
            layer.backward(dy)

        samples = {k: [] for k in ("plain", "sync", "collective", "bare_gather", "bare_reduce")}
        for r in range(args.warmup + args.reps):
            engine.spent = 0.0
            mine = {
                "plain": timed(lambda: step(plain)),
                "sync": timed(lambda: step(sync)),
                "collective": engine.spent,
                "bare_gather": timed(lambda: bare.allgather(row_g)),
                "bare_reduce": timed(lambda: bare.allreduce(row_r)),
            }
            every = comm.allgather(mine)
            if r >= args.warmup:
                # A step lasts as long as its slowest rank; the collective share is that rank's.
                slow = max(range(size), key=lambda i: every[i]["sync"])
                for k in ("plain", "sync", "bare_gather", "bare_reduce"):
                    samples[k].append(max(e[k] for e in every))
                samples["collective"].append(every[slow]["collective"])
        if rank == 0:
            med = {k: float(np.median(v)) * 1e6 for k, v in samples.items()}
            med["local"] = med["sync"] - med["collective"]
            rows.append({"ranks": size, "shape": list(shape), "channels": C, **{k + "_us": v for k, v in med.items()}})
    if rank == 0:
        print(json.dumps(rows), flush=True)


def driver(args: argparse.Namespace) -> int:
    import shutil

    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if not os.access(mpirun, os.X_OK):
        mpirun = shutil.which("mpirun") or sys.exit("mpirun not found: pip install 'batchnorm[mpi]'")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               OMPI_MCA_mpi_yield_when_idle="1")
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "unknown"
    rows = []
    for p in (int(s) for s in args.ranks.split(",")):
        cmd = [mpirun, "-n", str(p), "--oversubscribe", sys.executable, os.path.abspath(__file__), "--worker",
               "--shapes", args.shapes, "--reps", str(args.reps), "--warmup", str(args.warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), platform.processor())
    lines = [
        f"# SyncBatchNorm step over MPI (Open MPI, shared memory), float32, 1 thread per rank, on {cpu} "
        f"({os.cpu_count()} CPUs): ranks > CPUs are oversubscribed. Medians of {args.reps} steps (us), slowest rank.",
        f"Load average before the run: {load}.",
        "| ranks | shard (N,C,H,W) | plain step | sync step | local (kernels + Python) | in collectives "
        "| bare allgather P(2C+4) | bare allreduce 2C+2 | sync / plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {'x'.join(map(str, r['shape']))} | {r['plain_us']:.0f} | {r['sync_us']:.0f} | "
            f"{r['local_us']:.0f} | {r['collective_us']:.0f} | {r['bare_gather_us']:.0f} | "
            f"{r['bare_reduce_us']:.0f} | {r['sync_us'] / r['plain_us']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sync.json"), "w") as f:
        json.dump({"cpu": cpu, "load_average": load, "reps": args.reps, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "sync.txt"), "w") as f:
        f.write(text + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4,8")
    ap.add_argument("--shapes", default="8x64x28x28,32x256x7x7,4x1024x4x4", help="per-rank shard shapes NxCxHxW")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
