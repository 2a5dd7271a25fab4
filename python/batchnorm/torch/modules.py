"""BatchNorm1d/2d/3d: torch.nn's batch norm layers (subclasses of torch's _BatchNorm, with
its constructor, parameters, buffers, state_dict and train/eval rules) whose forward runs
batchnorm's ops, and batch_norm, the drop-in for torch.nn.functional.batch_norm."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import _ops  # noqa: F401  (registers torch.ops.batchnorm)


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
    place; otherwise the running statistics normalize it."""
    if training:
        F._verify_batch_size(input.size())  # torch's own check and message
        y, _, _, new_mean, new_var = torch.ops.batchnorm.forward_training(
            input, weight, bias, running_mean, running_var, momentum, eps
        )
        if running_mean is not None:
            running_mean.copy_(new_mean)
        if running_var is not None:
            running_var.copy_(new_var)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given when training=False, got None")
    return torch.ops.batchnorm.forward_inference(input, running_mean, running_var, weight, bias, eps)


class _Base(_BatchNorm):
    def forward(self, input: Tensor) -> Tensor:
        # torch's _BatchNorm.forward, line for line, with batch_norm for F.batch_norm.
        self._check_input_dim(input)
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        # Batch statistics in training, and in eval when there are no running statistics.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # The running statistics are updated only when tracked and training.
        tracked = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )


class BatchNorm1d(_Base):
    """Drop-in for torch.nn.BatchNorm1d: (N, C) or (N, C, L) input."""

    _check_input_dim = torch.nn.BatchNorm1d._check_input_dim


class BatchNorm2d(_Base):
    """Drop-in for torch.nn.BatchNorm2d: (N, C, H, W) input, any memory format."""

    _check_input_dim = torch.nn.BatchNorm2d._check_input_dim


class BatchNorm3d(_Base):
    """Drop-in for torch.nn.BatchNorm3d: (N, C, D, H, W) input, any memory format."""

    _check_input_dim = torch.nn.BatchNorm3d._check_input_dim
