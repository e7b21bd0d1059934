"""Latency budgets: a layer is pruned and decomposed only when its sensitivity puts it in 'both', and a hybrid plan
keeps at least the FLOPs and parameters of prune-only's at the same budget."""
from __future__ import annotations

import math

import torch

from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.planning.allocation import _sensitivity_groups, build_plan
from hmc_plugin.planning import targets
from hmc_plugin.planning.cost import CostModel
from hmc_plugin.planning.plan import CompressionPlan, LayerPlan
from hmc_plugin.sensitivity.table import SensitivityTable
from hmc_plugin.tests.toy_models import Chain

LEVELS = [0.2, 0.4, 0.6, 0.8]


class SlowDecompositions:
    """A latency model where time follows the FLOPs of pruning, but a decomposition saves only 5 % of a layer's time
    at any level (small convs on a CPU): the ``planning.latency.LatencyModel`` interface the allocation uses."""

    def __init__(self, cost: CostModel):
        self.cost = cost

    def decomposition_factor(self, name, level, in_channels=None, out_channels=None):
        return 0.95 if level > 0 and self.cost.layers[name].kind == 'conv' and self.cost.layers[name].in_channels > 3 \
            else 1.0

    def layer_ms(self, name, prune_ratios, dec_levels, round_to=1):
        flops = self.cost.layer_cost(name, prune_ratios, {}, round_to)[0]
        return 1e-6 * flops * self.decomposition_factor(name, dec_levels.get(name, 0.0))

    def predict_ms(self, prune_ratios, dec_levels, round_to=1):
        return sum(self.layer_ms(name, prune_ratios, dec_levels, round_to) for name in self.cost.layers)


def _setup():
    model = Chain().eval()
    dummy = torch.zeros(1, 3, 16, 16)
    groups = find_pruning_groups(model, dummy)
    cost = CostModel(model, dummy, groups)
    convs = [f'blocks.{i}.0' for i in range(4)]
    # decomposition looks far cheaper than pruning for blocks 1 and 2 (grouped 'decompose'), block 3 is close
    # ('both'), block 0 prunes cheaply ('prune')
    prune = {'blocks.0.0': 0.1, 'blocks.1.0': 1.0, 'blocks.2.0': 1.0, 'blocks.3.0': 0.30}
    decompose = {'blocks.0.0': 1.0, 'blocks.1.0': 0.05, 'blocks.2.0': 0.05, 'blocks.3.0': 0.28}
    by_group = {group.name: group for group in groups}
    table = SensitivityTable(levels=LEVELS, mode='proxy', baseline=0.0,
                             prune={name: [prune[name] * level for level in LEVELS] for name in by_group},
                             decompose={name: [decompose[name] * level for level in LEVELS] for name in convs[1:]},
                             groups={name: list(group.members) for name, group in by_group.items()})
    return table, cost, SlowDecompositions(cost)


def test_the_latency_reserve_prunes_decompose_layers_instead_of_also_pruning_them(caplog):
    table, cost, latency = _setup()
    candidates = [name for name in cost.layers if name in table.decompose or name in table.prune]
    groups = _sensitivity_groups(table, cost, candidates, 'nahc', 0.5, 4.0, 'latency', latency)
    assert {name: groups[name] for name in ('blocks.1.0', 'blocks.2.0')} == {'blocks.1.0': 'decompose',
                                                                              'blocks.2.0': 'decompose'}
    plan = build_plan(table, cost, mode='nahc', target_latency=0.25, latency=latency)
    assert 'also pruning' in caplog.text  # the reserve was needed: decompositions save 5 % at most
    assert plan.predicted['latency'] <= 0.25 + 1e-9
    for layer in plan.layers:
        if layer.prune_ratio > 0 and layer.ranks is not None:
            assert groups[layer.name] == 'both', (layer, groups[layer.name])
    # the layers grouped for decomposition were pruned instead
    pruned = {layer.name for layer in plan.layers if layer.prune_ratio > 0}
    assert {'blocks.1.0', 'blocks.2.0'} & pruned


def _plan(mode, flops, params, decomposed):
    layers = [LayerPlan('conv', 'both' if decomposed else 'prune', 0.5, 'conv', 'tucker2' if decomposed else None,
                        (4, 4) if decomposed else None)]
    plan = CompressionPlan(layers, mode, {'latency': 0.5})
    plan.measured = {'latency': 0.5, 'flops': flops, 'params': params}
    return plan


def test_a_hybrid_latency_plan_keeping_less_than_prune_only_gives_way_to_it(monkeypatch, caplog):
    calls = []

    def prune_only_plan(table, model, dummy_input, groups, **kwargs):
        calls.append(kwargs)
        return _plan('nahc', 0.36, 0.40, decomposed=False), {'measured': 0.5}

    monkeypatch.setattr(targets, 'plan_for_latency', prune_only_plan)
    thin = _plan('nahc', 0.05, 0.02, decomposed=True)
    chosen, _ = targets._at_least_prune_only(thin, {}, None, None, None, [], {'target_latency': 0.5, 'mode': 'nahc'})
    assert chosen.measured['flops'] == 0.36 and not chosen.ranks
    assert calls[0]['margin'] == math.inf and calls[0]['decompose_weight'] == math.inf
    assert calls[0]['at_least_prune_only'] is False
    assert "using prune-only's plan" in caplog.text
    wide = _plan('nahc', 0.40, 0.45, decomposed=True)
    assert targets._at_least_prune_only(wide, {}, None, None, None, [], {'target_latency': 0.5})[0] is wide
    fewer_params = _plan('nahc', 0.40, 0.30, decomposed=True)  # more FLOPs but fewer parameters: not kept
    assert targets._at_least_prune_only(fewer_params, {}, None, None, None, [], {})[0] is not fewer_params
