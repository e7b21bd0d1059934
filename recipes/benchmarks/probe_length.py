"""Probe length benchmark (issue #7): does a short fine-tune tell which plan will recover best?

``hmc_plugin.workflow.choose_margin`` scores each candidate plan by its KL from the original on 256
held-out training images after ``probe_steps`` SGD steps. This checks the probe against what it stands
for. For CIFAR ResNet-56 on digits at ``target_latency=0.5`` (batch 64; the latency benchmark's baselines,
scans and latency cache, ``--work``), the distinct plans of the latency benchmark's HMC candidates (tau 0,
0.5, inf times decompose_weight 1, 10, inf; tau inf with weight inf is prune-only's plan) are each

- probed exactly as ``choose_margin`` probes them, for ``--short`` steps in ``--orders`` batch orders
  (fine-tuning seeds) and for ``--long`` steps in the rule's own order;
- fine-tuned as the latency benchmark fine-tunes every method (1 epoch, then on to 5), test accuracy.

It reports the spread of each plan's short-probe KL over the batch orders, and the Spearman correlation
of the mean short-probe KL and of the long-probe KL with the 5-epoch accuracy (a good probe: strongly
negative). Writes ``probe_length.json`` and ``probe_length.md``.

    .venv/bin/python recipes/benchmarks/probe_length.py --out recipes/benchmarks/results --work runs/latency_budget
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (recipes/benchmarks is not a package)
import latency_budget  # noqa: E402
from scan_cost import spearman  # noqa: E402

from hmc_plugin.apply import apply_plan, plan_for_latency  # noqa: E402
from hmc_plugin.data import calibration_batch, make_loaders, train_permutation, without_train_images  # noqa: E402
from hmc_plugin.report import markdown_table  # noqa: E402
from hmc_plugin.training import evaluate_accuracy, output_log_probs, per_input_kl  # noqa: E402
from hmc_plugin.workflow import sgd_finetune  # noqa: E402

MARGINS = (0.0, 0.5, math.inf)
WEIGHTS = (1.0, 10.0, math.inf)
HELD_OUT = 256  # choose_margin's default


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/bench/probe_length')
    parser.add_argument('--work', default='runs/latency_budget', help="the latency benchmark's cache folder")
    parser.add_argument('--seeds', default='1,2')
    parser.add_argument('--short', type=int, default=20, help='steps of the short probe')
    parser.add_argument('--long', type=int, default=60, help='steps of the long probe')
    parser.add_argument('--orders', type=int, default=3, help='batch orders of the short probe')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--quiet', action='store_true')
    args = parser.parse_args(argv)
    args.seeds = [int(seed) for seed in args.seeds.split(',')]
    return args


def plan_rows(subject: latency_budget.Subject, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per distinct plan of the candidates at target_latency=0.5: its probes and fine-tuned accuracy."""
    settings = common.replace(subject.settings, target_latency=0.5, target_flops=None, target_params=None)
    images, _ = calibration_batch(subject.splits, settings.calibration_size + HELD_OUT, seed=settings.seed)
    held_out = images[settings.calibration_size:]
    probe_splits = without_train_images(subject.splits, train_permutation(subject.splits, settings.seed)[
        settings.calibration_size:settings.calibration_size + HELD_OUT])
    reference = output_log_probs(subject.model, [held_out])
    _, test_loader = make_loaders(subject.splits, settings.batch_size, seed=settings.seed)
    distinct: dict[str, dict[str, Any]] = {}
    for weight in WEIGHTS:
        for margin in MARGINS:
            plan, _ = plan_for_latency(subject.table, subject.model, subject.dummy_input, subject.groups,
                                       target_latency=0.5, batch=subject.batch, threads=args.threads,
                                       latency_cache=settings.latency_cache, mode='hmc', margin=margin,
                                       decompose_weight=weight, importance=settings.importance)
            key = json.dumps([plan.prune_ratios, {name: list(ranks) for name, ranks in plan.ranks.items()}],
                             sort_keys=True)
            row = distinct.setdefault(key, {'seed': settings.seed, 'candidates': [], 'plan': plan})
            row['candidates'].append([common._json_float(margin), common._json_float(weight)])

    def probe(plan, steps: int, order_seed: int) -> float:
        compressed = apply_plan(copy.deepcopy(subject.model), plan, subject.dummy_input, speedup='torch_pruning')
        sgd_finetune(compressed, probe_splits, common.replace(settings, seed=order_seed), max_steps=steps)
        return float(per_input_kl(reference, compressed, [held_out]).mean())

    rows = []
    for row in distinct.values():
        plan = row.pop('plan')
        row.update(latency_kept=plan.measured['latency'], flops_kept=plan.measured['flops'],
                   decomposed=len(plan.ranks), groups=plan.group_counts())
        # order 0 is the rule's own (the settings' seed); the others shift the batch order only
        row['kl_short'] = [probe(plan, args.short, settings.seed + 1000 * order) for order in range(args.orders)]
        row['kl_long'] = probe(plan, args.long, settings.seed)
        compressed = apply_plan(copy.deepcopy(subject.model), plan, subject.dummy_input, speedup='torch_pruning')
        common.finetune(compressed, subject.splits, settings)
        row['acc_1_epoch'] = evaluate_accuracy(compressed, test_loader)
        common.finetune(compressed, subject.splits, common.replace(settings, finetune_epochs=4))
        row['acc_5_epochs'] = evaluate_accuracy(compressed, test_loader)
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = common.Progress(args.quiet)
    common.configure(args.threads)
    work = Path(args.work)
    benchmark_args = latency_budget.parse_args(['--work', str(work), '--threads', str(args.threads)])
    rows = []
    for seed in args.seeds:
        subject = latency_budget.digits_subject('resnet56', seed, benchmark_args, work, progress)
        seed_rows = plan_rows(subject, args)
        for row in seed_rows:
            progress(f'seed {seed} {row["candidates"]}: {row["decomposed"]} decomposed, KL after {args.short} steps '
                     + '/'.join(f'{kl:.2f}' for kl in row['kl_short'])
                     + f', after {args.long} {row["kl_long"]:.3f}; accuracy {row["acc_5_epochs"]:.3f} after 5 epochs')
        rows += seed_rows
    accuracy = [row['acc_5_epochs'] for row in rows]
    correlation = {'short_mean': spearman([sum(row['kl_short']) / len(row['kl_short']) for row in rows], accuracy),
                   'long': spearman([row['kl_long'] for row in rows], accuracy)}
    settings = {'model': 'resnet56', 'target_latency': 0.5, 'batch': benchmark_args.batch, 'seeds': args.seeds,
                'short': args.short, 'long': args.long, 'orders': args.orders, 'held_out': HELD_OUT,
                'margins': [common._json_float(m) for m in MARGINS], 'weights': [common._json_float(w) for w in WEIGHTS],
                'finetune_lr': common.FINETUNE_LR, 'quick': False}
    return {**common.header('probe_length', settings), 'wall_seconds': progress.elapsed, 'rows': rows,
            'spearman_with_accuracy': correlation}


