"""Powered benchmark (issue #18, item 4): HMC against the strongest pruners, paired over seeds.

For each (model, data set, seed) the baseline is trained once and scanned once (proxy sensitivity, the quality
suite's settings). Then, for each budget and method, the model is compressed, measured before fine-tuning
(test accuracy, KL(original || compressed) per test image in nats) and fine-tuned (SGD lr 0.01, momentum 0.9, the
same batch order for every method of a seed). ``--finetune-schedule constant`` (default): one run of
``max(--finetune-epochs)`` epochs, measured after each epoch of ``--finetune-epochs`` (the state after epoch k is
bit for bit the state a k-epoch fine-tune ends in, ``workflow.sgd_finetune``). ``cosine``: one run per epoch count,
each annealed to 0 over its own steps (a 1-epoch run is not the first epoch of a 5-epoch one); writes
``power_cosine.{json,md}``.

Methods (every one gets the same calibration data: its pruned consumers refitted and its BatchNorm statistics
re-estimated on the same training batches, HMC's defaults):

- ``hmc``: HMC's margin rule (``hmc compress --mode hmc --margin auto``: tau x exchange rate, each candidate probed
  ``--probe-steps`` steps, ``workflow.plan_by_margin_rule``);
- ``nahc``: HMC's grouping at its default margin 0.5;
- ``prune``: HMC's prune-only plan (L1 channel importance, allocation by the scan);
- ``tp_l2`` / ``tp_taylor``: torch-pruning's group importance (group-norm L2 / Taylor on labelled calibration
  batches) with torch-pruning's global allocation (``app.baselines.torch_pruning_prune``);
- ``nni_l1``: NNI's ``L1NormPruner`` at one ratio (``app.baselines.nni_l1_prune``).

Budgets (``--budgets``): ``flops:X``, ``params:X`` and ``latency:X`` (measured CPU time at batch
``--latency-batch``, one thread). The baseline pruners have no latency planner, so latency cells compare HMC with
prune-only (the measured latency of each compressed model is reported beside it).

Statistics: per (model, data, budget, epochs) cell, mean ± sample std over seeds of each method, and the paired
difference HMC − method per seed with its 95 % t interval (``scipy.stats.t``); the strongest pruner of a cell is
the pruning baseline with the highest mean fine-tuned accuracy. Every cell is cached under ``--out`` (a rerun
resumes; ``--jobs`` style splitting: run disjoint ``--budgets`` in two processes, then once more with all of them
to write the report from the cache).

    .venv/bin/python recipes/benchmarks/power.py --out runs/bench/power                 # full
    .venv/bin/python recipes/benchmarks/power.py --out /tmp/power --quick               # harness check
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (recipes/benchmarks is not a package)

from hmc_plugin.app.baselines import nni_l1_prune, torch_pruning_prune  # noqa: E402
from hmc_plugin.app.data import calibration_batch, make_loaders  # noqa: E402
from hmc_plugin.app.report import flops_kept, markdown_table, params_kept, size_fields  # noqa: E402
from hmc_plugin.app.training import evaluate_accuracy  # noqa: E402
from hmc_plugin.app.workflow import (calibration_batches, make_compressor, plan_by_margin_rule, scan,  # noqa: E402
                                     sgd_finetune)
from hmc_plugin.engines.batchnorm import recalibrate_bn  # noqa: E402
from hmc_plugin.engines.datafit import fit_to_data  # noqa: E402
from hmc_plugin.errors import HMCConfigError  # noqa: E402
from hmc_plugin.planning.latency import batched_input  # noqa: E402
from hmc_plugin.utils.fingerprint import model_fingerprint  # noqa: E402
from hmc_plugin.utils.kl import output_kl, output_log_probs  # noqa: E402
from hmc_plugin.utils.timing import measure_latency_side_by_side  # noqa: E402

METHODS = ('hmc', 'hmc_spread', 'nahc', 'prune', 'prune_spread', 'tp_l2', 'tp_taylor', 'nni_l1')
SUBJECTS = ('hmc', 'hmc_spread', 'nahc')
PRUNERS = ('prune', 'prune_spread', 'tp_l2', 'tp_taylor', 'nni_l1')  # the baselines the strongest is chosen from
SPREAD = 0.05
VARIANTS = {'hmc_spread': ('hmc', {'prune_spread': SPREAD}), 'prune_spread': ('prune', {'prune_spread': SPREAD})}
LABELS = {'hmc': 'HMC (margin rule)', 'hmc_spread': f'HMC, prune_spread {SPREAD}', 'nahc': 'NaHC',
          'prune': 'prune-only (HMC, L1)', 'prune_spread': f'prune-only (HMC, L1), prune_spread {SPREAD}',
          'tp_l2': 'torch-pruning group-L2, global', 'tp_taylor': 'torch-pruning group-Taylor, global',
          'nni_l1': 'NNI L1NormPruner'}
LATENCY_METHODS = ('hmc', 'hmc_spread', 'prune', 'prune_spread')  # the methods with a latency planner
BUDGET_NAMES = {'flops': 'target_flops', 'params': 'target_params', 'latency': 'target_latency'}
DEFAULT_BUDGETS = 'flops:0.5,flops:0.25,flops:0.125,params:0.3,latency:0.5'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/bench/power')
    parser.add_argument('--quick', action='store_true',
                        help='ResNet-20 on digits, seeds 0 and 1, flops:0.5, 1 training epoch, 1 fine-tuning epoch, '
                             '2 probe steps: checks the harness')
    parser.add_argument('--models', default='resnet20')
    parser.add_argument('--data', default='digits_hard', help="'digits_hard', 'digits' or both, comma-separated")
    parser.add_argument('--seeds', default='0,1,2,3,4')
    parser.add_argument('--budgets', default=DEFAULT_BUDGETS, help='KIND:FRACTION, KIND one of flops, params, latency')
    parser.add_argument('--methods', default=','.join(METHODS))
    parser.add_argument('--train-epochs', type=int, default=common.TRAIN_EPOCHS)
    parser.add_argument('--finetune-epochs', default='1,5', help='epochs after which the fine-tuned model is measured')
    parser.add_argument('--finetune-schedule', default='constant', choices=('constant', 'cosine'),
                        help="the fine-tuning rate over the epochs (the margin rule's probes always run at the "
                             'constant rate)')
    parser.add_argument('--probe-steps', type=int, default=60, help="fine-tuning steps of each margin-rule candidate")
    parser.add_argument('--latency-batch', type=int, default=64)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--cached-only', action='store_true',
                        help='report the cached cells only (a run cut short): missing cells are listed, not computed')
    parser.add_argument('--quiet', action='store_true')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.data, args.seeds, args.budgets = 'resnet20', 'digits', '0,1', 'flops:0.5'
        args.methods, args.train_epochs, args.finetune_epochs, args.probe_steps = 'hmc,prune,tp_l2', 1, '1', 2
    return args


def parse_budgets(text: str) -> list[tuple[str, float]]:
    """``'flops:0.5,latency:0.5'`` -> ``[('flops', 0.5), ('latency', 0.5)]``."""
    budgets = []
    for item in text.split(','):
        kind, _, value = item.partition(':')
        if kind not in BUDGET_NAMES or not value:
            raise SystemExit(f'--budgets: got {item!r}, expected KIND:FRACTION with KIND one of {sorted(BUDGET_NAMES)}')
        budgets.append((kind, float(value)))
    return budgets


def budget_label(kind: str, target: float) -> str:
    return f'{kind} {target:g}'


# --------------------------------------------------------------------------------------------- one cell

def compress(model, splits, settings, method: str, table, work: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``method``'s compressed copy of ``model`` under ``settings``' budget, after the calibration steps every
    method shares (consumers refitted, BatchNorm re-estimated); ``model`` is untouched."""
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    info: dict[str, Any] = {}
    method = VARIANTS.get(method, (method,))[0]  # a variant's settings are in ``settings`` already
    if method in ('hmc', 'nahc', 'prune'):
        plan = None
        if method == 'hmc':
            plan, record = plan_by_margin_rule(model, splits, settings, table, cache_path=work / 'probes.json')
            info.update(margin=record['margin'], decompose_weight=record['decompose_weight'])
        compressor = make_compressor(model, splits, settings, method, table=table, plan=plan, progress=False)
        compressed, _ = compressor.compress()
        info['groups'] = compressor.plan.group_counts()
        info['decomposed'] = len(compressor.plan.ranks)
        info['prune_ratios'] = compressor.plan.prune_ratios  # group leader -> fraction of its channels removed
        return compressed.eval(), info
    budget = {name: value for name, value in settings.hmc.budget_entry.items() if name != 'target_latency'}
    if method == 'nni_l1':
        compressed, details = nni_l1_prune(model, dummy_input, speedup=settings.speedup, **budget)
    else:
        importance = method.removeprefix('tp_')
        labelled = calibration_batch(splits, settings.calibration_size, seed=settings.seed) \
            if importance == 'taylor' else None
        compressed, details = torch_pruning_prune(model, dummy_input, importance=importance, allocation='global',
                                                  calibration=labelled, speedup=settings.speedup, **budget)
    info['prune_ratios'] = {name: ratio for name, ratio in details.get('ratios', {}).items() if ratio > 0}
    batches = calibration_batches(splits, settings)
    if settings.reconstruct:
        fit_to_data(model, compressed, batches[:settings.fit_batches], masks=details['masks'], reconstruct=True,
                    data_aware=False)
    if settings.bn_batches:
        recalibrate_bn(compressed, batches[:settings.bn_batches])
    return compressed.eval(), info


