"""The C ABI's checks that tests/test_capi.py's file-based harness cannot reach, called through
ctypes (tests/capi_ctypes.py): a per-channel output sharing memory with another argument (the
Python API allocates them, a C host passes its own), a shape whose element count passes int64,
a bad environment setting met inside ghost batch norm's parallel groups (an error status, not
std::terminate), and bn_last_error after the calls that cannot fail. Every refused call leaves
every buffer as it was."""
from __future__ import annotations

import ctypes as ct
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import batchnorm as bn
from capi_ctypes import TrainingOptions, error, ghost_training, load, tensor

C = 3


@pytest.fixture(scope="module")
def lib():
    # The library the CMake package points at, <pkg>/lib (as test_capi.py finds it).
    return load(str(Path(bn.__file__).parent / "lib" / "libbatchnorm.so.1"))


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, C, 5)).astype(np.float32)
    return {"x": x, "dy": rng.standard_normal(x.shape).astype(np.float32), "y": np.full_like(x, 7.0),
            "w": rng.random(C).astype(np.float32) + 0.5, "b": rng.standard_normal(C).astype(np.float32),
            "rm": rng.standard_normal(C).astype(np.float32), "rv": rng.random(C).astype(np.float32) + 0.5,
            "m": np.full(C, -7.0, np.float32), "v": np.full(C, -7.0, np.float32)}


def _head(a):
    """A contiguous (C,) float32 view of a's first C values."""
    return a.reshape(-1)[:C]


# Each case: the call, on arrays `a`, with one per-channel output placed over another argument.
CASES = {
    "statistics mean=var": (lambda L, a: L.bn_statistics(tensor(a["x"]), 1, tensor(a["m"]), tensor(a["m"]), None,
                                                         None), "mean must not share memory with var"),
    "statistics mean over x": (lambda L, a: L.bn_statistics(tensor(a["x"]), 1, tensor(_head(a["x"])),
                                                            tensor(a["v"]), None, None),
                               "mean must not share memory with x"),
    "training saved_mean=running_mean": (
        lambda L, a: L.bn_forward_training(tensor(a["x"]), tensor(a["w"]), tensor(a["b"]), tensor(a["rm"]),
                                           tensor(a["rv"]), 0.1, 1e-5, 1, tensor(a["y"]), tensor(a["rm"]),
                                           tensor(a["v"]), None),
        "saved_mean must not share memory with running_mean"),
    "training saved_invstd over out": (
        lambda L, a: L.bn_forward_training(tensor(a["x"]), None, None, None, None, 0.1, 1e-5, 1, tensor(a["y"]),
                                           tensor(a["m"]), tensor(_head(a["y"])), None),
        "saved_invstd must not share memory with out"),
    "backward dweight=weight": (
        lambda L, a: L.bn_backward(tensor(a["dy"]), tensor(a["x"]), tensor(a["rm"]), tensor(a["rv"]),
                                   tensor(a["w"]), 1, tensor(a["y"]), tensor(a["w"]), tensor(a["v"]), None),
        "dweight must not share memory with weight"),
    "backward dbias over dy": (
        lambda L, a: L.bn_backward(tensor(a["dy"]), tensor(a["x"]), tensor(a["rm"]), tensor(a["rv"]), None, 1,
                                   tensor(a["y"]), tensor(a["m"]), tensor(_head(a["dy"])), None),
        "dbias must not share memory with dy"),
    "merge mean=var": (
        lambda L, a: L.bn_merge_statistics(2, _pointers(a["rm"], a["b"]), _pointers(a["rv"], a["w"]),
                                           (ct.c_int64 * 2)(3, 4), tensor(a["m"]), tensor(a["m"]), None, None),
        "mean must not share memory with var"),
    "fold bias_out=var": (
        lambda L, a: L.bn_fold(tensor(_kernel(a)), None, tensor(a["rm"]), tensor(a["rv"]), None, None, 1e-5, 0,
                               tensor(np.empty_like(_kernel(a))), tensor(a["rv"]), None),
        "bias_out must not share memory with var"),
}


def _pointers(*arrays):
    return (type(tensor(arrays[0])) * len(arrays))(*map(tensor, arrays))


def _kernel(a):
    """A (C, 5) float32 kernel made from x's values."""
    return np.ascontiguousarray(a["x"][0].reshape(C, 5))


@pytest.mark.parametrize("case", CASES)
def test_per_channel_output_over_another_argument_is_refused(lib, case):
    call, message = CASES[case]
    a = _arrays()
    before = {k: v.copy() for k, v in a.items()}
    status = call(lib, a)
    assert (status, error(lib)) == (1, f"{message}: it is written while {message.split()[-1]} is still in use; "
                                       "pass separate arrays")
    for k, v in a.items():
        assert v.tobytes() == before[k].tobytes(), f"a refused call wrote into {k}"


