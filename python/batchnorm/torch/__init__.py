"""batchnorm.torch: PyTorch drop-ins on batchnorm's kernels. BatchNorm1d/2d/3d (subclasses of
torch's _BatchNorm), SyncBatchNorm (torch.nn.SyncBatchNorm's, across processes), batch_norm
(as torch.nn.functional.batch_norm), convert(model), recompute_statistics(model, batches)
(PreciseBN), decompositions() (the ops in torch's ATen operations, for torch.export), and the
ops torch.ops.batchnorm.{forward_training, forward_inference, backward} (torch.library), also
under torch.func transforms and forward-mode AD (_func.py)."""
try:
    import torch as _torch
except ImportError as error:  # torch is an optional dependency of batchnorm
    raise ImportError(
        "batchnorm.torch needs PyTorch (torch >= 2.4), which is not installed: "
        "pip install 'batchnorm[torch]', or install a torch build of your choice (CPU or CUDA) "
        "from https://pytorch.org"
    ) from error

if tuple(int(p) for p in _torch.__version__.split("+")[0].split(".")[:2]) < (2, 4):
    raise ImportError(f"batchnorm.torch needs torch >= 2.4 (torch.library.register_autograd), got {_torch.__version__}")

from .convert import convert
from .decompositions import decompositions
from .fusion import fuser_method_mapping
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm
from .norm_act import BatchNormAct2d, batch_norm_act
from .precise import recompute_statistics
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "SyncBatchNorm", "batch_norm", "batch_norm_act",
    "convert", "decompositions", "fuser_method_mapping", "recompute_statistics",
]
