"""config_list validation: every mistake is named (key, value, what is allowed) before the model is touched."""
import math

import pytest

from hmc_plugin.errors import HMCConfigError
from hmc_plugin.nni_api.config import settings_from_config_list, validate_config_list


def test_valid_entry_passes_and_keeps_hmc_keys():
    config = validate_config_list([{'op_types': ['Conv2d'], 'target_flops': 0.5, 'mode': 'nahc', 'margin': 'inf'}])
    settings = settings_from_config_list(config)
    assert settings.target_flops == 0.5 and settings.mode == 'nahc' and math.isinf(settings.margin)
    assert settings.budget == ('flops', 0.5)


@pytest.mark.parametrize('entry, words', [
    ({'op_types': ['Conv2d'], 'target_flops': 0.5, 'rank': 3}, ["'rank'", 'allowed keys']),
    ({'op_types': ['Conv2d'], 'target_flops': 1.5}, ['target_flops=1.5', '(0, 1]']),
    ({'op_types': ['Conv2d'], 'target_flops': 0.5, 'mode': 'magic'}, ["mode='magic'", 'nahc']),
    ({'op_types': ['Conv2d'], 'target_flops': 0.5, 'levels': [0.5, 0.2]}, ['levels', 'increasing']),
    ({'op_types': ['Conv2d'], 'target_flops': 0.5, 'importance': 'random'}, ["importance='random'", 'l1']),
    ({'op_types': ['Conv2d'], 'target_flops': 0.5, 'margin': -1}, ['margin=-1', 'inf']),
    ({'op_types': ['Conv2d'], 'target_flops': 0.5, 'margin': 'auto'}, ["margin='auto'", 'hmc compress --mode hmc --margin auto',
                                                                     'plan_by_margin_rule']),
    ({'op_types': ['Conv2d'], 'target_flops': 0.5, 'round_to': 0}, ['round_to=0', 'int >= 1']),
    ({'op_types': ['Conv2d'], 'sparse_ratio': 0.5}, ["'sparse_ratio'", 'target_flops']),
    ({'op_types': 'Conv2d', 'target_flops': 0.5}, ['op_types']),
    ({'op_types': ['Conv2d'], 'target_flops': 0.5, 'max_sparse_ratio': 2.0}, ['max_sparse_ratio']),
])
def test_bad_entry_error_names_key_and_value(entry, words):
    with pytest.raises(HMCConfigError) as info:
        validate_config_list([entry])
    for word in words:
        assert word in str(info.value)


def test_budget_is_required_and_unique():
    with pytest.raises(HMCConfigError, match='target_flops'):
        settings_from_config_list(validate_config_list([{'op_types': ['Conv2d']}]))
    with pytest.raises(HMCConfigError, match="'target_flops' and 'target_params'; keep exactly one"):
        settings_from_config_list(validate_config_list([{'op_types': ['Conv2d'], 'target_flops': 0.5, 'target_params': 0.5}]))


def test_conflicting_global_keys_are_reported():
    config = validate_config_list([{'op_types': ['Conv2d'], 'target_flops': 0.5, 'mode': 'ahc'},
                                   {'op_names': ['fc'], 'mode': 'prune'}])
    with pytest.raises(HMCConfigError, match="mode='prune' conflicts"):
        settings_from_config_list(config)


def test_empty_or_non_list_config_is_rejected():
    for bad in ([], {'op_types': ['Conv2d']}, ['Conv2d']):
        with pytest.raises(HMCConfigError, match='config_list'):
            validate_config_list(bad)
