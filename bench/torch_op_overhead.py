#!/usr/bin/env python3
"""Per-call overhead of the two ways to register a PyTorch op (issue #11's choice for
batchnorm.torch): torch.library.custom_op versus Library.define + impl, both with a fake
kernel and register_autograd, on a body that does almost nothing (torch.empty_like), called
with and without an input that requires grad. Also a plain autograd.Function for scale.

    python bench/torch_op_overhead.py
"""
from __future__ import annotations

import statistics
import time

import torch


def body(x, w):
    return torch.empty_like(x)


def backward(ctx, g):
    return g, None


def setup_context(ctx, inputs, output):
    pass


@torch.library.custom_op("bench_overhead::custom", mutates_args=())
def custom(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


custom.register_fake(body)
custom.register_autograd(backward, setup_context=setup_context)

lib = torch.library.Library("bench_overhead", "FRAGMENT")
lib.define("defined(Tensor x, Tensor w) -> Tensor")
lib.impl("defined", body, "CPU")
torch.library.register_fake("bench_overhead::defined", body, lib=lib)
torch.library.register_autograd("bench_overhead::defined", backward, setup_context=setup_context, lib=lib)


class Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        return torch.empty_like(x)

    backward = staticmethod(backward)


def per_call_us(f, *args, calls=2000, rounds=21) -> float:
    for _ in range(calls):
        f(*args)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            f(*args)
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    x, w = torch.randn(4, 4), torch.randn(4)
    fns = {
        "plain Python body": body,
        "autograd.Function.apply": Function.apply,
        "custom_op (torch.ops.ns.op)": torch.ops.bench_overhead.custom,
        "define/impl (torch.ops.ns.op)": torch.ops.bench_overhead.defined,
        "custom_op (.default)": torch.ops.bench_overhead.custom.default,
        "define/impl (.default)": torch.ops.bench_overhead.defined.default,
        "custom_op (Python object)": custom,
    }
    print(f"torch {torch.__version__}; median us per call")
    print("| registration | no grad | input requires grad |")
    print("|---|---|---|")
    for name, f in fns.items():
        a = per_call_us(f, x, w)
        b = per_call_us(f, x.clone().requires_grad_(), w)
        print(f"| {name} | {a:.1f} | {b:.1f} |", flush=True)


if __name__ == "__main__":
    main()
