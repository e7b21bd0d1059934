"""Baseline training with and without the learning-rate warm-up, on digits and on a harder generated ImageFolder.

For each data set and each ``warmup_epochs`` (0: the cosine schedule alone; 1: one epoch of linear warm-up
first, the default), ResNet-56 is trained as the ``hmc`` command trains its baseline
(``app.workflow.train_or_load_baseline``: SGD, Nesterov, weight decay 5e-4, peak lr 0.1, 15 epochs,
seed 0) and its test accuracy measured; the hard set is trained once more with the warm-up at half the
rate (the remedy the chance-level error names).

- ``digits``: the embedded data (scikit-learn's digits upsampled to 3x32x32).
- ``hard``: a generated ImageFolder of 32x32 colour PNGs: every digit of scikit-learn's set drawn three
  times with a random rotation (±25°), scale (0.8-1.2), shift (±4 px), colours of ink and background and
  Gaussian noise; train/ and val/ follow digits' stratified split, so no test image comes from a train digit.
  Loaded through the real ``imagefolder:DIR`` loader.

Cells are cached in ``WORK/cells.json`` (a rerun resumes) and the baselines in ``WORK/<data>/warmup<w>``.

    .venv/bin/python recipes/benchmarks/baseline_warmup.py --out recipes/benchmarks/results --work runs/warmup
    .venv/bin/python recipes/benchmarks/baseline_warmup.py --out /tmp/warmup --work /tmp/warmup_work --quick
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (recipes/benchmarks is not a package)

from hmc_plugin.app.data import make_loaders, parse_data_spec, subset_splits  # noqa: E402
from hmc_plugin.app.models import build_model  # noqa: E402
from hmc_plugin.app.report import markdown_table  # noqa: E402
from hmc_plugin.app.run_settings import RunSettings  # noqa: E402
from hmc_plugin.app.training import evaluate_accuracy  # noqa: E402
from hmc_plugin.app.workflow import train_or_load_baseline  # noqa: E402

WARMUPS = (0.0, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, help='folder for baseline_warmup.json and baseline_warmup.md')
    parser.add_argument('--work', required=True, help='folder for the generated images, baselines and cells')
    parser.add_argument('--model', default='resnet56')
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--lr', type=float, default=0.1)
    parser.add_argument('--copies', type=int, default=3, help='drawings of each digit in the hard set')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--quick', action='store_true', help='harness check: ResNet-20, 2 epochs, 1 copy, 300 digits')
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.epochs, args.copies = 'resnet20', 2, 1
    return args


def write_hard_digits(root: Path, copies: int, limit: int | None = None, seed: int = 0) -> Path:
    """The ``hard`` ImageFolder (see the module docstring) under ``root``; written once (``root/done`` marks it)."""
    if (root / 'done').exists():
        return root
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))[:limit]
    train, _ = train_test_split(indices, test_size=0.2, stratify=digits.target[indices], random_state=seed)
    train = set(train.tolist())
    rng = np.random.default_rng(seed)
    for index in indices:
        split = 'train' if index in train else 'val'
        folder = root / split / f'digit_{digits.target[index]}'
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(copies):
            Image.fromarray(_drawn(digits.images[index] / 16.0, rng)).save(folder / f'{index}_{copy}.png')
    (root / 'done').write_text('')
    return root


def _drawn(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 digit in [0, 1] drawn as a 32x32 RGB uint8 image: rotated, scaled, shifted, coloured, noisy."""
    angle, scale = math.radians(rng.uniform(-25, 25)), rng.uniform(0.8, 1.2)
    shift = rng.uniform(-4, 4, size=2)
    ys, xs = np.mgrid[0:32, 0:32].astype(np.float64)
    centred = np.stack([ys - 15.5 - shift[0], xs - 15.5 - shift[1]])
    cos, sin = math.cos(angle), math.sin(angle)
    source_y = (cos * centred[0] + sin * centred[1]) / (4 * scale) + 3.5
    source_x = (-sin * centred[0] + cos * centred[1]) / (4 * scale) + 3.5
    inside = (source_y >= 0) & (source_y <= 7) & (source_x >= 0) & (source_x <= 7)
    ink = np.where(inside, digit[np.clip(np.rint(source_y), 0, 7).astype(int),
                                 np.clip(np.rint(source_x), 0, 7).astype(int)], 0.0)
    background, colour = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
    image = background + ink[..., None] * (colour - background) + rng.normal(0, 0.15, size=(32, 32, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def run_cell(data: str, warmup: float, lr: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    settings = RunSettings(model=args.model, data=data, image_size=32, train_epochs=args.epochs, train_lr=lr,
                           warmup_epochs=warmup, seed=0, threads=args.threads, allow_chance_baseline=True)
    splits = parse_data_spec(data, 32)
    if args.quick:
        splits = subset_splits(splits, 300, 180, seed=0)
    torch.manual_seed(settings.seed)  # the initial weights, as the hmc command draws them
    model = build_model(settings.model, splits.num_classes, splits.in_channels)
    started = time.perf_counter()
    name = 'digits' if data == 'digits' else 'hard'
    model = train_or_load_baseline(model, splits, settings, work / name / f'warmup{warmup:g}_lr{lr:g}',
                                   progress=False)
    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    return {'data': name, 'warmup_epochs': warmup, 'train_images': len(splits.train), 'test_images': len(splits.test),
            'accuracy': evaluate_accuracy(model, test_loader), 'seconds': time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.configure(args.threads)
    progress = common.Progress()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    hard = write_hard_digits(work / 'hard_digits', args.copies, limit=300 if args.quick else None)
    grid = [(data, warmup, args.lr) for data in ('digits', f'imagefolder:{hard}') for warmup in WARMUPS]
    cells = []
    for data, warmup, lr in grid + [(f'imagefolder:{hard}', 1.0, args.lr / 2)]:
        progress(f'{data.split(":")[0]}, warm-up {warmup:g} epoch(s), lr {lr:g}: {args.model}, {args.epochs} epochs')
        key = {'data': data.split(':')[0], 'warmup': warmup, 'model': args.model, 'epochs': args.epochs,
               'lr': lr, 'copies': args.copies, 'quick': args.quick}
        measured = common.cached_cell(work / 'cells.json', key, lambda: run_cell(data, warmup, lr, args, work))
        cells.append({**measured, 'lr': lr})
    settings = {'model': args.model, 'epochs': args.epochs, 'lr': args.lr, 'copies': args.copies, 'quick': args.quick,
                'warmups': list(WARMUPS)}
    report = {**common.header('baseline_warmup', settings), 'wall_seconds': progress.elapsed, 'cells': cells}
    common.write_suite(out, report, render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    settings = report['settings']
    rows = [[cell['data'], f"{cell['train_images']:,} / {cell['test_images']:,}", f"{cell['warmup_epochs']:g}",
             f"{cell['lr']:g}", f"{cell['accuracy']:.4f}", f"{cell['seconds']:.0f}"] for cell in report['cells']]
    return '\n'.join([f'# Baseline warm-up ({"quick" if settings["quick"] else "full"})', '',
                      f"{settings['model']}, {settings['epochs']} epochs, seed 0; "
                      f"`{report['command']}` ({report['machine']}, commit {report['commit']}).", '',
                      markdown_table(['data', 'train / test images', 'warm-up epochs', 'peak lr', 'test accuracy',
                                      'seconds'],
                                     rows), ''])


if __name__ == '__main__':
    sys.exit(main())
