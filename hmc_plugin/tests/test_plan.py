"""Grouping rules and the plain-data plan, on hand-made sensitivity tables."""
import math

import pytest

from hmc_plugin.errors import HMCConfigError
from hmc_plugin.planning.grouping import group_layers
from hmc_plugin.planning.plan import CompressionPlan, LayerPlan
from hmc_plugin.sensitivity.table import SensitivityTable


def table(prune, decompose):
    """One group per layer, named like the layer; drops given as the mean at every level."""
    return SensitivityTable(levels=[0.5], mode='proxy', baseline=0.0,
                            prune={name: [value] for name, value in prune.items()},
                            decompose={name: [value] for name, value in decompose.items()},
                            groups={name: [name] for name in prune})


SENSITIVITIES = table(prune={'a': 0.1, 'b': 1.0, 'c': 0.50, 'd': 9.0},
                      decompose={'a': 1.0, 'b': 0.1, 'c': 0.55, 'd': 8.0})
LAYERS = ['a', 'b', 'c', 'd']


def test_nahc_groups_by_the_cheaper_operator_both_when_close_keep_when_both_hurt():
    # median of all drops = 0.775; margin 0.1 -> "close" means within 0.0775; keep above (4 + 0.1) * 0.775
    groups = group_layers(SENSITIVITIES, LAYERS, 'hmc', margin=0.1)
    assert groups == {'a': 'prune', 'b': 'decompose', 'c': 'both', 'd': 'keep'}


def test_infinite_margin_is_ahc_and_single_modes_allow_one_operator():
    assert set(group_layers(SENSITIVITIES, LAYERS, 'hmc', margin=math.inf).values()) == {'both'}
    assert group_layers(SENSITIVITIES, LAYERS, 'ahc') == group_layers(SENSITIVITIES, LAYERS, 'hmc', margin=math.inf)
    assert set(group_layers(SENSITIVITIES, LAYERS, 'prune').values()) == {'prune'}
    assert set(group_layers(SENSITIVITIES, LAYERS, 'decompose').values()) == {'decompose'}


def test_zero_margin_never_uses_both():
    assert 'both' not in group_layers(SENSITIVITIES, LAYERS, 'hmc', margin=0.0).values()


def test_bad_mode_or_margin_is_named():
    with pytest.raises(HMCConfigError, match="mode='fast'"):
        group_layers(SENSITIVITIES, LAYERS, 'fast')
    with pytest.raises(HMCConfigError, match='margin=-1'):
        group_layers(SENSITIVITIES, LAYERS, 'hmc', margin=-1)


def test_plan_round_trips_through_json_with_infinite_margin():
    plan = CompressionPlan(
        layers=[LayerPlan('layer1.0.conv1', 'both', 0.25, 'layer1.0.conv1', 'tucker2', (8, 12)),
                LayerPlan('layer1.0.conv2', 'keep', 0.0, 'conv1')],
        mode='hmc', target={'flops': 0.5}, margin=math.inf, predicted={'flops': 0.5, 'params': 0.4})
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan
    assert again.prune_ratios == {'layer1.0.conv1': 0.25}
    assert again.ranks == {'layer1.0.conv1': (8, 12)}
    text = plan.table()
    assert 'layer1.0.conv1' in text and '8x12' in text and 'both: 1' in text


def test_decompose_weight_counts_decomposition_drops_that_many_times():
    from hmc_plugin.planning.grouping import weigh_decomposition

    weighed = weigh_decomposition(SENSITIVITIES, 20)
    assert weighed.decompose == {name: [value * 20] for name, [value] in SENSITIVITIES.decompose.items()}
    assert weighed.prune == SENSITIVITIES.prune and SENSITIVITIES.decompose['b'] == [0.1]  # the table is not changed
    assert weigh_decomposition(SENSITIVITIES, 1) is SENSITIVITIES
    # 'b' decomposed cheaply as scanned; at 20x its decomposition drop pruning is the cheaper operator
    assert group_layers(SENSITIVITIES, LAYERS, 'hmc', margin=0.0)['b'] == 'decompose'
    assert group_layers(weighed, LAYERS, 'hmc', margin=0.0)['b'] == 'prune'
    for bad in (0, -1.0, math.nan, True, '2'):
        with pytest.raises(HMCConfigError, match='decompose_weight='):
            weigh_decomposition(SENSITIVITIES, bad)


