"""End to end: masks from channel_masks, applied by NNI's ModelSpeedup and by torch-pruning, agree.

Checks FLOPs against an analytic count on CIFAR ResNet-56, and architecture plus outputs of both
apply paths on ResNet-56 and a randomly initialised torchvision ResNet-50.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hmc_plugin.app.models import resnet56
from hmc_plugin.engines.pruning import channel_masks, find_pruning_groups, prune_physically, speedup_with_nni
from hmc_plugin.utils.counting import count_flops


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN parameters and statistics, so eval-mode outputs depend on every channel."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _conv1_saving(block: nn.Module, height: int, width: int) -> int:
    """MACs (tp's count) saved by halving ``block.conv1``'s out channels, at its output size H x W.

    conv1 loses half its filters, bn1 (2 ops/element) and the ReLU after it see half the
    elements, and conv2 loses half its input channels.
    """
    conv1, conv2 = block.conv1, block.conv2
    half = conv1.out_channels // 2
    kernel = conv1.kernel_size[0] * conv1.kernel_size[1]
    pixels = height * width
    return pixels * half * (kernel * conv1.in_channels + 2 + 1 + kernel * conv2.out_channels)


@pytest.fixture(scope='module')
def cifar_model() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(resnet56())


def test_pruning_block_conv1s_by_half_cuts_flops_as_computed(cifar_model):
    dummy = torch.randn(1, 3, 32, 32)
    blocks = [block for stage in (cifar_model.layer1, cifar_model.layer2, cifar_model.layer3) for block in stage]
    ratios = {f'layer{stage}.{index}.conv1': 0.5 for stage in (1, 2, 3) for index in range(9)}
    masks = channel_masks(cifar_model, dummy, ratios)
    sides = [side for side in (32, 16, 8) for _ in range(9)]  # conv1 output size of each block, by stage
    expected = count_flops(cifar_model, dummy) - sum(
        _conv1_saving(block, side, side) for block, side in zip(blocks, sides))

    physical = prune_physically(copy.deepcopy(cifar_model), dummy, masks)
    nni = speedup_with_nni(copy.deepcopy(cifar_model), dummy, masks)

    assert physical(dummy).shape == (1, 10)
    assert all(block.conv1.out_channels == block.conv2.out_channels // 2 for stage in
               (physical.layer1, physical.layer2, physical.layer3) for block in stage)
    assert count_flops(physical, dummy) == expected
    assert count_flops(nni, dummy) == expected


def _assert_same_model(model: nn.Module, dummy: torch.Tensor, ratios: dict[str, float]) -> None:
    masks = channel_masks(model, dummy, ratios)
    physical = prune_physically(copy.deepcopy(model), dummy, masks)
    nni = speedup_with_nni(copy.deepcopy(model), dummy, masks)
    assert _shapes(physical) == _shapes(nni)
    assert _shapes(physical) != _shapes(model)
    with torch.no_grad():
        torch.testing.assert_close(nni(dummy), physical(dummy), atol=1e-5, rtol=1e-5)
    assert not physical.training and not nni.training


def test_nni_and_physical_pruning_agree_on_cifar_resnet56(cifar_model):
    torch.manual_seed(1)
    ratios = {'conv1': 0.5, 'layer1.3.conv1': 0.5, 'layer2.0.conv1': 0.25, 'layer3.8.conv1': 0.75}
    _assert_same_model(cifar_model, torch.randn(2, 3, 32, 32), ratios)


def test_nni_and_physical_pruning_agree_on_torchvision_resnet50():
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.resnet50(weights=None))
    dummy = torch.randn(1, 3, 64, 64)
    groups = {group.name: group for group in find_pruning_groups(model, dummy)}
    assert len(groups['layer2.0.conv3'].members) == 5  # 4 conv3s + the downsample conv
    ratios = {'layer1.0.conv1': 0.5, 'layer2.1.conv2': 0.25, 'layer3.2.conv1': 0.5, 'layer2.0.conv3': 0.5}
    _assert_same_model(model, dummy, ratios)
