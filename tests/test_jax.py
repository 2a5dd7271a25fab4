"""batchnorm.jax inside real XLA programs: jit, grad (against jax.grad of a pure-jnp batch
norm), vmap, shard_map across 4 host devices (in a subprocess, as XLA reads the device count
once per process), trace-time errors identical to the eager API's, and a Flax model trained
with ours vs flax.linen.BatchNorm. float32, bfloat16 and float16; channels-last and -first."""
from __future__ import annotations

import os
from functools import partial
import subprocess
import warnings
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'batchnorm[jax]')")
import jax.numpy as jnp  # noqa: E402

import batchnorm  # noqa: E402
import batchnorm.jax as bj  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
# Outputs against a float64 computation: a few ulps of the output dtype.
OUT_TOL = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 2e-3}
# (shape, channel axis): channels-first N,C,H,W and channels-last N,H,W,C (Flax's default).
LAYOUTS = {"channels_first": ((6, 5, 4, 3), 1), "channels_last": ((6, 4, 3, 5), -1)}


def data(shape, dtype, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 2.0 + shift
    return jnp.asarray(x, dtype)


def params(c, seed=1):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(c), jnp.float32), jnp.asarray(rng.standard_normal(c), jnp.float32),
            jnp.asarray(rng.standard_normal(c), jnp.float32), jnp.asarray(rng.random(c) + 0.5, jnp.float32))


def per_channel(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(v, shape)


def reference(x, w, b, axis, eps=1e-5):
    """float64 training batch norm: (y, batch mean, biased batch var)."""
    x = np.asarray(x, np.float64)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean, var = x.mean(red), x.var(red)
    c = lambda v: per_channel(v, x.ndim, axis)  # noqa: E731
    y = (x - c(mean)) / np.sqrt(c(var) + eps) * c(np.asarray(w, np.float64)) + c(np.asarray(b, np.float64))
    return y, mean, var


def jnp_batch_norm(x, w, b, axis, eps=1e-5):
    """The pure-jnp batch norm jax.grad differentiates for the reference gradients (float32)."""
    x = x.astype(jnp.float32)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean = x.mean(red, keepdims=True)
    var = ((x - mean) ** 2).mean(red, keepdims=True)
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - mean) * jax.lax.rsqrt(var + eps) * w.reshape(shape) + b.reshape(shape)


def close(got, want, tol, scale=None):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(want, np.float64)
    scale = np.abs(want).max() if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(scale, 1e-30))


# ---- forward -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_under_jit(dtype, layout):
    shape, axis = LAYOUTS[layout]
    x = data(shape, dtype, shift=3.0)
    w, b, rm, rv = params(shape[axis])
    f = jax.jit(lambda *a: bj.batch_norm(*a, training=True, momentum=0.2, axis=axis))
    y, new_rm, new_rv = f(x, w, b, rm, rv)
    assert y.dtype == x.dtype and y.shape == x.shape
    y_ref, mean, var = reference(x, w, b, axis)
    close(y, y_ref, OUT_TOL[dtype])
    n = x.size // shape[axis]
    close(new_rm, 0.8 * np.asarray(rm, np.float64) + 0.2 * mean, 1e-6)
    close(new_rv, 0.8 * np.asarray(rv, np.float64) + 0.2 * var * n / (n - 1), 1e-6)
    assert new_rm.dtype == rm.dtype and new_rv.dtype == rv.dtype


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_under_jit(dtype, layout):
    shape, axis = LAYOUTS[layout]
    x = data(shape, dtype)
    w, b, rm, rv = params(shape[axis])
    y, out_rm, out_rv = jax.jit(lambda *a: bj.batch_norm(*a, training=False, eps=1e-3, axis=axis))(x, w, b, rm, rv)
    c = lambda v: per_channel(np.asarray(v, np.float64), x.ndim, axis)  # noqa: E731
    want = (np.asarray(x, np.float64) - c(rm)) / np.sqrt(c(rv) + 1e-3) * c(w) + c(b)
    close(y, want, OUT_TOL[dtype])
    assert out_rm is not None and np.array_equal(out_rm, rm) and np.array_equal(out_rv, rv)


def test_matches_eager_api_and_optional_arguments():
    x = data((8, 3, 5), "float32")
    w, b, rm, rv = params(3)
    y, _, _ = jax.jit(lambda x, w, b: bj.batch_norm(x, w, b, None, None, training=True))(x, w, b)
    # JAX arrays to the eager API: its kernels on the device JAX used, so bit for bit.
    y_eager, _, _ = batchnorm.forward_training(x, w, b)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_eager))
    y, r1, r2 = bj.batch_norm(x, None, None, None, None, training=True)
    assert r1 is None and r2 is None
    close(y, reference(x, np.ones(3), np.zeros(3), 1)[0], OUT_TOL["float32"])


def test_nonfinite_values_stay_in_their_channel():
    x = np.array(data((6, 3, 4), "float32"))
    x[2, 1, 3] = np.nan
    y, rm, rv = jax.jit(lambda x: bj.batch_norm(x, None, None, jnp.zeros(3), jnp.ones(3), training=True))(x)
    y, rm, rv = map(np.asarray, (y, rm, rv))
    assert np.isnan(y[:, 1]).all() and np.isnan(rm[1]) and np.isnan(rv[1])
    assert np.isfinite(y[:, [0, 2]]).all() and np.isfinite(rm[[0, 2]]).all()


