"""Latency budget benchmark (issue #7): does ``target_latency`` land on the measured CPU time, and what does
HMC buy over prune-only at the same time?

1. Landing. On torchvision ResNet-50 (random weights, 224x224, timed at batch 16; proxy scan on the 64
   generated calibration images of ``scan_cost.py``) and CIFAR ResNet-56 trained on digits (seed 0, timed
   at batch 64), HMC and prune-only are planned with ``target_latency`` and, for comparison, with
   ``target_flops`` at the same fraction (``hmc_plugin.planning.targets.plan_for_latency`` / ``plan_for_target``).
   Each compressed model is then timed again, side by side with the original, with more repeats than
   the planner used: the latency kept, whether it is within +-10 % of the target, the planner's
   prediction and its error, the FLOPs kept, the real speed-up, the FLOPs reduction and their ratio, and
   how many layer timings the plan had to measure (the rest came from the latency cache: a second run
   measures nothing new). HMC's margin tau and exchange rate (``decompose_weight``) come from
   ``hmc_plugin.app.workflow.choose_margin`` on digits: tau in 0, 0.5, inf times weight in 1, 10, inf (inf never
   decomposes: tau inf with weight inf is prune-only's plan), each candidate fine-tuned for ``--probe-steps``
   steps (60, 3 epochs: past the chaotic first steps of recovery) on the train split without 256 held-out
   images and scored by its KL from the original there (one-standard-error rule: among the tied, the fewest
   decomposed layers, then prune-only's plan, then the most FLOPs kept; most parameters under a FLOPs budget).
   The planner's whole-model timings are cached by compressed architecture, so HMC's tau inf, weight inf
   candidate is the same plan as prune-only's.
   ResNet-50 has no held-out training images for that
   rule, so it gets NaHC (tau 0.5, weight 1).
2. Accuracy at equal latency. ResNet-56 (``--resnet20``: ResNet-20 too) on digits, seeds 0, 1, 2 (one
   baseline, scan and fine-tuning order per seed, as ``quality.py``): HMC and prune-only at
   ``target_latency``, accuracy zero-shot, after the quality suite's fine-tuning budget (1 epoch) and after
   ``--long-finetune-epochs`` epochs in all (the same model fine-tuned on).

Baselines and scans (``WORK/MODEL/seedN``, the quality suite's layout: its folders can be copied in),
the ResNet-50 scan (``WORK/resnet50``), the accuracy cells and the latency cache (``WORK/latency.json``)
are cached under ``--work``. The landing plans are made anew on every run. Writes ``latency_budget.json``
and ``latency_budget.md`` (rendered from the JSON) into ``--out``.

    .venv/bin/python recipes/benchmarks/latency_budget.py --out recipes/benchmarks/results --work runs/latency_budget
    .venv/bin/python recipes/benchmarks/latency_budget.py --out /tmp/latency_budget --quick --threads 1   # harness check, under a minute
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (recipes/benchmarks is not a package)
import scan_cost  # noqa: E402

from hmc_plugin.app.data import DataSplits, make_loaders  # noqa: E402
from hmc_plugin.app.report import flops_kept, markdown_table, size_fields  # noqa: E402
from hmc_plugin.app.training import evaluate_accuracy  # noqa: E402
from hmc_plugin.app.workflow import AUTO_DECOMPOSE_WEIGHTS, AUTO_MARGINS, RunSettings, choose_margin  # noqa: E402
from hmc_plugin.apply import apply_plan
from hmc_plugin.engines.pruning import PruningGroup, find_pruning_groups  # noqa: E402
from hmc_plugin.errors import HMCConfigError  # noqa: E402
from hmc_plugin.planning.latency import LatencyCache, batched_input  # noqa: E402
from hmc_plugin.planning.plan import CompressionPlan  # noqa: E402
from hmc_plugin.planning.targets import plan_for_latency, plan_for_target  # noqa: E402
from hmc_plugin.sensitivity.table import SensitivityTable
from hmc_plugin.utils.fingerprint import model_fingerprint  # noqa: E402
from hmc_plugin.utils.jsonio import encode_float  # noqa: E402
from hmc_plugin.utils.timing import measure_latency_side_by_side  # noqa: E402

METHODS = ('hmc', 'prune')
BUDGETS = ('latency', 'flops')
QUICK_LEVELS = (0.4, 0.8)
TOLERANCE = 0.10  # "lands": the re-measured latency kept is within 10 % of the target


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/bench/latency_budget')
    parser.add_argument('--work', help='cache folder: baselines, scans, accuracy cells, latency.json (default OUT/work)')
    parser.add_argument('--quick', action='store_true',
                        help='ResNet-20 on digits only, 1 training epoch, levels 0.4/0.8, one seed, batch 8, no '
                             'ResNet-50, 2 fine-tuning steps: checks the harness, not the numbers')
    parser.add_argument('--skip-resnet50', action='store_true', help='no ResNet-50 landing rows')
    parser.add_argument('--resnet20', action='store_true', help='accuracy at equal latency on ResNet-20 as well')
    parser.add_argument('--target', type=float, default=None,
                        help='fraction of the latency (and FLOPs) to keep (default 0.5; 0.75 with --quick, whose '
                             'tiny model is overhead-bound and cannot always reach half its time)')
    parser.add_argument('--seeds', default='0,1,2', help='seeds of the accuracy comparison')
    parser.add_argument('--threads', type=int, default=2, help='torch threads, for the latency budgets too')
    parser.add_argument('--batch', type=int, default=64, help='latency batch of the digits models')
    parser.add_argument('--resnet50-batch', type=int, default=16, help='latency batch of ResNet-50')
    parser.add_argument('--train-epochs', type=int, default=common.TRAIN_EPOCHS)
    parser.add_argument('--warmup', type=int, default=3, help='warm-up runs of the final side-by-side timing')
    parser.add_argument('--repeats', type=int, default=15, help='timed runs (median) of the final side-by-side timing')
    parser.add_argument('--probe-steps', type=int, default=60,
                        help="fine-tuning steps of each of HMC's margin-rule candidates (0: zero-shot rule)")
    parser.add_argument('--decompose-weights', default=','.join(format(w, 'g') for w in AUTO_DECOMPOSE_WEIGHTS),
                        help="HMC's candidate exchange rates (inf: never decompose; with tau inf, prune-only's plan)")
    parser.add_argument('--long-finetune-epochs', type=int, default=5,
                        help='fine-tuning epochs in all of the second accuracy figure')
    parser.add_argument('--quiet', action='store_true')
    args = parser.parse_args(argv)
    args.margins = AUTO_MARGINS
    args.landing_model, args.accuracy_models = 'resnet56', ['resnet56'] + (['resnet20'] if args.resnet20 else [])
    args.levels = common.LEVELS
    if args.quick:
        args.landing_model, args.accuracy_models, args.seeds, args.train_epochs = 'resnet20', ['resnet20'], '0', 1
        args.levels, args.batch, args.skip_resnet50, args.warmup, args.repeats = QUICK_LEVELS, 8, True, 1, 5
        args.margins, args.probe_steps, args.decompose_weights = (0.5, math.inf), 2, '1,inf'
    if args.target is None:
        args.target = 0.75 if args.quick else 0.5
    args.seeds = [int(seed) for seed in args.seeds.split(',')]
    args.decompose_weights = [float(weight) for weight in args.decompose_weights.split(',')]
    return args


# --------------------------------------------------------------------------------------------- subjects

@dataclass
class Subject:
    """A model to compress with what its plans need; ``splits`` and ``settings`` only for the digits models."""

    name: str
    model: nn.Module
    dummy_input: torch.Tensor
    groups: list[PruningGroup]
    table: SensitivityTable
    batch: int
    splits: DataSplits | None = None
    settings: RunSettings | None = None


def digits_subject(model_name: str, seed: int, args: argparse.Namespace, work: Path,
                   progress: common.Progress) -> Subject:
    """A digits model's cached baseline and scan (``WORK/MODEL/seedN``), trained and scanned if missing."""
    settings = common.replace(common.settings_for(model_name, seed, train_epochs=args.train_epochs, threads=args.threads),
                              levels=tuple(args.levels), latency_batch=args.batch,
                              latency_cache=str(work / 'latency.json'))
    model, splits, table = common.prepare(settings, work / model_name / f'seed{seed}', progress)
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    return Subject(model_name, model, dummy_input, find_pruning_groups(model, dummy_input), table, args.batch,
                   splits, settings)


