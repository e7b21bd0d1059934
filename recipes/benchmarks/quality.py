"""Quality benchmark: HMC against every baseline on accuracy, output KL and FLOPs, over seeds and budgets.

For each model (CIFAR ResNet-20 and ResNet-56 on the embedded digits data) and seed: train the baseline
once, scan once (proxy sensitivity, shared by NaHC, HMC and AHC and the single-operator plans), then for
each FLOPs target and method compress, measure the test accuracy and the KL divergence of the outputs from
the original model's on the test split (zero-shot), fine-tune with the same small budget, and measure
again. Baselines, scans and every finished cell are cached under ``--out``: a rerun resumes.

HMC's margin rule (``hmc_plugin.app.workflow.choose_margin``): among tau in 0, 0.25, 0.5, 1, 2 and inf,
take the plan whose compressed model, before fine-tuning, has the lowest KL divergence from the original
on 256 held-out training images (not the scan's calibration images, never the test split).

Writes ``quality.json`` (every cell, the per-method summary, the comparisons), ``quality.md`` (the tables,
rendered from the JSON) and ``quality_pareto.png`` (accuracy against FLOPs kept).

    .venv/bin/python recipes/benchmarks/quality.py --out runs/bench/quality           # full, about an hour on 2 cores
    .venv/bin/python recipes/benchmarks/quality.py --out /tmp/quality --quick         # harness check, under a minute
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (recipes/benchmarks is not a package)

from hmc_plugin.app.data import make_loaders  # noqa: E402
from hmc_plugin.app.report import markdown_table  # noqa: E402
from hmc_plugin.app.training import evaluate_accuracy
from hmc_plugin.errors import HMCConfigError  # noqa: E402
from hmc_plugin.utils.counting import count_flops, count_params  # noqa: E402
from hmc_plugin.utils.fingerprint import model_fingerprint  # noqa: E402
from hmc_plugin.utils.kl import output_kl, output_log_probs  # noqa: E402

SUBJECTS = ('hmc', 'nahc')  # the methods whose wins and losses the tables spell out
METRICS = ('acc_zero_shot', 'acc_finetuned', 'kl_zero_shot', 'kl_finetuned', 'flops_kept', 'params_kept')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/bench/quality')
    parser.add_argument('--quick', action='store_true',
                        help='ResNet-20, one seed, target 0.25, 1 training epoch, 2 fine-tuning steps: checks the harness')
    parser.add_argument('--models', default='resnet20,resnet56')
    parser.add_argument('--seeds', default='0,1,2')
    parser.add_argument('--targets', default='0.5,0.25,0.125', help='fractions of the FLOPs to keep')
    parser.add_argument('--methods', default=','.join(common.METHODS))
    parser.add_argument('--train-epochs', type=int, default=common.TRAIN_EPOCHS)
    parser.add_argument('--finetune-epochs', type=int, default=common.FINETUNE_EPOCHS)
    parser.add_argument('--finetune-lr', type=float, default=common.FINETUNE_LR)
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1: see recipes/benchmarks/README.md)')
    parser.add_argument('--quiet', action='store_true')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.targets, args.train_epochs = 'resnet20', '0', '0.25', 1
    return args


# --------------------------------------------------------------------------------------------- measuring

def test_metrics(model, test_loader, reference_log_probs) -> tuple[float, float]:
    """(test accuracy, KL(original || model) per test image)."""
    return evaluate_accuracy(model, test_loader), output_kl(reference_log_probs, model, test_loader)


def run_cell(model, splits, settings, method, table, reference_log_probs, quick: bool) -> dict[str, Any]:
    """Compress, measure, fine-tune, measure: one (model, seed, target, method) cell."""
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    candidates = (0.5, math.inf) if quick else common.MARGIN_CANDIDATES
    cell = {'model': settings.model, 'seed': settings.seed, 'target': settings.target_flops, 'method': method}
    try:
        compressed, info = common.compress(model, splits, settings, method, table, margin_candidates=candidates)
    except HMCConfigError as error:  # the method cannot reach this budget (said in the table)
        return {**cell, 'unreachable': str(error)}
    acc_zero_shot, kl_zero_shot = test_metrics(compressed, test_loader, reference_log_probs)
    seconds_finetune = common.finetune(compressed, splits, settings, max_steps=2 if quick else None)
    acc_finetuned, kl_finetuned = test_metrics(compressed, test_loader, reference_log_probs)
    return {**cell, 'acc_zero_shot': acc_zero_shot, 'acc_finetuned': acc_finetuned, 'kl_zero_shot': kl_zero_shot,
            'kl_finetuned': kl_finetuned, 'seconds_compress': info.pop('seconds'),
            'seconds_finetune': seconds_finetune, **info}


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = common.Progress(args.quiet)
    common.configure(args.threads)
    out = Path(args.out)
    models = args.models.split(',')
    seeds = [int(seed) for seed in args.seeds.split(',')]
    targets = [float(target) for target in args.targets.split(',')]
    methods = args.methods.split(',')
    unknown = sorted(set(methods) - set(common.METHODS))
    if unknown:
        raise SystemExit(f'unknown methods {unknown}; expected some of {common.METHODS}')
    cells, baselines = [], []
    total = len(models) * len(seeds) * len(targets) * len(methods)
    for model_name in models:
        for seed in seeds:
            settings = common.settings_for(model_name, seed, train_epochs=args.train_epochs, threads=args.threads,
                                           finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr)
            work = out / model_name.replace(':', '_') / f'seed{seed}'
            model, splits, table = common.prepare(settings, work, progress)
            _, test_loader = make_loaders(splits, settings.batch_size, seed=seed)
            reference_log_probs = output_log_probs(model, test_loader)
            baseline_fingerprint = model_fingerprint(model)  # a cell is reused only for this baseline and scan
            dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
            baselines.append({'model': model_name, 'seed': seed, 'acc': evaluate_accuracy(model, test_loader),
                              'flops': count_flops(model, dummy_input), 'params': count_params(model),
                              'scan_seconds': table.seconds})
            for target in targets:
                cell_settings = common.replace(settings, target_flops=target)
                for method in methods:
                    path = work / 'cells' / f'{target:g}_{method}.json'
                    key = {'settings': common.settings_dict(cell_settings), 'quick': args.quick,
                           'baseline': baseline_fingerprint, 'scan': common.table_fingerprint(table)}
                    cell = common.cached_cell(path, key, lambda: run_cell(model, splits, cell_settings, method, table,
                                                                          reference_log_probs, args.quick))
                    cells.append(cell)
                    if 'unreachable' in cell:
                        progress(f'[{len(cells)}/{total}] {model_name} seed {seed} target {target:g} {method}: '
                                 f'unreachable: {cell["unreachable"]}')
                        continue
                    progress(f'[{len(cells)}/{total}] {model_name} seed {seed} target {target:g} {method}: '
                             f'FLOPs kept {cell["flops_kept"]:.3f}, acc {cell["acc_zero_shot"]:.3f} -> '
                             f'{cell["acc_finetuned"]:.3f}, KL {cell["kl_zero_shot"]:.3g} -> {cell["kl_finetuned"]:.3g}'
                             + (f', tau {cell["margin"]}' if 'margin' in cell else ''))
    settings_out = {'models': models, 'seeds': seeds, 'targets': targets, 'methods': methods, 'data': 'digits',
                    'train_epochs': args.train_epochs, 'train_lr': common.TRAIN_LR,
                    'finetune_epochs': args.finetune_epochs if not args.quick else None,
                    'finetune_steps': 2 if args.quick else None, 'finetune_lr': args.finetune_lr,
                    'sensitivity': 'proxy', 'quick': args.quick}
    report = {**common.header('quality', settings_out), 'wall_seconds': progress.elapsed,
              'baselines': baselines, 'cells': cells}
    report['summary'] = summarise(cells, baselines)
    report['comparisons'] = compare(report['summary'])
    return report


# --------------------------------------------------------------------------------------------- summarising

def summarise(cells: list[dict], baselines: list[dict]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of every metric, per (model, target, method); uncompressed rows first."""
    summary = []
    for model_name in dict.fromkeys(baseline['model'] for baseline in baselines):
        accs = [baseline['acc'] for baseline in baselines if baseline['model'] == model_name]
        mean, std = common.mean_std(accs)
        summary.append({'model': model_name, 'target': None, 'method': 'uncompressed', 'seeds': len(accs),
                        **{f'{metric}_mean': value for metric, value in (('acc_zero_shot', mean), ('acc_finetuned', mean),
                                                                        ('kl_zero_shot', 0.0), ('kl_finetuned', 0.0),
                                                                        ('flops_kept', 1.0), ('params_kept', 1.0))},
                        **{f'{metric}_std': value for metric, value in (('acc_zero_shot', std), ('acc_finetuned', std),
                                                                       ('kl_zero_shot', 0.0), ('kl_finetuned', 0.0),
                                                                       ('flops_kept', 0.0), ('params_kept', 0.0))}})
        for target in dict.fromkeys(cell['target'] for cell in cells if cell['model'] == model_name):
            for method in dict.fromkeys(cell['method'] for cell in cells):
                group = [cell for cell in cells if (cell['model'], cell['target'], cell['method']) == (model_name, target, method)]
                if not group:
                    continue
                row = {'model': model_name, 'target': target, 'method': method, 'seeds': len(group),
                       'unreachable': sum('unreachable' in cell for cell in group)}
                group = [cell for cell in group if 'unreachable' not in cell]
                if not group:  # no seed reached the target: a row that says so, without metrics
                    summary.append(row)
                    continue
                for metric in METRICS:
                    row[f'{metric}_mean'], row[f'{metric}_std'] = common.mean_std([cell[metric] for cell in group])
                if method == 'hmc':
                    row['margins'] = [cell['margin'] for cell in group]
                summary.append(row)
    return summary


