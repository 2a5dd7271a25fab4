#!/usr/bin/env python3
"""Per-step cost of synchronized batch norm: `python bench/sync.py` launches `mpirun -n P` for
each P of --ranks and prints one table (and bench/results/sync.{json,txt}); with
--engine torch, P gloo ranks (torch.multiprocessing) running batchnorm.torch's layers with
autograd (bench/results/sync-torch.{json,txt}).
Each rank times one training step of SyncBatchNorm (forward + backward) on its shard, split
into the time inside its two collectives (the forward allgather, the backward allreduce,
waiting for the other ranks included) and the rest (the local kernels: statistics, forward
with the merged statistics, backward_reduce, backward_elemt, and the Python around them),
next to a plain BatchNorm step on the same shard; and the bare collectives at this P:
allgather of P x (2C+4) float64 values vs allreduce of 2C+3. Medians over --reps steps, each
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


def _timed_engine(base: type) -> type:
    class TimedEngine(base):
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

    return TimedEngine


def _measure(args, rank, size, barrier, gather_objects, bare, layers) -> list:
    """The timing loop shared by both engines. layers(shape) -> (plain step, sync step, the
    sync layer's timed engine)."""
    import numpy as np

    rows = []
    for spec in args.shapes.split(","):
        shape = tuple(int(s) for s in spec.split("x"))
        C = shape[1]
        plain, sync, engine = layers(shape)
        row_g, row_r = np.zeros(2 * C + 4), np.zeros(2 * C + 3)

        def timed(fn):
            """This rank's seconds for fn, started together by a barrier."""
            barrier()
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        samples = {k: [] for k in ("plain", "sync", "collective", "bare_gather", "bare_reduce")}
        for r in range(args.warmup + args.reps):
            engine.spent = 0.0
            mine = {
                "plain": timed(plain),
                "sync": timed(sync),
                "collective": engine.spent,
                "bare_gather": timed(lambda: bare.allgather(row_g)),
                "bare_reduce": timed(lambda: bare.allreduce(row_r)),
            }
            every = gather_objects(mine)
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
    return rows


def worker(args: argparse.Namespace) -> None:
    """One MPI rank: the NumPy layers (batchnorm.BatchNorm / batchnorm.distributed.SyncBatchNorm)."""
    import numpy as np
    from mpi4py import MPI

    import batchnorm as bn
    from batchnorm._collectives import MpiEngine
    from batchnorm.distributed import SyncBatchNorm

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bn.set_num_threads(1)  # oversubscribed already: one thread per rank

    def layers(shape):
        C = shape[1]
        rng = np.random.default_rng(rank)
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        plain, sync = bn.BatchNorm(C), SyncBatchNorm(C, group=comm)
        engine = sync._engine = _timed_engine(MpiEngine)(comm)

        def step(layer):
            layer(x)
            layer.backward(dy)

        return (lambda: step(plain)), (lambda: step(sync)), engine

    rows = _measure(args, rank, size, comm.Barrier, comm.allgather, MpiEngine(comm), layers)
    if rank == 0:
        print(json.dumps(rows), flush=True)


def torch_worker(rank: int, size: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    """One gloo rank (torch.multiprocessing.spawn): batchnorm.torch.BatchNorm2d against
    batchnorm.torch.SyncBatchNorm, forward + autograd backward."""
    import torch
    import torch.distributed as dist

    import batchnorm as bn
    import batchnorm.torch as bt
    from batchnorm._collectives import TorchEngine

    torch.set_num_threads(1)
    bn.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)

    def layers(shape):
        C = shape[1]
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(shape, generator=gen).requires_grad_()
        dy = torch.randn(shape, generator=gen)
        plain, sync = bt.BatchNorm2d(C), bt.SyncBatchNorm(C)
        engine = _timed_engine(TorchEngine)(None)
        sync._engine = (dist.group.WORLD, engine)

        def step(layer):
            layer(x).backward(dy)

        return (lambda: step(plain)), (lambda: step(sync)), engine

    def gather_objects(obj):
        every = [None] * size
        dist.all_gather_object(every, obj)
        return every

    try:
        rows = _measure(args, rank, size, dist.barrier, gather_objects, TorchEngine(None), layers)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def _run_torch(p: int, args: argparse.Namespace) -> list:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(torch_worker, args=(p, os.path.join(tmp, "rdv"), args, out), nprocs=p)
        with open(out) as f:
            return json.load(f)


def driver(args: argparse.Namespace) -> int:
    import shutil

    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if args.engine == "mpi" and not os.access(mpirun, os.X_OK):
        mpirun = shutil.which("mpirun") or sys.exit("mpirun not found: pip install 'batchnorm[mpi]'")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               OMPI_MCA_mpi_yield_when_idle="1")
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "unknown"
    rows = []
    for p in (int(s) for s in args.ranks.split(",")):
        if args.engine == "torch":
            rows += _run_torch(p, args)
            continue
        cmd = [mpirun, "-n", str(p), "--oversubscribe", sys.executable, os.path.abspath(__file__), "--worker",
               "--shapes", args.shapes, "--reps", str(args.reps), "--warmup", str(args.warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), platform.processor())
    how = ("batchnorm.torch.SyncBatchNorm vs BatchNorm2d over torch.distributed gloo (autograd)"
           if args.engine == "torch" else "SyncBatchNorm vs BatchNorm over MPI (Open MPI, shared memory)")
    lines = [
        f"# {how}, float32, 1 thread per rank, on {cpu} "
        f"({os.cpu_count()} CPUs): ranks > CPUs are oversubscribed. Medians of {args.reps} steps (us), slowest rank.",
        f"Load average before the run: {load}.",
        "| ranks | shard (N,C,H,W) | plain step | sync step | local (kernels + Python) | in collectives "
        "| bare allgather P(2C+4) | bare allreduce 2C+3 | sync / plain |",
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
    name = "sync" if args.engine == "mpi" else "sync-torch"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"cpu": cpu, "load_average": load, "reps": args.reps, "engine": args.engine, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, f"{name}.txt"), "w") as f:
        f.write(text + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4,8")
    ap.add_argument("--engine", choices=("mpi", "torch"), default="mpi",
                    help="mpi: the NumPy layers under mpirun; torch: batchnorm.torch's under gloo")
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
