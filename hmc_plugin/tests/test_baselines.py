"""Unit tests of the benchmark building blocks in the package: NNI's L1 baseline, torch-pruning's group-importance
baselines and the output KL metric."""
from __future__ import annotations

import copy

import pytest
import torch

from hmc_plugin.app.baselines import nni_l1_masks, nni_l1_prune, torch_pruning_prune
from hmc_plugin.app.models import resnet20
from hmc_plugin.engines.pruning import find_pruning_groups, group_importances, prune_physically
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.utils.counting import count_flops, count_params
from hmc_plugin.utils.fingerprint import model_fingerprint
from hmc_plugin.utils.kl import output_kl, output_log_probs


def test_nni_l1_masks_are_shared_by_residual_coupled_convs(model):
    dummy = torch.zeros(1, 3, 32, 32)
    groups = find_pruning_groups(model, dummy)
    masks = nni_l1_masks(model, groups, 0.5)
    stem_group = next(group for group in groups if 'conv1' in group.members)
    kept = [masks[name]['weight'].flatten(1).any(1) for name in stem_group.members]
    assert len(stem_group.members) > 1 and int(kept[0].sum()) == stem_group.channels // 2
    assert all(torch.equal(kept[0], other) for other in kept[1:])


def test_nni_l1_prune_meets_the_flops_target_and_leaves_the_model(model):
    dummy = torch.zeros(1, 3, 32, 32)
    before = model_fingerprint(model)
    pruned, info = nni_l1_prune(model, dummy, target_flops=0.25)
    assert abs(count_flops(pruned, dummy) / count_flops(model, dummy) - 0.25) <= 0.02
    assert info['flops_kept'] == pytest.approx(count_flops(pruned, dummy) / count_flops(model, dummy))
    assert pruned(dummy).shape == (1, 10)
    assert model_fingerprint(model) == before


def test_nni_l1_prune_rejects_a_target_outside_0_1(model):
    with pytest.raises(HMCConfigError, match='target_flops=1.5'):
        nni_l1_prune(model, torch.zeros(1, 3, 32, 32), target_flops=1.5)


@pytest.mark.parametrize('allocation', ['uniform', 'global'])
def test_torch_pruning_prune_meets_the_flops_target_and_leaves_the_model(model, allocation):
    dummy = torch.zeros(1, 3, 32, 32)
    before = model_fingerprint(model)
    pruned, info = torch_pruning_prune(model, dummy, target_flops=0.5, allocation=allocation, speedup='torch_pruning')
    assert abs(count_flops(pruned, dummy) / count_flops(model, dummy) - 0.5) <= 0.02
    assert model_fingerprint(model) == before
    ratios = set(round(ratio, 6) for ratio in info['ratios'].values())
    assert (len(ratios) == 1) == (allocation == 'uniform'), ratios
    # the returned model is the masks applied
    again = prune_physically(copy.deepcopy(model), dummy, info['masks'])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), pruned.eval()(x))


def test_global_allocation_prunes_below_one_threshold_of_the_normalised_scores(model):
    """torch-pruning's global pruning: every pruned channel scores below every kept one, across groups."""
    dummy = torch.zeros(1, 3, 32, 32)
    scores = group_importances(model, dummy, importance='l2')
    assert all(abs(float(values.mean()) - 1) < 1e-4 for values in scores.values())  # mean-normalised
    _, info = torch_pruning_prune(model, dummy, target_flops=0.5, allocation='global', speedup='torch_pruning')
    pruned, kept = [], []
    for name, values in scores.items():
        keep = info['masks'][name]['weight'].flatten(1).any(1) if name in info['masks'] else torch.ones_like(values).bool()
        pruned.append(values[~keep])
        kept.append(values[keep])
    assert max(float(v.max()) for v in pruned if v.numel()) <= min(float(v.min()) for v in kept) + 1e-6
    assert len(set(round(ratio, 6) for ratio in info['ratios'].values())) > 1


def test_taylor_importance_needs_labelled_calibration(model):
    with pytest.raises(HMCConfigError, match="importance='taylor' without calibration"):
        torch_pruning_prune(model, torch.zeros(1, 3, 32, 32), target_flops=0.5, importance='taylor')
    with pytest.raises(HMCConfigError, match="allocation='even'"):
        torch_pruning_prune(model, torch.zeros(1, 3, 32, 32), target_flops=0.5, allocation='even')


def test_output_kl_is_zero_for_the_same_outputs_and_positive_for_others(model):
    torch.manual_seed(2)
    images = torch.randn(8, 3, 32, 32)
    other = resnet20().eval()
    assert output_kl(model, model, [images]) == pytest.approx(0.0, abs=1e-12)
    kl = output_kl(model, other, [(images, torch.zeros(8))])
    assert kl > 0
    assert output_kl(output_log_probs(model, [images]), other, [images]) == pytest.approx(kl)


@pytest.mark.parametrize('prune', ['nni_l1', 'tp_global'])
def test_baselines_meet_a_parameter_budget(model, prune):
    dummy = torch.zeros(1, 3, 32, 32)
    before = model_fingerprint(model)
    if prune == 'nni_l1':
        pruned, info = nni_l1_prune(model, dummy, target_params=0.3, speedup='torch_pruning')
    else:
        pruned, info = torch_pruning_prune(model, dummy, target_params=0.3, speedup='torch_pruning')
    assert abs(count_params(pruned) / count_params(model) - 0.3) <= 0.02
    assert info['params_kept'] == pytest.approx(count_params(pruned) / count_params(model))
    assert info['flops_kept'] == pytest.approx(count_flops(pruned, dummy) / count_flops(model, dummy))
    assert model_fingerprint(model) == before


def test_baselines_take_exactly_one_budget(model):
    dummy = torch.zeros(1, 3, 32, 32)
    with pytest.raises(HMCConfigError, match='both target_flops and target_params'):
        torch_pruning_prune(model, dummy, target_flops=0.5, target_params=0.5)
    with pytest.raises(HMCConfigError, match='neither target_flops nor target_params'):
        nni_l1_prune(model, dummy)
    with pytest.raises(HMCConfigError, match='target_params=0'):
        torch_pruning_prune(model, dummy, target_params=0)
