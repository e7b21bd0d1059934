"""Real speed benchmark: CPU latency of each compressed model against the original, next to its FLOPs reduction.

For CIFAR ResNet-56 on digits (the quality suite's seed-0 baseline and scan when ``--work`` points at them)
and each FLOPs target and method, the compressed model and the original run interleaved in one process
(``hmc_plugin.utils.timing.measure_latency_side_by_side``: fixed threads, warm-up, median of repeats) at
batch 1 and batch 64. The table gives ratios only: speed-up = original latency / compressed latency,
FLOPs reduction = original FLOPs / compressed FLOPs, and their ratio (1.0: time falls as fast as FLOPs).

Writes ``real_speed.json`` (with the absolute medians) and ``real_speed.md``.

    .venv/bin/python recipes/benchmarks/real_speed.py --out runs/bench/real_speed --work runs/bench/quality/resnet56/seed0
    .venv/bin/python recipes/benchmarks/real_speed.py --out /tmp/real_speed --quick
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

from hmc_plugin.app.report import flops_kept, markdown_table, size_fields  # noqa: E402
from hmc_plugin.utils.timing import measure_latency_side_by_side  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/bench/real_speed')
    parser.add_argument('--work', help='folder with the cached baseline and scan (default: OUT/work); the quality '
                                       "suite's MODEL/seed0 folder is reused when its settings match")
    parser.add_argument('--quick', action='store_true', help='ResNet-20, 1 training epoch, few repeats: checks the harness')
    parser.add_argument('--model', default='resnet56')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--targets', default='0.5,0.25')
    parser.add_argument('--methods', default=','.join(common.METHODS))
    parser.add_argument('--train-epochs', type=int, default=common.TRAIN_EPOCHS)
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1: see recipes/benchmarks/README.md)')
    parser.add_argument('--batches', default='1,64', help='batch sizes to time')
    parser.add_argument('--repeats', type=int, default=31, help='timed runs per model at batch 1 (median)')
    parser.add_argument('--repeats-batched', type=int, default=11, help='timed runs per model at larger batches')
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--quiet', action='store_true')
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.targets, args.train_epochs, args.repeats, args.repeats_batched, args.warmup = \
            'resnet20', '0.5', 1, 3, 3, 1
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = common.Progress(args.quiet)
    common.configure(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / 'work'
    settings = common.settings_for(args.model, args.seed, train_epochs=args.train_epochs, threads=args.threads)
    model, splits, table = common.prepare(settings, work, progress)
    size = (splits.in_channels, splits.image_size, splits.image_size)
    dummy_input = torch.zeros(1, *size)
    batches = [int(batch) for batch in args.batches.split(',')]
    generator = torch.Generator().manual_seed(0)
    inputs = {batch: torch.randn(batch, *size, generator=generator) for batch in batches}
    rows = []
    for target in [float(target) for target in args.targets.split(',')]:
        for method in args.methods.split(','):
            compressed, info = common.compress(model, splits, common.replace(settings, target_flops=target), method, table,
                                               margin_candidates=(0.5, math.inf) if args.quick else common.MARGIN_CANDIDATES)
            row = {'model': args.model, 'target': target, 'method': method,
                   **size_fields(model, compressed, dummy_input), 'params_kept': info['params_kept']}
            row['flops_reduction'] = 1 / flops_kept(row)
            for batch in batches:
                repeats = args.repeats if batch == 1 else args.repeats_batched
                before, after = measure_latency_side_by_side([model, compressed], inputs[batch], num_threads=args.threads,
                                                             warmup=args.warmup, repeats=repeats)
                row[f'latency_ms_before_b{batch}'] = before
                row[f'latency_ms_after_b{batch}'] = after
                row[f'speedup_b{batch}'] = before / after
                row[f'speedup_per_flops_reduction_b{batch}'] = (before / after) / row['flops_reduction']
            rows.append(row)
            progress(f'target {target:g} {method}: FLOPs reduction {row["flops_reduction"]:.2f}x, '
                     + ', '.join(f'b{batch} speed-up {row[f"speedup_b{batch}"]:.2f}x' for batch in batches))
    settings_out = {'model': args.model, 'seed': args.seed, 'targets': [float(t) for t in args.targets.split(',')],
                    'methods': args.methods.split(','), 'batches': batches, 'repeats': args.repeats,
                    'repeats_batched': args.repeats_batched,
                    'warmup': args.warmup, 'train_epochs': args.train_epochs, 'quick': args.quick}
    return {**common.header('real_speed', settings_out), 'wall_seconds': progress.elapsed, 'rows': rows}


def render_markdown(report: dict) -> str:
    """``real_speed.md``: a pure function of ``real_speed.json``."""
    settings = report['settings']
    batches = settings['batches']
    header = ['target', 'method', 'FLOPs reduction', 'params kept']
    header += [f'speed-up b{batch}' for batch in batches]
    header += [f'speed-up / FLOPs reduction b{batch}' for batch in batches]
    rows = []
    for row in report['rows']:
        rows.append([f'{row["target"]:g}', common.METHOD_LABELS[row['method']], f'{row["flops_reduction"]:.2f}x',
                     f'{row["params_kept"]:.3f}']
                    + [f'{row[f"speedup_b{batch}"]:.2f}x' for batch in batches]
                    + [f'{row[f"speedup_per_flops_reduction_b{batch}"]:.2f}' for batch in batches])
    model = common.MODEL_LABELS.get(settings['model'], settings['model'])
    return '\n'.join([
        f'# Real CPU speed ({"quick" if settings["quick"] else "full"}): {model}', '',
        f'Created {report["created"]} on {report["machine"]}, {report["threads"]} threads; '
        f'{report["wall_seconds"] / 60:.1f} min. Original and compressed model timed interleaved in one process '
        f'(median of {settings["repeats"]} runs at batch 1, {settings["repeats_batched"]} at larger batches, after '
        f'{settings["warmup"]} warm-up runs, batches of random '
        f'3x32x32 inputs); ratios only, since absolute times drift with the machine\'s load '
        f'(the medians are in real_speed.json).', '',
        markdown_table(header, rows), '',
        'Produced by:', '', '```bash', report['command'], '```', ''])


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    common.write_suite(Path(args.out), report, render_markdown(report))


if __name__ == '__main__':
    main()