def compare(summary: list[dict]) -> list[dict[str, Any]]:
    """For HMC and NaHC at each (model, target): the difference of mean fine-tuned accuracy to every other
    method (positive: the subject is better), and whether it beats it."""
    comparisons = []
    for subject_row in summary:
        if subject_row['method'] not in SUBJECTS or 'acc_finetuned_mean' not in subject_row:
            continue
        for other in summary:
            if (other['model'], other['target']) != (subject_row['model'], subject_row['target']) or \
                    other['method'] == subject_row['method'] or 'acc_finetuned_mean' not in other:
                continue
            difference = subject_row['acc_finetuned_mean'] - other['acc_finetuned_mean']
            comparisons.append({'model': subject_row['model'], 'target': subject_row['target'],
                                'subject': subject_row['method'], 'baseline': other['method'],
                                'difference': difference, 'beats': difference > 0,
                                'within_spread': abs(difference) <= max(subject_row['acc_finetuned_std'],
                                                                        other['acc_finetuned_std'])})
    return comparisons


# --------------------------------------------------------------------------------------------- rendering

def _pm(mean: float, std: float, digits: int = 3) -> str:
    return f'{mean:.{digits}f} ± {std:.{digits}f}'


def _kl(mean: float, std: float) -> str:
    return f'{mean:.3g} ± {std:.2g}'


