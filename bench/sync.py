#!/usr/bin/env python3
"""Per-step cost of synchronized batch norm over MPI: `python bench/sync.py` launches
`mpirun -n P` for each P of --ranks and prints one table (and bench/results/sync.{json,txt}).
Each rank times one training step of SyncBatchNorm (forward + backward) on its shard, split
into the local kernels (statistics, forward with the merged statistics, backward_reduce,
backward_elemt) and the two collectives (the forward allgather with its rank-order merge,
the backward allreduce), next to a plain BatchNorm step on the same shard; and the bare
collectives at this P: allgather of P x (2C+4) float64 values vs allreduce of 2C+2.
Medians over --reps steps, each started by a barrier; the slowest rank's time per step."""
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
    from batchnorm import functional as F
    from batchnorm._collectives import MpiEngine
    from batchnorm.distributed import SyncBatchNorm, _exchange

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bn.set_num_threads(1)  # oversubscribed already: one thread per rank
    engine = MpiEngine(comm)
    rows = []
    for spec in args.shapes.split(","):
        shape = tuple(int(s) for s in spec.split("x"))
        C = shape[1]
        rng = np.random.default_rng(rank)
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        sync, plain = SyncBatchNorm(C, group=comm), bn.BatchNorm(C)

        def timed(fn):
            comm.Barrier()
            t = time.perf_counter()
            fn()
            mine = time.perf_counter() - t
            return comm.allreduce(mine, op=MPI.MAX)  # the step is as slow as its slowest rank

        def step(layer):
            layer(x)
            layer.backward(dy)

        parts = {"plain": [], "sync": [], "local": [], "gather": [], "reduce": [], "bare_gather": [], "bare_reduce": []}
        row_g = np.zeros(2 * C + 4)
        row_r = np.zeros(2 * C + 2)
        state = {}

        def local_kernels():
            mean, var, count = bn.statistics(x, dtype="float64")
            n = count * size
            y, m, s = F.forward_training(x, plain.weight, plain.bias, batch_statistics=(mean, var, n))
            s1, s2, dw, db = F.backward_reduce(dy, x, m, s)
            F.backward_elemt(dy, x, m, s, s1, s2, n, plain.weight)

        def forward_exchange():
            state["stats"] = _exchange(engine, x, 1, C, None)  # statistics + allgather + merge

        def forward_exchange_local_stats_only():
            bn.statistics(x, dtype="float64")

        for r in range(args.warmup + args.reps):
            record = r >= args.warmup
            values = {
                "plain": timed(lambda: step(plain)),
                "sync": timed(lambda: step(sync)),
                "local": timed(local_kernels),
                "gather": timed(forward_exchange) - timed(forward_exchange_local_stats_only),
                "reduce": timed(lambda: engine.allreduce(row_r)),
                "bare_gather": timed(lambda: engine.allgather(row_g)),
                "bare_reduce": timed(lambda: engine.allreduce(row_r)),
            }
            if record:
                for k, v in values.items():
                    parts[k].append(v)
        if rank == 0:
            med = {k: float(np.median(v)) * 1e6 for k, v in parts.items()}
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
        "| ranks | shard (N,C,H,W) | plain step | sync step | local kernels | allgather+merge | allreduce "
        "| bare allgather P(2C+4) | bare allreduce 2C+2 | sync / plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {'x'.join(map(str, r['shape']))} | {r['plain_us']:.0f} | {r['sync_us']:.0f} | "
            f"{r['local_us']:.0f} | {r['gather_us']:.0f} | {r['reduce_us']:.0f} | {r['bare_gather_us']:.0f} | "
            f"{r['bare_reduce_us']:.0f} | {r['sync_us'] / r['plain_us']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sync.json"), "w") as f:
        json.dump({"cpu": cpu, "rows": rows}, f, indent=1)
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
