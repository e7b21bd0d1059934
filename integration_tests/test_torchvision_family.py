"""Every torchvision ResNet we target goes through the whole pipeline: groups, masks, NNI speedup,
low-rank replacement and a budget plan (random weights, 64x64 inputs to keep it quick)."""
from __future__ import annotations

import copy

import pytest
import torch

from hmc_plugin.app.models import TORCHVISION_MODELS, build_model
from hmc_plugin.apply import apply_plan
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.planning.targets import plan_for_target
from hmc_plugin.sensitivity.table import SensitivityTable
from hmc_plugin.utils.counting import count_flops

pytest.importorskip('torchvision')


def depth_table(model, groups):
    """Sensitivities rising with depth (a plausible, deterministic shape) for every group and conv."""
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    order = {name: index / len(names) for index, name in enumerate(names)}
    levels = [0.2, 0.4, 0.6, 0.8]
    return SensitivityTable(
        levels=levels, mode='proxy', baseline=0.0,
        prune={g.name: [level * (1 + order[g.name]) for level in levels] for g in groups},
        decompose={name: [level * (1.5 - order[name]) for level in levels] for name in names},
        groups={g.name: list(g.members) for g in groups})


@pytest.mark.parametrize('name', TORCHVISION_MODELS)
def test_torchvision_resnet_compresses_to_target_with_nni_speedup(name):
    torch.manual_seed(0)
    model = build_model(f'torchvision:{name}', num_classes=10).eval()
    dummy_input = torch.zeros(1, 3, 64, 64)
    groups = find_pruning_groups(model, dummy_input)
    assert all('fc' not in group.members for group in groups)  # the head's outputs are never pruned
    plan, measured = plan_for_target(depth_table(model, groups), model, dummy_input, groups, mode='nahc',
                                     target_flops=0.6)
    assert {layer.group for layer in plan.layers} & {'prune', 'decompose', 'both'}
    compressed = apply_plan(copy.deepcopy(model), plan, dummy_input, speedup='nni')
    assert abs(count_flops(compressed, dummy_input) / count_flops(model, dummy_input) - 0.6) <= 0.02
    assert compressed(torch.randn(2, 3, 64, 64)).shape == (2, 10)
