"""JAX benchmark: batchnorm.jax against what JAX users run today, on the CPU, all jit-compiled.

1. The BN ops alone: training forward, inference forward and training forward+backward
   (jax.grad in x, weight, bias) of batchnorm.jax.batch_norm against the same computation
   written in jnp (flax.linen.BatchNorm's formulas, two-pass variance), which XLA fuses.
2. A training step (forward, backward, SGD update) of a small CNN (conv-BN-ReLU x2, dense)
   with batchnorm.jax.BatchNorm against flax.linen.BatchNorm(use_fast_variance=False), and
   the same step in Flax NNX with batchnorm.jax.nnx.BatchNorm against flax.nnx.BatchNorm.

Ours and XLA's alternate within every round; the table shows medians of the rounds and the
ratio (XLA time / ours: > 1 means ours is faster). Usage: python bench/jax_bench.py [--reps N]
[--out bench/results/jax.txt]."""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import batchnorm.jax as bj


def xla_batch_norm(x, w, b, axis, training, mean=None, var=None, eps=1e-5):
    """flax.linen.BatchNorm's computation (use_fast_variance=False) in jnp, fused by XLA."""
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    xf = x.astype(jnp.float32)
    if training:
        mean = xf.mean(red)
        var = jnp.square(xf - mean.reshape(shape)).mean(red)
    y = (xf - mean.reshape(shape)) * (jax.lax.rsqrt(var + eps) * w).reshape(shape) + b.reshape(shape)
    return y.astype(x.dtype)


def ops(axis):
    """name: (ours, xla), each f(x, w, b, running_mean, running_var, dy). Statistics and the
    output cotangent dy are arguments, so XLA cannot fold them into constants (a loss of
    sum(y) would let it simplify the jnp backward away)."""
    def g(f):
        return jax.grad(lambda x, w, b, m, v, dy: jnp.sum(f(x, w, b, m, v, dy).astype(jnp.float32) * dy),
                        argnums=(0, 1, 2))

    ours_train = lambda x, w, b, m, v, dy: bj.batch_norm(x, w, b, None, None, training=True, axis=axis)[0]  # noqa
    xla_train = lambda x, w, b, m, v, dy: xla_batch_norm(x, w, b, axis, True)  # noqa: E731
    return {
        "train fwd": (ours_train, xla_train),
        "inference": (lambda x, w, b, m, v, dy: bj.batch_norm(x, w, b, m, v, training=False, axis=axis)[0],
                      lambda x, w, b, m, v, dy: xla_batch_norm(x, w, b, axis, False, m, v)),
        "train fwd+bwd": (g(ours_train), g(xla_train)),
    }


# A call that faulted in more fresh pages than this wrote into a new mapping: XLA's output
# buffers come from malloc, which maps arrays past its threshold (at most 32 MB) afresh and
# gives them back when freed, so such a call also pays the kernel's zeroing of every page
# (a 25.7 MB output: 6272 faults, 8-15 ms instead of 1.2), whichever side ran. When that
# happens depends on the heap's history, not on the code timed: the table gives the medians of
# the calls without it, the medians of all calls and how many faulted.
FRESH_PAGES = 64


def timed(fn, args, reps):
    """[(seconds, pages faulted in)] of `reps` calls."""
    out = []
    for _ in range(reps):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append((time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
    return out


def summary(samples):
    """(median seconds of the calls without fresh pages, or of all when every call had them;
    median of all calls; fraction of calls with fresh pages)."""
    clean = [t for t, faults in samples if faults <= FRESH_PAGES]
    every = [t for t, _ in samples]
    return (statistics.median(clean or every), statistics.median(every), 1 - len(clean) / len(samples))


def race(ours, xla, args, reps):
    """summary() of ours and of xla, alternating in blocks so drift hits both alike."""
    ours, xla = jax.jit(ours), jax.jit(xla)
    jax.block_until_ready(ours(*args))
    jax.block_until_ready(xla(*args))
    t_ours, t_xla = [], []
    for _ in range(reps):
        t_ours += timed(ours, args, 3)
        t_xla += timed(xla, args, 3)
    return summary(t_ours), summary(t_xla)


def cnn(norm):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            for features in (32, 64):
                x = nn.Conv(features, (3, 3))(x)
                x = norm(use_running_average=not train, use_fast_variance=False)(x)
                x = nn.relu(x)
                x = nn.max_pool(x, (2, 2), (2, 2))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    return Net()


def train_step_race(batch, reps):
    import flax.linen as nn
    import optax

    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 32, 32, 3)), jnp.float32)
    labels = jnp.arange(batch) % 10
    steps = []
    for norm in (bj.BatchNorm, nn.BatchNorm):
        model = cnn(norm)
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        opt = optax.sgd(0.01)
        state = (variables["params"], variables["batch_stats"], opt.init(variables["params"]))

        def step(state, x, labels, model=model, opt=opt):
            p, stats, opt_state = state

            def loss(p):
                logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

            (_, upd), grads = jax.value_and_grad(loss, has_aux=True)(p)
            updates, opt_state = opt.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), upd["batch_stats"], opt_state

        steps.append((step, state))
    (ours, s1), (xla, s2) = steps
    ours, xla = jax.jit(ours), jax.jit(xla)
    jax.block_until_ready(ours(s1, x, labels))
    jax.block_until_ready(xla(s2, x, labels))
    t_ours, t_xla = [], []
    for _ in range(reps):
        t_ours += timed(ours, (s1, x, labels), 3)
        t_xla += timed(xla, (s2, x, labels), 3)
    return summary(t_ours), summary(t_xla)