def run_cell(model, splits, settings, method: str, table, reference, epochs: list[int], args,
             work: Path) -> dict[str, Any]:
    """One (seed, budget, method): sizes, zero-shot and per-epoch fine-tuned accuracy and KL, measured latency."""
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    images = [batch for batch, _ in test_loader]
    try:
        compressed, cell = compress(model, splits, settings, method, table, work)
    except HMCConfigError as error:
        return {'unreachable': str(error)}
    sizes = size_fields(model, compressed, dummy_input)
    cell.update(flops_kept=flops_kept(sizes), params_kept=params_kept(sizes))
    if settings.target_latency is not None:
        inputs = batched_input(dummy_input, settings.latency_batch)
        before, after = measure_latency_side_by_side([model, compressed], inputs, warmup=3, repeats=15,
                                                     num_threads=settings.threads)
        cell['latency_kept'] = after / before
    cell['acc'] = {'0': evaluate_accuracy(compressed, test_loader)}
    cell['kl'] = {'0': output_kl(reference, compressed, images)}

    def measure(tuned, epoch: int) -> None:
        if epoch in epochs:
            cell['acc'][str(epoch)] = evaluate_accuracy(tuned, test_loader)
            cell['kl'][str(epoch)] = output_kl(reference, tuned, images)

    if settings.finetune_schedule == 'constant':  # one run: its epoch k is a k-epoch run
        cell['finetune_seconds'] = sgd_finetune(compressed, splits,
                                                common.replace(settings, finetune_epochs=max(epochs)),
                                                on_epoch_end=measure)
        return cell
    cell['finetune_seconds'] = 0.0
    for count in epochs:  # a scheduled run anneals over its own length: one run per epoch count
        tuned = copy.deepcopy(compressed)
        cell['finetune_seconds'] += sgd_finetune(tuned, splits, common.replace(settings, finetune_epochs=count))
        measure(tuned, count)
    return cell


