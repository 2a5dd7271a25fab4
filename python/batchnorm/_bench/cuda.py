"""The CUDA benchmark (`bench --device cuda`): every op on torch CUDA tensors, timed with CUDA
events, against a device-to-device copy of the same bytes and torch's own batch norm (cuDNN or
native, whichever torch picks), columns interleaved round by round. Two timings per column:
"stream", BURST calls back to back between two events (a training loop's steady state: host
overhead hides behind GPU work when it can), which the targets use; and "alone", one call on
an idle GPU (synchronize, then events around the call: launch latency and host overhead as a
single call sees them). Besides the three ops, the fused BN + add + ReLU (training forward and
its backward) against torch's unfused sequence. Writes <out>/cuda-<device>.{txt,json,png}."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import batchnorm as bn

from . import cases as C
from .cli import DEFAULT_OUT

SHAPES = C.SHAPES + ((256, 64, 112, 112),)
QUICK_SHAPES = ((32, 64, 56, 56), (256, 64, 112, 112))
DTYPES = ("float32", "bfloat16")
# The fused ops (residual= and activation="relu") after the three of the contract.
OPS = C.OPS + ("fused_training", "fused_backward")
SHORT_OP = {**C.SHORT_OP, "fused_training": "fus_train", "fused_backward": "fus_bwd"}
# Fused: x, residual read + y written; dy, y, x read + dx, dresidual written.
ARRAYS_TOUCHED = {**C.ARRAYS_TOUCHED, "fused_training": 3, "fused_backward": 5}
TARGETS = {"forward_inference": 0.9, "forward_training": 0.75, "backward": 0.75, "fused_training": 0.75,
           "fused_backward": 0.75}
DEFAULT_REPS = 30
WARMUP = 5


def build_parser(default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m batchnorm bench --device cuda",
                                description="CUDA benchmark of batchnorm against a device copy and torch's batch norm")
    p.add_argument("--device", choices=("cuda",), default="cuda")
    p.add_argument("--quick", action="store_true", help="two shapes, float32, few reps")
    p.add_argument("--reps", type=int, default=None, help=f"timed rounds per case (default {DEFAULT_REPS})")
    p.add_argument("--out", default=default_out,
                   help=f"directory for the results, created if missing (default {default_out}, relative to the "
                        "current directory)")
    p.add_argument("--name", default=None, help="file stem (default cuda-<device name>)")
    return p


BURST = 10  # calls per "stream" sample


class Column:
    def __init__(self, op: str, impl: str, fn: Callable[[], Any]) -> None:
        self.op, self.impl, self.fn = op, impl, fn
        self.samples: List[float] = []  # stream: per call, from BURST calls back to back
        self.alone: List[float] = []  # one call on an idle GPU


def _columns(torch: Any, x: Any, dtype: Any, axis: int, channels: int) -> Tuple[List[Column], dict]:
    F = torch.nn.functional
    dev = x.device
    g = torch.Generator(device=dev).manual_seed(1)
    w = torch.randn(channels, device=dev, generator=g)
    b = torch.randn(channels, device=dev, generator=g)
    rm = torch.randn(channels, device=dev, generator=g)
    rv = torch.rand(channels, device=dev, generator=g) + 0.5
    trm, trv = rm.clone(), rv.clone()
    dy = torch.randn(x.shape, device=dev, dtype=dtype, generator=g)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    _, sm, si = bn.forward_training(x, w, b, axis=axis)
    # torch sees the logical NCHW tensor (a channels_last view for "cl").
    xt = x if axis == 1 else x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
    dyt = dy if axis == 1 else dy.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
    xg = xt.detach().requires_grad_(True)
    wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    yg = F.batch_norm(xg, None, None, wg, bg, training=True, eps=C.EPS)
    # Fused: y = relu(bn(x) + r), its backward from y's mask; torch's unfused sequence beside it.
    r = torch.randn(x.shape, device=dev, dtype=dtype, generator=g)
    rt = r if axis == 1 else r.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
    fy, fdx = torch.empty_like(x), torch.empty_like(x)
    bn.forward_training(x, w, b, axis=axis, residual=r, activation="relu", out=fy)
    rg = rt.detach().requires_grad_(True)
    fyg = torch.relu(F.batch_norm(xg, None, None, wg, bg, training=True, eps=C.EPS) + rg)

    cols = [
        Column("copy", "copy", lambda: y.copy_(x)),
        Column("forward_inference", "ours_out", lambda: bn.forward_inference(x, rm, rv, w, b, axis=axis, out=y)),
        Column("forward_inference", "ours_new", lambda: bn.forward_inference(x, rm, rv, w, b, axis=axis)),
        Column("forward_inference", "torch", lambda: F.batch_norm(xt, trm, trv, w, b, training=False, eps=C.EPS)),
        Column("forward_training", "ours_out",
               lambda: bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis, out=y)),
        Column("forward_training", "ours_new",
               lambda: bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis)),
        Column("forward_training", "torch", lambda: F.batch_norm(xt, trm, trv, w, b, training=True, eps=C.EPS)),
        Column("backward", "ours_out", lambda: bn.backward(dy, x, sm, si, w, axis=axis, out=dx)),
        Column("backward", "ours_new", lambda: bn.backward(dy, x, sm, si, w, axis=axis)),
        Column("backward", "torch", lambda: torch.autograd.grad(yg, (xg, wg, bg), dyt, retain_graph=True)),
        Column("fused_training", "ours_out",
               lambda: bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis, residual=r,
                                           activation="relu", out=y)),
        Column("fused_training", "ours_new",
               lambda: bn.forward_training(x, w, b, running_mean=rm, running_var=rv, axis=axis, residual=r,
                                           activation="relu")),
        Column("fused_training", "torch",
               lambda: torch.relu_(F.batch_norm(xt, trm, trv, w, b, training=True, eps=C.EPS) + rt)),
        Column("fused_backward", "ours_out",
               lambda: bn.backward(dy, x, sm, si, w, axis=axis, y=fy, activation="relu", residual=True, out=fdx)),
        Column("fused_backward", "ours_new",
               lambda: bn.backward(dy, x, sm, si, w, axis=axis, y=fy, activation="relu", residual=True)),
        Column("fused_backward", "torch",
               lambda: torch.autograd.grad(fyg, (xg, wg, bg, rg), dyt, retain_graph=True)),
    ]
    # Agreement with torch on this case's data (max |difference| / max |torch|).
    with torch.no_grad():
        ours_inf = bn.forward_inference(x, rm, rv, w, b, axis=axis)
        ref_inf = F.batch_norm(xt, rm, rv, w, b, training=False, eps=C.EPS)
        ours_dx, _, _ = bn.backward(dy, x, sm, si, w, axis=axis)
        ours_y, _, _ = bn.forward_training(x, w, b, axis=axis)
        ours_fdx = bn.backward(dy, x, sm, si, w, axis=axis, y=fy, activation="relu", residual=True)[0]
    ref_dx, _, _ = torch.autograd.grad(yg, (xg, wg, bg), dyt, retain_graph=True)
    ref_fdx = torch.autograd.grad(fyg, (xg, wg, bg, rg), dyt, retain_graph=True)[0]

    def logical(a: Any) -> Any:
        return a if axis == 1 else a.permute(0, a.ndim - 1, *range(1, a.ndim - 1))

    def rel(a: Any, r: Any, where: Any = None) -> float:
        diff = (logical(a).float() - r.float()).abs()
        return float((diff if where is None else diff[where]).max() / r.float().abs().max().clamp_min(1e-30))

    # The fused backward's dx follows each side's own ReLU mask: where one forward's y rounds
    # to 0 and the other's does not (a handful of elements of a large float32 tensor, many in
    # bfloat16), the two gradients differ by the whole of dy. Compared where the masks agree.
    same_mask = (logical(fy) > 0) == (fyg.detach() > 0)
    agree = {"forward_inference": rel(ours_inf, ref_inf), "forward_training": rel(ours_y, yg.detach()),
             "backward": rel(ours_dx, ref_dx), "fused_training": rel(fy, fyg.detach()),
             "fused_backward": rel(ours_fdx, ref_fdx, same_mask)}
    return cols, agree


def _time(torch: Any, cols: Sequence[Column], reps: int) -> None:
    for col in cols:
        for _ in range(WARMUP):
            col.fn()
    torch.cuda.synchronize()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in cols]
    for r in range(reps):
        k = r % len(cols)
        order = list(range(k, len(cols))) + list(range(k))
        for i in order:
            fn, (a0, a1, s0, s1) = cols[i].fn, events[i]
            torch.cuda.synchronize()
            a0.record()
            fn()
            a1.record()
            torch.cuda.synchronize()
            s0.record()
            for _ in range(BURST):
                fn()
            s1.record()
        torch.cuda.synchronize()
        for i in order:
            a0, a1, s0, s1 = events[i]
            cols[i].alone.append(a0.elapsed_time(a1) * 1e-3)
            cols[i].samples.append(s0.elapsed_time(s1) * 1e-3 / BURST)


def _stats(col: Column) -> dict:
    a = np.asarray(col.samples)
    return {"median_s": float(np.median(a)), "min_s": float(a.min()), "max_s": float(a.max()), "reps": int(a.size),
            "alone_median_s": float(np.median(col.alone)), "alone_min_s": float(np.min(col.alone))}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: Optional[Sequence[str]] = None, default_out: str = DEFAULT_OUT) -> int:
    args = build_parser(default_out).parse_args(argv)
    try:
        import torch
    except ImportError:
        print("the CUDA benchmark needs torch with CUDA (its tensors, events and batch norm)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or not bn.info()["cuda"]["available"]:
        print(f"no usable CUDA device: torch says {torch.cuda.is_available()}, batchnorm says "
              f"{bn.info()['cuda']['reason'] or 'available'}", file=sys.stderr)
        return 2
    wall0 = time.perf_counter()
    reps = args.reps or (10 if args.quick else DEFAULT_REPS)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = ("float32",) if args.quick else DTYPES
    torch.set_grad_enabled(True)
    prop = torch.cuda.get_device_properties(0)
    machine = {"device": prop.name, "sms": prop.multi_processor_count,
               "memory_gib": round(prop.total_memory / 2 ** 30, 1), "torch": torch.__version__,
               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
               "cudnn_enabled": torch.backends.cudnn.enabled, "batchnorm": bn.info()["version"],
               "python": platform.python_version()}
    lines: List[str] = []

    def out(*ls: str) -> None:
        for line in ls:
            print(line, flush=True)
            lines.append(line)

    out(f"batchnorm {machine['batchnorm']} on {machine['device']} ({machine['sms']} SMs); torch {machine['torch']} "
        f"(CUDA {machine['cuda']}, cuDNN {machine['cudnn']}); {reps} interleaved rounds per case, CUDA events",
        "Columns: ms = median per call, 10 calls back to back (ours into out= / ours allocating / torch); GB/s = minimum bytes / out= time; "
        "xcopy = that over the same-run device copy's GB/s (torch's too); xT = torch ms / ours allocating ms; "
        "alone = one call on an idle GPU, ms (ours out=, torch); err = max |ours - torch| / max |torch|", "",
        f"{'shape':>20} {'lay':>3} {'dtype':>8} {'op':>9} | {'out= ms':>8} {'new ms':>8} {'torch ms':>8} | "
        f"{'GB/s':>6} {'xcopy':>5} {'torch':>5} | {'xT':>5} {'xT out=':>7} | {'alone: ours':>11} {'torch':>6} | "
        f"{'err':>7}")
    results = []
    for shape in shapes:
        for layout in (("cf", "cl") if len(shape) == 4 else ("nc",)):
            for dtype in dtypes:
                tdt = getattr(torch, dtype)
                g = torch.Generator(device="cuda").manual_seed(0)
                logical = torch.randn(shape, device="cuda", dtype=tdt, generator=g) * 2 + 1
                if layout == "cl":  # NHWC memory, channel axis last, as ours is called on it
                    x, axis = logical.permute(0, 2, 3, 1).contiguous(), -1
                else:
                    x, axis = logical, 1
                del logical
                cols, agree = _columns(torch, x, tdt, axis, shape[1])
                _time(torch, cols, reps)
                nbytes = x.numel() * x.element_size()
                copy = _stats(cols[0])
                copy_bw = 2 * nbytes / copy["median_s"]
                res = {"shape": list(shape), "layout": layout, "dtype": dtype, "bytes": nbytes,
                       "copy": {**copy, "gbps": copy_bw / 1e9}, "ops": {}}
                for op in OPS:
                    row: Dict[str, Any] = {}
                    for col in cols:
                        if col.op == op:
                            row[col.impl] = _stats(col)
                    moved = ARRAYS_TOUCHED[op] * nbytes
                    for impl in ("ours_out", "ours_new", "torch"):
                        row[impl]["gbps"] = moved / row[impl]["median_s"] / 1e9
                        row[impl]["roofline"] = moved / row[impl]["median_s"] / copy_bw
                    row["speedup_vs_torch"] = row["torch"]["median_s"] / row["ours_new"]["median_s"]
                    row["speedup_vs_torch_out"] = row["torch"]["median_s"] / row["ours_out"]["median_s"]
                    row["max_rel_err_vs_torch"] = agree[op]
                    res["ops"][op] = row
                    out(f"{'x'.join(map(str, shape)):>20} {layout:>3} {dtype:>8} {SHORT_OP[op]:>9} | "
                        f"{row['ours_out']['median_s'] * 1e3:8.3f} {row['ours_new']['median_s'] * 1e3:8.3f} "
                        f"{row['torch']['median_s'] * 1e3:8.3f} | {row['ours_out']['gbps']:6.0f} "
                        f"{row['ours_out']['roofline']:5.2f} {row['torch']['roofline']:5.2f} | "
                        f"{row['speedup_vs_torch']:5.2f} {row['speedup_vs_torch_out']:7.2f} | "
                        f"{row['ours_out']['alone_median_s'] * 1e3:11.3f} {row['torch']['alone_median_s'] * 1e3:6.3f} | "
                        f"{agree[op]:7.1e}")
                results.append(res)
                del cols, x
                torch.cuda.empty_cache()
    targets = _targets(results)
    out("", *targets["lines"], "", f"wall time {time.perf_counter() - wall0:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(os.path.abspath(args.out),
                        args.name or ("cuda-quick-" if args.quick else "cuda-") + _slug(machine["device"]))
    doc = {"schema": "batchnorm-cuda-bench/1",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "argv": list(argv) if argv is not None else sys.argv[1:], "machine": machine,
           "config": {"reps": reps, "shapes": [list(s) for s in shapes], "dtypes": list(dtypes), "eps": C.EPS,
                      "timing": f"median over interleaved rounds of: events around {BURST} calls back to back (median_s, "
                                f"per call) and around one call after a synchronize (alone_median_s)",
                      "bytes": "forward: 2 x x.nbytes; backward: 3 x x.nbytes; fused forward: 3 x x.nbytes; "
                                "fused backward: 5 x x.nbytes; copy: 2 x x.nbytes"},
           "cases": results, "targets": {k: v for k, v in targets.items() if k != "lines"}}
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(stem + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    why = _plot(results, stem + ".png", f"batchnorm vs torch {machine['torch']} on {machine['device']}")
    print(f"\nwrote {stem}.json, {stem}.txt" + (f", {stem}.png" if not why else f" ({why})"), file=sys.stderr)
    return 0


def _targets(results: Sequence[dict]) -> dict:
    lines = ["Targets (every row, ours with out=; torch compared with ours allocating):"]
    summary: Dict[str, Any] = {}
    for op in OPS:
        rows = [(r, r["ops"][op]) for r in results]
        fr = np.array([row["ours_out"]["roofline"] for _, row in rows])
        sp = np.array([row["speedup_vs_torch"] for _, row in rows])
        worst = rows[int(fr.argmin())][0]
        slow = [f"{'x'.join(map(str, r['shape']))} {r['layout']} {r['dtype']}" for r, row in rows
                if row["speedup_vs_torch"] < 1]
        summary[op] = {"target_xcopy": TARGETS[op], "median_xcopy": float(np.median(fr)), "min_xcopy": float(fr.min()),
                       "rows_meeting": int((fr >= TARGETS[op]).sum()), "rows": len(rows),
                       "median_vs_torch": float(np.median(sp)), "min_vs_torch": float(sp.min()),
                       "rows_slower_than_torch": slow}
        lines.append(f"  {SHORT_OP[op]:>9}: xcopy >= {TARGETS[op]}: {summary[op]['rows_meeting']}/{len(rows)} rows "
                     f"(median {np.median(fr):.2f}, min {fr.min():.2f} on {'x'.join(map(str, worst['shape']))} "
                     f"{worst['layout']} {worst['dtype']}); vs torch median {np.median(sp):.2f}x, min {sp.min():.2f}x; "
                     f"slower than torch on {len(slow)} row(s)" + (f": {', '.join(slow)}" if slow else ""))
    return {**summary, "lines": lines}


def _plot(results: Sequence[dict], path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no chart: {e}"
    fig, axes = plt.subplots(len(OPS), 1, figsize=(14, 3.4 * len(OPS)), squeeze=False)
    labels = [f"{'x'.join(map(str, r['shape']))} {r['layout']} {r['dtype'][:4]}" for r in results]
    xs = np.arange(len(results))
    for ax, op in zip(axes[:, 0], OPS):
        series = [("ours, out=", "ours_out", "#1f77b4"), ("ours, allocating", "ours_new", "#9ecae1"),
                  ("torch", "torch", "#ff7f0e")]
        width = 0.8 / len(series)
        for i, (name, key, color) in enumerate(series):
            ax.bar(xs + (i - 1) * width, [r["ops"][op][key]["roofline"] for r in results], width, label=name,
                   color=color)
        ax.axhline(TARGETS[op], color="k", lw=1, ls="--", label=f"target {TARGETS[op]}x")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("fraction of device copy GB/s")
        ax.set_title(op, fontsize=10)
        ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