def test_infinite_decompose_weight_never_decomposes_and_with_infinite_margin_is_prune_only():
    from hmc_plugin.planning.grouping import weigh_decomposition

    never = weigh_decomposition(SENSITIVITIES, math.inf)
    assert never.decompose == {} and SENSITIVITIES.decompose['b'] == [0.1]
    assert group_layers(never, LAYERS, 'hmc', margin=math.inf) == group_layers(SENSITIVITIES, LAYERS, 'prune')
    # a finite margin still keeps the layers too sensitive to pruning ('d': 9.0, far above the median)
    assert group_layers(never, LAYERS, 'hmc', margin=0.0) == {'a': 'prune', 'b': 'prune', 'c': 'prune', 'd': 'keep'}


def test_plan_keeps_its_decompose_weight_and_old_plans_load_with_weight_one():
    plan = CompressionPlan(layers=[LayerPlan('conv1', 'prune', 0.5, 'conv1')], mode='hmc', target={'latency': 0.5},
                           margin=0.5, decompose_weight=10.0)
    assert CompressionPlan.from_json(plan.to_json()).decompose_weight == 10.0
    never = CompressionPlan(layers=plan.layers, mode='hmc', target={'latency': 0.5}, decompose_weight=math.inf)
    assert '"decompose_weight": "inf"' in never.to_json()  # strict JSON, as the margin
    assert CompressionPlan.from_json(never.to_json()).decompose_weight == math.inf
    old = plan.to_dict()
    del old['decompose_weight']  # a plan.json written before the weight existed
    assert CompressionPlan.from_dict(old).decompose_weight == 1.0


def test_round_to_rounds_the_planned_ranks_up_to_multiples_and_apply_builds_them():
    """``round_to`` shapes ranks as it shapes channels: multiples of 8 (or the full dimension), in the plan and in
    the applied model."""
    import torch

    from hmc_plugin.app.models import resnet20
    from hmc_plugin.apply import apply_plan
    from hmc_plugin.engines.lowrank import round_ranks
    from hmc_plugin.engines.pruning import find_pruning_groups
    from hmc_plugin.planning.allocation import build_plan
    from hmc_plugin.planning.cost import CostModel

    torch.manual_seed(0)
    model, dummy = resnet20().eval(), torch.zeros(1, 3, 32, 32)
    assert round_ranks(model.layer1[0].conv1, (5, 11), 'tucker2', 8) == (8, 16)
    assert round_ranks(model.layer1[0].conv1, (13, 3), 'tucker2', 8) == (16, 8)  # capped at the 16 channels
    groups = find_pruning_groups(model, dummy)
    convs = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)][1:]
    levels = [0.2, 0.4, 0.6, 0.8]
    table = SensitivityTable(levels=levels, mode='proxy', baseline=0.0, prune={},
                             decompose={name: [0.1 * level for level in levels] for name in convs}, groups={})
    plan = build_plan(table, CostModel(model, dummy, groups), mode='decompose', target_flops=0.6, round_to=8)
    assert plan.ranks and plan.round_to == 8
    dims = {name: (module.out_channels, module.in_channels) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Conv2d)}
    for name, ranks in plan.ranks.items():
        assert all(rank % 8 == 0 or rank == dim for rank, dim in zip(ranks, dims[name])), (name, ranks)
    compressed = apply_plan(model, plan, dummy, speedup='torch_pruning')
    for name, ranks in plan.ranks.items():
        first = compressed.get_submodule(name)[0]  # Tucker-2: the input 1x1 conv has r_in outputs
        assert first.out_channels == ranks[1], (name, first, ranks)
