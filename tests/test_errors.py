"""Every bad input of the contract raises ValueError (values, shapes) or TypeError (types,
dtypes, devices) with a message naming the argument, what was expected and what was given;
and a failed call writes nothing: running statistics, out= and layer state stay bit-identical."""
from __future__ import annotations

import re

import numpy as np
import pytest

import batchnorm as bn
from helpers import snapshot

C = 3
SHAPE = (4, C, 5)


@pytest.fixture
def arrays(rng):
    """x (4, 3, 5) float32 with its parameters, running statistics and a sentinel-filled out."""
    return {
        "x": rng.standard_normal(SHAPE).astype(np.float32),
        "dy": rng.standard_normal(SHAPE).astype(np.float32),
        "w": rng.uniform(0.5, 2, C).astype(np.float32),
        "b": rng.standard_normal(C).astype(np.float32),
        "rm": rng.standard_normal(C).astype(np.float32),
        "rv": rng.uniform(0.5, 2, C).astype(np.float32),
        "out": np.full(SHAPE, 7.0, np.float32),
    }


def fails(exc, message: str, call, *watched, regex: bool = False) -> None:
    """`call()` raises `exc` whose message contains `message` (literal unless regex), and
    leaves every watched array bit-identical."""
    before = snapshot(*watched)
    with pytest.raises(exc, match=message if regex else re.escape(message)):
        call()
    assert snapshot(*watched) == before, "a failed call modified its running statistics or out="


def training(a, **kw):
    """forward_training with running statistics and out= unless overridden."""
    args = dict(weight=a["w"], bias=a["b"], running_mean=a["rm"], running_var=a["rv"], out=a["out"])
    args.update(kw)
    x = args.pop("x", a["x"])
    return lambda: bn.forward_training(x, args.pop("weight"), args.pop("bias"), **args)


# ---- rank, channels, counts -----------------------------------------------------------------------


def test_one_dimensional_x(arrays):
    a = arrays
    msg = "x must have at least 2 dimensions (N, C, ...), got 1 dimension with shape (5,)"
    x1 = np.zeros(5, np.float32)
    fails(ValueError, msg, lambda: bn.statistics(x1))
    fails(ValueError, msg, training(a, x=x1, out=None), a["rm"], a["rv"])
    fails(ValueError, msg, lambda: bn.forward_inference(x1, a["rm"], a["rv"]))
    fails(ValueError, msg, lambda: bn.backward(x1, x1, a["rm"], a["rv"]))
    fails(ValueError, "x must have at least 2 dimensions (N, C, ...), got 0 dimensions with shape ()",
          lambda: bn.statistics(np.float32(1.0)))


def test_too_many_dimensions():
    x = np.zeros((2,) * 17, np.float32)
    fails(ValueError, "x must have at most 16 dimensions, got 17", lambda: bn.statistics(x))
    fails(ValueError, "out must have at most 16 dimensions, got 17",
          lambda: bn.forward_training(np.zeros((2, 2), np.float32), out=x))


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("bad_shape", [(4,), (2,), (C, 1)])
def test_training_channel_count_mismatch(arrays, name, bad_shape):
    a = arrays
    bad = np.ones(bad_shape, np.float32)
    got = "(" + ", ".join(map(str, bad_shape)) + ("," if len(bad_shape) == 1 else "") + ")"
    fails(ValueError, f"{name} must have shape ({C},), got {got}", training(a, **{name: bad}),
          a["rm"], a["rv"], a["out"])


@pytest.mark.parametrize("name", ["mean", "var", "weight", "bias"])
def test_inference_channel_count_mismatch(arrays, name):
    a = arrays
    args = dict(mean=a["rm"], var=a["rv"], weight=a["w"], bias=a["b"])
    args[name] = np.ones(C + 1, np.float32)
    fails(ValueError, f"{name} must have shape ({C},), got ({C + 1},)",
          lambda: bn.forward_inference(a["x"], out=a["out"], **args), a["out"])


@pytest.mark.parametrize("name", ["saved_mean", "saved_invstd", "weight"])
def test_backward_channel_count_mismatch(arrays, name):
    a = arrays
    args = dict(saved_mean=a["rm"], saved_invstd=a["rv"], weight=a["w"])
    args[name] = np.ones(C - 1, np.float32)
    fails(ValueError, f"{name} must have shape ({C},), got ({C - 1},)",
          lambda: bn.backward(a["dy"], a["x"], args["saved_mean"], args["saved_invstd"], args["weight"],
                              out=a["out"]), a["out"])


def test_fold_channel_count_mismatch(arrays):
    k = np.ones((C, 2, 1, 1), np.float32)
    fails(ValueError, "mean must have shape (3,), got (4,)", lambda: bn.fold(k, None, np.zeros(4), np.ones(C)))
    fails(ValueError, "conv_bias must have shape (3,), got (2,)", lambda: bn.fold(k, np.zeros(2), np.zeros(C), np.ones(C)))
    fails(ValueError, "var must have shape (2,), got (3,)",
          lambda: bn.fold(k, None, np.zeros(2), np.ones(C), axis=1))  # ConvTranspose: channels on axis 1


def test_dy_shape_mismatch(arrays):
    a = arrays
    fails(ValueError, "dy must have the shape of x, (4, 3, 5), got (4, 3, 4)",
          lambda: bn.backward(a["dy"][..., :4], a["x"], a["rm"], a["rv"]))


