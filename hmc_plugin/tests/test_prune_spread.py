"""``prune_spread``: no pruning group loses more than the budget's uniform prune ratio plus the spread, however cheap
the scan says thinning it is; the plan still meets its budget."""
from __future__ import annotations

import pytest
import torch

from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.planning.allocation import build_plan, uniform_prune_ratio
from hmc_plugin.planning.cost import CostModel
from hmc_plugin.sensitivity.table import SensitivityTable
from hmc_plugin.settings import HMCSettings
from hmc_plugin.tests.toy_models import Chain

LEVELS = [0.2, 0.4, 0.6, 0.8, 0.9]


@pytest.fixture
def setup():
    model = Chain().eval()
    dummy = torch.zeros(1, 3, 16, 16)
    groups = find_pruning_groups(model, dummy)
    cost = CostModel(model, dummy, groups)
    # the scan says blocks 1 and 2 are nearly free to thin, blocks 0 and 3 costly
    scale = {'blocks.0.0': 1.0, 'blocks.1.0': 0.01, 'blocks.2.0': 0.01, 'blocks.3.0': 1.0}
    table = SensitivityTable(levels=LEVELS, mode='proxy', baseline=0.0,
                             prune={group.name: [scale[group.name] * level for level in LEVELS] for group in groups},
                             groups={group.name: list(group.members) for group in groups})
    return table, cost


def _kept(cost, ratios, index=0):
    return sum(cost.layer_cost(name, ratios, {})[index] for name in cost.layers) / cost.full['flops' if index == 0
                                                                                             else 'params']


def test_uniform_prune_ratio_meets_the_budget_with_every_group_alike(setup):
    table, cost = setup
    ratio = uniform_prune_ratio(cost, table, 'flops', 0.3, {})
    # the smallest such ratio (channel counts are whole, so the kept fraction moves in steps)
    assert _kept(cost, dict.fromkeys(table.prune, ratio)) <= 0.3 < _kept(cost, dict.fromkeys(table.prune, ratio - 0.01))
    assert uniform_prune_ratio(cost, table, 'flops', 0.3, {'blocks.1.0': 0.2}) > ratio  # a capped group: more elsewhere
    assert uniform_prune_ratio(cost, table, 'flops', 1e-4, {}) == max(LEVELS)  # out of reach: the highest level


def test_prune_spread_caps_the_groups_the_scan_would_thin_most(setup):
    table, cost = setup
    free = build_plan(table, cost, mode='prune', target_flops=0.3)
    assert max(free.prune_ratios.values()) >= 0.85  # the scan's favourites thinned to the top level
    uniform = uniform_prune_ratio(cost, table, 'flops', 0.3, {})
    spread = build_plan(table, cost, mode='prune', target_flops=0.3, prune_spread=0.05)
    assert max(spread.prune_ratios.values()) <= uniform + 0.05 + 1e-9
    assert spread.predicted['flops'] <= 0.3 + 1e-9
    assert set(spread.prune_ratios) == set(table.prune)  # the budget is met by pruning every group, closer to alike
    with pytest.raises(HMCConfigError, match='prune_spread'):
        HMCSettings(prune_spread=1.5)
