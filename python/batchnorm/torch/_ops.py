"""The torch.library registration of batchnorm's ops (namespace `batchnorm`): each CPU/CUDA
kernel only allocates its outputs with torch and hands every tensor to the native core
(batchnorm._C) as a DLPack capsule on torch's current stream; the fake kernels give the same
shapes and strides; autograd is registered for input, weight and bias."""
from __future__ import annotations

import numbers
import re
from typing import Any, Optional

import torch
from torch import Tensor
from torch.fx import Proxy
from torch.overrides import handle_torch_function, has_torch_function_variadic
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.dlpack import to_dlpack

from .. import _C
from .._arrays import _current_stream, _stream_number, torch_increment_version

# define/impl rather than torch.library.custom_op: both reach these Python kernels through
# the dispatcher, but custom_op's wrapper costs more per call (bench/torch_op_overhead.py),
# paid twice per layer per training step.
_lib = torch.library.Library("batchnorm", "DEF")

# Every op takes its tensors in any strides (channels_last natively; outputs keep x's). Without
# this tag Inductor gives a custom op its inputs in the stride order they had when traced: in
# a compiled model whose convolutions it runs channels_last, a transposing copy of each layer's
# input (a NCHW ResNet-18's training step on our ops: 20 such copies of 64 kernel calls in the
# forward; 30 calls with the tag; README "Under torch.compile").
TAGS = (torch.Tag.flexible_layout,)
_lib.define(
    "forward_training(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
    "float momentum, float eps) -> (Tensor y, Tensor saved_mean, Tensor saved_invstd, "
    "Tensor new_running_mean, Tensor new_running_var)",
    tags=TAGS,
)
_lib.define(
    "forward_inference(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> Tensor", tags=TAGS
)
_lib.define(
    "backward(Tensor dy, Tensor x, Tensor saved_mean, Tensor saved_invstd, Tensor? weight, bool input_grad=True) "
    "-> (Tensor dx, Tensor dweight, Tensor dbias)",
    tags=TAGS,
)

_AXIS = 1  # torch's layers take (N, C, ...); channels_last is only a stride order


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: that of the saved statistics and the parameter gradients."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channels(x: Tensor) -> int:
    """C, the length of x's channel axis; 0 for an x without one, which the core refuses by
    name when the op runs (the fake kernels, traced before, must not fail with an IndexError
    of their own)."""
    return x.shape[_AXIS] if x.dim() > _AXIS else 0


