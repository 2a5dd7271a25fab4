# Type stub of batchnorm._jax (csrc/jax/module.cpp): the XLA FFI handlers of batchnorm.jax and
# the core's argument checks run on shapes and dtypes alone, for trace time.
from typing import Any, Dict, Optional, Tuple

Spec = Optional[Tuple[Tuple[int, ...], str]]  # (shape, dtype name) of an array, or None
Summary = Tuple[int, int, str]  # (axis in [0, ndim), channels, accumulation dtype name)

def registrations() -> Dict[str, Dict[str, Any]]: ...  # {target: {platform: PyCapsule}}
def ffi_api_version() -> Tuple[int, int]: ...
def check_forward_training(x: Spec, weight: Spec, bias: Spec, running_mean: Spec, running_var: Spec,
                           momentum: float, eps: float, axis: int, residual: Spec = ...,
                           activation: int = ..., running_var_unbiased: bool = ..., skip_nonfinite: bool = ...,
                           renorm: bool = ..., rmax: float = ..., dmax: float = ...,
                           ghost_batch: int = ...) -> Summary: ...
def saved_shape(x: Spec, axis: int, ghost_batch: int) -> Tuple[int, ...]: ...
def check_forward_inference(x: Spec, mean: Spec, var: Spec, weight: Spec, bias: Spec, eps: float, axis: int,
                            mean_arg: str = ..., var_arg: str = ..., residual: Spec = ...,
                            activation: int = ...) -> Summary: ...
