"""Where the data-aware proxy scan's time goes: one scan under cProfile, its phases' seconds.

Runs ``scan_sensitivity(mode='proxy', data=...)`` once on torchvision ResNet-50 (1000 classes, seeded random
weights) with seeded random 224x224 calibration images, as ``fisher_speed.py`` and ``pipeline_cost.py`` scan it,
under ``cProfile``, and prints the scan's seconds and the cumulative seconds of its phases: the Fisher pass
(``fisher_drops``) and its backward passes and weight-gradient pricing, the input moments (``collect_moments``),
the low-rank weights (``_decompose_changes``), the refitted consumers (``_prune_weight_changes``, which includes
the moment passes it starts). Run it on two checkouts (``PYTHONPATH=CHECKOUT``) to compare a change side by side;
the profiler's own overhead is a few seconds. ``--top N`` also prints the N functions of highest cumulative time.

    .venv/bin/python recipes/benchmarks/scan_profile.py --images 64 --threads 1
    .venv/bin/python recipes/benchmarks/scan_profile.py --model resnet56 --classes 10 --image-size 32 --data-free
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from hmc_plugin.app.models import build_model
from hmc_plugin.apply import DataFit
from hmc_plugin.engines.lowrank import decomposable
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.utils.timing import steady_allocator

# (label, file name ending, function name) of the phases reported
PHASES = [
    ('Fisher pass', 'fisher.py', 'fisher_drops'),
    ('  backward passes', 'graph.py', '_engine_run_backward'),
    ('  weight-gradient pricing', 'fisher.py', '_weight_grad_scores'),
    ('input moments', 'moments.py', 'collect_moments'),
    ('low-rank weights', 'scan.py', '_decompose_changes'),
    ('refitted consumers (with their moment passes)', 'scan.py', '_prune_weight_changes'),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='torchvision:resnet50')
    parser.add_argument('--images', type=int, default=64, help='calibration images')
    parser.add_argument('--image-size', type=int, default=224, help='pixels a side (32 for the CIFAR ResNets)')
    parser.add_argument('--classes', type=int, default=1000)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--data-free', action='store_true', help='scan without the data-aware fits')
    parser.add_argument('--top', type=int, default=0, help='also print the N functions of highest cumulative time')
    return parser.parse_args(argv)


def phase_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each of ``PHASES`` (0 where it did not run)."""
    seconds = {}
    for label, filename, function in PHASES:
        seconds[label] = sum(row[3] for (path, _, name), row in stats.stats.items()
                             if name == function and path.endswith(filename))
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    steady_allocator()
    torch.manual_seed(0)
    model = build_model(args.model, args.classes, 3).eval()
    size = args.image_size
    calibration = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    dummy = torch.zeros(1, 3, size, size)
    groups = find_pruning_groups(model, dummy)
    layers = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Conv2d) and decomposable(module, name)]
    data = None if args.data_free else DataFit(batches=(calibration,), bn_batches=(calibration,))
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    scan_sensitivity(model, dummy, groups=groups, layers=layers, mode='proxy', calibration_inputs=calibration,
                     progress=False, data=data)
    profiler.disable()
    total = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    print(f'{args.model}, {args.images} images of {size}x{size}, {args.threads} thread(s), '
          f'{"data-free" if args.data_free else "data-aware"} proxy scan: {total:.1f} s')
    for label, seconds in phase_seconds(stats).items():
        print(f'  {label}: {seconds:.1f} s')
    if args.top:
        stats.sort_stats('cumulative').print_stats(args.top)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
