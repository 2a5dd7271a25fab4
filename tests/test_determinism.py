"""Bitwise reproducibility: the same inputs give the same bits whatever the CPU thread count
(1, 2, 3), whatever the ISA level (BATCHNORM_ISA, compared across subprocesses), when four
Python threads call at once (the GIL is released around the native work), and from call to
call on every device."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import batchnorm as bn
import helpers


def bits(a) -> bytes:
    """The bytes of a NumPy array or a torch tensor (bfloat16 ones as raw 16-bit words)."""
    if type(a).__module__.startswith("torch"):
        import torch

        a = a.detach().cpu().contiguous()
        return (a.view(torch.int16) if a.dtype == torch.bfloat16 else a).numpy().tobytes()
    return np.ascontiguousarray(a).tobytes()


# Shapes that reach every CPU path: few channels with many values (several pieces per channel,
# grouped or channel-parallel depending on the thread count), many channels, channels-last,
# small 7x7 planes, odd sizes, and strides that do not merge.
CASES = {
    "few-channels-many-values": ((2, 3, 160, 160), 1, None),
    "many-channels": ((8, 256, 6, 6), 1, None),
    "channels-last": ((16, 12, 12, 24), -1, None),
    "7x7-planes": ((32, 64, 7, 7), 1, None),
    "7x7-rows-cut-by-blocks": ((200, 4, 7, 7), 1, None),
    "odd-sizes": ((5, 7, 1001), 1, None),
    # Rows of 361 values read side by side in tiles of 8 (kernels/moments.h): pieces of 8192
    # values cut a row, and each row ends in a partial vector.
    "rows-side-by-side": ((24, 3, 19, 19), 1, None),
    "odd-channels-last": ((4099, 11), -1, None),
    # 7 channels-last channels: under one vector, every op's channels one partial vector a
    # position (the reductions) or a flat run with a coefficient period of lcm(7, lanes): 112
    # values for float32 and the half types, 56 for float64 (the maps).
    "narrow-channels-last": ((40, 9, 9, 7), -1, None),
    # Rows wider than a register tile: blocks of positions, and two runs per group.
    "wide-channels-last": ((18000, 136), 1, None),
    # Few positions, many channels: one group, its channels cut into blocks by the thread count
    # (2 and 3 threads cut them differently; runs of 31 positions, as the whole row takes).
    "few-positions-wide-channels-last": ((40, 2056), 1, None),
    # 8 groups of positions: on 3 threads the wide rows are also halved to even the load.
    "uneven-groups-wide-channels-last": ((450, 2056), 1, None),
    # Planes of 9 values walked as channels-last rows of 2700, cut into blocks likewise.
    "tiny-planes": ((48, 300, 3, 3), 1, None),
    "middle-axis-odd": ((3, 5, 17, 131), 2, None),
    "sliced": ((4, 6, 64, 130), 1, (slice(None), slice(None), slice(None), slice(None, None, 2))),
}


def case_input(name: str, dtype: str = "float32"):
    shape, axis, index = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    x = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if index is not None:
        x, dy = x[index], dy[index]
    return x, dy, axis


def residual_of(dy, axis):
    """The fused ops' residual: dy with its last channel -0 (a copy; NumPy arrays or torch tensors)."""
    if type(dy).__module__.startswith("torch"):
        r = dy.clone()
        r.movedim(axis, 0)[-1] = -0.0
        return r
    r = dy.copy()
    np.moveaxis(r, axis, 0)[-1] = -0.0
    return r


