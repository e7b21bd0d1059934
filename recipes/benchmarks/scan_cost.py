"""Sensitivity scan cost and proxy fidelity.

Scans CIFAR ResNet-56 trained on the embedded digits data in the three modes (evaluator: test accuracy;
kl: KL divergence on a 64-image calibration batch, the whole network once per unit and level; proxy:
the same KL estimated from one Fisher pass), prints wall time and number of evaluations of each, and
the Spearman rank correlation of each proxy's per-unit sensitivities (mean drop over the levels,
pruning groups and decomposed layers together) with the evaluator's. Optionally times a proxy scan of
torchvision ResNet-50 on a generated 64-image 224x224 calibration batch.

With ``--data-aware`` every mode measures what the data-aware defaults apply (``scan_sensitivity(data=...)``):
the reconstruction of pruned consumers and the low-rank factors fitted to 4 batches of 64 training images and,
in the kl and evaluator modes, every BatchNorm recalibrated on 8 batches before each measurement; tables are
cached as ``<mode>_data.json`` and the results written to ``scan_cost_data.json``.

    .venv/bin/python recipes/benchmarks/scan_cost.py --out runs/scan_cost [--resnet50 | --resnet50-only] [--quick]
    .venv/bin/python recipes/benchmarks/scan_cost.py --out runs/scan_cost --modes proxy,evaluator --data-aware
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hmc_plugin.app.data import calibration_batch, load_digits_data, make_loaders
from hmc_plugin.engines.datafit import DataFit
from hmc_plugin.app.models import build_model
from hmc_plugin.app.training import evaluate_accuracy
from hmc_plugin.app.workflow import RunSettings, train_or_load_baseline
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.utils.store import write_json_atomic


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


def unit_scores(table) -> dict[str, float]:
    scores = {f'prune:{name}': table.mean_drop('prune', name) for name in table.prune}
    scores.update({f'decompose:{name}': table.mean_drop('decompose', name) for name in table.decompose})
    return scores


def scan_model(model, dummy_input, mode, **kwargs):
    groups = find_pruning_groups(model, dummy_input)
    layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    started = time.perf_counter()
    table = scan_sensitivity(model, dummy_input, groups=groups, layers=layers, mode=mode, **kwargs)
    return table, time.perf_counter() - started


def resnet50_with_calibration(seed: int | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    """torchvision ResNet-50 (1000 classes, random weights; seeded with ``seed`` when given) in eval mode, and
    the 64 generated 224x224 calibration images of its proxy scan."""
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model('torchvision:resnet50', 1000, 3).eval()
    generator = torch.Generator().manual_seed(0)
    return model, torch.randn(64, 3, 224, 224, generator=generator)


def resnet50_proxy_scan() -> dict:
    """Proxy scan of torchvision ResNet-50 (1000 classes, random weights) on 64 generated 224x224 images."""
    model, images = resnet50_with_calibration()
    table, seconds = scan_model(model, torch.zeros(1, 3, 224, 224), 'proxy', calibration_inputs=images, progress=False)
    return {'seconds': seconds, 'evaluations': table.evaluations, 'calibration_images': 64,
            'units': len(table.prune) + len(table.decompose)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/scan_cost')
    parser.add_argument('--model', default='resnet56')
    parser.add_argument('--train-epochs', type=int, default=15)
    parser.add_argument('--resnet50', action='store_true', help='also time a proxy scan of torchvision ResNet-50')
    parser.add_argument('--modes', default='proxy,kl,evaluator', help='comma-separated sensitivity modes to scan')
    parser.add_argument('--threads', type=int, default=2, help='torch threads (default 2, this machine\'s cores)')
    parser.add_argument('--resnet50-only', action='store_true', help='only the ResNet-50 proxy scan')
    parser.add_argument('--quick', action='store_true', help='resnet20, 1 training epoch, 2 levels: checks the harness')
    parser.add_argument('--data-aware', action='store_true',
                        help='scan with the data-aware operators and BN recalibration (the defaults of a compression)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resnet50_only:
        results = {'resnet50_proxy': resnet50_proxy_scan()}
        print(write_json_atomic(out / 'scan_cost_resnet50.json', results))
        return
    model_name = 'resnet20' if args.quick else args.model
    levels = (0.3, 0.6) if args.quick else (0.2, 0.4, 0.6, 0.8)
    splits = load_digits_data()
    settings = RunSettings(model=model_name, train_epochs=1 if args.quick else args.train_epochs)
    model = train_or_load_baseline(build_model(model_name, 10, 3), splits, settings, out, progress=False)
    _, test_loader = make_loaders(splits)
    dummy_input = torch.zeros(1, 3, 32, 32)
    calibration, _ = calibration_batch(splits, 64)
    results = {'model': model_name, 'levels': list(levels), 'threads': torch.get_num_threads(),
               'data_aware': args.data_aware}
    suffix = '_data' if args.data_aware else ''
    data = None
    if args.data_aware:  # the defaults' batches: bn_batches=8, fit_batches=4 of 64 training images
        images, _ = calibration_batch(splits, 8 * 64)
        batches = tuple(images.split(64))
        data = DataFit(batches=batches[:4], bn_batches=batches)
    tables = {}
    modes = args.modes.split(',')
    if 'evaluator' not in modes:
        parser.error('--modes must include evaluator (the reference of the rank correlations)')
    for mode in modes:
        kwargs = ({'eval_fn': lambda m: evaluate_accuracy(m, test_loader)} if mode == 'evaluator'
                  else {'calibration_inputs': calibration})
        # Cached per mode in --out: a rerun with the same weights and settings reuses the table, and every
        # figure is the scan's own recorded time (table.seconds), not the time to read the cache.
        tables[mode], _ = scan_model(model, dummy_input, mode, levels=levels, progress=False,
                                     cache_path=out / f'{mode}{suffix}.json', data=data, **kwargs)
        results[mode] = {'seconds': tables[mode].seconds, 'evaluations': tables[mode].evaluations}
    evaluator_scores = unit_scores(tables['evaluator'])
    for mode in [mode for mode in modes if mode != 'evaluator']:
        scores = unit_scores(tables[mode])
        names = sorted(scores)
        for label, prefix in (('all_units', ''), ('prune_groups', 'prune:'), ('decomposed_layers', 'decompose:')):
            subset = [name for name in names if name.startswith(prefix)]
            results[mode][f'spearman_{label}'] = spearman([scores[n] for n in subset],
                                                          [evaluator_scores[n] for n in subset])
    if args.resnet50:
        results['resnet50_proxy'] = resnet50_proxy_scan()
    print(write_json_atomic(out / f'scan_cost{suffix}.json', results))


if __name__ == '__main__':
    main()
