"""Sensitivity grouping and budget allocation: from a ``SensitivityTable`` to a ``CompressionPlan``.

Grouping (per layer, from the mean drop of each operator over the scanned levels, in units of the
median drop ``sigma`` over all units and both operators, margin ``tau``):

- ``keep`` when even the better operator drops more than ``(keep_factor + tau) * sigma``;
- ``both`` (prune then decompose) when the two drops differ by at most ``tau * sigma``;
- otherwise ``prune`` or ``decompose``, whichever drops less.

``tau = inf`` puts every layer in ``both``: that is AHC, and ``mode='hmc', margin=inf`` gives
exactly AHC's plan. ``nahc`` is ``hmc`` with the default margin. ``prune`` and ``decompose`` allow
one operator everywhere.

Allocation: every allowed unit (a pruning group, or a layer to decompose) climbs its level in
steps of ``step``; each step taken is the one with the least interpolated metric drop per FLOP
(parameter, or millisecond of measured CPU time: ``latency.LatencyModel``) saved, until the model's
cost is at most the target fraction of the original.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

from ..engines.lowrank import decomposable
from ..engines.pruning import PruningGroup
from ..errors import HMCConfigError
from .cost import CostModel, _shape_module
from .grouping import DEFAULT_KEEP_FACTOR, _drop_curve, _time_equal_drop, group_layers, weigh_decomposition
from .plan import MODES, CompressionPlan, LayerPlan, UnreachableTargetError

__all__ = ['check_table', 'build_plan', 'most_compressed_plan']

_logger = logging.getLogger(__name__)


def check_table(table) -> None:
    """Raise ``HMCConfigError`` naming the unit and level if a drop is missing or not a finite number.

    A NaN drop (an evaluator or a model that produced NaN) would otherwise sort arbitrarily and give a
    meaningless plan.
    """
    levels = list(table.levels)
    if not levels or any(not isinstance(level, (int, float)) or not 0 < level < 1 for level in levels) \
            or levels != sorted(set(levels)):
        raise HMCConfigError(f'The sensitivity table has levels={levels} but expected increasing fractions in (0, 1)')
    for operator in ('prune', 'decompose'):
        for name, drops in getattr(table, operator).items():
            if not isinstance(drops, list) or len(drops) != len(levels):
                raise HMCConfigError(f'The sensitivity table has {operator}[{name!r}]={drops!r} but expected one drop '
                                     f'per level {levels}: finish the scan (rerun it with the same cache_path)')
            for level, drop in zip(levels, drops):
                if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not math.isfinite(drop):
                    raise HMCConfigError(
                        f'The sensitivity table has a drop of {drop!r} for {operator} {name!r} at level {level}; every '
                        f'drop must be a finite number. The scan\'s metric was not finite there: check the model\'s '
                        f'weights and the evaluator, then rescan (delete the cache file)')


def build_plan(table, cost: CostModel, *, mode: str = 'nahc', target_flops: float | None = None,
               target_params: float | None = None, target_latency: float | None = None, latency=None,
               margin: float | None = None, decompose_weight: float = 1.0, keep_factor: float = DEFAULT_KEEP_FACTOR,
               importance: str = 'l1', round_to: int = 1, max_ratios: dict[str, float] | None = None,
               step: float = 0.05) -> CompressionPlan:
    """Group layers by sensitivity, then allocate levels until the cost meets the target.

    Parameters
    ----------
    table
        ``SensitivityTable`` of the model the cost model was built on.
    target_flops, target_params, target_latency
        Fraction of the original FLOPs (MACs), parameters or CPU time to keep, in (0, 1]; exactly one.
    latency
        ``latency.LatencyModel`` of the same model, needed by ``target_latency``. The allocation then
        takes the least drop per millisecond saved, decomposes only at the scanned (timed) levels, and
        never takes a step that does not save time (a decomposition slower than the layer it replaces).
    decompose_weight
        The operators' exchange rate: every decomposition drop counts this many times, in grouping and
        allocation alike (> 0; 1 takes the scan as it is; ``inf`` never decomposes). A zero-shot scan says
        how much each operator changes the outputs, not how well fine-tuning recovers from it; a weight
        above 1 says that decomposed layers recover less (``workflow.choose_margin`` can pick it by short
        fine-tunes).
    max_ratios
        Layer name -> cap on the prune ratio of its group (NNI's ``max_sparse_ratio``); a group takes the
        smallest cap of its members.
    step
        Level increment of the greedy allocation (levels between scanned ones are interpolated).

    Returns
    -------
    CompressionPlan
        ``predicted`` holds the cost model's kept fractions; measure the compressed model for the truth.
    """
    metric, target = _parse_target(target_flops, target_params, target_latency)
    if metric == 'latency' and latency is None:
        raise HMCConfigError('target_latency needs a latency model: build_plan(..., latency=LatencyModel(...))')
    check_table(table)
    table = weigh_decomposition(table, decompose_weight)
    candidates = [name for name in cost.layers if name in table.decompose or name in _members(table)]
    # Grouping compares the operators at equal savings: of FLOPs (the levels), or of measured time.
    score = _time_equal_drop(table, cost, latency) if metric == 'latency' else None
    groups = group_layers(table, candidates, mode, margin, keep_factor, score)
    max_level = max(table.levels)
    if metric == 'latency' and mode == 'decompose':  # a decomposition that never saves time is not a candidate
        for layer, group in groups.items():
            if group == 'decompose' and math.isinf(score('decompose', layer)):
                groups[layer] = 'keep'

    max_ratios = max_ratios or {}
    units: dict[tuple[str, str], Any] = {}
    unit_max: dict[tuple[str, str], float] = {}
    for group_name, members in table.groups.items():
        allowed = [m for m in members if groups.get(m) in ('prune', 'both')]
        if group_name in table.prune and allowed and 2 * len(allowed) >= len(members):
            units[('prune', group_name)] = _drop_curve(table.levels, table.prune[group_name])
            unit_max[('prune', group_name)] = min([max_level] + [max_ratios.get(m, 1.0) for m in members])
    # grouped/depthwise convs are never decomposed, whatever the table holds
    decomposable_layers = {name for name in table.decompose if name in cost.layers and decomposable(
        _shape_module(cost.layers[name], cost.layers[name].in_channels, cost.layers[name].out_channels))}
    for layer, group in groups.items():
        if group in ('decompose', 'both') and layer in decomposable_layers:
            units[('decompose', layer)] = _drop_curve(table.levels, table.decompose[layer])
            unit_max[('decompose', layer)] = max_level
    # Layers grouped 'keep' are compressed (by their cheaper operator) only if the budget needs them.
    reserve: dict[tuple[str, str], Any] = {}
    group_of_member = {member: name for name, members in table.groups.items() for member in members}
    for layer, group in groups.items():
        if group != 'keep' or mode in ('prune', 'decompose'):
            continue
        options = [('prune', group_of_member[layer])] if group_of_member.get(layer) in table.prune else []
        options += [('decompose', layer)] if layer in decomposable_layers else []
        options = [unit for unit in options if unit not in units]
        if options:
            unit = min(options, key=lambda u: table.mean_drop(*u))
            reserve[unit] = _drop_curve(table.levels, getattr(table, unit[0])[unit[1]])
            unit_max[unit] = max_level if unit[0] == 'decompose' else min(
                [max_level] + [max_ratios.get(m, 1.0) for m in table.groups[unit[1]]])

    # Under a latency budget, the last resort is pruning the groups the grouping left to decomposition.
    latency_reserve: dict[tuple[str, str], Any] = {}
    if metric == 'latency' and mode not in ('prune', 'decompose'):
        for group_name in table.prune:
            unit = ('prune', group_name)
            if unit not in units and unit not in reserve and group_name in table.groups:
                latency_reserve[unit] = _drop_curve(table.levels, table.prune[group_name])
                unit_max[unit] = min([max_level] + [max_ratios.get(m, 1.0) for m in table.groups[group_name]])

    prune_ratios: dict[str, float] = {}
    dec_levels: dict[str, float] = {}
    def layer_cost(name, prune_state, dec_state):
        if metric == 'latency':
            return latency.layer_ms(name, prune_state, dec_state, round_to)
        return cost.layer_cost(name, prune_state, dec_state, round_to)[0 if metric == 'flops' else 1]

    layer_costs = {name: layer_cost(name, prune_ratios, dec_levels) for name in cost.layers}
    total = sum(layer_costs.values())
    full_total = total if metric == 'latency' else cost.full[metric]
    goal = target * full_total
    scanned_levels = sorted(table.levels)

    def next_level(unit, level):
        if metric == 'latency' and unit[0] == 'decompose':  # only the timed levels
            return next((scanned for scanned in scanned_levels if scanned > level + 1e-9), unit_max[unit])
        return min(unit_max[unit], round(level + step, 6))

    def affected(unit):
        operator, name = unit
        return cost.affected[name] if operator == 'prune' else [name]

    def level_of(unit):
        return (prune_ratios if unit[0] == 'prune' else dec_levels).get(unit[1], 0.0)

    def costs_with(unit, level):
        trial_prune = dict(prune_ratios)
        trial_dec = dict(dec_levels)
        (trial_prune if unit[0] == 'prune' else trial_dec)[unit[1]] = level
        return {name: layer_cost(name, trial_prune, trial_dec) for name in affected(unit)}

    while total > goal:
        best = None
        for unit, curve in units.items():
            level = level_of(unit)
            if level >= unit_max[unit] - 1e-9:
                continue
            # Small layers save nothing at the first steps (ranks clipped to the channels, rounding): look
            # ahead to the first level that saves, or such a unit would never move.
            new_level = level
            while True:
                new_level = next_level(unit, new_level)
                new_costs = costs_with(unit, new_level)
                saved = sum(layer_costs[name] - value for name, value in new_costs.items())
                if saved > 0 or new_level >= unit_max[unit] - 1e-9:
                    break
            if saved <= 0:
                continue
            score = (curve(new_level) - curve(level) + 1e-12) / saved
            if best is None or score < best[0]:
                best = (score, unit, new_level, new_costs, saved)
        if best is None and reserve:
            _logger.warning('The budget needs layers grouped "keep" (too sensitive to both operators): '
                            'compressing %d of them with their cheaper operator', len(reserve))
            units.update(reserve)
            reserve = {}
            continue
        if best is None and latency_reserve:
            _logger.warning('The latency budget needs more time saved than the sensitivity groups allow (decomposition '
                            'saves little time on this CPU): also pruning %d channel group(s) whose layers were grouped '
                            'for decomposition', len(latency_reserve))
            units.update(latency_reserve)
            latency_reserve = {}
            continue
        if best is None:
            reachable = total / full_total
            raise UnreachableTargetError(
                f'Got target_{metric}={target} but the selected layers can only reach {reachable:.3f} of their '
                f'{metric} in mode {mode!r} (levels up to {max_level}); raise the target, add layers '
                f'to the selection or add a higher level',
                _plan_from_state(cost, candidates, prune_ratios, dec_levels, mode, {metric: target}, importance,
                                 round_to, margin, latency, decompose_weight), metric, target)
        _, unit, new_level, new_costs, saved = best
        (prune_ratios if unit[0] == 'prune' else dec_levels)[unit[1]] = new_level
        layer_costs.update(new_costs)
        total -= saved

    return _plan_from_state(cost, candidates, prune_ratios, dec_levels, mode, {metric: target}, importance, round_to,
                            margin, latency, decompose_weight)


def _plan_from_state(cost: CostModel, candidates: Sequence[str], prune_ratios: dict[str, float],
                     dec_levels: dict[str, float], mode: str, target: dict[str, float], importance: str,
                     round_to: int, margin: float | None, latency=None, decompose_weight: float = 1.0) -> CompressionPlan:
    """The plan of an allocation state: group prune ratios and per-layer decomposition levels."""
    plan_layers = []
    for name in candidates:
        group_name = cost.out_group.get(name)
        ratio = prune_ratios.get(group_name, 0.0)
        _, _, ranks, method = cost.layer_cost(name, prune_ratios, dec_levels, round_to)
        group = {(True, True): 'both', (True, False): 'prune', (False, True): 'decompose',
                 (False, False): 'keep'}[(ratio > 0, ranks is not None)]
        plan_layers.append(LayerPlan(name, group, ratio, group_name, method, ranks))
    predicted = {key: sum(cost.layer_cost(name, prune_ratios, dec_levels, round_to)[i] for name in cost.layers) / cost.full[key]
                 for i, key in enumerate(('flops', 'params'))}
    if latency is not None:
        predicted['latency'] = latency.predict_ms(prune_ratios, dec_levels, round_to) / latency.predict_ms({}, {})
    return CompressionPlan(plan_layers, mode, dict(target), importance, round_to,
                           margin if mode in ('hmc', 'nahc') else None, float(decompose_weight), predicted)


def most_compressed_plan(cost: CostModel, groups: Sequence[PruningGroup], layers: Sequence[str], *, mode: str,
                         level: float, metric: str = 'flops', max_ratios: dict[str, float] | None = None,
                         round_to: int = 1) -> CompressionPlan:
    """Every pruning group and every decomposable layer of ``layers`` at ``level``: the lowest cost a plan can reach.

    Groups are capped by the smallest ``max_ratios`` of their members; a layer is decomposed only where
    that lowers its ``metric`` ('flops' or 'params'; tiny layers may not gain). ``mode`` 'prune' only
    prunes, 'decompose' only decomposes, the others do both (the bound of 'nahc' / 'hmc', which may use
    fewer). Measure it (``apply.measure_plan``) for the lowest kept fraction of the whole model.
    """
    if mode not in MODES:
        raise HMCConfigError(f"Got mode={mode!r} but expected one of {MODES}")
    index = {'flops': 0, 'params': 1}[metric]
    max_ratios = max_ratios or {}
    prune_ratios = {} if mode == 'decompose' else {
        group.name: min([level] + [max_ratios.get(member, 1.0) for member in group.members]) for group in groups}
    dec_levels: dict[str, float] = {}
    for name in [] if mode == 'prune' else layers:
        layer = cost.layers.get(name)
        if layer is None or not decomposable(_shape_module(layer, layer.in_channels, layer.out_channels)):
            continue
        if cost.layer_cost(name, prune_ratios, {name: level}, round_to)[index] < \
                cost.layer_cost(name, prune_ratios, {}, round_to)[index]:
            dec_levels[name] = level
    candidates = [name for name in cost.layers
                  if name in dec_levels or any(name in group.members for group in groups)]
    return _plan_from_state(cost, candidates, prune_ratios, dec_levels, mode, {}, 'l1', round_to, None)


def _members(table) -> set[str]:
    return {member for group in table.prune for member in table.groups.get(group, [])}


def _parse_target(target_flops, target_params, target_latency=None) -> tuple[str, float]:
    given = {key: value for key, value in (('flops', target_flops), ('params', target_params),
                                           ('latency', target_latency)) if value is not None}
    if len(given) != 1:
        raise HMCConfigError(f'Got targets {given or "none"} but expected exactly one of target_flops, target_params, '
                             f'target_latency')
    (metric, target), = given.items()
    if not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise HMCConfigError(f'Got target_{metric}={target!r} but expected a fraction to keep in (0, 1]')
    return metric, float(target)