def run_all(x, dy, axis) -> list:
    """Every op's outputs as bytes, the fused ops' included."""
    C = x.shape[axis]
    w = np.linspace(0.5, 2, C)
    b = np.linspace(-1, 1, C).astype(np.float32)
    # A pruned channel (weight -0) and a -0 bias: the values of a row's tail that some ISA
    # levels map one by one and others as a vector must still get the same signed zeros. The
    # last channel has both, and the fused ops' residual is -0 there: relu's inputs are
    # signed zeros (relu(-0) = -0).
    w[-1] = -0.0
    b[0] = -0.0
    b[-1] = -0.0
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    mean, var, _ = bn.statistics(x, axis=axis)
    y, smean, sinvstd = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis)
    yi = bn.forward_inference(x, mean, var, w, b, axis=axis)
    dx, dw, db = bn.backward(dy, x, smean, sinvstd, w, axis=axis)
    # The fused ops, y = relu(bn(x) + r), and their gradients.
    r = residual_of(dy, axis)
    fy, _, _ = bn.forward_training(x, w, b, residual=r, activation="relu", axis=axis)
    fyi = bn.forward_inference(x, mean, var, w, b, residual=r, activation="relu", axis=axis)
    fdx, fdw, fdb, fdr = bn.backward(dy, x, smean, sinvstd, w, axis=axis, y=fy, activation="relu", residual=True)
    return [bits(a) for a in (mean, var, y, smean, sinvstd, rm, rv, yi, dx, dw, db, fy, fyi, fdx, fdw, fdb, fdr)]


# float32 on every shape; half and double on a representative subset.
THREAD_CASES = [(name, "float32") for name in CASES] + [
    (name, dtype) for dtype in ("float16", "float64") for name in ("few-channels-many-values", "channels-last", "odd-sizes", "7x7-rows-cut-by-blocks")
]


@pytest.mark.parametrize("name,dtype", THREAD_CASES)
def test_thread_count_does_not_change_bits(name, dtype, restore_threads):
    x, dy, axis = case_input(name, dtype)
    results = {}
    for n in (1, 2, 3):
        bn.set_num_threads(n)
        assert bn.get_num_threads() == n
        results[n] = run_all(x, dy, axis)
    names = ["mean", "var", "y", "saved_mean", "saved_invstd", "running_mean", "running_var", "y_inference", "dx",
             "dweight", "dbias", "fused_y", "fused_y_inference", "fused_dx", "fused_dweight", "fused_dbias",
             "fused_dresidual"]
    for n in (2, 3):
        differ = [k for k, a, b in zip(names, results[1], results[n]) if a != b]
        assert not differ, f"{n} threads differ from 1 thread in {differ}"


def test_a_huge_thread_count_runs_on_a_capped_team():
    """set_num_threads(65536) with 70000 channels: libgomp could not create the team and ended
    the process ("Thread creation failed", exit 1) on a 2-CPU machine; teams are now capped at
    max(256, 8 x usable CPUs), with the same bits (in a subprocess: a failure ends it)."""
    script = ("import numpy as np, batchnorm as bn\n"
              "x = np.random.default_rng(0).random((2, 70000, 4), np.float32)\n"
              "ref = bn.statistics(x)\n"
              "bn.set_num_threads(65536)\n"
              "assert bn.get_num_threads() == 65536\n"
              "got = bn.statistics(x)\n"
              "assert all(a.tobytes() == b.tobytes() for a, b in zip(ref[:2], got[:2]))\n"
              "print('same bits')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (0, "same bits\n"), done.stderr


# Every case in every dtype (bfloat16 where torch can make it), clean and with a NaN and an
# Inf in two channels (test_nonfinite checks what those must give; here, the same bits).
ISA_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import batchnorm as bn
import test_determinism as td
try:
    import torch
except ImportError:
    torch = None

def as_dtype(a, dtype):
    if dtype != "bfloat16":
        return a.astype(dtype)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)

def poisoned(x, axis):
    x = np.array(x, dtype=np.float64)  # a C-ordered copy, poisoned through a view of it
    lead = np.moveaxis(x, axis, 0)
    lead[(1,) + tuple(n - 1 for n in lead.shape[1:])] = np.nan
    lead[(2,) + (0,) * (lead.ndim - 1)] = np.inf
    return x

