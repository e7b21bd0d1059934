"""HMC's margin rule as plain functions: try candidate plans (tau x exchange rate), score each, choose one.

The rule knows nothing of data or training: ``plan_candidate(margin, weight)`` builds a plan at the
budget and ``score(plan)`` returns its per-image KL from the original after a probe fine-tune (or
zero-shot). ``hmc_plugin.app.workflow.choose_margin`` supplies both from a run's data.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Sequence

import torch

from ..errors import HMCConfigError
from ..utils.store import JsonStore, key_of
from .plan import CompressionPlan

__all__ = ['MARGIN_CANDIDATES', 'AUTO_MARGINS', 'AUTO_DECOMPOSE_WEIGHTS', 'ProbeStore', 'choose_margin_by',
           'one_standard_error_choice']

_logger = logging.getLogger(__name__)

MARGIN_CANDIDATES = (0.0, 0.25, 0.5, 1.0, 2.0, math.inf)
AUTO_MARGINS = (0.0, 0.5, math.inf)               # margin 'auto': NaHC without 'both', NaHC's default, AHC
AUTO_DECOMPOSE_WEIGHTS = (1.0, 10.0, math.inf)    # as scanned, decompositions 10x as costly, never decompose

PlanCandidate = Callable[[float, float], 'tuple[CompressionPlan, dict[str, Any] | None]']


class ProbeStore:
    """Per-image KL of each probed plan, kept in a ``JsonStore`` under the probe settings ``key`` (or in memory)."""

    def __init__(self, path: str | os.PathLike | None, key: dict[str, Any]):
        self.key = key
        self.store = JsonStore(path) if path is not None else None
        self.measured: dict[str, torch.Tensor] = {}
        if self.store is not None:
            for entry in self.store.entries.values():
                if isinstance(entry.get('key'), dict) and entry['key'].get('probe') == key:
                    self.measured[entry['key']['plan']] = torch.tensor(entry['value'])
            if self.measured:
                _logger.info('HMC margin rule: %d probed plan(s) reused from %s', len(self.measured), path)

    def add(self, plan_key: str, per_image: torch.Tensor) -> None:
        self.measured[plan_key] = per_image
        if self.store is not None:
            key_data = {'probe': self.key, 'plan': plan_key}
            self.store.put(key_of(key_data), per_image.tolist(), key_data)


def plan_key(plan: CompressionPlan) -> str:
    """What makes two plans the same compressed model: the prune ratios and the ranks."""
    return json.dumps([plan.prune_ratios, {name: list(ranks) for name, ranks in plan.ranks.items()}], sort_keys=True)


def choose_margin_by(plan_candidate: PlanCandidate, score: Callable[[CompressionPlan], torch.Tensor], *,
                     candidates: Sequence[float], decompose_weights: Sequence[float], probes: ProbeStore,
                     free: str, probe_steps: int) -> tuple[float, CompressionPlan, list[dict[str, Any]]]:
    """Try every ``(margin, weight)``, score each distinct plan once, and choose (see ``choose_margin``).

    ``plan_candidate`` raises ``HMCConfigError`` for a grouping that cannot reach the budget (the trial
    gets ``'error'``). ``free`` is what the budget leaves free (``'flops_kept'`` or ``'params_kept'``),
    the last tie-break of the one-standard-error rule, which applies when ``probe_steps > 0``; zero-shot,
    the lowest KL wins (ties to the smaller tau, then the smaller weight).
    """
    trials, plans = [], {}
    for weight in decompose_weights:
        for margin in candidates:
            trial: dict[str, Any] = {'margin': margin, 'decompose_weight': weight, 'probe_steps': probe_steps}
            try:
                plan, latency_report = plan_candidate(margin, weight)
            except HMCConfigError as error:  # this grouping cannot reach the budget: not a candidate
                trials.append({**trial, 'kl': None, 'flops_kept': None, 'groups': None, 'error': str(error)})
                continue
            if latency_report is not None:
                trial['latency_budget'] = latency_report
            key = plan_key(plan)
            if key not in probes.measured:
                probes.add(key, score(plan))
            per_image = probes.measured[key]
            plans[(margin, weight)] = plan
            _logger.info('HMC margin rule: candidate %d of %d (tau %s, decompose_weight %s): held-out KL %.4g',
                         len(trials) + 1, len(candidates) * len(decompose_weights), margin, weight,
                         float(per_image.mean()))
            trials.append({**trial, 'kl': max(0.0, float(per_image.mean())), 'flops_kept': plan.measured['flops'],
                           'params_kept': plan.measured['params'], 'decomposed': len(plan.ranks),
                           'groups': plan.group_counts(), '_per_image': per_image})
    if not plans:
        raise HMCConfigError(f'No margin in {list(candidates)} reaches the budget: {trials[-1]["error"]}')
    best = _choose(trials, free, probe_steps)
    _logger.info('HMC margin rule: tau=%s, decompose_weight=%s (held-out KL %.4g%s; candidates %s)', best['margin'],
                 best['decompose_weight'], best['kl'], f' after {probe_steps} steps' if probe_steps else ' zero-shot',
                 ', '.join(_trial_text(trial) for trial in trials))
    return best['margin'], plans[(best['margin'], best['decompose_weight'])], trials


def _trial_text(trial: dict[str, Any]) -> str:
    kl = 'unreachable' if trial['kl'] is None else format(trial['kl'], '.4g')
    return f"{trial['margin']}/{trial['decompose_weight']}: {kl}"


def _choose(trials: list[dict[str, Any]], free: str, probe_steps: int) -> dict[str, Any]:
    """Fill each reached trial's ``kl_se`` (paired against the lowest KL) and pick the winner."""
    reached = [trial for trial in trials if 'error' not in trial]
    lowest = min(reached, key=lambda trial: (trial['kl'], trial['margin'], trial['decompose_weight']))
    for trial in reached:
        difference = trial.pop('_per_image') - lowest['_per_image'] if trial is not lowest else None
        trial['kl_se'] = 0.0 if difference is None else float(difference.std() / math.sqrt(len(difference)))
    lowest.pop('_per_image')
    return one_standard_error_choice(reached, free) if probe_steps else lowest


def one_standard_error_choice(trials: Sequence[dict[str, Any]], free: str) -> dict[str, Any]:
    """The probe rule over reached trials (``'kl'``, ``'kl_se'``, ``'decomposed'``, ``free``).

    Of the trials whose KL exceeds the lowest by at most their ``kl_se``, the fewest decomposed layers win,
    then prune-only's plan (tau inf, weight inf), then the most ``free`` (``'flops_kept'`` or
    ``'params_kept'``: what the budget leaves free), then the lowest KL.
    """
    lowest = min(trial['kl'] for trial in trials)
    equal = [trial for trial in trials if trial['kl'] - lowest <= trial['kl_se']]
    return max(equal, key=lambda trial: (-trial['decomposed'], _is_prune_only(trial), trial[free], -trial['kl']))


def _is_prune_only(trial: dict[str, Any]) -> bool:
    """Whether a margin-rule trial is prune-only's plan: tau inf (no groups) with weight inf (never decompose)."""
    return trial['margin'] == math.inf and trial['decompose_weight'] == math.inf
