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
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..engines.lowrank import decomposable
from ..engines.pruning import PruningGroup
from ..errors import HMCConfigError
from .cost import CostModel, shape_module
from .grouping import DEFAULT_KEEP_FACTOR, drop_curve, group_layers, time_equal_drop, weigh_decomposition
from .plan import MODES, CompressionPlan, LayerPlan, UnreachableTargetError

__all__ = ['check_table', 'build_plan', 'most_compressed_plan', 'uniform_prune_ratio']

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
               prune_spread: float | None = None, step: float = 0.05) -> CompressionPlan:
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
    prune_spread
        No group loses more than ``u + prune_spread`` of its channels, ``u`` being the one ratio that meets the
        budget when every scanned group is pruned alike (``uniform_prune_ratio``; a latency budget uses its
        fraction of the FLOPs). The scan's zero-shot drops favour thinning the few layers whose loss a refit
        hides best, down to 2 of 16 channels, which then recover least in fine-tuning; None: no such cap.
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
    groups = _sensitivity_groups(table, cost, candidates, mode, margin, keep_factor, metric, latency)
    max_ratios = dict(max_ratios or {})
    if prune_spread is not None:
        uniform = uniform_prune_ratio(cost, table, 'params' if metric == 'params' else 'flops', target, max_ratios)
        for members in table.groups.values():
            for member in members:
                max_ratios[member] = min(max_ratios.get(member, 1.0), uniform + prune_spread)
    units = _allocation_units(table, cost, groups, mode, metric, max_ratios)
    allocation = _Allocation(cost, latency, metric, round_to, step, table.levels, units.level_cap)
    full_total = allocation.total if metric == 'latency' else cost.full[metric]
    reached = _allocate(allocation, units, target * full_total)
    plan = _plan_from_state(cost, candidates, allocation.prune_ratios, allocation.dec_levels, mode, {metric: target},
                            importance, round_to, margin, latency, decompose_weight)
    if not reached:
        raise UnreachableTargetError(
            f'Got target_{metric}={target} but the selected layers can only reach {allocation.total / full_total:.3f} '
            f'of their {metric} in mode {mode!r} (levels up to {max(table.levels)}); raise the target, add layers '
            f'to the selection or add a higher level', plan, metric, target)
    return plan


def uniform_prune_ratio(cost: CostModel, table, metric: str, target: float, max_ratios: dict[str, float],
                        iterations: int = 30) -> float:
    """The one prune ratio (capped per group by ``max_ratios`` and the highest scanned level) at which pruning every
    group of ``table`` alike keeps ``target`` of the cost model's ``metric`` ('flops' or 'params'); the highest level
    when even that keeps more."""
    index = 0 if metric == 'flops' else 1
    caps = {name: min([max(table.levels)] + [max_ratios.get(member, 1.0) for member in table.groups.get(name, [name])])
            for name in table.prune}

    def kept(ratio: float) -> float:
        ratios = {name: min(ratio, cap) for name, cap in caps.items()}
        return sum(cost.layer_cost(layer, ratios, {})[index] for layer in cost.layers) / cost.full[metric]

    low, high = 0.0, max(table.levels)
    if kept(high) > target:
        return high
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if kept(middle) > target else (low, middle)
    return high


def _sensitivity_groups(table, cost: CostModel, candidates: Sequence[str], mode: str, margin: float | None,
                        keep_factor: float, metric: str, latency) -> dict[str, str]:
    """Step 1, the grouping: layer -> 'prune', 'decompose', 'both' or 'keep' (``grouping.group_layers``).

    Grouping compares the operators at equal savings: of FLOPs (the levels), or of measured time under a
    latency budget, where a decomposition that never saves time is no candidate.
    """
    score = time_equal_drop(table, cost, latency) if metric == 'latency' else None
    groups = group_layers(table, candidates, mode, margin, keep_factor, score)
    if metric == 'latency' and mode == 'decompose':
        for layer, group in groups.items():
            if group == 'decompose' and math.isinf(score('decompose', layer)):
                groups[layer] = 'keep'
    return groups


Unit = tuple[str, str]  # ('prune', group name) or ('decompose', layer name)


DropCurve = Callable[[float], float]  # level -> interpolated metric drop (``grouping.drop_curve``)


@dataclass
class _Units:
    """Step 2, what the allocation may compress: unit -> drop curve, in the order units are tried.

    ``active`` is allocated from the start; ``keep_reserve`` (layers grouped 'keep', by their cheaper
    operator) joins only when the budget needs it, then ``latency_reserve`` (under a latency budget,
    pruning the groups the grouping left to decomposition). ``level_cap`` caps every unit's level.
    ``displaced`` names, for each unit of the latency reserve, the decompositions of its members grouped
    'decompose': pruning such a group regroups those layers to pruning, so they are no longer decomposed (a
    layer is both pruned and decomposed only when its sensitivity puts it in 'both').
    """

    active: dict[Unit, DropCurve]
    keep_reserve: dict[Unit, DropCurve]
    latency_reserve: dict[Unit, DropCurve]
    level_cap: dict[Unit, float]
    displaced: dict[Unit, list[Unit]] = field(default_factory=dict)


