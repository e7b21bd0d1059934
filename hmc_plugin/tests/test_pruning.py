"""Unit tests of hmc_plugin.engines.pruning: groups, kept-channel arithmetic, masks, errors (CIFAR ResNet-20)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hmc_plugin.app.models import resnet20
from hmc_plugin.engines.pruning import (
    IMPORTANCES,
    channel_masks,
    find_pruning_groups,
    group_channel_masks,
    group_channel_selections,
    kept_channels,
    prune_physically,
    speedup_with_nni,
    trace_model,
)
from hmc_plugin.errors import HMCConfigError, UntraceableModelError


@pytest.fixture
def dummy() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def _groups_by_name(model, dummy, **kwargs):
    return {group.name: group for group in find_pruning_groups(model, dummy, **kwargs)}


def _pruned_rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.flatten(1).sum(1) == 0 if mask.dim() > 1 else mask == 0


def _apply_masks(model: nn.Module, masks) -> nn.Module:
    simulated = copy.deepcopy(model)
    with torch.no_grad():
        for name, module_masks in masks.items():
            for key, mask in module_masks.items():
                getattr(simulated.get_submodule(name), key).mul_(mask)
    return simulated


# ----------------------------------------------------------------------------- groups

def test_stem_and_stage1_conv2s_form_one_group(model, dummy):
    groups = _groups_by_name(model, dummy)
    stem = groups['conv1']
    assert stem.members == ('conv1', 'layer1.0.conv2', 'layer1.1.conv2', 'layer1.2.conv2')
    assert stem.channels == 16
    assert {'layer1.0.conv1', 'layer2.0.conv1', 'layer2.0.downsample.0'} <= set(stem.consumers)


def test_each_block_conv1_is_its_own_group_consumed_by_its_conv2(model, dummy):
    groups = _groups_by_name(model, dummy)
    for stage, channels in ((1, 16), (2, 32), (3, 64)):
        for block in range(3):
            group = groups[f'layer{stage}.{block}.conv1']
            assert group.members == (f'layer{stage}.{block}.conv1',)
            assert group.consumers == (f'layer{stage}.{block}.conv2',)
            assert group.channels == channels


def test_classifier_head_is_never_pruned_on_its_outputs(model, dummy):
    groups = find_pruning_groups(model, dummy)
    assert len(groups) == 12  # 9 conv1 groups + 3 residual groups
    assert all('fc' not in group.members for group in groups)
    assert any('fc' in group.consumers for group in groups)


def test_ignored_layers_drop_their_groups(model, dummy):
    groups = _groups_by_name(model, dummy, ignored_layers=['layer1.1.conv1', 'layer1.2.conv2'])
    assert 'layer1.1.conv1' not in groups
    assert 'conv1' not in groups  # layer1.2.conv2 is a member of the stem group: whole group dropped
    assert 'layer1.0.conv1' in groups
    with pytest.raises(HMCConfigError, match='layer9.conv'):
        find_pruning_groups(model, dummy, ignored_layers=['layer9.conv'])


def test_finding_groups_keeps_state_and_mode(model, dummy):
    model.train()
    before = copy.deepcopy(model.state_dict())
    find_pruning_groups(model, dummy)
    assert model.training and all(module.training for module in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------- kept_channels

@pytest.mark.parametrize('channels, ratio, round_to, kept', [
    (16, 0.5, 1, 8), (16, 0.0, 1, 16), (10, 0.3, 1, 7), (64, 0.25, 1, 48),
    (64, 0.3, 8, 40), (64, 0.5, 8, 32), (16, 0.99, 1, 1), (16, 0.99, 4, 4), (3, 0.5, 8, 1),
])
def test_kept_channels_follows_torch_pruning_rule(channels, ratio, round_to, kept):
    assert kept_channels(channels, ratio, round_to) == kept


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize('importance', IMPORTANCES)
def test_each_importance_masks_the_right_number_of_channels(model, dummy, importance):
    torch.manual_seed(2)
    calibration = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    masks = channel_masks(model, dummy, {'layer2.1.conv1': 0.25, 'conv1': 0.5}, importance=importance,
                          calibration=calibration)
    assert set(masks) == {'layer2.1.conv1', 'layer2.1.bn1', 'conv1', 'bn1',
                          *(f'layer1.{block}.{layer}' for block in range(3) for layer in ('conv2', 'bn2'))}
    for name, module_masks in masks.items():
        module = model.get_submodule(name)
        for key, mask in module_masks.items():
            assert mask.shape == getattr(module, key).shape
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            assert int(_pruned_rows(mask).sum()) == 8, (name, key)  # 25% of 32 and 50% of 16


def test_round_to_keeps_a_multiple_of_channels(model, dummy):
    masks = channel_masks(model, dummy, {'layer3.0.conv1': 0.3}, round_to=8)
    assert int((~_pruned_rows(masks['layer3.0.conv1']['weight'])).sum()) == 40


def test_residual_coupled_layers_get_identical_masks(model, dummy):
    masks = channel_masks(model, dummy, {'layer1.1.conv2': 0.5}, importance='l2')  # a member, not the leader
    reference = _pruned_rows(masks['conv1']['weight'])
    for name in ('bn1', 'layer1.0.conv2', 'layer1.1.conv2', 'layer1.2.conv2', 'layer1.0.bn2', 'layer1.2.bn2'):
        assert torch.equal(_pruned_rows(masks[name]['weight']), reference), name


def test_masks_make_pruned_channels_exactly_zero(model, dummy):
    masks = channel_masks(model, dummy, {'layer1.0.conv1': 0.5})
    simulated = _apply_masks(model, masks)
    captured = {}
    simulated.layer1[0].bn1.register_forward_hook(lambda module, inputs, output: captured.update(out=output))
    simulated(dummy)
    pruned = _pruned_rows(masks['layer1.0.bn1']['weight'])
    assert torch.count_nonzero(captured['out'][:, pruned]) == 0
    assert torch.count_nonzero(captured['out'][:, ~pruned]) > 0


def test_channel_masks_leaves_the_model_untouched(model, dummy):
    model.train()
    model.layer1[0].conv1.weight.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 3.0)
    before = copy.deepcopy(model.state_dict())
    calibration = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    for importance in IMPORTANCES:
        channel_masks(model, dummy, {'conv1': 0.5, 'layer1.0.conv1': 0.5}, importance=importance,
                      calibration=calibration)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training
    assert not model.layer1[0].conv1.weight.requires_grad
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 3.0))
    assert model.conv1.weight.grad is None


# ----------------------------------------------------------------------------- consumers' kept inputs

def _kept_out_channels(selection, group):
    return selection.masks[group.name]['weight'].flatten(1).any(1)


def _assert_consumers_keep_the_kept_channels(model, dummy, ratio):
    groups = find_pruning_groups(model, dummy)
    selections = group_channel_selections(model, dummy, {group.name: ratio for group in groups})
    for group in groups:
        selection = selections[group.name]
        kept = _kept_out_channels(selection, group)
        assert set(selection.consumer_keep) == set(group.consumers), group.name
        for consumer, keep in selection.consumer_keep.items():
            assert keep.dtype == torch.bool
            assert keep.numel() == model.get_submodule(consumer).weight.shape[1], (group.name, consumer)
            assert torch.equal(keep, kept), (group.name, consumer)
    return groups, selections


def test_consumers_keep_the_producers_kept_channels_in_a_cifar_resnet(model, dummy):
    groups, selections = _assert_consumers_keep_the_kept_channels(model, dummy[:1], 0.5)
    stem = selections['conv1']  # the residual group of stage 1: every block's conv1 and stage 2's entry read it
    assert {'layer1.0.conv1', 'layer1.2.conv1', 'layer2.0.conv1', 'layer2.0.downsample.0'} <= set(stem.consumer_keep)
    assert int(stem.consumer_keep['layer2.0.conv1'].sum()) == 8
    last = next(group for group in groups if 'fc' in group.consumers)  # stage 3's stream reaches fc through the pool
    assert selections[last.name].consumer_keep['fc'].numel() == 64


def test_consumers_keep_the_producers_kept_channels_in_torchvision_resnet18():
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    groups, selections = _assert_consumers_keep_the_kept_channels(model, torch.randn(1, 3, 64, 64), 0.25)
    assert any('fc' in selections[group.name].consumer_keep for group in groups)


def test_a_linear_after_flatten_keeps_every_feature_of_the_kept_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10)).eval()
    dummy = torch.randn(1, 3, 6, 6)
    (group,) = find_pruning_groups(model, dummy)
    selection = group_channel_selections(model, dummy, {group.name: 0.5})[group.name]
    keep = selection.consumer_keep['4']
    assert keep.numel() == 128 and int(keep.sum()) == 64
    assert torch.equal(keep.view(8, 16), _kept_out_channels(selection, group)[:, None].expand(8, 16))


def test_selections_hold_the_same_masks_as_group_channel_masks(model, dummy):
    ratios = {group.name: 0.4 for group in find_pruning_groups(model, dummy)}
    masks = group_channel_masks(model, dummy, ratios, importance='l2')
    selections = group_channel_selections(model, dummy, ratios, importance='l2')
    assert masks.keys() == selections.keys()
    for name, group_masks in masks.items():
        assert group_masks.keys() == selections[name].masks.keys()
        for module, module_masks in group_masks.items():
            for key, mask in module_masks.items():
                assert torch.equal(mask, selections[name].masks[module][key])


# ----------------------------------------------------------------------------- errors

def test_unknown_group_name_is_named_with_the_valid_ones(model, dummy):
    with pytest.raises(HMCConfigError, match=r"'layer1\.0\.bn1'.*layer1\.0\.conv1"):
        channel_masks(model, dummy, {'layer1.0.bn1': 0.5})
    with pytest.raises(HMCConfigError, match="'fc'"):
        channel_masks(model, dummy, {'fc': 0.5})


@pytest.mark.parametrize('ratio', [1.0, -0.1, 1.5, 'half', True])
def test_ratio_outside_unit_interval_is_rejected(model, dummy, ratio):
    with pytest.raises(HMCConfigError, match=r"layer1\.0\.conv1.*\[0, 1\)"):
        channel_masks(model, dummy, {'layer1.0.conv1': ratio})


def test_unknown_importance_lists_the_allowed_ones(model, dummy):
    with pytest.raises(HMCConfigError, match="'l3'.*'l1', 'l2', 'fpgm', 'bn_scale', 'taylor'"):
        channel_masks(model, dummy, {'conv1': 0.5}, importance='l3')


def test_taylor_without_calibration_is_rejected(model, dummy):
    with pytest.raises(HMCConfigError, match='calibration'):
        channel_masks(model, dummy, {'conv1': 0.5}, importance='taylor')


class _DataDependentNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv1(x)
        if x.sum() > 0:
            x = x * 2
        return self.conv2(x)


def test_untraceable_model_fails_before_anything_changes():
    net, dummy = _DataDependentNet(), torch.randn(1, 3, 8, 8)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(UntraceableModelError, match='_DataDependentNet.*torch.fx.wrap') as info:
        trace_model(net, dummy)
    assert info.value.__cause__ is not None
    masks = {'conv1': {'weight': torch.ones_like(net.conv1.weight), 'bias': torch.ones_like(net.conv1.bias)}}
    masks['conv1']['weight'][:4] = 0
    masks['conv1']['bias'][:4] = 0
    with pytest.raises(UntraceableModelError):
        speedup_with_nni(net, dummy, masks)
    assert net.conv1.out_channels == 8
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------- physical pruning

def test_physical_pruning_matches_simulated_masks(model, dummy):
    masks = channel_masks(model, dummy, {'conv1': 0.5, 'layer1.0.conv1': 0.5, 'layer3.2.conv1': 0.25})
    with torch.no_grad():
        expected = _apply_masks(model, masks)(dummy)
        pruned = prune_physically(model, dummy, masks)
        torch.testing.assert_close(pruned(dummy), expected, atol=1e-5, rtol=1e-5)
    assert pruned.conv1.out_channels == 8 and pruned.layer1[1].conv2.out_channels == 8
    assert pruned.layer1[0].conv1.out_channels == 8 and pruned.layer1[0].conv2.in_channels == 8
    assert pruned.layer3[2].conv1.out_channels == 48 and pruned.layer2[0].downsample[0].in_channels == 8


def test_physical_pruning_keeps_mode_dtype_and_requires_grad(model, dummy):
    model = model.double().train()
    model.layer1[0].conv2.weight.requires_grad_(False)
    masks = channel_masks(model, dummy.double(), {'layer1.0.conv1': 0.5})
    pruned = prune_physically(model, dummy.double(), masks)
    assert pruned is model and pruned.training
    assert all(param.dtype == torch.float64 for param in pruned.parameters())
    assert not pruned.layer1[0].conv2.weight.requires_grad
    assert pruned.layer1[0].conv1.weight.requires_grad


def test_nni_speedup_of_a_train_mode_model_keeps_bn_statistics_and_mode():
    from hmc_plugin.engines.pruning import channel_masks, speedup_with_nni
    model = resnet20().train()
    dummy_input = torch.zeros(1, 3, 32, 32)
    masks = channel_masks(model, dummy_input, {'layer1.0.conv1': 0.5})
    running_mean = model.layer2[0].bn1.running_mean.clone()
    speedup_with_nni(model, dummy_input, masks)
    assert torch.equal(model.layer2[0].bn1.running_mean, running_mean)
    assert model.training and model.layer1[0].bn1.training


def test_nni_sparsity_inference_batch_follows_the_memory_budget_and_leaves_the_result_alone():
    from hmc_plugin.engines.pruning import NNI_BATCH_SIZE, channel_masks, nni_batch_size, speedup_with_nni
    torch.manual_seed(0)
    model = resnet20().eval()
    dummy_input = torch.zeros(1, 3, 32, 32)
    assert nni_batch_size(model, dummy_input) == NNI_BATCH_SIZE  # a CIFAR ResNet fits NNI's default batch
    assert nni_batch_size(model, dummy_input, memory_budget=1) == 2  # 1 MiB: the smallest batch, never less
    masks = channel_masks(model, dummy_input, {'conv1': 0.5, 'layer1.0.conv1': 0.5, 'layer2.1.conv1': 0.25,
                                               'layer3.0.conv1': 0.5})
    probe = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outputs = []
    for budget in (None, 1):
        pruned = speedup_with_nni(copy.deepcopy(model), dummy_input, masks, memory_budget=budget)
        with torch.no_grad():
            outputs.append(pruned(probe))
        assert pruned.layer2[1].conv1.out_channels == 24
    assert torch.equal(outputs[0], outputs[1])
