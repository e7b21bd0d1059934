"""The layer-local Fisher proxy: it estimates the KL the whole-network proxy measures, from one pass."""
import pytest
import torch
from torch import nn

from hmc_plugin.engines.lowrank import low_rank_weight, low_rank_weights
from hmc_plugin.engines.pruning import find_pruning_groups, group_channel_masks, group_channel_selections
from hmc_plugin.errors import HMCError
from hmc_plugin.sensitivity.fisher import chain_ends, fisher_drops
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.utils.fingerprint import model_fingerprint


def test_chain_ends_are_the_batchnorms_after_the_convs(model_and_inputs):
    model, inputs = model_and_inputs
    groups = find_pruning_groups(model, inputs[:1])
    masks = group_channel_masks(model, inputs[:1], {group.name: 0.5 for group in groups})
    ends = chain_ends(model, (inputs[:1],), {name: list(group_masks) for name, group_masks in masks.items()})
    assert ends['layer1.0.conv1'] == ['layer1.0.bn1']
    stem = ends['conv1']  # the stem and every stage-1 block write the residual stream
    assert 'bn1' in stem and 'layer1.2.bn2' in stem and not any(name.endswith('conv2') for name in stem)


def test_svd_weights_match_low_rank_weight_and_tucker_is_close():
    torch.manual_seed(0)
    pointwise, conv = nn.Conv2d(24, 32, 1), nn.Conv2d(16, 24, 3)
    specs = ['flops:0.6', 'flops:0.3']
    for rebuilt, spec in zip(low_rank_weights(pointwise, specs), specs):
        torch.testing.assert_close(rebuilt, low_rank_weight(pointwise, spec), atol=1e-5, rtol=1e-4)
    for rebuilt, spec in zip(low_rank_weights(conv, specs), specs):
        refined = low_rank_weight(conv, spec)
        scan_error = (rebuilt - conv.weight).norm() / conv.weight.norm()
        refined_error = (refined - conv.weight).norm() / conv.weight.norm()
        assert refined_error <= scan_error + 1e-6 and scan_error <= refined_error * 1.05


def _measured_kl(model, inputs, layer, change):
    reference = torch.log_softmax(model(inputs), dim=1)
    module = model.get_submodule(layer)
    original = module.weight.data
    module.weight.data = original + change
    try:
        changed = torch.log_softmax(model(inputs), dim=1)
    finally:
        module.weight.data = original
    return float(torch.nn.functional.kl_div(changed, reference, log_target=True, reduction='batchmean'))


@torch.no_grad()
def test_fisher_estimate_matches_the_measured_kl_of_a_small_weight_change(model_and_inputs):
    model, inputs = model_and_inputs
    torch.manual_seed(1)
    for layer in ['layer1.0.conv1', 'layer2.1.conv2', 'layer3.2.conv1', 'layer3.0.downsample.0']:
        weight = model.get_submodule(layer).weight
        change = 0.02 * weight.abs().mean() * torch.randn_like(weight)
        _, estimated = fisher_drops(model, inputs, weight_changes={layer: [change]}, projections=10, progress=False)
        assert estimated[layer][0] == pytest.approx(_measured_kl(model, inputs, layer, change), rel=0.1), layer


def test_proxy_scan_ranks_pruning_groups_like_the_kl_scan_and_leaves_the_model(model_and_inputs):
    model, inputs = model_and_inputs
    groups = find_pruning_groups(model, inputs[:1])
    before = model_fingerprint(model)
    kwargs = dict(groups=groups, layers=[], calibration_inputs=inputs, levels=(0.25,), progress=False)
    estimated = scan_sensitivity(model, inputs[:1], mode='proxy', **kwargs)
    measured = scan_sensitivity(model, inputs[:1], mode='kl', **kwargs)
    assert model_fingerprint(model) == before and not model.training
    names = [group.name for group in groups]
    fisher = torch.tensor([estimated.prune[name][0] for name in names])
    kl = torch.tensor([measured.prune[name][0] for name in names])
    ranks = lambda values: values.argsort().argsort().double()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([ranks(fisher), ranks(kl)]))[0, 1]
    assert spearman > 0.7, (fisher, kl)
    assert estimated.evaluations == len(groups) and estimated.mode == 'proxy'


def test_hutchinson_projections_estimate_the_exact_fisher(model_and_inputs):
    model, inputs = model_and_inputs
    change = low_rank_weight(model.layer2[0].conv1, 'flops:0.5') - model.layer2[0].conv1.weight.detach()
    _, exact = fisher_drops(model, inputs, weight_changes={'layer2.0.conv1': [change]}, projections=10, progress=False)
    _, sampled = fisher_drops(model, inputs, weight_changes={'layer2.0.conv1': [change]}, projections=8, progress=False)
    assert sampled['layer2.0.conv1'][0] == pytest.approx(exact['layer2.0.conv1'][0], rel=0.5)


def _zeroed_inputs(model, selection):
    """``{consumer: -W on the pruned inputs}``: a consumer's weight change when it only loses its pruned inputs."""
    changes = {}
    for name, keep in selection.consumer_keep.items():
        weight = model.get_submodule(name).weight.detach()
        changes[name] = -weight * (~keep).to(weight.dtype).view(1, -1, *([1] * (weight.dim() - 2)))
    return changes


