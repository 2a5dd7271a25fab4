"""batchnorm.jax.nnx.BatchNorm against flax.nnx.BatchNorm: the same variables and state tree,
outputs, batch statistics and their dtypes (NNX promotes x and the variables together), a
small CNN trained for three SGD steps under nnx.jit, eval through model.eval() and nnx.view,
one value per channel, axis_name under vmap, the fused ReLU + residual and the variants, and
the options it refuses by name."""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'batchnorm[jax]')")
nnx = pytest.importorskip("flax.nnx", reason="flax is not installed (pip install 'batchnorm[flax]')")
import jax.numpy as jnp  # noqa: E402

# (A build without the JAX extension, as the sanitizer run's: ModuleNotFoundError, skipped; a
# libbatchnorm from another build: an ImportError, which fails.)
bj = pytest.importorskip("batchnorm.jax", reason="this build of batchnorm has no JAX extension")
from batchnorm.jax.nnx import BatchNorm  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
TOL = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 2e-3}


def data(shape, dtype="float32", seed=0, shift=1.0):
    x = np.random.default_rng(seed).standard_normal(shape) * 2.0 + shift
    return jnp.asarray(x, dtype)


def close(got, want, tol):
    got, want = np.asarray(jnp.asarray(got, jnp.float32), np.float64), np.asarray(jnp.asarray(want, jnp.float32),
                                                                                  np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(np.abs(want).max(), 1e-30))


def pair(c, **kwargs):
    return (BatchNorm(c, rngs=nnx.Rngs(0), **kwargs),
            nnx.BatchNorm(c, rngs=nnx.Rngs(0), use_fast_variance=False, **kwargs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", [{}, {"dtype": "same"}, {"use_scale": False, "use_bias": False},
                                    {"param_dtype": jnp.float16, "momentum": 0.5}],
                         ids=["default", "dtype", "no-affine", "f16-params"])
def test_outputs_statistics_and_dtypes_are_nnx_s(dtype, kwargs):
    kwargs = {k: (jnp.dtype(dtype) if v == "same" else v) for k, v in kwargs.items()}
    ours, theirs = pair(5, **kwargs)
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
    x = data((16, 5), dtype)
    for step in range(2):
        y, y0 = ours(x), theirs(x)
        assert y.dtype == y0.dtype
        close(y, y0, TOL[dtype] * 2)
        for a, b in ((ours.mean, theirs.mean), (ours.var, theirs.var)):
            assert a[...].dtype == b[...].dtype
            close(a[...], b[...], 1e-6)
    ours.eval(), theirs.eval()
    e, e0 = ours(x), theirs(x)
    assert e.dtype == e0.dtype
    close(e, e0, TOL[dtype] * 2)


class _Net(nnx.Module):
    def __init__(self, norm, axis, rngs):
        self.axis = axis
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = norm(8, axis=axis, momentum=0.9, use_fast_variance=False, rngs=rngs)
        self.head = nnx.Linear(8 * 6 * 6, 4, rngs=rngs)

    def __call__(self, x):
        if self.axis == 1:
            x = jnp.moveaxis(self.conv(jnp.moveaxis(x, 1, -1)), -1, 1)  # NNX convs are channels-last
        else:
            x = self.conv(x)
        return self.head(jax.nn.relu(self.bn(x)).reshape(x.shape[0], -1))


def _train(norm, axis, x, labels):
    optax = pytest.importorskip("optax")
    model = _Net(norm, axis, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, labels):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    for _ in range(3):
        step(model, optimizer, x, labels)
    model.eval()
    return nnx.state(model), model(x)


@pytest.mark.slow
@pytest.mark.parametrize("axis", [-1, 1], ids=["channels_last", "channels_first"])
def test_cnn_trains_like_nnx_batchnorm(axis):
    x = data((8, 6, 6, 3) if axis == -1 else (8, 3, 6, 6), shift=0.5)
    labels = jnp.arange(8) % 4
    (state, out), (state0, out0) = _train(BatchNorm, axis, x, labels), _train(nnx.BatchNorm, axis, x, labels)
    assert jax.tree.structure(state) == jax.tree.structure(state0)  # one import swaps the layer
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out0), rtol=2e-4, atol=2e-5)


