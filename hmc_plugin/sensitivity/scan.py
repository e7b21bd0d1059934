"""Per-layer sensitivity scans: how much the metric drops when one layer is pruned or decomposed.

For every candidate pruning group (torch-pruning's coupled channels, named by its leader layer)
and every candidate layer to decompose, at each level ``c`` (fraction of that layer's FLOPs
removed), the operator is applied to that unit alone, the metric drop is measured, and the model
is restored bit for bit. Pruning is simulated with NNI-format channel masks (pruned channels
become exact zeros); decomposition by swapping in the low-rank reconstruction of the weight.

Three ways to measure the drop:

- ``evaluator``: ``baseline - eval_fn(model)`` with the user's real metric (higher is better).
- ``kl``: KL divergence of the model's output distribution from the original's, on a small
  cached calibration batch (0 for no change; the same units for both operators), one forward pass of
  the whole network per unit and level.
- ``proxy`` (default): the same KL, estimated to second order from one forward/backward pass over the
  calibration batch (``hmc_plugin.sensitivity.fisher``): layer-local, so large models scan in minutes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..engines.lowrank import low_rank_weight, low_rank_weights, method_for
from ..engines.pruning import PruningGroup, group_channel_masks
from ..errors import HMCConfigError
from ..settings import SENSITIVITIES
from ..utils.counting import as_input_tuple
from ..utils.fingerprint import inputs_fingerprint, model_fingerprint
from ..utils.kl import kl_divergence
from .fisher import DEFAULT_PROJECTIONS, fisher_drops
from .table import DEFAULT_LEVELS, Masks, SensitivityTable

__all__ = ['zeroed_by_masks', 'swapped_weight', 'proxy_metric', 'scan_sensitivity']

_logger = logging.getLogger(__name__)

MaskContext = Callable[[Masks], ContextManager[None]]


@contextlib.contextmanager
def zeroed_by_masks(model: nn.Module, masks: Masks) -> Iterator[None]:
    """Multiply the masked parameters by their 0/1 masks, restore the exact tensors afterwards."""
    modules = dict(model.named_modules())
    saved = []
    try:
        with torch.no_grad():
            for module_name, targets in masks.items():
                for param_name, mask in targets.items():
                    param = getattr(modules[module_name], param_name, None)
                    if isinstance(param, torch.Tensor):
                        saved.append((param, param.data))
                        param.data = param.data * mask.to(param.dtype)
        yield
    finally:
        for param, data in saved:
            param.data = data


@contextlib.contextmanager
def swapped_weight(module: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """Use ``weight`` as ``module.weight`` inside the block; the original tensor comes back after."""
    original = module.weight.data
    module.weight.data = weight.to(original.dtype)
    try:
        yield
    finally:
        module.weight.data = original


@torch.no_grad()
def proxy_metric(model: nn.Module, calibration_inputs: tuple, reference_log_probs: torch.Tensor) -> float:
    """KL(original || current) of the output distributions, batch mean, in nats (0 = unchanged): the mean of
    ``utils.kl.kl_divergence``, summed in float64. The log-softmax runs in ``reference_log_probs``' dtype, so
    an unchanged model gives exactly 0."""
    log_probs = F.log_softmax(model(*calibration_inputs).flatten(1).to(reference_log_probs.dtype), dim=1)
    return float(kl_divergence(reference_log_probs, log_probs).mean())


def _schedule(groups: Sequence[PruningGroup], layers: Sequence[str]) -> dict[str, list[str]]:
    return {'prune': [group.name for group in groups], 'decompose': list(layers)}


def scan_sensitivity(model: nn.Module, dummy_input: Any, *, groups: Sequence[PruningGroup] = (),
                     layers: Sequence[str] = (), mode: str = 'proxy',
                     eval_fn: Callable[[nn.Module], float] | None = None,
                     calibration_inputs: Any = None, levels: Sequence[float] = DEFAULT_LEVELS,
                     importance: str = 'l1', round_to: int = 1, rank_method: str = 'auto',
                     calibration_targets: torch.Tensor | None = None,
                     cache_path: str | os.PathLike | None = None, progress: bool = True,
                     mask_context: MaskContext | None = None, mask_model: nn.Module | None = None,
                     weight_owner: Callable[[str], nn.Module] | None = None,
                     projections: int = DEFAULT_PROJECTIONS) -> SensitivityTable:
    """Measure the metric drop of pruning each group and decomposing each layer, one unit at a time.

    Parameters
    ----------
    model
        The model to scan. It is left bit-for-bit as it was (weights, buffers, train/eval mode).
    dummy_input
        Example input for torch-pruning's dependency graph (batch 1 is enough).
    groups, layers
        Pruning groups (from ``pruning.find_pruning_groups``) and layer names to decompose.
    mode : 'proxy', 'kl' or 'evaluator'
        ``evaluator`` needs ``eval_fn(model) -> float`` (higher is better, e.g. accuracy);
        ``proxy`` and ``kl`` need ``calibration_inputs`` (a tensor or tuple, e.g. 64 images).
        ``proxy`` runs one forward/backward pass in all (``hmc_plugin.sensitivity.fisher``); the others run the
        whole model once per unit and level.
    levels
        Fractions of a unit's FLOPs removed, each in (0, 1). Pruning level ``c`` prunes a fraction
        ``c`` of the group's channels; decomposition level ``c`` keeps ``1 - c`` of the layer's FLOPs.
    cache_path
        JSON file updated after every unit: a rerun with the same model weights and settings continues
        where an interrupted scan stopped and yields the same table.
    calibration_targets
        Labels of ``calibration_inputs``; only ``importance='taylor'`` needs them (its gradients).
    mask_context
        ``masks -> context manager`` that simulates pruning; default zeroes parameters by the masks
        (``zeroed_by_masks``). The NNI compressor passes one that sets masks on NNI's wrappers.
    mask_model
        An unwrapped module with the same names and weights, used to compute masks and low-rank weights
        when ``model`` is wrapped by NNI (defaults to ``model``).
    weight_owner
        ``layer name -> module`` whose ``.weight`` is the live weight to swap (NNI: the layer's wrapper).
    projections
        ``proxy`` only: Fisher directions per image (all classes when there are at most this many).
    """
    levels = _checked_levels(mode, levels, eval_fn, calibration_inputs)
    mask_model = mask_model if mask_model is not None else model
    mask_context = mask_context or (lambda masks: zeroed_by_masks(model, masks))
    calibration_batch = _taylor_batch(importance, calibration_inputs, calibration_targets)
    settings = _scan_settings(mode, levels, importance, round_to, rank_method, _schedule(groups, layers), mask_model,
                              projections, calibration_inputs)
    table = _load_cache(cache_path, settings)
    if mode == 'proxy':
        if table is None or not table.is_complete():
            table = _fisher_table(mask_model, dummy_input, groups, layers, calibration_inputs, settings,
                                  calibration_batch, progress)
            if cache_path is not None:
                table.to_json(cache_path)
        return table
    modules = dict(mask_model.named_modules())
    unit_scan = _UnitScan(mask_model, dummy_input, groups, settings, calibration_batch, mask_context,
                          weight_owner or modules.__getitem__, modules)
    return _measured_table(model, table, unit_scan, eval_fn, calibration_inputs, cache_path, progress)


def _checked_levels(mode: str, levels: Sequence[float], eval_fn, calibration_inputs) -> list[float]:
    """``levels`` as floats, after checking them and that ``mode`` has what it measures with."""
    if mode not in SENSITIVITIES:
        raise HMCConfigError(f"Got sensitivity mode={mode!r} but expected one of {SENSITIVITIES}")
    levels = [float(level) for level in levels]
    if not levels or any(not 0.0 < level < 1.0 for level in levels) or levels != sorted(set(levels)):
        raise HMCConfigError(f'Got levels={levels} but expected increasing fractions in (0, 1), e.g. {list(DEFAULT_LEVELS)}')
    if mode == 'evaluator' and eval_fn is None:
        raise HMCConfigError("sensitivity mode 'evaluator' needs an evaluator or eval_fn; pass one or use mode='proxy'")
    if mode in ('proxy', 'kl') and calibration_inputs is None:
        raise HMCConfigError(f"sensitivity mode {mode!r} needs calibration_inputs (a small batch of model inputs)")
    return levels


def _taylor_batch(importance: str, calibration_inputs, calibration_targets) -> tuple | None:
    """``(inputs, targets)`` for the gradients of ``importance='taylor'``; None for the other importances."""
    if importance != 'taylor':
        return None
    if calibration_inputs is None or calibration_targets is None:
        raise HMCConfigError("importance='taylor' needs calibration_inputs and calibration_targets (its gradients)")
    return (calibration_inputs, calibration_targets)


def _scan_settings(mode: str, levels: list[float], importance: str, round_to: int, rank_method: str,
                   schedule: dict[str, list[str]], mask_model: nn.Module, projections: int,
                   calibration_inputs) -> dict:
    """Everything a table depends on: a cache made with other settings is rescanned, not resumed."""
    settings = {'mode': mode, 'levels': levels, 'importance': importance, 'round_to': round_to,
                'rank_method': rank_method, 'units': schedule, 'weights': model_fingerprint(mask_model)}
    if mode == 'proxy':
        settings['projections'] = int(projections)
    if mode in ('proxy', 'kl'):  # a cache scanned on other calibration data must not be resumed
        settings['calibration'] = inputs_fingerprint(calibration_inputs)
    return settings


@dataclass
class _UnitScan:
    """How the ``kl`` and ``evaluator`` scans apply one unit at one level, measure, and undo it.

    Pruning masks come from ``mask_model`` (all groups at a level at once, kept for the other groups);
    low-rank weights from ``modules``, swapped into ``weight_owner(name)``.
    """

    mask_model: nn.Module
    dummy_input: Any
    groups: Sequence[PruningGroup]
    settings: dict
    calibration_batch: tuple | None
    mask_context: MaskContext
    weight_owner: Callable[[str], nn.Module]
    modules: dict[str, nn.Module]
    masks_by_level: dict[float, dict[str, Masks]] = field(default_factory=dict)

    def drop(self, operator: str, name: str, level: float, measure: Callable[[], float]) -> float:
        """``measure()`` with unit ``(operator, name)`` at ``level``; the model is restored afterwards."""
        if operator == 'prune':
            if level not in self.masks_by_level:
                self.masks_by_level[level] = group_channel_masks(
                    self.mask_model, self.dummy_input, {group.name: level for group in self.groups},
                    importance=self.settings['importance'], round_to=self.settings['round_to'],
                    calibration=self.calibration_batch)
            with self.mask_context(self.masks_by_level[level][name]):
                return measure()
        module = self.modules[name]
        spec = f'flops:{1.0 - level:.6g}'
        weight = low_rank_weight(module, spec, method=method_for(module, self.settings['rank_method'], name),
                                 layer_name=name)
        with swapped_weight(self.weight_owner(name), weight):
            return measure()


def _measured_table(model: nn.Module, table: SensitivityTable | None, unit_scan: _UnitScan,
                    eval_fn: Callable[[nn.Module], float] | None, calibration_inputs: Any,
                    cache_path: str | os.PathLike | None, progress: bool) -> SensitivityTable:
    """The ``kl`` or ``evaluator`` scan, in eval mode: every unit not yet in ``table`` (a resumed cache or None)."""
    settings = unit_scan.settings
    mode, levels = settings['mode'], settings['levels']
    was_training = model.training
    model.eval()
    try:
        baseline, measure = _drop_measure(model, mode, eval_fn, calibration_inputs)
        if table is None:
            table = SensitivityTable(levels=levels, mode=mode, baseline=baseline,
                                     groups={group.name: list(group.members) for group in unit_scan.groups},
                                     settings=settings)
        todo = [(op, name) for op, names in settings['units'].items() for name in names
                if len(getattr(table, op).get(name, [])) < len(levels)]
        _scan_units(table, todo, unit_scan, measure, cache_path, progress)
    finally:
        model.train(was_training)
    return table


def _drop_measure(model: nn.Module, mode: str, eval_fn: Callable[[nn.Module], float] | None,
                  calibration_inputs: Any) -> tuple[float, Callable[[], float]]:
    """``(baseline, measure)``: the unmodified model's metric (0 for ``kl``) and ``measure() -> drop`` of the model now."""
    if mode == 'kl':
        calibration = as_input_tuple(calibration_inputs)
        with torch.no_grad():
            reference = F.log_softmax(model(*calibration).flatten(1).float(), dim=1)
        return 0.0, functools.partial(_kl_drop, model, calibration, reference)
    baseline = float(eval_fn(model))
    if not math.isfinite(baseline):
        raise HMCConfigError(f'The evaluator returned {baseline} for the unmodified model; it must return a finite metric')
    return baseline, functools.partial(_evaluator_drop, model, eval_fn, baseline)


def _kl_drop(model: nn.Module, calibration: tuple, reference: torch.Tensor) -> float:
    return proxy_metric(model, calibration, reference)


def _evaluator_drop(model: nn.Module, eval_fn: Callable[[nn.Module], float], baseline: float) -> float:
    value = float(eval_fn(model))
    if not math.isfinite(value):
        raise HMCConfigError(f'The evaluator returned {value}; it must return a finite metric')
    return baseline - value


def _scan_units(table: SensitivityTable, todo: list[tuple[str, str]], unit_scan: _UnitScan,
                measure: Callable[[], float], cache_path: str | os.PathLike | None, progress: bool) -> None:
    """Fill ``table`` with the drops of every ``(operator, name)`` of ``todo`` at every level, saving after each unit.

    ``table.seconds`` adds this run's time to the resumed table's.
    """
    mode, levels = unit_scan.settings['mode'], unit_scan.settings['levels']
    started = time.perf_counter()
    seconds_before = table.seconds
    with tqdm(total=len(todo) * len(levels), desc=f'HMC sensitivity scan ({mode})', disable=not progress,
              unit='eval') as bar:
        for operator, name in todo:
            drops = []
            for level in levels:
                drops.append(unit_scan.drop(operator, name, level, measure))
                table.evaluations += 1
                bar.update(1)
            getattr(table, operator)[name] = drops
            table.seconds = seconds_before + time.perf_counter() - started
            if cache_path is not None:
                table.to_json(cache_path)


def _fisher_table(model: nn.Module, dummy_input: Any, groups: Sequence[PruningGroup], layers: Sequence[str],
                  calibration_inputs: Any, settings: dict, calibration_batch: tuple | None,
                  progress: bool) -> SensitivityTable:
    """The ``proxy`` scan: masks and low-rank weights for every unit and level, then one Fisher pass."""
    started = time.perf_counter()
    levels = settings['levels']
    modules = dict(model.named_modules())
    prune_masks: dict[str, list[Masks]] = {group.name: [] for group in groups}
    weight_changes: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=len(levels) * (1 + len(layers)), desc='HMC sensitivity scan (proxy): masks and low-rank weights',
              disable=not progress, unit='step') as bar:
        for level in levels:
            if groups:
                by_group = group_channel_masks(model, dummy_input, {group.name: level for group in groups},
                                               importance=settings['importance'], round_to=settings['round_to'],
                                               calibration=calibration_batch)
                for group in groups:
                    prune_masks[group.name].append(by_group[group.name])
            bar.update(1)
        for name in layers:
            module = modules[name]
            weights = low_rank_weights(module, [f'flops:{1.0 - level:.6g}' for level in levels],
                                       method=method_for(module, settings['rank_method'], name), layer_name=name)
            weight_changes[name] = [weight - module.weight.detach() for weight in weights]
            bar.update(len(levels))
    prune, decompose = fisher_drops(model, calibration_inputs, prune_masks=prune_masks, weight_changes=weight_changes,
                                    projections=settings['projections'], progress=progress)
    return SensitivityTable(levels=list(levels), mode='proxy', baseline=0.0, prune=prune, decompose=decompose,
                            groups={group.name: list(group.members) for group in groups}, settings=settings,
                            evaluations=len(levels) * (len(groups) + len(layers)),
                            seconds=time.perf_counter() - started)