def train_step_race_nnx(batch, reps):
    """The same CNN step in Flax NNX: batchnorm.jax.nnx.BatchNorm against flax.nnx.BatchNorm."""
    import optax
    from flax import nnx

    from batchnorm.jax.nnx import BatchNorm

    class Net(nnx.Module):
        def __init__(self, norm, rngs):
            self.convs = nnx.List([nnx.Conv(i, o, (3, 3), rngs=rngs) for i, o in ((3, 32), (32, 64))])
            self.norms = nnx.List([norm(o, use_fast_variance=False, rngs=rngs) for o in (32, 64)])
            self.head = nnx.Linear(8 * 8 * 64, 10, rngs=rngs)

        def __call__(self, x):
            for conv, norm in zip(self.convs, self.norms):
                x = nnx.max_pool(jax.nn.relu(norm(conv(x))), (2, 2), (2, 2))
            return self.head(x.reshape(x.shape[0], -1))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 32, 32, 3)), jnp.float32)
    labels = jnp.arange(batch) % 10
    times = []
    runs = []
    for norm in (BatchNorm, nnx.BatchNorm):
        model = Net(norm, nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x, labels):
            def loss(model):
                return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

            value, grads = nnx.value_and_grad(loss)(model)
            optimizer.update(model, grads)
            return value

        jax.block_until_ready(step(model, optimizer, x, labels))
        runs.append((step, (model, optimizer, x, labels)))
        times.append([])
    for _ in range(reps):
        for (step, args), t in zip(runs, times):
            t += timed(step, args, 3)
    return summary(times[0]), summary(times[1])


def cpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="rounds (3 calls of each per round)")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    rows = []

    def add(name, times):
        (ours, ours_all, ours_fresh), (xla, xla_all, xla_fresh) = times
        rows.append((name, ours, xla, xla_all / ours_all, ours_fresh, xla_fresh))
        print(f"{name:<48} ours {ours * 1e3:8.2f} ms   XLA {xla * 1e3:8.2f} ms   {xla / ours:5.2f}x   (all calls "
              f"{xla_all / ours_all:5.2f}x; fresh pages {ours_fresh:.0%} / {xla_fresh:.0%})", flush=True)

    cases = [((32, 64, 56, 56), 1, "float32"), ((32, 56, 56, 64), -1, "float32"), ((256, 2048, 7, 7), 1, "float32"),
             ((4096, 1024), 1, "float32"), ((32, 56, 56, 64), -1, "bfloat16")]
    for shape, axis, dtype in cases:
        x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), dtype)
        c = shape[axis]
        w, b = jnp.ones(c, jnp.float32) * 1.5, jnp.zeros(c, jnp.float32) + 0.1
        layout = "NC" if len(shape) == 2 else ("NCHW" if axis == 1 else "NHWC")
        for name, (ours, xla) in ops(axis).items():
            dy = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)
            add(f"{name} {'x'.join(map(str, shape))} {layout} {dtype}",
                race(ours, xla, (x, w, b, w * 0.1, w + 1.0, dy), args.reps))
    for name, step in (("CNN train step (batch 64, 32x32x3, NHWC)", train_step_race),
                       ("NNX CNN train step (batch 64, 32x32x3, NHWC)", train_step_race_nnx)):
        try:
            add(name, step(64, args.reps))
        except ImportError as e:  # pragma: no cover
            print(f"{name} skipped: {e}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"batchnorm.jax vs XLA, jax {jax.__version__}, {cpu_model()}, {os.cpu_count()} CPUs, "
             f"the kernels on XLA's intra-op pool, median of {args.reps * 3} calls, "
             f"load average {load:.1f} at the end",
             f"ours and XLA: medians of the calls without fresh pages (over {FRESH_PAGES} new pages faulted in: a "
             "new output mapping); all calls: the ratio of the medians of every call; fresh: the calls with them",
             "", "| case | ours (ms) | XLA (ms) | XLA / ours | all calls | fresh (ours / XLA) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}x | {r:.2f}x | {fa:.0%} / {fb:.0%} |"
              for n, a, b, r, fa, fb in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