# ---- grad ----------------------------------------------------------------------------------

GRAD_TOL = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_matches_jnp_reference(dtype, layout):
    shape, axis = LAYOUTS[layout]
    x = data(shape, dtype, shift=1.0)
    w, b, _, _ = params(shape[axis])
    g = data(shape, "float32", seed=7)

    def loss(f):
        return lambda x, w, b: jnp.sum(f(x, w, b).astype(jnp.float32) * g)

    ours = jax.jit(jax.grad(loss(lambda x, w, b: bj.batch_norm(x, w, b, None, None, training=True, axis=axis)[0]),
                            argnums=(0, 1, 2)))(x, w, b)
    want = jax.grad(loss(lambda x, w, b: jnp_batch_norm(x, w, b, axis)), argnums=(0, 1, 2))(x, w, b)
    assert [a.dtype for a in ours] == [x.dtype, w.dtype, b.dtype]
    for got, ref in zip(ours, want):
        close(got, ref, GRAD_TOL[dtype])


@pytest.mark.slow
def test_grad_through_running_statistics_and_in_inference():
    x = data((10, 4), "float32", shift=2.0)
    w, b, rm, rv = params(4)

    # A loss that reads the updated running statistics differentiates the batch mean and
    # variance too (d mean/dx = 1/n, d var/dx = 2 (x - mean) / (n - 1)).
    def loss(f):
        def run(x, w, b):
            y, new_rm, new_rv = f(x, w, b)
            return jnp.sum(y ** 2) + jnp.sum(new_rm * 3.0) + jnp.sum(new_rv * 5.0)
        return run

    def jnp_with_stats(x, w, b):
        n = x.shape[0]
        mean, var = x.mean(0), x.var(0)
        return jnp_batch_norm(x, w, b, 1), 0.9 * rm + 0.1 * mean, 0.9 * rv + 0.1 * var * n / (n - 1)

    ours = jax.grad(loss(lambda x, w, b: bj.batch_norm(x, w, b, rm, rv, training=True)), argnums=(0, 1, 2))(x, w, b)
    want = jax.grad(loss(jnp_with_stats), argnums=(0, 1, 2))(x, w, b)
    for got, ref in zip(ours, want):
        close(got, ref, 1e-5)

    def inference_loss(f):
        return lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b)))

    c = lambda v: v.reshape(1, -1)  # noqa: E731
    ours = jax.jit(jax.grad(inference_loss(lambda x, w, b: bj.batch_norm(x, w, b, rm, rv, training=False)[0]),
                            argnums=(0, 1, 2)))(x, w, b)
    want = jax.grad(inference_loss(lambda x, w, b: (x - c(rm)) * jax.lax.rsqrt(c(rv) + 1e-5) * c(w) + c(b)),
                    argnums=(0, 1, 2))(x, w, b)
    for got, ref in zip(ours, want):
        close(got, ref, 1e-5)
    # Only x differentiated: the parameter sums are skipped, dx is the same.
    dx_only = jax.grad(lambda x: inference_loss(lambda x, w, b: bj.batch_norm(x, w, b, rm, rv, training=False)[0])(
        x, w, b))(x)
    close(dx_only, want[0], 1e-5)


# ---- vmap ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_vmap_keeps_mapped_slices_independent():
    shape, axis = LAYOUTS["channels_last"]
    # Slices at very different scales: folding the mapped axis into the statistics would show.
    xs = jnp.stack([data(shape, "float32", seed=s, shift=10.0 * s) * (s + 1) for s in range(3)])
    w, b, rm, rv = params(shape[axis])

    def f(x, rm, rv):
        return bj.batch_norm(x, w, b, rm, rv, training=True, axis=axis)

    ys, rms, rvs = jax.jit(jax.vmap(f, in_axes=(0, None, None)))(xs, rm, rv)
    assert rms.shape == (3, shape[axis])  # the running statistics come back batched
    for s in range(3):
        y, new_rm, new_rv = f(xs[s], rm, rv)
        np.testing.assert_array_equal(np.asarray(ys[s]), np.asarray(y))  # the same kernel calls
        close(rms[s], new_rm, 1e-6)  # XLA may fuse the (C,) update differently under jit
        close(rvs[s], new_rv, 1e-6)
    # A mapped axis that is not the leading one, batched parameters, and vmap of grad.
    xt = jnp.moveaxis(xs, 0, 2)
    ws = jnp.stack([w, 2 * w, -w])
    yt = jax.vmap(lambda x, w: bj.batch_norm(x, w, b, None, None, training=True, axis=axis)[0],
                  in_axes=(2, 0), out_axes=2)(xt, ws)
    for s in range(3):
        close(yt[:, :, s], reference(xs[s], ws[s], b, axis)[0], OUT_TOL["float32"])
    g = data(shape, "float32", seed=9)
    grads = jax.vmap(jax.grad(lambda x, w: jnp.sum(bj.batch_norm(x, w, b, None, None, training=True,
                                                                 axis=axis)[0] * g), argnums=(0, 1)))(xs, ws)
    want = jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp_batch_norm(x, w, b, axis) * g), argnums=(0, 1)))(xs, ws)
    for got, ref in zip(grads, want):
        close(got, ref, 1e-5)
    yi = jax.vmap(lambda x: bj.batch_norm(x, w, b, rm, rv, training=False, axis=axis)[0])(xs)
    for s in range(3):
        np.testing.assert_array_equal(np.asarray(yi[s]),
                                      np.asarray(bj.batch_norm(xs[s], w, b, rm, rv, training=False, axis=axis)[0]))


