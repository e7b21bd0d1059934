"""End-to-end runs shared by the CLI, the recipes and the main job: train (or load) a baseline, scan once,
compress with each method through ``HMCCompressor`` at the same budget, fine-tune each the same, measure.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..apply import DataFit, apply_plan
from ..engines.pruning import find_pruning_groups
from ..errors import HMCConfigError
from ..nni_api.compressor import HMCCompressor
from ..nni_api.finetune import finetune
from ..planning.margin import (
    AUTO_DECOMPOSE_WEIGHTS,
    AUTO_MARGINS,
    MARGIN_CANDIDATES,
    ProbeStore,
    choose_margin_by,
    one_standard_error_choice,
)
from ..planning.plan import CompressionPlan
from ..planning.targets import plan_for_latency, plan_for_target
from ..sensitivity.table import SensitivityTable
from ..utils.device import model_device, resolve_device, to_device
from ..utils.fingerprint import model_fingerprint
from ..utils.jsonio import encode_float
from ..utils.kl import output_log_probs, per_input_kl
from ..utils.timing import measure_latency_side_by_side
from . import distributed, report
from .data import DataSplits, calibration_batch, make_loaders, train_permutation, without_train_images
from .export import save_compressed
from .run_settings import RunSettings
from .training import correct_per_image, evaluate_accuracy, make_torch_evaluator, train_baseline

__all__ = ['RunSettings', 'CHANCE_MARGIN', 'train_or_load_baseline', 'check_baseline', 'make_compressor', 'scan',
           'compress_and_measure', 'compare_methods', 'MARGIN_CANDIDATES', 'AUTO_MARGINS', 'AUTO_DECOMPOSE_WEIGHTS',
           'sgd_finetune', 'plan_by_margin_rule', 'one_standard_error_choice', 'choose_margin']

_logger = logging.getLogger(__name__)


CHANCE_MARGIN = 0.05  # a baseline within this much accuracy of chance (1 / classes) has learnt nothing to keep


def dummy_batch(splits: DataSplits, device: torch.device | str = 'cpu') -> torch.Tensor:
    """A batch-1 input of zeros ``(1, C, H, W)`` of the data's shape on ``device``."""
    return torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)


def train_or_load_baseline(model: nn.Module, splits: DataSplits, settings: RunSettings, out_dir: Path,
                           progress: bool = True) -> nn.Module:
    """Load ``settings.checkpoint`` or a cached ``out_dir/baseline.pt`` made with the same settings; else train
    (``training.train_baseline``: warm-up, then cosine; checkpointed every epoch in ``out_dir/baseline.partial.pt``,
    so an interrupted training resumes). Then ``check_baseline``. The model is moved to the run's ``device``
    first: the run's models live there (this is the run's own model, never a user's). Under ``torchrun`` rank 0
    does this and the other ranks receive its weights."""
    model.to(resolve_device(settings.device, model=model))
    if distributed.active():
        if distributed.is_main():
            _baseline(model, splits, settings, out_dir, progress)
        return distributed.broadcast_module(model)
    return _baseline(model, splits, settings, out_dir, progress)