def _allocation_units(table, cost: CostModel, groups: dict[str, str], mode: str, metric: str,
                      max_ratios: dict[str, float]) -> _Units:
    """The units each sensitivity group allows, the two reserves (``_add_reserves``), and every unit's level cap."""
    units = _Units({}, {}, {}, {})
    for group_name, members in table.groups.items():
        allowed = [m for m in members if groups.get(m) in ('prune', 'both')]
        if group_name in table.prune and allowed and 2 * len(allowed) >= len(members):
            _add_unit(units.active, units, table, ('prune', group_name), max_ratios)
    # grouped/depthwise convs are never decomposed, whatever the table holds
    decomposable_layers = {name for name in table.decompose if name in cost.layers and decomposable(
        shape_module(cost.layers[name], cost.layers[name].in_channels, cost.layers[name].out_channels))}
    for layer, group in groups.items():
        if group in ('decompose', 'both') and layer in decomposable_layers:
            _add_unit(units.active, units, table, ('decompose', layer), max_ratios)
    if mode not in ('prune', 'decompose'):
        _add_reserves(units, table, groups, decomposable_layers, metric, max_ratios)
    return units


def _add_reserves(units: _Units, table, groups: dict[str, str], decomposable_layers: set[str], metric: str,
                  max_ratios: dict[str, float]) -> None:
    """Each layer grouped 'keep' by its cheaper operator, and under a latency budget every other pruning group."""
    group_of_member = {member: name for name, members in table.groups.items() for member in members}
    for layer, group in groups.items():
        if group != 'keep':
            continue
        options = [('prune', group_of_member[layer])] if group_of_member.get(layer) in table.prune else []
        options += [('decompose', layer)] if layer in decomposable_layers else []
        options = [unit for unit in options if unit not in units.active]
        if options:
            _add_unit(units.keep_reserve, units, table, min(options, key=lambda u: table.mean_drop(*u)), max_ratios)
    if metric == 'latency':
        for group_name in table.prune:
            unit = ('prune', group_name)
            if unit not in units.active and unit not in units.keep_reserve and group_name in table.groups:
                _add_unit(units.latency_reserve, units, table, unit, max_ratios)
                units.displaced[unit] = [('decompose', member) for member in table.groups[group_name]
                                         if groups.get(member) == 'decompose' and ('decompose', member) in units.active]


def _add_unit(into: dict[Unit, DropCurve], units: _Units, table, unit: Unit, max_ratios: dict[str, float]) -> None:
    """Put ``unit`` with its drop curve into ``into``; its cap is the highest level, and for a group the
    smallest ``max_ratios`` of its members too."""
    operator, name = unit
    into[unit] = drop_curve(table.levels, getattr(table, operator)[name])
    max_level = max(table.levels)
    units.level_cap[unit] = max_level if operator == 'decompose' else min(
        [max_level] + [max_ratios.get(member, 1.0) for member in table.groups[name]])


