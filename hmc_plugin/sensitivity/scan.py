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

With calibration data (``data``, an ``engines.datafit.DataFit``) the scans measure what apply will produce:

- data-aware low rank (``data.data_aware``): each layer's low-rank weight minimises the output error
  ``||(W - W~) S^{1/2}||`` for its input moment S on the original model;
- pruning with reconstruction (``data.reconstruct``): each consumer of the pruned channels reads only the
  kept inputs K, refitted from the original model's S (one unit at a time, so the kept activations are the
  original's): ``W'_K = W S[:, K] (S[K, K] + lam I)^-1`` (``engines.datafit.ridge_fit``), zero elsewhere;
- BatchNorm recalibration (``data.bn_batches``, ``kl`` and ``evaluator`` only): every measurement is taken
  after the BatchNorm statistics are re-estimated on those batches (EagleEye), then the statistics come
  back. The ``proxy`` cannot recalibrate (see ``hmc_plugin.sensitivity.fisher``).

``rank_method='best'`` lets the scan choose the decomposition of each kxk conv: the layers are scanned with
Tucker-2 and with SVD (a kxk conv to r channels, then a 1x1), at the same levels, hence the same FLOPs, and each
keeps the curve with the lower mean drop (``best_decompositions``); the plan then decomposes it that way.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..engines.batchnorm import recalibrated_bn
from ..engines.datafit import DataFit, ridge_fit
from ..engines.lowrank import low_rank_weight, low_rank_weights, method_for
from ..engines.moments import batch_inputs, collect_moments
from ..engines.pruning import GroupSelection, PruningGroup, group_channel_selections, preserved_modes
from ..errors import HMCConfigError
from ..settings import SENSITIVITIES
from ..utils.counting import as_input_tuple
from ..utils.fingerprint import inputs_fingerprint, model_fingerprint
from ..utils.kl import kl_divergence
from ..utils.memory import budget_bytes, release_memory, trim_heap
from .fisher import DEFAULT_PROJECTIONS, FisherChunks, fisher_chunks, fisher_drops
from .table import DEFAULT_LEVELS, Masks, SensitivityTable

