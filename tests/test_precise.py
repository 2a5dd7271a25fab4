"""precise_statistics (PreciseBN) and BatchNorm.recompute_statistics: the exact statistics of a
population of batches against float64 NumPy on their concatenation, over uneven and empty
batches, layouts and libraries, and the errors."""
from __future__ import annotations

import re

import numpy as np
import pytest

import batchnorm as bn


def uneven_batches(rng, n_batches=100, c=5, tail=(3, 4), axis=1, offset=1e4):
    """Batches of 0-9 samples (some empty), values far from 0 (a naive sum of squares would
    lose every digit of the variance)."""
    sizes = rng.integers(0, 10, n_batches)
    sizes[[3, n_batches // 2]] = 0
    scale = rng.uniform(0.1, 3, c)
    batches = []
    for n in sizes:
        x = rng.standard_normal((int(n), c, *tail)) * scale[:, None, None] + offset
        batches.append(np.moveaxis(x, 1, axis) if axis != 1 else x)
    return batches


@pytest.mark.parametrize("axis", [1, -1])
def test_equals_statistics_of_the_concatenation(axis):
    rng = np.random.default_rng(0)
    batches = uneven_batches(rng, axis=axis)
    whole = np.concatenate(batches, axis=0)
    reduce = tuple(d for d in range(whole.ndim) if d != axis % whole.ndim)
    mean, var, count = bn.precise_statistics(iter(batches), axis=axis)  # any iterable, one pass
    assert count == whole.size // whole.shape[axis]
    np.testing.assert_allclose(mean, whole.mean(axis=reduce), rtol=1e-14)  # both sides round: a few ulps
    np.testing.assert_allclose(var, whole.var(axis=reduce), rtol=1e-10)
    assert mean.dtype == var.dtype == np.float64


def test_float32_and_torch_batches():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    batches = [b.astype(np.float32) for b in uneven_batches(rng, 30, offset=10.0)]
    whole = np.concatenate(batches).astype(np.float64)
    mean, var, count = bn.precise_statistics([torch.from_numpy(b) for b in batches])
    assert isinstance(mean, torch.Tensor) and mean.dtype == torch.float64
    # float32 inputs are reduced in float32 blocks merged in float64: far below float32's ulp.
    np.testing.assert_allclose(mean.numpy(), whole.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(var.numpy(), whole.var(axis=(0, 2, 3)), rtol=1e-7)


def test_empty_batches_are_skipped_whatever_their_channels():
    """As the docstring says: an empty batch first (or with another channel count) adds
    nothing and fixes nothing (it made the next batch's channels an error)."""
    a = np.random.default_rng(2).standard_normal((5, 4))
    mean, var, count = bn.precise_statistics([np.zeros((0, 3)), a, np.zeros((0, 7))])
    assert count == 5
    np.testing.assert_allclose(mean, a.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, a.var(axis=0), rtol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="at least one value per channel, got none"):
        bn.precise_statistics([])
    with pytest.raises(ValueError, match="at least one value per channel, got none"):
        bn.precise_statistics([np.zeros((0, 3))])
    with pytest.raises(ValueError, match=r"batches\[2\] must have 3 channels along axis 1 \(as batches\[0\]\)"):
        bn.precise_statistics([np.ones((2, 3)), np.ones((0, 3)), np.ones((2, 4))])
    with pytest.raises(TypeError, match=r"batches\[1\] must be an array, got list"):
        bn.precise_statistics([np.ones((2, 3)), [1.0, 2.0]])
    with pytest.raises(ValueError, match="axis must be in"):
        bn.precise_statistics([np.ones((2, 3))], axis=2)


@pytest.mark.parametrize("batch, error, words", [
    (np.ones((4, 3), np.int64), TypeError, "batches[1] must have dtype float16, bfloat16, float32 or float64, got int64"),
    (np.float32(1), ValueError, "batches[1] must have at least 2 dimensions (N, C, ...), got 0 dimensions with shape ()"),
    (np.ones(3, np.float32), ValueError, "batches[1] must have at least 2 dimensions (N, C, ...), got 1 dimension"),
])
def test_errors_name_the_batch(batch, error, words):
    # Named the statistics' `x` (which the caller never passed), or gave a 0-d batch the axis
    # range "[0, -1]".
    with pytest.raises(error, match=re.escape(words)):
        bn.precise_statistics([np.ones((2, 3), np.float32), batch])
    with pytest.raises(error, match=re.escape(words.replace("batches[1]", "batches[0]"))):
        bn.BatchNorm(3).recompute_statistics([batch])


def test_keras_convention_recomputes_from_one_value_per_channel():
    # Its running variance is the biased one, 0 for one value; the unbiased variance's "needs
    # two" was asked of it too. The torch convention still needs two.
    layer = bn.BatchNorm(3, convention="keras").recompute_statistics([np.array([[1.0, 2.0, 3.0]], np.float32)])
    assert layer.running_mean.tolist() == [1.0, 2.0, 3.0] and layer.running_var.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        bn.BatchNorm(3).recompute_statistics([np.ones((1, 3), np.float32)])
    with pytest.raises(ValueError, match="at least 1 value per channel, got 0"):
        bn.BatchNorm(3, convention="keras").recompute_statistics([np.ones((0, 3), np.float32)])


def test_recompute_statistics():
    rng = np.random.default_rng(2)
    batches = uneven_batches(rng, 20, c=4, offset=3.0)
    whole = np.concatenate(batches)
    layer = bn.BatchNorm(4, dtype="float64")
    for b in batches[:5]:
        if len(b) > 1:
            layer(b)  # running averages of a few steps
    tracked = layer.num_batches_tracked
    assert layer.recompute_statistics(batches) is layer
    np.testing.assert_allclose(layer.running_mean, whole.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, whole.var(axis=(0, 2, 3), ddof=1), rtol=1e-10)  # unbiased
    assert layer.num_batches_tracked == tracked
    y = layer.eval()(whole)  # normalized with the population statistics: mean 0, variance ~1
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-9)
    with pytest.raises(ValueError, match="needs running statistics"):
        bn.BatchNorm(4, track_running_stats=False).recompute_statistics(batches)
    with pytest.raises(ValueError, match="batches must have 3 channels along axis 1, got 4"):
        bn.BatchNorm(3).recompute_statistics(batches)
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        bn.BatchNorm(3).recompute_statistics([np.ones((1, 3))])
