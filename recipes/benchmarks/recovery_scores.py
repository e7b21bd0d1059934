"""Which score of a candidate plan predicts its accuracy after fine-tuning? (issue #18, item 1)

HMC chooses between plans (the margin rule's candidates: margin tau x decomposition exchange rate, prune-only
among them) by a score measured before any real fine-tuning. This benchmark measures, for every candidate, each
score a rule could use, then fine-tunes the candidate and ranks the scores by how well they predict the
fine-tuned test accuracy: Spearman's rank correlation across the candidates of one (model, data, budget, seed),
then its mean and spread over the seeds, and pooled over everything.

Scores (lower KL / higher accuracy = predicted better; all on held-out TRAINING images, never the test split):

- ``kl_data_free``: KL(original || compressed) with data-free operators and the original BatchNorm statistics
  (the zero-shot KL of the scans before the data-aware issue);
- ``kl_bn`` / ``acc_bn``: the same compression after BatchNorm recalibration (EagleEye's adaptive BN);
- ``kl_data_aware`` / ``acc_data_aware``: the defaults: refit consumers, fitted low rank, recalibrated BN;
- ``kl_probe`` / ``acc_probe``: the data-aware model after a short probe fine-tune (``--probe-steps``, the
  margin rule's ``probe_steps``).

Truth: test accuracy after ``--finetune-epochs`` epochs from the data-aware model (the same fine-tuning for every
candidate). Cells (one per candidate) are cached under ``--out``: a rerun resumes.

    .venv/bin/python recipes/benchmarks/recovery_scores.py --out runs/bench/recovery_scores            # full
    .venv/bin/python recipes/benchmarks/recovery_scores.py --out /tmp/recovery_scores --quick          # harness
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (recipes/benchmarks is not a package)

from hmc_plugin.apply import DataFit, apply_plan  # noqa: E402
from hmc_plugin.app.data import calibration_batch, make_loaders, train_permutation, without_train_images  # noqa: E402
from hmc_plugin.app.report import markdown_table  # noqa: E402
from hmc_plugin.app.training import evaluate_accuracy  # noqa: E402
from hmc_plugin.app.workflow import calibration_batches, scan, sgd_finetune  # noqa: E402
from hmc_plugin.engines.pruning import find_pruning_groups  # noqa: E402
from hmc_plugin.errors import HMCConfigError  # noqa: E402
from hmc_plugin.planning.margin import AUTO_DECOMPOSE_WEIGHTS, AUTO_MARGINS, plan_key  # noqa: E402
from hmc_plugin.planning.targets import plan_for_target  # noqa: E402
from hmc_plugin.utils.fingerprint import model_fingerprint  # noqa: E402
from hmc_plugin.utils.jsonio import encode_float  # noqa: E402
from hmc_plugin.utils.kl import output_log_probs, per_input_kl  # noqa: E402

# score name -> sign that makes "higher = predicted better"
SCORES = {'kl_data_free': -1, 'kl_bn': -1, 'acc_bn': 1, 'kl_data_aware': -1, 'acc_data_aware': 1, 'kl_probe': -1,
          'acc_probe': 1}
HELD_OUT = 256  # training images the scores are measured on (after the calibration images)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/bench/recovery_scores')
    parser.add_argument('--quick', action='store_true',
                        help='ResNet-20 on digits, one seed, target 0.5, 1 training epoch, 5 probe steps')
    parser.add_argument('--models', default='resnet20')
    parser.add_argument('--data', default='digits_hard')
    parser.add_argument('--seeds', default='0,1,2')
    parser.add_argument('--targets', default='0.5,0.25')
    parser.add_argument('--train-epochs', type=int, default=common.TRAIN_EPOCHS)
    parser.add_argument('--finetune-epochs', type=int, default=1)
    parser.add_argument('--probe-steps', type=int, default=60)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--quiet', action='store_true')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.data, args.seeds, args.targets = 'resnet20', 'digits', '0', '0.5'
        args.train_epochs, args.probe_steps = 1, 5
    return args


def candidate_plans(model, splits, settings, table) -> list[tuple[float, float, Any]]:
    """The margin rule's candidates ``(margin, weight, plan)`` at the budget, identical plans once."""
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    groups = find_pruning_groups(model, dummy_input)
    seen, plans = set(), []
    for weight in AUTO_DECOMPOSE_WEIGHTS:
        for margin in AUTO_MARGINS:
            try:
                plan, _ = plan_for_target(table, model, dummy_input, groups, mode='hmc', margin=margin,
                                          decompose_weight=weight, importance=settings.importance,
                                          rank_method=settings.rank_method, **settings.hmc.budget_entry)
            except HMCConfigError:
                continue
            if plan_key(plan) not in seen:
                seen.add(plan_key(plan))
                plans.append((margin, weight, plan))
    return plans


