"""The data-aware defaults end to end: HMCCompressor and the CLI recalibrate BatchNorm, refit pruned consumers
and fit low-rank factors to the calibration data; each can be turned off; the user's model never changes."""
from __future__ import annotations

import pytest
import torch

from hmc_plugin import HMCCompressor
from hmc_plugin.app.cli import build_parser, _settings
from hmc_plugin.app.data import calibration_batch, make_loaders
from hmc_plugin.app.training import evaluate_accuracy
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.utils.fingerprint import model_fingerprint

DATA_FREE = dict(bn_batches=0, data_aware=False, reconstruct=False)


@pytest.fixture(scope='module')
def batches(digits):
    images, _ = calibration_batch(digits, 256, seed=0)
    return list(images.split(64))


def _compressed_accuracy(model, digits, batches, dummy_input, mode, **options):
    compressor = HMCCompressor(model, [{'op_types': ['Conv2d'], 'target_flops': 0.5}], dummy_input=dummy_input,
                               calibration_inputs=batches[0], calibration_loader=batches, mode=mode,
                               speedup='torch_pruning', progress=False, **options)
    compressed, _ = compressor.compress()
    return evaluate_accuracy(compressed, make_loaders(digits, 64, seed=0)[1])


@pytest.mark.parametrize('mode', ['prune', 'decompose'])
def test_data_aware_defaults_beat_the_data_free_compression_zero_shot(trained_resnet20, digits, batches, dummy_input,
                                                                      mode):
    before = model_fingerprint(trained_resnet20)
    data_free = _compressed_accuracy(trained_resnet20, digits, batches, dummy_input, mode, **DATA_FREE)
    data_aware = _compressed_accuracy(trained_resnet20, digits, batches, dummy_input, mode)
    assert data_aware > data_free + 0.2, (data_free, data_aware)
    assert model_fingerprint(trained_resnet20) == before


def test_each_step_can_be_turned_off_from_the_config_list(trained_resnet20, batches, dummy_input):
    entry = {'op_types': ['Conv2d'], 'target_flops': 0.5, 'bn_batches': 0, 'data_aware': False, 'reconstruct': False}
    compressor = HMCCompressor(trained_resnet20, [entry], dummy_input=dummy_input, calibration_inputs=batches[0],
                               progress=False)
    assert compressor.data_fit() is None
    compressor.unwrap_model()  # NNI wraps the model from the constructor on
    compressor = HMCCompressor(trained_resnet20, [{**entry, 'bn_batches': 2}], dummy_input=dummy_input,
                               calibration_loader=batches, progress=False)
    fit = compressor.data_fit()
    assert len(fit.bn_batches) == 2 and fit.batches == ()


def test_calibration_loader_alone_gives_the_calibration_inputs(trained_resnet20, batches, dummy_input):
    pairs = [(images, torch.zeros(len(images), dtype=torch.long)) for images in batches]
    compressor = HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.5}],
                               dummy_input=dummy_input, calibration_loader=pairs, progress=False)
    assert torch.equal(compressor.calibration_inputs, batches[0])
    assert len(compressor.data_fit().batches) == 4


@pytest.mark.parametrize('options, words', [
    (dict(bn_batches=-1), ['bn_batches=-1', 'an int >= 0']),
    (dict(fit_order='random'), ["fit_order='random'", 'sequential']),
    (dict(data_aware='yes'), ["data_aware='yes'", 'True or False']),
    (dict(calibration_loader=torch.rand(4, 3, 32, 32)), ['calibration_loader must be an iterable of batches']),
    (dict(calibration_loader=[]), ['calibration_loader yielded no batch']),
])
def test_bad_data_settings_are_named(trained_resnet20, dummy_input, options, words):
    with pytest.raises(HMCConfigError) as info:
        HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.5}], dummy_input=dummy_input,
                      calibration_inputs=torch.rand(8, 3, 32, 32), progress=False, **options)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_without_calibration_data_the_compression_is_data_free_with_a_warning(trained_resnet20, batches, dummy_input,
                                                                              caplog):
    entry = {'op_types': ['Conv2d'], 'target_flops': 0.5, 'mode': 'prune'}
    planner = HMCCompressor(trained_resnet20, [entry], dummy_input=dummy_input, calibration_inputs=batches[0],
                            progress=False)
    with caplog.at_level('WARNING'):
        compressor = HMCCompressor(trained_resnet20, [entry], dummy_input=dummy_input, plan=planner.make_plan(),
                                   progress=False)
    assert compressor.data_fit() is None
    assert 'data-free compression' in caplog.text
    compressed, _ = compressor.compress()
    assert compressed(dummy_input).shape == (1, 10)


def test_cli_flags_reach_the_settings():
    args = build_parser().parse_args(['compress', '--bn-batches', '2', '--no-data-aware', '--no-reconstruct',
                                      '--fit-batches', '3', '--fit-order', 'one_pass', '--rank-method', 'svd'])
    settings = _settings(args)
    assert (settings.bn_batches, settings.data_aware, settings.reconstruct, settings.fit_batches, settings.fit_order,
            settings.rank_method) == (2, False, False, 3, 'one_pass', 'svd')
