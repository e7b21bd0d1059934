"""BatchNorm recalibration (statistics re-estimated, weights and modes untouched, bad input named) and folding."""
import logging

import pytest
import torch
from torch import nn

from hmc_plugin.engines.batchnorm import bn_state, fold_batchnorm, recalibrate_bn, recalibrated_bn
from hmc_plugin.engines.lowrank import decompose_layers
from hmc_plugin.errors import HMCConfigError, UntraceableModelError
from hmc_plugin.utils.fingerprint import model_fingerprint


def _batches(count=3, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 3, 32, 32, generator=generator) * 2 + 1 for _ in range(count)]


def test_recalibrate_bn_leaves_weights_bit_identical_and_restores_the_modes(model):
    model.train()
    model.layer1.eval()
    weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    modes = {name: module.training for name, module in model.named_modules()}
    momenta = {name: module.momentum for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}
    before = bn_state(model)
    assert recalibrate_bn(model, _batches()) == 3
    assert all(torch.equal(param, weights[name]) for name, param in model.named_parameters())
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: module.momentum for name, module in model.named_modules()
            if isinstance(module, nn.BatchNorm2d)} == momenta
    assert not torch.equal(model.bn1.running_mean, before['bn1']['running_mean'])


def test_recalibrated_statistics_are_the_cumulative_average_over_the_batches(model):
    batches = _batches(count=2, size=8)
    recalibrate_bn(model, batches)
    inputs = torch.cat(batches)  # equal batch sizes: the average of the batch means is the overall mean
    with torch.no_grad():
        stem = model.conv1(inputs)
    assert torch.allclose(model.bn1.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([model.conv1(batch).var(dim=(0, 2, 3), unbiased=True) for batch in batches]).mean(0)
    assert torch.allclose(model.bn1.running_var, per_batch_var.detach(), rtol=1e-4)


def test_recalibrated_bn_puts_the_statistics_back(model):
    before = bn_state(model)
    with recalibrated_bn(model, _batches()):
        assert not torch.equal(model.bn1.running_mean, before['bn1']['running_mean'])
    after = bn_state(model)
    assert all(torch.equal(after[name][key], before[name][key]) for name in before for key in before[name])


def test_loader_pairs_are_accepted_and_their_labels_ignored(model):
    pairs = [(batch, torch.zeros(len(batch), dtype=torch.long)) for batch in _batches()]
    assert recalibrate_bn(model, pairs) == 3


def test_no_batches_is_an_error_and_keeps_the_statistics(model):
    before = bn_state(model)
    with pytest.raises(HMCConfigError, match='bn_batches=0'):
        recalibrate_bn(model, [])
    assert torch.equal(model.bn1.running_mean, before['bn1']['running_mean'])


def test_nan_activations_name_the_layer_and_keep_the_statistics(model):
    before = bn_state(model)
    bad = _batches(count=1)
    bad[0][0, 0, 0, 0] = float('nan')
    with pytest.raises(HMCConfigError, match="'bn1'"):
        recalibrate_bn(model, bad)
    assert torch.equal(model.bn1.running_mean, before['bn1']['running_mean'])


def test_untracked_batchnorm_and_models_without_batchnorm_get_a_warning(caplog):
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with caplog.at_level(logging.WARNING):
        assert recalibrate_bn(untracked, _batches()) == 0
    assert "skips 1: track_running_stats=False" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert recalibrate_bn(nn.Sequential(nn.Conv2d(3, 4, 3)), _batches()) == 0
    assert 'has no BatchNorm' in caplog.text


def _random_statistics(model):
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(module.num_features, generator=generator))
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator))
    return model.eval()


def test_fold_batchnorm_folds_every_bn_after_a_conv_low_rank_chains_included(model):
    """Tucker-2's last 1x1, the second conv of an SVD pair and CP's last conv take the BatchNorm after them."""
    model = _random_statistics(model)
    decompose_layers(model, {'layer1.0.conv1': 'flops:0.5', 'layer2.0.conv2': 'flops:0.5', 'layer3.1.conv1': 'flops:0.5'},
                     method={'layer1.0.conv1': 'tucker2', 'layer2.0.conv2': 'svd', 'layer3.1.conv1': 'cp'})
    model.train()
    before = model_fingerprint(model)
    folded = fold_batchnorm(model)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in folded.modules())
    assert model.training and model_fingerprint(model) == before  # the model itself is untouched
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_a_bn_after_an_addition_stays_and_untraceable_models_are_named():
    class AfterAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x) + x)

    folded = fold_batchnorm(_random_statistics(AfterAdd()))
    assert isinstance(folded.bn, nn.BatchNorm2d)

    class DataDependent(AfterAdd):
        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(UntraceableModelError, match='Cannot fold the BatchNorms of DataDependent'):
        fold_batchnorm(DataDependent())