def scoring_data(model, splits, settings) -> dict[str, Any]:
    """What every candidate of one (model, seed) is scored with, computed once: the held-out training images and
    the original's outputs on them, the calibration batches, and the train split without the held-out images."""
    images, labels = calibration_batch(splits, settings.calibration_size + HELD_OUT, seed=settings.seed)
    held_out = (images[settings.calibration_size:], labels[settings.calibration_size:])
    probe_splits = without_train_images(splits, train_permutation(splits, settings.seed)[
        settings.calibration_size:settings.calibration_size + HELD_OUT])
    return {'held_out': held_out, 'reference': output_log_probs(model, [held_out[0]]),
            'batches': calibration_batches(splits, settings), 'probe_splits': probe_splits}


def measure(compressed, scoring: dict[str, Any]) -> tuple[float, float]:
    """(KL from the original, accuracy) on the held-out training images."""
    images, labels = scoring['held_out']
    kl = float(per_input_kl(scoring['reference'], compressed, [images]).mean())
    with torch.no_grad():
        accuracy = float((compressed.eval()(images).argmax(1) == labels).float().mean())
    return kl, accuracy


def run_cell(model, splits, settings, plan, scoring, args) -> dict[str, Any]:
    """Every score of one candidate plan, and its fine-tuned test accuracy."""
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    batches = scoring['batches']
    fits = {'data_free': None,
            'bn': DataFit(batches=(), bn_batches=tuple(batches[:settings.bn_batches]), reconstruct=False,
                          data_aware=False),
            'data_aware': DataFit.from_settings(batches, settings.hmc)}
    cell: dict[str, Any] = {}
    compressed = {}
    for name, data in fits.items():
        compressed[name] = apply_plan(copy.deepcopy(model), plan, dummy_input, speedup='torch_pruning', data=data)
        cell[f'kl_{name}'], cell[f'acc_{name}'] = measure(compressed[name], scoring)
    probed = copy.deepcopy(compressed['data_aware'])
    sgd_finetune(probed, scoring['probe_splits'], settings, max_steps=args.probe_steps)
    cell['kl_probe'], cell['acc_probe'] = measure(probed, scoring)
    tuned = compressed['data_aware']
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    cell['acc_zero_shot_test'] = evaluate_accuracy(tuned, test_loader)
    cell['finetune_seconds'] = sgd_finetune(tuned, splits, common.replace(settings,
                                                                           finetune_epochs=args.finetune_epochs))
    cell['acc_finetuned'] = evaluate_accuracy(tuned, test_loader)
    cell['decomposed'] = len(plan.ranks)
    cell['pruned_groups'] = len(plan.prune_ratios)
    return cell