digest = hashlib.sha256()
dtypes = ["float32", "float16", "float64"] + (["bfloat16"] if torch is not None else [])
for name in td.CASES:
    for dtype in dtypes:
        x64, dy64, axis = td.case_input(name, "float64")
        # NumPy dtypes keep the case's strided view; torch makes bfloat16 from a copy.
        clean = td.case_input(name, dtype) if dtype != "bfloat16" else (as_dtype(x64, dtype), as_dtype(dy64, dtype), axis)
        for x, dy, axis in (clean, (as_dtype(poisoned(x64, axis), dtype), as_dtype(dy64, dtype), axis)):
            for chunk in td.run_all(x, dy, axis):
                digest.update(chunk)
if torch is not None:
    # bfloat16 outputs around and below float32's smallest normal (weights 2^-118 ... 2^-146):
    # the avx512_bf16 level's conversion instruction flushes subnormals, its kernels must not.
    # NCHW short rows (a vector's lanes share a weight), NCHW rows of 100 values (a 4-value
    # tail, one masked vector at the AVX-512 levels) and NHWC rows (lanes of different weights).
    rng = np.random.default_rng(7)
    for shape, axis in (((4, 16, 7, 7), 1), ((4, 16, 10, 10), 1), ((6, 5, 5, 48), -1)):
        C = shape[axis]
        x, dy = (as_dtype(rng.standard_normal(shape), "bfloat16") for _ in range(2))
        w = 2.0 ** -np.linspace(118, 146, C)
        y, m, s = bn.forward_training(x, w, None, axis=axis)
        yi = bn.forward_inference(x, np.zeros(C), np.ones(C), w, None, axis=axis)
        dx, _, _ = bn.backward(dy, x, m, s, w, axis=axis)
        for a in (y, yi, dx):
            digest.update(td.bits(a))