def test_fewer_than_two_values_per_channel_in_training(arrays):
    a = arrays
    msg = "x must have at least 2 values per channel in training (the batch variance needs two), got 1"
    for shape in [(1, C), (1, C, 1, 1)]:
        out = np.full(shape, 7.0, np.float32)
        fails(ValueError, msg, training(a, x=np.ones(shape, np.float32), out=out), a["rm"], a["rv"], out)
    # ... while statistics and backward accept a single value
    assert bn.statistics(np.ones((1, C), np.float32))[2] == 1
    bn.backward(np.ones((1, C), np.float32), np.ones((1, C), np.float32), a["rm"], a["rv"])


def test_zero_size_inputs(arrays):
    a = arrays
    empty = np.zeros((0, C, 4), np.float32)
    fails(ValueError, "x must have at least 1 value per channel to compute statistics, got 0",
          lambda: bn.statistics(empty))
    fails(ValueError, "x must have at least 2 values per channel in training (the batch variance needs two), got 0",
          training(a, x=empty, out=None), a["rm"], a["rv"])
    fails(ValueError, "x must have at least 1 value per channel for the backward pass, got 0",
          lambda: bn.backward(empty, empty, a["rm"], a["rv"]))
    fails(ValueError, "x must have at least one channel, got shape (4, 0)",
          lambda: bn.statistics(np.zeros((4, 0), np.float32)))
    # forward_inference of an empty batch is not an error: it gives an empty y
    y = bn.forward_inference(empty, a["rm"], a["rv"])
    assert y.shape == empty.shape and y.dtype == np.float32


# ---- dtypes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int64", "int8", "uint16", "complex64", "complex128", "bool"])
def test_unsupported_dtype_of_x(arrays, dtype):
    a = arrays
    x = np.ones(SHAPE, dtype)
    msg = f"x must have dtype float16, bfloat16, float32 or float64, got {dtype}"
    fails(TypeError, msg, lambda: bn.statistics(x))
    fails(TypeError, msg, training(a, x=x, out=None), a["rm"], a["rv"])
    fails(TypeError, msg, lambda: bn.forward_inference(x, a["rm"], a["rv"]))
    fails(TypeError, msg, lambda: bn.backward(a["dy"], x, a["rm"], a["rv"]))
    fails(TypeError, msg.replace("x must", "kernel must"), lambda: bn.fold(x, None, a["rm"], a["rv"]))


def test_unsupported_dlpack_dtypes_are_named():
    # DLPack 1.1's narrow float codes (7-17) were "unknown8"; other codes name code and bits.
    torch = pytest.importorskip("torch")
    for dtype, name in [(torch.float8_e4m3fn, "float8_e4m3fn"), (torch.float8_e5m2, "float8_e5m2"),
                        (torch.complex64, "complex64"), (torch.int16, "int16")]:
        fails(TypeError, f"x must have dtype float16, bfloat16, float32 or float64, got {name}",
              lambda: bn.statistics(torch.ones(4, 3).to(dtype)))


def test_expanded_input_past_int64_bytes_is_refused():
    # torch's expand makes 2**62 float32 elements of 8 bytes: forward_inference and fold
    # allocated a wrapped 0-byte output for them and wrote past it (a segfault).
    torch = pytest.importorskip("torch")
    m, v = np.zeros(2, np.float32), np.ones(2, np.float32)
    for rows, dtype in [(2**61, torch.float32), (2**61 + 4, torch.float64)]:
        x = torch.ones(1, 2, dtype=dtype).expand(rows, 2)
        msg = f"must have at most 2**63 - 1 bytes of elements, got shape ({rows}, 2) of {str(dtype)[6:]}"
        fails(ValueError, "x " + msg, lambda: bn.forward_inference(x, m, v))
        fails(ValueError, "kernel " + msg, lambda: bn.fold(x, None, m, v))


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_unsupported_dtype_of_parameters(arrays, name):
    a = arrays
    fails(TypeError, f"{name} must have dtype float16, bfloat16, float32 or float64, got int32",
          training(a, **{name: np.ones(C, np.int32)}), a["rm"], a["rv"], a["out"])


def test_mixed_dtypes_dy_and_x(arrays):
    a = arrays
    fails(TypeError, "dy must have the dtype of x, float32, got float64",
          lambda: bn.backward(a["dy"].astype(np.float64), a["x"], a["rm"], a["rv"], out=a["out"]), a["out"])
    fails(TypeError, "dy must have the dtype of x, float64, got float16",
          lambda: bn.backward(a["dy"].astype(np.float16), a["x"].astype(np.float64), a["rm"], a["rv"]))


# ---- eps and momentum ------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps,shown", [(-1.0, "-1"), (-1e-9, "-1e-09"), (float("nan"), "nan"), (float("inf"), "inf")])
def test_bad_eps(arrays, eps, shown):
    a = arrays
    msg = f"eps must be finite and >= 0, got {shown}"
    fails(ValueError, msg, training(a, eps=eps), a["rm"], a["rv"], a["out"])
    fails(ValueError, msg, lambda: bn.forward_inference(a["x"], a["rm"], a["rv"], eps=eps, out=a["out"]), a["out"])
    fails(ValueError, msg, lambda: bn.fold(np.ones((C, 2)), None, a["rm"], a["rv"], eps=eps))


@pytest.mark.parametrize("momentum,shown", [(-0.1, "-0.1"), (1.5, "1.5"), (float("nan"), "nan"), (float("-inf"), "-inf")])
def test_bad_momentum(arrays, momentum, shown):
    a = arrays
    fails(ValueError, f"momentum must be a finite number in [0, 1], got {shown}", training(a, momentum=momentum),
          a["rm"], a["rv"], a["out"])


