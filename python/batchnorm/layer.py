"""BatchNorm: a stateful batch-norm layer with PyTorch's semantics over any array library.

Parameters and running statistics live as arrays of the kind of the inputs (NumPy for CPU
inputs, the caller's library on a GPU); `state_dict()` always gives NumPy arrays."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

from . import functional as F
from ._arrays import _library, check_int, check_real
from .precise import precise_statistics, unbiased_variance

_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# num_batches_tracked's largest value (int64's, as state_dict stores it): the count stops there
# rather than leave a layer whose state_dict() cannot hold it.
_COUNT_MAX = 2**63 - 1

# Each convention's defaults: PyTorch's (momentum is the new batch's weight, unbiased running
# variance) and tf.keras.layers.BatchNormalization's (momentum is the running average's decay,
# biased running variance, channels last).
_CONVENTIONS: Dict[str, Dict[str, Any]] = {
    "torch": {"eps": 1e-5, "momentum": 0.1, "axis": 1},
    "keras": {"eps": 1e-3, "momentum": 0.99, "axis": -1},
}
_DEFAULT: Any = object()  # momentum not given: the convention's default


def _to_numpy(a: Any, name: str) -> np.ndarray:
    """A host copy of any array (NumPy, torch, CuPy, JAX, DLPack, lists). torch's bfloat16,
    which NumPy lacks, comes as float32 (exact; the layer casts to its own dtype anyway)."""
    try:
        if hasattr(a, "detach"):  # torch
            a = a.detach().cpu()
            a = (a.float() if a.dtype == _torch_bfloat16() else a).numpy()
        elif _library(a) == "cupy":
            a = a.get()
        return np.array(a, copy=True)
    except Exception as err:
        raise TypeError(f"{name} must be an array, got {type(a).__name__}: {err}") from err


def _torch_bfloat16() -> Any:
    import torch  # only reached with a torch tensor in hand

    return torch.bfloat16


def _dtype_name(dtype: Any) -> str:
    """A dtype's name from 'float32', np.float32, np.dtype(...), jnp.float32 or torch.float32."""
    if dtype is None:  # (np.dtype(None) is float64)
        return "None"
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).replace("torch.", "")


def _device_of(x: Any, name: str = "x") -> Optional[tuple]:
    return F._C.device_of(x, name)


def _to_device_like(a: np.ndarray, x: Any) -> Any:
    """`a` moved next to `x` when x lives on a GPU (in x's library); NumPy otherwise."""
    device = _device_of(x)
    if device is None or device[0] != "cuda":
        return a
    library = _library(x)
    if library == "torch":
        import torch

        return torch.as_tensor(a, device=x.device)
    if library == "cupy":
        import cupy

        with cupy.cuda.Device(device[1]):
            return cupy.asarray(a)
    raise TypeError(
        f"BatchNorm keeps mutable state; on a GPU it supports torch and CuPy inputs, got {library} "
        "(use the functions of batchnorm with your own state arrays instead)"
    )


def _in_library(a: Any, what: str) -> Any:
    """`a` as float64 (what="float64") or zeros of its shape (what="zeros"), made by a's own
    library on a's device (NumPy, torch or CuPy: the libraries the layer keeps state in)."""
    library = _library(a)
    if library == "torch":
        import torch

        return a.double() if what == "float64" else torch.zeros_like(a)
    xp = np
    if library == "cupy":
        import cupy as xp
    return a.astype(np.float64) if what == "float64" else xp.zeros_like(a)


def _as_state(a: Any, dtype: np.dtype, x: Any) -> Any:
    """A result (a gradient) as layer state of `dtype`: on a GPU it stays in x's library on
    x's device (cast there, never through the host); on the CPU the state is NumPy."""
    device = _device_of(x)
    if device is not None and device[0] == "cuda":
        if _library(a) == "torch":
            import torch

            return a.to(getattr(torch, dtype.name))
        return a.astype(dtype)  # CuPy
    return _to_numpy(a, "gradient").astype(dtype, copy=False)


