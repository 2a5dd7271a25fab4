"""The figures of the paper reproduction: Figure 1 of Ioffe & Szegedy (2015) redrawn from our
runs, and a second figure for the learning-rate, initialization and overfitting runs. Uses
matplotlib's object API with the Agg canvas, so it never touches pyplot's global state."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .train import PERCENTILES, PROBE_UNIT, RunResult

DPI = 100
PLAIN_COLOR, BN_COLOR = "tab:gray", "tab:blue"
# Panels with several settings tell them apart by line style and marker, not by shade alone
# (legible in grayscale and for colour-blind readers); colour says without / with BN.
SETTING_STYLE = {
    "Baseline": {"linestyle": "-", "marker": "o"},
    "x5": {"linestyle": "--", "marker": "s"},
    "x30": {"linestyle": "-.", "marker": "^"},
    "init-x10": {"linestyle": "--", "marker": "D"},
}
MARKERS = 9  # per curve, evenly spaced on the log step axis
DIVERGED_STYLE = {"linestyle": ":", "linewidth": 1}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _accuracy(ax, result: RunResult, *, log: bool = False, **style) -> None:
    first = 1 if log and result.steps[0] == 0 else 0  # step 0 has no place on a log axis
    ax.plot(result.steps[first:], result.test_accuracy[first:], **style)
    if result.diverged_at is not None:
        ax.axvline(result.diverged_at, color=style.get("color"), **DIVERGED_STYLE)


def _log_marks(steps) -> list:
    """Indices of the evaluated steps nearest MARKERS points evenly spaced in log(step), for
    the curves of a log axis (which leave out step 0, hence the shift by one)."""
    steps = np.asarray(steps[1:] if steps[0] == 0 else steps, dtype=float)
    if len(steps) < 2:
        return list(range(len(steps)))
    targets = np.geomspace(steps[0], steps[-1], MARKERS)
    return sorted({int(np.abs(np.log(steps) - np.log(t)).argmin()) for t in targets})


def _setting(ax, results: Dict[str, RunResult], name: str, label) -> None:
    """Test accuracy of one setting without and with BN, in its own line style and marker."""
    for prefix, color in (("", PLAIN_COLOR), ("BN-", BN_COLOR)):
        r = results[prefix + name]
        _accuracy(ax, r, log=True, color=color, markevery=_log_marks(r.steps), markersize=5,
                  label=label(prefix + name, r), **SETTING_STYLE[name])


def _diverged_note(ax, runs) -> None:
    """A legend entry for the dotted line, only where a run of the panel diverged."""
    if any(r.diverged_at is not None for r in runs):
        ax.plot([], [], color="black", label="diverged at", **DIVERGED_STYLE)


def _percentiles(ax, result: RunResult, title: str) -> None:
    rows = np.array(result.probe_percentiles, dtype=float)
    for column, (p, width) in enumerate(zip(PERCENTILES, (1.0, 2.0, 1.0))):
        ax.plot(result.steps, rows[:, column], color="black", linewidth=width, label=f"{p}th")
    ax.set_title(title)
    ax.set_xlabel("training steps")
    ax.grid(alpha=0.3)


def figure1(results: Dict[str, RunResult], path: Path, data_name: str) -> Path:
    """(a) test accuracy without and with batch norm; (b, c) the 15th, 50th and 85th
    percentiles of the input to one sigmoid of the last hidden layer over the test images."""
    plain, bn = results["Baseline"], results["BN-Baseline"]
    fig = Figure(figsize=(12, 3.6))
    a, b, c = fig.subplots(1, 3)
    _accuracy(a, plain, color=PLAIN_COLOR, label="Without BN")
    _accuracy(a, bn, color=BN_COLOR, label="With BN")
    a.set_title("(a) test accuracy")
    a.set_xlabel("training steps")
    a.set_ylabel("test accuracy")
    a.set_ylim(0, 1)
    a.grid(alpha=0.3)
    _diverged_note(a, (plain, bn))
    a.legend(loc="lower right")
    _percentiles(b, plain, f"(b) without BN: sigmoid input, unit {PROBE_UNIT}")
    _percentiles(c, bn, f"(c) with BN: sigmoid input, unit {PROBE_UNIT}")
    values = np.array(plain.probe_percentiles + bn.probe_percentiles, dtype=float)
    values = values[np.isfinite(values)]  # a diverged run has no percentiles after it diverged
    if values.size:
        pad = 0.05 * (np.ptp(values) or 1)
        for ax in (b, c):  # one scale for both, as in the paper, so that the drifts compare
            ax.set_ylim(values.min() - pad, values.max() + pad)
    b.legend(loc="upper right", fontsize=8, title="percentile", title_fontsize=8)
    fig.suptitle(f"MNIST, 3 x 100 sigmoid units, lr {plain.config.lr:g} ({data_name})", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def figure2(results: Dict[str, RunResult], path: Path, data_name: str) -> Path:
    """(a) 5x and 30x the learning rate, (b) 10x the initial weight scale, each without and
    with batch norm; (c) train and test accuracy of the baseline pair: the overfitting gap.
    A dotted vertical line, with its legend entry, marks where a run diverged, if one did."""
    fig = Figure(figsize=(12, 3.8))
    a, b, c = fig.subplots(1, 3)
    for name in ("Baseline", "x5", "x30"):
        _setting(a, results, name, lambda label, r: f"{label} (lr {r.config.lr:g})")
    a.set_title("(a) learning rate x1, x5, x30")
    for name in ("Baseline", "init-x10"):
        _setting(b, results, name, lambda label, r: f"{label} (std {r.config.init_std:g})")
    b.set_title("(b) initial weights x10")
    for prefix, color in (("", PLAIN_COLOR), ("BN-", BN_COLOR)):
        r = results[prefix + "Baseline"]
        label = "BN" if prefix else "no BN"
        c.plot(r.steps, r.train_accuracy, color=color, linestyle="--", label=f"{label}, train")
        c.plot(r.steps, r.test_accuracy, color=color, label=f"{label}, test")
    c.set_title("(c) train vs test accuracy (lr x1)")
    # Log steps in (a) and (b): the runs part in their first few hundred steps, and the
    # plateau they reach matters as much; (c) is about the end, on the paper's linear axis.
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("training steps (log scale)")
    c.set_xlabel("training steps")
    _diverged_note(a, [results[p + n] for n in ("Baseline", "x5", "x30") for p in ("", "BN-")])
    _diverged_note(b, [results[p + n] for n in ("Baseline", "init-x10") for p in ("", "BN-")])
    # The curves climb from chance to the plateau between steps 10 and 1000: left of that, above
    # chance, is free.
    for ax, where in ((a, "center left"), (b, "center left"), (c, "lower right")):
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc=where, fontsize=7)
    a.set_ylabel("test accuracy")
    b.set_ylabel("test accuracy")
    c.set_ylabel("accuracy: train (dashed), test (solid)")
    fig.suptitle(f"Learning rate, initialization and overfitting ({data_name})", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
