"""Scans with calibration data measure what apply produces: refitted consumers, data-aware low rank, recalibrated BN."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from hmc_plugin.app.data import calibration_batch, load_digits_data, make_loaders
from hmc_plugin.app.models import resnet20
from hmc_plugin.app.training import train, training_step
from hmc_plugin.engines.batchnorm import recalibrated_bn
from hmc_plugin.engines.datafit import DataFit
from hmc_plugin.engines.moments import collect_moments
from hmc_plugin.engines.pruning import find_pruning_groups, group_channel_selections
from hmc_plugin.sensitivity import scan as scan_module
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.utils.fingerprint import model_fingerprint

LEVELS = (0.5,)


@pytest.fixture(scope='module')
def digits_setup():
    """ResNet-20 after 3 epochs on digits (a few seconds), its calibration batch and two fit batches."""
    digits = load_digits_data()
    torch.manual_seed(0)
    model = resnet20(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train(model, optimizer, training_step, make_loaders(digits, batch_size=64, seed=0)[0], max_epochs=3, progress=False)
    calibration = calibration_batch(digits, 64, seed=0)[0]
    fit = calibration_batch(digits, 128, seed=1)[0]
    return model.eval(), calibration, (fit[:64], fit[64:])


@pytest.fixture
def trained(digits_setup):
    model, calibration, batches = digits_setup
    return copy.deepcopy(model), calibration, batches


def _units(model, dummy):
    groups = find_pruning_groups(model, dummy)
    layers = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    return groups, layers


@pytest.fixture(scope='module')
def tables(digits_setup):
    """kl and proxy tables of the trained ResNet-20, data-free and with reconstruction + data-aware low rank."""
    model, calibration, batches = digits_setup
    groups, layers = _units(model, calibration[:1])
    kwargs = dict(groups=groups, layers=layers, calibration_inputs=calibration, levels=LEVELS, progress=False)
    fit = DataFit(batches=batches)
    return {(data, mode): scan_sensitivity(model, calibration[:1], mode=mode, data=fit if data else None, **kwargs)
            for data in (False, True) for mode in ('kl', 'proxy')}


def _spearman(first: list[float], second: list[float]) -> float:
    ranks = lambda values: torch.tensor(values).argsort().argsort().double()  # noqa: E731
    return float(torch.corrcoef(torch.stack([ranks(first), ranks(second)]))[0, 1])


def _column(drops: dict[str, list[float]], level: int) -> list[float]:
    return [values[level] for values in drops.values()]


def test_refitted_consumer_reproduces_the_original_output_better_than_zeroed_inputs(trained):
    model, calibration, batches = trained
    selection = group_channel_selections(model, calibration[:1], {'layer2.1.conv1': 0.5})['layer2.1.conv1']
    consumer = model.layer2[1].conv2
    keep = selection.consumer_keep['layer2.1.conv2']
    moment = collect_moments(model, ['layer2.1.conv2'], batches)['layer2.1.conv2'].input_moment
    refitted = scan_module._refitted_weight(consumer, keep, moment)
    assert torch.all(refitted[:, ~keep] == 0)
    zeroed = consumer.weight.detach() * keep.view(1, -1, 1, 1)

    def output_error(weight):  # E||(W' - W) x||^2 = tr(dW S dW^T) on the fit batches
        change = (weight - consumer.weight.detach()).reshape(weight.shape[0], -1).double()
        return float(torch.trace(change @ moment @ change.T))
    assert output_error(refitted) < 0.5 * output_error(zeroed)


def test_reconstruction_and_data_aware_low_rank_lower_the_kl_drops(tables):
    free, fit = tables[(False, 'kl')], tables[(True, 'kl')]
    for level in range(len(LEVELS)):
        prune_free, prune_fit = torch.tensor(_column(free.prune, level)), torch.tensor(_column(fit.prune, level))
        assert prune_fit.median() <= prune_free.median() and prune_fit.mean() <= prune_free.mean()
        assert float((prune_fit <= prune_free).double().mean()) >= 0.5
        decompose_free = torch.tensor(_column(free.decompose, level))
        decompose_fit = torch.tensor(_column(fit.decompose, level))
        assert decompose_fit.mean() < decompose_free.mean()


def test_proxy_with_reconstruction_ranks_prune_units_like_the_kl_scan(tables):
    for level in range(len(LEVELS)):
        proxy, kl = tables[(True, 'proxy')], tables[(True, 'kl')]
        assert _spearman(_column(proxy.prune, level), _column(kl.prune, level)) > 0.5
        assert _spearman(_column(proxy.decompose, level), _column(kl.decompose, level)) > 0.5


def test_data_aware_tables_say_so_in_their_settings(tables):
    free, fit = tables[(False, 'proxy')], tables[(True, 'proxy')]
    assert 'data' not in free.settings
    assert fit.settings['data']['reconstruct'] and fit.settings['data']['data_aware']
    assert fit.settings['data']['fit_batches'] is not None and fit.settings['data']['bn_batches'] is None


def test_no_data_gives_the_data_free_table_bit_for_bit(model):
    inputs = torch.rand(8, 3, 32, 32)
    groups, layers = _units(model, inputs[:1])
    kwargs = dict(groups=groups[:3], layers=layers[:3], calibration_inputs=inputs, levels=LEVELS, progress=False)
    for mode in ('kl', 'proxy'):
        plain = scan_sensitivity(model, inputs[:1], mode=mode, **kwargs)
        for data in (None, DataFit(batches=(inputs,), reconstruct=False, data_aware=False)):
            again = scan_sensitivity(model, inputs[:1], mode=mode, data=data, **kwargs)
            assert again.prune == plain.prune and again.decompose == plain.decompose, (mode, data)
            assert again.settings == plain.settings


def _state(model):
    """Everything a scan must leave as it was: state_dict bytes, each module's mode, each BN's momentum."""
    return (model_fingerprint(model), {name: module.training for name, module in model.named_modules()},
            {name: module.momentum for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)})


def test_kl_and_evaluator_scans_with_bn_recalibration_leave_the_model_bit_identical(trained):
    model, calibration, batches = trained
    model.train()
    model.layer2.eval()  # mixed modes must come back too
    groups, layers = _units(model, calibration[:1])
    before = _state(model)
    data = DataFit(batches=batches, bn_batches=batches)
    kwargs = dict(groups=groups[:3], layers=layers[:3], levels=(0.5,), progress=False, data=data)
    recalibrated = scan_sensitivity(model, calibration[:1], mode='kl', calibration_inputs=calibration, **kwargs)
    assert _state(model) == before
    plain = scan_sensitivity(model, calibration[:1], mode='kl', calibration_inputs=calibration,
                             **{**kwargs, 'data': DataFit(batches=batches)})
    assert recalibrated.prune != plain.prune  # the measurements were taken after recalibration
    assert recalibrated.settings['data']['bn_batches'] is not None

    def confidence(net):  # a metric that moves with the BatchNorm statistics
        with torch.no_grad():
            return float(net(calibration).softmax(1).max(1).values.mean())
    table = scan_sensitivity(model, calibration[:1], mode='evaluator', eval_fn=confidence, **kwargs)
    assert _state(model) == before
    with recalibrated_bn(model, batches):  # the baseline is the unchanged model's after the same recalibration
        expected = confidence(model.eval())
    model.train()
    model.layer2.eval()
    assert table.baseline == pytest.approx(expected, abs=1e-6)


def test_moments_collected_in_several_passes_give_the_same_table(trained, monkeypatch):
    model, calibration, batches = trained
    groups, layers = _units(model, calibration[:1])
    kwargs = dict(groups=groups[:4], layers=layers[:4], calibration_inputs=calibration, levels=(0.5,),
                  progress=False, data=DataFit(batches=batches), mode='kl')
    whole = scan_sensitivity(model, calibration[:1], **kwargs)
    passes = []
    original_load = scan_module._MomentStore._load

    def counting_load(store, missing):
        passes.append(list(missing))
        original_load(store, missing)
    monkeypatch.setattr(scan_module, '_MOMENT_BYTES', 1)  # one unit's layers per pass
    monkeypatch.setattr(scan_module._MomentStore, '_load', counting_load)
    split = scan_sensitivity(model, calibration[:1], **kwargs)
    assert len(passes) > 2
    assert split.prune == whole.prune and split.decompose == whole.decompose


def test_a_data_free_cache_is_not_resumed_by_a_data_aware_scan(trained, tmp_path, caplog):
    model, calibration, batches = trained
    groups, layers = _units(model, calibration[:1])
    kwargs = dict(groups=groups[:2], layers=layers[:2], calibration_inputs=calibration, levels=(0.5,),
                  progress=False, mode='proxy', cache_path=tmp_path / 'scan.json')
    free = scan_sensitivity(model, calibration[:1], **kwargs)
    with caplog.at_level(logging.WARNING, logger='hmc_plugin.sensitivity.scan'):
        fit = scan_sensitivity(model, calibration[:1], data=DataFit(batches=batches), **kwargs)
    assert 'rescanning' in caplog.text
    assert fit.decompose != free.decompose
    other = scan_sensitivity(model, calibration[:1], data=DataFit(batches=batches[:1]), **kwargs)
    assert other.settings['data']['fit_batches'] != fit.settings['data']['fit_batches']
    again = scan_sensitivity(model, calibration[:1], data=DataFit(batches=batches[:1]), **kwargs)
    assert again == other  # resumed from its own cache