print(json.dumps({"simd": bn.info()["simd"], "digest": digest.hexdigest(), "dtypes": dtypes}))
"""


def run_with_isa(level: str) -> dict:
    env = dict(os.environ, BATCHNORM_ISA=level)
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", ISA_SCRIPT, here], env=env, capture_output=True, text=True,
                          timeout=120, cwd=here)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_isa_levels_give_identical_bits():
    results = {level: run_with_isa(level) for level in helpers.ISA_LEVELS}
    assert results["baseline"]["simd"] == "baseline", "BATCHNORM_ISA=baseline must select the baseline kernels"
    reached = {level: r for level, r in results.items() if r["simd"] == level}
    if len(reached) < 2:
        pytest.skip(f"this CPU offers only {sorted(reached)}: nothing to compare")
    digests = {level: r["digest"] for level, r in reached.items()}
    assert len(set(digests.values())) == 1, f"ISA levels disagree: {digests}"


def test_concurrent_python_threads_match_serial(restore_threads):
    bn.set_num_threads(2)
    inputs = [case_input(name) for name in ("few-channels-many-values", "channels-last", "7x7-planes", "odd-sizes")]
    serial = [run_all(*args) for args in inputs]

    def worker(i):
        return [run_all(*inputs[(i + k) % len(inputs)]) for k in range(6)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(worker, range(4)))
    for i, outcome in enumerate(outcomes):
        for k, result in enumerate(outcome):
            assert result == serial[(i + k) % len(inputs)], f"thread {i}, call {k} differs from the serial result"


def test_repeated_calls_are_identical():
    x, dy, axis = case_input("channels-last")
    assert run_all(x, dy, axis) == run_all(x, dy, axis)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", helpers.dtype_params())
@pytest.mark.parametrize("xp", helpers.lib_params())
def test_repeated_calls_are_identical_on_every_device(rng, xp, dtype, channels_last):
    """Shapes with many split work items (blocks of a channel on CUDA, groups on the CPU): the
    partial results are combined in a fixed order, never by atomics."""
    shape, axis = ((16, 64, 48, 8), -1) if channels_last else ((16, 3, 96, 128), 1)
    x = helpers.cast(rng.standard_normal(shape) + 5, dtype, xp)
    dy = helpers.cast(rng.standard_normal(shape), dtype, xp)
    runs = []
    for _ in range(2):
        y, m, s = bn.forward_training(x, axis=axis)
        mean, var, _ = bn.statistics(x, axis=axis)
        dx, dw, db = bn.backward(dy, x, m, s, axis=axis)
        runs.append([helpers.bits(a) for a in (y, m, s, mean, var, dx, dw, db)])
    assert runs[0] == runs[1]


def test_digest_helper_sees_differences():
    """The comparisons above would notice a one-ulp change."""
    x, dy, axis = case_input("odd-sizes")
    a = run_all(x, dy, axis)
    x2 = x.copy()
    x2.flat[17] = np.nextafter(x2.flat[17], np.float32(np.inf))
    b = run_all(x2, dy, axis)
    assert hashlib.sha256(b"".join(a)).digest() != hashlib.sha256(b"".join(b)).digest()


@pytest.mark.parametrize("shape", [(200, 20, 7, 7), (40, 35, 5, 5), (9, 18, 13, 13)])
@pytest.mark.parametrize("dtype", helpers.dtype_params())
def test_a_channel_does_not_depend_on_its_neighbours(rng, dtype, shape):
    """The CPU walks small planes of channels-first data row by row across a block of channels
    (memory order): each channel's results must be the bits it gets alone, whichever block it
    falls in. Shapes whose channels span several reduction pieces cut mid-row, and channel
    counts that fill one block of 16 and part of another."""
    x = helpers.cast(rng.standard_normal(shape) * 3 + 10, dtype)
    dy = helpers.cast(rng.standard_normal(shape), dtype)
    C = shape[1]
    w = np.linspace(0.5, 2, C).astype(np.float32)
    b = np.linspace(-1, 1, C).astype(np.float32)
    mean, var, _ = bn.statistics(x, axis=1)
    y, sm, si = bn.forward_training(x, w, b, axis=1)
    yi = bn.forward_inference(x, mean, var, w, b, axis=1)
    dx, dw, db = bn.backward(dy, x, sm, si, w, axis=1)
    for c0, c1 in ((0, 1), (5, 6), (C - 1, C), (3, C - 2)):
        xs, dys = x[:, c0:c1], dy[:, c0:c1]
        m1, v1, _ = bn.statistics(xs, axis=1)
        y1, sm1, si1 = bn.forward_training(xs, w[c0:c1], b[c0:c1], axis=1)
        yi1 = bn.forward_inference(xs, m1, v1, w[c0:c1], b[c0:c1], axis=1)
        dx1, dw1, db1 = bn.backward(dys, xs, sm1, si1, w[c0:c1], axis=1)
        whole = (mean[c0:c1], var[c0:c1], y[:, c0:c1], sm[c0:c1], si[c0:c1], yi[:, c0:c1], dx[:, c0:c1],
                 dw[c0:c1], db[c0:c1])
        alone = (m1, v1, y1, sm1, si1, yi1, dx1, dw1, db1)
        for name, a, s in zip(("mean", "var", "y", "saved_mean", "saved_invstd", "y_inference", "dx", "dweight",
                               "dbias"), whole, alone):
            assert helpers.bits(a) == helpers.bits(s), f"channels [{c0}, {c1}): {name} differs from the slice's"


_FORK_CHILD = """
import multiprocessing as mp, os, sys
import numpy as np
import batchnorm as bn
bn.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((64, 32, 16, 16)).astype(np.float32)
want = bn.forward_training(x)[0]  # an OpenMP team of 2 in the parent

def child(conn):
    conn.send((bn.get_num_threads(), bool(np.array_equal(bn.forward_training(x)[0], want))))

if __name__ == "__main__":
    parent, end = mp.Pipe()
    p = mp.get_context("fork").Process(target=child, args=(end,))
    p.start()
    if not parent.poll(60):
        p.kill()
        sys.exit("the fork child hung in its first call")
    print(*parent.recv())
    p.join()
"""


def test_a_fork_child_runs_the_kernels_on_one_thread(tmp_path):
    """libgomp cannot start a team in the child of a process that ran one: the child's first
    parallel region hung (a torch DataLoader worker after a training step)."""
    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_CHILD)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1", "True"]