def test_use_running_average_from_call_constructor_or_view():
    x = data((6, 3))
    ours, theirs = pair(3, use_running_average=None)
    with pytest.raises(ValueError, match="No `use_running_average` argument was provided to BatchNorm"):
        ours(x)
    ours(x, use_running_average=False), theirs(x, use_running_average=False)
    close(ours.mean[...], theirs.mean[...], 1e-6)
    view, view0 = nnx.view(ours, use_running_average=True), nnx.view(theirs, use_running_average=True)
    before = np.asarray(ours.mean[...])
    close(view(x), view0(x), 1e-6)
    np.testing.assert_array_equal(np.asarray(ours.mean[...]), before)  # eval leaves the statistics alone


def test_one_value_per_channel_is_nnx_s():
    ours, theirs = pair(5, momentum=0.8)
    x = data((1, 5), seed=3)
    close(ours(x), theirs(x), 1e-6)
    close(ours.mean[...], theirs.mean[...], 1e-6)
    close(ours.var[...], theirs.var[...], 1e-6)


def test_axis_name_spans_the_mapped_axis():
    # Four "devices" under vmap: the statistics of all 4 x 6 samples, as nnx's pmean gives.
    x = data((4, 6, 3), seed=5)
    results = []
    for cls in (BatchNorm, nnx.BatchNorm):
        model = cls(3, axis_name="d", rngs=nnx.Rngs(0), **({} if cls is BatchNorm else {"use_fast_variance": False}))
        graph, state = nnx.split(model)

        def one(state, xd, graph=graph):
            m = nnx.merge(graph, state)
            y = m(xd)
            return y, nnx.state(m, nnx.BatchStat)

        y, stats = jax.vmap(one, in_axes=(None, 0), axis_name="d")(state, x)
        results.append((y, stats))
    (y, stats), (y0, stats0) = results
    close(y, y0, 1e-5)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats0)):
        close(a, b, 1e-6)
    whole = bj.batch_norm(x.reshape(24, 3), None, None, None, None, training=True, axis=-1)[0]
    close(y, whole.reshape(4, 6, 3), 1e-5)


def test_fused_relu_residual_and_variants():
    x, r = data((8, 4), seed=1), data((8, 4), seed=2, shift=0.0)
    ours, theirs = pair(4)
    fused = BatchNorm(4, activation="relu", rngs=nnx.Rngs(0))
    close(fused(x, residual=r), jax.nn.relu(theirs(x) + r), 1e-5)
    close(fused.mean[...], theirs.mean[...], 1e-6)  # the statistics of x alone
    # skip_nonfinite: a channel with a NaN keeps its running statistics; the others update.
    skip = BatchNorm(4, skip_nonfinite=True, rngs=nnx.Rngs(0))
    skip(x.at[0, 2].set(jnp.nan))
    assert skip.mean[...][2] == 0 and skip.var[...][2] == 1 and skip.mean[...][0] != 0
    # renorm reads the running statistics: with them equal to the batch's, r = 1 and d = 0.
    renorm = BatchNorm(4, renorm=(3.0, 5.0), rngs=nnx.Rngs(0))
    renorm.mean[...] = x.mean(0)
    renorm.var[...] = x.var(0)
    ours.mean[...], ours.var[...] = x.mean(0), x.var(0)
    close(renorm(x), ours(x), 1e-5)
    ghost = BatchNorm(4, ghost_batch=4, rngs=nnx.Rngs(0))
    halves = jnp.concatenate([bj.batch_norm(h, None, None, None, None, training=True, axis=-1)[0]
                              for h in (x[:4], x[4:])])
    close(ghost(x), halves, 1e-5)


@pytest.mark.parametrize("make, call, error, words", [
    (lambda: BatchNorm(3, rngs=nnx.Rngs(0)), {"mask": jnp.ones((4, 3), bool)}, ValueError, "mask is not supported"),
    (lambda: BatchNorm(3, axis_index_groups=[[0]], rngs=nnx.Rngs(0)), {}, ValueError, "axis_index_groups"),
    (lambda: BatchNorm(3, activation="gelu", rngs=nnx.Rngs(0)), None, ValueError, "activation must be None or 'relu'"),
    (lambda: BatchNorm(3, renorm=(2, 1), axis_name="d", rngs=nnx.Rngs(0)), None, ValueError,
     "renorm is not supported with axis_name"),
    (lambda: BatchNorm(3, axis=(0, 1), rngs=nnx.Rngs(0)), {}, TypeError, "axis must be an int"),
], ids=["mask", "axis_index_groups", "activation", "renorm-axis_name", "axes"])
def test_refused_options_are_named(make, call, error, words):
    with pytest.raises(error, match=words):
        make()(data((4, 3)), **call) if call is not None else make()