def flat_affine(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple:
    """weight and bias as the (C,) vectors the ops take. torch's batch_norm takes them of any
    shape with C elements (a (1, C) weight, say); a reshape is a view that autograd sends the
    gradient back through in the caller's shape. Any other size is left as given, for the
    core's message naming it."""
    if (weight is None or weight.dim() == 1) and (bias is None or bias.dim() == 1):
        return weight, bias  # (every layer's call: 0.4 us, where the general case took 1.1-1.7)
    C = channels(x)

    def flat(t: Optional[Tensor]) -> Optional[Tensor]:
        return t.reshape(-1) if isinstance(t, Tensor) and t.dim() != 1 and C > 0 and t.numel() == C else t

    return flat(weight), flat(bias)


def batchless(x: Tensor) -> bool:
    """An empty batch (torch's rule: empty outputs, running statistics unchanged) of an x with
    a channel axis (one without goes on to the core's error)."""
    return x.numel() == 0 and x.dim() > _AXIS


def on_x_device(x: Tensor, **named: Optional[Tensor]) -> None:
    """The fake kernels' device check. They are the ops' Meta kernels too, which the dispatcher
    picks when any argument is a meta tensor: with x and the running statistics on the CPU and
    a meta weight, the op ran as its fake kernel and returned uninitialized memory as y and as
    the running statistics, silently. The real kernels have the core's check."""
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise TypeError(f"{name} must be on the same device as x ({t.device} and {x.device})")


def fake_channels(x: Tensor, *per_channel: Optional[Tensor]) -> int:
    """The length of a fake kernel's per-channel outputs (statistics, parameter gradients): the
    first given 1-D argument's (the weight, the bias, the saved mean), else x's channels. The
    same in every call the op takes; in one it refuses (a weight of another length than x's
    channels) the real kernel raises the eager call's error when the compiled graph runs, and
    sized by x the traced parameter gradients failed autograd's shape check first, at compile
    time ("returned an invalid gradient at index 1")."""
    for t in per_channel:
        if t is not None and t.dim() >= 1:
            return t.shape[-1]
    return channels(x)


def _vector(x: Tensor, n: int) -> Tensor:
    return torch.empty(n, dtype=_acc(x.dtype), device=x.device)


_CPU_CALL = _C.Call(0, True)


def _call(x: Tensor) -> Any:
    """Native call settings: torch's current stream for CUDA tensors; on the CPU, outputs not
    given come back as NumPy arrays (see per_channel). The native functions take their
    arguments by position in this package: pybind11 matches keywords by building each name's
    string, 0.5 us an argument."""
    return _C.Call(_stream_number(_current_stream(x, "torch")), False) if x.is_cuda else _CPU_CALL


def per_channel(x: Tensor, C: int) -> tuple:
    """A call's two (C,) outputs (statistics or parameter gradients) to pass the core: on a GPU
    torch's (its caching allocator, stream-ordered, CUDA graphs), on the CPU None, for the core
    to allocate (NumPy memory, which torch.from_numpy takes without a copy: torch.empty and a
    capsule each cost 1.1 us more, 2.3 us of a small layer's 10 us forward); taken back by
    per_channel_results."""
    return (None, None) if x.is_cpu else (_vector(x, C), _vector(x, C))


def per_channel_results(given: tuple, results: tuple) -> tuple:
    """per_channel's outputs after the call: torch's as they were, the core's as tensors.
    (Written out: a generator over the pair cost 1 us a call, 2% of a small layer's step.)"""
    if given[0] is not None:
        return given
    return torch.from_numpy(results[0]), torch.from_numpy(results[1])


def _cap(t: Optional[Tensor]) -> Any:
    """torch's own DLPack capsule of an optional tensor (the kernels call to_dlpack directly
    for those always given): no __dlpack__ stream handshake (the core runs on the current
    stream, where torch produced the tensor)."""
    return None if t is None else to_dlpack(t)


# ---- forward_training ---------------------------------------------------------------------
# torch.library refuses autograd on an op that mutates its inputs, so this op leaves the
# running statistics alone and returns updated copies (as torch's own
# _native_batch_norm_legit_functional does); the core updates the copies in the same pass and
# the caller copies them back. Without running statistics the copies are empty (0,) tensors.


def _new_running(x: Tensor, running: Optional[Tensor], fake: bool) -> Tensor:
    if running is None:
        return _vector(x, 0)
    return torch.empty_like(running) if fake else running.clone()


def _train(x, weight, bias, running_mean, running_var, momentum, eps, residual=None, activation=0):
    """(y, saved_mean, saved_invstd) of training batch norm (fused with an add of `residual`
    and activation code `activation` when given), the running statistics (when given) updated
    in place by the core."""
    C = channels(x)
    y = torch.empty_like(x)
    if batchless(x):
        return y, _vector(x, C).fill_(float("nan")), _vector(x, C).fill_(float("nan"))
    stats = per_channel(x, C)
    results = _C.forward_training(
        to_dlpack(x), _cap(weight), _cap(bias), _cap(running_mean), _cap(running_var),
        momentum, eps, _AXIS, to_dlpack(y), None, None, 0, _call(x), _cap(stats[0]), _cap(stats[1]),
        _cap(residual), activation,
    )  # fmt: skip
    return (y, *per_channel_results(stats, results[1:3]))


@torch.library.impl(_lib, "forward_training", "CPU")
@torch.library.impl(_lib, "forward_training", "CUDA")
def _forward_training(x, weight, bias, running_mean, running_var, momentum, eps):
    new_mean, new_var = _new_running(x, running_mean, False), _new_running(x, running_var, False)
    y, mean, invstd = _train(x, weight, bias, None if running_mean is None else new_mean,
                             None if running_var is None else new_var, momentum, eps)
    return y, mean, invstd, new_mean, new_var


@torch.library.register_fake("batchnorm::forward_training", lib=_lib)
def _forward_training_fake(x, weight, bias, running_mean, running_var, momentum, eps):
    on_x_device(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    C = fake_channels(x, weight, bias)
    new_mean, new_var = _new_running(x, running_mean, True), _new_running(x, running_var, True)
    return torch.empty_like(x), _vector(x, C), _vector(x, C), new_mean, new_var


# ---- forward_inference ----------------------------------------------------------------------


@torch.library.impl(_lib, "forward_inference", "CPU")
@torch.library.impl(_lib, "forward_inference", "CUDA")
def _forward_inference(x, mean, var, weight, bias, eps):
    y = torch.empty_like(x)
    _C.forward_inference(
        to_dlpack(x), to_dlpack(mean), to_dlpack(var), _cap(weight), _cap(bias), eps, _AXIS, to_dlpack(y), _call(x)
    )
    return y


@torch.library.register_fake("batchnorm::forward_inference", lib=_lib)
def _forward_inference_fake(x, mean, var, weight, bias, eps):
    on_x_device(x, mean=mean, var=var, weight=weight, bias=bias)
    return torch.empty_like(x)


# ---- backward (of forward_training) -----------------------------------------------------------


@torch.library.impl(_lib, "backward", "CPU")
@torch.library.impl(_lib, "backward", "CUDA")
def _backward(dy, x, saved_mean, saved_invstd, weight, input_grad=True):
    """(dx, dweight, dbias); without input_grad dx is an empty (0,) tensor and only the
    parameter gradients' reduction runs: one read of dy and x instead of the dx pass's five
    (a frozen input, or the parameter gradients of inference)."""
    C = channels(x)
    dx = torch.empty_like(x) if input_grad else _vector(x, 0)
    if batchless(x):  # the gradient of an empty batch's outputs
        return dx, _vector(x, C).zero_(), _vector(x, C).zero_()
    if not input_grad:
        dweight, dbias = _vector(x, C), _vector(x, C)
        sums = torch.empty(2, C, dtype=torch.float64, device=x.device)  # sum(dy), sum(dy * (x - mean))
        _C.backward_reduce(
            to_dlpack(dy), to_dlpack(x), to_dlpack(saved_mean), to_dlpack(saved_invstd), _AXIS, _call(x),
            to_dlpack(sums[0]), to_dlpack(sums[1]), to_dlpack(dweight), to_dlpack(dbias),
        )  # fmt: skip
        return dx, dweight, dbias
    grads = per_channel(x, C)
    results = _C.backward(
        to_dlpack(dy), to_dlpack(x), to_dlpack(saved_mean), to_dlpack(saved_invstd), _cap(weight), _AXIS,
        to_dlpack(dx), _call(x), _cap(grads[0]), _cap(grads[1]),
    )  # fmt: skip
    return (dx, *per_channel_results(grads, results[1:3]))


@torch.library.register_fake("batchnorm::backward", lib=_lib)
def _backward_fake(dy, x, saved_mean, saved_invstd, weight, input_grad=True):
    on_x_device(x, dy=dy, saved_mean=saved_mean, saved_invstd=saved_invstd, weight=weight)
    C = fake_channels(x, weight, saved_mean)
    return torch.empty_like(x) if input_grad else _vector(x, 0), _vector(x, C), _vector(x, C)


# ---- autograd ----------------------------------------------------------------------------------


def _dtypes(ctx, weight, bias):
    # Parameter gradients come back in the parameters' dtypes (the core's are in the
    # accumulation type): param_grads.
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def param_grads(ctx, dweight, dbias, needs_w, needs_b):
    """(dweight, dbias) as a backward returns them: None where not needed, else in the
    parameters' dtypes (saved by _dtypes). .to() of a tensor already in the dtype returns it
    but cost 0.9 us a gradient, 2% of a small layer's training step."""
    return (
        (dweight if dweight.dtype == ctx.weight_dtype else dweight.to(ctx.weight_dtype)) if needs_w else None,
        (dbias if dbias.dtype == ctx.bias_dtype else dbias.to(ctx.bias_dtype)) if needs_b else None,
    )


def _training_setup(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    y, mean, invstd, new_mean, new_var = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.eps = inputs[6]
    _dtypes(ctx, weight, bias)
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)


def resolved(t: Tensor) -> Tensor:
    """t itself, or, with torch's negative bit (a lazily negated view: its memory holds -t, which
    DLPack hands over as it is), a copy holding its values. For the incoming gradient of the
    eager Functions, which autograd hands over as it is (the backward of a complex op's .imag
    gives one); eager() sends such inputs to the registered ops, whose dispatcher resolves them."""
    return t.resolve_neg() if t.is_neg() else t


def _training_grads(ctx, dy, backward):
    """(dx, dweight, dbias), each None unless needed, from `backward` (the op, or its kernel),
    or differentiable again when a second derivative may follow (_twice)."""
    dy = resolved(dy)
    x, weight, mean, invstd = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    if differentiated_again(dy, x, weight):
        from . import _twice  # (it builds on this module)

        dx, dweight, dbias = _twice.training(dy, x, mean, invstd, weight, ctx.eps)
    else:  # nothing differentiates it (see _inference_grads)
        dx, dweight, dbias = unrecorded(backward, dy, x, mean, invstd, weight, needs_x)
    return (dx if needs_x else None, *param_grads(ctx, dweight, dbias, needs_w, needs_b))


def unrecorded(fn, *args):
    """fn(*args) with grad mode off. autograd's own backward already runs so (unless
    create_graph=True): then no no_grad() context is entered, 1.5 us of a small layer's step."""
    if not torch.is_grad_enabled():
        return fn(*args)
    with torch.no_grad():
        return fn(*args)


def _training_backward(ctx, dy, _dmean, _dinvstd, _dnew_mean, _dnew_var):
    return _training_grads(ctx, dy, torch.ops.batchnorm.backward) + (None,) * 4


torch.library.register_autograd(
    "batchnorm::forward_training", _training_backward, setup_context=_training_setup, lib=_lib
)


def _inference_setup(ctx, inputs, output):
    x, mean, var, weight, bias, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, mean, var, weight)
    _dtypes(ctx, weight, bias)


def _inference_grads(ctx, dy, x, mean, var, weight, needs):
    """(dx, dweight, dbias) of inference batch norm, each None unless `needs` says so.
    y = (x - mean) * s * weight + bias with s = 1 / sqrt(var + eps) is an affine map of x:
    dx = dy * s * weight is the inference op itself on dy with a zero mean, and the
    parameter gradients are the training backward's reductions taken with (mean, s)."""
    needs_x, needs_mean, needs_var, needs_w, needs_b = needs
    if needs_mean or needs_var:
        raise NotImplementedError("batchnorm.torch: no gradient with respect to the running statistics")
    if differentiated_again(dy, x, weight):
        from . import _twice  # (it builds on this module)

        dx, dweight, dbias = _twice.inference(dy, x, mean, var, weight, ctx.eps)
    else:  # nothing differentiates these (under torch.func.grad, grad mode is on: no_grad says so)
        dx = dweight = dbias = None
        with torch.no_grad():
            if needs_x:
                dx = torch.ops.batchnorm.forward_inference(dy, torch.zeros_like(mean), var, weight, None, ctx.eps)
            if needs_w or needs_b:
                invstd = torch.rsqrt(var.to(_acc(x.dtype)) + ctx.eps)
                _, dweight, dbias = torch.ops.batchnorm.backward(dy, x, mean, invstd, weight, False)
    return (dx if needs_x else None, *param_grads(ctx, dweight, dbias, needs_w, needs_b))


def _inference_backward(ctx, dy):
    x, mean, var, weight = ctx.saved_tensors
    dx, gw, gb = _inference_grads(ctx, dy, x, mean, var, weight, ctx.needs_input_grad[:5])
    return dx, None, None, gw, gb, None


torch.library.register_autograd(
    "batchnorm::forward_inference", _inference_backward, setup_context=_inference_setup, lib=_lib
)


# ---- eager calls --------------------------------------------------------------------------------
# In eager mode on plain tensors the layers call the kernels above directly, training through an
# autograd.Function: the dispatcher and register_autograd's Python wrapper around the ops cost
# 60-90 us per layer and training step (forward and backward of 8x512x2x2 float32 on the Xeon,
# 2 threads: 159 -> 96 us; torch's own BatchNorm2d 146 us), as much as the kernels of a small
# layer. torch.compile, export, tracing, functorch transforms and dispatch modes (fake tensors)
# get the registered ops, which they understand (functorch transforms and forward-mode AD through
# the Functions of _func.py). The same kernels either way: the same bits.


def traced(module: torch.nn.Module, *args: Any) -> Proxy:
    """A layer called on torch.fx.symbolic_trace's proxies, as one call_module node of the
    graph, as torch's own layers are (FX keeps only torch.nn's modules whole and would trace
    into the forward, whose checks branch on the input's shape); the GraphModule then runs
    the layer's forward on real tensors. Called by each layer when `input` is a Proxy."""
    tracer = next(a for a in args if isinstance(a, Proxy)).tracer
    path = tracer.path_of_module(module)
    if not path:  # the traced root itself: a call_module node would name no submodule
        raise torch.fx.proxy.TraceError(
            f"{type(module).__name__} cannot be the root of torch.fx.symbolic_trace (its forward checks the "
            "input's shape); trace a module that contains it"
        )
    return tracer.create_proxy("call_module", path, args, {})


def eager(x: Tensor, *tensors: Optional[Tensor]) -> bool:
    """Whether a call on x and these tensors (None for absent ones) may skip the registered ops
    (which also serve other devices: meta through the fake kernels)."""
    if not (x.is_cpu or x.is_cuda) or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        return False
    if _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled():
        return False
    # A tensor with the negative bit (a lazily negated view) holds its values negated, which
    # DLPack hands over as they are: the dispatcher's fallback resolves it for the ops.
    if type(x) not in _PLAIN or x.is_neg():
        return False
    for t in tensors:  # (a loop, not all() over a generator: 1 us less a call)
        if t is not None and (type(t) not in _PLAIN or t.is_neg()):
            return False
    return True


_PLAIN = frozenset((Tensor, torch.nn.Parameter))  # subclasses (and their __torch_function__) take the ops


def exporting_onnx() -> bool:
    """Whether torch.onnx.export is capturing the model. ONNX has batch norm of its own
    (BatchNormalization, which runtimes fold into the convolution before it) and no
    translation of our ops, so there the layers and functions emit torch's own operations,
    which compute the same function: the exported graph is the one torch's layers give.
    Checked off the eager path only (export runs under tracing or a dispatch mode)."""
    # The torch.export-based exporter's flag, read directly: Dynamo (the exporter's strict
    # retry) folds torch.onnx.is_in_onnx_export() to False but reads a module attribute as it
    # is; an attribute read, where the public function costs 1.2 us a call.
    if _ONNX_FLAGS is not None and _ONNX_FLAGS._is_onnx_exporting:
        return True
    # The TorchScript-based exporter captures the model with torch.jit's tracer.
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()


def as_torchs(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
) -> bool:
    """Whether a call is handed to the tracer as torch's own batch norm rather than our ops
    (momentum None: an inference call): under torch.onnx.export (exporting_onnx), and while
    torch.compile's Dynamo traces it (not torch.export, whose programs keep our ops;
    bt.decompositions() maps them). Inductor fuses torch's batch norm with the neighbouring
    operations (the ReLU, the residual add, the statistics' reduction with the convolution's
    output) and, in inference with freezing, folds it into the convolution's weights; our op
    is an opaque call that writes its output to memory and leaves the ReLU a pass of its own,
    in the forward and in the backward. ResNet-18 compiled, 2 threads (AMD EPYC Zen 4,
    bench/torch_compile.py), against the model with torch's layers: inference 1.23-1.27x the
    time with our op (with or without freezing), a training step 1.08-1.10x (in-process
    alternation); README, "Under torch.compile". Under torch.compile only arguments that
    torch's batch norm takes as our op does (_torch_takes); the others keep our op, whose
    checks raise the eager call's errors when the compiled graph runs."""
    if exporting_onnx():
        return True
    if not torch.compiler.is_dynamo_compiling() or torch.compiler.is_exporting():
        return False
    return _torch_takes(x, (weight, bias, running_mean, running_var), momentum, eps)


def _torch_takes(x: Tensor, params: tuple, momentum: Optional[float], eps: float) -> bool:
    """Whether torch's batch norm computes what our op computes for these arguments, and our
    op would raise nothing: x with a channel axis; parameters and running statistics of shape
    (C,), on x's device, of one dtype that is x's or float32 for a half x (torch's CPU
    kernels refuse other mixes; ours take any); both running statistics or neither, two
    tensors; eps finite and >= 0, and a training call's momentum in [0, 1] (our op refuses
    others; torch's would run, a NaN momentum turning the running statistics to NaN)."""
    if x.dim() < 2 or not isinstance(eps, (int, float)) or not (0.0 <= eps < float("inf")):
        return False
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        return False
    running_mean, running_var = params[2], params[3]
    if (running_mean is None) != (running_var is None) or (running_mean is not None and running_mean is running_var):
        return False
    dtype = None
    for p in params:
        if p is None:
            continue
        if p.dim() != 1 or p.shape[0] != x.shape[_AXIS] or p.device != x.device or dtype not in (None, p.dtype):
            return False
        dtype = p.dtype
    half = x.dtype in (torch.float16, torch.bfloat16)
    return dtype is None or dtype == x.dtype or (half and dtype == torch.float32)


try:  # (torch's private module; without it, the public check alone, which Dynamo cannot see)
    from torch.onnx._internal.exporter import _flags as _ONNX_FLAGS
except ImportError:  # pragma: no cover - other torch versions
    _ONNX_FLAGS = None
if not hasattr(_ONNX_FLAGS, "_is_onnx_exporting"):  # pragma: no cover
    _ONNX_FLAGS = None


def bump_versions(x: Tensor, running) -> None:
    """The running statistics' versions after the core updated them in place (none for an
    empty batch, which leaves them alone), as an in-place op would bump them."""
    if x.numel() > 0:
        bumped = [t for t in running if t is not None]
        if bumped:
            torch_increment_version(bumped)


def check_running(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> None:
    """Batch norm is not differentiable in its running statistics (torch's batch_norm refuses
    them too): where autograd records, running statistics that require grad are an error
    before anything is written, not an update autograd cannot see."""
    if torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{name} must not require grad (batch norm is not differentiable in its running "
                    "statistics), got requires_grad=True"
                )


def check_separate_running(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> None:
    """A training call through the registered ops (which return updated copies, written back
    by write_running) with one tensor as both running statistics: the core's refusal of the
    eager call (it writes one while reading the other), which the copies would hide (the
    second write-back silently won, under torch.compile and for the training variants)."""
    if running_mean is not None and running_mean is running_var:
        raise ValueError(
            "running_mean must not share memory with running_var: it is written while running_var is still in "
            "use; pass separate arrays"
        )


def version(running_mean: Optional[Tensor], counted: Optional[Tensor]) -> Optional[int]:
    """running_mean's version before a layer's call, where the call counts its batch (None for
    an inference tensor, which has none: the call refuses it, check_inference_tensors)."""
    if counted is None or running_mean is None:
        return None
    try:
        return running_mean._version
    except RuntimeError:
        return None


def count_interrupted(counted: Optional[Tensor], running_mean: Optional[Tensor], before: Optional[int]) -> None:
    """Counts the batch of a layer's call that raised after updating the running statistics
    (their version moved): torch.utils.checkpoint's recomputation (use_reentrant=False) stops
    the forward with an exception once autograd has saved its last tensor, after the update.
    torch's layers count that batch (they count before the call), and so must ours, or
    momentum=None's average and num_batches_tracked part from torch's. Not under torch.compile,
    whose checkpointing does not rerun the layer's Python, and where Dynamo traced this test
    of a refused call (a batch of one value per channel) as a data-dependent count, and
    counted the batch."""
    if before is not None and not torch.compiler.is_compiling() and running_mean._version != before:
        counted.add_(1)


def compiled_cumulative(call: Any, x: Tensor, running_mean: Tensor, running_var: Tensor, counted: Tensor) -> Tensor:
    """A training layer's momentum=None (the cumulative average: 1 / batches seen) under
    torch.compile, in the graph. Eagerly a layer reads num_batches_tracked as a Python float, as
    torch's do; Dynamo breaks the graph there and specializes the code after it on each value
    seen, so every step recompiled until the limit (8 graphs) left the layer eager with a warning
    (torch's own layers leave the whole model eager). Here call(mean, var, momentum) runs the
    layer at momentum 1 into fresh buffers, which then hold the batch's statistics, and the
    running statistics take them with the weight 1 / (batches + 1) as a tensor, in the update
    formula of torch's batch norm (which Dynamo traces for our layers: README "Under
    torch.compile")."""
    batch_mean, batch_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
    y = call(batch_mean, batch_var, 1.0)
    # In double, rounded once to the running statistics' dtype, as the kernels update them
    # (a float16 running statistic updated in float16 was an ulp off); the first batch's
    # weight 1 takes the batch whatever the running value held (0 * Inf: core/recipes.h). An
    # empty batch weighs 0 (it counts, the running statistics unchanged; the fresh ones stay
    # 0): a tensor test, as x's size may be symbolic (torch.export's dynamic batch).
    w = (counted + 1).to(torch.float64).reciprocal()
    w = torch.where(torch.scalar_tensor(x.numel(), dtype=torch.float64, device=w.device) > 0, w, 0.0)
    for running, batch in ((running_mean, batch_mean), (running_var, batch_var)):
        b = batch.to(torch.float64)
        running.copy_(torch.where(w == 1, b, w * b + (1 - w) * running.to(torch.float64)))
    counted.add_(1)
    return y


def write_running(running_mean: Optional[Tensor], new_mean: Tensor, running_var: Optional[Tensor],
                  new_var: Tensor) -> None:
    """The updated running statistics (the registered ops return them) into the caller's
    buffers. Under vmap, a batched input's statistics do not fit unbatched buffers: torch's own
    message then, not vmap's about in-place arithmetic."""
    try:
        if running_mean is not None:
            running_mean.copy_(new_mean)
        if running_var is not None:
            running_var.copy_(new_var)
    except RuntimeError as e:
        if "vmap" not in str(e):
            raise
        raise RuntimeError(
            "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated "
            "in place, were not batched. (batchnorm.torch, as torch.nn's batch norm: give each vmapped model its own "
            "running statistics, e.g. with torch.func.stack_module_state, or use track_running_stats=False.)"
        ) from None


def check_scalars(training: Any, momentum: Any, eps: Any) -> None:
    """The functions' scalar arguments: training a bool, momentum and eps real numbers (momentum
    in eval too, where it is unused, as torch's batch_norm: None or a string was taken there), a
    TypeError naming the argument (the native call's conversion printed its whole signature
    instead); then torch.nn.functional.batch_norm's eps rules, with its messages: positive in
    training (a constant channel's variance is 0), non-negative otherwise. (momentum's range
    is the core's check, in training.)"""
    # (Exact type tests first: the usual floats pass in 0.1 us, _real's isinstance costs more.)
    if type(training) is not bool:
        raise TypeError(f"training must be a bool, got {_type_name(training)}")
    if type(eps) is not float and not _real(eps):
        raise TypeError(f"eps must be a float, got {_type_name(eps)}")
    if type(momentum) is not float and not _real(momentum):
        raise TypeError(f"momentum must be a float, got {_type_name(momentum)}")
    if type(eps) is not float and not isinstance(eps, numbers.Real):
        return  # a traced or 0-d tensor value: the op's own check when it runs
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def plain_scalars(momentum: Any, eps: Any) -> tuple:
    """momentum and eps as the ops' float arguments take them, for the calls that go through
    the registered ops (not the eager kernels, whose binding converts them): a 0-d tensor or a
    NumPy number, which check_scalars takes as torch's batch_norm does, as a float (the op's
    schema refused a FakeTensor under torch.compile); a traced SymFloat or an int as it is."""
    return plain_scalar(momentum), plain_scalar(eps)


def plain_scalar(value: Any) -> Any:
    """One of plain_scalars' values (an inference call's eps)."""
    if type(value) is float or value is None or isinstance(value, (int, torch.SymFloat, torch.SymInt)):
        return value
    return float(value)


def _real(value: Any) -> bool:
    """A real number as torch's batch_norm takes one: a Python float or int, a NumPy scalar, a
    traced one (SymFloat, SymInt: make_fx, non-strict export) or a 0-d real tensor; not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        return True
    return isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool


def _type_name(value: Any) -> str:
    """A type's name for a message, with its module when it is not a builtin (NumPy's bool is
    also named "bool")."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# The inference ops name their statistics `mean` and `var`; batch_norm and batch_norm_act take
# them as the caller's running_mean and running_var. Those messages use the two words only as
# the arguments' names.
_RUNNING_NAME = re.compile(r"\b(mean|var)\b")


def named_running(e: Exception) -> Exception:
    """An inference op's error e, its `mean` / `var` called running_mean / running_var."""
    text = _RUNNING_NAME.sub(r"running_\1", str(e))
    return e if text == str(e) else type(e)(text)


def wants_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records a call on these tensors: eager inference without it calls the
    kernel directly. (In a backward, differentiated_again says whether its gradient must be
    differentiable again.)"""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _differentiated(t: Tensor, grad_mode: bool) -> bool:
    """Whether autograd or a transform outside the innermost functorch level differentiates t:
    a grad or jvp level beneath its wrapper (vmap's batching alone does not differentiate),
    eager autograd recording (grad mode on and requires_grad) or a forward-mode tangent."""
    ft = torch._C._functorch
    if ft.is_functorch_wrapped_tensor(t):
        # An eager forward-AD level around the transform: its tangents are invisible from
        # inside the levels (unpack_dual sees none), so assume they are there.
        if torch.autograd.forward_ad._current_level >= 0:
            return True
        t = ft.get_unwrapped(t)  # the innermost level: the one this backward serves
        while ft.is_functorch_wrapped_tensor(t):
            if not ft.is_batchedtensor(t):
                return True
            t = ft.get_unwrapped(t)
    if grad_mode and t.requires_grad:
        return True
    return torch.autograd.forward_ad._current_level >= 0 and torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def differentiated_again(*tensors: Optional[Tensor]) -> bool:
    """In a backward: whether its gradient may be differentiated again, so must be built from
    operations autograd records (_twice) rather than the kernels. Eagerly that is a backward
    with create_graph=True on tensors that require grad (wants_grad), or forward-mode tangents
    through a backward (forward AD does not depend on grad mode). torch.func.grad always runs
    its backward with grad mode on, on tensors wrapped for its level: there only a transform
    or autograd beneath that level differentiates the gradient again (grad of grad, hessian),
    and a first-order torch.func.grad runs the kernels."""
    grad_mode = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and _differentiated(t, grad_mode):
            return True
    return False


def direct_apply(fn: type) -> Any:
    """fn.apply for eager() calls, without torch's Python wrapper around the C entry point:
    with no functorch transform active (eager() checks) the wrapper only unwraps dead
    functorch wrappers among the arguments, which unwrap_dead() does for the tensors given,
    and its generator over the arguments cost 3-4 us a call (a small layer's whole forward is
    30). torch's wrapper where the C entry point is not where this torch keeps it."""
    entry = getattr(torch._C, "_FunctionBase", None)
    entry = getattr(entry, "__dict__", {}).get("apply")
    return entry.__get__(None, fn) if hasattr(entry, "__get__") else fn.apply


_unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", lambda t: t)


def kernel_takes(dy: Tensor) -> bool:
    """Whether an eager Function's backward may hand the incoming gradient to the op's kernel
    (a DLPack capsule of its memory), or must call the registered op: autograd.grad's
    is_grads_batched and the vectorized jacobian and hessian run the backward under torch's
    legacy vmap, and their dy is a batched tensor without memory of its own, which the
    dispatcher's batching rules take apart (torch.func's vmap, likewise, through the op's rule)."""
    if type(dy) not in _PLAIN or _is_legacy_batched(dy):
        return False
    return not torch._C._are_functorch_transforms_active()


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def unwrap_dead(t: Optional[Tensor]) -> Optional[Tensor]:
    """A tensor left wrapped by a functorch transform that has exited, as its plain tensor (what
    torch's Function.apply does to its arguments)."""
    return None if t is None else _unwrap_if_dead(t)


class _Training(torch.autograd.Function):
    """forward_training's autograd without the dispatcher. The running statistics travel in a
    tuple, outside autograd's inputs, and are updated in place (their versions bumped, as an
    in-place op would)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running, momentum, eps):
        y, mean, invstd = _train(x, weight, bias, *running, momentum, eps)
        bump_versions(x, running)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        _dtypes(ctx, weight, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _training_grads(ctx, dy, _backward if kernel_takes(dy) else torch.ops.batchnorm.backward) + (None,) * 3


_training_apply = direct_apply(_Training)


def check_tensors(input: Any, **named: Any) -> None:
    """After a function's call failed with an AttributeError, RuntimeError or BufferError: a
    TypeError naming the argument at fault, if one is (not a tensor, not a dense one, or on
    another device than input's (x), which DLPack refused with a message of its own: "Cannot
    pack tensors on meta", "Cannot access data pointer of Tensor that doesn't have
    storage"); else the error goes on as it was. Nothing is checked before the call: these
    checks would cost every call, and the core checks what a dense tensor carries."""
    for name, t in (("x", input), *named.items()):  # (x: the core's name for input in its messages)
        if t is None and name != "x":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {_type_name(t)}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.is_quantized:  # (eager-mode quantization keeps our layers, which it does not know, as floats)
            raise TypeError(
                f"{name} must be a floating-point tensor, got a quantized one ({t.dtype}); batchnorm.torch's layers "
                "take float tensors: fold them into the convolutions first (torch.ao.quantization.fuse_modules "
                "with bt.fuser_method_mapping()), or quantize a model with torch's own batch norm there"
            )
    for name, t in named.items():
        if t is not None and t.device != input.device:
            raise TypeError(f"{name} must be on the same device as x ({t.device} and {input.device})")


def check_inference_tensors(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running: tuple) -> None:
    """torch's refusals of tensors made under torch.inference_mode and used outside it, in an
    eager training call before its kernel writes the running statistics in place: torch
    refuses their in-place update, and autograd refuses to save an x or weight for a backward.
    Raised after the kernel (by the version bump, or by autograd saving the Function's
    tensors), they left a call that failed with its running statistics updated. Gated on x and
    running_mean (0.2 us a call; the whole check cost 0.66 us): a layer's buffers and
    parameters are made in one mode together."""
    rm = running[0]
    if not (x.is_inference() or (rm is not None and rm.is_inference())):
        return
    if torch.is_inference_mode_enabled():
        return
    for name, t in zip(("running_mean", "running_var"), running):
        if t is not None and t.is_inference():
            raise RuntimeError(
                f"{name} is an inference tensor (made under torch.inference_mode), which cannot be updated in place "
                "outside inference mode: make the layer outside torch.inference_mode, or clone its buffers"
            )
    if not x.is_inference() and (weight is None or not weight.is_inference()):
        return
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        name = "x" if x.is_inference() else "weight"
        raise RuntimeError(
            f"{name} is an inference tensor (made under torch.inference_mode), which autograd cannot save for "
            f"the backward: clone it outside inference mode, or run the call under torch.no_grad()"
        )


def train_eager(x, weight, bias, running_mean, running_var, momentum, eps) -> Tensor:
    """y of training batch norm with autograd, the running statistics updated in place (a call
    for which eager() holds)."""
    check_inference_tensors(x, weight, bias, (running_mean, running_var))
    return _training_apply(
        unwrap_dead(x), unwrap_dead(weight), unwrap_dead(bias), (running_mean, running_var), momentum, eps
    )