def _baseline(model: nn.Module, splits: DataSplits, settings: RunSettings, out_dir: Path, progress: bool) -> nn.Module:
    if settings.checkpoint:
        state = torch.load(settings.checkpoint, map_location='cpu', weights_only=True)
        model.load_state_dict(state.get('state_dict', state) if isinstance(state, dict) else state)
        return check_baseline(model, splits, settings)
    key = json.dumps({k: getattr(settings, k) for k in ('model', 'data', 'train_epochs', 'train_lr', 'warmup_epochs',
                                                        'batch_size', 'seed')}, sort_keys=True)
    cache = out_dir / 'baseline.pt'
    if cache.exists():
        saved = torch.load(cache, map_location='cpu', weights_only=True)
        if saved.get('key') == key:
            model.load_state_dict(saved['state_dict'])
            _logger.info('Loaded the cached baseline from %s', cache)
            return check_baseline(model, splits, settings)
    torch.manual_seed(settings.seed)
    train_loader, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    train_baseline(model, train_loader, test_loader, epochs=settings.train_epochs, lr=settings.train_lr,
                   warmup_epochs=settings.warmup_epochs, checkpoint=out_dir / 'baseline.partial.pt', key=key,
                   progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({'key': key, 'state_dict': model.state_dict()}, cache)
    return check_baseline(model, splits, settings)


def check_baseline(model: nn.Module, splits: DataSplits, settings: RunSettings) -> nn.Module:
    """``model``, unless its test accuracy is within ``CHANCE_MARGIN`` of chance: then ``HMCConfigError`` with the
    figure and the remedies (``settings.allow_chance_baseline`` goes on with a warning)."""
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    accuracy, chance = evaluate_accuracy(model, test_loader), 1 / splits.num_classes
    if accuracy > chance + CHANCE_MARGIN:
        return model
    source = (f'the checkpoint {settings.checkpoint}' if settings.checkpoint else
              f'the baseline trained for {settings.train_epochs} epoch(s) at train_lr {settings.train_lr:g}')
    message = (f'{source} reaches {accuracy:.3f} test accuracy on {splits.name}, within {CHANCE_MARGIN} of chance '
               f'({chance:.3f} for {splits.num_classes} classes): compressing it would measure nothing')
    if settings.allow_chance_baseline:
        _logger.warning('%s; going on (allow_chance_baseline)', message[0].upper() + message[1:])
        return model
    raise HMCConfigError(f'{message[0].upper() + message[1:]}. Train longer (--train-epochs), at a lower rate '
                         f'(--train-lr, e.g. {settings.train_lr / 2:g}), give trained weights (--checkpoint) or pass '
                         f'--allow-chance-baseline to go on anyway')


def make_compressor(model: nn.Module, splits: DataSplits, settings: RunSettings, mode: str, *,
                    table: SensitivityTable | None = None, plan: CompressionPlan | None = None,
                    cache_path: Path | None = None, progress: bool = True,
                    on_epoch_end: Callable[[nn.Module, int], None] | None = None,
                    data_parallel: bool = False) -> HMCCompressor:
    """An ``HMCCompressor`` for ``mode`` with a ``TorchEvaluator`` on ``splits`` (NNI's user flow);
    ``on_epoch_end(model, epoch)`` runs after each fine-tuning epoch. ``data_parallel`` (under ``torchrun``):
    every rank fine-tunes with DDP on its shard of the train split (``app.distributed``)."""
    train_loader, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    if data_parallel:
        train_loader = distributed.shard_loader(train_loader, settings.seed)
    dummy_input = dummy_batch(splits, model_device(model))
    evaluator = make_torch_evaluator(train_loader, test_loader, model, lr=settings.finetune_lr,
                                     schedule=settings.finetune_schedule, epochs=max(1, settings.finetune_epochs),
                                     dummy_input=dummy_input, progress=progress, on_epoch_end=on_epoch_end,
                                     data_parallel=data_parallel, memory_budget=settings.memory_budget)
    entry: dict[str, Any] = {'op_types': list(settings.op_types)}
    if settings.exclude_op_names:
        entry['exclude_op_names'] = list(settings.exclude_op_names)
    calibration, _ = calibration_batch(splits, settings.calibration_size, seed=settings.seed)
    return HMCCompressor(model, [entry], evaluator, dummy_input, calibration_inputs=calibration.to(dummy_input.device),
                         calibration_loader=to_device(calibration_batches(splits, settings), dummy_input.device),
                         sensitivity_table=table, plan=plan, cache_path=str(cache_path) if cache_path else None,
                         latency_cache=settings.latency_cache, progress=progress, **settings.compressor_options(mode))


DATA_FIT_KEYS = ('bn_batches', 'data_aware', 'reconstruct', 'fit_batches', 'fit_order', 'rank_method')


def calibration_batches(splits: DataSplits, settings: RunSettings) -> list[torch.Tensor]:
    """The batches of the BatchNorm recalibration and the data-aware fit: ``max(bn_batches, fit_batches)`` batches
    of ``batch_size`` training images, the first of the calibration batch's seeded permutation."""
    count = max(settings.bn_batches, settings.fit_batches)
    images, _ = calibration_batch(splits, count * settings.batch_size, seed=settings.seed)
    return list(images.split(settings.batch_size))


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
                         table: SensitivityTable, progress: bool = True, out_dir: Path | None = None,
                         timed: bool = True) -> tuple[dict[str, Any], nn.Module, CompressionPlan]:
    """Compress a copy of ``model`` with ``mode``, fine-tune it, and measure one report row (margin 'auto':
    the probes are kept in ``out_dir/margin_rule.json`` for a rerun).

    ``timed=False`` leaves the row's latencies ``None``, for a caller that times every model of its table
    together (``compare_methods``); else the row is timed side by side with ``model``. Under ``torchrun`` rank 0
    plans (``table`` is only needed there), every rank applies the broadcast plan and fine-tunes with DDP, and
    the row's ``distributed`` holds ``distributed.record`` (world size, each rank's fingerprint of its fine-tuned
    weights and its training samples); only rank 0 times.
    """
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    dummy_input = dummy_batch(splits, model_device(model))
    started = time.perf_counter()
    plan, margin_rule, latency_report = _rank0_plan(model, splits, settings, mode, table, progress, out_dir)
    compressor = make_compressor(model, splits, settings, mode, table=table, plan=plan, progress=progress,
                                 data_parallel=distributed.active())
    compressed, _ = compressor.compress()
    plan = compressor.plan
    acc_zero_shot = evaluate_accuracy(compressed, test_loader)
    torch.manual_seed(settings.seed)
    compressor.finetune(compressed, max_epochs=settings.finetune_epochs)
    acc_before, acc_after = evaluate_accuracy(model, test_loader), evaluate_accuracy(compressed, test_loader)
    seconds = time.perf_counter() - started
    extra = {'margin_rule': margin_rule} if margin_rule else {}
    if distributed.active():
        extra['distributed'] = distributed.record(compressed)
    timed = timed and distributed.is_main()
    row = report.method_row(settings.model, mode, model, compressed, dummy_input, acc_before=acc_before,
                            acc_zero_shot=acc_zero_shot, acc_after=acc_after,
                            latencies=_latencies(model, [compressed], splits, settings)[1] if timed else None,
                            target_flops=settings.target_flops, plan=plan, target_latency=settings.target_latency,
                            latency_budget=latency_report or compressor.latency_report, seconds=seconds, **extra)
    return row, compressed, plan


