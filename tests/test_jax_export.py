"""batchnorm.jax under jax.export: programs calling the kernels serialize with
disabled_checks(), deserialize and run with the bits of the jitted function, differentiate
(vjp_order), take a symbolic batch (shape polymorphism: one artifact for every batch size),
the Flax module's training step included; a process that has not imported batchnorm.jax gets
XLA's unknown-target error, one that has runs the artifact."""
from __future__ import annotations

import re

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'batchnorm[jax]')")
import jax.numpy as jnp  # noqa: E402

# (A build without the JAX extension, as the sanitizer run's: ModuleNotFoundError, skipped; a
# libbatchnorm from another build: an ImportError, which fails.)
bj = pytest.importorskip("batchnorm.jax", reason="this build of batchnorm has no JAX extension")

C = 4
PARAMS = (jnp.linspace(0.5, 1.5, C), jnp.linspace(-0.2, 0.3, C), jnp.linspace(-1, 1, C), jnp.linspace(0.5, 2, C))


def data(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 2 + 1, jnp.float32)


def same(got, want):
    leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    return all(g.shape == w.shape and g.dtype == w.dtype and bool(jnp.array_equal(g, w)) for g, w in leaves)


def inference(x):
    w, b, m, v = PARAMS
    return bj.batch_norm(x, w, b, m, v, training=False, activation="relu")


def training(x):
    w, b, m, v = PARAMS
    return bj.batch_norm(x, w, b, m, v, training=True)


def gradients(x, w):
    _, b, m, v = PARAMS

    def loss(x, w):
        y, new_mean, new_var = bj.batch_norm(x, w, b, m, v, training=True, residual=x, activation="relu")
        return jnp.sum(y * y) + jnp.sum(new_mean * new_var)  # through the statistics too

    return jax.grad(loss, argnums=(0, 1))(x, w)


CASES = {"inference": (inference, ()), "training": (training, ()), "gradients": (gradients, (PARAMS[0],))}


def _roundtrip(fn, *args, **kwargs):
    exported = jax.export.export(jax.jit(fn), disabled_checks=bj.disabled_checks())(*args)
    return jax.export.deserialize(exported.serialize(**kwargs))


def test_without_the_checks_jax_export_refuses_our_targets():
    with pytest.raises(ValueError, match="batchnorm_forward_inference"):
        jax.export.export(jax.jit(inference))(data((3, C, 2, 2)))
    names = {str(c) for c in bj.disabled_checks()}
    assert len(names) == 5 and all("batchnorm_" in n for n in names)


@pytest.mark.parametrize("case", sorted(CASES))
def test_serialized_program_gives_the_jitted_bits(case):
    fn, rest = CASES[case]
    x = data((6, C, 3, 5))
    restored = _roundtrip(fn, x, *rest)
    assert same(restored.call(x, *rest), jax.jit(fn)(x, *rest))


@pytest.mark.parametrize("case", sorted(CASES))
def test_symbolic_batch_runs_every_batch_size(case):
    fn, rest = CASES[case]
    shape = jax.export.symbolic_shape(f"n, {C}, h, w")
    restored = _roundtrip(fn, jax.ShapeDtypeStruct(shape, jnp.float32), *rest)
    assert str(restored.in_avals[0].shape) == str(shape)
    for i, concrete in enumerate([(2, C, 1, 1), (6, C, 3, 5), (17, C, 8, 2)]):
        x = data(concrete, seed=i)
        assert same(restored.call(x, *rest), jax.jit(fn)(x, *rest)), concrete


def test_exported_forward_differentiates():
    x = data((5, C, 3, 3))
    restored = _roundtrip(lambda x: training(x)[0], x, vjp_order=1)
    got = jax.grad(lambda x: jnp.sum(restored.call(x) ** 3))(x)
    want = jax.grad(lambda x: jnp.sum(training(x)[0] ** 3))(x)
    assert same(got, want)


@pytest.mark.parametrize("fn", [inference, training])
def test_a_bad_shape_is_still_refused_naming_the_symbols(fn):
    shape = jax.export.symbolic_shape("n, 5, h")  # 5 channels, parameters of 4
    with pytest.raises(ValueError, match=r"must have shape \(5,\), got \(4,\) \(x has shape \(n, 5, h\)"):
        jax.export.export(jax.jit(fn), disabled_checks=bj.disabled_checks())(jax.ShapeDtypeStruct(shape, jnp.float32))


def test_what_symbolic_dimensions_cannot_be_is_refused_by_name():
    w, b, m, v = PARAMS
    sym = jax.ShapeDtypeStruct(jax.export.symbolic_shape("n, c"), jnp.float32)
    with pytest.raises(ValueError, match="channel axis must have a size known when traced"):
        jax.export.export(jax.jit(lambda x: bj.batch_norm(x, None, None, None, None, training=True)),
                          disabled_checks=bj.disabled_checks())(sym)
    sharded = jax.jit(jax.vmap(lambda x: bj.batch_norm(x, w, b, m, v, training=True, axis_name="i"), axis_name="i"))
    with pytest.raises(ValueError, match="axis_name needs x's shape known when traced"):
        jax.export.export(sharded, disabled_checks=bj.disabled_checks())(
            jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"2, n, {C}"), jnp.float32))


