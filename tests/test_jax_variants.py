"""The training variants on the JAX route (API.md "Training variants", "JAX"): batch_norm(...,
renorm=, ghost_batch=, skip_nonfinite=, running_var_unbiased=) and the Flax module's fields,
inside real XLA programs (jit, grad, vmap), against the float64 references of test_variants.py
and, where the same kernels run (y, saved statistics, r and d, the gradients), against the
eager batchnorm functions bit for bit."""
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
from helpers import to_f64, writable_like  # noqa: E402
from test_variants import renorm_backward_reference, renorm_reference  # noqa: E402

# (shape, channel axis); the running statistics make batch renorm clip r in some channels and
# d in others.
LAYOUTS = {"channels_first": ((6, 5, 4, 3), 1), "channels_last": ((6, 4, 3, 5), -1)}
RUNNING = (np.array([0.0, 3.0, -3.0, 0.1, 0.2]), np.array([1.0, 0.01, 50.0, 1.5, 0.8]))
RMAX, DMAX = 1.5, 0.75
# Against float64: a few ulps of the dtype (outputs) and of float32 (per-channel statistics).
OUT_TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
STAT_TOL = 2e-6


def data(shape, dtype="float32", seed=0, loc=0.5):
    x = np.random.default_rng(seed).standard_normal(shape) * 1.5 + loc
    return jnp.asarray(x, dtype)


def params(c, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32), jnp.asarray(rng.uniform(-1, 1, c), jnp.float32)


def f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def close(got, want, tol, what):
    want = np.asarray(want, np.float64)
    err = float(np.abs(f64(got) - want).max())
    assert err <= tol * max(float(np.abs(want).max()), 1e-30), f"{what}: max error {err:.3g}"


def bits(a):
    return np.asarray(a).tobytes()


# ---- batch renorm --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_renorm_forward(dtype, layout):
    """Under jit: y, r and d are the eager kernels' bits; all of them and the running update
    match Ioffe 2017's algorithm in float64."""
    shape, axis = LAYOUTS[layout]
    x = data(shape, dtype)
    w, b = params(shape[axis])
    rm, rv = (jnp.asarray(a, jnp.float32) for a in RUNNING)
    f = jax.jit(lambda *a: bj.batch_norm(*a, training=True, momentum=0.25, eps=1e-3, axis=axis, renorm=(RMAX, DMAX)))
    y, new_rm, new_rv, r, d = f(x, w, b, rm, rv)
    assert y.dtype == x.dtype and r.dtype == d.dtype == jnp.float32 and r.shape == (shape[axis],)
    # The eager kernels on JAX's device (JAX arrays in; the running statistics beside them).
    erm, erv = writable_like(RUNNING[0], x), writable_like(RUNNING[1], x)
    ey, _, _, er, ed = batchnorm.forward_training(x, w, b, running_mean=erm, running_var=erv, momentum=0.25, eps=1e-3,
                                                  axis=axis, renorm=(RMAX, DMAX))
    assert bits(y) == bits(ey) and bits(r) == bits(er) and bits(d) == bits(ed)
    want = renorm_reference(f64(x), f64(w), f64(b), *RUNNING, 0.25, 1e-3, RMAX, DMAX, axis)
    close(y, want[0], OUT_TOL[dtype] * 4, "y")
    close(r, want[3], STAT_TOL, "r")
    close(d, want[4], STAT_TOL, "d")
    assert (f64(r) == RMAX).any() and (f64(r) == np.float32(1 / RMAX)).any() and (np.abs(f64(d)) == DMAX).any()
    close(new_rm, want[5], STAT_TOL, "running_mean")
    close(new_rv, want[6], STAT_TOL, "running_var")
    np.testing.assert_allclose(f64(new_rm), to_f64(erm), rtol=1e-6, atol=1e-7)  # the eager update, in double
    np.testing.assert_allclose(f64(new_rv), to_f64(erv), rtol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_renorm_grad(layout):
    """jax.grad with r and d constants: the eager backward(renorm=(r, d))'s bits and the
    float64 gradients."""
    shape, axis = LAYOUTS[layout]
    x = data(shape)
    w, b = params(shape[axis])
    rm, rv = (jnp.asarray(a, jnp.float32) for a in RUNNING)
    dy = data(shape, seed=5, loc=0.0)

    def loss(x, w, b):
        y, _, _, r, d = bj.batch_norm(x, w, b, rm, rv, training=True, eps=1e-3, axis=axis, renorm=(RMAX, DMAX))
        return jnp.sum(y * dy)

    dx, dw, db = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)
    _, mean, invstd, r, d = batchnorm.forward_training(
        x, w, b, running_mean=writable_like(rm, x), running_var=writable_like(rv, x), eps=1e-3, axis=axis,
        renorm=(RMAX, DMAX))  # fmt: skip
    edx, edw, edb = batchnorm.backward(dy, x, mean, invstd, w, axis=axis, renorm=(r, d))
    assert bits(dx) == bits(edx) and bits(dw) == bits(edw) and bits(db) == bits(edb)
    wdx, wdw, wdb = renorm_backward_reference(f64(dy), f64(x), f64(w), f64(r), f64(d), 1e-3, axis)
    close(dx, wdx, 5e-5, "dx")
    close(dw, wdw, 5e-5, "dweight")
    close(db, wdb, 5e-5, "dbias")
    # The running statistics are state: no gradient flows into them.
    grm = jax.grad(lambda rm: jnp.sum(bj.batch_norm(x, w, b, rm, rv, training=True, axis=axis,
                                                    renorm=(RMAX, DMAX))[0] * dy))(rm)
    assert not np.asarray(grm).any()


