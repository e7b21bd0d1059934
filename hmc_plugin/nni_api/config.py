"""HMC's config keys on top of NNI's pruning ``config_list`` schema, validated before the model is touched.

A ``config_list`` entry keeps NNI's selection keys (``op_types``, ``op_names``, ``op_names_re``,
``exclude_op_names``, ``exclude_op_types``, ``exclude_op_names_re``) and NNI's ``max_sparse_ratio``
(cap on the channel ratio pruned in the selected layers), and adds HMC's keys below. HMC's keys are
global settings: entries that repeat one must agree.
"""
from __future__ import annotations

import difflib
import math
import re
from copy import deepcopy
from typing import Any

from nni.compression.base.config import default_config_schema, trans_legacy_config_list
from schema import SchemaError

from ..engines.pruning import IMPORTANCES
from ..errors import HMCConfigError
from ..planning.plan import MODES

__all__ = ['BUDGET_KEYS', 'HMC_DEFAULTS', 'HMC_KEYS', 'NNI_KEYS', 'validate_config_list', 'hmc_settings', 'budget']

BUDGET_KEYS = ('target_flops', 'target_params', 'target_latency')


DECOMPOSITIONS = ('auto', 'tucker2', 'cp')


HMC_DEFAULTS: dict[str, Any] = {
    'mode': 'nahc', 'target_flops': None, 'target_params': None, 'target_latency': None, 'latency_batch': 1,
    'latency_threads': None, 'levels': [0.2, 0.4, 0.6, 0.8],
    'importance': 'l1', 'rank_method': 'auto', 'margin': None, 'decompose_weight': 1.0, 'sensitivity': 'proxy',
    'round_to': 1, 'speedup': 'nni', 'distill': False, 'distill_alpha': 0.5, 'distill_temperature': 4.0,
}


def _fraction_open_closed(value):  # (0, 1]
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def _levels(value):
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, (int, float)) and 0 < v < 1 for v in value) and list(value) == sorted(set(value)))


def _margin(value):
    return value in ('inf', math.inf) or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0)


# key -> (check, what is allowed)
HMC_KEYS: dict[str, tuple[Any, str]] = {
    'mode': (lambda v: v in MODES, f'one of {MODES}'),
    'target_flops': (_fraction_open_closed, 'a fraction of the FLOPs to keep in (0, 1]'),
    'target_params': (_fraction_open_closed, 'a fraction of the parameters to keep in (0, 1]'),
    'target_latency': (_fraction_open_closed, "a fraction of the model's measured CPU time to keep in (0, 1]"),
    'latency_batch': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                      'the batch size (an int >= 1) at which target_latency is measured'),
    'latency_threads': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                        'the torch thread count (an int >= 1) at which target_latency is measured'),
    'levels': (_levels, 'increasing fractions in (0, 1), e.g. [0.2, 0.4, 0.6, 0.8]'),
    # 'taylor' scores channels by gradients of labelled batches, which HMCCompressor does not take
    'importance': (lambda v: v in IMPORTANCES and v != 'taylor',
                   f"one of {tuple(i for i in IMPORTANCES if i != 'taylor')} ('taylor' needs labelled calibration "
                   f"batches: use it through hmc_plugin.engines.pruning.channel_masks(..., calibration=(inputs, targets)))"),
    'rank_method': (lambda v: v in DECOMPOSITIONS, f'one of {DECOMPOSITIONS} (decomposition of kxk convs)'),
    'margin': (_margin, "a number >= 0 or 'inf' (inf reproduces AHC); 'auto' (HMC's margin rule) needs held-out "
                        "training data: run `hmc compress --mode hmc --margin auto`, or pass the plan of "
                        "hmc_plugin.app.workflow.plan_by_margin_rule as HMCCompressor(plan=...)"),
    'decompose_weight': (lambda v: v in ('inf', math.inf) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               and 0 < v < math.inf),
                         "a number > 0 or 'inf': each decomposition drop of the scan counts this many times "
                         "(1 = as scanned, inf = never decompose)"),
    'sensitivity': (lambda v: v in ('proxy', 'kl', 'evaluator'),
                    "'proxy' (Fisher estimate of the KL, one pass), 'kl' (KL per unit and level) or 'evaluator'"),
    'round_to': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, 'an int >= 1'),
    'speedup': (lambda v: v in ('nni', 'torch_pruning'), "'nni' or 'torch_pruning'"),
    'distill': (lambda v: isinstance(v, bool), 'True or False'),
    'distill_alpha': (_fraction_open_closed, 'a weight in (0, 1] of the distillation loss'),
    'distill_temperature': (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, 'a number > 0'),
}


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
    allowed = sorted(set(NNI_KEYS) | set(HMC_KEYS))
    for index, entry in enumerate(normalised):
        for key, value in entry.items():
            if key in NNI_KEYS_NOT_USED:
                raise HMCConfigError(f'config_list[{index}]: key {key!r} is not used by HMCCompressor: {NNI_KEYS_NOT_USED[key]}')
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f' (did you mean {close[0]!r}?)' if close else ''
                raise HMCConfigError(f'config_list[{index}]: unknown key {key!r}{suggestion}; allowed keys are {allowed}')
            if key in HMC_KEYS:
                check, expected = HMC_KEYS[key]
                if not check(value):
                    raise HMCConfigError(f'config_list[{index}]: got {key}={value!r} but expected {expected}')
        _check_nni_keys(index, entry)
        nni_part = {key: value for key, value in entry.items() if key not in HMC_KEYS}
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


def hmc_settings(config_list: list[dict], **overrides) -> dict[str, Any]:
    """HMC's global settings: defaults, then keys set in the entries (which must agree), then ``overrides``."""
    settings = dict(HMC_DEFAULTS)
    seen: dict[str, Any] = {}
    for index, entry in enumerate(config_list):
        for key in HMC_KEYS:
            if key in entry:
                if key in seen and seen[key] != entry[key]:
                    raise HMCConfigError(f'config_list[{index}]: {key}={entry[key]!r} conflicts with {key}={seen[key]!r} '
                                         f'in an earlier entry; HMC keys are global, set each once')
                seen[key] = entry[key]
    settings.update(seen)
    for key, value in overrides.items():
        if value is not None:
            check, expected = HMC_KEYS[key]
            if not check(value):
                raise HMCConfigError(f'Got {key}={value!r} but expected {expected}')
            settings[key] = value
    for key in ('margin', 'decompose_weight'):
        if settings[key] == 'inf':
            settings[key] = math.inf
    budgets = [key for key in BUDGET_KEYS if settings[key] is not None]
    if not budgets:
        raise HMCConfigError("config_list sets no budget: add 'target_flops' (fraction of FLOPs to keep, "
                             "e.g. 0.5), 'target_params' or 'target_latency' to an entry")
    if len(budgets) > 1:
        raise HMCConfigError(f"config_list sets {' and '.join(repr(key) for key in budgets)}; keep exactly one budget")
    return settings


def budget(settings: dict[str, Any]) -> tuple[str, float]:
    """``('flops' | 'params' | 'latency', fraction to keep)`` of validated settings."""
    key = next(key for key in BUDGET_KEYS if settings[key] is not None)
    return key[len('target_'):], settings[key]