@pytest.mark.parametrize("name", ["eps", "momentum"])
@pytest.mark.parametrize("value,type_name", [("0.1", "str"), (None, "NoneType"), ([0.1], "list"), (True, "bool")])
def test_non_numeric_eps_and_momentum(arrays, name, value, type_name):
    a = arrays
    fails(TypeError, f"{name} must be a real number, got {type_name}", training(a, **{name: value}),
          a["rm"], a["rv"], a["out"])


# ---- running statistics ----------------------------------------------------------------------------------


def test_running_mean_without_running_var(arrays):
    a = arrays
    fails(ValueError, "running_mean and running_var must be given together, got running_mean without running_var",
          training(a, running_var=None), a["rm"], a["out"])
    fails(ValueError, "running_mean and running_var must be given together, got running_var without running_mean",
          training(a, running_mean=None), a["rv"], a["out"])


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_read_only_running_statistics(arrays, name):
    a = arrays
    a["rm" if name == "running_mean" else "rv"].flags.writeable = False
    fails(ValueError, f"{name} must be writable, got a read-only array", training(a), a["rm"], a["rv"], a["out"])


@pytest.mark.parametrize("value,type_name", [([0.0, 0.0, 0.0], "list"), ("abc", "str"), ({"a": 1}, "dict")])
def test_running_statistics_must_be_arrays(arrays, value, type_name):
    a = arrays
    fails(TypeError, f"running_var must be a NumPy array or an array supporting DLPack (__dlpack__), got {type_name}",
          training(a, running_var=value), a["rm"], a["out"])


# ---- out= ------------------------------------------------------------------------------------------------


def test_read_only_out(arrays):
    a = arrays
    out = a["out"]
    out.flags.writeable = False
    msg = "out must be writable, got a read-only array"
    fails(ValueError, msg, training(a), a["rm"], a["rv"], out)
    fails(ValueError, msg, lambda: bn.forward_inference(a["x"], a["rm"], a["rv"], out=out), out)
    fails(ValueError, msg, lambda: bn.backward(a["dy"], a["x"], a["rm"], a["rv"], out=out), out)
    x = a["x"]
    x.flags.writeable = False
    fails(ValueError, msg, training(a, out=x), a["rm"], a["rv"], x)


def test_wrongly_shaped_or_typed_out(arrays):
    a = arrays
    for bad in (np.zeros((4, C, 6), np.float32), np.zeros((4, C), np.float32), np.zeros((5, C, 4), np.float32)):
        got = "(" + ", ".join(map(str, bad.shape)) + ")"
        msg = f"out must have the shape of x, (4, 3, 5), got {got}"
        fails(ValueError, msg, training(a, out=bad), a["rm"], a["rv"], bad)
        fails(ValueError, msg, lambda: bn.forward_inference(a["x"], a["rm"], a["rv"], out=bad), bad)
        fails(ValueError, msg, lambda: bn.backward(a["dy"], a["x"], a["rm"], a["rv"], out=bad), bad)
    for dtype in ("float64", "float16"):
        bad = np.zeros(SHAPE, dtype)
        msg = f"out must have the dtype of x, float32, got {dtype}"
        fails(TypeError, msg, training(a, out=bad), a["rm"], a["rv"], bad)
        fails(TypeError, msg, lambda: bn.backward(a["dy"], a["x"], a["rm"], a["rv"], out=bad), bad)
    bad = np.zeros(SHAPE, np.int32)
    fails(TypeError, "out must have dtype float16, bfloat16, float32 or float64, got int32", training(a, out=bad),
          a["rm"], a["rv"])
    fails(TypeError, "out must be a NumPy array or an array supporting DLPack (__dlpack__), got list",
          training(a, out=a["x"].tolist()), a["rm"], a["rv"])


def overlap_message(name: str) -> str:
    return (f"out must be either {name} itself (same memory and strides) or share no memory with it, "
            f"got memory that partially overlaps {name}")


def test_out_partially_overlapping_an_input(arrays):
    a = arrays
    buf = np.arange(61, dtype=np.float32)
    x, out = buf[:60].reshape(SHAPE), buf[1:].reshape(SHAPE)
    fails(ValueError, overlap_message("x"), training(a, x=x, out=out), a["rm"], a["rv"], buf)
    fails(ValueError, overlap_message("x"), lambda: bn.forward_inference(x, a["rm"], a["rv"], out=out), buf)
    fails(ValueError, overlap_message("x"), lambda: bn.backward(a["dy"], x, a["rm"], a["rv"], out=out), buf)
    fails(ValueError, overlap_message("dy"), lambda: bn.backward(x, a["x"], a["rm"], a["rv"], out=out), buf)
    x = a["x"]
    fails(ValueError, overlap_message("x"), training(a, x=x, out=x[::-1]), a["rm"], a["rv"], x)  # other strides
    out = a["out"]
    w = out.reshape(-1)[:C]  # weight lives inside out
    fails(ValueError, overlap_message("weight"), training(a, weight=w), a["rm"], a["rv"], out)
    rm = out.reshape(-1)[5:5 + C]  # so does a running statistic
    fails(ValueError, overlap_message("running_mean"), training(a, running_mean=rm), a["rv"], out)