def _rank0_plan(model: nn.Module, splits: DataSplits, settings: RunSettings, mode: str,
                table: SensitivityTable | None, progress: bool,
                out_dir: Path | None) -> tuple[CompressionPlan | None, dict[str, Any] | None, dict[str, Any] | None]:
    """``(plan, margin_rule, latency_report)`` made before the compressor: margin 'auto''s plan and record, and
    under ``torchrun`` rank 0's plan, broadcast to every rank as plain data; ``(None, None, None)`` otherwise."""
    plan, margin_rule, latency_report = None, None, None
    if settings.uses_margin_rule(mode) and distributed.is_main():
        plan, margin_rule = plan_by_margin_rule(model, splits, settings, table,
                                                cache_path=out_dir / 'margin_rule.json' if out_dir else None)
        latency_report = margin_rule['latency_budget']
    if not distributed.active():
        return plan, margin_rule, latency_report
    if distributed.is_main() and plan is None:
        planner = make_compressor(model, splits, settings, mode, table=table, progress=progress)
        plan, latency_report = planner.make_plan(), planner.latency_report
    shared = distributed.broadcast_object(plan.to_dict() if distributed.is_main() else None)
    return CompressionPlan.from_dict(shared), margin_rule, latency_report


def _latencies(model: nn.Module, compressed: Sequence[nn.Module], splits: DataSplits,
               settings: RunSettings) -> list[dict[str, float]]:
    """Row latencies (``report.latency_fields``) of ``model`` and every ``compressed`` model, all timed in one
    side-by-side timing per batch size (1 and 64), in ``settings.latency_backend``: the uncompressed row's first,
    then one per compressed model.
    Every row's "before" is the same number, so each printed ms divides into its printed speed-up."""
    size, device = (splits.in_channels, splits.image_size, splits.image_size), model_device(model)
    models = [model, *compressed]
    batch1 = measure_latency_side_by_side(models, torch.zeros(1, *size, device=device), num_threads=settings.threads,
                                          backend=settings.latency_backend)
    batch64 = measure_latency_side_by_side(models, torch.zeros(64, *size, device=device), num_threads=settings.threads,
                                           warmup=2, repeats=7, backend=settings.latency_backend)
    return [report.latency_fields(batch1[0], after, batch64[0], after64) for after, after64 in zip(batch1, batch64)]


def uncompressed_row(model: nn.Module, splits: DataSplits, settings: RunSettings,
                     latencies: dict[str, float] | None = None) -> dict[str, Any]:
    """The reference row: the model as trained.

    ``latencies``: a row timed with ``model`` (e.g. ``compress_and_measure``'s), whose ``latency_ms_before``
    times become this row's, so the two rows come from one timing; ``None``: ``model`` is timed alone.
    """
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    dummy_input = dummy_batch(splits, model_device(model))
    timing = latencies if latencies is not None else _latencies(model, [], splits, settings)[0]
    before, before64 = timing['latency_ms_before'], timing['latency_ms_before_b64']
    return report.uncompressed_row(settings.model, model, dummy_input, accuracy=evaluate_accuracy(model, test_loader),
                                   latencies=report.latency_fields(before, before, before64, before64))


