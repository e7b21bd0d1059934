"""Zero-shot benchmark: accuracy and output KL before any fine-tuning, data-free against data-aware compression.

For each model (CIFAR ResNet-20 and ResNet-56 on the embedded digits data) and seed, the baseline is trained
once (the quality suite's settings), then every method is compressed at each FLOPs target in three variants:

- ``data_free``: as before this change: data-free factors, pruned consumers left as they are, the original
  BatchNorm statistics, and a data-free proxy scan;
- ``bn``: the same, then every BatchNorm re-estimated on 8 batches of 64 training images (``bn_batches=8``);
- ``data_aware``: the defaults: the scan, the reconstruction of pruned consumers and the low-rank factors all
  fitted to 4 calibration batches (``fit_batches=4``, sequential), then the BatchNorm recalibration.

Methods: prune-only, decompose-only, AHC, NaHC (HMCCompressor on the variant's proxy scan) and NNI's
L1NormPruner + ModelSpeedup (``nni_l1``), which gets the same BatchNorm recalibration in ``bn`` and
``data_aware`` and the same reconstruction of its pruned consumers in ``data_aware``. Nothing is fine-tuned.
Baselines, scans and cells are cached under ``--out``: a rerun resumes.

    .venv/bin/python recipes/benchmarks/zero_shot.py --out runs/bench/zero_shot            # full
    .venv/bin/python recipes/benchmarks/zero_shot.py --out /tmp/zero_shot --quick          # harness check
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (recipes/benchmarks is not a package)

from hmc_plugin.app.baselines import nni_l1_prune  # noqa: E402
from hmc_plugin.app.data import make_loaders  # noqa: E402
from hmc_plugin.app.report import markdown_table  # noqa: E402
from hmc_plugin.app.training import evaluate_accuracy  # noqa: E402
from hmc_plugin.app.workflow import calibration_batches, make_compressor, scan  # noqa: E402
from hmc_plugin.engines.batchnorm import recalibrate_bn  # noqa: E402
from hmc_plugin.engines.datafit import fit_to_data  # noqa: E402
from hmc_plugin.errors import HMCConfigError  # noqa: E402
from hmc_plugin.utils.counting import count_flops  # noqa: E402
from hmc_plugin.utils.fingerprint import model_fingerprint  # noqa: E402
from hmc_plugin.utils.kl import output_kl, output_log_probs  # noqa: E402

METHODS = ('prune', 'decompose', 'ahc', 'nahc', 'nni_l1')
VARIANTS = {'data_free': dict(bn_batches=0, data_aware=False, reconstruct=False),
            'bn': dict(bn_batches=8, data_aware=False, reconstruct=False),
            'data_aware': dict(bn_batches=8, data_aware=True, reconstruct=True)}
VARIANT_LABELS = {'data_free': 'as before', 'bn': '+ BN recalibration', 'data_aware': '+ BN, data-aware operators'}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/bench/zero_shot')
    parser.add_argument('--quick', action='store_true', help='ResNet-20, one seed, target 0.5, 1 training epoch')
    parser.add_argument('--models', default='resnet20,resnet56')
    parser.add_argument('--seeds', default='0,1,2')
    parser.add_argument('--targets', default='0.5,0.25')
    parser.add_argument('--methods', default=','.join(METHODS))
    parser.add_argument('--variants', default=','.join(VARIANTS))
    parser.add_argument('--train-epochs', type=int, default=common.TRAIN_EPOCHS)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--quiet', action='store_true')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.targets, args.train_epochs = 'resnet20', '0', '0.5', 1
    return args


def nni_l1_cell(model, splits, settings, dummy_input) -> torch.nn.Module:
    """NNI's L1NormPruner + ModelSpeedup at the target, then the variant's BN recalibration and reconstruction."""
    compressed, info = nni_l1_prune(model, dummy_input, target_flops=settings.target_flops, speedup='torch_pruning')
    batches = calibration_batches(splits, settings)
    if settings.reconstruct:
        fit_to_data(model, compressed, batches[:settings.fit_batches], masks=info['masks'], reconstruct=True,
                    data_aware=False)
    if settings.bn_batches:
        recalibrate_bn(compressed, batches[:settings.bn_batches])
    return compressed


def run_cell(model, splits, settings, method, table, reference_log_probs) -> dict[str, Any]:
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    try:
        if method == 'nni_l1':
            compressed = nni_l1_cell(model, splits, settings, dummy_input)
        else:
            compressed, _ = make_compressor(model, splits, settings, method, table=table, progress=False).compress()
    except HMCConfigError as error:
        return {'unreachable': str(error)}
    compressed.eval()
    return {'acc': evaluate_accuracy(compressed, test_loader),
            'kl': output_kl(reference_log_probs, compressed, test_loader),
            'flops_kept': count_flops(compressed, dummy_input) / count_flops(model, dummy_input)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = common.Progress(args.quiet)
    common.configure(args.threads)
    out = Path(args.out)
    models, seeds = args.models.split(','), [int(seed) for seed in args.seeds.split(',')]
    targets = [float(target) for target in args.targets.split(',')]
    methods, variants = args.methods.split(','), args.variants.split(',')
    cells, baselines = [], []
    for model_name in models:
        for seed in seeds:
            base = common.replace(common.settings_for(model_name, seed, train_epochs=args.train_epochs,
                                                      threads=args.threads), speedup='torch_pruning')
            work = out / model_name / f'seed{seed}'
            model, splits = common.prepare_baseline(base, work, progress)
            _, test_loader = make_loaders(splits, base.batch_size, seed=seed)
            reference_log_probs = output_log_probs(model, test_loader)
            baselines.append({'model': model_name, 'seed': seed, 'acc': evaluate_accuracy(model, test_loader)})
            for variant in variants:
                settings = common.replace(base, **VARIANTS[variant])
                progress(f'{model_name} seed {seed} {variant}: proxy scan')
                table = scan(copy.deepcopy(model), splits, settings, work / f'scan_{variant}', progress=False)
                for target in targets:
                    cell_settings = common.replace(settings, target_flops=target)
                    for method in methods:
                        key = {'settings': common.settings_dict(cell_settings), 'baseline': model_fingerprint(model),
                               'scan': common.table_fingerprint(table), 'method': method}
                        cell = common.cached_cell(work / 'cells' / f'{variant}_{target:g}_{method}.json', key,
                                                  lambda: run_cell(model, splits, cell_settings, method, table,
                                                                   reference_log_probs))
                        cell = {'model': model_name, 'seed': seed, 'variant': variant, 'target': target,
                                'method': method, **cell}
                        cells.append(cell)
                        progress(f'{model_name} seed {seed} {variant} target {target:g} {method}: ' +
                                 ('unreachable' if 'unreachable' in cell else
                                  f"acc {cell['acc']:.3f}, KL {cell['kl']:.3g}, FLOPs kept {cell['flops_kept']:.3f}"))
    settings_out = {'models': models, 'seeds': seeds, 'targets': targets, 'methods': methods, 'variants': variants,
                    'data': 'digits', 'train_epochs': args.train_epochs, 'sensitivity': 'proxy', 'quick': args.quick,
                    'variant_settings': {variant: VARIANTS[variant] for variant in variants}}
    report = {**common.header('zero_shot', settings_out), 'wall_seconds': progress.elapsed,
              'baselines': baselines, 'cells': cells}
    report['summary'] = summarise(cells)
    return report


def summarise(cells: list[dict]) -> list[dict[str, Any]]:
    """Mean and std over seeds of accuracy and KL per (model, target, method, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        if 'unreachable' not in cell:
            groups.setdefault((cell['model'], cell['target'], cell['method'], cell['variant']), []).append(cell)
    rows = []
    for (model, target, method, variant), members in groups.items():
        acc, acc_std = common.mean_std([cell['acc'] for cell in members])
        kl, kl_std = common.mean_std([cell['kl'] for cell in members])
        rows.append({'model': model, 'target': target, 'method': method, 'variant': variant, 'seeds': len(members),
                     'acc': acc, 'acc_std': acc_std, 'kl': kl, 'kl_std': kl_std,
                     'flops_kept': sum(cell['flops_kept'] for cell in members) / len(members)})
    return rows


def render_markdown(report: dict) -> str:
    settings = report['settings']
    lines = ['# Zero-shot accuracy: data-free against data-aware compression', '',
             f"Command: `{report['command']}` ({report['machine']}, commit {report.get('commit')}, "
             f"{report['wall_seconds'] / 60:.1f} min). Digits test split, no fine-tuning, mean ± std over seeds "
             f"{settings['seeds']}; accuracy, then KL(original || compressed) in nats per test image.", '']
    baselines = {}
    for baseline in report['baselines']:
        baselines.setdefault(baseline['model'], []).append(baseline['acc'])
    by_key = {(row['model'], row['target'], row['method'], row['variant']): row for row in report['summary']}
    for model in settings['models']:
        mean, std = common.mean_std(baselines[model])
        lines += [f"## {common.MODEL_LABELS.get(model, model)} (uncompressed {mean:.3f} ± {std:.3f})", '']
        for target in settings['targets']:
            header = ['method'] + [VARIANT_LABELS[variant] for variant in settings['variants']]
            body = []
            for method in settings['methods']:
                row = [common.METHOD_LABELS[method]]
                for variant in settings['variants']:
                    cell = by_key.get((model, target, method, variant))
                    row.append('unreachable' if cell is None else
                               f"{cell['acc']:.3f} ± {cell['acc_std']:.3f} (KL {cell['kl']:.2f})")
                body.append(row)
            lines += [f'Target: keep {target:g} of the FLOPs.', '', markdown_table(header, body), '']
    return '\n'.join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    common.write_suite(Path(args.out), report, render_markdown(report), quiet=args.quiet)


if __name__ == '__main__':
    main()