# --------------------------------------------------------------------------------------------- the run

class _Missing(Exception):
    """A cell ``--cached-only`` did not find in the cache."""


def _missing():
    raise _Missing

def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = common.Progress(args.quiet)
    common.configure(args.threads)
    out = Path(args.out)
    seeds = [int(seed) for seed in args.seeds.split(',')]
    budgets = parse_budgets(args.budgets)
    methods = args.methods.split(',')
    epochs = sorted(int(epoch) for epoch in args.finetune_epochs.split(','))
    finetune_runs = 'one per epoch count' if args.finetune_schedule != 'constant' else 'one'  # see run_cell
    baselines, cells, missing = [], [], []
    for data in args.data.split(','):
        for model_name in args.models.split(','):
            subjects = {}
            for seed in seeds:  # every baseline and scan first: a run cut short has all seeds of the first cells
                settings = common.replace(
                    common.settings_for(model_name, seed, train_epochs=args.train_epochs, threads=args.threads,
                                        data=data), speedup='torch_pruning', probe_steps=args.probe_steps,
                    latency_batch=args.latency_batch, latency_cache=str(out / 'latency.json'),
                    finetune_schedule=args.finetune_schedule)
                work = out / data / model_name / f'seed{seed}'
                if args.cached_only and not (work / 'baseline.pt').exists():
                    missing.append(f'{data} {model_name} seed {seed} (no baseline: every cell)')
                    continue
                model, splits = common.prepare_baseline(settings, work, progress)
                table = scan(copy.deepcopy(model), splits, settings, work / 'scan', progress=False)
                _, test_loader = make_loaders(splits, settings.batch_size, seed=seed)
                reference = output_log_probs(model, [batch for batch, _ in test_loader])
                baselines.append({'model': model_name, 'data': data, 'seed': seed,
                                  'acc': evaluate_accuracy(model, test_loader)})
                subjects[seed] = (settings, work, model, splits, table, reference)
            for kind, target in budgets:
                for seed in subjects:
                    settings, work, model, splits, table, reference = subjects[seed]
                    budget_settings = common.replace(settings, **{BUDGET_NAMES[kind]: target})
                    for method in methods:
                        if kind == 'latency' and method not in LATENCY_METHODS:
                            continue
                        cell_settings = common.replace(budget_settings, **VARIANTS.get(method, (None, {}))[1])
                        key = {'settings': common.settings_dict(cell_settings), 'method': method,
                               'baseline': model_fingerprint(model), 'scan': common.table_fingerprint(table),
                               'epochs': epochs, 'quick': args.quick, 'runs': finetune_runs}
                        path = work / 'cells' / f'{kind}{target:g}_{method}.json'
                        head = f'{data} {model_name} seed {seed} {budget_label(kind, target)} {method}'
                        try:
                            cell = common.cached_cell(path, key, lambda: _missing() if args.cached_only else run_cell(
                                model, splits, cell_settings, method, table, reference, epochs, args, work))
                        except _Missing:
                            missing.append(head)
                            continue
                        cell = {'model': model_name, 'data': data, 'seed': seed, 'budget': kind, 'target': target,
                                'method': method, **cell}
                        cells.append(cell)
                        if 'unreachable' in cell:
                            progress(f'{head}: unreachable: {cell["unreachable"]}')
                        else:
                            progress(f'{head}: FLOPs {cell["flops_kept"]:.3f}, params {cell["params_kept"]:.3f}, acc '
                                     + ' -> '.join(f'{cell["acc"][str(e)]:.3f}' for e in [0, *epochs]))
    settings_out = {'models': args.models.split(','), 'data': args.data.split(','), 'seeds': seeds,
                    'budgets': [f'{kind}:{target:g}' for kind, target in budgets], 'methods': methods, 'epochs': epochs,
                    'train_epochs': args.train_epochs, 'train_lr': common.TRAIN_LR, 'finetune_lr': common.FINETUNE_LR,
                    'finetune_schedule': args.finetune_schedule,
                    'finetune_runs': finetune_runs,
                    'probe_steps': args.probe_steps, 'latency_batch': args.latency_batch, 'quick': args.quick}
    suite = 'power' if args.finetune_schedule == 'constant' else f'power_{args.finetune_schedule}'
    report = {**common.header(suite, settings_out), 'wall_seconds': progress.elapsed, 'baselines': baselines,
              'cells': cells, 'missing': missing}
    report['summary'] = summarise(cells, epochs)
    return report


