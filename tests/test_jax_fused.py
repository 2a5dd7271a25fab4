"""Fused batch norm in batchnorm.jax: batch_norm(..., residual=, activation="relu") inside real XLA
programs (jit, grad in x, weight, bias and the residual, vmap, shard_map across 4 host devices in
a subprocess), against a float64 reference, against jax.grad of jax.numpy's unfused composition
act(bn(x) + residual), and bit for bit against the eager fused API; the Flax module's
activation= field against relu(flax.linen.BatchNorm(x) + residual). float32, bfloat16, float16,
float64; channels-first and channels-last."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'batchnorm[jax]')")
import jax.numpy as jnp  # noqa: E402

import batchnorm  # noqa: E402
import batchnorm.jax as bj  # noqa: E402

try:
    import flax.linen as flax_linen
except ImportError:  # pragma: no cover - depends on the environment
    flax_linen = None
needs_flax = pytest.mark.skipif(flax_linen is None, reason="flax is not installed (batchnorm[flax])")

DTYPES = ("float32", "bfloat16", "float16", "float64")
# Outputs against float64: a few ulps of the output dtype; gradients against jnp's float32
# composition (dy rounded to x's dtype on our side).
OUT_TOL = {"float64": 1e-12, "float32": 2e-5, "bfloat16": 2e-2, "float16": 2e-3}
GRAD_TOL = {"float64": 1e-5, "float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}
LAYOUTS = {"channels_first": ((6, 5, 4, 3), 1), "channels_last": ((6, 4, 3, 5), -1)}
# (residual given, activation)
FUSIONS = {"add_relu": (True, "relu"), "add": (True, None), "relu": (False, "relu")}


@pytest.fixture(autouse=True, scope="module")
def float64_enabled():
    """float64 arrays stay float64 in these tests (jax's x64 mode, restored afterwards)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def data(shape, dtype, seed=0, shift=0.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * scale + shift, dtype)


def params(c, seed=1):
    rng = np.random.default_rng(seed)
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return f(rng.standard_normal(c)), f(rng.standard_normal(c)), f(rng.standard_normal(c)), f(rng.random(c) + 0.5)


def per_channel(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def reduced(ndim, axis):
    return tuple(i for i in range(ndim) if i != axis % ndim)


def reference(x, w, b, r, activation, axis, eps=1e-5, stats=None):
    """act(bn(x) + r) in float64, with the batch statistics or the given (mean, var)."""
    x = np.asarray(x, np.float64)
    c = lambda v: per_channel(np.asarray(v, np.float64), x.ndim, axis)  # noqa: E731
    mean, var = (x.mean(reduced(x.ndim, axis)), x.var(reduced(x.ndim, axis))) if stats is None else stats
    y = (x - c(mean)) / np.sqrt(c(var) + eps) * c(w) + c(b)
    if r is not None:
        y = y + np.asarray(r, np.float64)
    return np.maximum(y, 0) if activation else y


def jnp_unfused(x, w, b, r, activation, axis, eps=1e-5, stats=None):
    """The jax.numpy composition jax.grad differentiates for the reference gradients: batch
    norm in float32 (float64 for float64), then the add, then the ReLU, as separate ops."""
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    x = x.astype(acc)
    if stats is None:
        mean = x.mean(reduced(x.ndim, axis), keepdims=True)
        var = ((x - mean) ** 2).mean(reduced(x.ndim, axis), keepdims=True)
    else:
        mean, var = (per_channel(s.astype(acc), x.ndim, axis) for s in stats)
    c = lambda v: per_channel(v.astype(acc), x.ndim, axis)  # noqa: E731
    y = (x - mean) * jax.lax.rsqrt(var + eps) * c(w) + c(b)
    if r is not None:
        y = y + r.astype(acc)
    return jax.nn.relu(y) if activation else y


def close(got, want, tol):
    got = np.asarray(jnp.asarray(got, jnp.float64), np.float64)
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(np.abs(want).max(), 1e-30))


def case(fusion, layout, dtype):
    (shape, axis), (has_r, act) = LAYOUTS[layout], FUSIONS[fusion]
    x = data(shape, dtype, shift=1.0)
    r = data(shape, dtype, seed=3, scale=1.5) if has_r else None
    return x, r, act, axis


# ---- forward -------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_forward(dtype, layout, fusion):
    x, r, act, axis = case(fusion, layout, dtype)
    w, b, rm, rv = params(x.shape[axis])
    f = jax.jit(lambda x, w, b, rm, rv, r: bj.batch_norm(x, w, b, rm, rv, training=True, momentum=0.2, axis=axis,
                                                        residual=r, activation=act))
    y, new_rm, new_rv = f(x, w, b, rm, rv, r)
    assert y.dtype == x.dtype and y.shape == x.shape
    close(y, reference(x, w, b, r, act, axis), OUT_TOL[dtype])
    # The running statistics are those of x alone: the unfused call's (XLA may fuse the (C,)
    # update differently in the two programs: a float32 ulp).
    _, plain_rm, plain_rv = jax.jit(lambda x: bj.batch_norm(x, w, b, rm, rv, training=True, momentum=0.2,
                                                            axis=axis))(x)
    close(new_rm, plain_rm, 1e-6)
    close(new_rv, plain_rv, 1e-6)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_forward(dtype, layout, fusion):
    x, r, act, axis = case(fusion, layout, dtype)
    w, b, rm, rv = params(x.shape[axis])
    y, out_rm, out_rv = jax.jit(lambda x, r: bj.batch_norm(x, w, b, rm, rv, training=False, eps=1e-3, axis=axis,
                                                           residual=r, activation=act))(x, r)
    close(y, reference(x, w, b, r, act, axis, 1e-3, stats=(rm, rv)), OUT_TOL[dtype])
    assert np.array_equal(out_rm, rm) and np.array_equal(out_rv, rv)


def test_same_bits_as_the_eager_fused_api():
    """The same kernels as batchnorm.forward_training / backward(..., y=, activation=,
    residual=True): forward and every gradient bit for bit."""
    x, r, act, axis = case("add_relu", "channels_first", "float32")
    w, b, _, _ = params(x.shape[axis])
    dy = data(x.shape, "float32", seed=11)
    y, vjp = jax.vjp(lambda x, w, b, r: bj.batch_norm(x, w, b, None, None, training=True, axis=axis, residual=r,
                                                      activation=act)[0], x, w, b, r)
    grads = jax.jit(vjp)(dy)
    n = lambda a: np.asarray(a)  # noqa: E731
    # JAX arrays to the eager API: its kernels on the device JAX used (bits differ across devices).
    y_eager, mean, invstd = batchnorm.forward_training(x, w, b, axis=axis, residual=r, activation=act)
    np.testing.assert_array_equal(n(y), n(y_eager))
    dx, dw, db, dr = batchnorm.backward(dy, x, mean, invstd, w, axis=axis, y=y_eager, activation=act, residual=True)
    for got, want in zip(grads, (dx, dw, db, dr)):
        np.testing.assert_array_equal(n(got), n(want))


# ---- gradients against jax.grad of the unfused composition ------------------------------------

@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_grad_matches_unfused_jnp(dtype, layout, fusion):
    x, r, act, axis = case(fusion, layout, dtype)
    w, b, _, _ = params(x.shape[axis])
    g = data(x.shape, "float32", seed=7)

    def loss(f):
        return lambda x, w, b, r: jnp.sum(f(x, w, b, r).astype(jnp.float32) * g)

    argnums = (0, 1, 2, 3) if r is not None else (0, 1, 2)
    ours = jax.jit(jax.grad(loss(lambda x, w, b, r: bj.batch_norm(
        x, w, b, None, None, training=True, axis=axis, residual=r, activation=act)[0]), argnums=argnums))(x, w, b, r)
    want = jax.grad(loss(lambda x, w, b, r: jnp_unfused(x, w, b, r, act, axis)), argnums=argnums)(x, w, b, r)
    assert [a.dtype for a in ours] == [x.dtype, w.dtype, b.dtype, x.dtype][:len(argnums)]
    for got, ref in zip(ours, want):
        close(got, ref, GRAD_TOL[dtype])


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("dtype", ("float32", "float64"))
def test_inference_grad_matches_unfused_jnp(dtype, fusion):
    x, r, act, axis = case(fusion, "channels_last", dtype)
    w, b, rm, rv = params(x.shape[axis])

    def loss(f):
        return lambda x, w, b, r: jnp.sum(jnp.sin(f(x, w, b, r).astype(jnp.float32)))

    argnums = (0, 1, 2, 3) if r is not None else (0, 1, 2)
    ours = jax.jit(jax.grad(loss(lambda x, w, b, r: bj.batch_norm(
        x, w, b, rm, rv, training=False, axis=axis, residual=r, activation=act)[0]), argnums=argnums))(x, w, b, r)
    want = jax.grad(loss(lambda x, w, b, r: jnp_unfused(x, w, b, r, act, axis, stats=(rm, rv))),
                    argnums=argnums)(x, w, b, r)
    for got, ref in zip(ours, want):
        close(got, ref, GRAD_TOL[dtype])
    if r is not None:  # only the residual differentiated: no parameter sums, the same gradient
        dr = jax.grad(lambda r: loss(lambda x, w, b, r: bj.batch_norm(
            x, w, b, rm, rv, training=False, axis=axis, residual=r, activation=act)[0])(x, w, b, r))(r)
        close(dr, want[3], GRAD_TOL[dtype])


def test_grad_through_running_statistics():
    """A loss that reads the updated running statistics: their gradient flows to x beside the
    fused output's (the statistics are x's alone, the residual gets none of it)."""
    x, r, act, axis = case("add_relu", "channels_first", "float32")
    w, b, rm, rv = params(x.shape[axis])

    def ours(x, w, b, r):
        y, new_rm, new_rv = bj.batch_norm(x, w, b, rm, rv, training=True, axis=axis, residual=r, activation=act)
        return jnp.sum(y ** 2) + jnp.sum(new_rm * 3.0) + jnp.sum(new_rv * 5.0)

    def unfused(x, w, b, r):
        red = reduced(x.ndim, axis)
        n = x.size // x.shape[axis]
        mean, var = x.mean(red), x.var(red)
        y = jnp_unfused(x, w, b, r, act, axis)
        return jnp.sum(y ** 2) + jnp.sum((0.9 * rm + 0.1 * mean) * 3.0) + \
            jnp.sum((0.9 * rv + 0.1 * var * n / (n - 1)) * 5.0)

    for got, ref in zip(jax.grad(ours, argnums=(0, 1, 2, 3))(x, w, b, r),
                        jax.grad(unfused, argnums=(0, 1, 2, 3))(x, w, b, r)):
        close(got, ref, 1e-5)


# ---- vmap ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_vmap():
    shape, axis = LAYOUTS["channels_last"]
    xs = jnp.stack([data(shape, "float32", seed=s, shift=5.0 * s) * (s + 1) for s in range(3)])
    rs = jnp.stack([data(shape, "float32", seed=10 + s) for s in range(3)])
    w, b, rm, rv = params(shape[axis])

    def f(x, r, rm, rv):
        return bj.batch_norm(x, w, b, rm, rv, training=True, axis=axis, residual=r, activation="relu")

    ys, rms, _ = jax.jit(jax.vmap(f, in_axes=(0, 0, None, None)))(xs, rs, rm, rv)
    assert rms.shape == (3, shape[axis])
    for s in range(3):
        np.testing.assert_array_equal(np.asarray(ys[s]), np.asarray(f(xs[s], rs[s], rm, rv)[0]))
    # An unbatched residual is broadcast to every slice.
    ys = jax.vmap(lambda x: f(x, rs[0], None, None)[0])(xs)
    for s in range(3):
        close(ys[s], reference(xs[s], w, b, rs[0], "relu", axis), 2e-5)
    # vmap of grad, in x, the residual and a batched weight.
    ws = jnp.stack([w, 2 * w, -w])
    g = data(shape, "float32", seed=9)

    def loss(f):
        return lambda x, w, r: jnp.sum(f(x, w, r) * g)

    ours = jax.vmap(jax.grad(loss(lambda x, w, r: bj.batch_norm(
        x, w, b, None, None, training=True, axis=axis, residual=r, activation="relu")[0]), argnums=(0, 1, 2)))(xs, ws,
                                                                                                            rs)
    want = jax.vmap(jax.grad(loss(lambda x, w, r: jnp_unfused(x, w, b, r, "relu", axis)), argnums=(0, 1, 2)))(xs, ws,
                                                                                                          rs)
    for got, ref in zip(ours, want):
        close(got, ref, 1e-5)
    # Inference under vmap.
    yi = jax.vmap(lambda x, r: bj.batch_norm(x, w, b, rm, rv, training=False, axis=axis, residual=r,
                                             activation="relu")[0])(xs, rs)
    for s in range(3):
        close(yi[s], reference(xs[s], w, b, rs[s], "relu", axis, stats=(rm, rv)), 2e-5)


# ---- errors at trace time, in the eager API's words ----------------------------------------

def _bad_residual_shape(x):
    return dict(residual=jnp.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype))


