"""The loops that land a plan on its target: FLOPs or parameters measured exactly (``plan_for_target``),
CPU time measured side by side (``plan_for_latency``), and what a budget can reach at most."""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

from torch import nn

from ..engines.pruning import PruningGroup
from ..errors import HMCConfigError
from ..utils.counting import count_flops, count_params
from .allocation import build_plan, most_compressed_plan
from .cost import CostModel
from .latency import LatencyModel
from .measure import compress_fast, measure_plan
from .plan import CompressionPlan, UnreachableTargetError

__all__ = ['plan_for_target', 'plan_for_latency', 'unreachable_message', 'reachable_fraction']

_logger = logging.getLogger(__name__)


def plan_for_target(table, model: nn.Module, dummy_input: Any, groups: Sequence[PruningGroup], *,
                    rank_method: str = 'auto', tolerance: float = 0.01, max_rounds: int = 4,
                    **plan_kwargs) -> tuple[CompressionPlan, float]:
    """Build a plan whose *measured* kept fraction is within ``tolerance`` of the target.

    The cost model ignores BN/ReLU/pooling; each plan is measured exactly (``measure_plan``) and the
    internal target is shifted by the miss. Returns ``(plan, measured kept fraction)``; ``plan.measured``
    holds the kept fractions of both FLOPs and parameters.
    """
    cost = CostModel(model, dummy_input, groups, rank_method, methods=table.decompose_methods)
    metric = 'flops' if plan_kwargs.get('target_flops') is not None else 'params'
    target = plan_kwargs.pop(f'target_{metric}')
    plan_kwargs.pop('target_params' if metric == 'flops' else 'target_flops', None)
    full = {'flops': count_flops(model, dummy_input), 'params': count_params(model)}
    internal_target = target
    best = None
    for _ in range(max_rounds):
        exhausted = False
        try:
            plan = build_plan(table, cost, **{f'target_{metric}': internal_target}, **plan_kwargs)
        except UnreachableTargetError as error:  # every unit at its highest level: as far as this mode goes
            plan, exhausted = error.plan, True
        kept = {key: value / full[key] for key, value in measure_plan(model, plan, dummy_input).items()}
        measured = kept[metric]
        if exhausted and measured > target + tolerance:
            raise HMCConfigError(unreachable_message(metric, target, measured, plan_kwargs.get('mode', 'nahc'),
                                                     max(table.levels))) from None
        if best is None or abs(measured - target) < abs(best[1] - target):
            best = (plan, measured, kept)
        if abs(measured - target) <= tolerance or exhausted:
            break
        internal_target = min(1.0, max(1e-3, internal_target + (target - measured)))
    plan, measured, kept = best
    plan.target = {metric: target}
    plan.measured = kept
    if abs(measured - target) > tolerance:
        _logger.warning('The plan keeps %.3f of the %s for target_%s=%g: the selected layers are too coarse '
                        '(few channels or ranks) to land within %.0f %% of it', measured, metric, metric, target,
                        100 * tolerance)
    else:
        _logger.info('Plan for target_%s=%.3f measures %.4f', metric, target, measured)
    return plan, measured


