"""What a plan keeps, measured on the model: masks, exact FLOPs and parameters, and the fast-path compressed copy.

Planning measures its candidate plans with torch-pruning's physical pruning (the same architecture as
NNI's ModelSpeedup gives) and the low-rank engine; ``hmc_plugin.apply`` builds the final model.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..engines.lowrank import decompose_layers, flops_ratio, replacement_params
from ..engines.pruning import channel_masks, prune_physically
from ..utils.counting import count_flops, count_layer_flops, count_params
from .plan import CompressionPlan

__all__ = ['plan_masks', 'measure_plan', 'compress_fast']


def plan_masks(model: nn.Module, plan: CompressionPlan, dummy_input: Any,
               calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """NNI-format masks ``{module_name: {'weight': mask, 'bias': mask}}`` of the plan's pruning; model untouched."""
    if not plan.prune_ratios:
        return {}
    return channel_masks(model, dummy_input, plan.prune_ratios, importance=plan.importance,
                         round_to=plan.round_to, calibration=calibration)


def compress_fast(model: nn.Module, plan: CompressionPlan, dummy_input: Any, masks: dict | None = None) -> nn.Module:
    """Compress ``model`` in place by ``plan`` with torch-pruning's physical pruning, then low-rank; return it."""
    masks = plan_masks(model, plan, dummy_input) if masks is None else masks
    if masks:
        model = prune_physically(model, dummy_input, masks)
    if plan.ranks:
        decompose_layers(model, plan.ranks, method=plan.methods)
    return model


def measure_plan(model: nn.Module, plan: CompressionPlan, dummy_input: Any) -> dict[str, int]:
    """Exact MACs and parameters of ``model`` compressed by ``plan``, without computing low-rank factors.

    Pruning is applied for real to a copy (torch-pruning fast path, same architecture as NNI's speedup);
    each layer to decompose is then counted with lowrank's replacement formulas, which equal what
    ``count_flops`` / ``count_params`` report for the built replacement (tested in test_lowrank).
    """
    pruned = copy.deepcopy(model)
    masks = plan_masks(pruned, plan, dummy_input)
    if masks:
        pruned = prune_physically(pruned, dummy_input, masks)
    layer_flops = count_layer_flops(pruned, dummy_input)
    flops, params = count_flops(pruned, dummy_input), count_params(pruned)
    modules = dict(pruned.named_modules())
    for name, ranks in plan.ranks.items():
        module = modules[name]
        dense_macs, bias_adds = _split_bias(module, layer_flops[name])
        method = plan.methods[name]
        flops += round(dense_macs * flops_ratio(module, ranks, method)) - dense_macs
        params += replacement_params(module, ranks, method) - sum(p.numel() for p in module.parameters())
    return {'flops': int(flops), 'params': int(params)}


def _split_bias(module: nn.Module, flops: int) -> tuple[int, int]:
    """(weight MACs, bias adds) of a counted Conv2d/Linear, as torch-pruning's counter adds them."""
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        bias_adds = module.out_features if has_bias else 0
        return flops - bias_adds, bias_adds
    per_position = module.out_channels * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    positions = flops // (per_position + (module.out_channels if has_bias else 0))
    return positions * per_position, positions * module.out_channels if has_bias else 0