def render_markdown(report: dict) -> str:
    """``probe_length.md``: a pure function of ``probe_length.json``."""
    settings = report['settings']
    short, long = settings['short'], settings['long']
    header = ['seed', 'candidates (τ, w)', 'decomposed layers', 'latency kept', 'FLOPs kept',
              f'KL after {short} steps ({settings["orders"]} batch orders)', f'KL after {long} steps',
              'acc after 1 epoch', 'acc after 5 epochs']
    rows = [[str(row['seed']), ' '.join(f'({latency_budget._tau(m)}, {latency_budget._tau(w)})'
                                        for m, w in row['candidates']),
             str(row['decomposed']), f'{row["latency_kept"]:.3f}', f'{row["flops_kept"]:.3f}',
             ' / '.join(f'{kl:.2f}' for kl in row['kl_short']), f'{row["kl_long"]:.3f}',
             f'{row["acc_1_epoch"]:.3f}', f'{row["acc_5_epochs"]:.3f}'] for row in report['rows']]
    correlation = report['spearman_with_accuracy']
    return '\n'.join([
        '# Probe length', '',
        f'Created {report["created"]} on {report["machine"]}; {report["wall_seconds"] / 60:.1f} min.', '',
        f'ResNet-56 on digits at target_latency={settings["target_latency"]:g} (batch {settings["batch"]}): each '
        f'distinct plan of HMC\'s candidates (τ in {", ".join(map(latency_budget._tau, settings["margins"]))} times '
        f'w in {", ".join(map(latency_budget._tau, settings["weights"]))}; (∞, ∞) is prune-only\'s plan) probed as '
        f'choose_margin probes it (SGD at lr {settings["finetune_lr"]} on the train split without '
        f'{settings["held_out"]} held-out images, KL in nats from the original on those), then fine-tuned 1 and 5 '
        f'epochs; accuracy on the test split.', '',
        markdown_table(header, rows), '',
        f'Spearman correlation with the accuracy after 5 epochs, over the {len(report["rows"])} plans: mean KL after '
        f'{short} steps {correlation["short_mean"]:+.2f}, KL after {long} steps {correlation["long"]:+.2f} '
        f'(a good probe: strongly negative).', '',
        'Produced by:', '', '```bash', report['command'], '```', ''])


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    common.write_suite(Path(args.out), report, render_markdown(report), quiet=args.quiet)


if __name__ == '__main__':
    main()
