"""Outputs as the core sizes them (core/ops.h: each op's specs function): the binding allocates
what it is not given from the core's specs, and checks what it is given against the same
specs, so ghost batch norm's (N / G, C) saved statistics, the wide statistics and dx's memory
order are decided in one place. Also the one dtype table (core/dtype.h) as Python sees it."""
from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _C
from batchnorm._arrays import DTYPES
from helpers import HAVE_TORCH, needs_torch

NUMPY = _C.Call(stream=0, as_numpy=True)


def train(x, call=NUMPY, **kw):
    """_C.forward_training with the running statistics and everything else left out."""
    return _C.forward_training(x, None, None, None, None, 0.1, 1e-5, 1, None, None, None, 0, call, **kw)


def test_ghost_saved_statistics_allocated_from_the_core_specs():
    x = np.random.default_rng(0).standard_normal((8, 3, 5)).astype(np.float16)
    y, mean, invstd = train(x, ghost_batch=4)
    assert y.shape == x.shape and y.dtype == np.float16
    for saved in (mean, invstd):
        assert saved.shape == (2, 3) and saved.dtype == np.float32 and saved.flags.c_contiguous
    np.testing.assert_allclose(mean[1], x[4:].astype(np.float64).mean(axis=(0, 2)), rtol=1e-6, atol=1e-7)
    _, plain_mean, _ = train(x)
    assert plain_mean.shape == (3,)


def test_ghost_saved_statistics_given_are_written_in_place():
    x = np.random.default_rng(1).standard_normal((8, 3, 5)).astype(np.float32)
    _, mean, invstd = train(x, ghost_batch=2)
    given_mean, given_invstd = np.full((4, 3), np.nan, np.float32), np.full((4, 3), np.nan, np.float32)
    _, m, s = train(x, ghost_batch=2, saved_mean_out=given_mean, saved_invstd_out=given_invstd)
    assert m is given_mean and s is given_invstd
    np.testing.assert_array_equal(given_mean, mean)
    np.testing.assert_array_equal(given_invstd, invstd)


@pytest.mark.parametrize(
    "ghost, given, expected",
    [
        (2, np.zeros(3, np.float32), r"\(4, 3\) float32 array on cpu, got a \(3,\) float32"),  # (C,) for rows
        (2, np.zeros((4, 3), np.float64), r"\(4, 3\) float32 array on cpu, got a \(4, 3\) float64"),  # the dtype
        (2, np.zeros((4, 6), np.float32)[:, ::2], r"\(4, 3\) float32 array on cpu, got a non-contiguous \(4, 3\) float32"),
        (0, np.zeros((1, 3), np.float32), r"\(3,\) float32 array on cpu, got a \(1, 3\) float32"),  # rows, no ghost
    ],
    ids=["vector-for-rows", "dtype", "strided", "rows-for-vector"],
)
def test_given_saved_statistics_checked_against_the_spec(ghost, given, expected):
    x = np.ones((8, 3, 5), np.float32)
    with pytest.raises(ValueError, match=rf"saved_mean must be a writable contiguous {expected} array"):
        train(x, ghost_batch=ghost, saved_mean_out=given)


def test_read_only_saved_statistics_refused():
    given = np.zeros((4, 3), np.float32)
    given.flags.writeable = False
    words = r"saved_mean must be a writable contiguous \(4, 3\) float32 array on cpu, got a read-only \(4, 3\)"
    with pytest.raises(ValueError, match=words):
        train(np.ones((8, 3, 5), np.float32), ghost_batch=2, saved_mean_out=given)


@pytest.mark.parametrize(
    "kw, error, words",
    [
        (dict(ghost_batch=3), ValueError, r"ghost_batch must divide the batch size \(x.shape\[0\] = 8\), got ghost_batch=3"),
        (dict(ghost_batch=-1), ValueError, "ghost_batch must be a positive int"),
        (dict(ghost_batch=2, axis=0), ValueError, "must not be the channel axis"),
    ],
)
@pytest.mark.parametrize("given", [False, True])
def test_bad_ghost_batch_is_the_core_error_with_or_without_given_outputs(kw, error, words, given):
    """The inputs are judged before any output is sized or checked: a given (C,) array for a
    bad ghost_batch meets the ghost_batch message, not an output's."""
    x = np.ones((8, 3, 5), np.float32)
    outs = dict(saved_mean_out=np.zeros(3, np.float32), saved_invstd_out=np.zeros(3, np.float32)) if given else {}
    kw = dict(kw)
    axis = kw.pop("axis", 1)
    with pytest.raises(error, match=words):
        _C.forward_training(x, None, None, None, None, 0.1, 1e-5, axis, None, None, None, 0, NUMPY, **kw, **outs)


