"""SyncBatchNorm: the drop-in for torch.nn.SyncBatchNorm on batchnorm's kernels and
batchnorm.distributed's exchange, on any torch.distributed backend (gloo on CPU, NCCL on GPU):
training statistics and input gradients span every rank of the process group, ranks may hold
different batch sizes (including none), and bad input on one rank raises on every rank."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _C
from .._arrays import torch_increment_version
from .._collectives import Engine, TorchEngine, copy_sharing_group
from ..distributed import _check_exchange, _exchange, _sync_backward
from . import _func, _ops, _twice
from .modules import _Base

_AXIS = 1


def _validate_locally(x: Tensor, weight, bias, running_mean, running_var, momentum: float, eps: float) -> None:
    """Every check forward_training makes, on an empty slice of x (the core checks shapes,
    dtypes, devices and scalars before it looks at the data): a rank whose arguments the core
    would reject finds out before the exchange, and reports it through the exchange, instead
    of failing after it while the others wait in backward's collective. The running
    statistics are stand-ins of the same shape, dtype and device (nothing is updated)."""
    c = x.shape[_AXIS]
    stand_in = [None if r is None else torch.empty_like(r) for r in (running_mean, running_var)]
    stats = torch.zeros(c, dtype=torch.float64, device=x.device)
    empty = x.narrow(0, 0, 0)
    try:
        _C.forward_training(
            _ops._cap(empty), _ops._cap(weight), _ops._cap(bias), _ops._cap(stand_in[0]),
            _ops._cap(stand_in[1]), momentum, eps, _AXIS, None, _ops._cap(stats), _ops._cap(stats), 2, _ops._call(x),
        )  # fmt: skip
    except (ValueError, TypeError) as e:  # the messages quote x's shape: the caller's, not the empty slice's
        text = str(e).replace(f"x has shape {tuple(empty.shape)}", f"x has shape {tuple(x.shape)}")
        raise type(e)(text) from None


class _SyncFunction(torch.autograd.Function):
    """One training step of synchronized batch norm: the exchange of per-channel moments
    forward, the allreduce of the gradient sums backward (batchnorm.distributed's pieces)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, engine, own, c, how):
        # x's data takes no part in autograd here: the statistics are constants of this op
        # whose gradient the backward below accounts for.
        mean, var, count = _exchange(engine, x.detach(), _AXIS, c, x.device, own, how)
        y = torch.empty_like(x)  # keeps channels_last
        saved_mean = torch.empty(c, dtype=_ops._acc(x.dtype), device=x.device)
        saved_invstd = torch.empty_like(saved_mean)
        _C.forward_training(
            _ops._cap(x), _ops._cap(weight), _ops._cap(bias), _ops._cap(running_mean), _ops._cap(running_var),
            momentum, eps, _AXIS, _ops._cap(y),
            _ops._cap(torch.from_numpy(mean).to(x.device)), _ops._cap(torch.from_numpy(var).to(x.device)), count,
            _ops._call(x), _ops._cap(saved_mean), _ops._cap(saved_invstd),
        )  # fmt: skip
        # Updated in place (from the global statistics, an empty local batch too): their versions
        # bumped as an in-place op's, which the layer's count reads (_ops.count_interrupted).
        updated = [t for t in (running_mean, running_var) if t is not None]
        if updated:
            torch_increment_version(updated)
        ctx.save_for_backward(x, weight, saved_mean, saved_invstd)
        ctx.count, ctx.engine = count, engine
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        # batchnorm's array functions refuse tensors that record autograd (this op is their graph).
        plain_weight = None if weight is None else weight.detach()
        dx, dweight, dbias = _sync_backward(ctx.engine, dy.detach(), x.detach(), mean, invstd, ctx.count, plain_weight,
                                            _AXIS)
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grads = (dx if needs_x else None, *_ops.param_grads(ctx, dweight, dbias, needs_w, needs_b))
        return _twice.refuse("SyncBatchNorm", grads, dy, x, weight) + (None,) * 8


@torch.compiler.disable  # collectives and host-side merging: a graph break, not a trace
def _sync_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, engine, own, c, how) -> Tensor:
    return _SyncFunction.apply(x, weight, bias, running_mean, running_var, momentum, eps, engine, own, c, how)