def test_interleaved_views_share_no_element():
    """The overlap test is exact for views of one dtype, shape and strides: x = buf[0::2] and
    out = buf[1::2] never touch the same element, so in-place-style writes are accepted."""
    buf = np.random.default_rng(0).standard_normal(2 * 6 * 4).astype(np.float32)
    x, out = buf[0::2].reshape(6, 4), buf[1::2].reshape(6, 4)
    expected = bn.forward_inference(x.copy(), np.zeros(4), np.ones(4))
    assert bn.forward_inference(x, np.zeros(4), np.ones(4), out=out) is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(buf[0::2].reshape(6, 4), x)  # x itself untouched
    # Shifted by a whole row, the views share elements: refused, naming x.
    fails(ValueError, overlap_message("x"),
          lambda: bn.forward_inference(buf[:40].reshape(10, 4), np.zeros(4), np.ones(4), out=buf[4:44].reshape(10, 4)),
          buf)


@pytest.mark.parametrize("written,other", [("running_mean", "x"), ("running_mean", "running_var"),
                                           ("running_mean", "weight"), ("running_var", "x"),
                                           ("running_var", "bias"), ("running_var", "weight")])
def test_running_statistics_aliasing_other_arguments(arrays, written, other):
    """Running statistics are written in place while the other arguments are read: one that
    shares memory with x, a parameter or the other statistic is refused, naming both."""
    a = arrays
    x = a["x"].copy()
    args = dict(weight=a["w"].copy(), bias=a["b"].copy(), running_mean=a["rm"].copy(), running_var=a["rv"].copy())
    source = {"x": x.reshape(-1), "weight": args["weight"], "bias": args["bias"],
              "running_var": args["running_var"], "running_mean": args["running_mean"]}[other]
    args[written] = source[:C]
    # running_mean is checked against every other argument, running_var against the inputs.
    names = (written, other) if not (written == "running_var" and other == "running_mean") else (other, written)
    msg = f"{names[0]} must not share memory with {names[1]}"
    fails(ValueError, msg, lambda: bn.forward_training(x, args["weight"], args["bias"],
                                                       running_mean=args["running_mean"],
                                                       running_var=args["running_var"]),
          x, *[v for v in args.values()])


def test_out_with_repeated_memory(arrays):
    a = arrays
    out = np.lib.stride_tricks.as_strided(a["out"], SHAPE, (0, 4, 12), writeable=True)
    fails(ValueError, "out must not have overlapping elements: its strides, ordered by size, must each step past",
          training(a, out=out), a["rm"], a["rv"], a["out"])


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_statistics_with_repeated_memory(arrays, name):
    # A broadcast view as a running statistic: every channel's update went to one element, the
    # threads racing (a different value from run to run).
    a = arrays
    one = np.zeros(1, np.float32)
    args = {"running_mean": a["rm"], "running_var": a["rv"], name: np.lib.stride_tricks.as_strided(
        one, (C,), (0,), writeable=True)}
    fails(ValueError, f"{name} must not have overlapping elements", lambda: bn.forward_training(a["x"], **args),
          one, a["rm"], a["rv"])


# ---- axis ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [3, -4, 100, 2**31, -(2**40), 2**70])
def test_axis_out_of_range(arrays, axis):
    a = arrays
    msg = f"axis must be in [-3, 2] for an array of rank 3, got {axis}"
    fails(ValueError, msg, lambda: bn.statistics(a["x"], axis=axis))
    fails(ValueError, msg, training(a, axis=axis), a["rm"], a["rv"], a["out"])
    fails(ValueError, msg, lambda: bn.forward_inference(a["x"], a["rm"], a["rv"], axis=axis, out=a["out"]), a["out"])
    fails(ValueError, msg, lambda: bn.backward(a["dy"], a["x"], a["rm"], a["rv"], axis=axis, out=a["out"]), a["out"])
    fails(ValueError, msg.replace("rank 3", "rank 2").replace("[-3, 2]", "[-2, 1]"),
          lambda: bn.fold(np.ones((C, 2)), None, a["rm"], a["rv"], axis=axis))


@pytest.mark.parametrize("axis,type_name", [(1.0, "float"), ("1", "str"), (None, "NoneType"), (True, "bool")])
def test_axis_of_wrong_type(arrays, axis, type_name):
    a = arrays
    fails(TypeError, f"axis must be an int, got {type_name}", lambda: bn.statistics(a["x"], axis=axis))
    fails(TypeError, f"axis must be an int, got {type_name}", training(a, axis=axis), a["rm"], a["rv"], a["out"])


def test_numpy_integer_axis_is_accepted(arrays):
    np.testing.assert_array_equal(bn.statistics(arrays["x"], axis=np.int64(-1))[0],
                                  bn.statistics(arrays["x"], axis=2)[0])


# ---- arguments that are not arrays --------------------------------------------------------------------------


@pytest.mark.parametrize("value,type_name", [("abc", "str"), ({"a": 1}, "dict"), (3.0, "float"), (object(), "object")])
def test_non_array_arguments(arrays, value, type_name):
    a = arrays
    msg = f"must be a NumPy array or an array supporting DLPack (__dlpack__), got {type_name}"
    fails(TypeError, "x " + msg, lambda: bn.statistics(value))
    fails(TypeError, "x " + msg, training(a, x=value), a["rm"], a["rv"], a["out"])
    fails(TypeError, "weight " + msg, training(a, weight=value), a["rm"], a["rv"], a["out"])
    fails(TypeError, "mean " + msg, lambda: bn.forward_inference(a["x"], value, a["rv"], out=a["out"]), a["out"])
    fails(TypeError, "dy " + msg, lambda: bn.backward(value, a["x"], a["rm"], a["rv"], out=a["out"]), a["out"])
    fails(TypeError, "kernel " + msg, lambda: bn.fold(value, None, a["rm"], a["rv"]))