def _load_cache(cache_path, settings: dict) -> SensitivityTable | None:
    if cache_path is None or not Path(cache_path).exists():
        return None
    try:
        table = SensitivityTable.from_json(cache_path)
    except (ValueError, TypeError, KeyError) as error:
        _logger.warning('Sensitivity cache %s is corrupt (%s); rebuilding it.', cache_path, error)
        return None
    if table.settings != settings:
        _logger.warning('Sensitivity cache %s was made with other weights, calibration data or settings; '
                        'rescanning.', cache_path)
        return None
    problem = _cache_problem(table, settings)
    if problem is not None:
        _logger.warning('Sensitivity cache %s is corrupt (%s); rebuilding it.', cache_path, problem)
        return None
    _logger.info('Resuming sensitivity scan from %s (%d evaluations done).', cache_path, table.evaluations)
    return table


def _cache_problem(table: SensitivityTable, settings: dict) -> str | None:
    """Why a cached table whose settings match cannot be resumed from (edited or damaged), or None."""
    if table.levels != settings['levels'] or table.mode != settings['mode']:
        return f'levels={table.levels!r}, mode={table.mode!r} disagree with its settings'
    if isinstance(table.baseline, bool) or not isinstance(table.baseline, (int, float)) or not math.isfinite(table.baseline):
        return f'baseline={table.baseline!r} is not a finite number'
    if isinstance(table.evaluations, bool) or not isinstance(table.evaluations, int) or table.evaluations < 0:
        return f'evaluations={table.evaluations!r} is not a count'
    for operator, names in settings['units'].items():
        done = getattr(table, operator)
        if not isinstance(done, dict):
            return f'{operator} is not a mapping of unit to drops'
        for name, drops in done.items():
            if name not in names:
                return f'{operator}[{name!r}] is not a unit of this scan'
            if not isinstance(drops, list) or len(drops) > len(table.levels) or any(
                    isinstance(drop, bool) or not isinstance(drop, (int, float)) or not math.isfinite(drop)
                    for drop in drops):
                return f'{operator}[{name!r}]={drops!r} is not a list of at most {len(table.levels)} finite drops'
    return None