__all__ = ['zeroed_by_masks', 'swapped_weight', 'proxy_metric', 'scan_sensitivity', 'best_decompositions']

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
                     projections: int = DEFAULT_PROJECTIONS, data: DataFit | None = None,
                     memory_budget: int | None = None) -> SensitivityTable:
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
        An unwrapped module with the same names and weights, used to compute masks, input moments and low-rank
        (or refitted) weights when ``model`` is wrapped by NNI (defaults to ``model``).
    weight_owner
        ``layer name -> module`` whose ``.weight`` is the live weight to swap (NNI: the layer's wrapper).
    projections
        ``proxy`` only: Fisher directions per image (all classes when there are at most this many).
    data
        Calibration data as apply uses it (``engines.datafit.DataFit``): ``data.batches`` give the original
        model's input moments for the data-aware low rank (``data.data_aware``) and the consumers'
        reconstruction (``data.reconstruct``); ``data.bn_batches`` recalibrate the BatchNorms before each
        ``kl`` / ``evaluator`` measurement. None (or a DataFit without batches) scans data-free, as before.
    memory_budget
        ``proxy`` only: MiB the Fisher pass's activations may take (``fisher.fisher_chunks``; None: automatic);
        the input moments of the data-aware scan are held up to half of it at once.
        The table does not depend on it beyond floating-point summation order; too small a budget for one
        image raises ``HMCConfigError`` before the scan starts.
    """
    if rank_method == 'best':
        return _scan_both_decompositions(
            model, dummy_input, groups=groups, layers=layers, mode=mode, eval_fn=eval_fn,
            calibration_inputs=calibration_inputs, levels=levels, importance=importance, round_to=round_to,
            calibration_targets=calibration_targets, cache_path=cache_path, progress=progress,
            mask_context=mask_context, mask_model=mask_model, weight_owner=weight_owner, projections=projections,
            data=data, memory_budget=memory_budget)
    levels = _checked_levels(mode, levels, eval_fn, calibration_inputs)
    mask_model = mask_model if mask_model is not None else model
    mask_context = mask_context or (lambda masks: zeroed_by_masks(model, masks))
    calibration_batch = _taylor_batch(importance, calibration_inputs, calibration_targets)
    scan_data = _ScanData.of(data, mode)
    settings = _scan_settings(mode, levels, importance, round_to, rank_method, _schedule(groups, layers), mask_model,
                              projections, calibration_inputs, scan_data)
    table = _load_cache(cache_path, settings)
    if mode == 'proxy':
        if table is None or not table.is_complete():
            table = _proxy_table(mask_model, dummy_input, groups, layers, calibration_inputs, settings,
                                 calibration_batch, progress, scan_data, projections, memory_budget, cache_path)
        return table
    modules = dict(mask_model.named_modules())
    unit_scan = _UnitScan(mask_model, dummy_input, groups, settings, calibration_batch, mask_context,
                          _weight_owner(weight_owner, model, modules), modules, scan_data)
    return _measured_table(model, table, unit_scan, eval_fn, calibration_inputs, cache_path, progress)


def _proxy_table(mask_model: nn.Module, dummy_input: Any, groups: Sequence[PruningGroup], layers: Sequence[str],
                 calibration_inputs: Any, settings: dict, calibration_batch: Any, progress: bool,
                 scan_data: _ScanData | None, projections: int, memory_budget: int | None,
                 cache_path: str | os.PathLike | None) -> SensitivityTable:
    """The ``proxy`` scan's table (the Fisher pass; input moments held up to half the budget), cached when asked."""
    chunks = fisher_chunks(mask_model, calibration_inputs, projections=projections, memory_budget=memory_budget,
                           levels=len(settings['levels']))  # a budget too small fails now, before any work
    table = _fisher_table(mask_model, dummy_input, groups, layers, calibration_inputs, settings, calibration_batch,
                          progress, scan_data, chunks, budget_bytes(memory_budget) // 2)
    if cache_path is not None:
        table.to_json(cache_path)
    return table


def _scan_both_decompositions(model: nn.Module, dummy_input: Any, *, groups: Sequence[PruningGroup],
                              layers: Sequence[str], mask_model: nn.Module | None, cache_path, **options
                              ) -> SensitivityTable:
    """``rank_method='best'``: the scan with Tucker-2 (and the pruning groups), the kxk convs again with SVD, each
    half cached beside ``cache_path`` (``NAME.auto.json``, ``NAME.svd.json``), merged by ``best_decompositions``."""
    def scan_with(method: str, part_groups: Sequence[PruningGroup], part_layers: Sequence[str]) -> SensitivityTable:
        path = None if cache_path is None else Path(cache_path).with_suffix(f'.{method}.json')
        return scan_sensitivity(model, dummy_input, groups=part_groups, layers=part_layers, rank_method=method,
                                mask_model=mask_model, cache_path=path, **options)

    modules = dict((mask_model if mask_model is not None else model).named_modules())
    kxk = [name for name in layers if method_for(modules[name], 'tucker2', name) == 'tucker2']
    return best_decompositions(scan_with('auto', groups, layers), scan_with('svd', (), kxk))


def best_decompositions(table: SensitivityTable, svd: SensitivityTable) -> SensitivityTable:
    """``table`` (a scan with Tucker-2 for kxk convs) with each kxk conv of ``svd`` (the same layers scanned with SVD)
    given the curve with the lower mean drop; ``decompose_methods`` says which. Same levels, so same FLOPs."""
    if svd.levels != table.levels or svd.mode != table.mode:
        raise HMCConfigError(f'Got scans at levels {table.levels} ({table.mode}) and {svd.levels} ({svd.mode}) but '
                             'expected the same levels and mode for both decompositions')
    chosen = SensitivityTable(levels=list(table.levels), mode=table.mode, baseline=table.baseline,
                              prune=dict(table.prune), decompose=dict(table.decompose), groups=dict(table.groups),
                              settings={**table.settings, 'rank_method': 'best'},
                              evaluations=table.evaluations + svd.evaluations, seconds=table.seconds + svd.seconds)
    for name, drops in svd.decompose.items():
        better = svd.mean_drop('decompose', name) < table.mean_drop('decompose', name)
        chosen.decompose[name] = list(drops) if better else list(table.decompose[name])
        chosen.decompose_methods[name] = 'svd' if better else 'tucker2'
    return chosen


def _weight_owner(weight_owner: Callable[[str], nn.Module] | None, model: nn.Module,
                  modules: dict[str, nn.Module]) -> Callable[[str], nn.Module]:
    """``name -> module`` holding the live weight: ``weight_owner``'s, else (a layer it does not know, e.g. an
    unwrapped consumer) the scanned model's own module of that name."""
    if weight_owner is None:
        return modules.__getitem__
    live = dict(model.named_modules())

    def owner(name: str) -> nn.Module:
        try:
            return weight_owner(name)
        except KeyError:
            return live[name]
    return owner


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
                   calibration_inputs, scan_data: _ScanData | None = None) -> dict:
    """Everything a table depends on: a cache made with other settings is rescanned, not resumed."""
    settings = {'mode': mode, 'levels': levels, 'importance': importance, 'round_to': round_to,
                'rank_method': rank_method, 'units': schedule, 'weights': model_fingerprint(mask_model)}
    if mode == 'proxy':
        settings['projections'] = int(projections)
    if mode in ('proxy', 'kl'):  # a cache scanned on other calibration data must not be resumed
        settings['calibration'] = inputs_fingerprint(calibration_inputs)
    if scan_data is not None:  # data-free scans keep their settings (and caches) as they were
        settings['data'] = scan_data.settings()
    return settings


def _batches_fingerprint(batches: Sequence[Any]) -> str:
    """One fingerprint of the model inputs of all ``batches`` (labels do not enter the fit)."""
    return inputs_fingerprint(tuple(item for batch in batches for item in batch_inputs(batch)))


@dataclass(frozen=True)
class _ScanData:
    """What a scan in one mode uses of a ``DataFit``: the fit batches with the two fit flags, and BN batches."""

    batches: tuple
    reconstruct: bool
    data_aware: bool
    bn_batches: tuple

    @classmethod
    def of(cls, data: DataFit | None, mode: str) -> _ScanData | None:
        """None when ``data`` changes nothing in this mode (no batches; the proxy does not recalibrate)."""
        if data is None:
            return None
        batches = tuple(data.batches)
        bn_batches = tuple(data.bn_batches) if mode != 'proxy' else ()
        scan_data = cls(batches=batches if (data.reconstruct or data.data_aware) else (),
                        reconstruct=bool(data.reconstruct and batches),
                        data_aware=bool(data.data_aware and batches), bn_batches=bn_batches)
        return scan_data if (scan_data.reconstruct or scan_data.data_aware or bn_batches) else None

    def settings(self) -> dict:
        return {'reconstruct': self.reconstruct, 'data_aware': self.data_aware,
                'fit_batches': _batches_fingerprint(self.batches) if self.batches else None,
                'bn_batches': _batches_fingerprint(self.bn_batches) if self.bn_batches else None}

    def moment_layers(self, operator: str, name: str, groups: dict[str, PruningGroup],
                      modules: dict[str, nn.Module]) -> list[str]:
        """The layers whose input moments unit ``(operator, name)`` needs: refitted consumers or the decomposed layer."""
        if operator == 'prune':
            return [consumer for consumer in groups[name].consumers if _refittable(modules[consumer])] \
                if self.reconstruct else []
        return [name] if self.data_aware else []


def _refittable(module: nn.Module) -> bool:
    """Layers the reconstruction refits (``engines.moments`` unfolds their inputs): Linear, Conv2d with groups=1."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                             and not module.transposed)


_MOMENT_BYTES = 1 << 28  # float64 input moments held at once by a kl/evaluator scan (one unit's own may exceed it)


class _MomentStore:
    """Input moments ``S = E[x x^T]`` (float64, ``(D, D)``) of the original model's layers, on demand.

    ``needs`` lists, unit by unit in scan order, the layers whose moments each unit uses. A missing moment
    starts one ``collect_moments`` pass over the batches for its unit's layers and, while the moments held stay
    under ``held_bytes`` (default ``_MOMENT_BYTES``), the next units' layers; the pass stops after the last of them
    to run. A moment is freed after its last use (``release``).
    """

    def __init__(self, model: nn.Module, batches: tuple, needs: Sequence[Sequence[str]],
                 held_bytes: int | None = None):
        self.model, self.batches = model, batches
        self.held_bytes = _MOMENT_BYTES if held_bytes is None else held_bytes
        self.modules = dict(model.named_modules())
        self.pending = [list(names) for names in needs if names]
        self.uses = Counter(name for names in self.pending for name in names)
        self.loaded: dict[str, torch.Tensor] = {}
        self._order: dict[str, int] | None = None

    def take(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The moments of one unit's layers; call ``release(names)`` once they are used."""
        names = list(names)
        if names in self.pending:
            self.pending.remove(names)
        missing = [name for name in dict.fromkeys(names) if name not in self.loaded]
        if missing:
            self._load(missing)
        return {name: self.loaded[name] for name in names}

    def release(self, names: Sequence[str]) -> None:
        for name in names:
            self.uses[name] -= 1
            if self.uses[name] <= 0:
                self.loaded.pop(name, None)

    def _bytes(self, name: str) -> int:
        module = self.modules[name]
        return 8 * module.weight[0].numel() ** 2  # D = C_in*kh*kw (in_features): one weight row

    def _execution_order(self) -> dict[str, int]:
        """``{layer: position}`` of the needed layers in one forward pass (one image of the first batch); empty when
        a layer runs more than once (a pass must then run to the end)."""
        if self._order is None:
            calls: dict[str, int] = {}
            handles = [self.modules[name].register_forward_pre_hook(
                lambda module, args, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)) for name in self.uses]
            try:
                with preserved_modes(self.model), torch.no_grad():
                    self.model.eval()
                    self.model(*(tensor[:1] for tensor in batch_inputs(self.batches[0])))
            finally:
                for handle in handles:
                    handle.remove()
            self._order = {} if any(count > 1 for count in calls.values()) else \
                {name: position for position, name in enumerate(calls)}
        return self._order

    def _load(self, missing: list[str]) -> None:
        wanted = list(missing)
        held = sum(self._bytes(name) for name in [*self.loaded, *wanted])
        upcoming = [name for names in self.pending for name in names]
        for name in dict.fromkeys(upcoming):  # the next units' layers ride along while the budget allows
            if name in self.loaded or name in wanted:
                continue
            if held + self._bytes(name) > self.held_bytes:
                break
            wanted.append(name)
            held += self._bytes(name)
        order = self._execution_order()
        last = max(wanted, key=lambda name: order.get(name, len(order))) if all(name in order for name in wanted) \
            else None
        moments = collect_moments(self.model, wanted, self.batches, stop_after=last)
        self.loaded.update({name: layer.input_moment for name, layer in moments.items()})
        release_memory()  # the pass's unfolded patches


