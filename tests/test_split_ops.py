"""The building blocks of synchronized batch norm, in one process: backward_reduce +
backward_elemt give backward's bits on one shard and the whole batch's gradients from
shards; forward_training(batch_statistics=) gives forward_training's bits from its own
statistics; statistics(dtype="float64") are the unrounded moments; empty shards; errors."""
from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from helpers import (
    assert_output,
    bits,
    dtype_name,
    dtype_params,
    make_input,
    ref_backward,
    ref_statistics,
    snapshot,
    to_f64,
)

CASES = [((6, 5, 7, 3), 1), ((4, 7, 9, 6), -1), ((3, 2, 40000), 1), ((9, 4), 1), ((2, 3, 5, 5, 6), 2)]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_split_backward_is_backward_bitwise(rng, shape, axis, dtype, layout):
    x = make_input(rng, shape, dtype, layout, axis)
    dy = make_input(rng, shape, dtype, layout, axis)
    w = rng.uniform(0.5, 2, shape[axis])
    _, mean, invstd = bn.forward_training(x, axis=axis)
    dx, dw, db = bn.backward(dy, x, mean, invstd, w, axis=axis)
    sum_dy, sum_dy_xmu, dw2, db2 = bn.backward_reduce(dy, x, mean, invstd, axis=axis)
    assert to_f64(sum_dy).dtype == np.float64 and bits(dw2) == bits(dw) and bits(db2) == bits(db)
    count = int(np.prod(shape)) // shape[axis]
    dx2 = bn.backward_elemt(dy, x, mean, invstd, sum_dy, sum_dy_xmu, count, w, axis=axis)
    assert bits(dx2) == bits(dx)


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_given_statistics_are_forward_training_bitwise(rng, shape, axis, dtype):
    x = make_input(rng, shape, dtype, "contiguous", axis, loc=50.0)
    C = shape[axis]
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C).astype(np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    y, m, s = bn.forward_training(x, w, b, running_mean=rm, running_var=rv, momentum=0.3, axis=axis)
    mean, var, count = bn.statistics(x, axis=axis, dtype="float64")
    assert dtype_name(mean) == dtype_name(var) == "float64"
    y2, m2, s2 = bn.forward_training(
        x, w, b, running_mean=rm2, running_var=rv2, momentum=0.3, axis=axis, batch_statistics=(mean, var, count)
    )
    assert bits(y2) == bits(y) and bits(m2) == bits(m) and bits(s2) == bits(s)
    assert bits(rm2) == bits(rm) and bits(rv2) == bits(rv)
    # The float64 moments round to statistics()'s accumulation-type ones.
    acc_mean, acc_var, _ = bn.statistics(x, axis=axis)
    acc = np.float64 if dtype == "float64" else np.float32
    np.testing.assert_array_equal(to_f64(mean).astype(acc), to_f64(acc_mean).astype(acc))
    np.testing.assert_array_equal(to_f64(var).astype(acc), to_f64(acc_var).astype(acc))


@pytest.mark.parametrize("axis", [1, -1])
def test_shards_give_the_whole_batch(rng, axis):
    """Shards of one batch (one of them empty): merged statistics, summed backward sums."""
    shape = (12, 3, 4, 5) if axis == 1 else (12, 4, 5, 3)
    x = make_input(rng, shape, "float64", axis=axis)
    dy = make_input(rng, shape, "float64", axis=axis)
    w = rng.uniform(0.5, 2, 3)
    cuts = [0, 5, 5, 12]
    shards = [(x[a:b], dy[a:b]) for a, b in zip(cuts, cuts[1:])]
    stats = [bn.statistics(xs, axis=axis, dtype="float64") if len(xs) else (np.zeros(3), np.zeros(3), 0)
             for xs, _ in shards]
    mean, var, count = bn.merge_statistics(*zip(*stats))
    ref_mean, ref_var, ref_count = ref_statistics(x, axis)
    assert count == ref_count
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13)
    np.testing.assert_allclose(var, ref_var, rtol=1e-13)
    ys, sums = [], []
    for xs, dys in shards:
        y, m, s = bn.forward_training(xs, w, axis=axis, batch_statistics=(mean, var, count))
        ys.append(y)
        sums.append(bn.backward_reduce(dys, xs, m, s, axis=axis))
    sum_dy = sum(r[0] for r in sums)
    sum_dy_xmu = sum(r[1] for r in sums)
    dx = np.concatenate([bn.backward_elemt(dys, xs, m, s, sum_dy, sum_dy_xmu, count, w, axis=axis)
                         for xs, dys in shards])
    invstd = 1 / np.sqrt(ref_var + 1e-5)
    ref_dx, ref_dw, ref_db = ref_backward(dy, x, ref_mean, invstd, w, axis)
    assert_output(dx, ref_dx, "float64")
    assert_output(sum(r[2] for r in sums), ref_dw, "float64")
    assert_output(sum(r[3] for r in sums), ref_db, "float64")
    assert np.concatenate(ys).shape == shape