class SyncBatchNorm(_Base):
    """Drop-in for torch.nn.SyncBatchNorm: the same constructor, parameters, buffers,
    state_dict and train/eval rules, an instance of torch's _BatchNorm but not of
    torch.nn.SyncBatchNorm (DistributedDataParallel refuses every instance of that on CPU). In training with an initialized
    process group of more than one rank, the statistics are those of the concatenation of
    every rank's batch (one allgather of P x (2C + 4) float64 values forward, one allreduce
    of 2C + 3 backward) and the running statistics, from the global unbiased variance, are
    bitwise identical on every rank. Unlike torch's, CPU tensors work (gloo), and ranks may
    hold empty batches. exchange="allreduce": two allreduces of C + 9 and C values instead of
    the allgather, for many ranks (README, cost model). Otherwise (eval, one rank, no process
    group) it is BatchNorm."""

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    # Not TorchScript's to keep: a scripted layer never synchronizes (modules._Base._scripted),
    # and a ProcessGroup attribute made torch.jit.save fail.
    __jit_ignored_attributes__ = ["process_group", "_engine"]
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        exchange: str = "allgather",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group
        self.exchange = _check_exchange(exchange)
        self._engine = None  # (group, Engine) once built; not annotated here: TorchScript warns on that

    def __getstate__(self) -> dict:
        # The engine holds torch.distributed handles, which neither copy nor pickle: deepcopy
        # (EMA models, checkpoints of whole modules) rebuilds it at the next synchronized step.
        state = super().__getstate__()
        return {**state, "_engine": None}

    def __deepcopy__(self, memo: dict) -> "SyncBatchNorm":
        # (A ProcessGroup cannot be copied, which makes torch's own layer fail here.)
        return copy_sharing_group(self, self.process_group, memo)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.exchange == "allgather" else f", exchange={self.exchange!r}")

    def _group(self) -> Tuple[Any, int]:
        group = self.process_group if self.process_group else dist.group.WORLD
        return group, dist.get_world_size(group)

    def _engine_of(self, group: Any) -> Engine:
        # Built once per group (rank and size lookups are not free at every step).
        if self._engine is None or self._engine[0] is not group:
            self._engine = (group, TorchEngine(None if group is dist.group.WORLD else group))
        return self._engine[1]

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # torch's batch norm, in eval mode only (modules._Base._scripted)
            return self._scripted(input)
        return self._forward(input)

    def _synchronized(self) -> bool:
        return True

    @torch.jit.unused
    def _forward(self, input: Tensor) -> Tensor:
        if isinstance(input, _ops.Proxy):  # torch.fx.symbolic_trace: one node, as torch's layers
            return _ops.traced(self, input)
        syncing = self.training and dist.is_available() and dist.is_initialized()
        if not syncing:
            return super()._forward(input)
        group, world = self._group()
        if world <= 1:
            return super()._forward(input)
        # Checks that fail on one rank only must not leave the others waiting: they travel
        # through the exchange, which raises on every rank.
        own: Optional[Exception] = None
        momentum = 0.0
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        device = None  # the exchange's: x's once it is known to be a tensor
        try:
            _ops.check_tensors(input)  # (not a tensor: a TypeError, exchanged as the others are)
            device = input.device
            if input.is_neg():  # a lazily negated view holds -input, which DLPack hands over as is
                input = input.resolve_neg()
            if _func.active():  # its autograd.Function predates functorch's rules, like torch's
                raise ValueError(
                    "SyncBatchNorm cannot run under torch.func transforms or forward-mode AD (nor can "
                    "torch.nn.SyncBatchNorm), got an active one; use it outside the transform, or BatchNorm"
                )
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            if self.track_running_stats:
                tracked = int(self.num_batches_tracked) + 1
                momentum = 1.0 / tracked if self.momentum is None else self.momentum
            _validate_locally(input, self.weight, self.bias, *running, momentum, self.eps)
            _ops.check_running(*running)
        except Exception as err:  # noqa: BLE001 (any error is reported: one left out hung the others)
            own = err
        if own is not None:  # the exchange raises it here and the others' error on every other rank
            with torch._C._DisableFuncTorch():  # its host tensors are no transform's
                if device is None:  # an input that is no tensor: the layer's own device (only read on this path)
                    device = next((t.device for t in (self.weight, self.running_mean) if t is not None),
                                  torch.device("cpu"))
                _exchange(self._engine_of(group), None, _AXIS, self.num_features, device, own, self.exchange)
        counted = self.num_batches_tracked if self.track_running_stats else None
        version = _ops.version(running[0], counted)
        try:
            y = _sync_batch_norm(input, self.weight, self.bias, *running, momentum, self.eps, self._engine_of(group),
                                 own, self.num_features, self.exchange)  # fmt: skip
        except BaseException:
            _ops.count_interrupted(counted, running[0], version)
            raise
        if counted is not None:
            counted.add_(1)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm with batchnorm's layers: every batch
        norm layer of `module` (torch's or ours) becomes this SyncBatchNorm."""
        from .convert import convert

        return convert(module, sync=True, process_group=process_group)


__all__ = ["SyncBatchNorm"]