def plan_for_latency(table, model: nn.Module, dummy_input: Any, groups: Sequence[PruningGroup], *,
                     target_latency: float, batch: int = 1, threads: int | None = None, rank_method: str = 'auto',
                     latency_cache=None, backend: str = 'torch', tolerance: float = 0.015, max_rounds: int = 6,
                     at_least_prune_only: bool = True, **plan_kwargs) -> tuple[CompressionPlan, dict[str, float]]:
    """Build a plan whose compressed model's *measured* CPU time is within ``tolerance`` of the target fraction.

    With ``at_least_prune_only`` (default), a hybrid plan (``nahc`` / ``hmc`` that decomposes) is kept only if it
    keeps at least the FLOPs and the parameters of prune-only's plan at the same budget (that plan's ``hmc`` twin,
    ``margin=inf, decompose_weight=inf``); otherwise that plan is returned, with a log line saying why: the same
    time for less of the model buys nothing. The margin rule passes False, since its probe compares the
    recovered models instead.

    The allocation runs on a ``latency.LatencyModel`` (per-layer times, cached in ``latency_cache``); each
    plan is applied to a copy (torch-pruning fast path) and timed side by side with the original at
    ``batch`` and ``threads`` in ``backend`` (``'torch'`` or ``'onnxruntime'``, ``LatencyModel``); the internal target is scaled by the miss. A timing within ``tolerance`` is
    taken again, and the plan accepted only if the mean of the two is within it. These timings are cached
    by compressed architecture (``LatencyModel.side_by_side_ms``), so planning the same budget again
    measures nothing and returns the same plan. Of the rounds, a plan within ``tolerance`` wins, then one that
    meets the budget, then the closest (``_closer_to_budget``). Returns ``(plan, latency)``
    where ``latency`` holds ``original_ms``, ``predicted_ms``, ``measured_ms``, their fractions
    and ``prediction_error`` (predicted / measured - 1); ``plan.predicted`` / ``plan.measured`` get
    ``'latency'`` (fraction kept) and the FLOPs and parameters the plan keeps.
    """
    if not isinstance(target_latency, (int, float)) or not 0 < target_latency <= 1:
        raise HMCConfigError(f'Got target_latency={target_latency!r} but expected a fraction of the time to keep in (0, 1]')
    plan_kwargs.pop('target_flops', None)
    plan_kwargs.pop('target_params', None)
    round_to = plan_kwargs.get('round_to', 1)
    cost = CostModel(model, dummy_input, groups, rank_method, methods=table.decompose_methods)
    latency = LatencyModel(model, dummy_input, cost, table.levels, batch=batch, threads=threads, round_to=round_to,
                           cache=latency_cache, backend=backend)
    full_flops, full_params = count_flops(model, dummy_input), count_params(model)
    internal_target, best = target_latency, None
    for _ in range(max_rounds):
        exhausted = False
        try:
            plan = build_plan(table, cost, target_latency=internal_target, latency=latency, **plan_kwargs)
        except UnreachableTargetError as error:
            plan, exhausted = error.plan, True
        compressed = compress_fast(copy.deepcopy(model), plan, dummy_input)
        # A timing within tolerance is taken again and the plan accepted on the mean of the two.
        original_ms, measured_ms = latency.side_by_side_ms(
            model, compressed, dummy_input, confirm=lambda kept: abs(kept - target_latency) <= tolerance and not exhausted)
        measured = measured_ms / original_ms
        if best is None or _closer_to_budget(measured, best[1], target_latency, tolerance):
            best = (plan, measured, original_ms, measured_ms, compressed, exhausted)
        if abs(measured - target_latency) <= tolerance or exhausted:
            break
        internal_target = min(1.0, max(1e-3, internal_target * target_latency / measured))
    plan, measured, original_ms, measured_ms, compressed, exhausted = best
    latency.cache.save()
    if measured > target_latency + tolerance and exhausted:
        mode = plan_kwargs.get('mode', 'nahc')
        raise HMCConfigError(_slowest_reachable_message(target_latency, measured, latency, mode,
                                                        max(table.levels))) from None
    report = _latency_report(plan, target_latency, original_ms, measured_ms, latency)
    plan.target = {'latency': target_latency}
    plan.measured = {'latency': measured, 'flops': count_flops(compressed, dummy_input) / full_flops,
                     'params': count_params(compressed) / full_params}
    if abs(measured - target_latency) > tolerance:
        _logger.warning('The plan keeps %.3f of the CPU time for target_latency=%g (measured at batch %d, %d threads, '
                        '%s): the latency model could not be corrected within %d rounds', measured, target_latency,
                        latency.batch, latency.threads, backend, max_rounds)
    else:
        _logger.info('Plan for target_latency=%.3f measures %.3f (predicted %.3f, error %+.1f %%)', target_latency,
                     measured, report['predicted'], 100 * report['prediction_error'])
    if at_least_prune_only and plan.mode in ('nahc', 'hmc') and plan.ranks:
        plan, report = _at_least_prune_only(plan, report, table, model, dummy_input, groups, dict(
            target_latency=target_latency, batch=batch, threads=threads, rank_method=rank_method,
            latency_cache=latency_cache, backend=backend, tolerance=tolerance, max_rounds=max_rounds, **plan_kwargs))
    return plan, report


def _closer_to_budget(measured: float, best: float, target: float, tolerance: float) -> bool:
    """Whether a plan keeping ``measured`` of the time serves ``target`` better than one keeping ``best``.

    A plan within ``tolerance`` of the target beats one outside it, then one that meets the budget (faster
    than asked) beats one that misses it, then the closer one wins: on a noisy machine a round whose
    correction overshoots to an uncompressed plan must not replace a plan that met the budget.
    """
    def rank(kept):
        return (abs(kept - target) > tolerance, kept > target + tolerance, abs(kept - target))
    return rank(measured) < rank(best)