def compare_methods(model: nn.Module, splits: DataSplits, settings: RunSettings, out_dir: Path,
                    progress: bool = True) -> tuple[list[dict[str, Any]], SensitivityTable]:
    """Baseline, one scan, every method at the same budget; saves plan.json and the compressed model of
    the last method (NaHC by default).

    After every method is compressed, the original and all compressed models are timed together, side by
    side (batch 1 and 64), and every row's times and speed-ups come from that one timing. Under ``torchrun`` only
    rank 0 scans, times and writes; the other ranks return their rows untimed and no table.
    """
    model = train_or_load_baseline(model, splits, settings, out_dir, progress)
    table = scan(model, splits, settings, out_dir, progress) if distributed.is_main() else None
    rows, compressed_models = [], []
    for mode in settings.methods:
        row, compressed, plan = compress_and_measure(model, splits, settings, mode, table, progress, out_dir,
                                                     timed=False)
        rows.append(row)
        compressed_models.append(compressed)
        _logger.info('%s: FLOPs kept %.3f, accuracy %.4f -> %.4f', mode, report.flops_kept(row),
                     row['acc_zero_shot'], row['acc_after'])
        if mode == settings.methods[-1] and distributed.is_main():
            plan.to_json(out_dir / 'plan.json')
            save_compressed(compressed, out_dir / f'compressed_{mode}.pt', plan)
    if not distributed.is_main():
        return rows, table
    reference, *timings = _latencies(model, compressed_models, splits, settings)
    for row, timing in zip(rows, timings):
        row.update(timing)
    _pair_with_prune_only(rows, compressed_models, splits, settings)
    return [uncompressed_row(model, splits, settings, latencies=reference), *rows], table


def _pair_with_prune_only(rows: list[dict[str, Any]], compressed_models: Sequence[nn.Module], splits: DataSplits,
                          settings: RunSettings) -> None:
    """Give every row but prune-only's ``paired_vs_prune``: its fine-tuned accuracy minus prune-only's on the same
    test images, in percentage points, with a 95 % interval (``report.paired_difference``); nothing without prune."""
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    correct = {row['mode']: correct_per_image(compressed, test_loader)
               for row, compressed in zip(rows, compressed_models)}
    if 'prune' not in correct:
        return
    for row in rows:
        if row['mode'] != 'prune':
            row['paired_vs_prune'] = report.paired_difference(correct[row['mode']], correct['prune'])