BAD = {
    "residual shape": _bad_residual_shape,
    "residual dtype": lambda x: dict(residual=jnp.zeros(x.shape, jnp.float16)),
    "activation name": lambda x: dict(activation="tanh"),
    "activation type": lambda x: dict(activation=1),
}


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("bad", BAD)
def test_errors_raise_while_tracing_with_eager_messages(bad, training):
    x = data((4, 3, 2), "float32")
    kw = BAD[bad](x)
    eager_kw = {k: (np.asarray(v) if k == "residual" else v) for k, v in kw.items()}
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises((ValueError, TypeError)) as eager:
        if training:
            batchnorm.forward_training(np.asarray(x), **eager_kw)
        else:
            batchnorm.forward_inference(np.asarray(x), mean, var, **eager_kw)
    traced = jax.jit(lambda x: bj.batch_norm(x, None, None, jnp.asarray(mean), jnp.asarray(var), training=training,
                                             **kw)[0])
    with pytest.raises(eager.type) as got:
        traced.trace(x)  # raised while tracing: no XLA program is built
    assert str(got.value) == str(eager.value)


# ---- Flax ----------------------------------------------------------------------------------

@needs_flax
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_flax_module_matches_relu_of_flax_batchnorm_plus_residual(dtype):
    nn = flax_linen
    x = data((8, 4, 4, 5), dtype, shift=0.5)
    r = data(x.shape, dtype, seed=4)
    ours = bj.BatchNorm(activation="relu", momentum=0.9)
    flax = nn.BatchNorm(momentum=0.9, use_fast_variance=False)
    variables = flax.init(jax.random.PRNGKey(0), x, use_running_average=False)
    variables = {**variables, "params": {"scale": params(5)[0], "bias": params(5)[1]}}
    assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x, use_running_average=False, residual=r)) == \
        jax.tree.structure(variables)

    def ours_step(v, x, r):
        return ours.apply(v, x, use_running_average=False, residual=r, mutable=["batch_stats"])

    def flax_step(v, x, r):
        y, s = flax.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        return nn.relu(y + r), s

    (y1, s1), (y2, s2) = jax.jit(ours_step)(variables, x, r), flax_step(variables, x, r)
    assert y1.dtype == y2.dtype
    close(y1, y2.astype(jnp.float32), OUT_TOL[dtype] * 2)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        close(a, b, 1e-6)
    # The parameters' and the residual's gradients, training and eval.
    g = data(x.shape, "float32", seed=8)
    for use_ra in (False, True):
        def loss(step):
            def run(p, r):
                v = {**variables, "params": p}
                if use_ra:
                    y = ours.apply(v, x, use_running_average=True, residual=r) if step is ours_step else \
                        nn.relu(flax.apply(v, x, use_running_average=True) + r)
                else:
                    y = step(v, x, r)[0]
                return jnp.sum(y.astype(jnp.float32) * g)
            return run

        got = jax.grad(loss(ours_step), argnums=(0, 1))(variables["params"], r)
        want = jax.grad(loss(flax_step), argnums=(0, 1))(variables["params"], r)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            close(a, b.astype(jnp.float32), {"float32": 1e-5, "bfloat16": 3e-2}[dtype])


