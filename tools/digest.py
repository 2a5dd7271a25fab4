"""Bit digest of every op's outputs, for refactorings that must not change a single bit.

    python tools/digest.py > digest.txt        # one "case sha256" line per case, then a total

Runs each op (statistics, merge_statistics, forward_training with running statistics and
with given batch statistics, forward_inference, backward, backward_reduce/backward_elemt,
fold, the BatchNorm layer's train/eval backward) over float16/bfloat16/float32/float64 and
layouts (channels-first, channels-last, 2-D, strided and negatively strided views, odd sizes,
NaN/Inf values), in a child process per ISA level (BATCHNORM_ISA) and streaming-store
setting (BATCHNORM_STREAM_BYTES=0 forces the non-temporal paths), each at several thread
counts. Compare two builds with `diff` of their outputs. Lines name the level asked for: a digest
made before the avx512_bf16 level (e12179c) has no lines for it, and on a CPU without the
instruction those lines repeat avx512's."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np

DTYPES = ("float16", "bfloat16", "float32", "float64")
THREADS = (1, 2, 3)


def _bytes(a) -> bytes:
    import torch

    if isinstance(a, torch.Tensor):
        t = a.detach().contiguous()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        return str(tuple(a.shape)).encode() + str(a.dtype).encode() + t.numpy().tobytes()
    if isinstance(a, (int, float)):
        return repr(a).encode()
    a = np.asarray(a)
    return str(a.shape).encode() + str(a.dtype).encode() + np.ascontiguousarray(a).tobytes()


def _layouts(dtype: str, rng: np.random.Generator):
    """(name, x, dy, axis): x and dy as torch tensors (or NumPy views for negative strides)."""
    import torch

    tdt = getattr(torch, dtype)

    def mk(shape, scale=3.0, offset=0.5):
        v = rng.standard_normal(shape) * scale + offset
        return torch.from_numpy(v).to(tdt)

    out = []
    out.append(("cf_small", mk((5, 13, 7, 9)), mk((5, 13, 7, 9)), 1))
    out.append(("cf_7x7", mk((16, 24, 7, 7)), mk((16, 24, 7, 7)), 1))
    out.append(("cf_pieces", mk((3, 4, 90, 91)), mk((3, 4, 90, 91)), 1))  # > 8192 values per channel
    out.append(("cf_longrow", mk((4, 7, 1100)), mk((4, 7, 1100)), 1))
    out.append(("cf_5d", mk((2, 6, 3, 5, 7)), mk((2, 6, 3, 5, 7)), 1))
    cl = mk((8, 35, 10, 10)).to(memory_format=torch.channels_last)
    out.append(("cl_torch", cl, mk((8, 35, 10, 10)).to(memory_format=torch.channels_last), 1))
    out.append(("cl_axis-1", mk((4, 9, 9, 37)), mk((4, 9, 9, 37)), -1))
    out.append(("cl_wide", mk((300, 64)), mk((300, 64)), 1))
    out.append(("cl_page_wide", mk((45, 2050)), mk((45, 2050)), 1))  # rows of 4 KB or more
    # rows wider than one register tile, under a page (memory-order walks)
    out.append(("cl_narrow_wide", mk((70, 300)), mk((70, 300)), 1))
    out.append(("cl_narrow_wide_4d", mk((3, 5, 7, 130)), mk((3, 5, 7, 130)), -1))
    out.append(("2d_axis1", mk((301, 67)), mk((301, 67)), 1))
    out.append(("2d_axis0", mk((67, 301)), mk((67, 301)), 0))
    out.append(("odd_axis2", mk((3, 5, 11)), mk((3, 5, 11)), 2))
    out.append(("single_channel", mk((40, 1, 33)), mk((40, 1, 33)), 1))
    big = mk((6, 10, 12, 14))
    out.append(("strided", big[:, ::2, 1::2, ::3], mk((6, 10, 12, 14))[:, ::2, 1::2, ::3], 1))
    out.append(("transposed", mk((12, 7, 9)).transpose(0, 2), mk((12, 7, 9)).transpose(0, 2), 1))
    out.append(("strided_cl", mk((5, 8, 8, 40))[:, 1:7, :, ::2], mk((5, 8, 8, 40))[:, 1:7, :, ::2], -1))
    if dtype != "bfloat16":  # torch has no negative strides: NumPy views
        ndt = np.dtype(dtype)
        v = (rng.standard_normal((6, 9, 11, 13)) * 2).astype(ndt)[:, :, ::-1, ::-2]
        d = (rng.standard_normal((6, 9, 11, 13))).astype(ndt)[::-1, :, ::-1, :]
        out.append(("negative", v, d[:, :, :, ::2], 1))
    nan = mk((6, 11, 5, 5))
    nan[2, 3, 1, 1] = float("nan")
    nan[4, 7, 0, 2] = float("inf")
    nan[1, 8, 3, 3] = -float("inf")
    out.append(("nonfinite_cf", nan, mk((6, 11, 5, 5)), 1))
    nl = nan.clone().to(memory_format=torch.channels_last)
    out.append(("nonfinite_cl", nl, mk((6, 11, 5, 5)).to(memory_format=torch.channels_last), 1))
    big_mean = mk((4, 5, 30, 30), scale=1e-2, offset=1e4 if dtype != "float16" else 1e2)
    out.append(("large_mean", big_mean, mk((4, 5, 30, 30)), 1))
    return out


def _tiny_layouts(dtype: str, rng: np.random.Generator):
    """Channels-first planes shorter than a cache line, from a generator of their own (added
    later: the cases of _layouts keep their values)."""
    import torch

    def mk(shape):
        return torch.from_numpy(rng.standard_normal(shape) * 3.0 + 0.5).to(getattr(torch, dtype))

    return [
        ("cf_tiny", mk((6, 20, 2, 3)), mk((6, 20, 2, 3)), 1),
        ("cf_tiny_one", mk((1, 12, 3, 3)), mk((1, 12, 3, 3)), 1),  # one image: a plane per channel
    ]


def _params(C: int, rng: np.random.Generator, dtype: str):
    import torch

    tdt = getattr(torch, dtype)
    w = torch.from_numpy(rng.standard_normal(C) + 1.0).to(tdt)
    b = torch.from_numpy(rng.standard_normal(C)).to(tdt)
    rm = torch.from_numpy(rng.standard_normal(C)).to(tdt)
    rv = torch.from_numpy(rng.random(C) + 0.5).to(tdt)
    return w, b, rm, rv


def _cases(bn):
    """Yields (name, list of outputs) for every op, dtype and layout."""
    import torch

    rng = np.random.default_rng(1234)
    rng_tiny = np.random.default_rng(7)
    for dtype in DTYPES:
        cases = [(case, rng) for case in _layouts(dtype, rng)]
        cases += [(case, rng_tiny) for case in _tiny_layouts(dtype, rng_tiny)]
        for (name, x, dy, axis), case_rng in cases:
            tag = f"{dtype}/{name}"
            C = x.shape[axis]
            # Parameter dtypes rotate so every conversion path is covered.
            pdt = {"float16": "float32", "bfloat16": "float64", "float32": "float16", "float64": "float32"}[dtype]
            w, b, rm, rv = _params(C, case_rng, pdt)
            yield f"{tag}/statistics", list(bn.statistics(x, axis=axis))
            yield f"{tag}/statistics64", list(bn.statistics(x, axis=axis, dtype="float64"))
            rm1, rv1 = rm.clone(), rv.clone()
            y, sm, si = bn.forward_training(x, w, b, running_mean=rm1, running_var=rv1, momentum=0.3, eps=1e-3,
                                            axis=axis)
            yield f"{tag}/forward_training", [y, sm, si, rm1, rv1]
            y2, sm2, si2 = bn.forward_training(x, axis=axis)
            yield f"{tag}/forward_training_plain", [y2, sm2, si2]
            mean, var, count = bn.statistics(x, axis=axis, dtype="float64")
            rm2, rv2 = rm.clone().double(), rv.clone().double()
            r = bn.forward_training(x, w, None, running_mean=rm2, running_var=rv2, axis=axis,
                                    batch_statistics=(mean, var, count * 3))
            yield f"{tag}/forward_training_given", list(r) + [rm2, rv2]
            yield f"{tag}/forward_inference", [bn.forward_inference(x, rm, rv, w, b, eps=1e-4, axis=axis)]
            yield f"{tag}/forward_inference_plain", [bn.forward_inference(x, rm, rv, axis=axis)]
            yield f"{tag}/backward", list(bn.backward(dy, x, sm, si, w, axis=axis))
            yield f"{tag}/backward_now", list(bn.backward(dy, x, sm, si, axis=axis))
            s1, s2, dw, db = bn.backward_reduce(dy, x, sm, si, axis=axis)
            yield f"{tag}/backward_reduce", [s1, s2, dw, db]
            count = int(np.prod(x.shape)) // C
            yield f"{tag}/backward_elemt", [bn.backward_elemt(dy, x, sm, si, s1, s2, count * 2, w, axis=axis)]
            if isinstance(x, torch.Tensor) and dtype in ("float32", "float64"):
                layer = bn.BatchNorm(C, axis=axis, dtype=dtype, momentum=None)
                ly = layer(x)
                ldx = layer.backward(dy)
                layer.eval()
                ey = layer(x)
                edx = layer.backward(dy)
                st = layer.state_dict()
                yield f"{tag}/layer", [ly, ldx, ey, edx, layer.grad_weight, layer.grad_bias] + [st[k] for k in sorted(st)]
        # merge_statistics and fold: per dtype of the inputs.
        C = 19
        ms = [torch.from_numpy(rng.standard_normal(C) * 10).to(getattr(torch, dtype)) for _ in range(5)]
        vs = [torch.from_numpy(rng.random(C) * 4).to(getattr(torch, dtype)) for _ in range(5)]
        yield f"{dtype}/merge", list(bn.merge_statistics(ms, vs, [7, 0, 1, 100, 33]))
        for kname, kshape, kaxis in (("conv", (C, 3, 3, 3), 0), ("convT", (4, C, 3, 3), 1), ("linear", (C, 40), 0)):
            k = torch.from_numpy(rng.standard_normal(kshape)).to(getattr(torch, dtype))
            w, b, rm, rv = _params(C, rng, "float32")
            cb = torch.from_numpy(rng.standard_normal(C)).to(getattr(torch, dtype))
            yield f"{dtype}/fold_{kname}", list(bn.fold(k, cb, rm, rv, w, b, eps=1e-3, axis=kaxis))
            yield f"{dtype}/fold_{kname}_plain", list(bn.fold(k, None, rm, rv, axis=kaxis))


def child() -> None:
    import batchnorm as bn

    env = f"isa={os.environ.get('BATCHNORM_ISA', 'default')},stream={os.environ.get('BATCHNORM_STREAM_BYTES', 'default')}"
    for threads in THREADS:
        bn.set_num_threads(threads)
        for name, outputs in _cases(bn):
            h = hashlib.sha256()
            for o in outputs:
                h.update(_bytes(o))
            print(f"{env},threads={threads} {name} {h.hexdigest()[:16]}")


def main() -> None:
    lines = []
    for isa in ("baseline", "avx2", "avx512", "avx512_bf16"):
        for stream in (None, "0"):
            env = dict(os.environ, BATCHNORM_ISA=isa)
            env.pop("BATCHNORM_STREAM_BYTES", None)
            if stream is not None:
                env["BATCHNORM_STREAM_BYTES"] = stream
            r = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"child failed ({isa}, stream={stream}):\n{r.stderr}")
            lines += r.stdout.splitlines()
    for line in lines:
        print(line)
    print("total", hashlib.sha256("\n".join(lines).encode()).hexdigest())


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        main()
