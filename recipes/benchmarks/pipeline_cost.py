"""Pipeline cost benchmark: wall time and peak memory of scan, plan and apply.

Models: CIFAR ResNet-56 trained on digits (the quality suite's seed-0 baseline when ``--work`` points at
it) and torchvision ResNet-50 (1000 classes, random weights, seeded) on a generated 224x224 calibration batch.

Stages, each measured in a fresh Python process (so one stage's memory never counts against another), at
the package's default levels (0.2, 0.4, 0.6, 0.8):

- ``scan``: the sensitivity scan in each mode of ``hmc_plugin.settings.SENSITIVITIES``: ``proxy``
  (64 calibration images), ``kl`` (the whole-network KL on the same 64 images, when the installed
  hmc_plugin has it) and ``evaluator`` (ResNet-56: test accuracy on the 360 test images; ResNet-50:
  agreement with the original model's top-1 on 16 generated images). On ResNet-50 the ``kl`` and
  ``evaluator`` modes run one whole-network pass per unit and level, far too slow for a full scan on 2
  cores: they scan the first ``--subset`` pruning groups and layers, and the table gives the measured
  seconds per evaluation and the projection to the full scan, marked as projected.
  ``proxy+data`` is the data-aware proxy scan (``scan_sensitivity(data=...)``: low-rank weights fitted to
  each layer's inputs, pruned consumers refitted, both on the 64 calibration images).
- ``plan``: NaHC plan at target_flops 0.5 from the proxy table (``planning.targets.plan_for_target``: grouping,
  allocation, measured correction rounds).
- ``apply``: that plan's masks, the shrinking step by NNI's ``ModelSpeedup`` or by torch-pruning's
  physical pruning, then the low-rank replacement; the shrinking step is also timed alone.
  ``torch_pruning+data`` is the data-aware apply (``apply_plan(data=...)``): torch-pruning's shrink, the
  sequential refit of the pruned consumers and data-aware factors on the 64 calibration images, and the
  BatchNorm recalibration on them.

Memory: the peak resident set size (RSS) of the process, and the stage's peak RSS above the RSS just
before it (``ru_maxrss`` when the stage set the process peak, else a 2 ms psutil sampler). Setup (imports,
model, data, torch-pruning groups) is not timed. Ratios (each scan against the proxy scan, NNI's speedup
against torch-pruning's) are the robust figures on a shared machine.

Writes ``pipeline_cost.json`` and ``pipeline_cost.md``.

    .venv/bin/python recipes/benchmarks/pipeline_cost.py --out runs/bench/pipeline_cost --work runs/bench/quality/resnet56/seed0
    .venv/bin/python recipes/benchmarks/pipeline_cost.py --out /tmp/pipeline_cost --quick
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (recipes/benchmarks is not a package)

from hmc_plugin.app.data import calibration_batch, make_loaders  # noqa: E402
from hmc_plugin.app.models import build_model  # noqa: E402
from hmc_plugin.app.report import markdown_table  # noqa: E402
from hmc_plugin.app.training import evaluate_accuracy  # noqa: E402
from hmc_plugin.apply import DataFit, apply_plan  # noqa: E402
from hmc_plugin.engines.lowrank import decomposable, decompose_layers  # noqa: E402
from hmc_plugin.engines.pruning import find_pruning_groups, prune_physically, speedup_with_nni  # noqa: E402
from hmc_plugin.planning.measure import plan_masks  # noqa: E402
from hmc_plugin.planning.plan import CompressionPlan  # noqa: E402
from hmc_plugin.planning.targets import plan_for_target  # noqa: E402
from hmc_plugin.sensitivity.scan import scan_sensitivity  # noqa: E402
from hmc_plugin.sensitivity.table import SensitivityTable  # noqa: E402
from hmc_plugin.settings import SENSITIVITIES  # noqa: E402

RESNET50 = 'torchvision:resnet50'
CALIBRATION_SIZE = 64
RESNET50_EVAL_SIZE = 16


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/bench/pipeline_cost')
    parser.add_argument('--work', help='folder with the cached ResNet-56 baseline (default: OUT/work)')
    parser.add_argument('--quick', action='store_true',
                        help='ResNet-20 only, 1 training epoch, 2 levels, all stages in one process: checks the harness')
    parser.add_argument('--models', default=f'resnet56,{RESNET50}')
    parser.add_argument('--train-epochs', type=int, default=common.TRAIN_EPOCHS)
    parser.add_argument('--subset', type=int, default=2,
                        help='ResNet-50 kl/evaluator scans: first N pruning groups and N layers')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1: see recipes/benchmarks/README.md)')
    parser.add_argument('--timeout', type=int, default=3600, help='seconds per stage process')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    parser.add_argument('--quiet', action='store_true')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.train_epochs, args.subset = 'resnet20', 1, 1
    return args


# --------------------------------------------------------------------------------------------- child side

def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class PeakSampler:
    """Highest RSS seen by a background thread polling every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss / 2 ** 20)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


