"""Fisher proxy speed: the data-aware proxy scan with weight-gradient pricing against one output change per unit.

Runs ``scan_sensitivity(mode='proxy', data=...)`` twice in this process on the same model and calibration batch:
with ``sensitivity.fisher._weight_grad_scores`` (the default: one per-sample weight gradient prices every unit and
level of a layer) and with it switched off (one convolution per unit and level, the path before), in the order
given by ``--order``, and prints each scan's seconds, the Fisher pass's seconds, the ratio and the largest relative
difference of a drop above 1e-9 nats. torchvision ResNet-50 (1000 classes, seeded random weights) on seeded
random 224x224 images, as ``pipeline_cost.py`` scans it.

    .venv/bin/python recipes/benchmarks/fisher_speed.py --images 64 --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch

from hmc_plugin.app.models import build_model
from hmc_plugin.apply import DataFit
from hmc_plugin.engines.lowrank import decomposable
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.sensitivity import fisher
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.utils.timing import steady_allocator


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='torchvision:resnet50')
    parser.add_argument('--images', type=int, default=64, help='calibration images (224x224)')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--memory-budget', type=int, default=None, help='MiB (default: the automatic budget)')
    parser.add_argument('--order', default='new,old', help="which path runs first: 'new,old' or 'old,new'")
    return parser.parse_args(argv)


def timed_scan(model, dummy, groups, layers, calibration, budget, weight_gradients: bool) -> tuple[object, float, float]:
    """(table, scan seconds, Fisher pass seconds) with the weight-gradient path on or off."""
    original_path, original_drops = fisher._weight_grad_scores, fisher.fisher_drops
    fisher_seconds = [0.0]

    def timed_drops(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original_drops(*args, **kwargs)
        finally:
            fisher_seconds[0] += time.perf_counter() - started

    if not weight_gradients:
        fisher._weight_grad_scores = lambda *args, **kwargs: None
    import hmc_plugin.sensitivity.scan as scan_module
    scan_module.fisher_drops = timed_drops
    try:
        started = time.perf_counter()
        table = scan_sensitivity(model, dummy, groups=groups, layers=layers, mode='proxy',
                                 calibration_inputs=calibration, progress=False,
                                 data=DataFit(batches=(calibration,), bn_batches=(calibration,)), memory_budget=budget)
        return table, time.perf_counter() - started, fisher_seconds[0]
    finally:
        fisher._weight_grad_scores = original_path
        scan_module.fisher_drops = original_drops


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    steady_allocator()
    torch.manual_seed(0)
    model = build_model(args.model, 1000, 3).eval()
    calibration = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    dummy = torch.zeros(1, 3, 224, 224)
    groups = find_pruning_groups(model, dummy)
    layers = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Conv2d) and decomposable(module, name)]
    results = {}
    for path in args.order.split(','):
        results[path] = timed_scan(model, dummy, groups, layers, calibration, args.memory_budget, path == 'new')
        print(f'{path}: scan {results[path][1]:.1f} s, Fisher pass {results[path][2]:.1f} s', flush=True)
    (new, new_s, new_f), (old, old_s, old_f) = results['new'], results['old']
    worst = max(abs(a - b) / abs(b) for kind in ('prune', 'decompose') for name, drops in getattr(old, kind).items()
                for a, b in zip(getattr(new, kind)[name], drops) if abs(b) > 1e-9)
    print(f'{args.model}, {args.images} images, {args.threads} thread(s), {len(groups)} groups, {len(layers)} layers: '
          f'scan {old_s:.1f} s -> {new_s:.1f} s ({old_s / new_s:.2f}x), Fisher pass {old_f:.1f} s -> {new_f:.1f} s '
          f'({old_f / new_f:.2f}x); largest relative difference of a drop above 1e-9 nats {worst:.2e}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
