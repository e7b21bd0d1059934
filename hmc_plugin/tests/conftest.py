"""Unit-test fixtures shared by the engines' tests."""
import pytest
import torch
from torch import nn

from hmc_plugin.app.models import resnet20


@pytest.fixture
def model() -> nn.Module:
    """CIFAR ResNet-20 with seeded weights and random BN affine parameters (importances and outputs not degenerate)."""
    torch.manual_seed(0)
    net = resnet20()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
    return net.eval()