_SETUPS: dict[str, dict[str, Any]] = {}


def setup(spec: dict) -> dict[str, Any]:
    """Model, inputs, metric and torch-pruning groups of ``spec['model']`` (once per process)."""
    name = spec['model']
    if name in _SETUPS:
        return _SETUPS[name]
    if name == RESNET50:
        torch.manual_seed(0)
        model = build_model(RESNET50, 1000, 3).eval()  # ImageNet's head, as scan_cost.py
        generator = torch.Generator().manual_seed(0)
        dummy_input = torch.zeros(1, 3, 224, 224)
        calibration = torch.randn(CALIBRATION_SIZE, 3, 224, 224, generator=generator)
        images = calibration[:RESNET50_EVAL_SIZE]
        with torch.no_grad():
            labels = model(images).argmax(1)

        def eval_fn(candidate):  # top-1 agreement with the original model on 16 generated images
            return evaluate_accuracy(candidate, [(images, labels)])
    else:
        settings = common.settings_for(name, 0, train_epochs=spec['train_epochs'], threads=spec['threads'])
        work = Path(spec['work'])
        if not (work / 'baseline.pt').exists():
            raise SystemExit(f'{work}/baseline.pt is missing: the parent process trains it first')
        splits = common.digits()
        torch.manual_seed(0)
        model = build_model(name, splits.num_classes, splits.in_channels)
        from hmc_plugin.app.workflow import train_or_load_baseline
        model = train_or_load_baseline(model, splits, settings, work, progress=False).eval()
        dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
        calibration, _ = calibration_batch(splits, CALIBRATION_SIZE, seed=0)
        _, test_loader = make_loaders(splits, 64)

        def eval_fn(candidate):  # test accuracy, 360 images
            return evaluate_accuracy(candidate, test_loader)
    groups = find_pruning_groups(model, dummy_input)
    layers = [layer for layer, module in model.named_modules()
              if isinstance(module, torch.nn.Conv2d) and decomposable(module, layer)]
    _SETUPS[name] = {'model': model, 'dummy_input': dummy_input, 'calibration': calibration, 'eval_fn': eval_fn,
                     'groups': groups, 'layers': layers}
    return _SETUPS[name]


def _data_fit(context: dict) -> DataFit:
    """The data-aware settings of the ``+data`` variants: the 64 calibration images fit and recalibrate."""
    return DataFit(batches=(context['calibration'],), bn_batches=(context['calibration'],))