def test_renorm_identity_is_plain_batch_norm():
    """Running statistics equal to the batch's: r = 1, d = 0 and plain batch norm's y."""
    x = data((8, 3, 5))
    mean, var = np.asarray(x).mean(axis=(0, 2)), np.asarray(x).var(axis=(0, 2))
    y, _, _, r, d = bj.batch_norm(x, None, None, jnp.asarray(mean), jnp.asarray(var), training=True, renorm=(3, 5))
    y_plain, _, _ = bj.batch_norm(x, None, None, None, None, training=True)
    np.testing.assert_allclose(f64(r), 1, rtol=1e-6)
    np.testing.assert_allclose(f64(d), 0, atol=1e-6)
    np.testing.assert_allclose(f64(y), f64(y_plain), rtol=1e-5, atol=1e-5)


def test_renorm_returns_r_and_d_in_inference_too():
    """Inference applies no correction: r = 1, d = 0 in training's dtype, and the same arity,
    so one unpacking serves train and eval steps (it raised "not enough values to unpack")."""
    x = data((8, 3, 5))
    w, b = params(3)
    rm, rv = jnp.asarray(RUNNING[0][:3], jnp.float32), jnp.asarray(RUNNING[1][:3], jnp.float32)
    _, _, _, r_train, _ = bj.batch_norm(x, w, b, rm, rv, training=True, renorm=(RMAX, DMAX))
    y, m, v, r, d = jax.jit(lambda *a: bj.batch_norm(*a, training=False, renorm=(RMAX, DMAX)))(x, w, b, rm, rv)
    assert bits(y) == bits(bj.batch_norm(x, w, b, rm, rv, training=False)[0])
    assert bits(m) == bits(rm) and bits(v) == bits(rv)
    assert r.dtype == d.dtype == r_train.dtype and r.shape == d.shape == (3,)
    assert np.all(np.asarray(r) == 1) and np.all(np.asarray(d) == 0)


# ---- ghost batch norm ----------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_ghost_forward_and_grad(dtype, layout):
    """Each group of G samples is plain batch norm of its own, bit for bit the eager ghost
    kernels (y and the gradients); the running statistics are the whole batch's."""
    shape, axis = LAYOUTS[layout]
    x = data(shape, dtype)
    w, b = params(shape[axis])
    rm, rv = (jnp.asarray(a, jnp.float32) for a in RUNNING)
    f = jax.jit(lambda *a: bj.batch_norm(*a, training=True, momentum=0.3, axis=axis, ghost_batch=2))
    y, new_rm, new_rv = f(x, w, b, rm, rv)
    ey, sm, si = batchnorm.forward_training(x, w, b, axis=axis, ghost_batch=2)  # the eager kernels, JAX's device
    assert bits(y) == bits(ey)
    y0, _, _ = batchnorm.forward_training(x[2:4], w, b, axis=axis)
    assert bits(np.asarray(y)[2:4]) == bits(y0)
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    n = x.size // shape[axis]
    xs = f64(x)
    close(new_rm, 0.7 * RUNNING[0] + 0.3 * xs.mean(red), STAT_TOL, "running_mean")
    close(new_rv, 0.7 * RUNNING[1] + 0.3 * xs.var(red) * n / (n - 1), STAT_TOL, "running_var")
    dy = data(shape, dtype, seed=3, loc=0.0)
    grads = jax.jit(jax.grad(lambda x, w, b: jnp.sum(bj.batch_norm(x, w, b, None, None, training=True, axis=axis,
                                                                    ghost_batch=2)[0].astype(jnp.float32)
                                                     * dy.astype(jnp.float32)), argnums=(0, 1, 2)))(x, w, b)
    # d(sum(y * dy))/dy = dy, rounded to x's dtype as the cotangent of y: the eager backward of dy.
    eager = batchnorm.backward(dy, x, sm, si, w, axis=axis, ghost_batch=2)
    for got, want in zip(grads, eager):
        assert bits(got) == bits(np.asarray(want, np.asarray(got).dtype))