# ---- errors at trace time, in the eager API's words ----------------------------------------

def _eager_error(call):
    with pytest.raises((ValueError, TypeError)) as eager:
        call()
    return eager


BAD_CALLS = {
    "weight shape": (lambda x: (x, jnp.ones(4), None), dict(axis=1)),
    "axis out of range": (lambda x: (x, None, None), dict(axis=3)),
    "integer x": (lambda x: (x.astype(jnp.int32), None, None), dict(axis=1)),
    "rank 1": (lambda x: (x[:, 0, 0], None, None), dict(axis=0)),
    "one value per channel": (lambda x: (x[:1, :, :1], None, None), dict(axis=1)),
    "negative eps": (lambda x: (x, None, None), dict(axis=1, eps=-1.0)),
    "momentum": (lambda x: (x, None, None), dict(axis=1, momentum=1.5)),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_errors_raise_while_tracing_with_eager_messages(case):
    make, kw = BAD_CALLS[case]
    x, w, b = make(data((4, 3, 2), "float32"))
    eager = _eager_error(lambda: batchnorm.forward_training(np.asarray(x), None if w is None else np.asarray(w),
                                                           None if b is None else np.asarray(b), **kw))
    traced = jax.jit(lambda x: bj.batch_norm(x, w, b, None, None, training=True, **kw)[0])
    with pytest.raises(eager.type) as got:
        traced.trace(x)  # raised while tracing: no XLA program is built
    assert str(got.value) == str(eager.value)


def test_inference_errors_name_the_running_statistics():
    x = data((4, 3, 2), "float32")
    with pytest.raises(ValueError, match=r"^running_var must have shape \(3,\), got \(2,\)"):
        jax.jit(lambda x: bj.batch_norm(x, None, None, jnp.zeros(3), jnp.ones(2), training=False)).trace(x)
    with pytest.raises(TypeError, match="running_mean must be an array when training=False, got None"):
        bj.batch_norm(x, None, None, None, None, training=False)
    eager = _eager_error(lambda: batchnorm.forward_training(np.asarray(x), running_mean=np.zeros(3)))
    with pytest.raises(ValueError) as got:
        bj.batch_norm(x, None, None, jnp.zeros(3), None, training=True)
    assert str(got.value) == str(eager.value)


# ---- Flax ----------------------------------------------------------------------------------

try:
    import flax.linen as flax_linen
    import optax
except ImportError:  # pragma: no cover - depends on the environment
    flax_linen = optax = None
needs_flax = pytest.mark.skipif(flax_linen is None, reason="flax and optax are not installed (batchnorm[flax])")


def cnn(norm, axis):
    """conv - BN - ReLU - dense, with the given BatchNorm class."""
    nn = flax_linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            if axis == 1:  # channels-first input: Flax convs want channels-last
                x = jnp.moveaxis(x, 1, -1)
            x = nn.Conv(8, (3, 3))(x)
            if axis == 1:
                x = jnp.moveaxis(x, -1, 1)
            x = norm(use_running_average=not train, momentum=0.9, axis=axis, use_fast_variance=False)(x)
            x = nn.relu(x)
            return nn.Dense(4)(x.reshape(x.shape[0], -1))

    return Net()


def train_three_steps(norm, axis, x, labels):
    model = cnn(norm, axis)
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    opt = optax.sgd(0.1)
    state = (variables["params"], variables["batch_stats"], opt.init(variables["params"]))

    @jax.jit
    def step(state, x, labels):
        p, stats, opt_state = state

        def loss(p):
            logits, updates = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(p)
        upd, opt_state = opt.update(grads, opt_state, p)
        return (optax.apply_updates(p, upd), updates["batch_stats"], opt_state), value

    for _ in range(3):
        state, value = step(state, x, labels)
    eval_out = model.apply({"params": state[0], "batch_stats": state[1]}, x, train=False)
    return state[0], state[1], eval_out


@pytest.mark.slow
@needs_flax
@pytest.mark.parametrize("axis", [-1, 1], ids=["channels_last", "channels_first"])
def test_flax_model_trains_like_flax_batchnorm(axis):
    shape = (8, 6, 6, 3) if axis == -1 else (8, 3, 6, 6)
    x = data(shape, "float32", shift=0.5)
    labels = jnp.arange(8) % 4
    ours = train_three_steps(bj.BatchNorm, axis, x, labels)
    flax = train_three_steps(flax_linen.BatchNorm, axis, x, labels)
    leaves_ours, tree_ours = jax.tree.flatten(ours)
    leaves_flax, tree_flax = jax.tree.flatten(flax)
    assert tree_ours == tree_flax  # the same variables: one import swaps the layer
    for a, b in zip(leaves_ours, leaves_flax):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


@needs_flax
@pytest.mark.parametrize("dtype", DTYPES)
def test_flax_module_dtypes_match_flax(dtype):
    x = data((16, 5), dtype, shift=1.0)
    for kwargs in ({}, {"dtype": jnp.dtype(dtype)}, {"use_scale": False, "use_bias": False}):
        ours_mod, flax_mod = bj.BatchNorm(**kwargs), flax_linen.BatchNorm(use_fast_variance=False, **kwargs)
        variables = flax_mod.init(jax.random.PRNGKey(0), x, use_running_average=False)
        assert jax.tree.structure(ours_mod.init(jax.random.PRNGKey(0), x, use_running_average=False)) == \
            jax.tree.structure(variables)
        y1, s1 = ours_mod.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        y2, s2 = flax_mod.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        assert y1.dtype == y2.dtype
        close(y1, np.asarray(y2.astype(jnp.float32)), OUT_TOL[dtype] * 2)
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
            close(a, b, 1e-6)
        e1 = ours_mod.apply(s1 | {"params": variables.get("params", {})}, x, use_running_average=True)
        e2 = flax_mod.apply(s1 | {"params": variables.get("params", {})}, x, use_running_average=True)
        assert e1.dtype == e2.dtype
        close(e1, np.asarray(e2.astype(jnp.float32)), OUT_TOL[dtype] * 2)


# ---- reviewed edge cases: vmap's axis_name, empty batches, argument types ----------------------

def test_grad_of_vmap_with_axis_name_matches_the_unmapped_batch():
    """vmap(axis_name) standing in for devices (as Flax's own tests do): its transpose traces the
    backward where the axis is not bound, so the shard count is taken in the forward."""
    x = data((2, 3, 4), "float32", seed=3)
    w, b, _, _ = params(4)
    wt = jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) / x.size

    def mapped(x):
        y = jax.vmap(lambda xd: bj.batch_norm(xd, w, b, None, None, training=True, axis_name="i")[0], axis_name="i")(x)
        return jnp.sum(y**3 * wt)

    def whole(x):
        return jnp.sum(bj.batch_norm(x.reshape(6, 4), w, b, None, None, training=True)[0].reshape(x.shape)**3 * wt)

    close(jax.grad(mapped)(x), jax.grad(whole)(x), 1e-4)


