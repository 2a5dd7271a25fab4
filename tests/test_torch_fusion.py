"""bt.fuser_method_mapping() in torch.ao.quantization.fuse_modules / fuse_modules_qat: each of
torch's batch norm patterns with our layers fuses as with torch's (eval: folded into the
convolution, the same values; QAT: torch's intrinsic modules holding our Parameters)."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="batchnorm.torch needs PyTorch")

import batchnorm.torch as bt  # noqa: E402

pytestmark = pytest.mark.torch
nn = torch.nn
quantization = pytest.importorskip("torch.ao.quantization")

# (leading layer, our batch norm, input shape)
CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 6, 3), lambda: bt.BatchNorm1d(6), (4, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3), lambda: bt.BatchNorm2d(6), (4, 3, 7, 6)),
    "conv3d": (lambda: nn.Conv3d(3, 6, 2), lambda: bt.BatchNorm3d(6), (2, 3, 4, 5, 3)),
    "linear": (lambda: nn.Linear(5, 6), lambda: bt.BatchNorm1d(6), (8, 5)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 6, 3), lambda: bt.BatchNorm2d(6), (4, 3, 5, 5)),
}


def _model(name: str, relu: bool) -> nn.Sequential:
    lead, norm, _ = CASES[name]
    torch.manual_seed(0)
    m = nn.Sequential(lead(), norm(), *([nn.ReLU()] if relu else []))
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.5, 2)
        m[1].bias.normal_()
    return m


def _names(m: nn.Sequential) -> list:
    return [[str(i) for i in range(len(m))]]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_fusion_folds_our_layer(name, relu):
    if relu and name in ("linear", "conv_transpose2d"):
        pytest.skip("torch has no such pattern")
    m = _model(name, relu).eval()
    x = torch.randn(*CASES[name][2])
    fused = quantization.fuse_modules(
        copy.deepcopy(m), _names(m),
        fuse_custom_config_dict={"additional_fuser_method_mapping": bt.fuser_method_mapping()},
    )
    assert not any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="did not find fuser method"):  # why the mapping is needed
        quantization.fuse_modules(copy.deepcopy(m), _names(m))


def test_qat_fusion_holds_our_parameters():
    m = _model("conv2d", relu=True).train()
    ours = m[1]
    fused = quantization.fuse_modules_qat(
        m, _names(m), inplace=True,
        fuse_custom_config_dict={"additional_fuser_method_mapping": bt.fuser_method_mapping()},
    )
    block = fused[0]
    assert type(block) is torch.ao.nn.intrinsic.ConvBnReLU2d
    bn = block[1]
    assert type(bn) is nn.BatchNorm2d and bn.training
    assert bn.weight is ours.weight and bn.running_var is ours.running_var  # the same objects: optimizers keep them


def test_qat_fusion_refuses_training_variants():
    m = nn.Sequential(nn.Conv2d(3, 6, 3), bt.BatchNorm2d(6, renorm=(3.0, 5.0))).train()
    with pytest.raises(ValueError, match="renorm"):
        quantization.fuse_modules_qat(
            m, _names(m), fuse_custom_config_dict={"additional_fuser_method_mapping": bt.fuser_method_mapping()}
        )
    m.eval()  # in eval the variants are plain batch norm: folded
    fused = quantization.fuse_modules(
        m, _names(m), fuse_custom_config_dict={"additional_fuser_method_mapping": bt.fuser_method_mapping()}
    )
    assert type(fused[0]) is nn.Conv2d


def test_mapping_is_a_new_dict_each_call():
    table = bt.fuser_method_mapping()
    assert (nn.Conv2d, bt.BatchNorm2d, nn.ReLU) in table
    assert bt.fuser_method_mapping() is not table
