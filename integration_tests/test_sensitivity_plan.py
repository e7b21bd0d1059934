"""Sensitivity scan -> grouping -> budget plan -> apply, on real models (HMC core)."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from hmc_plugin.app.models import build_model, resnet20, resnet56
from hmc_plugin.app.training import evaluate_accuracy
from hmc_plugin.apply import apply_plan
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.planning.grouping import group_layers
from hmc_plugin.planning.plan import CompressionPlan
from hmc_plugin.planning.targets import plan_for_target
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.sensitivity.table import SensitivityTable
from hmc_plugin.utils.counting import count_flops
from hmc_plugin.utils.fingerprint import model_fingerprint


def conv_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]


def proxy_scan(model, dummy_input, calibration, **kwargs):
    groups = find_pruning_groups(model, dummy_input)
    return scan_sensitivity(model, dummy_input, groups=groups, layers=conv_names(model), mode='proxy',
                            calibration_inputs=calibration, progress=False, **kwargs), groups


@pytest.fixture
def resnet20_table(trained_resnet20, dummy_input, calibration):
    return proxy_scan(trained_resnet20, dummy_input, calibration[0])


def test_scan_leaves_model_bit_identical_in_every_mode(trained_resnet20, dummy_input, calibration, loaders):
    model = trained_resnet20.train()  # train mode: BN statistics must not move either
    before = model_fingerprint(model)
    groups = find_pruning_groups(model, dummy_input)
    for mode in ('proxy', 'kl'):
        scan_sensitivity(model, dummy_input, groups=groups[:3], layers=conv_names(model)[:3], mode=mode,
                         calibration_inputs=calibration[0], progress=False, levels=(0.5,))
        assert not any(param.grad is not None for param in model.parameters())
    scan_sensitivity(model, dummy_input, groups=groups[:2], layers=conv_names(model)[:2], mode='evaluator',
                     eval_fn=lambda m: evaluate_accuracy(m, loaders[1]), progress=False, levels=(0.5,))
    assert model_fingerprint(model) == before
    assert model.training


def test_table_round_trips_through_json_and_draws_png(resnet20_table, tmp_path):
    table, _ = resnet20_table
    table.to_json(tmp_path / 'table.json')
    again = SensitivityTable.from_json(tmp_path / 'table.json')
    assert again == table
    assert table.is_complete() and table.evaluations == 4 * (len(table.prune) + len(table.decompose))
    table.plot(tmp_path / 'sensitivity.png')
    assert (tmp_path / 'sensitivity.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_interrupted_scan_resumes_from_cache_to_the_same_table(trained_resnet20, dummy_input, loaders, tmp_path):
    groups = find_pruning_groups(trained_resnet20, dummy_input)[:4]
    layers = conv_names(trained_resnet20)[:4]
    kwargs = dict(groups=groups, layers=layers, mode='evaluator', levels=(0.3, 0.7), progress=False)
    full = scan_sensitivity(trained_resnet20, dummy_input, eval_fn=lambda m: evaluate_accuracy(m, loaders[1]), **kwargs)

    calls = {'n': 0}

    def dying_eval(model):
        calls['n'] += 1
        if calls['n'] > 9:  # baseline + 8 evaluations, then the "process dies"
            raise KeyboardInterrupt
        return evaluate_accuracy(model, loaders[1])

    cache = tmp_path / 'scan.json'
    with pytest.raises(KeyboardInterrupt):
        scan_sensitivity(trained_resnet20, dummy_input, eval_fn=dying_eval, cache_path=cache, **kwargs)
    partial = json.loads(cache.read_text())
    assert 0 < partial['evaluations'] < full.evaluations

    resumed_calls = {'n': 0}

    def counting_eval(model):
        resumed_calls['n'] += 1
        return evaluate_accuracy(model, loaders[1])

    resumed = scan_sensitivity(trained_resnet20, dummy_input, eval_fn=counting_eval, cache_path=cache, **kwargs)
    assert resumed.prune == full.prune and resumed.decompose == full.decompose
    assert resumed_calls['n'] == 1 + full.evaluations - partial['evaluations']  # only the missing units re-run


def test_cache_from_other_weights_is_not_reused(trained_resnet20, dummy_input, calibration, tmp_path):
    cache = tmp_path / 'scan.json'
    groups = find_pruning_groups(trained_resnet20, dummy_input)[:2]
    kwargs = dict(groups=groups, layers=[], mode='proxy', calibration_inputs=calibration[0], progress=False,
                  cache_path=cache, levels=(0.5,))
    first = scan_sensitivity(trained_resnet20, dummy_input, **kwargs)
    other = resnet20(num_classes=10).eval()
    second = scan_sensitivity(other, dummy_input, **kwargs)
    assert second.settings['weights'] != first.settings['weights']
    assert second.prune != first.prune


def test_hmc_with_infinite_margin_gives_exactly_the_ahc_plan(resnet20_table, trained_resnet20, dummy_input):
    table, groups = resnet20_table
    ahc, _ = plan_for_target(table, trained_resnet20, dummy_input, groups, mode='ahc', target_flops=0.5)
    hmc, _ = plan_for_target(table, trained_resnet20, dummy_input, groups, mode='hmc', margin=float('inf'),
                             target_flops=0.5)
    assert hmc.layers == ahc.layers
    assert set(group_layers(table, [l.name for l in ahc.layers], 'hmc', float('inf')).values()) <= {'both'}


def test_modes_use_their_operators(resnet20_table, trained_resnet20, dummy_input):
    table, groups = resnet20_table
    used = {}
    for mode in ('prune', 'decompose', 'nahc'):
        plan, _ = plan_for_target(table, trained_resnet20, dummy_input, groups, mode=mode, target_flops=0.5)
        used[mode] = {group for group, count in plan.group_counts().items() if count and group != 'keep'}
    assert used['prune'] == {'prune'}
    assert used['decompose'] == {'decompose'}
    assert len(used['nahc']) >= 1


@pytest.mark.parametrize('target', [0.7, 0.5, 0.3])
def test_resnet56_plan_meets_flops_target_within_2_percent(target, dummy_input, calibration):
    torch.manual_seed(0)
    model = resnet56(num_classes=10).eval()
    table, groups = proxy_scan(model, dummy_input, calibration[0][:8])
    for mode in ('nahc', 'ahc'):
        plan, measured = plan_for_target(table, model, dummy_input, groups, mode=mode, target_flops=target)
        compressed = apply_plan(copy.deepcopy(model), plan, dummy_input, speedup='torch_pruning')
        kept = count_flops(compressed, dummy_input) / count_flops(model, dummy_input)
        assert abs(kept - target) <= 0.02, (mode, kept)
        assert kept == pytest.approx(measured, abs=1e-9)  # measure_plan is exact


def random_table(model, dummy_input, groups, seed=0):
    """A SensitivityTable with seeded random monotone curves: tests the budget arithmetic on a real architecture."""
    rng = random.Random(seed)
    levels = [0.2, 0.4, 0.6, 0.8]

    def curve():
        steps = [rng.random() for _ in levels]
        return [sum(steps[:i + 1]) for i in range(len(levels))]

    return SensitivityTable(levels=levels, mode='proxy', baseline=0.0,
                            prune={group.name: curve() for group in groups},
                            decompose={name: curve() for name in conv_names(model)},
                            groups={group.name: list(group.members) for group in groups})


@pytest.mark.parametrize('target', [0.7, 0.5, 0.3])
def test_resnet50_plan_meets_flops_target_within_2_percent(target):
    pytest.importorskip('torchvision')
    model = build_model('torchvision:resnet50', num_classes=10).eval()
    dummy_input = torch.zeros(1, 3, 64, 64)
    groups = find_pruning_groups(model, dummy_input)
    table = random_table(model, dummy_input, groups)
    plan, measured = plan_for_target(table, model, dummy_input, groups, mode='nahc', target_flops=target)
    assert abs(measured - target) <= 0.02
    assert plan.group_counts()['prune'] + plan.group_counts()['both'] > 0


def test_plan_applied_to_fresh_copy_gives_same_model(resnet20_table, trained_resnet20, trained_resnet20_state, dummy_input):
    table, groups = resnet20_table
    plan, _ = plan_for_target(table, trained_resnet20, dummy_input, groups, mode='ahc', target_flops=0.5)
    plan = CompressionPlan.from_json(plan.to_json())  # through JSON, as a user would keep it
    first = apply_plan(copy.deepcopy(trained_resnet20), plan, dummy_input)
    fresh = resnet20(num_classes=10)
    fresh.load_state_dict(trained_resnet20_state)
    second = apply_plan(fresh.eval(), plan, dummy_input)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(first.eval()(x), second.eval()(x))
    assert [tuple(p.shape) for p in first.parameters()] == [tuple(p.shape) for p in second.parameters()]


def test_unreachable_target_is_a_clear_error(resnet20_table, trained_resnet20, dummy_input):
    from hmc_plugin.errors import HMCConfigError
    table, groups = resnet20_table
    with pytest.raises(HMCConfigError, match='target_flops=0.01'):
        plan_for_target(table, trained_resnet20, dummy_input, groups, mode='prune', target_flops=0.01)
