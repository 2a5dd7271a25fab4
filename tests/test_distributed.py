"""Synchronized batch norm across real processes: torch.distributed with gloo (2 and 3
ranks started by torch.multiprocessing.spawn, file:// rendezvous) and MPI (mpirun -n 3,
oversubscribed), each rank checked against the single-process layer on the whole batch by
tests/dist_worker.py (tolerances there: 2e-5 float32, 1e-12 float64, relative to the
output's scale; running statistics bitwise equal across ranks). Bad input on one rank must
raise on every rank: every run has a deadline, so a hang fails instead of blocking CI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DEADLINE_S = 240  # generous for a loaded 2-core machine; a healthy run takes ~10-30 s


def test_import_batchnorm_imports_no_engine():
    code = "import sys, batchnorm, batchnorm.distributed; print(sorted({'mpi4py', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_group_of_the_wrong_type_is_a_type_error():
    from batchnorm.distributed import SyncBatchNorm, sync_statistics

    with pytest.raises(TypeError, match="group must be an mpi4py communicator .* got str"):
        SyncBatchNorm(3, group="world")
    with pytest.raises(TypeError, match="group must be an mpi4py communicator .* got int"):
        sync_statistics(__import__("numpy").zeros((2, 3)), 0)


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize(
    "sizes,default_group", [((1, 9), False), ((5, 0, 7), True)], ids=["2-ranks-1-9-new-group", "3-ranks-5-0-7-default"]
)
def test_torch_gloo(tmp_path, sizes, default_group):
    pytest.importorskip("torch")
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    sys.path.insert(0, str(HERE))
    try:
        import dist_worker
    finally:
        sys.path.remove(str(HERE))
    ctx = mp.spawn(dist_worker.torch_main, args=(len(sizes), str(tmp_path / "rendezvous"), sizes, default_group),
                   nprocs=len(sizes), join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"gloo ranks still running after {DEADLINE_S} s (a collective hangs)")


def _mpirun() -> str:
    for candidate in (Path(sys.executable).parent / "mpirun", shutil.which("mpirun")):
        if candidate and os.access(str(candidate), os.X_OK):
            return str(candidate)
    pytest.skip("mpirun is not installed (pip install 'batchnorm[mpi]')")


@pytest.mark.slow
def test_mpi_three_ranks():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'batchnorm[mpi]')")
    mpirun = _mpirun()
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               OMPI_MCA_mpi_yield_when_idle="1", PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    # Uneven shards with an empty one, and two empty ranks around a full one.
    cmd = [mpirun, "-n", "3", "--oversubscribe", sys.executable, str(HERE / "dist_worker.py"), "5,0,7", "0,12,0"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"mpirun still running after {DEADLINE_S} s (a collective hangs): {err.stdout}{err.stderr}")
    assert out.returncode == 0, f"mpirun failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    assert sorted(line for line in out.stdout.splitlines() if line.endswith(": ok")) == [
        f"rank {r} of 3: ok" for r in range(3)
    ], out.stdout