def run_stage(spec: dict) -> dict[str, Any]:
    """One measured stage: setup untimed, then the stage under the timer and the memory sampler."""
    torch.set_num_threads(spec['threads'])
    context = setup(spec)
    model, dummy_input, groups, layers = context['model'], context['dummy_input'], context['groups'], context['layers']
    levels = tuple(spec['levels'])
    files = Path(spec['files'])
    result: dict[str, Any] = {}
    rss_before, max_rss_before = _rss_mb(), _max_rss_mb()
    with PeakSampler() as sampler:
        started = time.perf_counter()
        if spec['stage'] == 'scan':
            mode, _, with_data = spec['variant'].partition('+')
            data = _data_fit(context) if with_data else None
            units_groups = groups[:spec['subset']] if spec.get('subset') else groups
            units_layers = layers[:spec['subset']] if spec.get('subset') else layers
            kwargs = {'eval_fn': context['eval_fn']} if mode == 'evaluator' else {'calibration_inputs': context['calibration']}
            table = scan_sensitivity(model, dummy_input, groups=units_groups, layers=units_layers, mode=mode,
                                     levels=levels, progress=False, data=data, **kwargs)
            result.update(evaluations=table.evaluations, full_evaluations=len(levels) * (len(groups) + len(layers)))
            if not spec.get('subset'):
                table.to_json(files / f'{spec["key"]}_{spec["variant"]}.json')
        elif spec['stage'] == 'plan':
            table = SensitivityTable.from_json(files / f'{spec["key"]}_proxy.json')
            plan, kept = plan_for_target(table, model, dummy_input, groups, mode='nahc', target_flops=0.5)
            plan.to_json(files / f'{spec["key"]}_plan.json')
            result.update(flops_kept=kept, groups=plan.group_counts())
        elif spec['stage'] == 'apply':
            plan = CompressionPlan.from_json(files / f'{spec["key"]}_plan.json')
            target = copy.deepcopy(model)
            masks = plan_masks(target, plan, dummy_input)
            after_masks = time.perf_counter()
            if spec['variant'] == 'torch_pruning+data':  # the data-aware apply: refit, fitted low rank, BN
                apply_plan(target, plan, dummy_input, speedup='torch_pruning', masks=masks, data=_data_fit(context))
                result.update(seconds_masks=after_masks - started)
            else:
                if spec['variant'] == 'nni':
                    target = speedup_with_nni(target, dummy_input, masks)
                else:
                    target = prune_physically(target, dummy_input, masks)
                after_shrink = time.perf_counter()
                decompose_layers(target, plan.ranks, method=plan.methods)
                result.update(seconds_masks=after_masks - started, seconds_shrink=after_shrink - after_masks,
                              seconds_low_rank=time.perf_counter() - after_shrink)
        else:
            raise SystemExit(f'unknown stage {spec["stage"]!r}')
        seconds = time.perf_counter() - started
    max_rss_after = _max_rss_mb()
    stage_peak = max_rss_after if max_rss_after > max_rss_before + 1 else sampler.peak
    return {**{key: spec[key] for key in ('model', 'stage', 'variant')}, 'subset': spec.get('subset'),
            'seconds': seconds, 'rss_before_mb': rss_before, 'peak_rss_mb': max_rss_after,
            'stage_increase_mb': max(0.0, stage_peak - rss_before), **result}


def child_main(specs_json: str) -> None:
    common.configure(1)
    results = [run_stage(spec) for spec in json.loads(specs_json)]
    print('RESULT ' + json.dumps(results))


# --------------------------------------------------------------------------------------------- parent side

def stage_specs(args: argparse.Namespace, work: Path, files: Path) -> list[dict]:
    levels = [0.3, 0.6] if args.quick else [0.2, 0.4, 0.6, 0.8]
    specs = []
    for model in args.models.split(','):
        base = {'model': model, 'key': model.replace(':', '_'), 'levels': levels, 'threads': args.threads,
                'train_epochs': args.train_epochs, 'work': str(work), 'files': str(files)}
        large = model == RESNET50 or args.quick
        for variant in ('proxy', 'proxy+data', 'kl', 'evaluator'):
            if variant.partition('+')[0] in SENSITIVITIES:
                subset = args.subset if (large and not variant.startswith('proxy')) else None
                specs.append({**base, 'stage': 'scan', 'variant': variant, 'subset': subset})
        specs.append({**base, 'stage': 'plan', 'variant': 'nahc@0.5'})
        specs += [{**base, 'stage': 'apply', 'variant': variant}
                  for variant in ('nni', 'torch_pruning', 'torch_pruning+data')]
    return specs


