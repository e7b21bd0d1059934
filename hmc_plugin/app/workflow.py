"""End-to-end runs shared by the CLI, the recipes and the main job: train (or load) a baseline, scan once,
compress with each method through ``HMCCompressor`` at the same budget, fine-tune each the same, measure.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..apply import apply_plan
from ..engines.pruning import find_pruning_groups
from ..errors import HMCConfigError
from ..nni_api.compressor import HMCCompressor
from ..planning.plan import CompressionPlan
from ..planning.targets import plan_for_latency, plan_for_target
from ..sensitivity.table import SensitivityTable
from ..utils.counting import count_flops, count_params
from ..utils.fingerprint import model_fingerprint
from ..utils.jsonio import encode_float, read_json, write_json
from ..utils.kl import output_log_probs, per_input_kl
from ..utils.timing import measure_latency, measure_latency_side_by_side
from .data import DataSplits, calibration_batch, make_loaders, train_permutation, without_train_images
from .export import save_compressed
from .training import evaluate_accuracy, make_torch_evaluator, train, training_step

__all__ = ['RunSettings', 'train_or_load_baseline', 'make_compressor', 'scan', 'compress_and_measure', 'compare_methods', 'MARGIN_CANDIDATES', 'AUTO_MARGINS', 'AUTO_DECOMPOSE_WEIGHTS', 'sgd_finetune', 'plan_by_margin_rule', 'one_standard_error_choice', 'choose_margin']

_logger = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """Everything a run depends on; written into report.json so a run can be reproduced."""

    model: str = 'resnet56'
    data: str = 'digits'
    image_size: int | None = None
    target_flops: float | None = 0.5
    target_params: float | None = None
    target_latency: float | None = None
    latency_batch: int = 1
    latency_cache: str | None = None   # None: $HMC_LATENCY_CACHE or ~/.cache/hmc_plugin/latency.json
    methods: Sequence[str] = ('prune', 'decompose', 'ahc', 'nahc')
    op_types: Sequence[str] = ('Conv2d',)
    exclude_op_names: Sequence[str] = ()
    levels: Sequence[float] = (0.2, 0.4, 0.6, 0.8)
    importance: str = 'l1'
    rank_method: str = 'auto'
    margin: float | str | None = None   # 'auto': HMC's margin rule (choose_margin) picks tau and decompose_weight
    probe_steps: int = 60                # fine-tuning steps of each candidate of margin 'auto'
    decompose_weight: float = 1.0
    sensitivity: str = 'proxy'
    calibration_size: int = 64
    train_epochs: int = 15
    train_lr: float = 0.1
    finetune_epochs: int = 3
    finetune_lr: float = 0.003
    batch_size: int = 64
    seed: int = 0
    threads: int = 2
    distill: bool = False
    speedup: str = 'nni'
    checkpoint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.__dict__.items()}


def train_or_load_baseline(model: nn.Module, splits: DataSplits, settings: RunSettings, out_dir: Path,
                           progress: bool = True) -> nn.Module:
    """Load ``settings.checkpoint`` or a cached ``out_dir/baseline.pt`` made with the same settings; else train."""
    if settings.checkpoint:
        state = torch.load(settings.checkpoint, map_location='cpu', weights_only=True)
        model.load_state_dict(state.get('state_dict', state) if isinstance(state, dict) else state)
        return model
    key = {k: getattr(settings, k) for k in ('model', 'data', 'train_epochs', 'train_lr', 'batch_size', 'seed')}
    cache = out_dir / 'baseline.pt'
    if cache.exists():
        saved = torch.load(cache, map_location='cpu', weights_only=True)
        if saved.get('key') == json.dumps(key, sort_keys=True):
            model.load_state_dict(saved['state_dict'])
            _logger.info('Loaded the cached baseline from %s', cache)
            return model
    torch.manual_seed(settings.seed)
    train_loader, _ = make_loaders(splits, settings.batch_size, seed=settings.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.train_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, settings.train_epochs))
    for _ in range(settings.train_epochs):
        train(model, optimizer, training_step, train_loader, max_epochs=1, progress=progress, description='train baseline')
        scheduler.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({'key': json.dumps(key, sort_keys=True), 'state_dict': model.state_dict()}, cache)
    return model


def make_compressor(model: nn.Module, splits: DataSplits, settings: RunSettings, mode: str, *,
                    table: SensitivityTable | None = None, plan: CompressionPlan | None = None,
                    cache_path: Path | None = None, progress: bool = True,
                    on_epoch_end: Callable[[nn.Module, int], None] | None = None) -> HMCCompressor:
    """An ``HMCCompressor`` for ``mode`` with a ``TorchEvaluator`` on ``splits`` (NNI's user flow);
    ``on_epoch_end(model, epoch)`` runs after each fine-tuning epoch."""
    train_loader, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    evaluator = make_torch_evaluator(train_loader, test_loader, model, lr=settings.finetune_lr,
                                     dummy_input=dummy_input, progress=progress, on_epoch_end=on_epoch_end)
    entry: dict[str, Any] = {'op_types': list(settings.op_types), 'mode': mode, 'levels': list(settings.levels),
                             'importance': settings.importance, 'rank_method': settings.rank_method,
                             'sensitivity': settings.sensitivity, 'speedup': settings.speedup, 'distill': settings.distill}
    if settings.exclude_op_names:
        entry['exclude_op_names'] = list(settings.exclude_op_names)
    entry.update(_budget(settings))
    if settings.target_latency is not None:
        entry.update(latency_batch=settings.latency_batch, latency_threads=settings.threads)
    if settings.margin is not None and settings.margin != 'auto':
        entry['margin'] = settings.margin
    if settings.decompose_weight != 1:
        entry['decompose_weight'] = settings.decompose_weight
    calibration, _ = calibration_batch(splits, settings.calibration_size, seed=settings.seed)
    return HMCCompressor(model, [entry], evaluator, dummy_input, calibration_inputs=calibration,
                         sensitivity_table=table, plan=plan, cache_path=str(cache_path) if cache_path else None,
                         latency_cache=settings.latency_cache, progress=progress)


def scan(model: nn.Module, splits: DataSplits, settings: RunSettings, out_dir: Path,
         progress: bool = True) -> SensitivityTable:
    """Scan once (resumable through ``out_dir/sensitivity.json``) and draw ``sensitivity.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    compressor = make_compressor(model, splits, settings, 'nahc', cache_path=out_dir / 'sensitivity.json',
                                 progress=progress)
    try:
        table = compressor.scan()
    finally:
        compressor.unwrap_model()
    table.to_json(out_dir / 'sensitivity.json')
    table.plot(out_dir / 'sensitivity.png')
    return table


def compress_and_measure(model: nn.Module, splits: DataSplits, settings: RunSettings, mode: str,
                         table: SensitivityTable, progress: bool = True,
                         out_dir: Path | None = None) -> tuple[dict[str, Any], nn.Module, CompressionPlan]:
    """Compress a copy of ``model`` with ``mode``, fine-tune it, and measure one report row (margin 'auto':
    the probes are kept in ``out_dir/margin_rule.json`` for a rerun)."""
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    started = time.perf_counter()
    plan, margin_rule = None, None
    if mode == 'hmc' and settings.margin == 'auto':
        plan, margin_rule = plan_by_margin_rule(model, splits, settings, table,
                                                cache_path=out_dir / 'margin_rule.json' if out_dir else None)
    compressor = make_compressor(model, splits, settings, mode, table=table, plan=plan, progress=progress)
    compressed, _ = compressor.compress()
    plan = compressor.plan
    acc_zero_shot = evaluate_accuracy(compressed, test_loader)
    torch.manual_seed(settings.seed)
    compressor.finetune(compressed, max_epochs=settings.finetune_epochs)
    row = {
        'model': settings.model, 'mode': mode, 'target_flops': settings.target_flops,
        'target_latency': settings.target_latency,
        'latency_budget': margin_rule['latency_budget'] if margin_rule else compressor.latency_report,
        'params_before': count_params(model), 'params_after': count_params(compressed),
        'flops_before': count_flops(model, dummy_input), 'flops_after': count_flops(compressed, dummy_input),
        'acc_before': evaluate_accuracy(model, test_loader), 'acc_zero_shot': acc_zero_shot,
        'acc_after': evaluate_accuracy(compressed, test_loader),
        'seconds': time.perf_counter() - started,
        **_latencies(model, compressed, splits, settings),
        'groups': plan.group_counts(),
        'layers': [{'name': layer.name, 'group': layer.group, 'prune_ratio': layer.prune_ratio,
                    'ranks': list(layer.ranks) if layer.ranks else None} for layer in plan.layers],
    }
    if margin_rule:
        row['margin_rule'] = margin_rule
    return row, compressed, plan


def _latencies(model: nn.Module, compressed: nn.Module, splits: DataSplits, settings: RunSettings) -> dict[str, float]:
    """Batch-1 and batch-64 latency of the original and the compressed model, measured side by side."""
    size = (splits.in_channels, splits.image_size, splits.image_size)
    before, after = measure_latency_side_by_side([model, compressed], torch.zeros(1, *size), num_threads=settings.threads)
    before64, after64 = measure_latency_side_by_side([model, compressed], torch.zeros(64, *size),
                                                     num_threads=settings.threads, warmup=2, repeats=7)
    return {'latency_ms_before': before, 'latency_ms_after': after,
            'latency_ms_before_b64': before64, 'latency_ms_after_b64': after64}


def _budget(settings: RunSettings) -> dict[str, float]:
    """The one budget of the settings as a config key: target_latency, else target_flops, else target_params."""
    for key in ('target_latency', 'target_flops', 'target_params'):
        if getattr(settings, key) is not None:
            return {key: getattr(settings, key)}
    raise HMCConfigError('The run settings set no budget: give target_flops, target_params or target_latency')


def uncompressed_row(model: nn.Module, splits: DataSplits, settings: RunSettings) -> dict[str, Any]:
    """The reference row: the model as trained."""
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    batch64 = torch.zeros(64, splits.in_channels, splits.image_size, splits.image_size)
    params, flops, accuracy = count_params(model), count_flops(model, dummy_input), evaluate_accuracy(model, test_loader)
    latency = measure_latency(model, dummy_input, num_threads=settings.threads)
    latency64 = measure_latency(model, batch64, num_threads=settings.threads, warmup=2, repeats=7)
    return {'model': settings.model, 'mode': 'uncompressed', 'target_flops': None,
            'params_before': params, 'params_after': params, 'flops_before': flops, 'flops_after': flops,
            'acc_before': accuracy, 'acc_zero_shot': accuracy, 'acc_after': accuracy,
            'latency_ms_before': latency, 'latency_ms_after': latency,
            'latency_ms_before_b64': latency64, 'latency_ms_after_b64': latency64, 'layers': []}


def compare_methods(model: nn.Module, splits: DataSplits, settings: RunSettings, out_dir: Path,
                    progress: bool = True) -> tuple[list[dict[str, Any]], SensitivityTable]:
    """Baseline, one scan, every method at the same budget; saves plan.json and the compressed model of
    the last method (NaHC by default)."""
    model = train_or_load_baseline(model, splits, settings, out_dir, progress)
    table = scan(model, splits, settings, out_dir, progress)
    rows = [uncompressed_row(model, splits, settings)]
    for mode in settings.methods:
        row, compressed, plan = compress_and_measure(model, splits, settings, mode, table, progress, out_dir)
        rows.append(row)
        _logger.info('%s: FLOPs kept %.3f, accuracy %.4f -> %.4f', mode, row['flops_after'] / row['flops_before'],
                     row['acc_zero_shot'], row['acc_after'])
        if mode == settings.methods[-1]:
            plan.to_json(out_dir / 'plan.json')
            save_compressed(compressed, out_dir / f'compressed_{mode}.pt', plan)
    return rows, table


MARGIN_CANDIDATES = (0.0, 0.25, 0.5, 1.0, 2.0, math.inf)


AUTO_MARGINS = (0.0, 0.5, math.inf)               # margin 'auto': NaHC without 'both', NaHC's default, AHC


AUTO_DECOMPOSE_WEIGHTS = (1.0, 10.0, math.inf)    # as scanned, decompositions 10x as costly, never decompose


def sgd_finetune(model: nn.Module, splits: DataSplits, settings: RunSettings, max_steps: int | None = None) -> float:
    """Fine-tune ``model`` in place for ``settings.finetune_epochs`` epochs (or ``max_steps`` steps): SGD at
    ``settings.finetune_lr``, momentum 0.9, weight decay 5e-4 (as ``make_torch_evaluator``), batch order seeded
    by ``settings.seed``. Leaves the model in eval mode; returns the seconds it took."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    train_loader, _ = make_loaders(splits, settings.batch_size, seed=settings.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.finetune_lr, momentum=0.9, weight_decay=5e-4)
    train(model, optimizer, training_step, train_loader, max_steps=max_steps,
          max_epochs=None if max_steps is not None else settings.finetune_epochs, progress=False)
    model.eval()
    return time.perf_counter() - started


def plan_by_margin_rule(model: nn.Module, splits: DataSplits, settings: RunSettings, table: SensitivityTable,
                        cache_path: str | os.PathLike | None = None) -> tuple[CompressionPlan, dict[str, Any]]:
    """Margin ``'auto'``: HMC's plan by ``choose_margin`` over ``AUTO_MARGINS`` x ``AUTO_DECOMPOSE_WEIGHTS``.

    Each candidate is fine-tuned ``settings.probe_steps`` steps (60 by default) before it is scored, so the
    rule can fall back to prune-only's plan (tau inf, weight inf) when no hybrid recovers measurably closer
    to the original; ``cache_path`` keeps the probes for a rerun (``choose_margin``). Returns the plan and a
    JSON-ready record ``{'margin', 'decompose_weight', 'probe_steps',
    'latency_budget', 'trials'}`` (``inf`` as ``'inf'``; ``latency_budget``: the chosen plan's
    ``plan_for_latency`` report under a latency budget, else None).
    """
    margin, plan, trials = choose_margin(model, splits, settings, table, candidates=AUTO_MARGINS,
                                         decompose_weights=AUTO_DECOMPOSE_WEIGHTS, probe_steps=settings.probe_steps,
                                         cache_path=cache_path)
    chosen = next(trial for trial in trials
                  if (trial['margin'], trial['decompose_weight']) == (margin, plan.decompose_weight))
    encoded = [{**trial, 'margin': encode_float(trial['margin']),
                'decompose_weight': encode_float(trial['decompose_weight'])} for trial in trials]
    return plan, {'margin': encode_float(margin), 'decompose_weight': encode_float(plan.decompose_weight),
                  'probe_steps': settings.probe_steps, 'latency_budget': chosen.get('latency_budget'),
                  'trials': encoded}


def one_standard_error_choice(trials: Sequence[dict[str, Any]], free: str) -> dict[str, Any]:
    """The probe rule of ``choose_margin`` over its reached trials (``'kl'``, ``'kl_se'``, ``'decomposed'``, ``free``).

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


class _ProbeCache:
    """Per-image KL of each probed plan (plan key -> tensor), kept in a JSON file under a settings key."""

    def __init__(self, path: str | os.PathLike | None, key: dict[str, Any]):
        self.path, self.key, self.measured = (Path(path) if path else None), key, {}
        if self.path is not None and self.path.exists():
            try:
                data = read_json(self.path)
            except ValueError:
                data = {}
            if data.get('key') == key:
                self.measured = {plan: torch.tensor(values) for plan, values in data.get('measured', {}).items()}
                _logger.info('HMC margin rule: %d probed plan(s) reused from %s', len(self.measured), self.path)

    def add(self, plan_key: str, per_image: torch.Tensor) -> None:
        self.measured[plan_key] = per_image
        if self.path is not None:
            write_json({'key': self.key, 'measured': {plan: values.tolist() for plan, values in self.measured.items()}},
                       self.path)


def choose_margin(model: nn.Module, splits: DataSplits, settings: RunSettings, table: SensitivityTable, *,
                  candidates: Sequence[float] = MARGIN_CANDIDATES, decompose_weights: Sequence[float] = (1.0,),
                  probe_steps: int = 0, held_out: int = 256,
                  cache_path: str | os.PathLike | None = None) -> tuple[float, CompressionPlan, list[dict[str, Any]]]:
    """HMC's margin rule: the ``tau`` (and exchange rate) whose compressed model stays closest to the original.

    For each candidate ``tau`` (default 0, 0.25, 0.5 = NaHC's default, 1, 2 and inf = AHC) and each
    ``decompose_weight`` (``plan.build_plan``: decomposition drops count that many times), the ``hmc``
    plan at the settings' target is built from ``table`` and applied (torch-pruning fast path), and the
    KL divergence of the compressed model's outputs from the original's is measured on ``held_out``
    training images that the scan's calibration batch does not contain (the next ones of the same seeded
    permutation; the test split is never used). The lowest KL wins; ties go to the smaller ``tau``, then
    the smaller weight. Candidates that give the same plan are applied (and probed) once.

    ``probe_steps=0`` measures the KL zero-shot. With ``probe_steps > 0`` each compressed model is first
    fine-tuned for that many steps (``sgd_finetune``) on the train split without the held-out images, so
    the rule sees how well a plan *recovers*: a zero-shot scan rates decomposition as cheap, and heavily
    decomposed models can recover less than pruned ones. Probes must get past the first, chaotic steps of
    recovery: on ResNet-56 at half its CPU time, 20 steps left candidates with the same groups up to 2.5
    nats apart; the latency benchmark probes 60 (3 epochs of digits; README "Latency budgets"). Plans that
    recover alike stay within noise of each other, so the probe rule takes the one-standard-error rule: of
    the candidates whose KL exceeds the lowest by at most one standard error of the paired per-image
    difference, the simplest wins: the fewest decomposed layers (each one is a new operator that had to
    prove itself), then prune-only's plan, then the most of what the budget leaves free: FLOPs under a
    latency or parameter budget, parameters under a FLOPs budget. A weight of ``inf`` among
    ``decompose_weights`` never decomposes; with ``margin=inf`` that candidate is prune-only's plan (the same
    plan as ``mode='prune'``: under a latency budget its timings come from the latency cache), so HMC
    departs from pruning alone only for a plan that recovers measurably closer to the original.

    A candidate whose grouping cannot reach the budget is skipped (its trial has ``'error'``).

    ``cache_path``: a JSON file that keeps each probed plan's per-image KL as soon as it is measured, for
    this model's weights and these probe settings; a rerun (after an interruption) probes only the plans
    it lacks.

    Returns ``(tau, plan, trials)``; ``plan.decompose_weight`` is the chosen weight and ``trials`` holds one
    ``{'margin', 'decompose_weight', 'kl', 'kl_se', 'flops_kept', 'params_kept', 'decomposed', 'groups',
    'probe_steps'}`` per candidate (``decomposed``: how many layers the plan decomposes; ``kl_se``: standard
    error of its per-image KL minus the lowest-KL candidate's), with ``'latency_budget'`` (the
    ``plan_for_latency`` report) under a latency budget.
    """
    if isinstance(probe_steps, bool) or not isinstance(probe_steps, int) or probe_steps < 0:
        raise HMCConfigError(f'Got probe_steps={probe_steps!r} but expected an int >= 0 (0 measures zero-shot)')
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    images, _ = calibration_batch(splits, settings.calibration_size + held_out, seed=settings.seed)
    held_out_images = images[settings.calibration_size:]
    if len(held_out_images) == 0:
        raise ValueError(f'choose_margin: the train split has no images beyond the {settings.calibration_size} '
                         f'calibration images to hold out')
    probe_splits = without_train_images(splits, train_permutation(splits, settings.seed)[
        settings.calibration_size:settings.calibration_size + held_out]) if probe_steps else None
    groups = find_pruning_groups(model, dummy_input)
    budget = _budget(settings)
    reference = output_log_probs(model, [held_out_images])
    trials, plans = [], {}
    probes = _ProbeCache(cache_path, {'model': model_fingerprint(model), 'data': settings.data, 'seed': settings.seed,
                                      'calibration_size': settings.calibration_size, 'held_out': held_out,
                                      'probe_steps': probe_steps, 'finetune_lr': settings.finetune_lr,
                                      'batch_size': settings.batch_size})
    for weight in decompose_weights:
        for margin in candidates:
            common = dict(mode='hmc', margin=margin, decompose_weight=weight, importance=settings.importance,
                          rank_method=settings.rank_method, **budget)
            trial: dict[str, Any] = {'margin': margin, 'decompose_weight': weight, 'probe_steps': probe_steps}
            try:
                if settings.target_latency is not None:
                    plan, trial['latency_budget'] = plan_for_latency(
                        table, model, dummy_input, groups, batch=settings.latency_batch, threads=settings.threads,
                        latency_cache=settings.latency_cache, **common)
                else:
                    plan, _ = plan_for_target(table, model, dummy_input, groups, **common)
            except HMCConfigError as error:  # this grouping cannot reach the budget: not a candidate
                trials.append({**trial, 'kl': None, 'flops_kept': None, 'groups': None, 'error': str(error)})
                continue
            key = json.dumps([plan.prune_ratios, {name: list(ranks) for name, ranks in plan.ranks.items()}],
                             sort_keys=True)
            if key not in probes.measured:
                compressed = apply_plan(copy.deepcopy(model), plan, dummy_input, speedup='torch_pruning')
                if probe_steps:
                    sgd_finetune(compressed, probe_splits, settings, max_steps=probe_steps)
                probes.add(key, per_input_kl(reference, compressed, [held_out_images]))
            per_image = probes.measured[key]
            plans[(margin, weight)] = plan
            _logger.info('HMC margin rule: candidate %d of %d (tau %s, decompose_weight %s): held-out KL %.4g',
                         len(trials) + 1, len(candidates) * len(decompose_weights), margin, weight,
                         float(per_image.mean()))
            trials.append({**trial, 'kl': max(0.0, float(per_image.mean())), 'flops_kept': plan.measured['flops'],
                           'params_kept': plan.measured['params'], 'decomposed': len(plan.ranks),
                           'groups': plan.group_counts(),
                           '_per_image': per_image})
    if not plans:
        raise HMCConfigError(f'No margin in {list(candidates)} reaches the budget {budget}: {trials[-1]["error"]}')
    reached = [trial for trial in trials if 'error' not in trial]
    lowest = min(reached, key=lambda trial: (trial['kl'], trial['margin'], trial['decompose_weight']))
    for trial in reached:
        difference = trial.pop('_per_image') - lowest['_per_image'] if trial is not lowest else None
        trial['kl_se'] = 0.0 if difference is None else float(difference.std() / math.sqrt(len(difference)))
    lowest.pop('_per_image')
    best = lowest
    if probe_steps:
        best = one_standard_error_choice(reached, 'params_kept' if 'target_flops' in budget else 'flops_kept')
    _logger.info('HMC margin rule: tau=%s, decompose_weight=%s (held-out KL %.4g%s; candidates %s)', best['margin'],
                 best['decompose_weight'], best['kl'], f' after {probe_steps} steps' if probe_steps else ' zero-shot',
                 ', '.join(f"{trial['margin']}/{trial['decompose_weight']}: "
                           f"{'unreachable' if trial['kl'] is None else format(trial['kl'], '.4g')}" for trial in trials))
    return best['margin'], plans[(best['margin'], best['decompose_weight'])], trials
