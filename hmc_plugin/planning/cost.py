"""The cost model: per-layer FLOPs and parameters of any pruned or decomposed shape, without building it."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn

from ..engines.lowrank import flops_ratio, method_for, replacement_params, resolve_ranks, round_ranks
from ..engines.pruning import PruningGroup, kept_channels
from ..utils.counting import forward_with_hooks

__all__ = ['LayerCost', 'CostModel', 'shape_module', 'decomposed_cost']


@dataclass(frozen=True)
class LayerCost:
    """Shape facts of one Conv2d/Linear, enough to count its MACs and parameters after compression."""

    name: str
    kind: str                 # 'conv' | 'linear'
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    conv_groups: int
    bias: bool
    positions: int            # output positions per image (H_out * W_out, or 1 for Linear)


class CostModel:
    """MACs and parameters of the model's Conv2d/Linear layers after pruning and decomposition.

    The rest of the model (BN, ReLU, pooling) is treated as constant; ``build_plan`` corrects the
    small error by measuring the compressed model.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, groups: Sequence[PruningGroup], rank_method: str = 'auto',
                 methods: Mapping[str, str] | None = None):
        self.rank_method = rank_method
        self.methods = dict(methods or {})  # layer -> method chosen by the scan (rank_method 'best')
        self.layers: dict[str, LayerCost] = {}
        positions: dict[str, int] = {}

        def recorder(name):
            def record(module, inputs, output):
                positions[name] = int(np.prod(output.shape[2:])) if output.dim() > 2 else int(np.prod(output.shape[1:-1]) or 1)
            return record

        forward_with_hooks(model, dummy_input, {module: recorder(name) for name, module in model.named_modules()
                                                if isinstance(module, (nn.Conv2d, nn.Linear))})
        for name, module in model.named_modules():
            if name not in positions:
                continue
            if isinstance(module, nn.Conv2d):
                self.layers[name] = LayerCost(name, 'conv', module.in_channels, module.out_channels,
                                              tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                                              tuple(module.dilation), module.groups, module.bias is not None,
                                              positions[name])
            else:
                self.layers[name] = LayerCost(name, 'linear', module.in_features, module.out_features, (1, 1),
                                              (1, 1), (0, 0), (1, 1), 1, module.bias is not None, positions[name])
        self.out_group = {member: group.name for group in groups for member in group.members}
        self.in_group = {consumer: group.name for group in groups for consumer in group.consumers}
        self.affected = {group.name: sorted(set(group.members) | set(group.consumers)) for group in groups}
        self.full = {'flops': sum(self.layer_cost(name, {}, {})[0] for name in self.layers),
                     'params': sum(self.layer_cost(name, {}, {})[1] for name in self.layers)}

    def method_of(self, name: str) -> str:
        """The rank method of layer ``name``: the scan's choice where it made one, else ``rank_method``."""
        return self.methods.get(name, self.rank_method)

    def pruned_shape(self, name: str, prune_ratios: dict[str, float], round_to: int = 1) -> tuple[int, int]:
        layer = self.layers[name]
        out_ratio = prune_ratios.get(self.out_group.get(name), 0.0)
        in_ratio = prune_ratios.get(self.in_group.get(name), 0.0)
        return (kept_channels(layer.in_channels, in_ratio, round_to),
                kept_channels(layer.out_channels, out_ratio, round_to))

    def layer_cost(self, name: str, prune_ratios: dict[str, float], levels: dict[str, float],
                   round_to: int = 1) -> tuple[int, int, tuple[int, ...] | None, str | None]:
        """(MACs per image, parameters, ranks or None, method or None) of layer ``name`` in the given state."""
        layer = self.layers[name]
        in_channels, out_channels = self.pruned_shape(name, prune_ratios, round_to)
        level = levels.get(name, 0.0)
        if level > 0:
            return decomposed_cost(layer, in_channels, out_channels, level, self.method_of(name), round_to)
        bias = out_channels if layer.bias else 0
        per_position = out_channels * (in_channels // layer.conv_groups) * layer.kernel[0] * layer.kernel[1]
        return layer.positions * (per_position + bias), per_position + bias, None, None


def shape_module(layer: LayerCost, in_channels: int, out_channels: int) -> nn.Module:
    """A weightless (meta) module of the layer's pruned shape: rank rules need only the shape."""
    if layer.kind == 'linear':
        return nn.Linear(in_channels, out_channels, bias=layer.bias, device='meta')
    return nn.Conv2d(in_channels, out_channels, layer.kernel, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, groups=layer.conv_groups, bias=layer.bias, device='meta')


@functools.lru_cache(maxsize=None)
def decomposed_cost(layer: LayerCost, in_channels: int, out_channels: int, level: float, rank_method: str,
                    round_to: int = 1):
    """Cost of the layer decomposed to keep ``1 - level`` of its FLOPs, with lowrank's own rank rule, the ranks
    rounded up to multiples of ``round_to`` (``lowrank.round_ranks``)."""
    module = shape_module(layer, in_channels, out_channels)
    method = method_for(module, rank_method, layer.name)
    ranks = resolve_ranks(module, f'flops:{1.0 - level:.6g}', method=method, layer_name=layer.name)
    ranks = round_ranks(module, ranks, method, round_to)
    dense_macs = layer.positions * out_channels * in_channels * layer.kernel[0] * layer.kernel[1]
    bias_adds = layer.positions * out_channels if layer.bias else 0
    macs = int(round(dense_macs * flops_ratio(module, ranks, method))) + bias_adds
    return macs, replacement_params(module, ranks, method), ranks, method
