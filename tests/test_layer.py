"""The BatchNorm layer's semantics (PyTorch's): initial state, train/eval, running statistics
with momentum or the cumulative average, track_running_stats=False, backward in both modes
(eval-mode checked by finite differences), gradient accumulation and state_dict round trips."""
from __future__ import annotations

import copy
import os
import pickle
import re

import numpy as np
import pytest

import batchnorm as bn
from helpers import assert_close, make_input, ref_backward, ref_normalize, ref_running_update, ref_statistics


def test_initial_state():
    layer = bn.BatchNorm(4)
    assert layer.training and layer.num_batches_tracked == 0
    assert layer.grad_weight is None and layer.grad_bias is None
    for name, value in [("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)]:
        a = getattr(layer, name)
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (4,), name
        np.testing.assert_array_equal(a, value)
    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"].shape == ()
    assert bn.BatchNorm(2, dtype="float64").weight.dtype == np.float64


def test_options_without_affine_or_tracking():
    layer = bn.BatchNorm(3, affine=False, track_running_stats=False)
    assert layer.weight is None and layer.bias is None
    assert layer.running_mean is None and layer.running_var is None
    assert layer.state_dict() == {}
    assert list(bn.BatchNorm(3, affine=False).state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    assert list(bn.BatchNorm(3, track_running_stats=False).state_dict()) == ["weight", "bias"]


def test_train_and_eval_return_self():
    layer = bn.BatchNorm(2)
    assert layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training
    assert layer.train(False) is layer and not layer.training


def test_training_updates_running_statistics(rng):
    layer = bn.BatchNorm(3, momentum=0.2, eps=1e-3, dtype="float64")
    layer.weight[:] = [1.5, -0.5, 2.0]
    layer.bias[:] = [0.1, 0.2, 0.3]
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(3):
        x = make_input(rng, (6 + step, 3, 4), "float64", loc=step)
        y = layer(x)
        mean, var, n = ref_statistics(x)
        assert_close(y, ref_normalize(x, mean, 1 / np.sqrt(var + 1e-3), layer.weight, layer.bias), 1e-12)
        rm, rv = ref_running_update(rm, rv, mean, var, n, 0.2)
        assert_close(layer.running_mean, rm, 1e-12, what="running_mean")
        assert_close(layer.running_var, rv, 1e-12, what="running_var")
        assert layer.num_batches_tracked == step + 1
    # evaluation uses the running statistics and changes nothing
    layer.eval()
    x = make_input(rng, (2, 3, 4), "float64")
    assert_close(layer(x), ref_normalize(x, rm, 1 / np.sqrt(rv + 1e-3), layer.weight, layer.bias), 1e-12)
    assert layer.num_batches_tracked == 3
    assert_close(layer.running_mean, rm, 1e-12)


def test_momentum_none_is_the_cumulative_average(rng):
    layer = bn.BatchNorm(2, momentum=None, dtype="float64", axis=-1)
    means, unbiased = [], []
    for step in range(4):
        x = make_input(rng, (5 + 3 * step, 2), "float64", axis=-1, loc=3 * step)
        layer(x)
        m, v, n = ref_statistics(x, -1)
        means.append(m)
        unbiased.append(v * n / (n - 1))
        assert_close(layer.running_mean, np.mean(means, axis=0), 1e-12, what=f"step {step} running_mean")
        assert_close(layer.running_var, np.mean(unbiased, axis=0), 1e-12, what=f"step {step} running_var")
    assert layer.num_batches_tracked == 4


def test_without_tracking_eval_uses_batch_statistics(rng):
    layer = bn.BatchNorm(3, track_running_stats=False, dtype="float64").eval()
    x = make_input(rng, (4, 3, 5), "float64", loc=2.0)
    y_eval = layer(x)
    y_train, _, _ = bn.forward_training(x, layer.weight, layer.bias)
    np.testing.assert_array_equal(y_eval, y_train)
    assert layer.num_batches_tracked == 0 and layer.running_mean is None


def test_input_dtype_is_kept_with_float64_parameters(rng):
    layer = bn.BatchNorm(3, dtype="float64")
    x = make_input(rng, (4, 3, 5), "float32")
    y = layer(x)
    assert y.dtype == np.float32 and layer.running_mean.dtype == np.float64
    dx = layer.backward(make_input(rng, (4, 3, 5), "float32"))
    assert dx.dtype == np.float32 and layer.grad_weight.dtype == np.float64


def numerical_gradient(f, a, h=1e-6):
    grad = np.zeros_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        v = flat[i]
        flat[i] = v + h
        up = f()
        flat[i] = v - h
        down = f()
        flat[i] = v
        gflat[i] = (up - down) / (2 * h)
    return grad


def test_eval_backward_is_the_gradient_of_the_affine_map(rng):
    C = 3
    layer = bn.BatchNorm(C, dtype="float64", eps=1e-3)
    layer.load_state_dict({"weight": rng.uniform(0.5, 2, C) * [1, -1, 1], "bias": rng.standard_normal(C),
                           "running_mean": rng.standard_normal(C), "running_var": rng.uniform(0.5, 2, C),
                           "num_batches_tracked": 7})
    layer.eval()
    x = make_input(rng, (3, C, 2, 2), "float64")
    g = rng.standard_normal(x.shape)
    layer(x)
    dx = layer.backward(g)

    def loss():
        return float(np.sum(layer(x) * g))

    assert_close(dx, numerical_gradient(loss, x), 1e-6, what="dx")
    assert_close(layer.grad_weight, numerical_gradient(loss, layer.weight), 1e-6, what="grad_weight")
    assert_close(layer.grad_bias, numerical_gradient(loss, layer.bias), 1e-6, what="grad_bias")
    # Unlike training mode, nothing flows through the statistics: dx is dy * weight / std.
    assert_close(dx, g * (layer.weight / np.sqrt(layer.running_var + 1e-3))[None, :, None, None], 1e-12)


def test_training_backward_and_gradient_accumulation(rng):
    C = 4
    layer = bn.BatchNorm(C, dtype="float64")
    layer.weight[:] = rng.uniform(0.5, 2, C)
    x1, g1 = make_input(rng, (5, C, 3), "float64"), rng.standard_normal((5, C, 3))
    x2, g2 = make_input(rng, (2, C, 6), "float64"), rng.standard_normal((2, C, 6))
    layer(x1)
    dx1 = layer.backward(g1)
    m1, v1, _ = ref_statistics(x1)
    e_dx1, e_dw1, e_db1 = ref_backward(g1, x1, m1, 1 / np.sqrt(v1 + 1e-5), layer.weight)
    assert_close(dx1, e_dx1, 1e-10, what="dx")
    assert_close(layer.grad_weight, e_dw1, 1e-10, what="grad_weight after one backward")
    layer(x2)
    layer.backward(g2)
    m2, v2, _ = ref_statistics(x2)
    _, e_dw2, e_db2 = ref_backward(g2, x2, m2, 1 / np.sqrt(v2 + 1e-5), layer.weight)
    assert_close(layer.grad_weight, e_dw1 + e_dw2, 1e-10, what="accumulated grad_weight")
    assert_close(layer.grad_bias, e_db1 + e_db2, 1e-10, what="accumulated grad_bias")
    # backward uses the most recent forward: a second backward adds the same gradient again
    layer.backward(g2)
    assert_close(layer.grad_bias, e_db1 + 2 * e_db2, 1e-10)
    layer.zero_grad()
    assert layer.grad_weight is None and layer.grad_bias is None


def test_without_affine_backward_has_no_parameter_gradients(rng):
    layer = bn.BatchNorm(2, affine=False)
    x = make_input(rng, (4, 2, 3), "float32")
    layer(x)
    dx = layer.backward(np.ones_like(x))
    assert dx.shape == x.shape and layer.grad_weight is None and layer.grad_bias is None


@pytest.mark.parametrize("axis", [1, -1])
def test_state_dict_round_trip(rng, axis):
    a = bn.BatchNorm(3, momentum=0.3, axis=axis)
    shape = (6, 3, 4) if axis == 1 else (6, 4, 3)
    for step in range(3):
        a(make_input(rng, shape, "float32", axis=axis, loc=step))
    a.weight[:] = [2.0, 3.0, 4.0]
    state = a.state_dict()
    b = bn.BatchNorm(3, axis=axis)
    b.load_state_dict(state)
    for key, value in b.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    x = make_input(rng, shape, "float32", axis=axis)
    np.testing.assert_array_equal(a.eval()(x), b.eval()(x))
    # state_dict hands out copies: changing one does not reach into the layer
    state["running_mean"][:] = 123.0
    state["weight"][:] = 0.0
    assert (a.running_mean != 123.0).all() and (a.weight != 0.0).all()


def test_load_state_dict_accepts_lists_and_other_dtypes():
    layer = bn.BatchNorm(2)
    layer.load_state_dict({"weight": [1.5, 2.5], "bias": np.array([0.5, -0.5], np.float16),
                           "running_mean": (1.0, 2.0), "running_var": np.array([3.0, 4.0]), "num_batches_tracked": 9})
    assert layer.weight.dtype == np.float32 and layer.num_batches_tracked == 9
    np.testing.assert_array_equal(layer.running_var, [3.0, 4.0])
    np.testing.assert_array_equal(layer.bias, [0.5, -0.5])


def test_load_state_dict_of_a_bfloat16_torch_module():
    torch = pytest.importorskip("torch")
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.bfloat16)
    theirs.running_mean.copy_(torch.tensor([0.5, -1.25, 3.0]))
    layer = bn.BatchNorm(3)
    layer.load_state_dict(theirs.state_dict())  # NumPy has no bfloat16: taken as float32, exact
    np.testing.assert_array_equal(layer.running_mean, [0.5, -1.25, 3.0])
    assert layer.running_mean.dtype == np.float32


@pytest.mark.parametrize("spelling", ["float32", np.float32, np.dtype("float32"), "torch", "jax"])
def test_dtype_takes_any_spelling_of_float32(spelling):
    if spelling == "torch":
        spelling = pytest.importorskip("torch").float32
    elif spelling == "jax":
        spelling = pytest.importorskip("jax.numpy").float32
    assert bn.BatchNorm(2, dtype=spelling).running_mean.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float16", np.int32, None])
def test_dtype_other_than_float32_or_float64_is_refused(dtype):
    with pytest.raises(TypeError, match="dtype must be 'float32' or 'float64'"):
        bn.BatchNorm(2, dtype=dtype)


def test_eval_backward_of_an_empty_batch_is_zero_gradients():
    # Its forward ran; the backward refused "at least 1 value per channel" (torch: zeros).
    layer = bn.BatchNorm(4)
    layer.eval()
    x = np.zeros((0, 4, 3), np.float32)
    assert layer(x).shape == x.shape
    dx = layer.backward(x)
    assert dx.shape == x.shape and layer.grad_weight.tolist() == [0] * 4 and layer.grad_bias.tolist() == [0] * 4
    with pytest.raises(ValueError, match=re.escape("dy must have the shape of x, (0, 4, 3), got (0, 4, 2)")):
        layer.backward(np.zeros((0, 4, 2), np.float32))


@pytest.mark.parametrize("name", ["affine", "track_running_stats"])
def test_flags_must_be_bools(name):
    # ("no" had been True, through bool())
    with pytest.raises(TypeError, match=f"{name} must be a bool, got str"):
        bn.BatchNorm(3, **{name: "no"})


def test_repr_names_the_options():
    text = repr(bn.BatchNorm(8, momentum=None, axis=-1, dtype="float64"))
    assert text.startswith("BatchNorm(8,") and "momentum=None" in text and "axis=-1" in text and "float64" in text


@pytest.mark.parametrize("value, error, words", [
    (-1, ValueError, "num_batches_tracked must be in [0, 2**63), got -1"),
    (2.7, TypeError, "num_batches_tracked must be an integer, got dtype float64"),
    ("a", TypeError, "num_batches_tracked must be an integer"),
    (2**70, ValueError, "num_batches_tracked must be in [0, 2**63), got 1180591620717411303424"),
    (np.array([3]), ValueError, "num_batches_tracked must be a scalar, got shape (1,)"),
    (np.array([[3]]), ValueError, "num_batches_tracked must be a scalar, got shape (1, 1)"),
])
def test_load_state_dict_checks_num_batches_tracked(value, error, words):
    # -1 divided by zero at the next momentum=None step, 2.7 was truncated, 2**70 broke state_dict().
    layer = bn.BatchNorm(3, momentum=None)
    state = {**layer.state_dict(), "num_batches_tracked": value}
    with pytest.raises(error, match=re.escape(words)):
        layer.load_state_dict(state)
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("key, value, dtype", [
    ("weight", np.array([1 + 5j, 2, 3]), "complex128"),
    ("bias", np.array(["1", "2", "3"]), "<U1"),
    ("weight", np.array([True, False, True]), "bool"),
    ("running_var", np.array([1, None, 2], dtype=object), "object"),
])
def test_load_state_dict_refuses_values_that_are_no_real_numbers(key, value, dtype):
    # Complex parts were dropped, strings parsed, booleans and None (as NaN) taken in silence.
    layer = bn.BatchNorm(3)
    before = layer.state_dict()
    with pytest.raises(TypeError, match=re.escape(f"{key} must have a real floating-point or integer dtype, got {dtype}")):
        layer.load_state_dict({**before, key: value})
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_num_batches_tracked_stops_at_int64s_largest():
    # One step past 2**63 - 1 left a count that state_dict() could not store, nor load back.
    layer = bn.BatchNorm(3, momentum=None)
    layer.load_state_dict({**layer.state_dict(), "num_batches_tracked": 2**63 - 1})
    layer(np.ones((4, 3), np.float32))
    assert layer.num_batches_tracked == 2**63 - 1
    state = layer.state_dict()
    assert state["num_batches_tracked"] == 2**63 - 1
    bn.BatchNorm(3, momentum=None).load_state_dict(state)


# The sanitizer run (.ci/run) preloads ASan, whose allocator aborts on a request past its
# maximum instead of failing it: there only NumPy's own size check (2**62) is reached.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.parametrize("n", [
    pytest.param(10**12, marks=pytest.mark.skipif(UNDER_ASAN, reason="ASan aborts on a 4 TB malloc")),
    2**62,
])
def test_num_features_too_large_to_allocate_names_it(n):
    # NumPy's MemoryError ("Unable to allocate 3.64 TiB") or "array is too big" before.
    with pytest.raises(ValueError, match=f"num_features={n} is too large"):
        bn.BatchNorm(n)


@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count_of_a_list_is_reported_as_x(training):
    # A list (converted by the core as NumPy does) had the layer's own weight or mean blamed.
    layer = bn.BatchNorm(3).train(training)
    with pytest.raises(ValueError, match=re.escape("x must have num_features=3 channels on axis 1, got 4")):
        layer([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0]])


def test_train_takes_a_bool_and_copies_leave_the_last_batch_behind():
    layer = bn.BatchNorm(4)
    with pytest.raises(ValueError, match="training mode is expected to be boolean, got str"):
        layer.train("False")  # truthy: it was training mode
    assert layer.train(np.False_).training is False and layer.train().training is True
    with pytest.raises(ValueError, match="convention must be 'torch' or 'keras', got \\[\\]"):
        bn.BatchNorm(3, convention=[])
    layer(np.ones((256, 4, 64), np.float32) + np.arange(64, dtype=np.float32))
    assert len(pickle.dumps(layer)) < 20_000  # the 256 KB batch stayed behind
    copied = copy.deepcopy(layer)
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        copied.backward(np.ones((256, 4, 64), np.float32))
    layer.backward(np.ones((256, 4, 64), np.float32))  # the original keeps it
