"""BatchNorm1d/2d/3d: torch.nn's batch norm layers (subclasses of torch's _BatchNorm, with
its constructor, parameters, buffers, state_dict and train/eval rules) whose forward runs
batchnorm's ops, plus the training variants as keyword-only arguments, and batch_norm, the
drop-in for torch.nn.functional.batch_norm."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import _check_bool, _ghost, _layer_renorm
from . import _func, _ops
from .variants import batch_norm_variant


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.batch_norm on batchnorm's kernels: in training the batch
    statistics normalize `input` and, when given, the running statistics are updated in
    place; otherwise the running statistics normalize it. Under torch.jit.script it is
    torch.nn.functional.batch_norm (as the layers are: modules._Base._scripted)."""
    if torch.jit.is_scripting():
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


@torch.jit.unused
def _batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    if _ops.has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        tensors = (input, running_mean, running_var, weight, bias)  # as torch.nn.functional's: FX, modes
        return _ops.handle_torch_function(batch_norm, tensors, *tensors, training, momentum, eps)
    try:
        _ops.check_running(running_mean, running_var)
        _ops.check_scalars(training, momentum, eps)
        weight, bias = _ops.flat_affine(input, weight, bias)
        if training:
            if input.dim() > 1:  # (without a channel axis the core's ValueError names x)
                F._verify_batch_size(input.size())  # torch's own check and message
            if _ops.eager(input, weight, bias, running_mean, running_var):
                return _ops.train_eager(input, weight, bias, running_mean, running_var, momentum, eps)
            _ops.check_separate_running(running_mean, running_var)
            momentum, eps = _ops.plain_scalars(momentum, eps)
            if _ops.as_torchs(input, weight, bias, running_mean, running_var, momentum, eps):
                return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
            y, _, _, new_mean, new_var = _func.call(
                "forward_training", input, weight, bias, running_mean, running_var, momentum, eps
            )
            _ops.write_running(running_mean, new_mean, running_var, new_var)
            return y
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given when training=False, got None")
        try:
            if not _ops.wants_grad(input, weight, bias) and _ops.eager(input, weight, bias, running_mean, running_var):
                # (no autograd to record)
                return _ops._forward_inference(input, running_mean, running_var, weight, bias, eps)
            eps = _ops.plain_scalar(eps)
            if _ops.as_torchs(input, weight, bias, running_mean, running_var, None, eps):
                return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
            return _func.call("forward_inference", input, running_mean, running_var, weight, bias, eps)
        except (ValueError, TypeError) as e:
            raise _ops.named_running(e) from None
    except (AttributeError, RuntimeError, BufferError):
        _ops.check_tensors(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
        raise


def scripted_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    training: bool,
    track_running_stats: bool,
    momentum: Optional[float],
    eps: float,
) -> Tensor:
    """A layer's forward in TorchScript (the layers' _scripted): torch's _BatchNorm.forward,
    counting the batch and updating the running statistics as torch's layers do."""
    factor = 0.0 if momentum is None else momentum
    if training and track_running_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average
            factor = 1.0 / float(num_batches_tracked)
    bn_training = training or (running_mean is None and running_var is None)
    tracked = not training or track_running_stats
    return F.batch_norm(input, running_mean if tracked else None, running_var if tracked else None, weight, bias,
                        bn_training, factor, eps)


