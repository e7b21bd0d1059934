"""Unit tests of the benchmark building blocks in the package: NNI's L1 baseline and the output KL metric."""
from __future__ import annotations

import pytest
import torch

from hmc_plugin.app.baselines import nni_l1_masks, nni_l1_prune
from hmc_plugin.app.models import resnet20
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.utils.counting import count_flops
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


def test_output_kl_is_zero_for_the_same_outputs_and_positive_for_others(model):
    torch.manual_seed(2)
    images = torch.randn(8, 3, 32, 32)
    other = resnet20().eval()
    assert output_kl(model, model, [images]) == pytest.approx(0.0, abs=1e-12)
    kl = output_kl(model, other, [(images, torch.zeros(8))])
    assert kl > 0
    assert output_kl(output_log_probs(model, [images]), other, [images]) == pytest.approx(kl)