def _versus(comparisons: list[dict], model: str, target: float, subject: str, method: str) -> str:
    if method == subject:
        return '—'
    for comparison in comparisons:
        if (comparison['model'], comparison['target'], comparison['subject'], comparison['baseline']) == \
                (model, target, subject, method):
            points = 100 * comparison['difference']
            if comparison['difference'] == 0:
                return 'ties, +0.0'
            return f'beats, {points:+.1f}' if comparison['beats'] else f'**does not beat**, {points:+.1f}'
    return ''


def model_table(report: dict, model: str) -> str:
    """The markdown table of one model: one block of rows per target, best fine-tuned accuracy in bold."""
    header = ['target', 'method', 'FLOPs kept', 'params kept', 'acc zero-shot', 'acc fine-tuned',
              'KL zero-shot', 'KL fine-tuned', 'HMC vs it (pp)', 'NaHC vs it (pp)']
    rows = []
    summary = [row for row in report['summary'] if row['model'] == model]
    methods = [row['method'] for row in summary]
    for row in summary:
        target = row['target']
        label = common.METHOD_LABELS[row['method']]
        if 'acc_finetuned_mean' not in row:
            rows.append([f'{target:g}', label] + ['cannot reach the target'] + [''] * (len(header) - 3))
            continue
        if row.get('unreachable'):
            label += f' ({row["seeds"] - row["unreachable"]} of {row["seeds"]} seeds reach the target)'
        block = [other for other in summary if other['target'] == target and other['method'] != 'uncompressed'
                 and 'acc_finetuned_mean' in other]
        best = max((other['acc_finetuned_mean'] for other in block), default=None)
        accuracy = _pm(row['acc_finetuned_mean'], row['acc_finetuned_std'])
        if row['method'] != 'uncompressed' and row['acc_finetuned_mean'] == best:
            accuracy = f'**{accuracy}**'
        if row['method'] == 'hmc':
            label += ' (τ ' + '/'.join('∞' if margin == 'inf' else f'{margin:g}' for margin in row['margins']) + ')'
        uncompressed = row['method'] == 'uncompressed'
        rows.append([
            '—' if target is None else f'{target:g}', label,
            f'{row["flops_kept_mean"]:.3f}', f'{row["params_kept_mean"]:.3f}',
            _pm(row['acc_zero_shot_mean'], row['acc_zero_shot_std']), accuracy,
            '0' if uncompressed else _kl(row['kl_zero_shot_mean'], row['kl_zero_shot_std']),
            '0' if uncompressed else _kl(row['kl_finetuned_mean'], row['kl_finetuned_std']),
            '' if uncompressed or 'hmc' not in methods else _versus(report['comparisons'], model, target, 'hmc', row['method']),
            '' if uncompressed or 'nahc' not in methods else _versus(report['comparisons'], model, target, 'nahc', row['method']),
        ])
    return markdown_table(header, rows)