def test_bad_input_is_raised_before_any_output_is_allocated():
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\), got \(4,\)"):
        _C.forward_training(np.ones((8, 3)), np.ones(4), None, None, None, 0.1, 1e-5, 1, None, None, None, 0, NUMPY)


@pytest.mark.parametrize("wide, dtype", [(False, np.float32), (True, np.float64)])
def test_statistics_dtype_from_the_spec(wide, dtype):
    x = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float16)
    mean, var, count = _C.statistics(x, 1, wide, NUMPY)
    assert count == 6 and mean.dtype == dtype and var.dtype == dtype and mean.shape == var.shape == (4,)


def test_backward_dx_takes_dy_memory_order():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 5, 6))
    dy = np.ascontiguousarray(rng.standard_normal((4, 5, 6, 3))).transpose(0, 3, 1, 2)  # channels-last
    _, mean, invstd = bn.forward_training(x)
    dx, dweight, dbias = bn.backward(dy, x, mean, invstd)
    assert dx.strides == dy.strides and dweight.shape == dbias.shape == (3,)


def test_fold_outputs_from_the_spec():
    kernel = np.ones((4, 3, 2, 2), np.float32)
    k, b = bn.fold(kernel, None, np.zeros(4), np.ones(4))
    assert k.shape == kernel.shape and k.dtype == np.float32 and b.shape == (4,) and b.dtype == np.float32


def test_merge_statistics_outputs_from_the_spec():
    mean, var, total = bn.merge_statistics([np.zeros(3, np.float16)] * 2, [np.ones(3, np.float16)] * 2, [2, 3])
    assert total == 5 and mean.dtype == var.dtype == np.float32 and mean.shape == (3,)


def test_jax_saved_shape_is_the_core_spec():
    """batchnorm.jax sizes the FFI call's saved statistics with the core's spec."""
    _jax = pytest.importorskip("batchnorm._jax", reason="built without the JAX extension")
    assert _jax.saved_shape(((8, 3, 5), "float16"), 1, 4) == (2, 3)
    assert _jax.saved_shape(((8, 3, 5), "float16"), -2, 0) == (3,)
    with pytest.raises(ValueError, match=r"ghost_batch must divide the batch size \(x.shape\[0\] = 8\)"):
        _jax.saved_shape(((8, 3, 5), "float32"), 1, 3)


# ---- the dtype table ----------------------------------------------------------------------


def test_dtype_names_are_the_core_table():
    """The codes batchnorm.distributed exchanges are the core's: one order, from one table."""
    assert DTYPES == _C.dtype_names() == ("float16", "bfloat16", "float32", "float64")


@pytest.mark.parametrize("name", ["float16", "float32", "float64"])
def test_numpy_dtypes_through_the_table(name):
    x = np.ones((4, 2), name)
    y = bn.forward_inference(x, np.zeros(2), np.ones(2))
    assert y.dtype == np.dtype(name)


def test_bfloat16_numpy_through_the_table():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.ones((4, 2), ml_dtypes.bfloat16)
    y = bn.forward_inference(x, np.zeros(2), np.ones(2))
    assert y.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(y.astype(np.float32), np.ones((4, 2), np.float32))


@pytest.mark.parametrize("name", ["int32", "complex64", "uint16"])
def test_numpy_dtype_outside_the_table(name):
    with pytest.raises(TypeError, match=f"x must have dtype float16, bfloat16, float32 or float64, got {name}"):
        bn.forward_inference(np.ones((4, 2), name), np.zeros(2), np.ones(2))


@needs_torch
@pytest.mark.torch
@pytest.mark.parametrize("name", DTYPES)
def test_dlpack_dtypes_through_the_table(name):
    import torch

    dtype = getattr(torch, name)
    x = torch.ones((4, 2), dtype=dtype)
    y = bn.forward_inference(x, torch.zeros(2), torch.ones(2))
    assert isinstance(y, torch.Tensor) and y.dtype == dtype


@needs_torch
@pytest.mark.torch
def test_dlpack_dtype_outside_the_table():
    import torch

    with pytest.raises(TypeError, match="x must have dtype float16, bfloat16, float32 or float64, got int64"):
        bn.forward_inference(torch.ones((4, 2), dtype=torch.int64), torch.zeros(2), torch.ones(2))