def test_inference_gradient_of_an_empty_batch_is_zero():
    x = jnp.zeros((0, 3), jnp.float32)
    w, b, rm, rv = params(3)
    dw, db = jax.grad(lambda w, b: jnp.sum(bj.batch_norm(x, w, b, rm, rv, training=False)[0]), argnums=(0, 1))(w, b)
    assert np.all(np.asarray(dw) == 0) and np.all(np.asarray(db) == 0)


@pytest.mark.parametrize("kw, message", [
    (dict(axis="1"), "axis must be an int, got str"),
    (dict(axis=1.0), "axis must be an int, got float"),
    (dict(axis=True), "axis must be an int, got bool"),
    (dict(eps=None), "eps must be a real number, got NoneType"),
    (dict(momentum=None), "momentum must be a real number, got NoneType"),
])
@pytest.mark.parametrize("training", [True, False])
def test_scalar_arguments_are_checked_like_the_array_api(kw, message, training):
    if "momentum" in kw and not training:
        return  # inference takes no momentum
    w, b, rm, rv = params(3)
    with pytest.raises(TypeError, match=message):
        bj.batch_norm(data((4, 3), "float32"), w, b, rm, rv, training=training, **kw)


def test_traced_eps_is_refused_by_name():
    w, b, rm, rv = params(3)
    with pytest.raises(TypeError, match="eps must be a Python number fixed at trace time"):
        jax.jit(lambda e: bj.batch_norm(data((4, 3), "float32"), w, b, rm, rv, training=True, eps=e))(1e-3)


@needs_flax
def test_flax_batch_stats_keep_flax_dtypes_through_a_scan():
    """The running statistics in Flax's dtype for them (here float16: param_dtype with
    force_float32_reductions=False), so a scan over steps carries them unchanged."""
    x = data((8, 4), "float16", seed=2)
    for module in (bj.BatchNorm(param_dtype=jnp.float16, force_float32_reductions=False),
                   bj.BatchNorm(dtype=jnp.bfloat16)):
        v = module.init(jax.random.PRNGKey(0), x, use_running_average=False)
        twin = flax_linen.BatchNorm(param_dtype=module.param_dtype, dtype=module.dtype,
                                    force_float32_reductions=module.force_float32_reductions)
        _, theirs = twin.apply(v, x, use_running_average=False, mutable=["batch_stats"])

        def step(stats, _):
            _, new = module.apply({"params": v["params"], "batch_stats": stats}, x, use_running_average=False,
                                  mutable=["batch_stats"])
            return new["batch_stats"], None

        stats, _ = jax.lax.scan(step, v["batch_stats"], None, length=3)
        for ours, flax_stat in zip(jax.tree.leaves(stats), jax.tree.leaves(theirs["batch_stats"])):
            assert ours.dtype == flax_stat.dtype, (ours.dtype, flax_stat.dtype)