class _Base(_BatchNorm):
    """torch's _BatchNorm with the training variants as keyword-only arguments (README
    "Variants"): renorm=(rmax, dmax) (batch renormalization, needs track_running_stats),
    ghost_batch=G, skip_nonfinite, running_var_unbiased. Without them it is torch's layer."""

    def __init__(
        self,
        *args: Any,
        renorm: Optional[Sequence[float]] = None,
        ghost_batch: Optional[int] = None,
        skip_nonfinite: bool = False,
        running_var_unbiased: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        limits = _layer_renorm(renorm)
        if renorm is not None:
            if not self.track_running_stats:
                raise ValueError("renorm needs running statistics, got track_running_stats=False")
            if ghost_batch is not None:
                raise ValueError("renorm and ghost_batch together are not supported, got both")
        self.renorm = limits
        self.ghost_batch = None if ghost_batch is None else _ghost(ghost_batch)
        self.skip_nonfinite = _check_bool(skip_nonfinite, "skip_nonfinite")
        self.running_var_unbiased = _check_bool(running_var_unbiased, "running_var_unbiased")

    def _variants(self) -> bool:
        return (
            self.renorm is not None
            or self.ghost_batch is not None
            or self.skip_nonfinite
            or not self.running_var_unbiased
        )

    def _variant_options(self) -> list:
        """The variants this layer has on, as "name=value" (its repr's, convert's message)."""
        return [
            f"{k}={v!r}"
            for k, v, default in (
                ("renorm", self.renorm, None),
                ("ghost_batch", self.ghost_batch, None),
                ("skip_nonfinite", self.skip_nonfinite, False),
                ("running_var_unbiased", self.running_var_unbiased, True),
            )
            if v != default
        ]

    def extra_repr(self) -> str:
        return ", ".join([super().extra_repr(), *self._variant_options()])

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted(input)
        return self._forward(input)

    # torch.jit.script compiles forward and the methods it calls. A scripted model is for
    # runtimes without Python (libtorch in C++, Triton), which cannot call our ops: there the
    # layer is torch's own batch norm (_scripted), the same function on torch's kernels.
    def _synchronized(self) -> bool:  # SyncBatchNorm: True (a scripted model cannot synchronize)
        return False

    def _scripted(self, input: Tensor) -> Tensor:
        """torch's _BatchNorm.forward in TorchScript; the training variants (and SyncBatchNorm's
        synchronization) have no TorchScript form and are refused in training mode."""
        self._check_input_dim(input)
        # Batch statistics: in training, and in eval without running statistics (as _forward).
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        if batch_statistics and self._variants() or self.training and self._synchronized():
            raise RuntimeError(
                "a scripted model (torch.jit.script) runs this layer as torch's batch norm, which has no training "
                "variants or synchronization across processes: call it in eval mode with running statistics, or "
                "without torch.jit.script"
            )
        return scripted_batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.num_batches_tracked, self.training, self.track_running_stats,
                                   self.momentum, self.eps)

    @torch.jit.unused
    def _forward(self, input: Tensor) -> Tensor:
        if isinstance(input, _ops.Proxy):  # torch.fx.symbolic_trace: one node, as torch's layers
            return _ops.traced(self, input)
        # torch's _BatchNorm.forward with batch_norm for F.batch_norm, but num_batches_tracked
        # counts the batch once it has updated the running statistics: a call that raises
        # before leaves the layer as it was (torch counts it first; momentum=None's average
        # then went wrong after a rejected batch), and one interrupted after counts
        # (_ops.count_interrupted).
        self._check_input_dim(input)
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        tracked_batches = None
        if self.training and self.track_running_stats:
            tracked_batches = self.num_batches_tracked  # (one module attribute lookup: 0.5 us each)
            if tracked_batches is not None and self.momentum is None:  # cumulative moving average
                if torch.compiler.is_compiling() and self.running_mean is not None and self.running_var is not None \
                        and (torch.compiler.is_dynamo_compiling() or not self._variants()):
                    # (torch.export without Dynamo would run the variants' disabled call traced,
                    # recursing: they take the path below, which fails on the count there.)
                    return self._compiled_cumulative(input, tracked_batches)
                exponential_average_factor = 1.0 / (float(tracked_batches) + 1.0)
        # Batch statistics in training, and in eval when there are no running statistics.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # The running statistics are updated only when tracked and training.
        tracked = not self.training or self.track_running_stats
        running_mean = self.running_mean if tracked else None
        version = _ops.version(running_mean, tracked_batches)
        try:
            if bn_training and self._variants():
                F._verify_batch_size(input.size())
                update = self.training and self.track_running_stats
                y = batch_norm_variant(
                    input,
                    running_mean,
                    self.running_var if tracked else None,
                    self.weight,
                    self.bias,
                    exponential_average_factor,
                    self.eps,
                    running_var_unbiased=self.running_var_unbiased,
                    skip_nonfinite=self.skip_nonfinite,
                    renorm=self.renorm if update else None,
                    ghost_batch=self.ghost_batch,
                )
            else:
                y = _batch_norm(
                    input,
                    running_mean,
                    self.running_var if tracked else None,
                    self.weight,
                    self.bias,
                    bn_training,
                    exponential_average_factor,
                    self.eps,
                )
        except BaseException:
            _ops.count_interrupted(tracked_batches, running_mean, version)
            raise
        if tracked_batches is not None:
            tracked_batches.add_(1)
        return y


    @torch.jit.unused
    def _compiled_cumulative(self, input: Tensor, counted: Tensor) -> Tensor:
        """momentum=None in training under torch.compile (_ops.compiled_cumulative). The training
        variants update the running statistics from them (renorm's correction, skip_nonfinite's
        skip), which fresh buffers would lose: they run the layer as a graph break instead."""
        if self._variants():
            return self._uncompiled(input)
        return _ops.compiled_cumulative(
            lambda mean, var, momentum: _batch_norm(input, mean, var, self.weight, self.bias, True, momentum, self.eps),
            input, self.running_mean, self.running_var, counted,
        )

    @torch.jit.unused
    @torch.compiler.disable
    def _uncompiled(self, input: Tensor) -> Tensor:
        return self._forward(input)


class BatchNorm1d(_Base):
    """Drop-in for torch.nn.BatchNorm1d: (N, C) or (N, C, L) input."""

    _check_input_dim = torch.nn.BatchNorm1d._check_input_dim


class BatchNorm2d(_Base):
    """Drop-in for torch.nn.BatchNorm2d: (N, C, H, W) input, any memory format."""

    _check_input_dim = torch.nn.BatchNorm2d._check_input_dim


class BatchNorm3d(_Base):
    """Drop-in for torch.nn.BatchNorm3d: (N, C, D, H, W) input, any memory format."""

    _check_input_dim = torch.nn.BatchNorm3d._check_input_dim