def test_partial_overlap_with_a_shard_is_refused(lib):
    a = _arrays()
    shards = np.arange(2 * C + 1, dtype=np.float32) / 7 + 1  # means[1] one element past means[0]
    status = lib.bn_merge_statistics(2, _pointers(shards[:C], shards[1:C + 1]), _pointers(a["rv"], a["w"]),
                                     (ct.c_int64 * 2)(3, 4), tensor(shards[1:C + 1]), tensor(a["v"]), None, None)
    assert (status, error(lib)) == (1, "mean must be either means[0] itself (same memory and strides) or share no "
                                       "memory with it, got memory that partially overlaps means[0]")


def test_merge_and_fold_in_place_still_run(lib):
    """Exactly a shard's arrays (merging in place) and exactly conv_bias, mean or bias (folding
    in place) are read channel by channel before the channel is written: allowed, as before."""
    a = _arrays()
    means, vars_ = [a["rm"].copy(), a["b"].copy()], [a["rv"].copy(), a["w"].copy()]
    want_mean, want_var = bn.merge_statistics(means, vars_, [3, 4])[:2]
    assert lib.bn_merge_statistics(2, _pointers(*means), _pointers(*vars_), (ct.c_int64 * 2)(3, 4),
                                   tensor(means[0]), tensor(vars_[1]), None, None) == 0, error(lib)
    assert means[0].tobytes() == want_mean.tobytes() and vars_[1].tobytes() == want_var.tobytes()
    kernel, conv_bias = _kernel(a), a["b"].copy()
    want_kernel, want_bias = bn.fold(kernel, conv_bias, a["rm"], a["rv"], a["w"], a["b"])
    assert lib.bn_fold(tensor(kernel), tensor(conv_bias), tensor(a["rm"]), tensor(a["rv"]), tensor(a["w"]),
                       tensor(a["b"]), 1e-5, 0, tensor(kernel), tensor(conv_bias), None) == 0, error(lib)
    assert kernel.tobytes() == want_kernel.tobytes() and conv_bias.tobytes() == want_bias.tobytes()


@pytest.mark.parametrize("name", ["conv_bias", "mean", "var", "weight", "bias"])
def test_fold_kernel_out_is_never_a_per_channel_vector(lib, name):
    # A 1-D kernel (C,) has the vectors' shape and strides, so kernel_out=var passed as "in
    # place"; the CUDA kernel reads var[c] in other threads while writing kernel_out[c].
    a = _arrays()
    vectors = {"conv_bias": a["b"].copy(), "mean": a["rm"].copy(), "var": a["rv"].copy(), "weight": a["w"].copy(),
               "bias": a["b"].copy()}
    before = {k: v.copy() for k, v in vectors.items()}
    kernel, bias_out = np.ones(C, np.float32), np.zeros(C, np.float32)
    status = lib.bn_fold(tensor(kernel), *(tensor(vectors[k]) for k in ("conv_bias", "mean", "var", "weight", "bias")),
                         1e-5, 0, tensor(vectors[name]), tensor(bias_out), None)
    assert (status, error(lib)) == (1, f"kernel_out must not share memory with {name}: it is written while {name} "
                                       "is still in use; pass separate arrays")
    assert all(vectors[k].tobytes() == before[k].tobytes() for k in vectors)


def test_separate_outputs_still_run(lib):
    a = _arrays()
    assert lib.bn_statistics(tensor(a["x"]), 1, tensor(a["m"]), tensor(a["v"]), None, None) == 0
    np.testing.assert_allclose(a["m"], a["x"].mean(axis=(0, 2)), rtol=1e-6)


def test_element_count_past_int64_is_refused(lib):
    # A broadcast (stride 0) view of 2 values claiming 2**65 elements: its count wrapped to 0
    # and the call returned BN_OK having done nothing.
    x, y = np.ones(2, np.float32), np.full(2, -7.0, np.float32)
    big = (2**32, 2**32, 2)
    status = lib.bn_forward_inference(tensor(x, big, (0, 0, 1)), tensor(np.zeros(2, np.float32)),
                                      tensor(np.ones(2, np.float32)), None, None, 1e-5, -1,
                                      tensor(y, big, (0, 0, 1)), None)
    assert (status, error(lib)) == (1, "x must have at most 2**63 - 1 elements, got shape (4294967296, 4294967296, 2)")
    assert list(y) == [-7.0, -7.0]
    m, v = np.zeros(2, np.float32), np.zeros(2, np.float32)
    assert lib.bn_statistics(tensor(x, big, (0, 0, 1)), -1, tensor(m), tensor(v), None, None) == 1


