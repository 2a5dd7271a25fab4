"""libbatchnorm's C ABI through ctypes, for tests that need what a file-based harness cannot
give (arrays sharing memory, shapes past int64, a process without the Python module): the
DLTensor and options structs of include/batchnorm/batchnorm.h, and a DLTensor of any NumPy view.
Imports neither batchnorm nor torch, so a subprocess with a bad BATCHNORM_ISA can load it."""
from __future__ import annotations

import ctypes as ct
from typing import Optional, Sequence

import numpy as np


class DLDevice(ct.Structure):
    _fields_ = [("device_type", ct.c_int32), ("device_id", ct.c_int32)]


class DLDataType(ct.Structure):
    _fields_ = [("code", ct.c_uint8), ("bits", ct.c_uint8), ("lanes", ct.c_uint16)]


class DLTensor(ct.Structure):
    _fields_ = [("data", ct.c_void_p), ("device", DLDevice), ("ndim", ct.c_int32), ("dtype", DLDataType),
                ("shape", ct.POINTER(ct.c_int64)), ("strides", ct.POINTER(ct.c_int64)),
                ("byte_offset", ct.c_uint64)]


T = ct.POINTER(DLTensor)


class TrainingOptions(ct.Structure):  # bn_training_options, 1.2
    _fields_ = [("struct_size", ct.c_size_t), ("residual", T), ("activation", ct.c_int32),
                ("reserved0", ct.c_int32), ("running_var_biased", ct.c_int32), ("skip_nonfinite", ct.c_int32),
                ("ghost_batch", ct.c_int64), ("renorm_rmax", ct.c_double), ("renorm_dmax", ct.c_double),
                ("renorm_r_out", T), ("renorm_d_out", T)]


_FLOAT = {np.dtype(np.float32): 32, np.dtype(np.float64): 64, np.dtype(np.float16): 16}


def tensor(a: np.ndarray, shape: Optional[Sequence[int]] = None, strides: Optional[Sequence[int]] = None) -> T:
    """A DLTensor over NumPy view `a` (kDLCPU, element strides), or over a's memory with the
    given shape and element strides; the pointer keeps `a` and its arrays alive."""
    shape = a.shape if shape is None else shape
    strides = [s // a.itemsize for s in a.strides] if strides is None else strides
    dims = (ct.c_int64 * max(len(shape), 1))(*shape)
    steps = (ct.c_int64 * max(len(shape), 1))(*strides)
    t = DLTensor(a.__array_interface__["data"][0], DLDevice(1, 0), len(shape), DLDataType(2, _FLOAT[a.dtype], 1),
                 dims, steps, 0)
    p = ct.pointer(t)
    p._keep = (a, dims, steps, t)  # type: ignore[attr-defined]
    return p


def load(path: str) -> ct.CDLL:
    """The library at `path` with the signatures the tests call."""
    lib = ct.CDLL(path)
    lib.bn_last_error.restype = ct.c_char_p
    lib.bn_statistics.argtypes = [T, ct.c_int, T, T, ct.POINTER(ct.c_int64), ct.c_void_p]
    lib.bn_merge_statistics.argtypes = [ct.c_int64, ct.POINTER(T), ct.POINTER(T), ct.POINTER(ct.c_int64), T, T,
                                        ct.POINTER(ct.c_int64), ct.c_void_p]
    lib.bn_forward_training.argtypes = [T, T, T, T, T, ct.c_double, ct.c_double, ct.c_int, T, T, T, ct.c_void_p]
    lib.bn_forward_training_ex.argtypes = [T, T, T, T, T, ct.c_double, ct.c_double, ct.c_int,
                                           ct.POINTER(TrainingOptions), T, T, T, ct.c_void_p]
    lib.bn_forward_inference.argtypes = [T, T, T, T, T, ct.c_double, ct.c_int, T, ct.c_void_p]
    lib.bn_backward.argtypes = [T, T, T, T, T, ct.c_int, T, T, T, ct.c_void_p]
    lib.bn_fold.argtypes = [T, T, T, T, T, T, ct.c_double, ct.c_int, T, T, ct.c_void_p]
    return lib


def error(lib: ct.CDLL) -> str:
    return lib.bn_last_error().decode()


def ghost_training(lib: ct.CDLL, groups: int = 4) -> tuple:
    """A ghost-batch forward_training_ex (groups of 2 samples): (status, message)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * groups, 3, 64, 64)).astype(np.float32)  # work enough for two threads
    y, saved = np.empty_like(x), [np.empty((groups, 3), np.float32) for _ in range(2)]
    options = TrainingOptions(struct_size=ct.sizeof(TrainingOptions), ghost_batch=2)
    status = lib.bn_forward_training_ex(tensor(x), None, None, None, None, 0.1, 1e-5, 1, ct.byref(options),
                                        tensor(y), tensor(saved[0]), tensor(saved[1]), None)
    return status, error(lib)


if __name__ == "__main__":  # `python capi_ctypes.py LIB THREADS`: a ghost forward in a fresh process
    import sys

    library = load(sys.argv[1])
    library.bn_set_num_threads(int(sys.argv[2]))
    print(*ghost_training(library))
