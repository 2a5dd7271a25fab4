"""The caller's kind of array: which library `x` came from, which CUDA stream to run on,
and how to hand results back (NumPy arrays as they are, anything else through DLPack)."""
from __future__ import annotations

import operator
import os
import sys
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from . import _C

_LEGACY_DEFAULT_STREAM = 1  # DLPack's number for CUDA's legacy default stream

# The four dtype names in the core's order (a name's index is its code): core/dtype.h's table.
DTYPES: Tuple[str, ...] = _C.dtype_names()


def _library(obj: Any) -> str:
    return type(obj).__module__.partition(".")[0]


def _device_of(lead: Any, library: str, name: str) -> Any:
    """_C.device_of, from torch's own attributes for its CPU and CUDA tensors: a tensor's
    __dlpack_device__ costs 1.5 us a call, a fifth of a small call's whole overhead."""
    if library == "torch":
        if getattr(lead, "is_cpu", None) is True:
            return ("cpu", 0)
        if getattr(lead, "is_cuda", None) is True:
            return ("cuda", lead.get_device())
    return _C.device_of(lead, name)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn_caller(message: str) -> None:
    """A UserWarning attributed to the first frame outside this package (the user's call)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _from_dlpack_of(library: str) -> Callable[[Any], Any]:
    if library == "torch":
        import torch

        return torch.from_dlpack
    if library == "cupy":
        import cupy

        return cupy.from_dlpack
    if library in ("jax", "jaxlib"):
        import jax
        import jax.numpy as jnp

        def to_jax(result: Any) -> Any:
            # JAX without 64-bit types (its default) turns a float64 result into float32 without
            # a word; say so, as JAX does when a float64 array is asked of it.
            if getattr(result, "dtype", None) == "float64" and not jax.config.jax_enable_x64:
                warn_caller(
                    "a float64 result (statistics(dtype='float64'), backward_reduce's sums, precise_statistics) "
                    "becomes float32 in JAX without 64-bit types; enable them with "
                    "jax.config.update('jax_enable_x64', True), or pass NumPy arrays")
            return jnp.from_dlpack(result)

        return to_jax
    module = sys.modules.get(library)
    convert = getattr(module, "from_dlpack", None) if module is not None else None
    return convert if callable(convert) else np.from_dlpack


def _stream_number(stream: Any) -> int:
    """A CUDA stream given as an int, or as a torch / CuPy stream object."""
    for attr in ("cuda_stream", "ptr"):
        if hasattr(stream, attr):
            stream = getattr(stream, attr)
            break
    try:
        number = operator.index(stream)
    except TypeError:
        raise TypeError(
            "stream must be an int (a cudaStream_t) or a torch/CuPy stream object, "
            f"got {type(stream).__name__}"
        ) from None
    return number if number != 0 else _LEGACY_DEFAULT_STREAM


def _current_stream(x: Any, library: str) -> Any:
    """The stream a call on x runs on without stream=: torch's current stream (an int: torch
    never destroys its own streams), CuPy's current Stream object, else the legacy default."""
    if library == "torch":
        import torch

        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # 0.3 us instead of 4 us
        if raw is not None:
            return raw(x.device.index)
        return torch.cuda.current_stream(x.device).cuda_stream
    if library == "cupy":
        import cupy

        return cupy.cuda.get_current_stream()  # the object: results keep it alive
    return _LEGACY_DEFAULT_STREAM


_TORCH_CAPSULES: Optional[Tuple[type, Callable[[Any], Any], Callable[[Any], Any]]] = None


def _torch_capsules() -> Optional[Tuple[type, Callable[[Any], Any], Callable[[Any], Any]]]:
    """torch's own C functions between tensors and DLPack capsules. torch.Tensor.__dlpack__
    and torch.from_dlpack spend 10-15 us each in Python on a stream handshake that does
    nothing when producer and consumer use the same stream, as a call on the current stream
    does; six arrays made that most of a small CUDA call's time. Looked up once (an import
    statement per call cost 0.7 us)."""
    global _TORCH_CAPSULES
    if _TORCH_CAPSULES is not None:
        return _TORCH_CAPSULES
    try:
        import torch
        from torch.utils.dlpack import from_dlpack, to_dlpack
    except ImportError:  # pragma: no cover - torch without its DLPack helpers
        return None
    # A capsule goes straight to torch's converter: from_dlpack first tests the capsule for
    # __dlpack__, a failed attribute lookup (0.5-1 us a result).
    from_capsule = getattr(torch._C, "_from_dlpack", from_dlpack)
    _TORCH_CAPSULES = (torch.Tensor, to_dlpack, from_capsule)
    return _TORCH_CAPSULES