def test_arrays_an_option_requires_are_missing_as_null(lib):
    # The core's message is Python's ("got None"); through the C ABI it reads NULL, as a
    # required array's does ("x must be an array, got NULL").
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    y, m, s, r, d = np.empty_like(x), *(np.empty(3, np.float32) for _ in range(4))
    options = TrainingOptions(struct_size=ct.sizeof(TrainingOptions), renorm_rmax=3.0, renorm_dmax=5.0,
                              renorm_r_out=tensor(r), renorm_d_out=tensor(d))
    status = lib.bn_forward_training_ex(tensor(x), None, None, None, None, 0.1, 1e-5, 1, ct.byref(options),
                                        tensor(y), tensor(m), tensor(s), None)
    assert (status, error(lib)) == (1, "renorm needs running_mean and running_var (r and d compare the batch with "
                                       "them), got NULL")


def test_byte_count_past_int64_is_refused(lib):
    # 2**62 float32 elements fit the element count but not a byte count: an output shaped like
    # x (the Python API allocates one) was sized 2**64 bytes, wrapped to 0, and written past.
    x, y = np.ones(2, np.float32), np.full(2, -7.0, np.float32)
    big = (2**61, 2)
    status = lib.bn_forward_inference(tensor(x, big, (0, 1)), tensor(np.zeros(2, np.float32)),
                                      tensor(np.ones(2, np.float32)), None, None, 1e-5, -1,
                                      tensor(y, big, (0, 1)), None)
    assert (status, error(lib)) == (1, "x must have at most 2**63 - 1 bytes of elements, got shape "
                                       "(2305843009213693952, 2) of float32 (4 bytes each)")
    assert list(y) == [-7.0, -7.0]


@pytest.mark.parametrize("setting", ["BATCHNORM_ISA=avx3", "BATCHNORM_STREAM_BYTES=lots"])
def test_bad_setting_inside_ghost_groups_is_an_error_not_an_abort(lib, setting, tmp_path):
    # Ghost groups run as tasks of a parallel region, where the first op reads the settings: the
    # exception used to leave the region (std::terminate, the host process killed).
    name, value = setting.split("=")
    env = {**os.environ, name: value, "OMP_NUM_THREADS": "2"}  # (LD_PRELOAD kept: the sanitizer run needs it)
    here = Path(__file__).parent
    run = subprocess.run([sys.executable, str(here / "capi_ctypes.py"), lib._name, "2"], capture_output=True,
                         text=True, env=env, cwd=str(here))
    assert run.returncode == 0, run.stderr
    status, _, message = run.stdout.strip().partition(" ")
    assert status == "1" and message.startswith(name), run.stdout
    assert ghost_training(lib) == (0, "")  # this process's settings are fine


def test_last_error_is_cleared_by_every_call(lib):
    assert lib.bn_set_num_threads(0) == 1 and error(lib) == "n must be an int >= 1, got 0"
    lib.bn_version()
    assert error(lib) == ""
    lib.bn_set_num_threads(0)
    lib.bn_get_num_threads()
    assert error(lib) == ""


def test_null_data_with_elements_is_refused(lib):
    # A DLTensor with data NULL and a shape of 60 elements was read: a segmentation fault.
    a = _arrays()
    x = tensor(a["x"])
    x.contents.data = None
    assert lib.bn_statistics(x, 1, tensor(a["m"]), tensor(a["v"]), None, None) == 1
    assert error(lib) == "x must have data, got a NULL data pointer with shape (4, 3, 5)"
    assert list(a["m"]) == [-7.0] * C
    empty = tensor(a["x"][:0])
    empty.contents.data = None  # an empty array may come without memory
    status = lib.bn_forward_inference(empty, tensor(a["rm"]), tensor(a["rv"]), None, None, 1e-5, 1,
                                      tensor(a["y"][:0]), None)
    assert status == 0, error(lib)


def test_running_statistics_that_repeat_an_element_are_refused(lib):
    # A (C,) view of one float (stride 0): every channel's update went to one place, racing.
    a = _arrays()
    one = np.zeros(1, np.float32)
    status = lib.bn_forward_training(tensor(a["x"]), None, None, tensor(one, (C,), (0,)), tensor(a["rv"]), 0.1, 1e-5,
                                     1, tensor(a["y"]), tensor(a["m"]), tensor(a["v"]), None)
    assert status == 1 and error(lib).startswith("running_mean must not have overlapping elements"), error(lib)
    assert one[0] == 0.0 and (a["y"] == 7.0).all()