def not_beaten_lines(report: dict) -> list[str]:
    """One line per (model, target, subject) listing the baselines the subject does not beat."""
    lines = []
    for subject in SUBJECTS:
        for model in report['settings']['models']:
            for target in report['settings']['targets']:
                row = next((row for row in report['summary'] if (row['model'], row['target'], row['method']) ==
                            (model, target, subject)), None)
                if row is not None and row.get('unreachable'):
                    lines.append(f'- {common.METHOD_LABELS[subject]}, {common.MODEL_LABELS.get(model, model)}, '
                                 f'target {target:g}: cannot reach the target with {row["unreachable"]} of '
                                 f'{row["seeds"]} seeds.')
                losses = [c for c in report['comparisons'] if (c['model'], c['target'], c['subject']) == (model, target, subject)
                          and not c['beats'] and c['baseline'] not in SUBJECTS]
                if losses:
                    spread = ", within the seeds' spread"
                    listed = ', '.join(f'{common.METHOD_LABELS[c["baseline"]]} ('
                                       + ('tie' if c['difference'] == 0 else f'{100 * c["difference"]:+.1f} pp')
                                       + f'{spread if c["within_spread"] else ""})' for c in losses)
                    lines.append(f'- {common.METHOD_LABELS[subject]}, {common.MODEL_LABELS.get(model, model)}, '
                                 f'target {target:g}: does not beat {listed}.')
    return lines


