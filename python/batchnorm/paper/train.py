"""The training loop of the paper reproduction: one seeded SGD run (train), several runs in
worker processes (run_all), and the plain-text progress bar they report to on stderr."""
from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, TextIO

import numpy as np

import batchnorm

from .data import Dataset
from .mlp import MLP

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


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal; elsewhere (a log, a pipe) a line
    per finished run, so that logs stay readable."""

    def __init__(self, totals: Sequence[int], names: Sequence[str], stream: TextIO = sys.stderr, width: int = 30):
        self.totals = list(totals)
        self.names = list(names)
        self.done = [0] * len(totals)
        self.finished = [False] * len(totals)
        self.stream = stream
        self.width = width
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, run: int, step: int) -> None:
        self.done[run] = step
        if step >= self.totals[run] and not self.finished[run]:
            self.finished[run] = True
            if not self.live:
                self.stream.write(f"  finished {self.names[run]} ({sum(self.finished)}/{len(self.totals)} runs, "
                                  f"{time.perf_counter() - self.start:.0f} s)\n")
                self.stream.flush()
        now = time.perf_counter()
        if self.live and (now - self._last_draw > 0.1 or all(self.finished)):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = sum(self.done) / max(1, sum(self.totals))
        filled = int(round(fraction * self.width))
        running = [n for n, d, f in zip(self.names, self.done, self.finished) if d > 0 and not f]
        line = (f"\r[{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:5.1f}%  "
                f"{sum(self.finished)}/{len(self.totals)} runs  {now - self.start:5.1f} s  {' '.join(running)}")
        columns = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be redrawn by \r
        self.stream.write(line[:columns].ljust(columns))
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


# ---- worker processes ------------------------------------------------------------------------
# The runs are independent, so they go to one process per core. Each worker is kept to one
# thread (BLAS and the batch-norm kernels): the arrays are 60 x 100, too small for threads to
# pay, and on a busy 2-core machine spinning thread teams of OpenBLAS and OpenMP stall each
# other for milliseconds per step. The thread limits must be in the environment before the
# worker imports NumPy, hence spawned workers and the variables below.
_SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
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
    """Trains every configuration in `workers` single-threaded processes (0: in this process,
    with the batch-norm kernels on one thread). Results come back in the order of `configs`;
    they do not depend on the scheduling."""
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
    saved = {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV}
    os.environ.update(_SINGLE_THREAD_ENV)
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