class _Allocation:
    """Step 3, the greedy allocation's state: group prune ratios, decomposition levels and what each layer costs.

    Costs are in the budget's unit: MACs per image ('flops'), parameters ('params') or predicted
    milliseconds ('latency'); ``total`` is their sum over the cost model's layers.
    """

    def __init__(self, cost: CostModel, latency, metric: str, round_to: int, step: float, levels: Sequence[float],
                 level_cap: dict[Unit, float]):
        self.cost, self.latency, self.metric, self.round_to, self.step = cost, latency, metric, round_to, step
        self.scanned_levels = sorted(levels)
        self.level_cap = level_cap
        self.prune_ratios: dict[str, float] = {}
        self.dec_levels: dict[str, float] = {}
        self.layer_costs = {name: self.layer_cost(name, self.prune_ratios, self.dec_levels) for name in cost.layers}
        self.total = sum(self.layer_costs.values())

    def layer_cost(self, name: str, prune_ratios: dict[str, float], dec_levels: dict[str, float]) -> float:
        if self.metric == 'latency':
            return self.latency.layer_ms(name, prune_ratios, dec_levels, self.round_to)
        return self.cost.layer_cost(name, prune_ratios, dec_levels, self.round_to)[0 if self.metric == 'flops' else 1]

    def level_of(self, unit: Unit) -> float:
        return (self.prune_ratios if unit[0] == 'prune' else self.dec_levels).get(unit[1], 0.0)

    def next_level(self, unit: Unit, level: float) -> float:
        if self.metric == 'latency' and unit[0] == 'decompose':  # only the timed levels
            return next((scanned for scanned in self.scanned_levels if scanned > level + 1e-9), self.level_cap[unit])
        return min(self.level_cap[unit], round(level + self.step, 6))

    def costs_with(self, unit: Unit, level: float) -> dict[str, float]:
        """Costs of the layers ``unit`` affects, were it at ``level``."""
        operator, name = unit
        trial_prune = dict(self.prune_ratios)
        trial_dec = dict(self.dec_levels)
        (trial_prune if operator == 'prune' else trial_dec)[name] = level
        affected = self.cost.affected[name] if operator == 'prune' else [name]
        return {layer: self.layer_cost(layer, trial_prune, trial_dec) for layer in affected}

    def first_saving_step(self, unit: Unit, level: float) -> tuple[float, dict[str, float], float]:
        """``(new_level, new_costs, saved)`` of the first level above ``level`` that saves, or of the cap.

        Small layers save nothing at the first steps (ranks clipped to the channels, rounding): without
        looking ahead such a unit would never move.
        """
        new_level = level
        while True:
            new_level = self.next_level(unit, new_level)
            new_costs = self.costs_with(unit, new_level)
            saved = sum(self.layer_costs[name] - value for name, value in new_costs.items())
            if saved > 0 or new_level >= self.level_cap[unit] - 1e-9:
                return new_level, new_costs, saved

    def cheapest_step(self, units: dict[Unit, DropCurve]):
        """``(score, unit, new_level, new_costs, saved)`` of the least drop per cost saved, or None if no unit saves."""
        best = None
        for unit, curve in units.items():
            level = self.level_of(unit)
            if level >= self.level_cap[unit] - 1e-9:
                continue
            new_level, new_costs, saved = self.first_saving_step(unit, level)
            if saved <= 0:
                continue
            score = (curve(new_level) - curve(level) + 1e-12) / saved
            if best is None or score < best[0]:
                best = (score, unit, new_level, new_costs, saved)
        return best

    def undo(self, unit: Unit) -> None:
        """Put ``unit`` back to level 0 (not compressed), with the costs of its layers."""
        levels = self.prune_ratios if unit[0] == 'prune' else self.dec_levels
        if unit[1] not in levels:
            return
        del levels[unit[1]]
        affected = self.cost.affected[unit[1]] if unit[0] == 'prune' else [unit[1]]
        for name in affected:
            restored = self.layer_cost(name, self.prune_ratios, self.dec_levels)
            self.total += restored - self.layer_costs[name]
            self.layer_costs[name] = restored

    def take(self, unit: Unit, new_level: float, new_costs: dict[str, float], saved: float) -> None:
        (self.prune_ratios if unit[0] == 'prune' else self.dec_levels)[unit[1]] = new_level
        self.layer_costs.update(new_costs)
        self.total -= saved


_KEEP_RESERVE_WARNING = ('The budget needs layers grouped "keep" (too sensitive to both operators): compressing %d of '
                         'them with their cheaper operator')


_LATENCY_RESERVE_WARNING = ('The latency budget needs more time saved than the sensitivity groups allow (decomposition '
                            'saves little time on this CPU): also pruning %d channel group(s) whose layers were grouped '
                            'for decomposition')


def _allocate(allocation: _Allocation, units: _Units, goal: float) -> bool:
    """Step 4, the greedy loop: take the cheapest step until ``allocation.total <= goal``, calling in the
    reserves in turn when no active unit can move. False when every unit reaches its cap first (the target
    is out of reach)."""
    active = units.active
    reserves = [(reserve, warning) for reserve, warning in ((units.keep_reserve, _KEEP_RESERVE_WARNING),
                                                            (units.latency_reserve, _LATENCY_RESERVE_WARNING)) if reserve]
    while allocation.total > goal:
        best = allocation.cheapest_step(active)
        if best is None and reserves:
            reserve, warning = reserves.pop(0)
            _logger.warning(warning, len(reserve))
            active.update(reserve)
            for unit in reserve:
                for displaced in units.displaced.get(unit, []):  # regrouped to pruning: no longer decomposed
                    active.pop(displaced, None)
                    allocation.undo(displaced)
            continue
        if best is None:
            return False
        _, unit, new_level, new_costs, saved = best
        allocation.take(unit, new_level, new_costs, saved)
    return True


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
    fewer). Measure it (``planning.measure.measure_plan``) for the lowest kept fraction of the whole model.
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
        if layer is None or not decomposable(shape_module(layer, layer.in_channels, layer.out_channels)):
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