def test_missing_required_arrays(arrays):
    a = arrays
    fails(TypeError, "x must be an array, got None", lambda: bn.statistics(None))
    fails(TypeError, "mean must be an array, got None", lambda: bn.forward_inference(a["x"], None, a["rv"]))
    fails(TypeError, "var must be an array, got None", lambda: bn.forward_inference(a["x"], a["rm"], None))
    fails(TypeError, "saved_invstd must be an array, got None", lambda: bn.backward(a["dy"], a["x"], a["rm"], None))
    fails(TypeError, "dy must be an array, got None", lambda: bn.backward(None, a["x"], a["rm"], a["rv"]))


class _Producer:
    """A DLPack producer that misbehaves in the way given."""

    def __init__(self, device=(1, 0), export=None):
        self.device, self.export = device, export

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None, max_version=None):
        return self.export()


def _raise():
    raise RuntimeError("the producer failed")


def test_misbehaving_dlpack_producers(arrays):
    fails(TypeError, "x must be on the CPU or a CUDA device, got DLPack device type 4",
          lambda: bn.statistics(_Producer(device=(4, 0), export=lambda: 1)))
    fails(TypeError, "x.__dlpack__() must return a DLPack capsule, got a int",
          lambda: bn.statistics(_Producer(export=lambda: 1)))
    fails(TypeError, "x could not be exported through DLPack", lambda: bn.statistics(_Producer(export=_raise)))
    ints = np.ones(SHAPE, np.int16)
    fails(TypeError, "x must have dtype float16, bfloat16, float32 or float64, got int16",
          lambda: bn.statistics(_Producer(export=ints.__dlpack__)))
    # A well-behaved foreign producer works (and the result is a NumPy array here).
    mean, _, _ = bn.statistics(_Producer(export=arrays["x"].__dlpack__))
    np.testing.assert_array_equal(mean, bn.statistics(arrays["x"])[0])