@needs_flax
def test_flax_module_without_activation_is_unchanged():
    x = data((8, 5), "float32")
    variables = bj.BatchNorm().init(jax.random.PRNGKey(0), x, use_running_average=False)
    y1, _ = bj.BatchNorm().apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    y2, _ = bj.BatchNorm(activation=None).apply(variables, x, use_running_average=False, mutable=["batch_stats"],
                                                residual=None)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'gelu'"):
        bj.BatchNorm(activation="gelu").init(jax.random.PRNGKey(0), x, use_running_average=False)


# ---- shard_map (4 host devices, own process) ------------------------------------------------

@pytest.mark.slow
def test_shard_map_matches_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sharded fused checks passed" in proc.stdout


def _sharded_checks():
    """Run in a process whose XLA has 4 CPU devices (test_shard_map_matches_unsharded): the
    synced statistics with the fused epilogue, forward and gradients in x, w, b, residual."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("batch",))
    for fusion in FUSIONS:
        has_r, act = FUSIONS[fusion]
        shape, axis = (8, 5, 3), 1
        x = jnp.concatenate([data((2,) + shape[1:], "float32", seed=s, shift=3.0 * s) * (1 + s) for s in range(4)])
        r = data(shape, "float32", seed=6) if has_r else jnp.zeros(shape, jnp.float32)
        w, b, rm, rv = params(shape[axis])
        g = data(shape, "float32", seed=5)

        def bn(axis_name):
            return lambda x, r, w, b: bj.batch_norm(x, w, b, rm, rv, training=True, axis=axis, axis_name=axis_name,
                                                    residual=r if has_r else None, activation=act)

        sharded = jax.shard_map(bn("batch"), mesh=mesh, in_specs=(P("batch"), P("batch"), P(), P()),
                                out_specs=(P("batch"), P(), P()))
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))  # noqa: E731
        y, new_rm, new_rv = jax.jit(sharded)(put(x), put(r), w, b)
        y0, rm0, rv0 = bn(None)(x, r, w, b)
        close(y, y0, 2e-5)
        close(y, reference(x, w, b, r if has_r else None, act, axis), 2e-5)
        close(new_rm, rm0, 1e-6)
        close(new_rv, rv0, 1e-6)

        def loss(f):
            return lambda x, r, w, b: jnp.sum(f(x, r, w, b)[0] * g)

        grads = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2, 3)))(put(x), put(r), w, b)
        want = jax.grad(loss(lambda x, r, w, b: (jnp_unfused(x, w, b, r if has_r else None, act, axis),)),
                        argnums=(0, 1, 2, 3))(x, r, w, b)
        for got, ref in zip(grads, want):
            close(got, ref, 1e-5)
    print("sharded fused checks passed")


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    _sharded_checks()
