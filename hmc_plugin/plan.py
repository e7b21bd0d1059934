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

import copy
import functools
import logging
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from torch import nn

from .counting import forward_with_hooks
from .errors import HMCConfigError
from .jsonio import decode_float, encode_float, read_json, write_json
from .lowrank import decomposable, flops_ratio, method_for, replacement_params, resolve_ranks
from .pruning import PruningGroup, kept_channels

__all__ = ['MODES', 'LayerPlan', 'CompressionPlan', 'LayerCost', 'CostModel', 'group_layers', 'build_plan',
           'most_compressed_plan', 'UnreachableTargetError', 'check_table', 'weigh_decomposition']

_logger = logging.getLogger(__name__)

MODES = ('prune', 'decompose', 'ahc', 'nahc', 'hmc')
LAYER_GROUPS = ('prune', 'decompose', 'both', 'keep')
DEFAULT_MARGIN = 0.5
DEFAULT_KEEP_FACTOR = 4.0


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: its group, the prune ratio of its channel group, its low-rank ranks."""

    name: str
    group: str                      # 'prune' | 'decompose' | 'both' | 'keep' (what the plan does to it)
    prune_ratio: float = 0.0        # fraction of its output channels removed (shared by its pruning group)
    pruning_group: str | None = None  # leader name of the torch-pruning group its out channels belong to
    method: str | None = None       # 'tucker2' | 'svd' | 'cp' when decomposed
    ranks: tuple[int, ...] | None = None  # concrete ranks on the pruned layer, e.g. (r_out, r_in)


@dataclass
class CompressionPlan:
    """Per-layer plan plus the settings that produced it. Plain data: JSON round-trip, readable table."""

    layers: list[LayerPlan]
    mode: str
    target: dict[str, float]              # e.g. {'flops': 0.5} = keep half the FLOPs
    importance: str = 'l1'
    round_to: int = 1
    margin: float | None = None
    decompose_weight: float = 1.0         # decomposition drops counted this many times (operator exchange rate)
    predicted: dict[str, float] = field(default_factory=dict)  # cost model's kept fractions {'flops', 'params'}
    measured: dict[str, float] = field(default_factory=dict)   # kept fraction of the compressed model, when measured

    @property
    def prune_ratios(self) -> dict[str, float]:
        """Pruning group leader -> fraction of its channels removed (groups with ratio 0 omitted)."""
        return {layer.pruning_group: layer.prune_ratio for layer in self.layers
                if layer.pruning_group is not None and layer.prune_ratio > 0}

    @property
    def ranks(self) -> dict[str, tuple[int, ...]]:
        """Layer name -> ranks, for the layers to decompose."""
        return {layer.name: layer.ranks for layer in self.layers if layer.ranks is not None}

    @property
    def methods(self) -> dict[str, str]:
        return {layer.name: layer.method for layer in self.layers if layer.ranks is not None}

    def group_counts(self) -> dict[str, int]:
        return {group: sum(layer.group == group for layer in self.layers) for group in LAYER_GROUPS}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data['margin'] = encode_float(self.margin)
        data['decompose_weight'] = encode_float(self.decompose_weight)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> 'CompressionPlan':
        data = dict(data)
        data['layers'] = [LayerPlan(**{**layer, 'ranks': tuple(layer['ranks']) if layer['ranks'] is not None else None})
                          for layer in data['layers']]
        data['margin'] = decode_float(data.get('margin'))
        if 'decompose_weight' in data:
            data['decompose_weight'] = decode_float(data['decompose_weight'])
        return cls(**data)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        return write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> 'CompressionPlan':
        return cls.from_dict(read_json(text_or_path))

    def table(self) -> str:
        """The plan as a fixed-width text table, one row per layer."""
        rows = [('layer', 'group', 'prune_ratio', 'method', 'ranks')]
        rows += [(layer.name, layer.group, f'{layer.prune_ratio:.3f}', layer.method or '-',
                  'x'.join(map(str, layer.ranks)) if layer.ranks else '-') for layer in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
        counts = ', '.join(f'{group}: {count}' for group, count in self.group_counts().items())
        target = ', '.join(f'{key}={value:g}' for key, value in self.target.items())
        predicted = ', '.join(f'{key}={value:.3f}' for key, value in self.predicted.items())
        weight = f', decompose_weight={self.decompose_weight:g}' if self.decompose_weight != 1 else ''
        header = f'CompressionPlan(mode={self.mode}{weight}, target {target}, predicted kept {predicted}; {counts})'
        return '\n'.join([header, lines[0], '-' * len(lines[0])] + lines[1:])

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------------
# Cost model: MACs and parameters of every Conv2d / Linear under a state of prune ratios and levels
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCost:
    """Shape facts of one Conv2d/Linear, enough to count its MACs and parameters after compression."""

    name: str
    kind: str                 # 'conv' | 'linear'
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    conv_groups: int
    bias: bool
    positions: int            # output positions per image (H_out * W_out, or 1 for Linear)


class CostModel:
    """MACs and parameters of the model's Conv2d/Linear layers after pruning and decomposition.

    The rest of the model (BN, ReLU, pooling) is treated as constant; ``build_plan`` corrects the
    small error by measuring the compressed model.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, groups: Sequence[PruningGroup], rank_method: str = 'auto'):
        self.rank_method = rank_method
        self.layers: dict[str, LayerCost] = {}
        positions: dict[str, int] = {}

        def recorder(name):
            def record(module, inputs, output):
                positions[name] = int(np.prod(output.shape[2:])) if output.dim() > 2 else int(np.prod(output.shape[1:-1]) or 1)
            return record

        forward_with_hooks(model, dummy_input, {module: recorder(name) for name, module in model.named_modules()
                                                if isinstance(module, (nn.Conv2d, nn.Linear))})
        for name, module in model.named_modules():
            if name not in positions:
                continue
            if isinstance(module, nn.Conv2d):
                self.layers[name] = LayerCost(name, 'conv', module.in_channels, module.out_channels,
                                              tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                                              tuple(module.dilation), module.groups, module.bias is not None,
                                              positions[name])
            else:
                self.layers[name] = LayerCost(name, 'linear', module.in_features, module.out_features, (1, 1),
                                              (1, 1), (0, 0), (1, 1), 1, module.bias is not None, positions[name])
        self.out_group = {member: group.name for group in groups for member in group.members}
        self.in_group = {consumer: group.name for group in groups for consumer in group.consumers}
        self.affected = {group.name: sorted(set(group.members) | set(group.consumers)) for group in groups}
        self.full = {'flops': sum(self.layer_cost(name, {}, {})[0] for name in self.layers),
                     'params': sum(self.layer_cost(name, {}, {})[1] for name in self.layers)}

    def pruned_shape(self, name: str, prune_ratios: dict[str, float], round_to: int = 1) -> tuple[int, int]:
        layer = self.layers[name]
        out_ratio = prune_ratios.get(self.out_group.get(name), 0.0)
        in_ratio = prune_ratios.get(self.in_group.get(name), 0.0)
        return (kept_channels(layer.in_channels, in_ratio, round_to),
                kept_channels(layer.out_channels, out_ratio, round_to))

    def layer_cost(self, name: str, prune_ratios: dict[str, float], levels: dict[str, float],
                   round_to: int = 1) -> tuple[int, int, tuple[int, ...] | None, str | None]:
        """(MACs per image, parameters, ranks or None, method or None) of layer ``name`` in the given state."""
        layer = self.layers[name]
        in_channels, out_channels = self.pruned_shape(name, prune_ratios, round_to)
        level = levels.get(name, 0.0)
        if level > 0:
            return _decomposed_cost(layer, in_channels, out_channels, level, self.rank_method)
        bias = out_channels if layer.bias else 0
        per_position = out_channels * (in_channels // layer.conv_groups) * layer.kernel[0] * layer.kernel[1]
        return layer.positions * (per_position + bias), per_position + bias, None, None


def _shape_module(layer: LayerCost, in_channels: int, out_channels: int) -> nn.Module:
    """A weightless (meta) module of the layer's pruned shape: rank rules need only the shape."""
    if layer.kind == 'linear':
        return nn.Linear(in_channels, out_channels, bias=layer.bias, device='meta')
    return nn.Conv2d(in_channels, out_channels, layer.kernel, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, groups=layer.conv_groups, bias=layer.bias, device='meta')


@functools.lru_cache(maxsize=None)
def _decomposed_cost(layer: LayerCost, in_channels: int, out_channels: int, level: float, rank_method: str):
    """Cost of the layer decomposed to keep ``1 - level`` of its FLOPs, with lowrank's own rank rule."""
    module = _shape_module(layer, in_channels, out_channels)
    method = method_for(module, rank_method, layer.name)
    ranks = resolve_ranks(module, f'flops:{1.0 - level:.6g}', method=method, layer_name=layer.name)
    dense_macs = layer.positions * out_channels * in_channels * layer.kernel[0] * layer.kernel[1]
    bias_adds = layer.positions * out_channels if layer.bias else 0
    macs = int(round(dense_macs * flops_ratio(module, ranks, method))) + bias_adds
    return macs, replacement_params(module, ranks, method), ranks, method


# ----------------------------------------------------------------------------------------------
# Grouping
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Budget allocation
# ----------------------------------------------------------------------------------------------

def _drop_curve(levels: Sequence[float], drops: Sequence[float]):
    """Monotone piecewise-linear drop(level), with drop(0) = 0."""
    xs = np.array([0.0] + list(levels))
    ys = np.maximum.accumulate(np.maximum(np.array([0.0] + list(drops)), 0.0))
    return lambda level: float(np.interp(level, xs, ys))


class UnreachableTargetError(HMCConfigError):
    """The budget cannot be met even with every allowed unit at its highest level.

    ``plan`` is that most compressed plan (the lowest cost the mode reaches), ``metric`` and ``target``
    the budget asked for; ``apply.plan_for_target`` measures ``plan`` to say how far the model can go.
    """

    def __init__(self, message: str, plan: 'CompressionPlan', metric: str, target: float):
        super().__init__(message)
        self.plan = plan
        self.metric = metric
        self.target = target


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


def _time_equal_drop(table, cost: CostModel, latency):
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