def render_markdown(report: dict) -> str:
    """``quality.md``: a pure function of ``quality.json`` (the tests check the file against it)."""
    settings = report['settings']
    budget = common.finetune_budget(settings)
    lines = [f'# Quality benchmark ({"quick" if settings["quick"] else "full"})', '',
             f'Created {report["created"]} on {report["machine"]}, {report["threads"]} threads; '
             f'{report["wall_seconds"] / 60:.1f} min.', '',
             f'Data: digits (1,437 train / 360 test images, 3x32x32). Baselines trained {settings["train_epochs"]} '
             f'epochs (lr {settings["train_lr"]}, cosine), one per seed ({", ".join(map(str, settings["seeds"]))}). '
             f'Every method gets the same fine-tuning: {budget} of SGD at lr {settings["finetune_lr"]}. '
             f'Mean ± sample std over the seeds; accuracy on the test split; KL = KL(original || compressed) of '
             f'the output distributions per test image, in nats. Bold: best fine-tuned accuracy at that target. '
             f'"HMC vs it": HMC\'s mean fine-tuned accuracy minus the method\'s, in percentage points; HMC\'s τ per '
             f'seed is given in its row.', '']
    for model in settings['models']:
        lines += [f'## {common.MODEL_LABELS.get(model, model)}', '', model_table(report, model), '']
    losses = not_beaten_lines(report)
    lines += ['## Where HMC or NaHC does not beat a baseline', '']
    lines += losses if losses else ['Nowhere: HMC and NaHC beat every baseline at every target.']
    lines += ['', '![accuracy against FLOPs kept](quality_pareto.png)', '', 'Produced by:', '', '```bash',
              report['command'], '```', '']
    return '\n'.join(lines)


def plot(report: dict, path: Path) -> None:
    """Fine-tuned (filled, solid) and zero-shot (hollow, dashed) accuracy against FLOPs kept, one panel per model."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    models = report['settings']['models']
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.6), squeeze=False)
    colours = plt.get_cmap('tab10')
    methods = [method for method in common.METHODS if method in report['settings']['methods']]
    for ax, model in zip(axes[0], models):
        rows = [row for row in report['summary'] if row['model'] == model]
        for index, method in enumerate(methods):
            points = sorted((row for row in rows if row['method'] == method and 'flops_kept_mean' in row),
                            key=lambda row: row['flops_kept_mean'])
            if not points:
                continue
            kept = [row['flops_kept_mean'] for row in points]
            ax.errorbar(kept, [row['acc_finetuned_mean'] for row in points],
                        yerr=[row['acc_finetuned_std'] for row in points], color=colours(index), marker='o',
                        capsize=3, label=common.METHOD_LABELS[method])
            ax.plot(kept, [row['acc_zero_shot_mean'] for row in points], color=colours(index), marker='o',
                    markerfacecolor='none', linestyle='--', alpha=0.6)
        reference = next(row for row in rows if row['method'] == 'uncompressed')
        ax.errorbar([1.0], [reference['acc_finetuned_mean']], yerr=[reference['acc_finetuned_std']], color='black',
                    marker='*', markersize=11, linestyle='none', label='uncompressed')
        ax.set_xscale('log', base=2)
        ticks = sorted({1.0, *report['settings']['targets']})
        ax.set_xticks(ticks, [f'{tick:g}' for tick in ticks])
        ax.minorticks_off()
        ax.set_xlabel('FLOPs kept (fraction of the original, log scale)')
        ax.set_ylabel('test accuracy')
        ax.set_title(f'{common.MODEL_LABELS.get(model, model)}: fine-tuned (solid), zero-shot (dashed)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(report, out / 'quality_pareto.png')
    common.write_suite(out, report, render_markdown(report), also=['quality_pareto.png'])


if __name__ == '__main__':
    main()
