"""One settings object: defaults once, the exactly-one budget, named errors, and the CLI's choices from it."""
import inspect
import math

import pytest

from hmc_plugin import HMCCompressor
from hmc_plugin.app.cli import build_parser
from hmc_plugin.app.run_settings import RunSettings
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.settings import COMPRESSOR_IMPORTANCES, MODES, SENSITIVITIES, HMCSettings


def test_defaults_and_inf_are_read_once():
    settings = HMCSettings(target_flops=0.5, margin='inf', decompose_weight='inf')
    assert settings.mode == 'nahc' and settings.levels == (0.2, 0.4, 0.6, 0.8) and settings.importance == 'l1'
    assert math.isinf(settings.margin) and math.isinf(settings.decompose_weight)
    assert settings.budget == ('flops', 0.5) and settings.budget_entry == {'target_flops': 0.5}


def test_the_budget_is_exactly_one():
    with pytest.raises(HMCConfigError, match='No budget is set'):
        HMCSettings().budget
    with pytest.raises(HMCConfigError, match='keep exactly one budget'):
        HMCSettings(target_flops=0.5, target_params=0.5)
    assert HMCSettings(target_flops=0.5).replace(target_params=0.4).budget == ('params', 0.4)


@pytest.mark.parametrize('values, words', [
    ({'mode': 'magic'}, ["mode='magic'", "'nahc'"]),
    ({'levels': [0.5, 0.2]}, ['levels', 'increasing']),
    ({'importance': 'taylor'}, ["importance='taylor'", 'channel_masks']),
    ({'target_flops': 1.5}, ['target_flops=1.5', '(0, 1]']),
])
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(values, words):
    with pytest.raises(HMCConfigError) as info:
        HMCSettings(**values)
    assert all(word in str(info.value) for word in words)


def test_an_unknown_key_suggests_the_closest():
    with pytest.raises(HMCConfigError, match="unknown key 'target_flop' \\(did you mean 'target_flops'\\?\\)"):
        HMCSettings.from_mapping({'target_flop': 0.5})
    with pytest.raises(HMCConfigError, match="did you mean 'finetune_epochs'"):
        RunSettings(finetune_epoch=2)


def test_run_settings_keep_half_the_flops_unless_a_budget_is_given():
    assert RunSettings().hmc.budget == ('flops', 0.5)
    only_params = RunSettings(target_params=0.4)
    assert only_params.hmc.budget == ('params', 0.4) and only_params.target_flops is None
    assert RunSettings(target_latency=0.6).replace(target_flops=0.3).hmc.budget == ('flops', 0.3)
    with pytest.raises(HMCConfigError, match='exactly one budget'):
        RunSettings(target_flops=0.5, target_params=0.4)


def test_run_settings_read_and_write_hmc_keys_flat():
    settings = RunSettings(model='resnet20', mode='ahc', levels=[0.3, 0.6], finetune_epochs=1)
    assert settings.hmc.mode == settings.mode == 'ahc' and settings.levels == (0.3, 0.6)
    flat = settings.as_dict()
    assert flat['model'] == 'resnet20' and flat['levels'] == [0.3, 0.6] and flat['target_flops'] == 0.5
    assert RunSettings(**{key: value for key, value in flat.items()}) == settings


def test_the_cli_offers_exactly_the_settings_choices():
    commands = build_parser()._subparsers._group_actions[0].choices
    options = {action.dest: action for action in commands['compress']._actions}
    assert tuple(options['mode'].choices) == MODES and options['mode'].default == HMCSettings.mode
    assert tuple(options['importance'].choices) == COMPRESSOR_IMPORTANCES and 'taylor' not in COMPRESSOR_IMPORTANCES
    scan = {action.dest: action for action in commands['scan']._actions}
    assert tuple(scan['sensitivity'].choices) == SENSITIVITIES


def test_the_compressor_takes_every_setting_as_a_keyword_only_argument():
    parameters = inspect.signature(HMCCompressor.__init__).parameters
    keyword_only = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert set(HMCSettings.keys()) <= set(keyword_only)
    assert all(parameters[key].default is None for key in HMCSettings.keys())  # the default lives in HMCSettings
