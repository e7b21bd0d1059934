"""Parameters and FLOPs of any model, the one place every report counts from (latency: ``utils.timing``).

FLOPs are multiply-accumulates (MACs) counted exactly as torch-pruning's
``tp.utils.count_ops_and_params`` counts them: conv and linear MACs plus bias adds, and one op
per element for BN (two with affine), ReLU and pooling. 1 MAC = 1 FLOP in every figure we print.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn

__all__ = ['as_input_tuple', 'forward_with_hooks', 'count_params', 'count_flops', 'count_layer_flops']


def as_input_tuple(example_inputs: Any) -> tuple:
    """Normalise a dummy input (tensor, tuple or list) to the tuple a forward call takes."""
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


@torch.no_grad()
def forward_with_hooks(model: nn.Module, example_inputs: Any, hooks: dict[nn.Module, Callable]) -> None:
    """One eval-mode forward pass with ``module.register_forward_hook(hook)`` for each pair; hooks removed and
    the train/eval mode restored afterwards (to record per-layer shapes)."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        model(*as_input_tuple(example_inputs))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """MACs of one forward pass on ``example_inputs`` (batch included: pass batch 1 for per-image)."""
    flops, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return int(flops)


def count_layer_flops(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """MACs per named module (leaf modules only) for one forward pass on ``example_inputs``."""
    _, _, layer_flops, _ = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    names = {module: name for name, module in model.named_modules()}
    return {names[module]: int(flops) for module, flops in layer_flops.items()
            if flops is not None and module in names and not list(module.children())}