def resnet50_subject(args: argparse.Namespace, work: Path, progress: common.Progress) -> Subject:
    """torchvision ResNet-50 (random weights, seed 0) and its proxy scan on generated images, cached in WORK/resnet50."""
    model, images = scan_cost.resnet50_with_calibration(seed=0)
    dummy_input = torch.zeros(1, 3, 224, 224)
    progress('torchvision:resnet50: proxy sensitivity scan on 64 generated images (cached after the first run)')
    (work / 'resnet50').mkdir(parents=True, exist_ok=True)
    table, _ = scan_cost.scan_model(model, dummy_input, 'proxy', calibration_inputs=images, levels=args.levels,
                                    progress=False, cache_path=work / 'resnet50' / 'sensitivity.json')
    return Subject('torchvision:resnet50', model, dummy_input, find_pruning_groups(model, dummy_input), table,
                   args.resnet50_batch)


# --------------------------------------------------------------------------------------------- planning

def make_plan(subject: Subject, method: str, budget: str, target: float, args: argparse.Namespace,
              cache_path: Path) -> tuple[CompressionPlan, dict[str, Any]]:
    """The plan of ``method`` ('hmc' or 'prune') at ``target`` of the ``budget`` ('latency' or 'flops').

    HMC's margin and decompose_weight come from ``choose_margin`` (with probe fine-tunes) where there is
    data to hold out (digits); otherwise the plan is NaHC's. Returns the plan and ``{'mode', 'margin',
    'decompose_weight', 'margin_trials'?, 'planner'?}``.
    """
    if method == 'hmc' and subject.settings is not None:
        settings = common.replace(subject.settings, target_latency=target if budget == 'latency' else None,
                                  target_flops=target if budget == 'flops' else None, target_params=None)
        margin, plan, trials = choose_margin(subject.model, subject.splits, settings, subject.table,
                                             candidates=args.margins, decompose_weights=args.decompose_weights,
                                             probe_steps=args.probe_steps)
        return plan, {'mode': 'hmc', 'margin': encode_float(margin),
                      'decompose_weight': encode_float(plan.decompose_weight), 'decomposed': len(plan.ranks),
                      'margin_rule': 'choose_margin',
                      'margin_trials': [{**trial, 'margin': encode_float(trial['margin']),
                                         'decompose_weight': encode_float(trial['decompose_weight'])}
                                        for trial in trials]}
    mode = 'nahc' if method == 'hmc' else 'prune'
    info: dict[str, Any] = {'mode': mode, 'margin': 0.5 if mode == 'nahc' else None, 'decompose_weight': 1.0,
                            'margin_rule': 'NaHC default (no held-out images)' if mode == 'nahc' else None}
    if budget == 'latency':
        plan, report = plan_for_latency(subject.table, subject.model, subject.dummy_input, subject.groups,
                                        target_latency=target, batch=subject.batch, threads=args.threads,
                                        latency_cache=cache_path, mode=mode, importance='l1')
        info['planner'] = report
    else:
        plan, _ = plan_for_target(subject.table, subject.model, subject.dummy_input, subject.groups,
                                  target_flops=target, mode=mode, importance='l1')
    return plan, info