def test_later_errors_about_concrete_arrays_keep_their_numbers():
    _roundtrip(inference, jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"n, {C}"), jnp.float32))
    with pytest.raises(ValueError, match=r"x has shape \(4099, 5\)"):  # (4099: the first stand-in)
        inference(data((4099, 5)))


def test_a_real_size_equal_to_a_stand_in_is_judged_as_itself():
    # The stand-ins were process-wide, 4099 for the first symbol: a real 4099 beside it was
    # taken for the symbol, so a weight of 4098 for 4099 channels was named "(b,)", and a
    # residual of 4099 rows beside a symbolic batch passed the trace-time check. In a fresh
    # process, where "b" is the first symbol seen (in this one, earlier tests' symbols came first).
    code = """if True:
        import re, jax, jax.numpy as jnp
        import batchnorm.jax as bj

        def refused(fn, *args):
            try:
                jax.export.export(jax.jit(fn), disabled_checks=bj.disabled_checks())(*args)
            except ValueError as e:
                return str(e)
            return "exported"

        x = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 4099"), jnp.float32)
        print(refused(lambda x: bj.batch_norm(x, jnp.ones(4098), None, None, None, training=True, axis=-1)[0], x))
        print(refused(lambda x, r: bj.batch_norm(x, None, None, None, None, training=True, residual=r)[0],
                      jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 3"), jnp.float32),
                      jax.ShapeDtypeStruct((4099, 3), jnp.float32)))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "weight must have shape (4099,), got (4098,) (x has shape (b, 4099): 4099 channels on axis 1)",
        "residual must have the shape of x, (b, 3), got (4099, 3)",
    ]


def test_flax_init_takes_a_symbolic_batch():
    nn = pytest.importorskip("flax.linen", reason="flax is not installed")
    layer = bj.BatchNorm(use_running_average=False)
    batch = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {C}"), jnp.float32)
    restored = _roundtrip(lambda x: layer.init(jax.random.key(0), x), batch)
    for n in (1, 3):
        assert same(restored.call(data((n, C))), jax.jit(lambda x: layer.init(jax.random.key(0), x))(data((n, C))))
    del nn


def test_ghost_batch_needs_a_concrete_batch():
    w, b, m, v = PARAMS
    fn = jax.jit(lambda x: bj.batch_norm(x, w, b, m, v, training=True, ghost_batch=2))
    with pytest.raises(ValueError, match="ghost_batch needs x's shape known when traced"):
        jax.export.export(fn, disabled_checks=bj.disabled_checks())(
            jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"n, {C}"), jnp.float32))
    x = data((6, C))
    assert same(_roundtrip(fn, x).call(x), fn(x))  # a concrete batch exports


def test_flax_train_step_exports_with_a_symbolic_batch():
    nn = pytest.importorskip("flax.linen", reason="flax is not installed")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Conv(8, (3, 3))(x)
            return jnp.mean(bj.BatchNorm(use_running_average=not train, momentum=0.9)(x, residual=x), (1, 2))

    net = Net()
    x = data((4, 6, 6, 3))
    variables = net.init(jax.random.key(0), x, train=False)

    def step(params, batch_stats, x):
        def loss(params):
            out, updates = net.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                     mutable=["batch_stats"])
            return jnp.sum(out ** 2), updates["batch_stats"]

        return jax.grad(loss, has_aux=True)(params)

    params, stats = variables["params"], variables["batch_stats"]
    batch = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 6, 6, 3"), jnp.float32)
    restored = _roundtrip(step, params, stats, batch)
    for n in (2, 4, 9):
        xb = data((n, 6, 6, 3), seed=n)
        assert same(restored.call(params, stats, xb), jax.jit(step)(params, stats, xb)), n


def test_a_process_runs_the_artifact_once_it_imports_batchnorm_jax(tmp_path):
    x = data((3, C, 2, 2))
    path = tmp_path / "inference.jaxexport"
    fn = jax.jit(lambda x: inference(x)[0])
    path.write_bytes(_roundtrip(fn, x).serialize())
    np.save(tmp_path / "x.npy", np.asarray(x))
    np.save(tmp_path / "y.npy", np.asarray(fn(x)))
    code = (
        "import sys, numpy as np, jax\n"
        "if sys.argv[1] == 'import': import batchnorm.jax\n"
        f"exp = jax.export.deserialize(open({str(path)!r}, 'rb').read())\n"
        f"y = exp.call(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"assert np.array_equal(np.asarray(y), np.load({str(tmp_path / 'y.npy')!r}))\n"
    )
    run = [sys.executable, "-c", code]
    done = subprocess.run(run + ["import"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    failed = subprocess.run(run + ["no-import"], capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "batchnorm_forward_inference" in failed.stderr