def foreign_args(arrays: Sequence[Any]) -> Sequence[Any]:
    """Arrays of a call whose lead is no torch tensor (NumPy's, JAX's), or of a call that takes
    them apart from Kind.args (fold, merge_statistics): torch tensors among them with torch's
    negative bit resolved (a copy), as Kind.args resolves a torch call's; DLPack hands over the
    memory of a lazily negated view as it is, the values negated (a mean read as -mean)."""
    torch = sys.modules.get("torch")  # (no torch imported: no tensor among them)
    if torch is None:
        return arrays
    tensor = torch.Tensor
    return [a.resolve_neg() if a is not None and type(a) is not np.ndarray and isinstance(a, tensor) and a.is_neg()
            else a for a in arrays]


class Kind:
    """How one call treats its arrays: built from the array whose kind results follow."""

    __slots__ = ("library", "device", "stream", "call", "_convert", "_torch", "_capsules")

    def __init__(self, lead: Any, stream: Optional[Any] = None, name: str = "x") -> None:
        self.library = _library(lead)
        as_numpy = isinstance(lead, np.ndarray) or not hasattr(lead, "__dlpack__")
        device = _device_of(lead, self.library, name) if lead is not None else None
        self.device = device
        number, owner = 0, None
        if device is not None and device[0] == "cuda":
            used = _current_stream(lead, self.library) if stream is None else stream
            number = _stream_number(used)
            # Results are freed on this stream: they keep its object alive (CuPy destroys the
            # stream with its object). A bare int stream must outlive the results by itself.
            owner = None if isinstance(used, int) else used
        elif stream is not None:
            _stream_number(stream)  # still a type check: a bad stream= is an error everywhere
        self.stream = number
        self.call = _C.Call(number, as_numpy, owner)
        self._convert: Optional[Callable[[Any], Any]] = None if as_numpy else _from_dlpack_of(self.library)
        # torch's Tensor type and capsule functions for a torch call; its tensors on the stream
        # the call runs on (no stream= given) travel as capsules.
        self._torch = _torch_capsules() if self.library == "torch" else None
        self._capsules = self._torch if stream is None else None

    def args(self, *arrays: Any) -> Sequence[Any]:
        """The array arguments as handed to the native core: NumPy arrays and DLPack arrays
        off torch's stream as given; torch tensors on this call's stream as torch's DLPack
        capsules (same data, same checks after). Tensors that require grad keep the
        __dlpack__ route, which refuses them. A tensor with torch's negative bit (a lazily
        negated view: its memory holds the values negated, which DLPack hands over as they
        are) is resolved first, a copy; written ones are refused by check_written. One call
        for a call's arrays, the loop inline: a call of a per-array method cost 0.06 us a
        NumPy array, and map() over one 0.5 us more on six tensors than a loop in this frame
        (Python 3.11 inlines its calls)."""
        if self._torch is None:
            for a in arrays:  # another library's array among NumPy's (or a JAX call's): see foreign_args
                if a is not None and type(a) is not np.ndarray:
                    return foreign_args(arrays)
            return arrays
        tensor, caps = self._torch[0], self._capsules
        converted = []
        for a in arrays:
            # isinstance against torch.Tensor goes through its metaclass (0.3 us); the exact
            # type test first.
            if a is not None and (type(a) is tensor or isinstance(a, tensor)):
                if a.is_neg():
                    a = a.resolve_neg()
                if caps is not None and not a.requires_grad:
                    try:
                        a = caps[1](a)
                    except Exception:  # noqa: BLE001 (meta, sparse: the binding's import names the argument)
                        pass
            converted.append(a)
        return converted

    def written(self, *arrays: Any) -> None:
        """After a call that wrote these arguments in place (out=, running statistics; None
        for absent ones): torch tensors get their version bumped, as torch's in-place ops do,
        so autograd refuses a backward that saved their old values instead of using the new
        (a call on NumPy or JAX arrays too: a torch running statistic of a NumPy x was written
        without a bump, and autograd went on with the values it had saved overwritten)."""
        if self._torch is not None:
            tensor = self._torch[0]
        else:
            torch = sys.modules.get("torch")  # (no torch imported: no tensor among them)
            if torch is None:
                return
            tensor = torch.Tensor
        bumped = [a for a in arrays if a is not None and type(a) is not np.ndarray and isinstance(a, tensor)]
        if bumped:
            torch_increment_version(bumped)

    def wrap(self, result: Any) -> Any:
        """A result as the caller's kind of array (`out=` objects come back untouched)."""
        if self._convert is not None and isinstance(result, _C.Buffer):
            if self._capsules is not None:
                return self._capsules[2](result.__dlpack__())  # produced on the consumer's stream
            return self._convert(result)
        return result

    def results(self, results: Tuple[Any, ...], out: Any = None) -> Tuple[Any, ...]:
        """The native results as the caller's arrays, the first being `out` when given (the
        core returns what it was handed: a torch tensor's capsule). NumPy calls' results
        are NumPy arrays already, `out` among them (a generator over them cost 0.6 us)."""
        if self._convert is None:
            return results
        first = out if out is not None else self.wrap(results[0])
        return (first,) + tuple(map(self.wrap, results[1:]))


