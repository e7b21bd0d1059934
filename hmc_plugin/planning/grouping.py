"""Grouping: which operators each layer may get (``group_layers``), from its two drop curves and the mode."""
from __future__ import annotations

import copy
import functools
import math
import statistics
from typing import Sequence

import numpy as np

from ..errors import HMCConfigError
from .cost import CostModel
from .plan import MODES

__all__ = ['group_layers', 'weigh_decomposition', 'drop_curve', 'time_equal_drop']

DEFAULT_MARGIN = 0.5


DEFAULT_KEEP_FACTOR = 4.0


def group_layers(table, layers: Sequence[str], mode: str, margin: float | None = None,
                 keep_factor: float = DEFAULT_KEEP_FACTOR, score=None) -> dict[str, str]:
    """Sensitivity group of each layer: 'prune', 'decompose', 'both' or 'keep' (see module docstring).

    ``score(operator, unit) -> float`` is a unit's sensitivity (default: ``table.mean_drop``, the mean drop
    at equal FLOPs removed); ``inf`` marks an operator that saves nothing (never the better one).
    """
    if mode not in MODES:
        raise HMCConfigError(f"Got mode={mode!r} but expected one of {MODES}")
    score = score or table.mean_drop
    group_of_member = {member: group for group, members in table.groups.items() for member in members}
    prune_score = {layer: score('prune', group_of_member[layer])
                   for layer in layers if group_of_member.get(layer) in table.prune}
    decompose_score = {layer: score('decompose', layer) for layer in layers if layer in table.decompose}
    if mode == 'prune':
        return {layer: 'prune' if layer in prune_score else 'keep' for layer in layers}
    if mode == 'decompose':
        return {layer: 'decompose' if layer in decompose_score else 'keep' for layer in layers}
    tau = math.inf if mode == 'ahc' else (DEFAULT_MARGIN if margin is None else float(margin))
    if tau < 0:
        raise HMCConfigError(f'Got margin={margin} but expected a number >= 0 (inf reproduces AHC)')
    all_scores = [max(value, 0.0) for value in list(prune_score.values()) + list(decompose_score.values())
                  if math.isfinite(value)]
    sigma = statistics.median(all_scores) if all_scores else 0.0
    sigma = sigma if sigma > 0 else (max(all_scores, default=0.0) or 1.0)
    groups = {}
    for layer in layers:
        scores = {op: s[layer] for op, s in (('prune', prune_score), ('decompose', decompose_score)) if layer in s}
        if not scores:
            groups[layer] = 'keep'
            continue
        best_op = min(scores, key=scores.get)
        best = max(scores[best_op], 0.0)
        if len(scores) == 2 and (math.isinf(tau) or abs(scores['prune'] - scores['decompose']) <= tau * sigma):
            groups[layer] = 'both'
        elif best > (keep_factor + tau) * sigma:
            groups[layer] = 'keep'
        else:
            groups[layer] = best_op
    return groups


def drop_curve(levels: Sequence[float], drops: Sequence[float]):
    """Monotone piecewise-linear drop(level), with drop(0) = 0."""
    xs = np.array([0.0] + list(levels))
    ys = np.maximum.accumulate(np.maximum(np.array([0.0] + list(drops)), 0.0))
    return lambda level: float(np.interp(level, xs, ys))


def weigh_decomposition(table, decompose_weight: float):
    """``table`` with every decomposition drop multiplied by ``decompose_weight`` (a copy; ``table`` itself when 1).

    ``inf`` leaves no decomposition in the copy: decomposition is never chosen, and the ``hmc`` grouping at
    ``margin=inf`` is then prune-only's (every prunable layer may be pruned).
    """
    if isinstance(decompose_weight, bool) or not isinstance(decompose_weight, (int, float)) \
            or math.isnan(decompose_weight) or decompose_weight <= 0:
        raise HMCConfigError(f'Got decompose_weight={decompose_weight!r} but expected a number > 0 (1 takes the '
                             f'scan as it is; above 1, decomposition counts as more harmful than the scan says; '
                             f'inf never decomposes)')
    if decompose_weight == 1:
        return table
    weighed = copy.copy(table)
    weighed.decompose = {} if math.isinf(decompose_weight) else {
        name: [drop * decompose_weight for drop in drops] for name, drops in table.decompose.items()}
    return weighed


def time_equal_drop(table, cost: CostModel, latency):
    """``score(operator, unit)``: the unit's mean drop rescaled to equal time saved, for latency budgets.

    Level ``c`` removes a fraction ``c`` of the unit's FLOPs; if it saves a fraction ``s`` of the affected
    layers' measured time, its drop counts ``c / s`` times (a decomposition that saves half the time its
    FLOPs promise counts double). Levels that save no time are left out; ``inf`` if none saves any.
    """
    @functools.lru_cache(maxsize=None)
    def saved_fraction(operator: str, unit: str, level: float) -> float:
        if operator == 'decompose':
            return 1.0 - latency.decomposition_factor(unit, level)
        affected = cost.affected.get(unit, [])
        before = sum(latency.layer_ms(name, {}, {}) for name in affected)
        after = sum(latency.layer_ms(name, {unit: level}, {}) for name in affected)
        return (before - after) / before if before > 0 else 0.0

    def score(operator: str, unit: str) -> float:
        drops = getattr(table, operator)[unit]
        rescaled = [max(drop, 0.0) * level / saved for level, drop in zip(table.levels, drops)
                    if (saved := saved_fraction(operator, unit, level)) > 1e-9]
        return sum(rescaled) / len(rescaled) if rescaled else math.inf

    return score