class BatchNorm:
    """Batch normalization over channel axis `axis` with learned weight and bias.

    Training (`.train()`, the default) normalizes with batch statistics and updates the
    running ones (`momentum=None`: cumulative average); evaluation (`.eval()`) uses the
    running statistics unless `track_running_stats=False`. `backward(dy)` returns dx and
    accumulates `.grad_weight` / `.grad_bias`."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: Optional[float] = None,
        momentum: Any = _DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: Optional[int] = None,
        dtype: str = "float32",
        convention: str = "torch",
        renorm: Optional[Tuple[float, float]] = None,
        ghost_batch: Optional[int] = None,
        skip_nonfinite: bool = False,
    ) -> None:
        num_features = check_int(num_features, "num_features")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if not isinstance(convention, str) or convention not in _CONVENTIONS:
            raise ValueError(f"convention must be 'torch' or 'keras', got {convention!r}")
        defaults = _CONVENTIONS[convention]
        eps = check_real(defaults["eps"] if eps is None else eps, "eps")
        if not (np.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        if momentum is _DEFAULT:
            momentum = defaults["momentum"]
        if momentum is not None:
            momentum = check_real(momentum, "momentum")
            if not (np.isfinite(momentum) and 0.0 <= momentum <= 1.0):
                raise ValueError(f"momentum must be a finite number in [0, 1] or None, got {momentum}")
        elif convention == "keras":
            raise ValueError("momentum=None (a cumulative average) is PyTorch's; with convention='keras' give a decay in [0, 1]")
        dtype_name = _dtype_name(dtype)
        if dtype_name not in ("float32", "float64"):
            raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.convention = convention
        self.affine = F._check_bool(affine, "affine")  # ("no" had been True, by bool())
        self.track_running_stats = F._check_bool(track_running_stats, "track_running_stats")
        self.axis = check_int(defaults["axis"] if axis is None else axis, "axis")
        self.dtype = np.dtype(dtype_name)
        # The training variants, checked as the torch layers check them.
        renorm = F._layer_renorm(renorm)
        if renorm is not None:
            if not self.track_running_stats:
                raise ValueError("renorm needs running statistics, got track_running_stats=False")
        if renorm is not None and ghost_batch is not None:
            raise ValueError("renorm and ghost_batch together are not supported, got both")
        self.renorm = renorm
        self.ghost_batch = None if ghost_batch is None else F._ghost(ghost_batch)
        self.skip_nonfinite = F._check_bool(skip_nonfinite, "skip_nonfinite")
        self.training = True
        try:
            self.weight = np.ones(num_features, self.dtype) if self.affine else None
            self.bias = np.zeros(num_features, self.dtype) if self.affine else None
            self.running_mean = np.zeros(num_features, self.dtype) if self.track_running_stats else None
            self.running_var = np.ones(num_features, self.dtype) if self.track_running_stats else None
        except (MemoryError, ValueError) as err:  # (NumPy's "Unable to allocate" / "array is too big")
            raise ValueError(
                f"num_features={num_features} is too large: its {self.dtype.name} parameters and running statistics "
                f"could not be allocated ({err})"
            ) from None
        self.num_batches_tracked = 0
        self.grad_weight: Any = None
        self.grad_bias: Any = None
        self._saved: Optional[tuple] = None

    def _step_momentum(self) -> float:
        """This training step's momentum in PyTorch's sense (the weight of the new batch): the
        cumulative average's 1 / (steps + 1) for momentum=None; 1 - decay for Keras."""
        if self.momentum is None:
            return 1.0 / (self.num_batches_tracked + 1)
        return 1.0 - self.momentum if self.convention == "keras" else self.momentum

    def _count_batch(self) -> None:
        """A training step that updated the running statistics counts its batch, up to
        _COUNT_MAX (what state_dict can store and load back)."""
        self.num_batches_tracked = min(self.num_batches_tracked + 1, _COUNT_MAX)

    def _training_options(self, update: bool) -> Dict[str, Any]:
        """forward_training's keyword arguments for a training step of this layer (running
        statistics updated when `update`)."""
        return dict(
            running_mean=self.running_mean if update else None,
            running_var=self.running_var if update else None,
            momentum=self._step_momentum() if update else 0.0,
            eps=self.eps,
            axis=self.axis,
            running_var_unbiased=self.convention == "torch",
            skip_nonfinite=self.skip_nonfinite,
        )

    # ---- copies ----------------------------------------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        # Without the last forward's saved input (kept for backward): a layer pickled or copied
        # after a step carried its whole last batch along (16 MB for a 16 MB batch). A copy's
        # backward needs a forward of its own.
        return {**self.__dict__, "_saved": None}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ---- mode ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "BatchNorm":
        if not isinstance(mode, (bool, np.bool_)):  # (torch's message; "False" was truthy)
            raise ValueError(f"training mode is expected to be boolean, got {type(mode).__name__}")
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        return self.train(False)

    # ---- state placement ---------------------------------------------------------------------
    def _follow(self, x: Any) -> None:
        """Moves the state next to x the first time x lives elsewhere (GPU inputs)."""
        device = _device_of(x)
        for name in ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias"):
            value = getattr(self, name)
            if value is None:
                continue
            if _device_of(value, name) != device:
                setattr(self, name, _to_device_like(_to_numpy(value, name), x))

    # ---- compute -----------------------------------------------------------------------------
    def _check_channels(self, x: Any) -> None:
        """The input's channel count against num_features, in the user's terms: the layer's
        own parameters would otherwise be reported as the wrongly shaped arrays."""
        shape = getattr(x, "shape", None)
        if shape is None and (isinstance(x, (list, tuple)) or hasattr(x, "__array__")):
            try:  # (lists and __array__ objects, which the core converts as NumPy does)
                shape = np.shape(x)
            except Exception:
                return
        if not isinstance(shape, tuple) or len(shape) < 2:
            return  # rank and type errors come from the core, with the same words as the functions
        axis = self.axis + len(shape) if self.axis < 0 else self.axis
        if 0 <= axis < len(shape) and shape[axis] != self.num_features:
            raise ValueError(
                f"x must have num_features={self.num_features} channels on axis {self.axis}, got {shape[axis]} "
                f"(x has shape {tuple(shape)}); is axis right for this layout?"
            )

    def __call__(self, x: Any) -> Any:
        self._check_channels(x)
        self._follow(x)
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            update = self.training and self.track_running_stats
            options = self._training_options(update)
            if self.renorm is not None and update:
                options["renorm"] = self.renorm
            if self.ghost_batch is not None:
                options["ghost_batch"] = self.ghost_batch
            y, mean, invstd, *rd = F.forward_training(x, self.weight, self.bias, **options)
            if update:
                self._count_batch()
            self._saved = ("batch", x, mean, invstd, tuple(rd) or None)
        else:
            y = F.forward_inference(
                x, self.running_mean, self.running_var, self.weight, self.bias, eps=self.eps, axis=self.axis
            )
            self._saved = ("running", x, None, None, None)
        return y

    def backward(self, dy: Any) -> Any:
        if self._saved is None:
            raise RuntimeError("BatchNorm.backward needs a forward call first")
        mode, x, mean, invstd, renorm = self._saved
        if mode == "batch":
            dx, dweight, dbias = F.backward(
                dy, x, mean, invstd, self.weight, axis=self.axis, renorm=renorm, ghost_batch=self.ghost_batch
            )
        else:
            # The affine map y = (x - rm) * s * w + b: dx = dy * s * w, and the parameter
            # gradients are backward's reductions taken with the running statistics. The
            # arithmetic runs in the state's own library, on its device.
            invstd = (_in_library(self.running_var, "float64") + self.eps) ** -0.5
            zeros = _in_library(self.running_mean, "zeros")
            if any(n == 0 for n in x.shape):
                # An empty batch (its forward ran): zero gradients, from the reduce step that
                # takes an empty shard (backward refuses a channel without a value).
                _, _, dweight, dbias = F.backward_reduce(dy, x, self.running_mean, invstd, axis=self.axis)
            else:
                _, dweight, dbias = F.backward(dy, x, self.running_mean, invstd, self.weight, axis=self.axis)
            dx = F.forward_inference(dy, zeros, self.running_var, self.weight, None, eps=self.eps, axis=self.axis)
        if self.affine:
            dweight = _as_state(dweight, self.dtype, x)
            dbias = _as_state(dbias, self.dtype, x)
            self.grad_weight = dweight if self.grad_weight is None else self.grad_weight + dweight
            self.grad_bias = dbias if self.grad_bias is None else self.grad_bias + dbias
        return dx

    def zero_grad(self) -> None:
        self.grad_weight = None
        self.grad_bias = None

    # ---- state -------------------------------------------------------------------------------
    def recompute_statistics(self, batches: Iterable[Any]) -> "BatchNorm":
        """PreciseBN: sets the running statistics to the exact statistics of `batches` (this
        layer's inputs over, e.g., a pass of the training set with the final weights;
        precise_statistics) instead of the momentum averages of past steps: the mean, and the
        unbiased variance (the biased one with convention="keras"). num_batches_tracked is
        left as it is."""
        self._check_recompute()
        self._set_running(*self._local_population(batches))
        return self

    def _check_recompute(self) -> None:
        if not self.track_running_stats:
            raise ValueError("recompute_statistics needs running statistics, got a layer with track_running_stats=False")

    def _local_population(self, batches: Iterable[Any]) -> tuple:
        """(mean, biased var) as float64 NumPy vectors and the count, of this process's batches;
        (None, None, 0) when they hold no value."""
        try:
            mean, var, count = precise_statistics(batches, axis=self.axis)
        except ValueError as err:
            if str(err).startswith("batches must hold at least one value"):
                return None, None, 0
            raise
        if mean.shape[0] != self.num_features:
            raise ValueError(f"batches must have {self.num_features} channels along axis {self.axis}, got {mean.shape[0]}")
        return _to_numpy(mean, "mean"), _to_numpy(var, "var"), count

    def _set_running(self, mean: Optional[np.ndarray], var: Optional[np.ndarray], count: int) -> None:
        if self.convention == "keras" and count < 1:  # (the biased variance of one value is 0)
            raise ValueError(f"batches must hold at least 1 value per channel, got {count}")
        if self.convention != "keras" and count < 2:
            raise ValueError(f"batches must hold at least 2 values per channel (the unbiased variance needs two), got {count}")
        self.running_mean = _to_device_like(mean.astype(self.dtype), self.running_mean)
        if self.convention == "keras":
            var = np.asarray(var, dtype=np.float64)
        else:
            var = unbiased_variance(var, count)
        self.running_var = _to_device_like(var.astype(self.dtype), self.running_var)

    def state_dict(self) -> Dict[str, np.ndarray]:
        state: Dict[str, np.ndarray] = {}
        if self.affine:
            state["weight"] = _to_numpy(self.weight, "weight")
            state["bias"] = _to_numpy(self.bias, "bias")
        if self.track_running_stats:
            state["running_mean"] = _to_numpy(self.running_mean, "running_mean")
            state["running_var"] = _to_numpy(self.running_var, "running_var")
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Loads weights and statistics from any arrays (a torch module's state_dict works).
        Checks everything first: on error the layer is left unchanged."""
        expected = [k for k in _KEYS if k in self.state_dict()]
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(
                f"state must have exactly the keys {expected}, got missing {missing} and unexpected {unexpected}"
            )
        staged: Dict[str, Any] = {}
        for key in expected:
            given = state[key]
            if key == "num_batches_tracked" and type(given) is int and not 0 <= given <= _COUNT_MAX:
                # (a Python int past int64 became an object array: "must be an integer, got dtype object")
                raise ValueError(f"num_batches_tracked must be in [0, 2**63), got {given}")
            value = _to_numpy(given, key)
            if key == "num_batches_tracked":
                if value.shape != ():  # (size 1 took (1, 1); torch's own is 0-d and refuses others)
                    raise ValueError(f"num_batches_tracked must be a scalar, got shape {value.shape}")
                if value.dtype.kind not in "iu":  # (2.7 was truncated; "a" met int()'s message)
                    raise TypeError(f"num_batches_tracked must be an integer, got dtype {value.dtype}")
                count = int(value.reshape(()))
                if not 0 <= count <= _COUNT_MAX:  # (-1 divided by zero in momentum=None's 1 / (count + 1))
                    raise ValueError(f"num_batches_tracked must be in [0, 2**63), got {count}")
                staged[key] = count
                continue
            # Real numbers only, as the functions take them (complex parts, strings, booleans and
            # objects such as None had been cast without a word).
            if value.dtype.kind not in "fiu" and value.dtype.name != "bfloat16":
                raise TypeError(f"{key} must have a real floating-point or integer dtype, got {value.dtype}")
            if value.shape != (self.num_features,):
                raise ValueError(f"{key} must have shape ({self.num_features},), got {value.shape}")
            staged[key] = value.astype(self.dtype)
        for key, value in staged.items():
            if key != "num_batches_tracked":
                current = getattr(self, key)
                value = _to_device_like(value, current) if current is not None else value
            setattr(self, key, value)

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, axis={self.axis}, dtype='{self.dtype}'"
            + "".join(
                f", {k}={v!r}"
                for k, v, default in (
                    ("convention", self.convention, "torch"),
                    ("renorm", self.renorm, None),
                    ("ghost_batch", self.ghost_batch, None),
                    ("skip_nonfinite", self.skip_nonfinite, False),
                )
                if v != default
            )
            + ")"
        )