# The Kind of NumPy arrays and of CPU torch tensors (calls without stream=), by the lead
# array's type: a Kind holds no per-call state, and building one cost 1.5-3 us of a small
# call's Python overhead.
_CPU_KINDS: Dict[type, Kind] = {}


def kind_of(lead: Any, stream: Optional[Any] = None, name: str = "x") -> Kind:
    """Kind(lead, stream, name), reused for NumPy arrays and CPU torch tensors."""
    if stream is None:
        kind = _CPU_KINDS.get(type(lead))
        if kind is not None and (kind.library == "numpy" or lead.is_cpu is True):
            return kind
    kind = Kind(lead, stream, name)
    if stream is None and kind.device == ("cpu", 0):
        if type(lead) is np.ndarray or (kind.library == "torch" and getattr(lead, "is_cpu", None) is True):
            _CPU_KINDS[type(lead)] = kind
    return kind


_INCREMENT_VERSION: Optional[Callable[[Any], None]] = None


def torch_increment_version(tensors: list) -> None:
    """torch's version bump of tensors written in place (torch is imported only by callers that
    pass its tensors; looked up once: an import statement cost 0.7 us a call). torch >= 2.5
    takes the list in one call; 2.4 one tensor a call."""
    global _INCREMENT_VERSION
    if _INCREMENT_VERSION is None:
        import torch

        _INCREMENT_VERSION = torch._C._increment_version
    try:
        _INCREMENT_VERSION(tensors)
    except TypeError:  # torch 2.4
        for t in tensors:
            _INCREMENT_VERSION(t)


# The library of a written array's type: the module lookup cost 0.2 us an array.
_WRITTEN_LIBRARY: Dict[type, str] = {}


def check_written(array: Any, name: str) -> None:
    """An argument the call writes in place (out=, running statistics). JAX arrays are
    immutable and may be shared or cached by XLA: DLPack would hand over their memory all the
    same, so they are refused here rather than silently changed. A torch tensor with the
    negative bit holds its values negated: written through DLPack it would get them unnegated."""
    if array is None or type(array) is np.ndarray:
        return
    library = _WRITTEN_LIBRARY.get(type(array))
    if library is None:
        library = _WRITTEN_LIBRARY[type(array)] = _library(array)
    if library == "torch" and array.is_inference() and not sys.modules["torch"].is_inference_mode_enabled():
        raise ValueError(
            f"{name} is a torch inference tensor (made under torch.inference_mode), which torch refuses to "
            "update in place outside inference mode; clone it, or call under torch.inference_mode()"
        )
    if library == "torch" and array.is_neg():
        raise TypeError(
            f"{name} must be a tensor without torch's negative bit, got a lazily negated view (of "
            "torch._neg_view, or the .imag of a conjugate), whose memory holds the values negated; "
            "write into a tensor without it and copy from there"
        )
    if library in ("jax", "jaxlib"):
        advice = (
            "pass a NumPy array (or another mutable array) for the running statistics, or use "
            "batchnorm.jax.batch_norm, which returns the updated statistics"
            if name.startswith("running_")
            else "omit out= to get a new array"
        )
        raise ValueError(f"{name} must be a writable array, got an immutable JAX array; {advice}")


def check_out(out: Any) -> None:
    check_written(out, "out")


_INT64 = 1 << 63


def _as_int(value: Any, name: str) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def check_int(value: Any, name: str) -> int:
    """An int the native layer takes as int64: out of its range is a ValueError naming the
    argument (pybind11's conversion said only "incompatible function arguments")."""
    value = _as_int(value, name)
    if not -_INT64 <= value < _INT64:
        raise ValueError(f"{name} must fit in 64 bits (|{name}| < 2**63), got {value}")
    return value


def check_axis(value: Any, x: Any) -> int:
    """An int axis; values the native layer cannot even represent (beyond a C int) are
    reported like any other out-of-range axis instead of failing the argument conversion."""
    axis = _as_int(value, "axis")
    if not -(2**31) <= axis < 2**31:
        ndim = getattr(x, "ndim", None)
        if isinstance(ndim, int) and not isinstance(ndim, bool):
            raise ValueError(f"axis must be in [{-ndim}, {ndim - 1}] for an array of rank {ndim}, got {axis}")
        raise ValueError(f"axis must be within the rank of the array, got {axis}")
    return axis


def check_real(value: Any, name: str) -> float:
    if type(value) is float:
        return value
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    except OverflowError:  # an int past float64's range
        digits = len(str(abs(int(value)))) if isinstance(value, int) else None
        got = f"an int of {digits} digits" if digits else type(value).__name__
        raise ValueError(f"{name} must be within float64's range (about 1.8e308), got {got}") from None