def correlations(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Spearman's rho of each score with the fine-tuned accuracy: per (model, data, target, seed) group of
    candidates, their mean and std, and pooled over all candidates (scores ranked within their group first)."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell['model'], cell['data'], cell['target'], cell['seed']), []).append(cell)
    result = {}
    for score, sign in SCORES.items():
        per_group = []
        for members in groups.values():
            truth = [cell['acc_finetuned'] for cell in members]
            values = [sign * cell[score] for cell in members]
            if len(members) >= 3 and len(set(truth)) > 1 and len(set(values)) > 1:
                per_group.append(float(spearmanr(values, truth).statistic))
        mean, std = common.mean_std(per_group) if per_group else (math.nan, math.nan)
        result[score] = {'rho_mean': mean, 'rho_std': std, 'groups': len(per_group), 'rho_per_group': per_group}
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = common.Progress(args.quiet)
    common.configure(args.threads)
    out = Path(args.out)
    seeds, targets = [int(seed) for seed in args.seeds.split(',')], [float(t) for t in args.targets.split(',')]
    cells, baselines = [], []
    for model_name in args.models.split(','):
        for seed in seeds:
            base = common.replace(common.settings_for(model_name, seed, train_epochs=args.train_epochs,
                                                      threads=args.threads, data=args.data), speedup='torch_pruning')
            work = out / args.data / model_name / f'seed{seed}'
            model, splits = common.prepare_baseline(base, work, progress)
            _, test_loader = make_loaders(splits, base.batch_size, seed=seed)
            baselines.append({'model': model_name, 'data': args.data, 'seed': seed,
                              'acc': evaluate_accuracy(model, test_loader)})
            progress(f'{model_name} seed {seed}: baseline {baselines[-1]["acc"]:.3f}; proxy scan')
            table = scan(copy.deepcopy(model), splits, base, work / 'scan', progress=False)
            scoring = scoring_data(model, splits, base)
            for target in targets:
                settings = common.replace(base, target_flops=target)
                for margin, weight, plan in candidate_plans(model, splits, settings, table):
                    name = f'{target:g}_m{encode_float(margin)}_w{encode_float(weight)}'
                    key = {'settings': common.settings_dict(settings), 'baseline': model_fingerprint(model),
                           'plan': plan_key(plan), 'probe_steps': args.probe_steps,
                           'finetune_epochs': args.finetune_epochs}
                    cell = common.cached_cell(work / 'cells' / f'{name}.json', key,
                                              lambda: run_cell(model, splits, settings, plan, scoring, args))
                    cell = {'model': model_name, 'data': args.data, 'seed': seed, 'target': target,
                            'margin': encode_float(margin), 'decompose_weight': encode_float(weight), **cell}
                    cells.append(cell)
                    progress(f'{model_name} seed {seed} target {target:g} tau {cell["margin"]} weight '
                             f'{cell["decompose_weight"]}: KL data-aware {cell["kl_data_aware"]:.3g}, probe '
                             f'{cell["kl_probe"]:.3g} -> fine-tuned {cell["acc_finetuned"]:.3f}')
    settings_out = {'models': args.models.split(','), 'data': args.data, 'seeds': seeds, 'targets': targets,
                    'train_epochs': args.train_epochs, 'finetune_epochs': args.finetune_epochs,
                    'probe_steps': args.probe_steps, 'held_out': HELD_OUT, 'quick': args.quick,
                    'margins': [encode_float(m) for m in AUTO_MARGINS],
                    'decompose_weights': [encode_float(w) for w in AUTO_DECOMPOSE_WEIGHTS]}
    report = {**common.header('recovery_scores', settings_out), 'wall_seconds': progress.elapsed,
              'baselines': baselines, 'cells': cells, 'correlations': correlations(cells)}
    return report


def render_markdown(report: dict) -> str:
    settings = report['settings']
    lines = ['# Which score predicts recovery after fine-tuning', '',
             f"Command: `{report['command']}` ({report['machine']}, commit {report.get('commit')}, "
             f"{report['wall_seconds'] / 60:.1f} min). {settings['data']}, targets {settings['targets']} of the "
             f"FLOPs, seeds {settings['seeds']}; candidates: the margin rule's plans (tau {settings['margins']} x "
             f"exchange rate {settings['decompose_weights']}, identical plans once); truth: test accuracy after "
             f"{settings['finetune_epochs']} fine-tuning epoch(s); probe: {settings['probe_steps']} steps. "
             f"Spearman's rho per (model, target, seed), mean ± std over those groups (higher = better predictor).",
             '']
    rows = [[score, f"{value['rho_mean']:+.2f} ± {value['rho_std']:.2f}", str(value['groups'])]
            for score, value in sorted(report['correlations'].items(), key=lambda item: -item[1]['rho_mean']
                                       if not math.isnan(item[1]['rho_mean']) else math.inf)]
    lines += [markdown_table(['score', 'Spearman rho with fine-tuned accuracy', 'groups'], rows), '']
    header = ['model', 'seed', 'target', 'tau', 'weight', 'decomposed', 'KL data-free', 'KL bn', 'acc bn',
              'KL data-aware', 'acc data-aware', 'KL probe', 'acc probe', 'fine-tuned acc']
    body = [[cell['model'], str(cell['seed']), f"{cell['target']:g}", str(cell['margin']),
             str(cell['decompose_weight']), str(cell['decomposed']), f"{cell['kl_data_free']:.3g}",
             f"{cell['kl_bn']:.3g}", f"{cell['acc_bn']:.3f}", f"{cell['kl_data_aware']:.3g}",
             f"{cell['acc_data_aware']:.3f}", f"{cell['kl_probe']:.3g}", f"{cell['acc_probe']:.3f}",
             f"{cell['acc_finetuned']:.3f}"] for cell in report['cells']]
    lines += ['Every candidate:', '', markdown_table(header, body), '']
    return '\n'.join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    common.write_suite(Path(args.out), report, render_markdown(report), quiet=args.quiet)


if __name__ == '__main__':
    main()
