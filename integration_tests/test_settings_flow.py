"""The settings object end to end: the constructor speaks NNI (named keyword errors, no from_compressor), and a
run that names only a parameter budget compresses to that budget."""
from __future__ import annotations

import pytest
import torch

from hmc_plugin import HMCCompressor
from hmc_plugin.app.models import resnet20
from hmc_plugin.app.run_settings import RunSettings
from hmc_plugin.app.training import make_torch_evaluator
from hmc_plugin.app.workflow import make_compressor
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.utils.counting import count_params
from hmc_plugin.utils.fingerprint import model_fingerprint

CONFIG = [{'op_types': ['Conv2d'], 'target_flops': 0.5}]


def test_a_misspelt_keyword_is_named_with_a_suggestion_and_the_model_is_untouched(trained_resnet20, calibration,
                                                                                   dummy_input):
    before = model_fingerprint(trained_resnet20)
    misspelt = "unknown keyword argument 'calibration_input' \\(did you mean 'calibration_inputs'"
    with pytest.raises(HMCConfigError, match=misspelt):
        HMCCompressor(trained_resnet20, CONFIG, None, dummy_input, calibration_input=calibration[0])
    with pytest.raises(HMCConfigError, match="unknown keyword argument 'target_flop' \\(did you mean 'target_flops'"):
        HMCCompressor(trained_resnet20, CONFIG, None, dummy_input, calibration_inputs=calibration[0], target_flop=0.4)
    assert model_fingerprint(trained_resnet20) == before
    assert not any('_nni_wrapper' in name for name, _ in trained_resnet20.named_modules())


def test_keyword_settings_override_the_config_list(trained_resnet20, calibration, dummy_input):
    compressor = HMCCompressor(trained_resnet20, CONFIG, None, dummy_input, calibration_inputs=calibration[0],
                               mode='prune', target_params=0.6)
    try:
        assert compressor.settings.mode == 'prune' and compressor.settings.budget == ('params', 0.6)
    finally:
        compressor.unwrap_model()


def test_from_compressor_is_refused_with_the_reason(trained_resnet20, calibration, dummy_input, loaders):
    from nni.compression.pruning import L1NormPruner

    evaluator = make_torch_evaluator(loaders[0], loaders[1], trained_resnet20, progress=False)
    pruner = L1NormPruner(trained_resnet20, [{'op_types': ['Conv2d'], 'sparse_ratio': 0.5}])
    with pytest.raises(HMCConfigError, match='cannot be made with from_compressor.*ModelSpeedup'):
        HMCCompressor.from_compressor(pruner, CONFIG, evaluator=evaluator)
    with pytest.raises(HMCConfigError, match='from_compressor'):
        HMCCompressor(trained_resnet20, CONFIG, evaluator, dummy_input, existed_wrappers={})
    pruner.unwrap_model()


def test_run_settings_with_only_a_parameter_budget_compress_to_it(digits):
    torch.manual_seed(0)
    model = resnet20(num_classes=10).eval()
    settings = RunSettings(model='resnet20', target_params=0.4, calibration_size=16, speedup='torch_pruning')
    compressor = make_compressor(model, digits, settings, 'prune', progress=False)
    compressed, _ = compressor.compress()
    assert compressor.plan.target == {'params': 0.4}
    assert count_params(compressed) / count_params(model) == pytest.approx(0.4, abs=0.01)