@needs_flax
def test_flax_init_with_a_dummy_batch_of_one():
    x = jnp.ones((1, 6), jnp.float32) * 3
    y, v = bj.BatchNorm(use_bias=True, bias_init=jax.nn.initializers.constant(0.5)).init_with_output(
        jax.random.PRNGKey(0), x, use_running_average=False)
    y0, v0 = flax_linen.BatchNorm(bias_init=jax.nn.initializers.constant(0.5)).init_with_output(
        jax.random.PRNGKey(0), x, use_running_average=False)
    close(y, y0, 1e-6)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v0)


@needs_flax
@pytest.mark.parametrize("shape,axis", [((1, 5), -1), ((1, 1, 1, 3), -1), ((1, 4, 1), 1)])
def test_flax_training_on_one_value_per_channel_is_flax_s(shape, axis):
    """A batch of one in training (which the kernels refuse: no variance): Flax's y (the bias,
    x - mean being 0), its batch_stats update (mean x, variance 0) and gradients (none to x or
    the scale); fused, relu(bias + residual); a NaN stays NaN."""
    x = data(shape, "float32", seed=3)
    r = data(shape, "float32", seed=4)
    C = shape[axis]
    params = {"scale": jnp.linspace(0.5, 2.0, C), "bias": jnp.linspace(-1.0, 1.0, C)}
    stats = {"mean": jnp.full((C,), 0.25), "var": jnp.full((C,), 2.0)}

    def run(module, x, p, act=lambda y: y, residual=None):
        kwargs = {} if residual is None else {"residual": residual}
        y, new = module.apply({"params": p, "batch_stats": stats}, x, use_running_average=False,
                              mutable=["batch_stats"], **kwargs)
        return act(y) if residual is None or module.__class__ is flax_linen.BatchNorm else y, new

    ours_m = bj.BatchNorm(axis=axis, momentum=0.8)
    flax_m = flax_linen.BatchNorm(axis=axis, momentum=0.8)
    (y, new), (y0, new0) = run(ours_m, x, params), run(flax_m, x, params)
    close(y, y0, 1e-6)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new0)):
        close(a, b, 1e-6)
    loss = lambda m: lambda p, x: (run(m, x, p)[0] ** 2).sum()  # noqa: E731
    for g, g0 in zip(jax.tree.leaves(jax.grad(loss(ours_m), (0, 1))(params, x)),
                     jax.tree.leaves(jax.grad(loss(flax_m), (0, 1))(params, x))):
        close(g, g0, 1e-6)
    fused = bj.BatchNorm(axis=axis, momentum=0.8, activation="relu")
    y, _ = run(fused, x, params, residual=r)
    close(y, jax.nn.relu(run(flax_m, x, params)[0] + r), 1e-6)
    y, new = run(ours_m, x.at[(0,) * len(shape)].set(jnp.nan), params)
    assert jnp.isnan(y).sum() == 1 and jnp.isnan(new["batch_stats"]["var"]).sum() == 1


# ---- threads: XLA's pool, not an OpenMP team ---------------------------------------------

THREADS_SCRIPT = r"""
import os, numpy as np, jax, jax.numpy as jnp
import batchnorm.jax as bj
threads = lambda: len(os.listdir("/proc/self/task"))
x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64, 32, 32)), jnp.float32)
xla = jax.jit(lambda x: (x * 2 + 1).sum(0))
ours = jax.jit(lambda x: bj.batch_norm(x, None, None, None, None, training=True)[0]).lower(x).compile()
for _ in range(3):
    jax.block_until_ready(xla(x))  # XLA's pool started
before = threads()
for _ in range(3):
    jax.block_until_ready(ours(x))
print(before, threads())
"""


def test_kernels_run_on_xla_threads():
    """Under jit the kernels' parallel loops run on XLA's intra-op pool (cpu/threads.h,
    TaskPool): no OpenMP team of their own, which beside XLA's spinning workers oversubscribed
    the cores (a channels-last inference took 5-12 ms instead of 2 on 2 CPUs). A fresh process
    with OpenMP allowed 2 threads: calling the kernels starts no thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert after == before, f"the kernels started {after - before} thread(s) of their own"


@pytest.mark.parametrize("activation", [None, "relu"])
def test_inference_is_differentiable_in_the_statistics(activation):
    """y = act((x - mean) / sqrt(var + eps) * w + b): the statistics' gradients, as jnp's
    (Flax's batch norm differentiates them in inference; ours gave a silent zero)."""
    x = data((6, 5, 4), "float32", seed=2)
    w, b, rm, rv = params(5)
    g = data(x.shape, "float32", seed=3)

    def jnp_inference(x, w, b, m, v):
        c = lambda a: a.reshape(1, -1, 1)  # noqa: E731
        y = (x - c(m)) * jax.lax.rsqrt(c(v) + 1e-5) * c(w) + c(b)
        return jnp.maximum(y, 0) if activation else y

    def ours(x, w, b, m, v):
        return bj.batch_norm(x, w, b, m, v, training=False, activation=activation)[0]

    args = (x, w, b, rm, rv)
    for argnums in ((3, 4), (0, 1, 2, 3, 4), (4,)):
        got = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * g), argnums=argnums))(*args)
        want = jax.grad(lambda *a: jnp.sum(jnp_inference(*a) * g), argnums=argnums)(*args)
        for a, b_ in zip(got, want):
            close(a, b_, 1e-5)
    # half running statistics get their gradients in their dtype; an empty batch's are zero
    half = jax.grad(lambda m: jnp.sum(ours(x, w, b, m, rv) * g))(rm.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    empty = jax.grad(lambda m: jnp.sum(ours(x[:0], w, b, m, rv)))(rm)
    assert not np.asarray(empty).any()


@needs_flax
@pytest.mark.parametrize("frozen", [True, False])
def test_flax_module_takes_one_example_s_features(frozen):
    """x of shape (C,): Flax's per-example model, vmapped with axis_name for the batch's
    statistics (the kernels want (N, C, ...): one row)."""
    x = data((8, 3), "float32", seed=5)
    variables = flax_linen.BatchNorm().init(jax.random.PRNGKey(0), x, use_running_average=False)
    variables = dict(variables, batch_stats=jax.tree.map(lambda a: a + 0.25, variables["batch_stats"]))

    def step(module):
        def one(v, xi):
            return module.apply(v, xi, use_running_average=frozen, mutable=["batch_stats"])
        return jax.vmap(one, in_axes=(None, 0), out_axes=(0, None), axis_name="batch")

    (y, new), (y0, new0) = (step(m(axis_name="batch"))(variables, x)
                            for m in (bj.BatchNorm, partial(flax_linen.BatchNorm, use_fast_variance=False)))
    close(y, y0, 1e-5)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new0)):
        close(a, b, 1e-6)
    y1 = bj.BatchNorm(use_running_average=True).apply(variables, x[0])  # one example, no vmap
    close(y1, flax_linen.BatchNorm(use_running_average=True).apply(variables, x[0]), 1e-6)