def test_empty_shard():
    e = np.zeros((0, 3, 4), np.float32)
    sum_dy, sum_dy_xmu, dw, db = bn.backward_reduce(e, e, np.zeros(3), np.ones(3))
    for a, dt in [(sum_dy, np.float64), (sum_dy_xmu, np.float64), (dw, np.float32), (db, np.float32)]:
        assert a.dtype == dt and a.shape == (3,) and not a.any()
    # Zeros (+0) whatever invstd holds: 0 x Inf was NaN, and 0 x a negative invstd -0.
    _, _, dw, db = bn.backward_reduce(e, e, np.zeros(3), np.array([np.inf, np.nan, -2.0]))
    assert bits(dw) == bits(np.zeros(3, np.float32)) and bits(db) == bits(np.zeros(3, np.float32))
    assert bn.backward_elemt(e, e, np.zeros(3), np.ones(3), sum_dy, sum_dy, 7).shape == e.shape
    rm, rv = np.zeros(3), np.ones(3)
    y, m, s = bn.forward_training(e, running_mean=rm, running_var=rv, batch_statistics=(np.ones(3), np.full(3, 3.0), 4))
    assert y.shape == e.shape and (m == 1).all()
    np.testing.assert_allclose(s, 1 / np.sqrt(3 + 1e-5), rtol=1e-7)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * 3 * 4 / 3)  # unbiased with the total count
    np.testing.assert_allclose(rm, 0.1)


def test_errors_name_the_argument_and_write_nothing(rng):
    x = make_input(rng, (4, 3, 5), "float32")
    m, v = np.zeros(3), np.ones(3)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    before = snapshot(rm, rv)
    with pytest.raises(ValueError, match="batch_count must be at least x's 20 values per channel"):
        bn.forward_training(x, running_mean=rm, running_var=rv, batch_statistics=(m, v, 19))
    with pytest.raises(ValueError, match="batch_count must be at least 2 values per channel"):
        bn.forward_training(x[:0], running_mean=rm, running_var=rv, batch_statistics=(m, v, 1))
    with pytest.raises(ValueError, match=r"batch_var must have shape \(3,\), got \(2,\)"):
        bn.forward_training(x, running_mean=rm, running_var=rv, batch_statistics=(m, v[:2], 40))
    with pytest.raises(TypeError, match="batch_statistics must be a .mean, var, count. tuple"):
        bn.forward_training(x, batch_statistics=(m, v))
    with pytest.raises(TypeError, match="batch_statistics count must be an int, got float"):
        bn.forward_training(x, batch_statistics=(m, v, 40.0))
    assert snapshot(rm, rv) == before
    with pytest.raises(ValueError, match=r"count must be at least 1 and at least x's 20 values per channel.*got 10"):
        bn.backward_elemt(x, x, m, v, m, m, 10)
    with pytest.raises(ValueError, match=r"sum_dy_xmu must have shape \(3,\), got \(4,\)"):
        bn.backward_elemt(x, x, m, v, m, np.zeros(4), 20)
    with pytest.raises(ValueError, match=r"dy must have the shape of x, \(4, 3, 5\), got \(2, 3, 5\)"):
        bn.backward_reduce(x[:2], x, m, v)
    with pytest.raises(TypeError, match="invstd must be an array, got None"):
        bn.backward_reduce(x, x, m, None)
    with pytest.raises(TypeError, match="dtype must be None .the accumulation type. or float64, got 'float32'"):
        bn.statistics(x, dtype="float32")