def sgd_finetune(model: nn.Module, splits: DataSplits, settings: RunSettings, max_steps: int | None = None,
                 on_epoch_end: Callable[[nn.Module, int], None] | None = None) -> float:
    """Fine-tune ``model`` in place for ``settings.finetune_epochs`` epochs (or ``max_steps`` steps) through an NNI
    ``TorchEvaluator`` (``make_torch_evaluator``: SGD at ``settings.finetune_lr``, momentum 0.9, weight decay
    5e-4, ``settings.finetune_schedule``; a ``max_steps`` probe at the constant rate) and ``nni_api.finetune``,
    the path of every compressed model; batch order seeded by ``settings.seed``. ``on_epoch_end(model, epoch)``
    runs after each epoch: at the constant rate the state after epoch k is the state a k-epoch fine-tune ends in
    (a cosine run anneals over all its epochs, so only its last epoch is). Leaves the model in eval mode;
    returns the seconds it took."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    train_loader, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    schedule = settings.finetune_schedule if max_steps is None else 'constant'  # a probe runs at the plain rate
    evaluator = make_torch_evaluator(train_loader, test_loader, model, lr=settings.finetune_lr, progress=False,
                                     schedule=schedule, epochs=max(1, settings.finetune_epochs),
                                     on_epoch_end=on_epoch_end, memory_budget=settings.memory_budget)
    finetune(model, evaluator, original=model, max_steps=max_steps,
             max_epochs=None if max_steps is not None else settings.finetune_epochs)
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


def choose_margin(model: nn.Module, splits: DataSplits, settings: RunSettings, table: SensitivityTable, *,
                  candidates: Sequence[float] = MARGIN_CANDIDATES, decompose_weights: Sequence[float] = (1.0,),
                  probe_steps: int = 0, held_out: int = 256,
                  cache_path: str | os.PathLike | None = None) -> tuple[float, CompressionPlan, list[dict[str, Any]]]:
    """HMC's margin rule on a run's data: the ``tau`` (and exchange rate) whose compressed model stays closest to
    the original (``planning.margin.choose_margin_by`` with this run's candidate plans and probes).

    For each ``tau`` of ``candidates`` and each weight of ``decompose_weights``, the ``hmc`` plan at the
    settings' budget is built from ``table`` and applied (torch-pruning path); with ``probe_steps > 0`` it is
    fine-tuned that many steps (``sgd_finetune``) on the train split without ``held_out`` training images,
    then scored by the per-image KL of its outputs from the original's on those images (the next ones of the
    calibration batch's seeded permutation; the test split is never used). Zero-shot (``probe_steps=0``) the
    lowest KL wins; with probes, the one-standard-error rule (``one_standard_error_choice``) picks the
    simplest of the candidates that recover alike. A weight of ``inf`` never decomposes, so ``(inf, inf)`` is
    prune-only's plan. A candidate whose grouping cannot reach the budget gets an ``'error'`` trial.
    ``cache_path`` keeps each probe as it is measured (``planning.margin.ProbeStore``), so a rerun probes only
    what it lacks.

    Returns ``(tau, plan, trials)``; ``plan.decompose_weight`` is the chosen weight and ``trials`` holds one
    ``{'margin', 'decompose_weight', 'kl', 'kl_se', 'flops_kept', 'params_kept', 'decomposed', 'groups',
    'probe_steps'}`` per candidate (``kl_se``: standard error of its per-image KL minus the lowest-KL
    candidate's), with ``'latency_budget'`` (the ``plan_for_latency`` report) under a latency budget.
    """
    if isinstance(probe_steps, bool) or not isinstance(probe_steps, int) or probe_steps < 0:
        raise HMCConfigError(f'Got probe_steps={probe_steps!r} but expected an int >= 0 (0 measures zero-shot)')
    device = model_device(model)
    dummy_input = dummy_batch(splits, device)
    images, _ = calibration_batch(splits, settings.calibration_size + held_out, seed=settings.seed)
    held_out_images = images[settings.calibration_size:].to(device)
    if len(held_out_images) == 0:
        raise ValueError(f'choose_margin: the train split has no images beyond the {settings.calibration_size} '
                         f'calibration images to hold out')
    probe_splits = without_train_images(splits, train_permutation(splits, settings.seed)[
        settings.calibration_size:settings.calibration_size + held_out]) if probe_steps else None
    groups = find_pruning_groups(model, dummy_input)
    budget = settings.hmc.budget_entry
    reference = output_log_probs(model, [held_out_images])
    probes = ProbeStore(cache_path, {'model': model_fingerprint(model), 'data': settings.data, 'seed': settings.seed,
                                     'calibration_size': settings.calibration_size, 'held_out': held_out,
                                     'probe_steps': probe_steps, 'finetune_lr': settings.finetune_lr,
                                     'batch_size': settings.batch_size,
                                     'data_fit': {key: getattr(settings, key) for key in DATA_FIT_KEYS}})

    data = DataFit.from_settings(to_device(calibration_batches(splits, settings), device), settings.hmc)

    def plan_candidate(margin: float, weight: float):
        common = dict(mode='hmc', margin=margin, decompose_weight=weight, importance=settings.importance,
                      rank_method=settings.rank_method, prune_spread=settings.prune_spread, **budget)
        if settings.target_latency is not None:
            return plan_for_latency(table, model, dummy_input, groups, batch=settings.latency_batch,
                                    threads=settings.threads, latency_cache=settings.latency_cache,
                                    backend=settings.latency_backend, at_least_prune_only=False, **common)  # the probes compare the recovered models
        return plan_for_target(table, model, dummy_input, groups, **common)[0], None

    def score(plan: CompressionPlan) -> torch.Tensor:
        compressed = apply_plan(copy.deepcopy(model), plan, dummy_input, speedup='torch_pruning', data=data)
        if probe_steps:
            sgd_finetune(compressed, probe_splits, settings, max_steps=probe_steps)
        return per_input_kl(reference, compressed, [held_out_images])

    return choose_margin_by(plan_candidate, score, candidates=candidates, decompose_weights=decompose_weights,
                            probes=probes, free='params_kept' if 'target_flops' in budget else 'flops_kept',
                            probe_steps=probe_steps)