@needs_flax
def test_flax_module_takes_numpy_integers_and_flags():
    x = data((8, 3), "float32", seed=6)
    for module in (bj.BatchNorm(axis=np.int64(-1)), bj.BatchNorm(axis=np.int32(1), skip_nonfinite=np.True_)):
        v = module.init(jax.random.PRNGKey(0), x, use_running_average=False)
        close(module.apply(v, x, use_running_average=False, mutable=["batch_stats"])[0],
              flax_linen.BatchNorm(use_fast_variance=False).apply(v, x, use_running_average=False,
                                                                  mutable=["batch_stats"])[0], 1e-5)


# ---- shard_map (4 host devices, own process) ------------------------------------------------

@pytest.mark.slow
def test_shard_map_matches_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sharded checks passed" in proc.stdout


def _sharded_checks():
    """Run in a process whose XLA has 4 CPU devices (test_shard_map_matches_unsharded)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("batch",))
    for dtype, (shape, axis) in [("float32", LAYOUTS["channels_first"]), ("bfloat16", LAYOUTS["channels_last"]),
                                 ("float32", ((8, 5), 1))]:
        shape = (8,) + shape[1:]
        # Shards with different means and spreads: a mean of their variances would be wrong.
        x = jnp.concatenate([data((2,) + shape[1:], dtype, seed=s, shift=5.0 * s) * (1 + s) for s in range(4)])
        w, b, rm, rv = params(shape[axis])
        g = data(shape, "float32", seed=5)
        x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))

        def sharded(fn, out_specs):
            return jax.shard_map(fn, mesh=mesh, in_specs=(P("batch"), P(), P(), P(), P()), out_specs=out_specs)

        def bn(axis_name):
            return lambda x, w, b, rm, rv: bj.batch_norm(x, w, b, rm, rv, training=True, axis=axis,
                                                        axis_name=axis_name)

        y, new_rm, new_rv = jax.jit(sharded(bn("batch"), (P("batch"), P(), P())))(x_sharded, w, b, rm, rv)
        y0, rm0, rv0 = bn(None)(x, w, b, rm, rv)
        close(y, np.asarray(y0.astype(jnp.float32)), OUT_TOL[dtype])
        close(new_rm, rm0, 1e-6)
        close(new_rv, rv0, 1e-6)
        y_ref, _, _ = reference(x, w, b, axis)
        close(y, y_ref, OUT_TOL[dtype])

        def loss(x, w, b):
            y = sharded(lambda *a: bn("batch")(*a)[0], P("batch"))(x, w, b, rm, rv)
            return jnp.sum(y.astype(jnp.float32) * g)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x_sharded, w, b)
        want = jax.grad(lambda x, w, b: jnp.sum(jnp_batch_norm(x, w, b, axis) * g), argnums=(0, 1, 2))(x, w, b)
        for got, ref in zip(grads, want):
            close(got, ref, GRAD_TOL[dtype])

    # pmap names its axis the same way: one shard per device, (N, C) features.
    x = jnp.stack([data((3, 5), "float32", seed=s, shift=4.0 * s) * (s + 1) for s in range(4)])
    w, b, rm, rv = params(5)
    y, new_rm, new_rv = jax.pmap(lambda x: bj.batch_norm(x, w, b, rm, rv, training=True, axis=-1, axis_name="i"),
                                 axis_name="i")(x)
    y0, rm0, rv0 = bj.batch_norm(x.reshape(12, 5), w, b, rm, rv, training=True, axis=-1)
    close(y.reshape(12, 5), y0, 1e-5)
    for s in range(4):
        close(new_rm[s], rm0, 1e-6)
        close(new_rv[s], rv0, 1e-6)

    # The gradient through the updated running statistics: their cotangents summed over the
    # shards (pmap and shard_map without check_vma handed each shard its own: 1/4 of it).
    xs = jnp.stack([data((3, 5, 2), "float32", seed=s, shift=2.0 * s) for s in range(4)])

    def stats_loss(x, axis_name=None, copies=1):
        _, m, v = bj.batch_norm(x, None, None, rm, rv, training=True, momentum=0.2, axis=1, axis_name=axis_name)
        return copies * (jnp.sum(m**2) + jnp.sum(v**2))

    want = jax.grad(stats_loss)(xs.reshape(12, 5, 2), None, 4).reshape(xs.shape)
    close(jax.pmap(jax.grad(lambda x: stats_loss(x, "i")), axis_name="i")(xs), want, 1e-5)
    # A mesh of automatic axes (make_mesh's are explicit: arrays would carry their sharding).
    # Jitted, and once eagerly: eagerly, XLA compiles each primitive of the 4-device program on
    # its own (all of them eager: about 700 compilations, 50 s of this test's 78).
    auto = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    for check_vma, jit in ((True, True), (False, True), (False, False)):
        grad = jax.grad(lambda x: jax.shard_map(lambda xd: stats_loss(xd, "batch"), mesh=auto, in_specs=P("batch"),
                                                out_specs=P(), check_vma=check_vma)(x))
        got = (jax.jit(grad) if jit else grad)(xs.reshape(12, 5, 2))
        close(got.reshape(xs.shape), want / 4, 1e-5)

    # x replicated over the axis (every shard the same batch): the same rule, as jnp with psum.
    def stats_loss_jnp(x):
        n = x.shape[0] * x.shape[2] * 4
        m = jax.lax.psum(x.sum((0, 2)), "batch") / n
        v = jax.lax.psum(((x - m[None, :, None]) ** 2).sum((0, 2)), "batch") / n
        m, v = 0.8 * rm + 0.2 * m, 0.8 * rv + 0.2 * v * n / (n - 1)
        return jnp.sum(m**2) + jnp.sum(v**2)

    for check_vma in (True, False):
        ours, theirs = (jax.jit(jax.grad(lambda x, f=f: jax.shard_map(f, mesh=auto, in_specs=P(), out_specs=P(),
                                                                      check_vma=check_vma)(x)))(xs[0])
                        for f in (lambda xd: stats_loss(xd, "batch"), stats_loss_jnp))
        close(ours, theirs, 1e-5)

    # shard_map called eagerly (no jit around it): training and inference, values as jitted.
    x8 = data((8, 3), "float32", seed=7)
    for training, stats in ((True, (None, None)), (False, (rm[:3], rv[:3]))):
        eager = jax.shard_map(lambda x: bj.batch_norm(x, None, None, *stats, training=training,
                                                     axis_name="batch" if training else None)[0],
                              mesh=auto, in_specs=P("batch"), out_specs=P("batch"))
        close(eager(x8), jax.jit(eager)(x8), 1e-6)

    # The channel axis sharded: the message names each shard's shape, not the logical batch's alone.
    w16 = jnp.ones(16)
    by_channel = jax.jit(jax.shard_map(lambda x, w: bj.batch_norm(x, w, None, None, None, training=True,
                                                                   axis_name="batch")[0],
                                       mesh=auto, in_specs=(P(None, "batch"), P()), out_specs=P(None, "batch")))
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\), got \(16,\) \(x has shape \(8, 4, 3\) on "
                                         r"each of 4 shards of 'batch', \(32, 4, 3\) together.* is the channel axis "
                                         r"sharded\?\)"):
        by_channel(data((8, 16, 3), "float32", seed=8), w16)

    if flax_linen is None:
        print("sharded checks passed (without flax)")
        return
    # The Flax module with axis_name inside shard_map: one step like the unsharded module.
    x = jnp.concatenate([data((2, 4, 3), "float32", seed=s, shift=3.0 * s) for s in range(4)])
    variables = bj.BatchNorm().init(jax.random.PRNGKey(0), x, use_running_average=False)

    def flax_step(module):
        return lambda v, x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"])

    y, stats = jax.jit(jax.shard_map(flax_step(bj.BatchNorm(axis_name="batch")), mesh=mesh,
                                     in_specs=(P(), P("batch")), out_specs=(P("batch"), P())))(
        variables, jax.device_put(x, NamedSharding(mesh, P("batch"))))
    y0, stats0 = flax_step(flax_linen.BatchNorm(use_fast_variance=False))(variables, x)
    close(y, y0, 1e-5)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats0)):
        close(a, b, 1e-6)

    # Replicated parameters' (and running statistics') gradients with x split, check_vma on: a
    # frozen batch norm, and per-device batch statistics (no axis_name), as Flax's. The
    # custom_vjps' per-shard gradients of unvarying inputs were a type error of JAX's.
    variables = flax_linen.BatchNorm().init(jax.random.PRNGKey(1), x, use_running_average=False)
    variables = dict(variables, batch_stats=jax.tree.map(lambda a: a + 0.5, variables["batch_stats"]))
    for frozen, axis_name in ((True, None), (True, "batch"), (False, None), (False, "batch")):
        def loss(variables, x, module):
            def shard(v, xd):
                y = module.apply(v, xd, use_running_average=frozen, mutable=["batch_stats"])[0]
                return jax.lax.psum(jnp.sum(jnp.sin(y)), "batch")
            return jax.shard_map(shard, mesh=auto, in_specs=(P(), P("batch")), out_specs=P())(variables, x)

        ours, theirs = (jax.jit(jax.grad(loss), static_argnums=2)(variables, x, module(axis_name=axis_name))
                        for module in (bj.BatchNorm, partial(flax_linen.BatchNorm, use_fast_variance=False)))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            close(a, b, 2e-5)
    print("sharded checks passed")


if __name__ == "__main__":
    _sharded_checks()


# ---- PreciseBN for Flax: recompute_batch_stats ----------------------------------------------


@needs_flax
def test_recompute_batch_stats_is_the_population_s():
    nn = flax_linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, use_running_average):
            x = bj.BatchNorm(use_running_average=use_running_average, name="ours")(x)
            x = nn.Dense(4, name="dense")(x)
            return nn.BatchNorm(use_running_average=use_running_average, name="flax")(x)

    model = Net()
    rng = np.random.default_rng(3)
    batches = [jnp.asarray(rng.standard_normal((n, 6)) * 3 + 2, jnp.float32) for n in (4, 7, 0, 2, 9)]  # one empty
    variables = model.init(jax.random.PRNGKey(0), batches[0], use_running_average=False)
    variables = dict(variables, params=variables["params"])
    new, counts = bj.recompute_batch_stats(model, variables, batches)
    # By hand: the first module normalizes each batch with its own statistics (training mode),
    # the dense layer maps that, the second module sees the result.
    p = variables["params"]
    seen_first, seen_second = [], []
    for b in batches:
        x = np.asarray(b, np.float64)
        if not x.size:
            continue
        seen_first.append(x)
        y = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * np.asarray(p["ours"]["scale"]) + np.asarray(p["ours"]["bias"])
        seen_second.append(y @ np.asarray(p["dense"]["kernel"], np.float64) + np.asarray(p["dense"]["bias"]))
    for name, seen in (("ours", seen_first), ("flax", seen_second)):
        whole = np.concatenate(seen)
        assert counts[name] == len(whole)
        stats = new["batch_stats"][name]
        np.testing.assert_allclose(stats["mean"], whole.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["var"], whole.var(0), rtol=1e-4)  # Flax's biased variance
        assert stats["mean"].dtype == jnp.float32
    assert new["params"] is variables["params"]
    assert not np.allclose(variables["batch_stats"]["ours"]["mean"], new["batch_stats"]["ours"]["mean"])  # untouched input
    with pytest.raises(ValueError, match="variables must be a dict with a 'batch_stats' collection"):
        bj.recompute_batch_stats(model, {"params": p}, batches)
    with pytest.raises(TypeError, match="model must be a flax.linen.Module, got int"):
        bj.recompute_batch_stats(3, variables, batches)


@needs_flax
def test_recompute_batch_stats_takes_keyword_inputs_and_refuses_masks():
    """x given by keyword was skipped (its module kept its statistics); a mask was ignored
    (statistics over every value); a FrozenDict of variables was refused as no dict."""
    nn = flax_linen

    class Net(nn.Module):
        masked: bool = False

        @nn.compact
        def __call__(self, x, use_running_average):
            mask = (x > 0) if self.masked else None
            return nn.BatchNorm(use_running_average=use_running_average, name="bn")(x=x, mask=mask)

    rng = np.random.default_rng(5)
    batches = [jnp.asarray(rng.standard_normal((n, 3)) * 2 + 1, jnp.float32) for n in (4, 7)]
    variables = Net().init(jax.random.PRNGKey(0), batches[0], use_running_average=False)
    from flax.core import freeze

    frozen = freeze(variables)
    new, counts = bj.recompute_batch_stats(Net(), frozen, batches)
    whole = np.concatenate([np.asarray(b, np.float64) for b in batches])
    assert counts == {"bn": 11}
    np.testing.assert_allclose(new["batch_stats"]["bn"]["mean"], whole.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="recompute_batch_stats does not support batch norm with a mask"):
        bj.recompute_batch_stats(Net(masked=True), variables, batches)


def test_float64_results_without_jax_x64_warn():
    """JAX without 64-bit types turns the float64 results of statistics(dtype="float64") and
    backward_reduce into float32: a warning says so at the caller's line (it was silent); with
    them, float64 and no warning."""
    import batchnorm as bn

    x = jnp.asarray(np.random.default_rng(0).standard_normal((50, 3)), jnp.float32)
    before = jax.config.jax_enable_x64
    try:
        jax.config.update("jax_enable_x64", False)
        with pytest.warns(UserWarning, match="float64 result .* becomes float32 in JAX") as caught:
            mean, _, _ = bn.statistics(x, dtype="float64")
        assert mean.dtype == jnp.float32 and caught[0].filename == __file__
        with pytest.warns(UserWarning, match="float64 result"):
            bn.backward_reduce(x, x, jnp.zeros(3), jnp.ones(3))
        jax.config.update("jax_enable_x64", True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mean, _, _ = bn.statistics(x, dtype="float64")
        assert mean.dtype == jnp.float64
    finally:
        jax.config.update("jax_enable_x64", before)