@torch.no_grad()
def _refitted_weight(module: nn.Module, keep: torch.Tensor, input_moment: torch.Tensor) -> torch.Tensor:
    """A consumer's weight refitted to its original output from the kept inputs only (shape, dtype of its weight).

    In the unfolded patch space, with K the kept positions (kept input channels x kh*kw):
    ``W'_K = W S[:, K] (S[K, K] + lam I)^-1``; the pruned positions get 0 (their inputs are zero anyway).
    """
    weight = module.weight.detach()
    matrix = weight.reshape(weight.shape[0], -1).to(torch.float64)
    moment = input_moment.to(device=matrix.device, dtype=torch.float64)
    positions = keep.to(matrix.device).repeat_interleave(matrix.shape[1] // keep.numel())  # F.unfold's order
    kept = torch.nonzero(positions).flatten()
    refitted = torch.zeros_like(matrix)
    refitted[:, kept] = ridge_fit(matrix @ moment[:, kept], moment[kept][:, kept])
    return refitted.reshape(weight.shape).to(weight.dtype)


def _consumer_weights(selection: GroupSelection, modules: dict[str, nn.Module],
                      moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{consumer: refitted weight}`` for the consumers of ``moments`` that lose inputs in ``selection``."""
    weights = {}
    for name, moment in moments.items():
        keep = selection.consumer_keep.get(name)
        if keep is not None and not bool(keep.all()):
            weights[name] = _refitted_weight(modules[name], keep, moment)
    return weights


@dataclass
class _UnitScan:
    """How the ``kl`` and ``evaluator`` scans apply one unit at one level, measure, and undo it.

    Pruning masks come from ``mask_model`` (all groups at a level at once, kept for the other groups);
    low-rank and refitted consumer weights from ``modules``, swapped into ``weight_owner(name)``. A unit's
    weights are computed for every level at its first level (its input moments are freed right after).
    """

    mask_model: nn.Module
    dummy_input: Any
    groups: Sequence[PruningGroup]
    settings: dict
    calibration_batch: tuple | None
    mask_context: MaskContext
    weight_owner: Callable[[str], nn.Module]
    modules: dict[str, nn.Module]
    data: _ScanData | None = None
    selections_by_level: dict[float, dict[str, GroupSelection]] = field(default_factory=dict)
    moments: _MomentStore | None = None
    _unit: tuple[str, str] | None = None
    _unit_weights: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per level: {layer: weight}

    def expect(self, todo: Sequence[tuple[str, str]]) -> None:
        """Plan the input moments for the units ``todo``, in the order they will be scanned."""
        if self.data is not None and self.data.batches:
            groups = {group.name: group for group in self.groups}
            needs = [self.data.moment_layers(op, name, groups, self.modules) for op, name in todo]
            self.moments = _MomentStore(self.mask_model, self.data.batches, needs)

    def drop(self, operator: str, name: str, level: float, measure: Callable[[], float]) -> float:
        """``measure()`` with unit ``(operator, name)`` at ``level``; the model is restored afterwards."""
        weights = self._weights(operator, name)[self.settings['levels'].index(level)]
        with contextlib.ExitStack() as stack:
            for layer, weight in weights.items():
                stack.enter_context(swapped_weight(self.weight_owner(layer), weight))
            if operator == 'prune':  # inside the swap: masks that zero a swapped weight's rows act on it
                stack.enter_context(self.mask_context(self._selection(level, name).masks))
            return measure()

    def _selection(self, level: float, name: str) -> GroupSelection:
        if level not in self.selections_by_level:
            self.selections_by_level[level] = group_channel_selections(
                self.mask_model, self.dummy_input, {group.name: level for group in self.groups},
                importance=self.settings['importance'], round_to=self.settings['round_to'],
                calibration=self.calibration_batch)
        return self.selections_by_level[level][name]

    def _weights(self, operator: str, name: str) -> list[dict[str, torch.Tensor]]:
        """The weights swapped in for the unit at each level (none for pruning without reconstruction)."""
        if self._unit != (operator, name):
            self._unit_weights = []  # the previous unit's weights go first
            groups = {group.name: group for group in self.groups}
            layers = self.data.moment_layers(operator, name, groups, self.modules) if self.data else []
            moments = self.moments.take(layers) if self.moments is not None and layers else {}
            self._unit_weights = [self._level_weights(operator, name, level, moments)
                                  for level in self.settings['levels']]
            if moments:
                self.moments.release(layers)
            self._unit = (operator, name)
        return self._unit_weights

    def _level_weights(self, operator: str, name: str, level: float,
                       moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if operator == 'prune':
            return _consumer_weights(self._selection(level, name), self.modules, moments) if moments else {}
        module = self.modules[name]
        extra = {'input_moment': moments[name]} if name in moments else {}
        return {name: low_rank_weight(module, f'flops:{1.0 - level:.6g}', method=method_for(
            module, self.settings['rank_method'], name), layer_name=name, **extra)}


def _measured_table(model: nn.Module, table: SensitivityTable | None, unit_scan: _UnitScan,
                    eval_fn: Callable[[nn.Module], float] | None, calibration_inputs: Any,
                    cache_path: str | os.PathLike | None, progress: bool) -> SensitivityTable:
    """The ``kl`` or ``evaluator`` scan, in eval mode: every unit not yet in ``table`` (a resumed cache or None)."""
    settings = unit_scan.settings
    mode, levels = settings['mode'], settings['levels']
    with preserved_modes(model):  # every submodule's own flag comes back, not just the model's
        model.eval()
        bn_batches = unit_scan.data.bn_batches if unit_scan.data is not None else ()
        # The reference (kl) and the baseline (evaluator) go through the same recalibration as every measurement:
        # an unchanged model drops 0, and stale BN statistics of the original do not enter every unit's drop.
        with recalibrated_bn(model, bn_batches):
            baseline, measure = _drop_measure(model, mode, eval_fn, calibration_inputs)
        if bn_batches:
            measure = functools.partial(_recalibrated_drop, model, bn_batches, measure)
        if table is None:
            table = SensitivityTable(levels=levels, mode=mode, baseline=baseline,
                                     groups={group.name: list(group.members) for group in unit_scan.groups},
                                     settings=settings)
        todo = [(op, name) for op, names in settings['units'].items() for name in names
                if len(getattr(table, op).get(name, [])) < len(levels)]
        unit_scan.expect(todo)
        _scan_units(table, todo, unit_scan, measure, cache_path, progress)
    return table


def _recalibrated_drop(model: nn.Module, bn_batches: tuple, measure: Callable[[], float]) -> float:
    """``measure()`` after the BatchNorm statistics are re-estimated on ``bn_batches``; they come back after."""
    with recalibrated_bn(model, bn_batches):
        return measure()


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
                  progress: bool, scan_data: _ScanData | None = None,
                  chunks: FisherChunks | None = None, moment_bytes: int | None = None) -> SensitivityTable:
    """The ``proxy`` scan: masks (or refitted consumers) and low-rank weights for every unit and level (input moments
    held up to ``moment_bytes`` at once; each refitted group is followed by the decompositions of its consumers, so
    a layer's moment serves both and goes), then one Fisher pass (in ``chunks``). The selections and moments go
    before the pass; what the allocator freed is handed back after each phase (``utils.memory.release_memory``)."""
    started = time.perf_counter()
    levels = settings['levels']
    modules = dict(model.named_modules())
    release_memory()
    with tqdm(total=len(levels) * (1 + len(layers)), desc='HMC sensitivity scan (proxy): masks and low-rank weights',
              disable=not progress, unit='step') as bar:
        selections = _level_selections(model, dummy_input, groups, levels, settings, calibration_batch, bar)
        release_memory()
        refitted = [group for group in groups if _prices_consumers(group, selections[group.name], scan_data)]
        refitted_names = {group.name for group in refitted}
        by_name = {group.name: group for group in refitted}
        order = _proxy_unit_order(refitted, layers)
        moments = None
        if scan_data is not None and scan_data.batches:
            needs = [scan_data.moment_layers(operator, name, by_name, modules) for operator, name in order]
            moments = _MomentStore(model, scan_data.batches, needs, held_bytes=moment_bytes)
        prune_masks = {group.name: [selection.masks for selection in selections[group.name]]
                       for group in groups if group.name not in refitted_names}
        prune_weight_changes, weight_changes = {}, {}
        for operator, name in order:
            if operator == 'prune':
                prune_weight_changes.update(_prune_weight_changes([by_name[name]], selections, modules, moments,
                                                                  scan_data))
            else:
                weight_changes.update(_decompose_changes([name], levels, modules, settings, moments, scan_data, bar))
            trim_heap()  # a fitted factorisation's eigenproblems leave hundreds of MB of freed heap
        weight_changes = {name: weight_changes[name] for name in layers}
        del selections, moments  # the masks kept are in prune_masks
        release_memory()
    prune, decompose = fisher_drops(model, calibration_inputs, prune_masks=prune_masks, weight_changes=weight_changes,
                                    prune_weight_changes=prune_weight_changes, projections=settings['projections'],
                                    chunks=chunks, progress=progress)
    del prune_masks, weight_changes, prune_weight_changes
    release_memory()
    return SensitivityTable(levels=list(levels), mode='proxy', baseline=0.0,
                            prune={group.name: prune[group.name] for group in groups}, decompose=decompose,
                            groups={group.name: list(group.members) for group in groups}, settings=settings,
                            evaluations=len(levels) * (len(groups) + len(layers)),
                            seconds=time.perf_counter() - started)


def _proxy_unit_order(refitted: Sequence[PruningGroup], layers: Sequence[str]) -> list[tuple[str, str]]:
    """``[(operator, name)]``: each refitted group, then the layers to decompose among its consumers, then the rest."""
    order, pending = [], list(layers)
    for group in refitted:
        order.append(('prune', group.name))
        consumers = set(group.consumers)
        order += [('decompose', name) for name in pending if name in consumers]
        pending = [name for name in pending if name not in consumers]
    return order + [('decompose', name) for name in pending]


def _level_selections(model: nn.Module, dummy_input: Any, groups: Sequence[PruningGroup], levels: list[float],
                      settings: dict, calibration_batch: tuple | None, bar) -> dict[str, list[GroupSelection]]:
    """``{group: [selection at each level]}``, all groups of a level scored at once."""
    selections: dict[str, list[GroupSelection]] = {group.name: [] for group in groups}
    for level in levels:
        if groups:
            by_group = group_channel_selections(model, dummy_input, {group.name: level for group in groups},
                                                importance=settings['importance'], round_to=settings['round_to'],
                                                calibration=calibration_batch)
            for group in groups:
                selections[group.name].append(by_group[group.name])
        bar.update(1)
    return selections


def _prices_consumers(group: PruningGroup, selections: list[GroupSelection], scan_data: _ScanData | None) -> bool:
    """Whether the proxy prices a group by its consumers' weight changes (with reconstruction, when every consumer
    has a kept-input vector; a grouped or transposed consumer keeps the group on its masks)."""
    return bool(scan_data is not None and scan_data.reconstruct and selections
                and all(consumer in selections[0].consumer_keep for consumer in group.consumers))


def _prune_weight_changes(groups: Sequence[PruningGroup], selections: dict[str, list[GroupSelection]],
                          modules: dict[str, nn.Module], moments: _MomentStore | None,
                          scan_data: _ScanData | None) -> dict[str, list[dict[str, torch.Tensor]]]:
    """``{group: [{consumer: W' - W} at each level]}`` for the groups priced by their consumers."""
    prune_weight_changes: dict[str, list[dict[str, torch.Tensor]]] = {}
    for group in groups:
        layers = scan_data.moment_layers('prune', group.name, {group.name: group}, modules)
        group_moments = moments.take(layers) if layers else {}
        prune_weight_changes[group.name] = [_consumer_changes(selection, modules, group_moments)
                                            for selection in selections[group.name]]
        if layers:
            moments.release(layers)
    return prune_weight_changes


def _consumer_changes(selection: GroupSelection, modules: dict[str, nn.Module],
                      moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{consumer: W' - W}`` at one level: refitted where there is a moment, pruned inputs zeroed elsewhere."""
    refitted = _consumer_weights(selection, modules, moments)
    changes = {}
    for name, keep in selection.consumer_keep.items():
        weight = modules[name].weight.detach()
        if name in refitted:
            changes[name] = (refitted[name] - weight).contiguous()  # the Fisher pass reads it flattened
        elif not bool(keep.all()):  # a consumer that is not refitted only loses its pruned inputs
            shape = [1] * weight.dim()
            shape[1] = -1
            changes[name] = -weight * (~keep).to(weight.dtype).view(shape)
    return changes


def _decompose_changes(layers: Sequence[str], levels: list[float], modules: dict[str, nn.Module], settings: dict,
                       moments: _MomentStore | None, scan_data: _ScanData | None, bar) -> dict[str, list[torch.Tensor]]:
    """``{layer: [W_low_rank - W at each level]}``; data-aware when ``scan_data`` says so."""
    weight_changes: dict[str, list[torch.Tensor]] = {}
    for name in layers:
        module = modules[name]
        specs = [f'flops:{1.0 - level:.6g}' for level in levels]
        method = method_for(module, settings['rank_method'], name)
        if scan_data is not None and scan_data.data_aware:
            weights = low_rank_weights(module, specs, method=method, layer_name=name,
                                       input_moment=moments.take([name])[name])
            moments.release([name])  # its weights are computed: the moment goes
        else:
            weights = low_rank_weights(module, specs, method=method, layer_name=name)
        # contiguous: the Fisher pass reads each change flattened, once per pass
        weight_changes[name] = [(weight - module.weight.detach()).contiguous() for weight in weights]
        bar.update(len(levels))
    return weight_changes


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
