"""Reliability catalogue (issue #9): bad configs, unsupported models, bad numbers, interruptions, determinism.

Every error must name the key or layer and what is allowed, and be raised before the user's model is
touched (same ``model_fingerprint``, no NNI wrapper left). Layer types are in test_reliability_layers.py.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reliability_assets as assets
import torch
from torch import nn

from hmc_plugin import HMCCompressor
from hmc_plugin.errors import HMCConfigError, UntraceableModelError
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.sensitivity.table import SensitivityTable
from hmc_plugin.utils.fingerprint import model_fingerprint

ASSETS = Path(__file__).with_name('reliability_assets.py')


def assert_untouched(model: nn.Module, fingerprint: str) -> None:
    assert model_fingerprint(model) == fingerprint
    assert not assets.is_wrapped(model)


# ----------------------------------------------------------------------------------------------- config

BASE = {'op_types': ['Conv2d', 'Linear'], 'target_flops': 0.5}


@pytest.mark.parametrize('entry, words', [
    # unknown keys, with a suggestion for a near miss
    ({**BASE, 'Mode': 'ahc'}, ["unknown key 'Mode'", "did you mean 'mode'", 'allowed keys']),
    ({**BASE, 'granularity': 'out_channel'}, ["unknown key 'granularity'", 'allowed keys']),
    # wrong types
    ({**BASE, 'target_flops': '0.5'}, ["target_flops='0.5'", '(0, 1]']),
    ({**BASE, 'levels': 0.5}, ['levels=0.5', 'increasing fractions']),
    ({**BASE, 'distill': 'yes'}, ["distill='yes'", 'True or False']),
    ({**BASE, 'round_to': 2.0}, ['round_to=2.0', 'int >= 1']),
    ({'op_types': 'Conv2d', 'target_flops': 0.5}, ["op_types='Conv2d'", 'list of str']),
    ({'op_types': ['Conv2d', 1], 'target_flops': 0.5}, ['op_types=', 'list of str']),
    ({**BASE, 'max_sparse_ratio': '0.5'}, ["max_sparse_ratio='0.5'", '(0, 1]']),
    # ratios and fractions outside their ranges
    ({**BASE, 'target_flops': 1.5}, ['target_flops=1.5', '(0, 1]']),
    ({**BASE, 'target_params': -0.1, 'target_flops': None}, ['target_params=-0.1', '(0, 1]']),
    ({**BASE, 'max_sparse_ratio': 0.0}, ['max_sparse_ratio=0.0', '(0, 1]']),
    ({**BASE, 'max_sparse_ratio': 1.5}, ['max_sparse_ratio=1.5', '(0, 1]']),
    ({**BASE, 'levels': [0.0, 0.5]}, ['levels=[0.0, 0.5]', '(0, 1)']),
    ({**BASE, 'levels': [0.5, 1.0]}, ['levels=[0.5, 1.0]', '(0, 1)']),
    ({**BASE, 'margin': float('nan')}, ['margin=nan', ">= 0 or 'inf'"]),
    ({**BASE, 'importance': 'taylor'}, ["importance='taylor'", 'labelled calibration']),
    # empty selections and names that match nothing
    ({'target_flops': 0.5}, ['selects nothing', 'op_types']),
    ({'op_types': [], 'target_flops': 0.5}, ['op_types=[]', 'selects nothing']),
    ({**BASE, 'exclude_op_types': ['Conv2d', 'Linear']}, ['config_list[0] selects no Conv2d or Linear', 'exclude_op_types']),
    ({'op_names_re': ['^block'], 'target_flops': 0.5}, ['config_list[0] selects no Conv2d or Linear', "'^block'"]),
    ({'op_names_re': ['conv[1'], 'target_flops': 0.5}, ["'conv[1'", 'not a valid regular expression']),
    ({'op_names': ['conv1', 'conv9'], 'target_flops': 0.5}, ["op_names ['conv9'] match no module", 'conv1']),
    ({**BASE, 'exclude_op_names': ['fc', 'fc2']}, ["exclude_op_names ['fc2'] match no module"]),
    ({'op_types': ['BatchNorm2d'], 'target_flops': 0.5}, ['selects no Conv2d or Linear layer that HMC can compress']),
])
def test_config_mistakes_are_named_before_the_model_is_touched(entry, words):
    entry = {key: value for key, value in entry.items() if value is not None}
    model = assets.build(assets.SmallCNN)
    before = model_fingerprint(model)
    with pytest.raises(HMCConfigError) as info:
        assets.compressor(model, entry)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert_untouched(model, before)


def test_keyword_overrides_are_checked_like_config_keys():
    model = assets.build(assets.SmallCNN)
    before = model_fingerprint(model)
    with pytest.raises(HMCConfigError, match="Got mode='fast' but expected one of"):
        assets.compressor(model, BASE, mode='fast')
    assert_untouched(model, before)


def test_target_out_of_reach_is_refused_before_the_scan(monkeypatch):
    """target_flops 0.01 with most layers excluded: the error gives the lowest reachable fraction, and no scan runs."""
    import hmc_plugin.nni_api.compressor as compressor_module
    monkeypatch.setattr(compressor_module, 'scan_sensitivity',
                        lambda *args, **kwargs: pytest.fail('the scan must not run for an unreachable target'))
    model = assets.build(assets.SmallCNN)
    before = model_fingerprint(model)
    entry = {'op_types': ['Conv2d'], 'exclude_op_names': ['conv2', 'conv3'], 'target_flops': 0.01, 'mode': 'ahc'}
    with pytest.raises(HMCConfigError) as info:
        assets.compressor(model, entry)
    message = str(info.value)
    assert 'target_flops=0.01' in message and "mode 'ahc' cannot keep less than 0." in message
    assert 'select more layers' in message and 'higher level' in message
    lowest = float(message.split('cannot keep less than ')[1].split()[0])
    assert 0.5 < lowest < 1.0  # conv1 alone is a small part of the model
    assert_untouched(model, before)


def test_target_just_above_the_lowest_reachable_is_met():
    """The reachability bound is exact: a target a little above it compresses, within tolerance of the target."""
    model = assets.build(assets.SmallCNN)
    entry = {'op_types': ['Conv2d'], 'exclude_op_names': ['conv2', 'conv3'], 'target_flops': 0.01, 'mode': 'ahc'}
    with pytest.raises(HMCConfigError) as info:
        assets.compressor(model, entry)
    lowest = float(str(info.value).split('cannot keep less than ')[1].split()[0])
    hmc = assets.compressor(model, {**entry, 'target_flops': round(lowest + 0.03, 3)})
    hmc.compress()
    assert hmc.plan.measured['flops'] <= lowest + 0.03 + 0.011


def test_mode_that_can_compress_nothing_says_so():
    model = assets.build(assets.SmallCNN)
    with pytest.raises(HMCConfigError, match="mode 'prune' can compress none of the selected layers"):
        assets.compressor(model, {'op_names': ['fc'], 'target_flops': 0.9, 'mode': 'prune'})


# ----------------------------------------------------------------------------------------------- models

def test_untraceable_model_fails_at_construction_and_decompose_mode_still_works():
    model = assets.build(assets.DataDependent)
    before = model_fingerprint(model)
    with pytest.raises(UntraceableModelError) as info:
        assets.compressor(model, {**BASE, 'target_flops': 0.8, 'mode': 'ahc'})
    message = str(info.value)
    assert 'DataDependent' in message and 'control flow' in message
    assert "speedup='torch_pruning'" in message and "mode='decompose'" in message
    assert_untouched(model, before)

    # no pruning means no NNI speedup and no fx trace: decomposition works on the same model
    hmc = assets.compressor(model, {**BASE, 'target_flops': 0.8, 'mode': 'decompose'})
    compressed, _ = hmc.compress()
    assert hmc.plan.ranks and not hmc.plan.prune_ratios
    x = assets.inputs_for(model)
    assert torch.isfinite(compressed(x)).all()
    # and torch-pruning's speedup follows the path the dummy input takes (the same for every input here)
    hmc = assets.compressor(model, {**BASE, 'target_flops': 0.8, 'mode': 'prune', 'speedup': 'torch_pruning'})
    compressed, _ = hmc.compress()
    assert hmc.plan.prune_ratios and compressed(x).shape == (len(x), 4)
    assert_untouched(model, before)


def test_tied_weights_are_skipped_by_name_and_stay_tied(caplog):
    model = assets.build(assets.TiedWeights)
    before = model_fingerprint(model)
    with caplog.at_level(logging.WARNING, logger='hmc_plugin'):
        hmc = assets.compressor(model, {**BASE, 'target_flops': 0.85, 'mode': 'ahc'})
    warnings = caplog.text
    assert 'Skipping conv3' in warnings and 'Skipping conv4' in warnings and 'tied' in warnings
    compressed, _ = hmc.compress()
    assert compressed.conv3.weight is compressed.conv4.weight  # the tie survives compression
    assert tuple(compressed.conv3.weight.shape) == (16, 16, 3, 3)  # neither side nor its input channels shrink
    assert {'conv3', 'conv4'}.isdisjoint(hmc.plan.ranks) and hmc.plan.measured['flops'] < 0.87
    assert_untouched(model, before)


def test_module_called_twice_is_pruned_consistently():
    model = assets.build(assets.ReusedModule)
    hmc = assets.compressor(model, {**BASE, 'target_flops': 0.6, 'mode': 'prune'})
    compressed, masks = hmc.compress()
    assert hmc.plan.prune_ratios
    x = assets.inputs_for(model)
    from hmc_plugin.sensitivity.scan import zeroed_by_masks
    with torch.no_grad(), zeroed_by_masks(model, masks):
        expected = model(x)
    with torch.no_grad():
        torch.testing.assert_close(compressed.eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_module_registered_under_two_names_is_selected_by_either():
    model = assets.build(assets.SmallCNN)
    model.alias = model.conv2  # the same module under a second name
    hmc = assets.compressor(model, {'op_names': ['conv1', 'alias'], 'target_flops': 0.8, 'mode': 'decompose'})
    assert hmc.layers == ['conv1', 'conv2']  # canonical (first) names
    compressed, _ = hmc.compress()
    assert set(hmc.plan.ranks) <= {'conv1', 'conv2'}


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_train_or_eval_mode_is_kept_and_batchnorm_statistics_do_not_move(training):
    model = assets.build(assets.SmallCNN).train(training)
    before = model_fingerprint(model)  # BN running statistics included
    hmc = assets.compressor(model, {**BASE, 'target_flops': 0.6, 'mode': 'ahc'})
    compressed, _ = hmc.compress()
    assert model.training == training and compressed.training == training
    assert all(module.training == training for module in compressed.modules())
    assert_untouched(model, before)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16], ids=str)
def test_non_default_dtype_is_kept_through_pruning_and_decomposition(dtype):
    model = assets.build(assets.SmallCNN, dtype=dtype)
    before = model_fingerprint(model)
    x = assets.inputs_for(model)
    for mode in ('prune', 'decompose'):
        hmc = assets.compressor(model, {**BASE, 'target_flops': 0.6, 'mode': mode})
        compressed, _ = hmc.compress()
        assert hmc.plan.prune_ratios if mode == 'prune' else hmc.plan.ranks
        assert {param.dtype for param in compressed.parameters()} == {dtype}  # NNI's speedup builds float32 modules
        with torch.no_grad():
            outputs = compressed(x)
        assert outputs.dtype == dtype and torch.isfinite(outputs).all()
    assert_untouched(model, before)


def test_dummy_input_of_the_wrong_dtype_is_named():
    model = assets.build(assets.SmallCNN, dtype=torch.float64)
    before = model_fingerprint(model)
    inputs = assets.inputs_for(model)
    with pytest.raises(HMCConfigError, match='fails on dummy_input.*dtype torch.float64'):
        HMCCompressor(model, [BASE], assets.evaluator(model, inputs), inputs[:1].float(), calibration_inputs=inputs)
    assert_untouched(model, before)


# ----------------------------------------------------------------------------------------------- numbers

@pytest.mark.parametrize('where', ['conv2.weight', 'bn1.running_var'])
def test_nan_or_inf_weights_are_named(where):
    model = assets.build(assets.SmallCNN)
    tensor = model.get_parameter(where) if where.endswith('weight') else model.get_buffer(where)
    with torch.no_grad():
        tensor.view(-1)[:3] = torch.tensor([float('nan'), float('inf'), float('-inf')])
    before = model_fingerprint(model)
    with pytest.raises(HMCConfigError, match=rf'NaN or Inf values in {where} \(3 of'):
        assets.compressor(model, BASE)
    assert_untouched(model, before)


def test_nan_calibration_inputs_are_refused():
    model = assets.build(assets.SmallCNN)
    calibration = assets.inputs_for(model)
    calibration[7, 0, 0, 0] = float('nan')  # not among the samples the model is test-run on
    with pytest.raises(HMCConfigError, match='calibration_inputs with NaN or Inf'):
        assets.compressor(model, {**BASE, 'sensitivity': 'proxy'}, calibration_inputs=calibration)


def test_evaluator_returning_nan_is_a_clear_error_and_the_model_is_left_as_it_was():
    model = assets.build(assets.SmallCNN)
    before = model_fingerprint(model)
    calls = {'n': 0}

    def flaky_metric(module):
        calls['n'] += 1
        return 0.5 if calls['n'] < 4 else float('nan')

    hmc = assets.compressor(model, BASE, metric=flaky_metric)
    with pytest.raises(HMCConfigError, match='evaluator returned nan.*finite metric'):
        hmc.compress()
    assert_untouched(model, before)


def test_sensitivity_table_with_nan_is_refused_naming_the_unit():
    table = assets.evaluator_scan()
    model = assets.build(assets.wide_cnn)  # the model that table was scanned on
    table.decompose['conv2'][1] = float('nan')
    hmc = assets.compressor(model, BASE, sensitivity_table=table)
    with pytest.raises(HMCConfigError, match=r"drop of nan for decompose 'conv2' at level 0.5.*rescan"):
        hmc.compress()
    assert not assets.is_wrapped(model)


def test_same_seed_gives_the_same_plan_and_weights_in_another_process(tmp_path):
    """Two runs, the second in a fresh process with another hash seed: identical plan, masks and weights."""
    assets.compress_once(str(tmp_path / 'here.json'))
    env = {**os.environ, 'PYTHONHASHSEED': '12345', 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, str(ASSETS), 'compress', str(tmp_path / 'there.json')], check=True, env=env,
                   cwd=ASSETS.parent, capture_output=True)
    here, there = (json.loads((tmp_path / name).read_text()) for name in ('here.json', 'there.json'))
    assert here['plan'] == there['plan']
    assert here['masks'] == there['masks'] and here['weights'] == there['weights']
    assert json.loads(here['plan'])['layers']  # a real plan, not an empty one


# ----------------------------------------------------------------------------------------------- interruptions

def test_scan_killed_mid_way_resumes_from_its_cache_to_the_same_table(tmp_path):
    cache = tmp_path / 'scan.json'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    process = subprocess.Popen([sys.executable, str(ASSETS), 'scan', str(cache), '0.1'], env=env,
                               cwd=ASSETS.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    done = 0
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if cache.exists():
                done = json.loads(cache.read_text())['evaluations']  # written atomically: never half a file
                if done >= 6:
                    break
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
    assert done >= 6, f'the scan made no progress before the deadline: {stderr.decode()[-2000:]}'
    partial = SensitivityTable.from_json(cache)
    assert not partial.is_complete()

    full = assets.evaluator_scan()
    calls: list = []
    resumed = assets.evaluator_scan(cache_path=cache, count=calls)
    assert resumed.is_complete()
    assert len(calls) == 1 + full.evaluations - partial.evaluations  # baseline + only the missing units
    for operator in ('prune', 'decompose'):
        assert getattr(resumed, operator).keys() == getattr(full, operator).keys()
        for name, drops in getattr(full, operator).items():
            assert getattr(resumed, operator)[name] == pytest.approx(drops, rel=1e-6, abs=1e-12), (operator, name)


def test_cache_scanned_on_other_calibration_data_is_not_resumed(tmp_path, caplog):
    model = assets.build(assets.wide_cnn)
    inputs, other = assets.inputs_for(model, seed=1), assets.inputs_for(model, seed=2)
    groups, layers = assets.scan_units(model, inputs[:1])
    kwargs = dict(groups=groups, layers=layers, mode='kl', levels=assets.LEVELS, progress=False)
    cache = tmp_path / 'scan.json'
    first = scan_sensitivity(model, inputs[:1], calibration_inputs=inputs, cache_path=cache, **kwargs)
    with caplog.at_level(logging.WARNING, logger='hmc_plugin.sensitivity'):
        second = scan_sensitivity(model, inputs[:1], calibration_inputs=other, cache_path=cache, **kwargs)
    assert 'other weights, calibration data or settings; rescanning' in caplog.text
    fresh = scan_sensitivity(model, inputs[:1], calibration_inputs=other, **kwargs)
    assert second.decompose == fresh.decompose != first.decompose


def _garble(cache: Path, how: str) -> None:
    data = json.loads(cache.read_text())
    if how == 'truncated':
        cache.write_text(cache.read_text()[: len(cache.read_text()) // 2])
        return
    if how == 'not a table':
        cache.write_text('[1, 2, 3]')
        return
    if how == 'nan drop':
        data['prune'][next(iter(data['prune']))][0] = float('nan')
    elif how == 'string drop':
        data['decompose']['conv2'][1] = 'oops'
    elif how == 'too many drops':
        data['decompose']['conv2'].append(0.1)
    elif how == 'unknown unit':
        data['decompose']['conv9'] = [0.0, 0.0, 0.0]
    cache.write_text(json.dumps(data))


@pytest.mark.parametrize('how', ['truncated', 'not a table', 'nan drop', 'string drop', 'too many drops', 'unknown unit'])
def test_corrupt_cache_is_detected_and_rebuilt_with_a_warning(how, tmp_path, caplog):
    cache = tmp_path / 'scan.json'
    fresh = assets.evaluator_scan(cache_path=cache)
    _garble(cache, how)
    with caplog.at_level(logging.WARNING, logger='hmc_plugin.sensitivity'):
        rebuilt = assets.evaluator_scan(cache_path=cache)
    assert f'Sensitivity cache {cache} is corrupt' in caplog.text and 'rebuilding it' in caplog.text
    assert rebuilt.prune == fresh.prune and rebuilt.decompose == fresh.decompose
    assert rebuilt.evaluations == fresh.evaluations  # rescanned from scratch, nothing taken from the bad file
    assert SensitivityTable.from_json(cache).decompose == fresh.decompose  # and the cache is whole again