def _at_least_prune_only(plan: CompressionPlan, report: dict[str, float], table, model: nn.Module, dummy_input: Any,
                         groups: Sequence[PruningGroup], kwargs: dict[str, Any]) -> tuple[CompressionPlan, dict]:
    """``plan``, or prune-only's plan at the same latency budget when that keeps more FLOPs or parameters."""
    kwargs.update(margin=float('inf'), decompose_weight=float('inf'), at_least_prune_only=False)
    try:
        prune_only, prune_report = plan_for_latency(table, model, dummy_input, groups, **kwargs)
    except HMCConfigError:  # prune-only cannot reach the budget: the hybrid is the only plan
        return plan, report
    kept, theirs = plan.measured, prune_only.measured
    if kept['flops'] >= theirs['flops'] and kept['params'] >= theirs['params']:
        return plan, report
    _logger.warning('The %s plan keeps %.3f of the FLOPs and %.3f of the parameters at %.3f of the time, prune-only '
                    "%.3f and %.3f at %.3f: using prune-only's plan (its decompositions save little time on this "
                    'CPU; the margin rule, --margin auto, compares the recovered models instead)', plan.mode,
                    kept['flops'], kept['params'], kept['latency'], theirs['flops'], theirs['params'],
                    theirs['latency'])
    return prune_only, prune_report


def _latency_report(plan: CompressionPlan, target_latency: float, original_ms: float, measured_ms: float,
                    latency: LatencyModel) -> dict[str, float]:
    """``plan_for_latency``'s report: the times (ms) measured and predicted, their fractions kept, the error."""
    measured, predicted = measured_ms / original_ms, plan.predicted['latency']
    return {'target': target_latency, 'batch': latency.batch, 'threads': latency.threads, 'backend': latency.backend,
            'original_ms': original_ms, 'measured_ms': measured_ms, 'measured': measured,
            'predicted': predicted, 'predicted_ms': predicted * original_ms,
            'prediction_error': predicted / measured - 1.0, 'new_measurements': latency.cache.measured}


def _slowest_reachable_message(target_latency: float, measured: float, latency: LatencyModel, mode: str,
                               max_level: float) -> str:
    """The error for a latency budget below what ``mode`` reaches with every selected layer at ``max_level``."""
    hint = '' if mode == 'prune' else " or use mode='prune' (pruning saves the most time on a CPU)"
    return (f"Got target_latency={target_latency:g} but mode {mode!r} cannot make the model faster than "
            f"{measured:.3f} of its time at batch {latency.batch} and {latency.threads} threads (measured), even with "
            f"every selected layer at the highest level ({max_level:g}): raise target_latency, select more "
            f"layers or add a higher level to 'levels'{hint}")


def unreachable_message(metric: str, target: float, lowest: float, mode: str, max_level: float,
                        suggest_ahc: bool | None = None) -> str:
    """The error for a budget below the lowest kept fraction ``lowest`` that ``mode`` can reach."""
    what = 'FLOPs' if metric == 'flops' else 'parameters'
    suggest_ahc = mode in ('nahc', 'hmc') if suggest_ahc is None else suggest_ahc
    hint = ", or use mode='ahc' (both operators on every layer)" if suggest_ahc else ''
    if lowest >= 1 - 1e-3:
        return (f"Got target_{metric}={target:g} but mode {mode!r} can compress none of the selected layers (see the "
                f"warnings above: unsupported, tied, too small or coupled with unselected layers): select other "
                f"layers (op_types / op_names){hint}")
    return (f"Got target_{metric}={target:g} but mode {mode!r} cannot keep less than {lowest:.3f} of the model's "
            f"{what}, even with every selected layer compressed to the highest level ({max_level:g}): raise "
            f"target_{metric} above {lowest:.3f}, select more layers (op_types / op_names; unselected and unsupported "
            f"layers keep their cost), add a higher level to 'levels'{hint}")


def reachable_fraction(model: nn.Module, dummy_input: Any, groups: Sequence[PruningGroup], layers: Sequence[str], *,
                       metric: str, mode: str, level: float, max_ratios: dict[str, float] | None = None,
                       round_to: int = 1, rank_method: str = 'auto') -> float:
    """Lowest kept fraction of the model's FLOPs or parameters that ``mode`` can reach, measured exactly.

    Every group of ``groups`` is pruned and every decomposable layer of ``layers`` decomposed at ``level``
    (``plan.most_compressed_plan``), without a sensitivity scan: a budget below this can never be met.
    """
    cost = CostModel(model, dummy_input, groups, rank_method)
    plan = most_compressed_plan(cost, groups, layers, mode=mode, level=level, metric=metric, max_ratios=max_ratios,
                                round_to=round_to)
    full = count_flops(model, dummy_input) if metric == 'flops' else count_params(model)
    return measure_plan(model, plan, dummy_input)[metric] / full