def cache_size(path: Path) -> int:
    """Number of timings in the latency cache file."""
    return len(LatencyCache(path))


def timed_ratio(subject: Subject, compressed: nn.Module, threads: int, args: argparse.Namespace) -> dict[str, float]:
    """The original and the compressed model timed side by side at the subject's batch (fresh, not cached)."""
    before, after = measure_latency_side_by_side([subject.model, compressed], batched_input(subject.dummy_input, subject.batch),
                                                 warmup=args.warmup, repeats=args.repeats, num_threads=threads)
    return {'original_ms': before, 'compressed_ms': after, 'latency_kept': after / before, 'speedup': before / after}


def landing_row(subject: Subject, method: str, budget: str, args: argparse.Namespace, cache_path: Path,
                plans: dict) -> dict[str, Any]:
    """Plan, compress, re-time: one row of the landing table (``'error'`` when the budget is out of reach)."""
    row: dict[str, Any] = {'model': subject.name, 'budget': budget, 'target': args.target, 'method': method,
                           'batch': subject.batch, 'threads': args.threads}
    cached_before = cache_size(cache_path)
    started = time.perf_counter()
    try:
        plan, info = make_plan(subject, method, budget, args.target, args, cache_path)
    except HMCConfigError as error:
        return {**row, 'error': str(error), 'new_measurements': cache_size(cache_path) - cached_before}
    row['plan_seconds'] = time.perf_counter() - started
    row['new_measurements'] = cache_size(cache_path) - cached_before
    plans[(subject.name, subject.settings.seed if subject.settings else None, method, budget)] = (plan, info)
    compressed = apply_plan(copy.deepcopy(subject.model), plan, subject.dummy_input, speedup='torch_pruning').eval()
    row.update(timed_ratio(subject, compressed, args.threads, args))
    row['flops_kept'] = flops_kept(size_fields(subject.model, compressed, subject.dummy_input))
    row['flops_reduction'] = 1.0 / row['flops_kept']
    row['speedup_per_flops_reduction'] = row['speedup'] / row['flops_reduction']
    row['groups'] = plan.group_counts()
    row.update({key: value for key, value in info.items() if key != 'planner'})
    if 'planner' in info:
        row['planner'] = info['planner']  # plan_for_latency's own report (its shorter in-loop timing)
    if budget == 'latency':
        row['within_tolerance'] = abs(row['latency_kept'] - args.target) <= TOLERANCE * args.target
        row['predicted'] = plan.predicted.get('latency')
        row['measured_while_planning'] = plan.measured.get('latency')
        row['prediction_error'] = row['predicted'] / row['latency_kept'] - 1.0
    return row


