"""CIFAR-style ResNets of He et al. (2016, section 4.2): ResNet-20/32/44/56/110.

Three stages of 16/32/64 channels with ``n`` basic blocks each (depth = 6n + 2). The shortcut
that changes shape is a 1x1 conv + BN (option B), which keeps every channel dependency visible
to torch-pruning's graph; parameter counts are therefore a little above the paper's option A.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ['BasicBlock', 'CifarResNet', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'ZOO',
           'TORCHVISION_MODELS', 'seresnet50', 'build_model']


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: stem conv, 3 stages (16/32/64 channels), global pool, linear head.

    Input ``(N, in_channels, H, W)``, output logits ``(N, num_classes)``; any H, W >= 8 works.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for block_index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if block_index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _depth_to_blocks(depth: int) -> int:
    return (depth - 2) // 6


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20: 3 blocks per stage, about 0.27M parameters."""
    return CifarResNet(_depth_to_blocks(20), num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32: 5 blocks per stage, about 0.47M parameters."""
    return CifarResNet(_depth_to_blocks(32), num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-44: 7 blocks per stage, about 0.66M parameters."""
    return CifarResNet(_depth_to_blocks(44), num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56: 9 blocks per stage, about 0.86M parameters."""
    return CifarResNet(_depth_to_blocks(56), num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110: 18 blocks per stage, about 1.7M parameters."""
    return CifarResNet(_depth_to_blocks(110), num_classes, in_channels)


ZOO = {'resnet20': resnet20, 'resnet32': resnet32, 'resnet44': resnet44, 'resnet56': resnet56, 'resnet110': resnet110}


def seresnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """SE-ResNet-50 (Hu et al. 2018) from torchvision parts, laid out as timm's ``seresnet50``.

    torchvision's ResNet-50 whose every bottleneck gates its ``bn3`` output, before the shortcut is added, by a
    ``torchvision.ops.SqueezeExcitation`` (global pool, 1x1 conv to C/16 channels rounded to 8, ReLU, 1x1 conv
    back, sigmoid). Random weights; input ``(N, in_channels, H, W)``, logits ``(N, num_classes)``.
    Build it as ``model='hmc_plugin.app.models:seresnet50'``. Needs torchvision.
    """
    from torchvision.models.resnet import Bottleneck, ResNet
    from torchvision.ops import SqueezeExcitation

    class SEBottleneck(Bottleneck):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            channels = self.bn3.num_features
            self.se = SqueezeExcitation(channels, max(8, int(channels / 16 + 4) // 8 * 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.se(self.bn3(self.conv3(out)))
            return self.relu(out + identity)

    model = ResNet(SEBottleneck, [3, 4, 6, 3], num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


TORCHVISION_MODELS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnext50_32x4d', 'wide_resnet50_2')


def build_model(spec: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a model from a spec: a zoo name (``'resnet56'``), ``'torchvision:NAME'`` or ``'package.module:callable'``.

    torchvision models are built with random weights (``weights=None``: nothing is downloaded) and
    ``num_classes``; their stem takes ``in_channels`` by replacing ``conv1`` when it is not 3.
    ``package.module:callable`` is called with ``num_classes=`` and ``in_channels=`` when it accepts them.
    """
    import importlib
    import inspect

    from ..errors import HMCConfigError

    expected = (f"a zoo name ({', '.join(ZOO)}), 'torchvision:NAME' (e.g. torchvision:resnet50) "
                f"or 'package.module:callable'")
    if spec in ZOO:
        return ZOO[spec](num_classes=num_classes, in_channels=in_channels)
    if spec.startswith('torchvision:'):
        name = spec.split(':', 1)[1]
        try:
            import torchvision
        except ImportError as error:
            raise HMCConfigError('torchvision models need torchvision: pip install "hmc_plugin[vision]"') from error
        if not hasattr(torchvision.models, name):
            raise HMCConfigError(f'Got model={spec!r} but torchvision.models has no {name!r}; '
                                 f'tested ones are {TORCHVISION_MODELS}')
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if in_channels != 3 and isinstance(getattr(model, 'conv1', None), nn.Conv2d):
            old = model.conv1
            model.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        return model
    if ':' in spec:
        module_name, attribute = spec.split(':', 1)
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise HMCConfigError(f'Got model={spec!r} but could not import it ({error}); expected {expected}') from error
        parameters = inspect.signature(factory).parameters
        kwargs = {key: value for key, value in (('num_classes', num_classes), ('in_channels', in_channels))
                  if key in parameters}
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise HMCConfigError(f'Got model={spec!r} but it returned {type(model).__name__}, not an nn.Module')
        return model
    raise HMCConfigError(f'Got model={spec!r} but expected {expected}')
