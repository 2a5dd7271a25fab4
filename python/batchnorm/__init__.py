"""batchnorm: fast, exact batch normalization for NumPy and any DLPack array library.

The functions follow the contract in API.md: statistics, merge_statistics,
forward_training, forward_inference, backward (and its two halves backward_reduce /
backward_elemt), fold, precise_statistics, and the stateful BatchNorm layer. batchnorm.distributed (imported on
request: it is the only part that talks to mpi4py or torch.distributed) synchronizes them
across processes."""
from .functional import (
    backward,
    backward_elemt,
    backward_reduce,
    empty_cache,
    fold,
    forward_inference,
    forward_training,
    get_num_threads,
    info,
    merge_statistics,
    set_num_threads,
    statistics,
)
from .layer import BatchNorm
from .precise import precise_statistics

__version__ = info()["version"]

__all__ = [
    "BatchNorm",
    "backward",
    "backward_elemt",
    "backward_reduce",
    "empty_cache",
    "fold",
    "forward_inference",
    "forward_training",
    "get_num_threads",
    "info",
    "merge_statistics",
    "precise_statistics",
    "set_num_threads",
    "statistics",
    "__version__",
]