# --------------------------------------------------------------------------------------------- accuracy

def accuracy_cell(subject: Subject, method: str, args: argparse.Namespace, cache_path: Path,
                  plans: dict) -> dict[str, Any]:
    """HMC or prune-only at ``target_latency`` on one seed: accuracy zero-shot and after the common fine-tuning."""
    settings = subject.settings
    cell: dict[str, Any] = {'model': subject.name, 'seed': settings.seed, 'method': method, 'target': args.target}
    key = (subject.name, settings.seed, method, 'latency')
    try:
        plan, info = plans[key] if key in plans else make_plan(subject, method, 'latency', args.target, args, cache_path)
    except HMCConfigError as error:
        return {**cell, 'error': str(error)}
    compressed = apply_plan(copy.deepcopy(subject.model), plan, subject.dummy_input, speedup='torch_pruning').eval()
    _, test_loader = make_loaders(subject.splits, settings.batch_size, seed=settings.seed)
    cell.update(timed_ratio(subject, compressed, args.threads, args))
    cell['flops_kept'] = flops_kept(size_fields(subject.model, compressed, subject.dummy_input))
    cell['margin'] = info.get('margin')
    cell['decompose_weight'] = info.get('decompose_weight')
    cell['decomposed'] = len(plan.ranks)
    if 'margin_trials' in info:
        cell['margin_trials'] = info['margin_trials']
    cell['groups'] = plan.group_counts()
    cell['acc_zero_shot'] = evaluate_accuracy(compressed, test_loader)
    cell['seconds_finetune'] = common.finetune(compressed, subject.splits, settings, max_steps=2 if args.quick else None)
    cell['acc_finetuned'] = evaluate_accuracy(compressed, test_loader)
    more = common.replace(settings, finetune_epochs=args.long_finetune_epochs - settings.finetune_epochs)
    cell['seconds_finetune'] += common.finetune(compressed, subject.splits, more, max_steps=2 if args.quick else None)
    cell['acc_finetuned_long'] = evaluate_accuracy(compressed, test_loader)
    return cell


