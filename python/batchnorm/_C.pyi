# Type stub of batchnorm._C, the native extension (private: use the batchnorm package).
# Array arguments are NumPy arrays or DLPack producers (or None where optional); results
# are NumPy arrays (Call.as_numpy) or Buffers that batchnorm turns into the caller's arrays.
# Parameters before `/` have no name in the binding (positional only); tests/test_stubs.py
# checks this file against the built module.
from typing import Any, Optional, Sequence, Tuple

class Buffer:
    """Memory batchnorm allocated for a result, exported through DLPack (zero-copy)."""
    @property
    def shape(self) -> Tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...
    def __dlpack__(
        self,
        *,
        stream: Optional[int] = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...

class Call:
    """Per-call settings: the CUDA stream (DLPack numbering), whether results are NumPy, and the
    stream's Python owner, which results keep alive (their memory is freed on that stream)."""
    def __init__(self, stream: int, as_numpy: bool, stream_owner: Any = None) -> None: ...

def statistics(x: Any, axis: int, wide: bool, call: Call, /) -> Tuple[Any, Any, int]: ...
def forward_training(
    x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any,
    momentum: float, eps: float, axis: int, out: Any,
    batch_mean: Any, batch_var: Any, batch_count: int, call: Call,
    saved_mean_out: Any = None, saved_invstd_out: Any = None, residual: Any = None, activation: int = 0,
    running_var_unbiased: bool = True, skip_nonfinite: bool = False, renorm: bool = False, rmax: float = 1.0,
    dmax: float = 0.0, ghost_batch: int = 0,
) -> Tuple[Any, ...]: ...
def forward_inference(
    x: Any, mean: Any, var: Any, weight: Any, bias: Any, eps: float, axis: int, out: Any, call: Call,
    residual: Any = None, activation: int = 0,
) -> Any: ...
def backward(
    dy: Any, x: Any, saved_mean: Any, saved_invstd: Any, weight: Any, axis: int, out: Any, call: Call,
    dweight_out: Any = None, dbias_out: Any = None, y: Any = None, activation: int = 0, residual: bool = False,
    dresidual_out: Any = None, renorm_r: Any = None, renorm_d: Any = None, ghost_batch: int = 0,
) -> Tuple[Any, ...]: ...
def backward_reduce(
    dy: Any, x: Any, mean: Any, invstd: Any, axis: int, call: Call, sum_dy_out: Any = None,
    sum_dy_xmu_out: Any = None, dweight_out: Any = None, dbias_out: Any = None,
) -> Tuple[Any, Any, Any, Any]: ...
def backward_elemt(
    dy: Any, x: Any, mean: Any, invstd: Any, sum_dy: Any, sum_dy_xmu: Any, count: int, weight: Any,
    axis: int, out: Any, call: Call, /,
) -> Any: ...
def merge_statistics(
    means: Sequence[Any], vars: Sequence[Any], counts: Sequence[int], call: Call, /
) -> Tuple[Any, Any, int]: ...
def fold(
    kernel: Any, conv_bias: Any, mean: Any, var: Any, weight: Any, bias: Any, eps: float, axis: int, call: Call, /
) -> Tuple[Any, Any]: ...
# The four dtype names in the core's order (core/dtype.h's table): a name's index is its code.
def dtype_names() -> Tuple[str, ...]: ...
def info() -> dict: ...
# ("cpu" | "cuda", device index) of an array, None for a non-array; `name` is the argument
# that errors (a DLPack producer that fails) are reported under.
def device_of(obj: Any, name: str = "array") -> Optional[Tuple[str, int]]: ...
def set_num_threads(n: int, /) -> None: ...
def get_num_threads() -> int: ...
def empty_cache() -> int: ...
# Testing hook: outputs above `bytes` bytes use streaming (non-temporal) stores; < 0: back to the default.
def _set_stream_threshold(bytes: int) -> None: ...
# The threshold in force: the hook's, else BATCHNORM_STREAM_BYTES, else the last-level cache capped at 32 MiB per CPU,
# and, where the reported cache passes that cap, at the CPUs' L2s where 0 < _store_probe() < 1.
def _stream_threshold() -> int: ...
# The store probe's time ratio, non-temporal over regular stores past one L2 (measured once; 0 where not measured).
def _store_probe() -> float: ...