def test_ghost_grad_through_running_statistics():
    """A loss reading the updated running statistics differentiates the whole batch's mean
    and variance (as plain batch norm does)."""
    x = data((8, 3))
    w, b = params(3)
    rm, rv = jnp.zeros(3), jnp.ones(3)

    def loss(x, ghost):
        y, new_rm, new_rv = bj.batch_norm(x, w, b, rm, rv, training=True, ghost_batch=ghost)
        return jnp.sum(new_rm * 3.0) + jnp.sum(new_rv * 5.0), y

    g_stats = jax.grad(lambda x: loss(x, 4)[0])(x)
    g_plain = jax.grad(lambda x: loss(x, None)[0])(x)
    np.testing.assert_allclose(f64(g_stats), f64(g_plain), rtol=1e-5, atol=1e-6)


# ---- skip_nonfinite and the running variance's convention -------------------------------------

@pytest.mark.parametrize("ghost", [None, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skip_nonfinite(bad, ghost):
    x = np.array(data((4, 3, 5)))
    x[2, 1, 3] = bad
    rm, rv = jnp.asarray([0.5, -0.25, 1.0]), jnp.asarray([1.5, 0.75, 2.0])
    f = jax.jit(lambda x, skip: bj.batch_norm(x, None, None, rm, rv, training=True, ghost_batch=ghost,
                                              skip_nonfinite=skip), static_argnums=1)
    y, new_rm, new_rv = f(x, True)
    assert bits(new_rm[1]) == bits(rm[1]) and bits(new_rv[1]) == bits(rv[1])
    _, plain_rm, plain_rv = f(x, False)
    assert not np.isfinite(np.asarray(plain_rv)[1])
    for c in (0, 2):  # the other channels updated as without skip_nonfinite
        assert bits(new_rm[c]) == bits(plain_rm[c]) and bits(new_rv[c]) == bits(plain_rv[c])
    assert np.isfinite(np.asarray(y)[:, [0, 2]]).all()


@pytest.mark.parametrize("renorm", [None, (3.0, 5.0)])
def test_skip_nonfinite_keeps_a_channel_its_running_dtype_would_store_as_inf(renorm):
    """float16 running statistics: channel 0's batch variance (about 3.6e9) is finite in
    float32 but its update is Inf in float16; kept as the core keeps it (eager's bits)."""
    x = np.random.default_rng(3).standard_normal((6, 2, 5))
    x[:, 0] = np.where(x[:, 0] > 0, 6e4, -6e4)
    x = x.astype(np.float32)
    for skip in (True, False):
        rm, rv = np.zeros(2, np.float16), np.ones(2, np.float16)
        out = jax.jit(lambda x, a, b: bj.batch_norm(x, None, None, a, b, training=True, momentum=0.5,
                                                    renorm=renorm, skip_nonfinite=skip))(x, rm, rv)
        batchnorm.forward_training(x, running_mean=rm, running_var=rv, momentum=0.5, renorm=renorm,
                                   skip_nonfinite=skip)
        assert bits(out[1]) == bits(rm) and bits(out[2]) == bits(rv), (out[1:3], rm, rv)
        assert np.isinf(rv[0]) != skip and rv[1] != 1.0


def test_skip_nonfinite_updates_a_channel_whose_running_statistic_is_already_non_finite():
    x = (np.random.default_rng(4).standard_normal((8, 3)) + 1).astype(np.float32)
    rm, rv = np.array([np.nan, 0, 0], np.float32), np.array([1, np.inf, 1], np.float32)
    outs = [bj.batch_norm(jnp.asarray(x), None, None, jnp.asarray(rm), jnp.asarray(rv), training=True,
                          momentum=0.1, skip_nonfinite=skip)[1:] for skip in (False, True)]
    assert bits(outs[0][0]) == bits(outs[1][0]) and bits(outs[0][1]) == bits(outs[1][1])
    assert np.asarray(outs[1][1])[0] != 1.0 and np.asarray(outs[1][0])[1] != 0.0


@pytest.mark.parametrize("skip", [False, True])
def test_renorm_with_non_finite_running_statistics_matches_eager(skip):
    """Batch renorm reads the running statistics, which may already hold an Inf or a NaN: the
    handler's momentum-1 update that hands back the batch's statistics took 0 * Inf = NaN
    (new running_var NaN where eager has Inf; with skip_nonfinite a finite batch frozen)."""
    x = np.asarray(data((6, 3, 4)), np.float32)
    rm, rv = np.array([0.0, 0.5, -1.0], np.float32), np.array([1.0, np.inf, np.nan], np.float32)
    _, m, v, r, d = bj.batch_norm(x, None, None, jnp.asarray(rm), jnp.asarray(rv), training=True, momentum=0.3,
                                  renorm=(3.0, 5.0), skip_nonfinite=skip)
    em, ev = rm.copy(), rv.copy()
    batchnorm.forward_training(x, running_mean=em, running_var=ev, momentum=0.3, renorm=(3.0, 5.0),
                               skip_nonfinite=skip)
    np.testing.assert_allclose(np.asarray(m), em, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(v), ev, rtol=1e-6)  # Inf and NaN where eager has them


def test_momentum_one_takes_the_batch_statistics_whatever_the_running_ones_held():
    x = np.asarray(data((6, 3, 4)), np.float32)
    rm, rv = np.array([np.nan, np.inf, 1.0], np.float32), np.array([np.inf, np.nan, 2.0], np.float32)
    _, mean, invstd = batchnorm.forward_training(x, running_mean=rm, running_var=rv, momentum=1.0)
    var = np.var(x.astype(np.float64), axis=(0, 2), ddof=1)
    np.testing.assert_allclose(rm, np.asarray(mean), rtol=1e-6)
    np.testing.assert_allclose(rv, var, rtol=1e-5)
    _, jm, jv = bj.batch_norm(x, None, None, jnp.asarray([np.nan, np.inf, 1.0]), jnp.asarray([np.inf, np.nan, 2.0]),
                              training=True, momentum=1.0)
    np.testing.assert_allclose(np.asarray(jm), rm, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jv), rv, rtol=1e-5)


def test_running_var_biased():
    x = data((5, 3, 4))
    rm, rv = jnp.zeros(3), jnp.ones(3)
    _, new_rm, new_rv = jax.jit(lambda x: bj.batch_norm(x, None, None, rm, rv, training=True, momentum=0.4,
                                                        running_var_unbiased=False))(x)
    xs = f64(x)
    close(new_rv, 0.6 + 0.4 * xs.var(axis=(0, 2)), STAT_TOL, "running_var")
    close(new_rm, 0.4 * xs.mean(axis=(0, 2)), STAT_TOL, "running_mean")
    erm, erv = np.zeros(3, np.float32), np.ones(3, np.float32)
    batchnorm.forward_training(np.asarray(x), running_mean=erm, running_var=erv, momentum=0.4,
                               running_var_unbiased=False)
    np.testing.assert_allclose(f64(new_rv), erv, rtol=1e-6)
    # Differentiating the biased variance: d var / dx = 2 (x - mean) / n.
    g = jax.grad(lambda x: jnp.sum(bj.batch_norm(x, None, None, rm, rv, training=True, momentum=1.0,
                                                 running_var_unbiased=False)[2]))(x)
    want = 2 * (xs - xs.mean(axis=(0, 2), keepdims=True)) / (x.size // 3)
    close(g, want, 1e-5, "d var / dx")


# ---- vmap ----------------------------------------------------------------------------------

def test_vmap_variants_slice_by_slice():
    """Under vmap each slice is its own call: renorm against its own running statistics, ghost
    groups within the slice, skip per slice."""
    xs = jnp.stack([data((4, 3, 2), seed=s, loc=s) * (s + 1) for s in range(3)])
    xs = xs.at[1, 0, 2, 1].set(jnp.nan)
    rms = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3)), jnp.float32)
    rvs = jnp.full((3, 3), 1.5, jnp.float32)
    w, b = params(3)
    for kw in (dict(renorm=(RMAX, DMAX)), dict(ghost_batch=2), dict(skip_nonfinite=True, ghost_batch=2)):
        f = jax.jit(jax.vmap(lambda x, rm, rv: bj.batch_norm(x, w, b, rm, rv, training=True, **kw)))  # noqa: B023
        batched = f(xs, rms, rvs)
        for s in range(3):
            alone = bj.batch_norm(xs[s], w, b, rms[s], rvs[s], training=True, **kw)
            # The kernels' results (y, r, d) bit for bit; the jnp running update up to XLA's fusion.
            for i, (got, want) in enumerate(zip(batched, alone)):
                if i in (1, 2):
                    np.testing.assert_allclose(f64(got[s]), f64(want), rtol=1e-6, err_msg=f"{kw} {s}")
                else:
                    assert bits(got[s]) == bits(want), (kw, s, i)


