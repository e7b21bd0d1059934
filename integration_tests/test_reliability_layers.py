"""Reliability catalogue (issue #9), layers: grouped, depthwise and dilated convs, ConvTranspose2d, Conv1d/Conv3d,
Linear-only models and layers with 1-2 channels.

Each is compressed correctly or skipped with a warning that names it; no layer ever ends with zero
channels, no rank exceeds its tensor, and pruning alone gives exactly the masked model's outputs.
"""
from __future__ import annotations

import logging

import pytest
import reliability_assets as assets
import torch
from torch import nn

from hmc_plugin.engines.lowrank import CPConv2d, SVDConv2d, SVDLinear, Tucker2Conv2d
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.planning.targets import reachable_fraction
from hmc_plugin.sensitivity.scan import zeroed_by_masks
from hmc_plugin.utils.fingerprint import model_fingerprint

ALL = ['Conv1d', 'Conv2d', 'Conv3d', 'ConvTranspose2d', 'Linear']


def check_compressed(model: nn.Module, compressed: nn.Module, hmc, masks) -> None:
    """The invariants every compressed model keeps, whatever its layers."""
    x = assets.inputs_for(model)
    with torch.no_grad():
        reference, outputs = model(x), compressed.eval()(x)
    assert outputs.shape == reference.shape and torch.isfinite(outputs).all()
    for name, module in compressed.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            weight = module.weight
            assert weight.numel() > 0 and min(weight.shape[:2]) >= 1, f'{name} has no channels left: {weight.shape}'
        if isinstance(module, Tucker2Conv2d):
            r_out, r_in = module.ranks
            assert r_in <= module.first.in_channels and r_out <= module.last.out_channels, (name, module.ranks)
        elif isinstance(module, (SVDConv2d, SVDLinear)):
            first, last = module.first, module.last
            dims = (first.in_channels, last.out_channels) if isinstance(module, SVDConv2d) else \
                (first.in_features, last.out_features)
            assert module.ranks[0] <= min(dims), (name, module.ranks, dims)
        elif isinstance(module, CPConv2d):
            assert module.ranks[0] >= 1
    assert set(hmc.plan.ranks) <= set(hmc.layers) and all(r >= 1 for ranks in hmc.plan.ranks.values() for r in ranks)
    if not hmc.plan.ranks:  # pruning alone: exactly the original with the pruned channels zeroed
        with torch.no_grad(), zeroed_by_masks(model, masks):
            masked = model(x)
        torch.testing.assert_close(outputs, masked, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('cls, op_types, mode, target, warnings', [
    (assets.GroupedConvs, ['Conv2d', 'Linear'], 'prune', 0.6, []),
    (assets.GroupedConvs, ['Conv2d', 'Linear'], 'ahc', 0.5,
     ['Not decomposing grouped (Conv2d): groups=2', 'Not decomposing depthwise (Conv2d): groups=16']),
    (assets.GroupedConvs, ['Conv2d', 'Linear'], 'decompose', 0.7, ['Not decomposing grouped']),
    (assets.WithConvTranspose, ALL, 'prune', 0.8,
     ['Skipping up (ConvTranspose2d): HMC compresses Conv2d and Linear layers only', 'Not pruning conv1 (Conv2d)']),
    (assets.WithConvTranspose, ALL, 'ahc', 0.6, ['Skipping up (ConvTranspose2d)']),
    (assets.Conv1dNet, ALL, 'prune', 0.6, ['Skipping conv (Conv1d)']),
    (assets.Conv1dNet, ALL, 'ahc', 0.5, ['Skipping conv (Conv1d)']),
    (assets.Conv3dNet, ALL, 'prune', 0.7, ['Skipping conv3d (Conv3d)']),
    (assets.Conv3dNet, ALL, 'decompose', 0.7, ['Skipping conv3d (Conv3d)']),
    (assets.MLP, ['Linear'], 'prune', 0.6, []),
    (assets.MLP, ['Linear'], 'decompose', 0.6, []),
    (assets.MLP, ['Linear'], 'nahc', 0.5, []),
    (assets.Thin, ['Conv2d', 'Linear'], 'prune', 0.7, []),
    (assets.Thin, ['Conv2d', 'Linear'], 'decompose', 0.8, []),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_layer_kind_is_compressed_or_skipped_by_name(cls, op_types, mode, target, warnings, caplog):
    model = assets.build(cls)
    before = model_fingerprint(model)
    with caplog.at_level(logging.WARNING, logger='hmc_plugin'):
        hmc = assets.compressor(model, {'op_types': op_types, 'target_flops': target, 'mode': mode})
        compressed, masks = hmc.compress()
    for words in warnings:
        assert words in caplog.text, (words, caplog.text)
    assert hmc.plan.prune_ratios or hmc.plan.ranks
    if mode == 'prune':
        assert not hmc.plan.ranks
    if mode == 'decompose':
        assert not hmc.plan.prune_ratios
    check_compressed(model, compressed, hmc, masks)
    assert model_fingerprint(model) == before and not assets.is_wrapped(model)


def test_cp_skips_a_reflect_padded_conv_by_name_and_decomposes_the_others(caplog):
    model = assets.build(assets.SmallCNN)
    model.conv2.padding_mode = 'reflect'  # CP's separable kernels need zero padding
    with caplog.at_level(logging.WARNING, logger='hmc_plugin'):
        hmc = assets.compressor(model, {'op_types': ['Conv2d'], 'target_flops': 0.8, 'mode': 'decompose',
                                        'rank_method': 'cp'})
        compressed, masks = hmc.compress()
    assert "Not decomposing conv2 (Conv2d): Cannot apply method='cp' to layer 'conv2'" in caplog.text
    assert 'padding_mode' in caplog.text
    assert 'conv2' not in hmc.plan.ranks and 'conv2' not in hmc.sensitivity.decompose
    assert hmc.plan.ranks and isinstance(compressed.conv3, CPConv2d)
    check_compressed(model, compressed, hmc, masks)


def test_dilated_and_strided_convs_keep_their_geometry_when_decomposed():
    model = assets.build(assets.GroupedConvs)
    dilated, _ = assets.compressor(model, {'op_names': ['dilated'], 'target_flops': 0.8, 'mode': 'decompose'}).compress()
    strided, _ = assets.compressor(model, {'op_names': ['pointwise'], 'target_flops': 0.99, 'mode': 'decompose',
                                           'levels': [0.5, 0.9]}).compress()
    assert isinstance(dilated.dilated, Tucker2Conv2d) and isinstance(strided.pointwise, SVDConv2d)
    assert dilated.dilated.core.dilation == (2, 2) and dilated.dilated.core.padding == (2, 2)
    assert strided.pointwise.first.stride == (2, 2)
    # at full rank the replacements are exact, so the geometry is right (not just the output shape)
    from hmc_plugin.engines.lowrank import decompose_module
    x = torch.randn(2, 16, 8, 8)
    for name in ('dilated', 'pointwise'):
        layer = getattr(model, name)
        full = decompose_module(layer, 1.0, layer_name=name)
        torch.testing.assert_close(full(x), layer(x), atol=1e-5, rtol=1e-4)


def test_thin_layers_compressed_to_the_limit_keep_at_least_one_channel_and_valid_ranks():
    """Every unit at level 0.95 (the most a plan can do): 1- and 2-channel layers survive with >= 1 channel."""
    model = assets.build(assets.Thin)
    dummy = assets.inputs_for(model)[:1]
    groups = find_pruning_groups(model, dummy)
    layers = ['conv1', 'conv2', 'conv3', 'conv4', 'fc']
    lowest = reachable_fraction(model, dummy, groups, layers, metric='flops', mode='ahc', level=0.95)
    assert 0 < lowest < 1
    hmc = assets.compressor(model, {'op_types': ['Conv2d', 'Linear'], 'target_flops': round(lowest + 0.02, 3),
                                    'mode': 'ahc', 'levels': [0.5, 0.95]})
    compressed, masks = hmc.compress()
    check_compressed(model, compressed, hmc, masks)
    assert compressed.conv1.out_channels == 1 and compressed.conv2.out_channels >= 1