def run_children(specs: list[dict], args, progress: common.Progress) -> list[dict]:
    batches = [specs] if args.quick else [[spec] for spec in specs]  # quick: one process for all (harness check)
    results = []
    for batch in batches:
        names = ', '.join(f'{spec["model"]} {spec["stage"]} {spec["variant"]}' for spec in batch)
        progress(f'measuring {names}')
        completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), '--child', json.dumps(batch)],
                                   capture_output=True, text=True, timeout=args.timeout)
        lines = [line for line in completed.stdout.splitlines() if line.startswith('RESULT ')]
        if completed.returncode != 0 or not lines:
            raise SystemExit(f'stage process failed ({names}):\n{completed.stderr[-3000:]}')
        for result in json.loads(lines[-1][len('RESULT '):]):
            results.append(result)
            progress(f'  {result["model"]} {result["stage"]} {result["variant"]}: {result["seconds"]:.1f} s, '
                     f'peak RSS {result["peak_rss_mb"]:.0f} MB (+{result["stage_increase_mb"]:.0f} MB)')
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = common.Progress(args.quiet)
    common.configure(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / 'work'
    files = out / 'files'
    files.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(','):
        if model != RESNET50:  # the children load this baseline
            common.prepare_baseline(common.settings_for(model, 0, train_epochs=args.train_epochs, threads=args.threads),
                                    work, progress)
    results = run_children(stage_specs(args, work, files), args, progress)
    settings_out = {'models': args.models.split(','), 'threads': args.threads, 'subset': args.subset,
                    'calibration_size': CALIBRATION_SIZE, 'resnet50_eval_size': RESNET50_EVAL_SIZE,
                    'train_epochs': args.train_epochs, 'quick': args.quick, 'scan_modes': list(SENSITIVITIES)}
    return {**common.header('pipeline_cost', settings_out), 'wall_seconds': progress.elapsed, 'rows': results}


# --------------------------------------------------------------------------------------------- rendering

def _relative(report: dict, row: dict) -> str:
    """Each scan against the proxy scan of the same model (projected when a subset ran), NNI's apply against
    torch-pruning's; the reference rows say 1.00."""
    def find(stage, variant):
        return next((other for other in report['rows'] if (other['model'], other['stage'], other['variant']) ==
                     (row['model'], stage, variant)), None)

    if row['stage'] == 'scan':
        reference = find('scan', 'proxy')
        return '' if reference is None else f'{full_seconds(row) / reference["seconds"]:.2f}'
    if row['stage'] == 'apply':
        reference = find('apply', 'torch_pruning')
        if reference is None:
            return ''
        if 'seconds_shrink' not in row:
            return f'{row["seconds"] / reference["seconds"]:.2f}'
        return f'{row["seconds"] / reference["seconds"]:.2f} (shrink step {row["seconds_shrink"] / reference["seconds_shrink"]:.2f})'
    return ''


def full_seconds(row: dict) -> float:
    """Seconds of the full scan: measured, or projected from the subset's seconds per evaluation."""
    if row.get('subset'):
        return row['seconds'] / row['evaluations'] * row['full_evaluations']
    return row['seconds']


def render_markdown(report: dict) -> str:
    """``pipeline_cost.md``: a pure function of ``pipeline_cost.json``."""
    header = ['model', 'stage', 'variant', 'evaluations', 'wall s', 'relative wall', 'peak RSS MB', 'stage RSS +MB']
    rows = []
    for row in report['rows']:
        evaluations, wall = '', f'{row["seconds"]:.1f}'
        if row['stage'] == 'scan':
            evaluations = f'{row["evaluations"]}'
            if row.get('subset'):
                evaluations = f'{row["evaluations"]} of {row["full_evaluations"]}'
                wall = f'{row["seconds"]:.1f} (full: {full_seconds(row):.0f} projected)'
        elif row['stage'] == 'apply' and 'seconds_shrink' in row:
            wall = f'{row["seconds"]:.1f} (shrink {row["seconds_shrink"]:.1f})'
        rows.append([common.MODEL_LABELS.get(row['model'], row['model']), row['stage'], row['variant'], evaluations,
                     wall, _relative(report, row), f'{row["peak_rss_mb"]:.0f}', f'{row["stage_increase_mb"]:.0f}'])
    settings = report['settings']
    return '\n'.join([
        f'# Pipeline cost ({"quick" if settings["quick"] else "full"})', '',
        f'Created {report["created"]} on {report["machine"]}, {settings["threads"]} threads per stage process; '
        f'{report["wall_seconds"] / 60:.1f} min in all. One fresh process per stage; setup (imports, model, data, '
        f'torch-pruning groups) untimed. Relative wall: scans against the proxy scan of the same model (full-scan '
        f'projection for subsets), NNI ModelSpeedup against torch-pruning physical pruning (whole apply, and the '
        f'shrink step alone). Peak RSS: the process (imports and model included); stage RSS: the stage\'s peak '
        f'above the RSS before it. Absolute seconds depend on the machine\'s load; read the ratios.', '',
        markdown_table(header, rows), '',
        'Produced by:', '', '```bash', report['command'], '```', ''])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    report = run(args)
    common.write_suite(Path(args.out), report, render_markdown(report))


if __name__ == '__main__':
    main()