# --------------------------------------------------------------------------------------------- statistics

def interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided ``level`` t interval of the mean of ``values`` (nan bounds for fewer than 2)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def summarise(cells: list[dict], epochs: list[int]) -> list[dict[str, Any]]:
    """One row per (model, data, budget, epochs): each method's mean ± std accuracy and KL over the seeds, the
    strongest pruner, and the paired differences of each subject against every other method (seeds both reached)."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell['model'], cell['data'], cell['budget'], cell['target']), []).append(cell)
    for (model, data, kind, target), members in groups.items():
        for epoch in [0, *epochs]:
            per_method: dict[str, dict[int, dict]] = {}
            for cell in members:
                per_method.setdefault(cell['method'], {})[cell['seed']] = cell
            row: dict[str, Any] = {'model': model, 'data': data, 'budget': kind, 'target': target, 'epochs': epoch,
                                   'methods': {}, 'paired': []}
            for method, by_seed in per_method.items():
                reached = {seed: cell for seed, cell in by_seed.items() if 'unreachable' not in cell}
                entry: dict[str, Any] = {'seeds': len(by_seed), 'reached': len(reached)}
                if reached:
                    for metric in ('acc', 'kl'):
                        entry[f'{metric}_mean'], entry[f'{metric}_std'] = common.mean_std(
                            [cell[metric][str(epoch)] for cell in reached.values()])
                    for metric in ('flops_kept', 'params_kept', 'latency_kept'):
                        if all(metric in cell for cell in reached.values()):
                            entry[metric] = statistics.fmean(cell[metric] for cell in reached.values())
                row['methods'][method] = entry
            pruners = [method for method in PRUNERS if 'acc_mean' in row['methods'].get(method, {})]
            row['strongest_pruner'] = max(pruners, key=lambda m: row['methods'][m]['acc_mean']) if pruners else None
            for subject in SUBJECTS:
                if subject not in per_method:
                    continue
                for other in per_method:
                    if other == subject:
                        continue
                    seeds = sorted(seed for seed in per_method[subject] if seed in per_method[other]
                                   and 'unreachable' not in per_method[subject][seed]
                                   and 'unreachable' not in per_method[other][seed])
                    if not seeds:
                        continue
                    differences = [per_method[subject][seed]['acc'][str(epoch)]
                                   - per_method[other][seed]['acc'][str(epoch)] for seed in seeds]
                    mean, low, high = interval(differences)
                    row['paired'].append({'subject': subject, 'baseline': other, 'seeds': seeds,
                                          'differences': differences, 'mean': mean, 'low': low, 'high': high})
            rows.append(row)
    return rows


def paired(row: dict, subject: str, baseline: str) -> dict | None:
    return next((p for p in row['paired'] if (p['subject'], p['baseline']) == (subject, baseline)), None)


def verdict(report: dict, subject: str = 'hmc') -> dict[str, Any]:
    """The issue's goal for ``subject``, counted over the fine-tuned cells: its mean at least every baseline's (the
    methods that are not subjects), and the 95 % interval of it - the strongest pruner above zero (in at least half
    the cells); the cells lost, by name."""
    fine_tuned = [row for row in report['summary'] if row['epochs'] > 0 and subject in row['methods']]
    at_least, above, lost = 0, 0, []
    for row in fine_tuned:
        mean = row['methods'][subject].get('acc_mean')
        others = {m: e['acc_mean'] for m, e in row['methods'].items() if m not in SUBJECTS and 'acc_mean' in e}
        beaten_by = [m for m, value in others.items() if mean is None or value > mean]
        if not beaten_by:
            at_least += 1
        else:
            lost.append(f'{_cell_name(row)}: below {"; ".join(LABELS[m] for m in beaten_by)}')
        strongest = row['strongest_pruner']
        pair = paired(row, subject, strongest) if strongest else None
        if pair is not None and not math.isnan(pair['low']) and pair['low'] > 0:
            above += 1
    return {'cells': len(fine_tuned), 'hmc_at_least_every_baseline': at_least,
            'interval_above_zero_vs_strongest': above, 'lost': lost}


# --------------------------------------------------------------------------------------------- rendering

def _cell_name(row: dict) -> str:
    return (f'{common.MODEL_LABELS.get(row["model"], row["model"])} on {row["data"]}, '
            f'{budget_label(row["budget"], row["target"])}, {row["epochs"]} epoch(s)')


def _pp(pair: dict | None) -> str:
    if pair is None:
        return ''
    mean = 100 * pair['mean']
    if math.isnan(pair['low']):
        return f'{mean:+.1f}'
    return f'{mean:+.1f} [{100 * pair["low"]:+.1f}, {100 * pair["high"]:+.1f}]'


def cell_table(row: dict) -> str:
    header = ['method', 'seeds', 'FLOPs kept', 'params kept', 'latency kept', 'accuracy', 'KL (nats)',
              'HMC − it, pp [95 % CI]', f'{LABELS["hmc_spread"]} − it']
    best = max((entry['acc_mean'] for entry in row['methods'].values() if 'acc_mean' in entry), default=None)
    lines = []
    for method in METHODS:
        entry = row['methods'].get(method)
        if entry is None:
            continue
        label = LABELS[method] + (' (strongest pruner)' if method == row['strongest_pruner'] else '')
        if 'acc_mean' not in entry:
            lines.append([label, f'0 of {entry["seeds"]}', 'cannot reach the budget', '', '', '', '', '', ''])
            continue
        accuracy = f'{entry["acc_mean"]:.3f} ± {entry["acc_std"]:.3f}'
        if entry['acc_mean'] == best:
            accuracy = f'**{accuracy}**'
        seeds = str(entry['reached']) if entry['reached'] == entry['seeds'] else \
            f'{entry["reached"]} of {entry["seeds"]}'
        lines.append([label, seeds, f'{entry["flops_kept"]:.3f}', f'{entry["params_kept"]:.3f}',
                      f'{entry["latency_kept"]:.3f}' if 'latency_kept' in entry else '',
                      accuracy, f'{entry["kl_mean"]:.3g} ± {entry["kl_std"]:.2g}',
                      '—' if method == 'hmc' else _pp(paired(row, 'hmc', method)),
                      '—' if method == 'hmc_spread' else _pp(paired(row, 'hmc_spread', method))])
    return markdown_table(header, lines)


def _schedule_words(settings: dict[str, Any]) -> str:
    if settings.get('finetune_schedule', 'constant') == 'constant':
        return 'no schedule'
    if 'finetune_runs' not in settings:  # reports of the per-epoch cosine (before 2026-12-08): one run, its epoch 1
        return f'cosine to 0 over {max(settings["epochs"])} epochs, stepped per epoch'
    return 'cosine to 0 over each run\'s steps, one run per epoch count'


def render_markdown(report: dict) -> str:
    """``power.md``: a pure function of ``power.json``."""
    settings = report['settings']
    title = '# Powered benchmark: HMC against the strongest pruners, paired over seeds'
    if settings.get('finetune_schedule', 'constant') != 'constant':
        title += f', {settings["finetune_schedule"]} fine-tuning'
    lines = [title, '',
             f'Command: `{report["command"]}` ({report["machine"]}, {report["threads"]} thread(s), commit '
             f'{report.get("commit")}, {report["wall_seconds"] / 60:.1f} min in this invocation; cells cached). '
             f'Seeds {settings["seeds"]}; baselines trained {settings["train_epochs"]} epochs; every method '
             f'fine-tuned the same way (SGD lr {settings["finetune_lr"]}, '
             f'{_schedule_words(settings)}, the seed\'s batch order), '
             f'measured after {", ".join(map(str, settings["epochs"]))} epoch(s); 0 = zero-shot (after the '
             f'calibration steps every method gets). Accuracy on the test split, mean ± sample std over seeds; KL = '
             f'KL(original || compressed) per test image. "HMC − it": the paired difference per seed, its mean and '
             f'95 % t interval, in percentage points. HMC: margin rule, {settings["probe_steps"]} probe steps per '
             f'candidate. Latency kept: measured side by side with the original at batch '
             f'{settings["latency_batch"]}, one thread.', '']
    for subject in SUBJECTS:
        result = verdict(report, subject)
        if not result['cells']:
            continue
        lines += [f'**Goal, {LABELS[subject]}** (fine-tuned cells): at least every baseline in '
                  f'{result["hmc_at_least_every_baseline"]} of {result["cells"]}; 95 % interval of it − the strongest '
                  f'pruner above zero in {result["interval_above_zero_vs_strongest"]} of {result["cells"]}.', '']
        if result['lost']:
            lines += [f'Cells {LABELS[subject]} does not win:', ''] + [f'- {line}' for line in result['lost']] + ['']
    if report.get('missing'):
        lines += [f'Not run yet ({len(report["missing"])} cells; rerun the command to compute them): '
                  + ', '.join(report['missing']) + '.', '']
    baselines = report['baselines']
    for data in settings['data']:
        for model in settings['models']:
            accs = [b['acc'] for b in baselines if (b['model'], b['data']) == (model, data)]
            if not accs:
                continue
            mean, std = common.mean_std(accs)
            lines += [f'## {common.MODEL_LABELS.get(model, model)} on {data} (uncompressed {mean:.3f} ± {std:.3f})',
                      '']
            for row in report['summary']:
                if (row['model'], row['data']) == (model, data):
                    lines += [f'### {budget_label(row["budget"], row["target"])}, '
                              + ('zero-shot' if row['epochs'] == 0 else f'{row["epochs"]} fine-tuning epoch(s)'), '',
                              cell_table(row), '']
    return '\n'.join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    common.write_suite(Path(args.out), report, render_markdown(report), quiet=args.quiet)


if __name__ == '__main__':
    main()
