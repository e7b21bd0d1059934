"""The two halves of a scan: the pruning groups (which depend on the channel ``importance``, not on the
``rank_method``) and the decomposed layers (the reverse). Each unit's drop is measured alone, so a scan of the
groups and a scan of the layers, merged, give the whole scan; cached apart, they let a search over importances and
rank methods scan each importance once and each rank method once (``experiment.shared_cache``).
"""
from __future__ import annotations

from ..errors import HMCConfigError
from .table import SensitivityTable

__all__ = ['PARTS', 'NEUTRAL_IMPORTANCE', 'NEUTRAL_RANK_METHOD', 'merge_halves']

PARTS = ('both', 'prune', 'decompose')
# what a half scans with for the setting it does not depend on, so that its recorded settings (and cache) are
# the same whatever that setting is
NEUTRAL_IMPORTANCE, NEUTRAL_RANK_METHOD = 'l1', 'auto'


def merge_halves(prune: SensitivityTable, decompose: SensitivityTable) -> SensitivityTable:
    """One table from a scan of the pruning groups only and a scan of the decomposed layers only.

    Both must have the same levels and mode; the pruning half gives the groups, its importance and the baseline,
    the decomposition half the layers, their ``decompose_methods`` and its rank method. Evaluations and seconds add.
    """
    if prune.levels != decompose.levels or prune.mode != decompose.mode:
        raise HMCConfigError(f'Got scan halves at levels {prune.levels} ({prune.mode}) and {decompose.levels} '
                             f'({decompose.mode}) but expected the same levels and mode for both')
    settings = {**prune.settings, 'rank_method': decompose.settings.get('rank_method'),
                'units': {'prune': list(prune.settings.get('units', {}).get('prune', [])),
                          'decompose': list(decompose.settings.get('units', {}).get('decompose', []))}}
    return SensitivityTable(levels=list(prune.levels), mode=prune.mode, baseline=prune.baseline,
                            prune=dict(prune.prune), decompose=dict(decompose.decompose), groups=dict(prune.groups),
                            decompose_methods=dict(decompose.decompose_methods), settings=settings,
                            evaluations=prune.evaluations + decompose.evaluations,
                            seconds=prune.seconds + decompose.seconds)
