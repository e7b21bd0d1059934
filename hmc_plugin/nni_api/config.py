"""HMC's config keys on top of NNI's pruning ``config_list`` schema, validated before the model is touched.

A ``config_list`` entry keeps NNI's selection keys (``op_types``, ``op_names``, ``op_names_re``,
``exclude_op_names``, ``exclude_op_types``, ``exclude_op_names_re``) and NNI's ``max_sparse_ratio``
(cap on the channel ratio pruned in the selected layers), and adds HMC's keys below. HMC's keys are
global settings: entries that repeat one must agree.
"""
from __future__ import annotations

import re
from copy import deepcopy
from typing import Any

from nni.compression.base.config import default_config_schema, trans_legacy_config_list
from schema import SchemaError

from ..errors import HMCConfigError
from ..settings import BUDGET_KEYS, HMCSettings, unknown_key_message

__all__ = ['NNI_KEYS', 'validate_config_list', 'settings_from_config_list']

# HMC's keys are HMCSettings' fields; 'auto' margins need held-out training data, which a config_list lacks
MARGIN_AUTO_HINT = ("'auto' (HMC's margin rule) needs held-out training data: run `hmc compress --mode hmc --margin "
                    "auto`, or pass the plan of hmc_plugin.app.workflow.plan_by_margin_rule as HMCCompressor(plan=...)")

NNI_KEYS = ('op_types', 'op_names', 'op_names_re', 'exclude_op_names', 'exclude_op_types', 'exclude_op_names_re',
            'max_sparse_ratio')
SELECTION_KEYS = ('op_types', 'op_names', 'op_names_re')
EXCLUSION_KEYS = ('exclude_op_names', 'exclude_op_types', 'exclude_op_names_re')


# NNI keys whose meaning HMC does not share: HMC allocates ratios from a budget instead.
NNI_KEYS_NOT_USED = {
    'sparse_ratio': "HMC allocates ratios from a budget: use 'target_flops', 'target_params' or 'target_latency' instead",
    'sparse_threshold': "HMC allocates ratios from a budget: use 'target_flops', 'target_params' or 'target_latency' "
                        "instead",
}


def validate_config_list(config_list: list[dict]) -> list[dict]:
    """Check every entry; return NNI's normalised copy. Raises ``HMCConfigError`` naming key, value and allowed."""
    if not isinstance(config_list, list) or not config_list or not all(isinstance(c, dict) for c in config_list):
        raise HMCConfigError(f'Got config_list={config_list!r} but expected a non-empty list of dicts')
    normalised = trans_legacy_config_list(deepcopy(config_list))
    nni_schema = default_config_schema('pruning')
    allowed = set(NNI_KEYS) | set(HMCSettings.keys())
    for index, entry in enumerate(normalised):
        for key, value in entry.items():
            if key in NNI_KEYS_NOT_USED:
                raise HMCConfigError(f'config_list[{index}]: key {key!r} is not used by HMCCompressor: {NNI_KEYS_NOT_USED[key]}')
            if key not in allowed:
                raise HMCConfigError(unknown_key_message(key, allowed, f'config_list[{index}]'))
        _check_hmc_keys(index, entry)
        _check_nni_keys(index, entry)
        nni_part = {key: value for key, value in entry.items() if key not in HMCSettings.keys()}
        try:
            nni_schema.validate(nni_part)
        except SchemaError as error:
            raise HMCConfigError(f'config_list[{index}]: {error} (NNI config schema; selection keys need a list of '
                                 f'str, max_sparse_ratio a float in (0, 1])') from None
    return normalised


def _check_nni_keys(index: int, entry: dict) -> None:
    """NNI's keys, each checked with a message saying what is allowed (NNI's schema errors do not)."""
    if not any(key in entry for key in SELECTION_KEYS):
        raise HMCConfigError(f'config_list[{index}] selects nothing: give at least one of {list(SELECTION_KEYS)}, '
                             f"e.g. {{'op_types': ['Conv2d', 'Linear']}}")
    for key in SELECTION_KEYS + EXCLUSION_KEYS:
        if key not in entry:
            continue
        value = entry[key]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise HMCConfigError(f'config_list[{index}]: got {key}={value!r} but expected a list of str, '
                                 f"e.g. {key}={['Conv2d'] if 'types' in key else ['layer1.0.conv1']}")
        if key in SELECTION_KEYS and not value:
            raise HMCConfigError(f'config_list[{index}]: got {key}=[], which selects nothing; list at least one '
                                 f'{"type" if "types" in key else "name"} or leave the key out')
        if key.endswith('_re'):
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise HMCConfigError(f'config_list[{index}]: {key} holds {pattern!r}, which is not a valid regular '
                                         f'expression ({error})') from None
    if 'max_sparse_ratio' in entry:
        value = entry['max_sparse_ratio']
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise HMCConfigError(f'config_list[{index}]: got max_sparse_ratio={value!r} but expected a float in (0, 1] '
                                 f'(the largest fraction of channels pruned in the selected layers)')


def _check_hmc_keys(index: int, entry: dict) -> None:
    """HMC's keys of one entry, each checked by ``HMCSettings`` (the budget's exactly-one rule applies to all)."""
    if entry.get('margin') == 'auto':
        raise HMCConfigError(f"config_list[{index}]: got margin='auto' but {MARGIN_AUTO_HINT}")
    for key in HMCSettings.keys():
        if key in entry:
            try:
                HMCSettings.check_value(key, entry[key])
            except HMCConfigError as error:
                raise HMCConfigError(f'config_list[{index}]: {error}') from None


def settings_from_config_list(config_list: list[dict], **overrides) -> HMCSettings:
    """HMC's global settings: defaults, then the keys set in the entries (which must agree), then ``overrides``.

    ``overrides`` are ``HMCCompressor``'s keyword arguments (``None`` = not given); a budget among them
    replaces the config's budget. Raises ``HMCConfigError`` for conflicts, no budget or two budgets.
    """
    seen: dict[str, Any] = {}
    for index, entry in enumerate(config_list):
        for key in HMCSettings.keys():
            if key in entry:
                if key in seen and seen[key] != entry[key]:
                    raise HMCConfigError(f'config_list[{index}]: {key}={entry[key]!r} conflicts with {key}={seen[key]!r} '
                                         f'in an earlier entry; HMC keys are global, set each once')
                seen[key] = entry[key]
    budgets = [key for key in BUDGET_KEYS if key in seen]
    if len(budgets) > 1:
        raise HMCConfigError(f"config_list sets {' and '.join(repr(key) for key in budgets)}; keep exactly one budget")
    settings = HMCSettings(**seen)
    given = {key: value for key, value in overrides.items() if value is not None}
    if given.get('margin') == 'auto':
        raise HMCConfigError(f"Got margin='auto' but {MARGIN_AUTO_HINT}")
    settings = settings.replace(**given) if given else settings
    if not any(getattr(settings, key) is not None for key in BUDGET_KEYS):
        raise HMCConfigError("config_list sets no budget: add 'target_flops' (fraction of FLOPs to keep, "
                             "e.g. 0.5), 'target_params' or 'target_latency' to an entry")
    return settings