def summarise(cells: list[dict], baselines: list[dict]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (model, method), and whether HMC is at least as accurate as prune-only."""
    summary = []
    for model in dict.fromkeys(cell['model'] for cell in cells):
        accuracies = [baseline['acc'] for baseline in baselines if baseline['model'] == model]
        accuracy = common.mean_std(accuracies)
        summary.append({'model': model, 'method': 'uncompressed', 'seeds': len(accuracies), 'acc_zero_shot': accuracy,
                        'acc_finetuned': accuracy, 'latency_kept': (1.0, 0.0), 'flops_kept': (1.0, 0.0)})
        for method in METHODS:
            group = [cell for cell in cells if (cell['model'], cell['method']) == (model, method)]
            reached = [cell for cell in group if 'error' not in cell]
            row: dict[str, Any] = {'model': model, 'method': method, 'seeds': len(group), 'reached': len(reached),
                                   'errors': [cell['error'] for cell in group if 'error' in cell]}
            if reached:
                for metric in ('acc_zero_shot', 'acc_finetuned', 'acc_finetuned_long', 'latency_kept', 'flops_kept'):
                    row[metric] = common.mean_std([cell[metric] for cell in reached])
                row['margins'] = [cell['margin'] for cell in reached]
                row['decompose_weights'] = [cell['decompose_weight'] for cell in reached]
            summary.append(row)
        hmc, prune = (next(row for row in summary if (row['model'], row['method']) == (model, m)) for m in METHODS)
        if 'acc_finetuned' in hmc and 'acc_finetuned' in prune:
            phases = ('acc_zero_shot', 'acc_finetuned', 'acc_finetuned_long')
            hmc['vs_prune'] = {phase: hmc[phase][0] - prune[phase][0] for phase in phases}
            hmc['at_least_as_accurate'] = {phase: hmc['vs_prune'][phase] >= 0 for phase in phases[1:]}
    return summary


# --------------------------------------------------------------------------------------------- running

def land(subject: Subject, args: argparse.Namespace, cache_path: Path, plans: dict,
         progress: common.Progress) -> list[dict[str, Any]]:
    """The landing rows of one model: each budget, each method."""
    rows = []
    for budget in BUDGETS:
        for method in METHODS:
            row = landing_row(subject, method, budget, args, cache_path, plans)
            rows.append(row)
            label = f'{subject.name} target_{budget}={args.target:g} {method}'
            if 'error' in row:
                progress(f'{label}: cannot reach the budget: {row["error"]}')
                continue
            progress(f'{label}: latency kept {row["latency_kept"]:.3f}'
                     + (f' (predicted {row["predicted"]:.3f})' if budget == 'latency' else '')
                     + f', FLOPs kept {row["flops_kept"]:.3f}, speed-up {row["speedup"]:.2f}x, '
                     f'{row["new_measurements"]} new latency measurements'
                     + (f', tau {row["margin"]}' if row.get('margin') is not None else ''))
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = common.Progress(args.quiet)
    common.configure(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / 'work'
    cache_path = work / 'latency.json'
    plans: dict = {}  # (model, seed, method, budget) -> (plan, info): the accuracy part reuses the landing plans
    landing = land(digits_subject(args.landing_model, args.seeds[0], args, work, progress), args, cache_path, plans,
                   progress)
    cells, baselines = [], []
    for model_name in args.accuracy_models:
        for seed in args.seeds:
            subject = digits_subject(model_name, seed, args, work, progress)
            _, test_loader = make_loaders(subject.splits, subject.settings.batch_size, seed=seed)
            baselines.append({'model': model_name, 'seed': seed, 'acc': evaluate_accuracy(subject.model, test_loader)})
            for method in METHODS:
                path = work / model_name / f'seed{seed}' / 'latency_cells' / f'{args.target:g}_{method}.json'
                key = {'settings': common.settings_dict(subject.settings), 'quick': args.quick, 'target': args.target,
                       'baseline': model_fingerprint(subject.model), 'scan': common.table_fingerprint(subject.table),
                       'repeats': args.repeats, 'margins': [encode_float(m) for m in args.margins],
                       'decompose_weights': [encode_float(w) for w in args.decompose_weights],
                       'probe_steps': args.probe_steps, 'long_finetune_epochs': args.long_finetune_epochs,
                       'margin_rule': 'probe KL, one standard error, fewest decomposed, prune-only, most FLOPs',
                       'planner_timings_cached': True,
                       'planner_tolerance': 0.015, 'planner_confirms': True,
                       'steady_allocator': True}
                cell = common.cached_cell(path, key, lambda: accuracy_cell(subject, method, args, cache_path, plans))
                cells.append(cell)
                label = f'{model_name} seed {seed} target_latency={args.target:g} {method}'
                if 'error' in cell:
                    progress(f'{label}: cannot reach the budget: {cell["error"]}')
                else:
                    progress(f'{label}: latency kept {cell["latency_kept"]:.3f}, acc {cell["acc_zero_shot"]:.3f} -> '
                             f'{cell["acc_finetuned"]:.3f} -> {cell["acc_finetuned_long"]:.3f}'
                             + (f', tau {cell["margin"]}, decompose_weight {cell["decompose_weight"]}'
                                if method == 'hmc' else ''))
    if not args.skip_resnet50:  # last: the longest part
        landing = land(resnet50_subject(args, work, progress), args, cache_path, plans, progress) + landing
    settings_out = {'target': args.target, 'tolerance': TOLERANCE, 'threads': args.threads, 'levels': list(args.levels),
                    'landing_model': args.landing_model, 'resnet50': not args.skip_resnet50,
                    'digits_batch': args.batch, 'resnet50_batch': args.resnet50_batch,
                    'accuracy_models': args.accuracy_models, 'seeds': args.seeds, 'train_epochs': args.train_epochs,
                    'train_lr': common.TRAIN_LR, 'finetune_epochs': None if args.quick else common.FINETUNE_EPOCHS,
                    'finetune_steps': 2 if args.quick else None, 'finetune_lr': common.FINETUNE_LR,
                    'long_finetune_epochs': None if args.quick else args.long_finetune_epochs,
                    'margins': [encode_float(m) for m in args.margins],
                    'decompose_weights': [encode_float(w) for w in args.decompose_weights],
                    'probe_steps': args.probe_steps,
                    'warmup': args.warmup, 'repeats': args.repeats, 'sensitivity': 'proxy', 'quick': args.quick}
    return {**common.header('latency_budget', settings_out), 'wall_seconds': progress.elapsed,
            'latency_cache_entries': cache_size(cache_path), 'landing': landing, 'baselines': baselines,
            'cells': cells, 'summary': summarise(cells, baselines)}


# --------------------------------------------------------------------------------------------- rendering

def _method_label(row: dict) -> str:
    if row['method'] == 'prune':
        return common.METHOD_LABELS['prune']
    if row.get('mode') == 'nahc':
        return 'NaHC (τ 0.5; no held-out data for choose_margin)'
    margin, weight = row.get('margin'), row.get('decompose_weight')
    return 'HMC' + ('' if margin is None else f' (τ {_inf_or_g(margin)}, w {_inf_or_g(weight)})')


def _inf_or_g(value) -> str:
    """A margin or decompose_weight as the tables print it (``'inf'`` in the JSON)."""
    return '∞' if value in ('inf', math.inf) else format(value, 'g')


def _pm(value: tuple[float, float] | list[float]) -> str:
    return f'{value[0]:.3f} ± {value[1]:.3f}'


def landing_table(report: dict) -> str:
    header = ['model', 'budget', 'method', 'latency kept', 'within ±10 %', 'predicted', 'prediction error',
              'FLOPs kept', 'speed-up', 'FLOPs reduction', 'speed-up / FLOPs reduction', 'new latency measurements']
    rows = []
    for row in report['landing']:
        head = [common.MODEL_LABELS.get(row['model'], row['model']), f'{row["budget"]} {row["target"]:g}',
                _method_label(row)]
        if 'error' in row:
            rows.append(head + [f'cannot reach: {row["error"]}'] + [''] * (len(header) - 5) + [str(row['new_measurements'])])
            continue
        latency = row['budget'] == 'latency'
        rows.append(head + [
            f'{row["latency_kept"]:.3f}', ('yes' if row['within_tolerance'] else '**no**') if latency else '—',
            f'{row["predicted"]:.3f}' if latency else '—', f'{100 * row["prediction_error"]:+.1f} %' if latency else '—',
            f'{row["flops_kept"]:.3f}', f'{row["speedup"]:.2f}x', f'{row["flops_reduction"]:.2f}x',
            f'{row["speedup_per_flops_reduction"]:.2f}', str(row['new_measurements'])])
    return markdown_table(header, rows)


def accuracy_table(report: dict) -> str:
    epochs = report['settings']['long_finetune_epochs']
    long = f'{epochs} epochs' if epochs else 'twice the steps'
    header = ['model', 'method', 'seeds', 'latency kept', 'FLOPs kept', 'acc zero-shot',
              f'acc fine-tuned ({common.finetune_budget(report["settings"])})', f'acc fine-tuned ({long})',
              'HMC minus prune-only (fine-tuned, both budgets)']
    rows = []
    for row in report['summary']:
        model = common.MODEL_LABELS.get(row['model'], row['model'])
        if row['method'] == 'uncompressed':
            rows.append([model, 'uncompressed', str(row['seeds']), '1', '1', _pm(row['acc_zero_shot']),
                         _pm(row['acc_finetuned']), _pm(row['acc_finetuned']), ''])
            continue
        label = common.METHOD_LABELS[row['method']]
        if row['method'] == 'hmc' and row.get('margins'):
            label += (' (τ ' + '/'.join(map(_inf_or_g, row['margins'])) + ', w '
                      + '/'.join(map(_inf_or_g, row['decompose_weights'])) + ')')
        if 'acc_finetuned' not in row:
            rows.append([model, label, str(row['seeds']), f'cannot reach: {row["errors"][0]}'] + [''] * 5)
            continue
        if row['reached'] < row['seeds']:
            label += f' ({row["reached"]} of {row["seeds"]} seeds reach the budget)'
        verdict = ''
        if 'vs_prune' in row:
            verdict = ' / '.join(f'{100 * row["vs_prune"][phase]:+.1f} pp'
                                 + ('' if row['at_least_as_accurate'][phase] else ' (**worse**)')
                                 for phase in ('acc_finetuned', 'acc_finetuned_long'))
        rows.append([model, label, str(row['seeds']), _pm(row['latency_kept']), _pm(row['flops_kept']),
                     _pm(row['acc_zero_shot']), _pm(row['acc_finetuned']), _pm(row['acc_finetuned_long']), verdict])
    return markdown_table(header, rows)


def render_markdown(report: dict) -> str:
    """``latency_budget.md``: a pure function of ``latency_budget.json``."""
    settings = report['settings']
    budget = common.finetune_budget(settings)
    landing = [row for row in report['landing'] if 'error' not in row]
    new = sum(row['new_measurements'] for row in report['landing'])
    models = ', '.join(common.MODEL_LABELS.get(m, m) for m in dict.fromkeys(row['model'] for row in report['landing']))
    return '\n'.join([
        f'# Latency budgets ({"quick" if settings["quick"] else "full"})', '',
        f'Created {report["created"]} on {report["machine"]}, {settings["threads"]} thread(s); '
        f'{report["wall_seconds"] / 60:.1f} min.', '',
        f'## Landing on target_latency={settings["target"]:g} ({models})', '',
        f'Each plan is applied (torch-pruning) and the compressed model timed again side by side with the original '
        f'(median of {settings["repeats"]} interleaved runs after {settings["warmup"]} warm-up run(s); batch '
        f'{settings["digits_batch"]} for the digits models, {settings["resnet50_batch"]} for ResNet-50; '
        f'{settings["threads"]} thread(s)). Latency kept = compressed / original time; within ±10 % = between '
        f'{(1 - settings["tolerance"]) * settings["target"]:.3f} and {(1 + settings["tolerance"]) * settings["target"]:.3f}; '
        f'predicted = the latency model\'s kept fraction, prediction error = predicted / latency kept − 1; speed-up = '
        f'original / compressed time; FLOPs reduction = 1 / FLOPs kept. New latency measurements = timings added to '
        f'the latency cache by the plan ({new} in this run, {report["latency_cache_entries"]} in the cache). The '
        f'"flops" rows are the same methods at target_flops={settings["target"]:g}. HMC\'s τ and decompose_weight '
        f'w are chosen by choose_margin on digits: τ in {", ".join(map(_inf_or_g, settings["margins"]))} times w in '
        f'{", ".join(map(_inf_or_g, settings["decompose_weights"]))} (w ∞ never decomposes; τ ∞ with w ∞ is '
        f'prune-only\'s plan), each candidate fine-tuned {settings["probe_steps"]} steps on the train split without '
        f'256 held-out training images and scored by its KL from the original on those images; of the candidates '
        f'within one standard error of the lowest KL, the one with the fewest decomposed layers, then prune-only\'s '
        f'plan, then the most FLOPs kept (parameters under a FLOPs budget) wins. The planner\'s whole-model timings are '
        f'cached by compressed architecture, so τ ∞ with w ∞ is the same plan as prune-only\'s.', '',
        landing_table(report), '',
        f'{sum(row.get("within_tolerance", False) for row in landing)} of '
        f'{sum(row["budget"] == "latency" for row in report["landing"])} latency rows land within ±10 %.', '',
        f'## Accuracy at equal latency (target_latency={settings["target"]:g}, digits)', '',
        f'Baselines trained {settings["train_epochs"]} epochs, one per seed ({", ".join(map(str, settings["seeds"]))}); '
        f'every method gets the quality suite\'s fine-tuning: {budget} of SGD at lr {settings["finetune_lr"]}, '
        f'then the same model is fine-tuned on to {settings["long_finetune_epochs"] or "twice the steps"} '
        f'{"epochs " if settings["long_finetune_epochs"] else ""}in all. '
        f'Mean ± sample std over the seeds; accuracy on the test split; latency kept at batch '
        f'{settings["digits_batch"]}. Last column: mean fine-tuned accuracy of HMC minus prune-only\'s, in '
        f'percentage points, after the short and the long fine-tuning.', '',
        accuracy_table(report), '',
        'Produced by:', '', '```bash', report['command'], '```', ''])


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    common.write_suite(Path(args.out), report, render_markdown(report), quiet=args.quiet)


if __name__ == '__main__':
    main()
