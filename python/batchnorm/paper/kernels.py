"""The environment of the training processes, which makes their results the same bits on every
x86-64 CPU with AVX2 and FMA: one thread for BLAS and the batch-norm kernels, OpenBLAS's
Haswell kernels whatever the CPU, and NumPy's AVX2 loops even where AVX-512 ones exist. It
must be in place before a process imports NumPy, so it is applied to spawned workers only."""
from __future__ import annotations

from typing import Dict, List, Tuple

# The arrays are 60 x 100: too small for threads to pay, and on a busy 2-core machine spinning
# thread teams of OpenBLAS and OpenMP stall each other for milliseconds per step.
SINGLE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Why pin kernels: a float32 matrix product rounds its partial sums in an order, with or without
# FMA, that differs between BLAS kernels (OpenBLAS picks one per CPU: Haswell, SkylakeX,
# Sandybridge ...), and NumPy's float32 exp, log and tanh give different last bits in their
# AVX-512, AVX2 and baseline loops. Over thousands of SGD steps those last bits grow into
# different curves (issue #9: BN-x30 reached its target at step 2400 with one OpenBLAS kernel,
# 4920 with another). Products made exact whatever the kernel (each operand split into float64
# slices whose products and sums are exact) made the runs 4-5x slower, and NumPy's loops would
# still differ, so the kernels are fixed instead. The batch-norm kernels need nothing: their results
# are bitwise the same at every ISA level.
OPENBLAS_KERNEL = "Haswell"  # AVX2 + FMA; also what OpenBLAS runs on AMD Zen
MKL_KERNEL = "AVX2"  # MKL's conditional numerical reproducibility, for NumPy builds on MKL


def _numpy_cpu() -> Tuple[Dict[str, bool], List[str]]:
    """NumPy's view of this CPU's features, and the SIMD targets its loops are dispatched to."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # NumPy 1.x
        from numpy.core import _multiarray_umath as umath
    return dict(umath.__cpu_features__), list(umath.__cpu_dispatch__)


def worker_environment() -> Dict[str, str]:
    """The variables to set for a training process (and remove when the value is None)."""
    env = dict(SINGLE_THREAD)
    features, dispatch = _numpy_cpu()
    if features.get("AVX2") and features.get("FMA3"):
        env["OPENBLAS_CORETYPE"] = OPENBLAS_KERNEL
        env["MKL_CBWR"] = MKL_KERNEL
        # Every dispatch target above AVX2 (NumPy 2.4 calls them X86_V4, AVX512_ICL ...; older
        # versions AVX512F, AVX512_SKX ...). A name NumPy does not dispatch to would be a warning.
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(t for t in dispatch if t.startswith("AVX512") or t == "X86_V4")
        env["NPY_ENABLE_CPU_FEATURES"] = None  # NumPy refuses both variables at once
    return env


def describe(env: Dict[str, str]) -> str:
    """One line for the report: which kernels the runs use."""
    if "OPENBLAS_CORETYPE" in env:
        return f"kernels pinned: OpenBLAS {env['OPENBLAS_CORETYPE']}, NumPy loops up to AVX2"
    return "kernels not pinned (this CPU lacks AVX2 or FMA): results are this CPU's own"
