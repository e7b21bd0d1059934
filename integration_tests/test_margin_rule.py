"""HMC's margin rule (planning.margin through app.workflow.choose_margin) and the operators' exchange rate (decompose_weight), on digits."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hmc_plugin import HMCCompressor
from hmc_plugin.app.workflow import RunSettings, choose_margin, one_standard_error_choice
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.planning.targets import plan_for_target
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.utils.fingerprint import model_fingerprint


@pytest.fixture
def scanned(trained_resnet20, dummy_input, calibration):
    groups = find_pruning_groups(trained_resnet20, dummy_input)
    convs = [name for name, module in trained_resnet20.named_modules() if isinstance(module, torch.nn.Conv2d)]
    table = scan_sensitivity(trained_resnet20, dummy_input, groups=groups, layers=convs, mode='proxy',
                             calibration_inputs=calibration[0], progress=False)
    return trained_resnet20, dummy_input, groups, table


DATA_FREE = {'bn_batches': 0, 'data_aware': False, 'reconstruct': False}

def test_a_higher_decompose_weight_decomposes_less_at_the_same_budget(scanned):
    model, dummy, groups, table = scanned
    as_scanned, _ = plan_for_target(table, model, dummy, groups, mode='ahc', target_flops=0.5)
    weighed, kept = plan_for_target(table, model, dummy, groups, mode='ahc', target_flops=0.5, decompose_weight=100)
    assert as_scanned.decompose_weight == 1.0 and weighed.decompose_weight == 100.0
    assert len(weighed.ranks) < len(as_scanned.ranks)
    assert sum(weighed.prune_ratios.values()) > sum(as_scanned.prune_ratios.values())
    assert kept == pytest.approx(0.5, abs=0.02)


def test_decompose_weight_is_a_config_key(scanned):
    model, dummy, _, table = scanned
    before = model_fingerprint(model)
    compressor = HMCCompressor(model, [{'op_types': ['Conv2d'], 'mode': 'ahc', 'target_flops': 0.5, 'decompose_weight': 100,
                                        'speedup': 'torch_pruning'}], dummy_input=dummy, sensitivity_table=table,
                               progress=False)
    compressor.compress()
    assert compressor.plan.decompose_weight == 100.0
    assert model_fingerprint(model) == before
    never = HMCCompressor(model, [{'op_types': ['Conv2d'], 'mode': 'ahc', 'target_flops': 0.5, 'decompose_weight': 'inf',
                                   'speedup': 'torch_pruning'}], dummy_input=dummy, sensitivity_table=table,
                          progress=False)
    never.compress()
    assert never.plan.decompose_weight == math.inf and never.plan.ranks == {}
    assert model_fingerprint(model) == before
    with pytest.raises(HMCConfigError, match='decompose_weight=0'):
        HMCCompressor(model, [{'op_types': ['Conv2d'], 'target_flops': 0.5, 'decompose_weight': 0}], dummy_input=dummy,
                      sensitivity_table=table)


def test_margin_rule_with_probe_fine_tunes_picks_the_closest_recovered_model(scanned, digits):
    model, dummy, groups, table = scanned
    before = model_fingerprint(model)
    # data-free candidates, far from the original, so that the probes' recovery shows (after the data-aware steps
    # the candidates start within a few hundredths of a nat and 8 probe steps at lr 0.01 move them away)
    settings = RunSettings(model='resnet20', target_flops=0.5, calibration_size=32, finetune_lr=0.01, **DATA_FREE)
    candidates, weights = (0.5, math.inf), (1.0, math.inf)
    zero_shot = choose_margin(model, digits, settings, table, candidates=candidates, decompose_weights=weights,
                              held_out=128)
    margin, plan, trials = choose_margin(model, digits, settings, table, candidates=candidates,
                                         decompose_weights=weights, probe_steps=8, held_out=128)
    assert model_fingerprint(model) == before
    assert [(t['margin'], t['decompose_weight']) for t in trials] == [(m, w) for w in weights for m in candidates]
    # one-standard-error rule (its order is pinned by test_probe_ties_fall_back_to_prune_only): the choice is within
    # one standard error of the lowest KL, and no candidate that is decomposes fewer layers
    lowest = min(t['kl'] for t in trials)
    chosen = next(t for t in trials if (t['margin'], t['decompose_weight']) == (margin, plan.decompose_weight))
    assert chosen['kl'] - lowest <= chosen['kl_se']
    assert all(t['decomposed'] >= chosen['decomposed'] for t in trials if t['kl'] - lowest <= t['kl_se'])
    assert chosen['decomposed'] == len(plan.ranks)
    # tau inf with an infinite weight is prune-only's plan: the rule can always fall back to pruning alone
    prune_only, _ = plan_for_target(table, model, dummy, groups, mode='prune', target_flops=0.5)
    fallback = next(t for t in trials if (t['margin'], t['decompose_weight']) == (math.inf, math.inf))
    assert fallback['decomposed'] == 0 and fallback['params_kept'] == pytest.approx(prune_only.measured['params'])
    assert all(t['probe_steps'] == 8 and t['flops_kept'] == pytest.approx(0.5, abs=0.02) for t in trials)
    assert all(0 < t['params_kept'] < 1 and t['kl_se'] >= 0 for t in trials)
    # zero-shot, the lowest KL wins outright
    assert zero_shot[0] == min(zero_shot[2], key=lambda t: (t['kl'], t['margin'], t['decompose_weight']))['margin']
    # the probes fine-tune: the candidates end closer to the original than they start (about 1.3 nats in all
    # over the four; single candidates gain as little as 0.1)
    assert sum(probed['kl'] for probed in trials) < sum(shot['kl'] for shot in zero_shot[2]) - 0.3
    # under a parameter budget it is the FLOPs kept
    settings_params = RunSettings(model='resnet20', target_flops=None, target_params=0.5, calibration_size=32,
                                  finetune_lr=0.01, **DATA_FREE)
    margin, plan, trials = choose_margin(model, digits, settings_params, table, candidates=candidates,
                                         decompose_weights=weights, probe_steps=8, held_out=128)
    lowest = min(t['kl'] for t in trials)
    chosen = next(t for t in trials if (t['margin'], t['decompose_weight']) == (margin, plan.decompose_weight))
    assert chosen['kl'] - lowest <= chosen['kl_se']
    assert all(t['params_kept'] == pytest.approx(0.5, abs=0.02) for t in trials)
    with pytest.raises(HMCConfigError, match='probe_steps=-1'):
        choose_margin(model, digits, settings, table, probe_steps=-1)


def _trial(margin, weight, kl, kl_se, decomposed, flops_kept):
    return {'margin': margin, 'decompose_weight': weight, 'kl': kl, 'kl_se': kl_se, 'decomposed': decomposed,
            'flops_kept': flops_kept}


def test_probe_ties_fall_back_to_prune_only():
    # tau 0 decomposing 3 layers probes lowest; a pruning-only grouping (tau 0.5, w inf) and prune-only's plan are
    # within one standard error of it. The fewest decomposed layers win, then prune-only's plan, although the
    # other keeps more FLOPs: HMC departs from pruning alone only for a plan that recovers measurably closer.
    hybrid, grouped, prune_only = (_trial(0.0, 1.0, 0.10, 0.0, 3, 0.30), _trial(0.5, math.inf, 0.12, 0.03, 0, 0.45),
                                   _trial(math.inf, math.inf, 0.13, 0.04, 0, 0.40))
    assert one_standard_error_choice([hybrid, grouped, prune_only], 'flops_kept') is prune_only
    # prune-only's plan measurably further from the original: the most FLOPs of the simplest tied
    farther = _trial(math.inf, math.inf, 0.20, 0.04, 0, 0.40)
    assert one_standard_error_choice([hybrid, grouped, farther], 'flops_kept') is grouped
    # a hybrid measurably closer than every pruning plan is chosen
    closer = _trial(0.0, 1.0, 0.01, 0.0, 3, 0.30)
    assert one_standard_error_choice([closer, grouped, prune_only], 'flops_kept') is closer


def test_margin_rule_probes_resume_from_their_cache(scanned, digits, tmp_path, monkeypatch):
    # Probes are long work: each one is kept in cache_path as it is measured, so a rerun after an interruption
    # probes only what it lacks, and the same candidates give the same choice.
    import hmc_plugin.app.workflow

    model, _, _, table = scanned
    settings = RunSettings(model='resnet20', target_flops=0.5, calibration_size=32, finetune_lr=0.01)
    kwargs = dict(candidates=(0.5, math.inf), decompose_weights=(1.0, math.inf), probe_steps=2, held_out=64,
                  cache_path=tmp_path / 'margin_rule.json')
    real_finetune, probed = hmc_plugin.app.workflow.sgd_finetune, []

    def interrupted(*args, **kw):
        if len(probed) == 1:
            raise KeyboardInterrupt
        probed.append(1)
        return real_finetune(*args, **kw)

    monkeypatch.setattr(hmc_plugin.app.workflow, 'sgd_finetune', interrupted)
    with pytest.raises(KeyboardInterrupt):
        choose_margin(model, digits, settings, table, **kwargs)
    assert len(probed) == 1 and (tmp_path / 'margin_rule.json').exists()
    monkeypatch.setattr(hmc_plugin.app.workflow, 'sgd_finetune', lambda *args, **kw: probed.append(1) or real_finetune(*args, **kw))
    first = choose_margin(model, digits, settings, table, **kwargs)
    distinct_plans = len(json.loads((tmp_path / 'margin_rule.json').read_text())['entries'])
    assert len(probed) - 1 == distinct_plans - 1  # the plan probed before the interruption is not probed again
    monkeypatch.setattr(hmc_plugin.app.workflow, 'sgd_finetune', lambda *args, **kw: pytest.fail('probed again'))
    again = choose_margin(model, digits, settings, table, **kwargs)
    assert (again[0], again[1].decompose_weight) == (first[0], first[1].decompose_weight)
    assert [t['kl'] for t in again[2]] == pytest.approx([t['kl'] for t in first[2]])
