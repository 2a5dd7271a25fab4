"""The training loop of the paper reproduction: one seeded SGD run (train), and several runs in
worker processes (run_all) that report their steps to a progress bar."""
from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

import batchnorm

from .data import Dataset
from .kernels import worker_environment
from .mlp import MLP
from .progress import ProgressBar

HIDDEN = (100, 100, 100)  # the paper: 3 fully connected hidden layers of 100 sigmoid units
BATCH = 60  # the paper's mini-batch size
PROBE_UNIT = 0  # the sigmoid of the last hidden layer whose input Figure 1 (b, c) follows
PERCENTILES = (15, 50, 85)
EVAL_POINTS = 200  # evenly spaced evaluations per run: the resolution of the curves
TRAIN_EVAL_SIZE = 1000  # training images scored at each evaluation, for the overfitting curve


@dataclass(frozen=True)
class RunConfig:
    name: str
    batch_norm: bool
    lr: float
    init_std: float
    steps: int
    seed: int


@dataclass
class RunResult:
    config: RunConfig
    steps: List[int] = field(default_factory=list)
    test_accuracy: List[float] = field(default_factory=list)
    train_accuracy: List[float] = field(default_factory=list)  # on TRAIN_EVAL_SIZE images
    probe_percentiles: List[List[float]] = field(default_factory=list)  # PERCENTILES per step
    final_train_accuracy: float = float("nan")  # on the whole training set
    diverged_at: Optional[int] = None  # the step where the arithmetic overflowed, if it did
    seconds: float = 0.0

    @property
    def final_test_accuracy(self) -> float:
        return self.test_accuracy[-1]