def test_consumer_weight_changes_price_plain_pruning_like_the_chain_ends(model_and_inputs):
    # relu'(a) * a = relu(a): zeroing the channels where the chains end and zeroing the consumers' inputs are the
    # same first-order change, for a block's own group and for a residual group alike
    model, inputs = model_and_inputs
    selections = group_channel_selections(model, inputs[:1], {'conv1': 0.5, 'layer2.1.conv1': 0.5})
    masks = {name: [selection.masks] for name, selection in selections.items()}
    changes = {name: [_zeroed_inputs(model, selection)] for name, selection in selections.items()}
    by_masks, _ = fisher_drops(model, inputs, prune_masks=masks, projections=10, progress=False)
    by_consumers, _ = fisher_drops(model, inputs, prune_weight_changes=changes, projections=10, progress=False)
    for name in selections:
        assert by_consumers[name][0] == pytest.approx(by_masks[name][0], rel=1e-6), name


@torch.no_grad()
def test_consumer_weight_changes_act_jointly_like_the_measured_kl(model_and_inputs):
    model, inputs = model_and_inputs
    torch.manual_seed(2)
    consumers = ['layer1.0.conv1', 'layer1.1.conv1', 'layer2.0.conv1']  # all read the stage-1 stream
    changes = {name: 0.02 * model.get_submodule(name).weight.abs().mean()
               * torch.randn_like(model.get_submodule(name).weight) for name in consumers}
    estimated, _ = fisher_drops(model, inputs, prune_weight_changes={'stream': [changes, {}]}, projections=10,
                                progress=False)
    reference = torch.log_softmax(model(inputs), dim=1)
    originals = {name: model.get_submodule(name).weight.data for name in consumers}
    try:
        for name in consumers:
            model.get_submodule(name).weight.data = originals[name] + changes[name]
        changed = torch.log_softmax(model(inputs), dim=1)
    finally:
        for name in consumers:
            model.get_submodule(name).weight.data = originals[name]
    measured = float(torch.nn.functional.kl_div(changed, reference, log_target=True, reduction='batchmean'))
    assert estimated['stream'][0] == pytest.approx(measured, rel=0.1)
    assert estimated['stream'][1] == 0.0  # no consumer changes at that level


def test_a_group_cannot_be_priced_by_masks_and_weight_changes_at_once(model_and_inputs):
    model, inputs = model_and_inputs
    selection = group_channel_selections(model, inputs[:1], {'layer1.0.conv1': 0.5})['layer1.0.conv1']
    with pytest.raises(HMCError, match='layer1.0.conv1'):
        fisher_drops(model, inputs, prune_masks={'layer1.0.conv1': [selection.masks]},
                     prune_weight_changes={'layer1.0.conv1': [_zeroed_inputs(model, selection)]}, progress=False)


@pytest.mark.parametrize('layer, shape', [
    (nn.Conv2d(6, 8, 3, stride=2, padding=1), (3, 6, 9, 9)),
    (nn.Conv2d(6, 8, (3, 1), padding=(2, 0), dilation=2), (3, 6, 7, 5)),
    (nn.Conv2d(6, 8, 1, bias=False), (3, 6, 4, 4)),
    (nn.Linear(6, 8), (3, 6)),
    (nn.Linear(6, 8), (3, 5, 6)),
])
def test_weight_gradient_scores_equal_one_output_change_per_level(layer, shape):
    """g . layer(x; dW) priced by the per-sample weight gradients equals the output change path, level by level."""
    from hmc_plugin.sensitivity.fisher import _unit_scores, _weight_grad_scores

    torch.manual_seed(0)
    layer = layer.double()
    inputs = torch.randn(*shape, dtype=torch.float64)
    outputs = layer(inputs)
    grad = torch.randn((4,) + outputs.shape, dtype=torch.float64)  # (K, N, ...): 4 projections
    changes = {('decompose', 'a'): [torch.randn_like(layer.weight) for _ in range(3)],
               ('prune', 'b'): [None, torch.randn_like(layer.weight)]}
    fast = _weight_grad_scores(layer, inputs, grad, changes)
    for unit, levels in changes.items():
        torch.testing.assert_close(fast[unit], _unit_scores(layer, inputs, grad, levels), rtol=1e-10, atol=1e-10)
    # float32 layers: the gradients in float32, the dot products in float64
    layer32, inputs32, grad32 = layer.float(), inputs.float(), grad.float()
    changes32 = {unit: [None if c is None else c.float() for c in levels] for unit, levels in changes.items()}
    fast32 = _weight_grad_scores(layer32, inputs32, grad32, changes32)
    for unit, levels in changes32.items():
        torch.testing.assert_close(fast32[unit], _unit_scores(layer32, inputs32, grad32, levels), rtol=1e-4, atol=1e-4)


def test_weight_gradient_scores_leave_grouped_convs_to_the_output_change_path():
    from hmc_plugin.sensitivity.fisher import _weight_grad_scores

    grouped, circular = nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode='circular')
    for layer in (grouped, circular):
        inputs = torch.randn(2, 4, 6, 6)
        grad = torch.randn((4,) + layer(inputs).shape)
        assert _weight_grad_scores(layer, inputs, grad, {('decompose', 'x'): [torch.zeros_like(layer.weight)]}) is None
