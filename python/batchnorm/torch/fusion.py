"""fuser_method_mapping(): our layers in torch.ao.quantization.fuse_modules, which looks fusers
up by exact module types: for each of torch's patterns with a batch norm layer, the same
pattern with ours, whose fuser hands torch's fuser a torch layer holding the same Parameters
and buffers (folding into the convolution in eval, torch's intrinsic modules for QAT)."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

from .convert import _replacement
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

_TORCHS = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d}
_OURS = {torch_cls: ours for ours, torch_cls in _TORCHS.items()}

# torch's fusion patterns with a batch norm layer (torch.ao.quantization's default mapping).
# (BatchNorm, ReLU) is left out: torch's fused BNReLU modules take torch's layers only for the
# quantized BatchNorm they become, where batchnorm's own fused layer is BatchNormAct2d.
_PATTERNS = (
    (nn.Conv1d, nn.BatchNorm1d), (nn.Conv1d, nn.BatchNorm1d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d), (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    (nn.Conv3d, nn.BatchNorm3d), (nn.Conv3d, nn.BatchNorm3d, nn.ReLU),
    (nn.Linear, nn.BatchNorm1d),
    (nn.ConvTranspose1d, nn.BatchNorm1d), (nn.ConvTranspose2d, nn.BatchNorm2d), (nn.ConvTranspose3d, nn.BatchNorm3d),
)


def _as_torchs(module: nn.Module, is_qat: bool) -> nn.Module:
    if type(module) not in _TORCHS:
        return module
    if is_qat and module._variants():
        raise ValueError(
            f"{type(module).__name__} with training variants ({', '.join(module._variant_options())}) cannot be "
            "fused for quantization-aware training (torch's fused modules train plain batch norm); fuse it in "
            "eval mode, or without the variants"
        )
    return _replacement(module, _TORCHS[type(module)], None)


def _ours_fuser(fuser: Callable) -> Callable:
    def fuse(is_qat: bool, *modules: nn.Module) -> nn.Module:
        return fuser(is_qat, *(_as_torchs(m, is_qat) for m in modules))

    return fuse


def fuser_method_mapping() -> Dict[Tuple[type, ...], Callable]:
    """For torch.ao.quantization.fuse_modules (and fuse_modules_qat), which find fusers by the
    modules' exact types: pass it as
    ``fuse_custom_config_dict={"additional_fuser_method_mapping": bt.fuser_method_mapping()}``.
    Conv/Linear/ConvTranspose followed by our BatchNorm1d/2d/3d (and a ReLU) then fuse as with
    torch's layers: in eval the batch norm is folded into the convolution's weights; for QAT
    the fused module holds a torch layer with our layer's Parameters and buffers. A new dict
    each call."""
    from torch.ao.quantization.fuser_method_mappings import get_fuser_method

    mapping: Dict[Tuple[type, ...], Callable] = {}
    for pattern in _PATTERNS:
        ours = tuple(_OURS.get(t, t) for t in pattern)
        mapping[ours] = _ours_fuser(get_fuser_method(pattern))
    return mapping


__all__ = ["fuser_method_mapping"]