# ---- errors while tracing: the eager API's types and words -------------------------------------

ERRORS = [
    (dict(renorm=(0.5, 1.0)), ValueError),
    (dict(renorm=(2.0, -1.0)), ValueError),
    (dict(renorm=(2.0,)), TypeError),
    (dict(ghost_batch=5), ValueError),
    (dict(ghost_batch=0), ValueError),
    (dict(ghost_batch=2.0), TypeError),
    (dict(ghost_batch=4, renorm=(2.0, 1.0)), ValueError),
    (dict(skip_nonfinite=1), TypeError),
    (dict(running_var_unbiased=None), TypeError),
]


@pytest.mark.parametrize("kwargs, error", ERRORS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_errors_as_eager(kwargs, error):
    x = np.random.default_rng(0).standard_normal((8, 3, 2)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(error) as eager:
        batchnorm.forward_training(x, running_mean=rm.copy(), running_var=rv.copy(), **kwargs)
    with pytest.raises(error) as traced:
        jax.jit(lambda x: bj.batch_norm(x, None, None, rm, rv, training=True, **kwargs))(x)
    assert str(traced.value) == str(eager.value)


def test_renorm_needs_running_statistics():
    x = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError) as eager:
        batchnorm.forward_training(x, renorm=(2.0, 1.0))
    with pytest.raises(ValueError) as traced:
        bj.batch_norm(x, None, None, None, None, training=True, renorm=(2.0, 1.0))
    assert str(traced.value) == str(eager.value)


@pytest.mark.parametrize("kw", [dict(renorm=(2.0, 1.0)), dict(ghost_batch=2)], ids=["renorm", "ghost"])
def test_not_offered_across_devices(kw):
    with pytest.raises(ValueError, match="is not supported with axis_name"):
        bj.batch_norm(jnp.ones((4, 2)), None, None, jnp.zeros(2), jnp.ones(2), training=True, axis_name="batch", **kw)


# ---- shard_map: skip_nonfinite and the biased variance across devices (own process) -----------

@pytest.mark.slow
def test_skip_nonfinite_across_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sharded variant checks passed" in proc.stdout


def _sharded_checks():
    """In a process with 2 CPU devices: a NaN on one device skips its channel's update on
    every device (the statistics are merged first); the other channels match one device's."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("batch",))
    x = np.array(data((8, 3, 4)))
    x[5, 1, 2] = np.nan  # on the second device
    rm, rv = jnp.asarray([0.5, -0.25, 1.0]), jnp.asarray([1.5, 0.75, 2.0])

    def bn(axis_name):
        return lambda x, rm, rv: bj.batch_norm(x, None, None, rm, rv, training=True, axis_name=axis_name,
                                               skip_nonfinite=True, running_var_unbiased=False)

    f = jax.shard_map(bn("batch"), mesh=mesh, in_specs=(P("batch"), P(), P()), out_specs=(P("batch"), P(), P()))
    y, new_rm, new_rv = jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P("batch"))), rm, rv)
    y0, rm0, rv0 = bn(None)(x, rm, rv)
    assert bits(new_rm[1]) == bits(rm[1]) and bits(new_rv[1]) == bits(rv[1])
    np.testing.assert_allclose(f64(new_rm), f64(rm0), rtol=1e-6)
    np.testing.assert_allclose(f64(new_rv), f64(rv0), rtol=1e-6)
    np.testing.assert_allclose(f64(y)[:, [0, 2]], f64(y0)[:, [0, 2]], rtol=1e-5, atol=1e-5)
    print("sharded variant checks passed")


if __name__ == "__main__":
    _sharded_checks()
    sys.exit(0)


# ---- the Flax module -----------------------------------------------------------------------

flax = pytest.importorskip("flax", reason="flax is not installed (pip install 'batchnorm[flax]')")


def _flax_steps(module, batches):
    variables = module.init(jax.random.PRNGKey(0), batches[0])
    params_, stats = variables.get("params", {}), variables["batch_stats"]
    step = jax.jit(lambda p, s, x: module.apply({"params": p, "batch_stats": s}, x, mutable=["batch_stats"]))
    outputs = []
    for x in batches:
        y, updated = step(params_, stats, x)
        stats = updated["batch_stats"]
        outputs.append(y)
    return params_, stats, outputs


def test_flax_renorm_over_steps():
    """Flax's conventions (momentum = decay, biased running variance) with batch renorm over 3
    steps, against Ioffe 2017 in float64 with those conventions."""
    batches = [data((6, 4, 3, 5), seed=s, loc=s) for s in range(3)]
    params_, stats, outputs = _flax_steps(bj.BatchNorm(False, momentum=0.9, epsilon=1e-3, renorm=(RMAX, DMAX)), batches)
    rm, rv = np.zeros(5), np.ones(5)
    w, b = f64(params_["scale"]), f64(params_["bias"])
    for x, y in zip(batches, outputs):
        xs = f64(x)
        want = renorm_reference(xs, w, b, rm, rv, 0.1, 1e-3, RMAX, DMAX, -1)
        close(y, want[0], 1e-5, "y")
        red = (0, 1, 2)
        rm, rv = 0.9 * rm + 0.1 * xs.mean(red), 0.9 * rv + 0.1 * xs.var(red)
    close(stats["mean"], rm, STAT_TOL, "mean")
    close(stats["var"], rv, STAT_TOL, "var")


def test_flax_ghost_and_skip():
    """ghost_batch: each group normalized alone, batch_stats from the whole batch (biased);
    skip_nonfinite: a NaN channel keeps its batch_stats."""
    x = data((8, 3, 4))
    module = bj.BatchNorm(False, ghost_batch=4, skip_nonfinite=True, use_bias=False, use_scale=False)
    _, stats, (y,) = _flax_steps(module, [x])
    plain = bj.BatchNorm(False, use_bias=False, use_scale=False)
    y0 = plain.apply(plain.init(jax.random.PRNGKey(0), x[4:]), x[4:], mutable=["batch_stats"])[0]
    assert bits(np.asarray(y)[4:]) == bits(y0)
    xs = f64(x)
    close(stats["var"], 0.99 + 0.01 * xs.var(axis=(0, 1)), STAT_TOL, "var")
    bad = x.at[1, 2, 0].set(jnp.nan)
    _, stats, _ = _flax_steps(module, [bad])
    assert f64(stats["var"])[0] == 1.0 and f64(stats["mean"])[0] == 0.0
    assert np.isfinite(f64(stats["var"])).all()
    close(stats["mean"][1:], 0.01 * f64(bad).mean(axis=(0, 1))[1:], STAT_TOL, "mean")


def test_flax_renorm_grad_and_errors():
    x = data((6, 4))
    module = bj.BatchNorm(False, renorm=(RMAX, DMAX), epsilon=1e-3)
    variables = module.init(jax.random.PRNGKey(0), x)
    variables = {"params": variables["params"],
                 "batch_stats": {"mean": jnp.asarray([0.0, 3.0, -3.0, 0.1]), "var": jnp.asarray([1.0, 0.01, 50, 1])}}
    dy = data((6, 4), seed=4, loc=0.0)
    dx = jax.grad(lambda x: jnp.sum(module.apply(variables, x, mutable=["batch_stats"])[0] * dy))(x)
    _, _, _, r, d = renorm_reference(f64(x), np.ones(4), np.zeros(4), f64(variables["batch_stats"]["mean"]),
                                     f64(variables["batch_stats"]["var"]), 0.01, 1e-3, RMAX, DMAX, -1)[:5]
    wdx, _, _ = renorm_backward_reference(f64(dy), f64(x), np.ones(4), r, d, 1e-3, -1)
    close(dx, wdx, 5e-5, "dx")
    with pytest.raises(ValueError, match="renorm is not supported with axis_name"):
        bj.BatchNorm(False, renorm=(2, 1), axis_name="batch").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="ghost_batch must divide the batch size"):
        bj.BatchNorm(False, ghost_batch=4).init(jax.random.PRNGKey(0), x)
