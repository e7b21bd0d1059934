"""Property-based tests (hypothesis): rank specs, plan and table JSON round-trips, mask and ratio arithmetic."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hmc_plugin.engines.lowrank import resolve_ranks
from hmc_plugin.engines.pruning import _pruned_channels, channel_masks, kept_channels
from hmc_plugin.errors import HMCConfigError, LayerCompressionError
from hmc_plugin.planning.allocation import check_table
from hmc_plugin.planning.plan import LAYER_GROUPS, CompressionPlan, LayerPlan
from hmc_plugin.sensitivity.table import SensitivityTable

QUICK = settings(max_examples=40, deadline=None)
SLOW = settings(max_examples=12, deadline=None)  # examples that build a torch-pruning graph

channels = st.integers(1, 24)
fractions = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)


def layer(kind: str, out_channels: int, in_channels: int, device: str = 'cpu') -> nn.Module:
    torch.manual_seed(0)
    if kind == 'linear':
        return nn.Linear(in_channels, out_channels, device=device)
    return nn.Conv2d(in_channels, out_channels, 1 if kind == 'conv1x1' else 3, device=device)


def dims(module: nn.Module, method: str) -> tuple[int, ...]:
    out_channels, in_channels = module.weight.shape[:2]
    if method == 'tucker2':
        return out_channels, in_channels
    if method == 'svd':
        return (min(out_channels, in_channels),)
    return (math.prod(module.weight.shape) // max(module.weight.shape),)  # cp


kinds_and_methods = st.sampled_from([('conv3x3', 'tucker2'), ('conv3x3', 'cp'), ('conv1x1', 'svd'), ('linear', 'svd')])


# ----------------------------------------------------------------------------------------------- rank specs

@QUICK
@given(kind_method=kinds_and_methods, out_channels=channels, in_channels=channels, data=st.data())
def test_every_valid_rank_spec_resolves_within_the_tensor(kind_method, out_channels, in_channels, data):
    kind, method = kind_method
    module = layer(kind, out_channels, in_channels)
    modes = len(dims(module, method))
    spec = data.draw(st.one_of(
        st.integers(1, 64),
        st.tuples(*[st.integers(1, 64)] * modes),
        fractions,
        fractions.map(lambda f: f'flops:{f:.4g}'),
        fractions.map(lambda f: f'energy:{f:.4g}'),
        st.just('vbmf'),
    ), label='spec')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # ranks above a dimension are clipped with a warning
        ranks = resolve_ranks(module, spec, method=method, layer_name='layer')
    assert len(ranks) == modes
    assert all(isinstance(rank, int) and 1 <= rank <= bound for rank, bound in zip(ranks, dims(module, method)))


@QUICK
@given(kind_method=kinds_and_methods, out_channels=st.integers(1, 64), in_channels=st.integers(1, 64),
       low=fractions, high=fractions)
def test_flops_rank_rule_is_monotone_in_the_fraction(kind_method, out_channels, in_channels, low, high):
    kind, method = kind_method
    low, high = sorted((low, high))
    module = layer(kind, out_channels, in_channels, device='meta')  # the rule needs shapes only
    ranks_low = resolve_ranks(module, f'flops:{low:.6g}', method=method)
    ranks_high = resolve_ranks(module, f'flops:{high:.6g}', method=method)
    assert all(a <= b for a, b in zip(ranks_low, ranks_high)), (ranks_low, ranks_high)


@QUICK
@given(spec=st.one_of(st.integers(max_value=0), st.floats(min_value=1.0, exclude_min=True),
                      st.floats(max_value=0.0), st.just(float('nan')), st.booleans(), st.none(),
                      st.text(max_size=8).filter(lambda text: text != 'vbmf'),
                      st.floats(min_value=1.01, max_value=9).map(lambda f: f'energy:{f}'),
                      st.tuples(st.integers(1, 4), st.integers(max_value=0))))
def test_every_invalid_rank_spec_is_refused_naming_the_layer(spec):
    with pytest.raises(LayerCompressionError) as info:
        resolve_ranks(nn.Conv2d(8, 16, 3), spec, layer_name='block.conv')
    assert 'block.conv' in str(info.value) and info.value.layer_name == 'block.conv'


# ----------------------------------------------------------------------------------------------- JSON round-trips

names = st.text(alphabet='abcdefghijklmnopqrstuvwxyz0123456789._', min_size=1, max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
layer_plans = st.builds(
    LayerPlan, name=names, group=st.sampled_from(LAYER_GROUPS),
    prune_ratio=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    pruning_group=st.one_of(st.none(), names), method=st.one_of(st.none(), st.sampled_from(['tucker2', 'svd', 'cp'])),
    ranks=st.one_of(st.none(), st.lists(st.integers(1, 4096), min_size=1, max_size=2).map(tuple)))


@QUICK
@given(layers=st.lists(layer_plans, max_size=8), mode=st.sampled_from(['prune', 'decompose', 'ahc', 'nahc', 'hmc']),
       target=st.dictionaries(st.sampled_from(['flops', 'params']), fractions, min_size=1, max_size=1),
       margin=st.one_of(st.none(), st.just(math.inf), st.floats(min_value=0, max_value=100)),
       round_to=st.integers(1, 64), predicted=st.dictionaries(st.sampled_from(['flops', 'params']), finite),
       decompose_weight=st.one_of(st.just(math.inf), st.floats(min_value=1e-3, max_value=1e3)))
def test_plan_round_trips_through_json(layers, mode, target, margin, round_to, predicted, decompose_weight):
    plan = CompressionPlan(layers, mode, target, importance='l2', round_to=round_to, margin=margin,
                           decompose_weight=decompose_weight, predicted=predicted, measured=dict(predicted))
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan
    assert again.prune_ratios == plan.prune_ratios and again.ranks == plan.ranks
    assert again.to_json() == plan.to_json()


@QUICK
@given(levels=st.lists(st.floats(min_value=0.01, max_value=0.99), min_size=1, max_size=5, unique=True).map(sorted),
       data=st.data())
def test_sensitivity_table_round_trips_through_json(levels, data):
    drops = st.lists(finite, min_size=len(levels), max_size=len(levels))
    table = SensitivityTable(levels=levels, mode='evaluator', baseline=data.draw(finite, label='baseline'),
                             prune=data.draw(st.dictionaries(names, drops, max_size=4), label='prune'),
                             decompose=data.draw(st.dictionaries(names, drops, max_size=4), label='decompose'),
                             evaluations=data.draw(st.integers(0, 10 ** 6), label='evaluations'))
    assert SensitivityTable.from_json(table.to_json()) == table
    check_table(table)  # finite drops, one per level: accepted


@QUICK
@given(levels=st.just([0.25, 0.5]), bad=st.sampled_from([math.nan, math.inf, -math.inf, 'x', None, True]),
       position=st.integers(0, 1), operator=st.sampled_from(['prune', 'decompose']))
def test_a_non_finite_drop_anywhere_is_refused_naming_the_unit(levels, bad, position, operator):
    drops = [0.1, 0.2]
    drops[position] = bad
    table = SensitivityTable(levels=levels, mode='proxy', baseline=0.0, **{operator: {'layer2.conv': drops}})
    with pytest.raises(HMCConfigError, match=rf"{operator} 'layer2.conv' at level {levels[position]}"):
        check_table(table)


# ----------------------------------------------------------------------------------------------- masks and ratios

ratios = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@QUICK
@given(count=st.integers(1, 1024), ratio=ratios, other=ratios, round_to=st.integers(1, 32))
def test_kept_channels_is_at_least_one_a_multiple_of_round_to_and_monotone(count, ratio, other, round_to):
    kept = kept_channels(count, ratio, round_to)
    assert 1 <= kept <= count  # never pruned to zero channels
    if round_to <= count:
        assert kept % round_to == 0
    low, high = sorted((ratio, other))
    assert kept_channels(count, low, round_to) >= kept_channels(count, high, round_to)
    assert kept_channels(count, 0.0, 1) == count


@QUICK
@given(slices=st.integers(1, 4), slice_size=st.integers(1, 32), ratio=ratios, round_to=st.integers(1, 8),
       seed=st.integers(0, 2 ** 16))
def test_pruned_channel_indices_are_distinct_and_the_same_in_every_slice(slices, slice_size, ratio, round_to, seed):
    scores = torch.rand(slices * slice_size, generator=torch.Generator().manual_seed(seed))
    pruned = _pruned_channels(scores, ratio, round_to, slices).tolist()
    per_slice = slice_size - kept_channels(slice_size, ratio, round_to)
    assert len(pruned) == len(set(pruned)) == slices * per_slice
    assert all(0 <= index < slices * slice_size for index in pruned)
    offsets = [sorted(index - start * slice_size for index in pruned if index // slice_size == start)
               for start in range(slices)]
    assert all(offset == offsets[0] for offset in offsets)


class _Pair(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


@SLOW
@given(width=st.integers(1, 12), ratio=ratios, round_to=st.integers(1, 4))
def test_channel_masks_zero_exactly_the_pruned_channels_of_the_whole_group(width, ratio, round_to):
    torch.manual_seed(width)
    model = _Pair(width).eval()
    masks = channel_masks(model, torch.zeros(1, 3, 4, 4), {'conv1': ratio}, round_to=round_to)
    kept_rows = masks['conv1']['weight'].flatten(1).amax(1)
    assert int(kept_rows.sum()) == kept_channels(width, ratio, round_to) >= 1
    for key in ('bias',):
        assert torch.equal(masks['conv1'][key], kept_rows)
    assert torch.equal(masks['bn1']['weight'], kept_rows) and torch.equal(masks['bn1']['bias'], kept_rows)
    assert set(masks['conv1']['weight'].unique().tolist()) <= {0.0, 1.0}
    assert 'conv2' not in masks  # the head's outputs are never masked