def eval_steps(steps: int) -> List[int]:
    """Step 0, up to EVAL_POINTS evenly spaced steps up to `steps`, and a geometric series
    that resolves the first few hundred steps, where the runs part (figure 2 has log axes).
    Short runs evaluate at most every 5th step, so that evaluation does not dominate them."""
    points = max(1, min(EVAL_POINTS, steps // 5))
    even = {round(steps * k / points) for k in range(points + 1)}
    early = {int(s) for s in np.unique(np.round(np.geomspace(1, steps, points // 5 + 2)))}
    return sorted(even | early)


def train(config: RunConfig, data: Dataset, report: Optional[Callable[[int], None]] = None) -> RunResult:
    """Trains one network with plain SGD on mini-batches of BATCH and evaluates it at
    eval_steps(config.steps). Deterministic given config.seed: the seed draws the initial
    weights and the order of the mini-batches, identically with and without batch norm."""
    start = time.perf_counter()
    init_rng = np.random.default_rng([config.seed, 0])
    batch_rng = np.random.default_rng([config.seed, 1])
    sizes = (data.train_x.shape[1],) + HIDDEN + (data.num_classes,)
    model = MLP(sizes, batch_norm=config.batch_norm, init_std=config.init_std, rng=init_rng)
    result = RunResult(config)
    train_probe = np.random.default_rng(0).permutation(len(data.train_y))[:TRAIN_EVAL_SIZE]
    checkpoints = eval_steps(config.steps)
    next_eval = 0
    order = np.empty(0, dtype=np.int64)
    position = 0
    report_every = max(1, config.steps // 100)

    def evaluate(step: int) -> bool:
        """Records the curves at `step`; False when the network computes non-finite values."""
        with np.errstate(all="ignore"):  # a diverged network is detected below, not warned about
            predicted, last_hidden = model.predict(data.test_x)
            predicted_train, _ = model.predict(data.train_x[train_probe])
        if not np.isfinite(last_hidden).all():
            return False
        result.steps.append(step)
        result.test_accuracy.append(float(np.mean(predicted == data.test_y)))
        result.train_accuracy.append(float(np.mean(predicted_train == data.train_y[train_probe])))
        result.probe_percentiles.append([float(v) for v in np.percentile(last_hidden[:, PROBE_UNIT], PERCENTILES)])
        return True

    for step in range(config.steps + 1):
        if step == checkpoints[next_eval]:
            if not evaluate(step):
                result.diverged_at = step
                break
            next_eval += 1
        if report is not None and (step % report_every == 0 or step == config.steps):
            report(step)
        if step == config.steps:
            break
        if position + BATCH > len(order):  # a new epoch: a fresh permutation, last partial batch dropped
            order = batch_rng.permutation(len(data.train_y))
            position = 0
        batch = order[position : position + BATCH]
        position += BATCH
        # An overflow or a non-finite loss means that the run has diverged: stop it there
        # rather than train on garbage (and rather than let NumPy warn at every step).
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            try:
                loss = model.sgd_step(data.train_x[batch], data.train_y[batch], config.lr)
            except FloatingPointError:
                loss = float("nan")
        if not np.isfinite(loss):
            result.diverged_at = step + 1
            break
    if result.diverged_at is not None:
        # A diverged network predicts nothing: score it at chance for the rest of the curve.
        chance = 1.0 / data.num_classes
        for step in checkpoints[next_eval:]:
            result.steps.append(step)
            result.test_accuracy.append(chance)
            result.train_accuracy.append(chance)
            result.probe_percentiles.append([float("nan")] * len(PERCENTILES))
        result.final_train_accuracy = chance
        if report is not None:
            report(config.steps)
    else:
        predicted, _ = model.predict(data.train_x)
        result.final_train_accuracy = float(np.mean(predicted == data.train_y))
    result.seconds = time.perf_counter() - start
    return result


# ---- worker processes ------------------------------------------------------------------------
# The runs are independent, so they go to one process per core, spawned under the environment of
# kernels.worker_environment(): one thread each, and the same BLAS and NumPy kernels on every CPU
# with AVX2 and FMA, so that the results do not depend on the machine.
_worker_data: Optional[Dataset] = None
_worker_queue = None


def _worker_init(data: Dataset, progress_queue) -> None:
    global _worker_data, _worker_queue
    # A Ctrl-C reaches the whole process group; the parent alone handles it (it ends the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    batchnorm.set_num_threads(1)
    _worker_data, _worker_queue = data, progress_queue


def _worker_run(index: int, config: RunConfig) -> RunResult:
    return train(config, _worker_data, report=lambda step: _worker_queue.put((index, step)))


def run_all(configs: Sequence[RunConfig], data: Dataset, *, workers: int, progress: Optional[ProgressBar] = None) -> List[RunResult]:
    """Trains every configuration in `workers` single-threaded processes with pinned kernels
    (0: in this process, with the batch-norm kernels on one thread and whatever BLAS and NumPy
    kernels it loaded). Results come back in the order of `configs`; they do not depend on the
    scheduling."""
    if workers <= 0:
        threads = batchnorm.get_num_threads()
        batchnorm.set_num_threads(1)
        try:
            return [train(c, data, report=(lambda s, i=i: progress.update(i, s)) if progress else None)
                    for i, c in enumerate(configs)]
        finally:
            batchnorm.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    env = worker_environment()
    saved = {k: os.environ.get(k) for k in env}
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:  # a Pool starts all its workers in its constructor, under the environment above
        pool = context.Pool(min(workers, len(configs)), initializer=_worker_init, initargs=(data, progress_queue))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    with pool:
        pending = [pool.apply_async(_worker_run, (i, c)) for i, c in enumerate(configs)]
        while True:
            try:
                index, step = progress_queue.get(timeout=0.1)
            except queue.Empty:
                if progress is not None:
                    progress.tick()
                if all(p.ready() for p in pending):
                    break
                continue
            if progress is not None:
                progress.update(index, step)
        results = [p.get() for p in pending]
    if progress is not None:  # the last reports may still be in the queue's pipe: close the runs
        for index, config in enumerate(configs):
            progress.update(index, config.steps)
    return results