def _unsigned_strides_capsule(a):
    """`a`'s legacy DLPack capsule with each negative stride rewritten as CuPy up to 14.2 exports
    it: (2^64 + bytes) // itemsize, an unsigned division (cupy/cupy#10172)."""
    import ctypes

    class DLTensor(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("device", ctypes.c_int32 * 2), ("ndim", ctypes.c_int32),
                    ("dtype", ctypes.c_uint8 * 4), ("shape", ctypes.POINTER(ctypes.c_int64)),
                    ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]

    cap = a.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    t = DLTensor.from_address(get(cap, b"dltensor"))
    for i, b in enumerate(a.strides):
        if b < 0:
            t.strides[i] = ctypes.c_int64((2**64 + b) // a.itemsize).value
    return cap


class _FlippedCupyLike(_Producer):
    """A producer with NumPy/CuPy-style byte `.strides` whose DLPack export has CuPy's unsigned
    negative strides."""

    def __init__(self, a, advertised=None):
        super().__init__(export=lambda: _unsigned_strides_capsule(a))
        self.strides = a.strides if advertised is None else advertised


def test_negative_strides_exported_as_unsigned_are_repaired_or_refused():
    """CuPy up to at least 14.2 exports x[::-1]'s strides as numbers past any address space. With
    the producer's own byte strides to explain them exactly, they are read as meant; otherwise
    the array is refused with a ValueError (never read through them)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 3, 5)).astype(np.float32)
    for flipped in (base[::-1], base[:, ::-1, ::-2], base[::-1, :, ::-1].transpose(1, 0, 2)):
        y, mean, invstd = bn.forward_training(_FlippedCupyLike(flipped), axis=1 if flipped.shape[1] == 3 else 0)
        want_y, want_mean, want_invstd = bn.forward_training(np.ascontiguousarray(flipped),
                                                             axis=1 if flipped.shape[1] == 3 else 0)
        np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    # Byte strides that do not explain the export (or none at all): refused, naming the cause.
    flipped = base[::-1]
    message = "x has strides (%d, 5, 1) (elements) with shape (6, 3, 5) that reach past any address space" % (
        (2**64 - 60) // 4)
    fails(ValueError, message, lambda: bn.statistics(_FlippedCupyLike(flipped, advertised=(-64, 20, 4))))
    fails(ValueError, message, lambda: bn.statistics(_FlippedCupyLike(flipped, advertised=("-60", 20, 4))))
    fails(ValueError, "cupy/cupy#10172", lambda: bn.statistics(_Producer(export=lambda: _unsigned_strides_capsule(
        flipped))))


# ---- merge_statistics ----------------------------------------------------------------------------------


def test_merge_statistics_errors():
    m, v = np.zeros(C, np.float32), np.ones(C, np.float32)
    fails(ValueError, "means, vars and counts must have the same length, got 2, 2 and 3",
          lambda: bn.merge_statistics([m, m], [v, v], [1, 2, 3]))
    fails(ValueError, "means, vars and counts must have the same length, got 2, 1 and 2",
          lambda: bn.merge_statistics([m, m], [v], [1, 2]))
    fails(ValueError, "counts must not all be zero, got 2 shards with no values",
          lambda: bn.merge_statistics([m, m], [v, v], [0, 0]))
    fails(ValueError, "counts[1] must be >= 0, got -2", lambda: bn.merge_statistics([m, m], [v, v], [3, -2]))
    fails(TypeError, "counts[1] must be an int, got float", lambda: bn.merge_statistics([m, m], [v, v], [3, 2.0]))
    fails(TypeError, "counts[0] must be an int, got str", lambda: bn.merge_statistics([m], [v], ["3"]))
    fails(TypeError, "counts[0] must be an int, got bool", lambda: bn.merge_statistics([m], [v], [True]))
    fails(TypeError, "counts must be a sequence of ints, got int", lambda: bn.merge_statistics([m], [v], 3))
    fails(TypeError, "means must be a sequence of arrays, got int", lambda: bn.merge_statistics(3, [v], [3]))
    fails(ValueError, "means must hold at least one shard, got none", lambda: bn.merge_statistics([], [], []))
    fails(ValueError, "vars[1] must have shape (3,), got (4,)",
          lambda: bn.merge_statistics([m, m], [v, np.ones(4)], [1, 1]))
    fails(ValueError, "means[0] must have shape (C,), got (3, 1)",
          lambda: bn.merge_statistics([m[:, None]], [v], [1]))
    fails(TypeError, "means[1] must have dtype float16, bfloat16, float32 or float64, got int64",
          lambda: bn.merge_statistics([m, np.zeros(C, np.int64)], [v, v], [1, 1]))


# ---- threads ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,exc,message", [
    (0, ValueError, "n must be an int >= 1, got 0"),
    (-3, ValueError, "n must be an int >= 1, got -3"),
    ("2", TypeError, "n must be an int >= 1, got str"),
    (1.5, TypeError, "n must be an int >= 1, got float"),
    (True, TypeError, "n must be an int >= 1, got bool"),
    (None, TypeError, "n must be an int >= 1, got NoneType"),
    (2**70, ValueError, f"got {2**70}"),
])
def test_set_num_threads_errors(n, exc, message, restore_threads):
    with pytest.raises(exc, match=re.escape(message)):
        bn.set_num_threads(n)
    assert bn.get_num_threads() == restore_threads


# ---- the BatchNorm layer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(num_features=0), ValueError, "num_features must be >= 1, got 0"),
    (dict(num_features=-2), ValueError, "num_features must be >= 1, got -2"),
    (dict(num_features=2.5), TypeError, "num_features must be an int, got float"),
    (dict(num_features=3, dtype="float16"), TypeError, "dtype must be 'float32' or 'float64', got 'float16'"),
    (dict(num_features=3, dtype="int32"), TypeError, "dtype must be 'float32' or 'float64', got 'int32'"),
    (dict(num_features=3, eps=-1.0), ValueError, "eps must be finite and >= 0, got -1.0"),
    (dict(num_features=3, momentum=1.5), ValueError, "momentum must be a finite number in [0, 1] or None, got 1.5"),
    (dict(num_features=3, momentum="0.1"), TypeError, "momentum must be a real number, got str"),
])
def test_layer_construction_errors(kwargs, exc, message):
    n = kwargs.pop("num_features")
    with pytest.raises(exc, match=re.escape(message)):
        bn.BatchNorm(n, **kwargs)


def layer_state(layer):
    return (snapshot(layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.grad_weight,
                     layer.grad_bias), layer.num_batches_tracked, layer.training)


def test_layer_backward_before_forward():
    with pytest.raises(RuntimeError, match=re.escape("BatchNorm.backward needs a forward call first")):
        bn.BatchNorm(3).backward(np.ones(SHAPE, np.float32))


def test_failed_layer_calls_leave_the_state_untouched(arrays):
    a = arrays
    layer = bn.BatchNorm(C)
    layer(a["x"])
    layer.backward(a["dy"])
    before = layer_state(layer)
    with pytest.raises(ValueError, match=re.escape("x must have num_features=3 channels on axis 1, got 4 (x has shape (4, 4, 5))")):
        layer(np.ones((4, 4, 5), np.float32))
    with pytest.raises(ValueError, match=re.escape("dy must have the shape of x, (4, 3, 5), got (4, 3, 4)")):
        layer.backward(a["dy"][..., :4])
    with pytest.raises(TypeError, match=re.escape("x must have dtype float16, bfloat16, float32 or float64, got int64")):
        layer(np.ones(SHAPE, np.int64))
    assert layer_state(layer) == before


def good_state(n=C):
    return {"weight": np.full(n, 2.0), "bias": np.full(n, 0.5), "running_mean": np.full(n, 1.0),
            "running_var": np.full(n, 3.0), "num_batches_tracked": np.array(5)}


@pytest.mark.parametrize("change,exc,message", [
    (dict(running_var=np.ones(4)), ValueError, "running_var must have shape (3,), got (4,)"),
    (dict(bias=np.ones((3, 1))), ValueError, "bias must have shape (3,), got (3, 1)"),
    (dict(num_batches_tracked=np.arange(2)), ValueError, "num_batches_tracked must be a scalar, got shape (2,)"),
    (dict(extra=np.ones(3)), ValueError, "unexpected ['extra']"),
    (dict(weight=None), ValueError, "missing ['weight']"),
])
def test_load_state_dict_errors_leave_the_layer_unchanged(arrays, change, exc, message):
    layer = bn.BatchNorm(C)
    layer(arrays["x"])
    before = layer_state(layer)
    state = good_state()
    state.update(change)
    state = {k: v for k, v in state.items() if v is not None}
    with pytest.raises(exc, match=re.escape(message)):
        layer.load_state_dict(state)
    assert layer_state(layer) == before
    layer.load_state_dict(good_state())  # and a good one still loads
    assert layer.num_batches_tracked == 5 and (layer.running_var == 3).all()


# ---- byte order, counts, immutable arrays, user-facing messages (issues #9, #10) ------------


def swapped(a: np.ndarray) -> np.ndarray:
    """The same values in the non-native byte order."""
    return a.astype(a.dtype.newbyteorder("S"))


# Each call gets the fixture's arrays `a` and byte-swapped copies `s` of them.
BYTE_ORDER_CALLS = {
    "x": lambda a, s: bn.statistics(s["x"]),
    "weight": lambda a, s: bn.forward_training(a["x"], s["w"], a["b"]),
    "bias": lambda a, s: bn.forward_training(a["x"], a["w"], s["b"]),
    "running_mean": lambda a, s: bn.forward_training(a["x"], running_mean=s["rm"], running_var=a["rv"]),
    "running_var": lambda a, s: bn.forward_training(a["x"], running_mean=a["rm"], running_var=s["rv"]),
    "out": lambda a, s: bn.forward_inference(a["x"], a["rm"], a["rv"], out=s["out"]),
    "mean": lambda a, s: bn.forward_inference(a["x"], s["rm"], a["rv"]),
    "var": lambda a, s: bn.forward_inference(a["x"], a["rm"], s["rv"]),
    "dy": lambda a, s: bn.backward(s["dy"], a["x"], a["rm"], a["rv"]),
    "saved_mean": lambda a, s: bn.backward(a["dy"], a["x"], s["rm"], a["rv"]),
    "saved_invstd": lambda a, s: bn.backward(a["dy"], a["x"], a["rm"], s["rv"]),
    "means[1]": lambda a, s: bn.merge_statistics([a["rm"], s["rm"]], [a["rv"], a["rv"]], [3, 4]),
    "vars[0]": lambda a, s: bn.merge_statistics([a["rm"], a["rm"]], [s["rv"], a["rv"]], [3, 4]),
    "kernel": lambda a, s: bn.fold(s["k"], None, a["rm"], a["rv"]),
    "conv_bias": lambda a, s: bn.fold(a["k"], s["b"], a["rm"], a["rv"]),
}


@pytest.mark.parametrize("name", list(BYTE_ORDER_CALLS))
def test_non_native_byte_order_is_refused(arrays, name):
    """Big-endian arrays were read as garbage (and a big-endian out= got native bytes)."""
    a = dict(arrays, k=np.ones((C, 2), np.float32))
    s = {k: swapped(v) for k, v in a.items()}
    msg = f"{name} must have native byte order (float32), got the byte-swapped dtype"
    fails(TypeError, msg, lambda: BYTE_ORDER_CALLS[name](a, s), *a.values(), *s.values())


@pytest.mark.parametrize("name", list(BYTE_ORDER_CALLS))
def test_masked_arrays_are_refused(arrays, name):
    """numpy.ma arrays are ndarrays whose data the kernels read whole: the statistics of
    [[1, 2], [3, 4], masked [nan, 1e6]] came back as a NaN channel and a 333335 mean."""
    a = dict(arrays, k=np.ones((C, 2), np.float32))
    m = {k: np.ma.masked_array(v, mask=np.arange(v.size).reshape(v.shape) == 0) for k, v in a.items()}
    msg = f"{name} must be a plain NumPy array, got a masked array (numpy.ma.MaskedArray), whose mask would be ignored"
    fails(TypeError, msg, lambda: BYTE_ORDER_CALLS[name](a, m), *a.values())


def test_a_consumed_dlpack_capsule_is_named_so(arrays):
    """A capsule can be imported once, also by a call that then failed; the message had said it
    was no DLPack capsule ("x.__dlpack__() must return a DLPack capsule, got a PyCapsule")."""
    x = arrays["x"]
    cap = x.__dlpack__()
    bn.statistics(cap)
    msg = "x is a DLPack capsule that was already consumed (a capsule can be imported only once"
    fails(TypeError, msg, lambda: bn.statistics(cap))
    cap = x.__dlpack__()
    fails(ValueError, "mean must have shape", lambda: bn.forward_inference(cap, np.zeros(2, np.float32), np.ones(2)))
    fails(TypeError, msg, lambda: bn.forward_inference(cap, arrays["rm"], arrays["rv"]))


def test_merge_statistics_negative_variance_is_nan():
    """A negative variance is no variance: its channel's merged variance is NaN (as
    forward_inference's output is for one), where it had been merged into a plausible value
    (or a negative one); the other channels and every mean are merged as ever."""
    means = [np.array([1.0, 2.0]), np.array([3.0, -1.0])]
    good = [np.array([2.0, 0.5]), np.array([1.0, 4.0])]
    want_mean, want_var, n = bn.merge_statistics(means, good, [3, 5])
    for bad in (-1e3, -0.5, -np.inf):
        mean, var, _ = bn.merge_statistics(means, [np.array([bad, 0.5]), good[1]], [3, 5])
        np.testing.assert_array_equal(mean, want_mean)
        assert np.isnan(var[0]) and var[1] == want_var[1]
    _, var, _ = bn.merge_statistics(means, [np.array([-0.0, 0.5]), good[1]], [3, 5])  # -0 is 0
    assert np.isfinite(var).all()


def test_merge_statistics_count_overflow():
    m, v = np.zeros(2), np.ones(2)
    fails(ValueError, "counts must add up to at most 2**63 - 1 values, got a total beyond it at counts[1]",
          lambda: bn.merge_statistics([m, m], [v, v], [2**62, 2**62]))
    assert bn.merge_statistics([m, m], [v, v], [2**62, 2**62 - 1])[2] == 2**63 - 1


def test_channel_count_mismatch_names_axis_and_shape(arrays):
    """A wrong axis on NHWC data first shows up as a parameter of the wrong length."""
    x = np.ones((8, 5, 5, 3), np.float32)
    fails(ValueError, "weight must have shape (5,), got (3,) (x has shape (8, 5, 5, 3): 5 channels on axis 1)",
          lambda: bn.forward_training(x, np.ones(3, np.float32)))
    fails(ValueError, "mean must have shape (5,), got (3,) (x has shape (8, 5, 5, 3): 5 channels on axis 1)",
          lambda: bn.forward_inference(x, np.ones(3), np.ones(3)))


def test_layer_channel_mismatch_in_user_terms():
    layer = bn.BatchNorm(4)
    before = layer.state_dict()
    fails(ValueError, "x must have num_features=4 channels on axis 1, got 3 (x has shape (8, 3, 5, 5))",
          lambda: layer(np.ones((8, 3, 5, 5), np.float32)))
    nhwc = bn.BatchNorm(3)
    fails(ValueError, "x must have num_features=3 channels on axis 1, got 5 (x has shape (8, 5, 5, 3)); is axis right",
          lambda: nhwc(np.ones((8, 5, 5, 3), np.float32)))
    after = layer.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.torch
def test_tensor_requiring_grad_gets_one_clear_sentence():
    torch = pytest.importorskip("torch")
    x = torch.ones(4, 3, requires_grad=True)
    with pytest.raises(TypeError) as err:
        bn.statistics(x)
    message = str(err.value)
    assert message.startswith("x must not require grad: batchnorm's array functions record no autograd graph")
    assert "batchnorm.torch" in message and "x.detach()" in message
    assert "At:" not in message and "\n" not in message
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match="^weight must not require grad"):
        bn.forward_training(x.detach(), w)


@pytest.mark.parametrize("value", ["foo", "AVX2", "sse4"])
def test_unknown_isa_is_refused_at_import(value):
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import batchnorm"], env=dict(os.environ, BATCHNORM_ISA=value),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"BATCHNORM_ISA must be one of baseline, avx2, avx512, avx512_bf16 (or unset), got '{value}'" in done.stderr


def test_jax_arrays_are_never_written():
    """JAX arrays are immutable (and may be shared by XLA): as running statistics or out=
    they are refused, and stay unchanged."""
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed")
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    rm, rv = jnp.zeros(4), jnp.ones(4)
    with pytest.raises(ValueError, match="^running_mean must be a writable array, got an immutable JAX array; "
                                         ".*batchnorm.jax.batch_norm"):
        bn.forward_training(x, running_mean=rm, running_var=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="^running_var must be a writable array, got an immutable JAX array"):
        bn.forward_training(x, running_mean=np.zeros(4, np.float32), running_var=rv)
    with pytest.raises(ValueError, match="^out must be a writable array, got an immutable JAX array"):
        bn.forward_inference(jnp.asarray(x), np.zeros(4), np.ones(4), out=jnp.zeros((8, 4)))
    assert (np.asarray(rm) == 0).all() and (np.asarray(rv) == 1).all()


@pytest.mark.parametrize("call,message", [
    (lambda x, m, v: bn.merge_statistics([m], [v], [2**63]), r"counts\[0\] must fit in 64 bits"),
    (lambda x, m, v: bn.forward_training(x, batch_statistics=(m, v, 2**63)), "batch_statistics count must fit in 64"),
    (lambda x, m, v: bn.backward_elemt(x, x, m, v, m, v, -(2**64)), r"count must fit in 64 bits .* got -1844"),
    (lambda x, m, v: bn.forward_training(x, ghost_batch=2**64), "ghost_batch must fit in 64 bits"),
    (lambda x, m, v: bn.forward_training(x, momentum=10**400), "momentum must be within float64's range .* 401 digits"),
    (lambda x, m, v: bn.forward_inference(x, m, v, eps=-(10**400)), "eps must be within float64's range"),
    (lambda x, m, v: bn.BatchNorm(2**70), "num_features must fit in 64 bits"),
], ids=["merge-count", "batch-count", "elemt-count", "ghost", "momentum", "eps", "num_features"])
def test_numbers_past_the_native_types_are_value_errors(call, message):
    """Python ints past int64 and reals past float64 name their argument (pybind11 said
    "incompatible function arguments" or "Unable to cast", float() an OverflowError)."""
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    m, v, _ = bn.statistics(x)
    with pytest.raises(ValueError, match=message):
        call(x, m, v)


@pytest.mark.parametrize("case", ["x-meta", "weight-meta", "weight-meta-numpy-x", "weight-sparse", "x-sparse"])
def test_torch_tensors_without_memory_are_type_errors_naming_the_argument(case):
    """meta and sparse tensors: a TypeError naming the argument (torch's own ValueError,
    BufferError or RuntimeError came through, naming nothing)."""
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 3)
    meta, sparse = torch.ones(3, device="meta"), torch.ones(3).to_sparse()
    calls = {
        "x-meta": (lambda: bn.statistics(torch.ones(4, 3, device="meta")), "x must be on the CPU or a CUDA device"),
        "weight-meta": (lambda: bn.forward_training(x, meta), "weight must be on the CPU or a CUDA device"),
        "weight-meta-numpy-x": (lambda: bn.forward_training(x.numpy(), meta), "weight must be on the CPU or a CUDA"),
        "weight-sparse": (lambda: bn.forward_training(x, sparse), "weight could not be exported through DLPack"),
        "x-sparse": (lambda: bn.statistics(x.to_sparse()), "x could not be exported through DLPack"),
    }
    call, message = calls[case]
    with pytest.raises(TypeError, match=message):
        call()
