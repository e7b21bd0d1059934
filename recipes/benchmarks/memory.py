"""Peak memory (RSS) of the main job's stages on ResNet-50-class models, at several calibration sizes.

Models: torchvision ResNet-50 (``torchvision:resnet50``) and SE-ResNet-50 (``hmc_plugin.app.models:seresnet50``,
timm's layout from torchvision parts), random seeded weights, 10 classes, on a generated ImageFolder of
224x224 crops (``--images-per-class`` per class; 80 % train, from which the calibration batch and the fit
batches are taken), as ``hmc compress --data imagefolder:DIR`` reads it. The CIFAR ResNets of the zoo work
too (``--model resnet110 --data digits``).

Stages, run once each in one process, with the default settings (proxy scan, data-aware fit and
reconstruction on ``max(bn_batches, fit_batches)`` batches of ``--batch-size`` images, NaHC at half the FLOPs):

- ``scan``: the sensitivity scan (masks, input moments and low-rank weights of every unit, the Fisher pass
  over the calibration batch);
- ``plan``: grouping, allocation and the measured correction rounds;
- ``apply_nni`` / ``apply_torch_pruning``: the plan applied with NNI's ModelSpeedup or torch-pruning's
  shrink (then the refit, the low-rank replacement and the BatchNorm recalibration);
- ``finetune``: ``--finetune-epochs`` epochs of the torch-pruning model at ``--batch-size``.

The process's allocator is set as the ``hmc`` command sets it (``utils.timing.steady_allocator``: freed
memory stays in the heap for steady timings) unless ``--default-allocator``. A sampling thread reads the
process's resident set size every 10 ms; each stage's peak, the RSS before it and its seconds go to
``OUT/memory.json`` (one key per model and calibration size, so runs add up).
Between stages, freed memory is handed back to the system (``malloc_trim``), so each stage starts from
what is really in use. ``--trace`` prints the peak of each phase inside the stages (masks, refits, fitted
factors, the Fisher pass; the shrink, fit and recalibration of apply). ``--table`` writes ``OUT/memory.md``
from the JSON. Nothing is asserted: recipes/benchmarks/README.md quotes the figures.

    .venv/bin/python recipes/benchmarks/memory.py --out recipes/benchmarks/results --work runs/memory --trace \\
        [--model hmc_plugin.app.models:seresnet50] [--calibration-size 16|64|256]
    .venv/bin/python recipes/benchmarks/memory.py --out recipes/benchmarks/results --table
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import resource
import threading
import time
from pathlib import Path

import numpy as np
import torch

from hmc_plugin.app.data import load_digits_data, load_imagefolder_data
from hmc_plugin.app.models import build_model
from hmc_plugin.app.workflow import RunSettings, make_compressor, scan
from hmc_plugin.utils.counting import count_params
from hmc_plugin.utils.store import write_json_atomic
from hmc_plugin.utils.timing import steady_allocator

MIB = 1024 * 1024
STAGES = ('setup', 'scan', 'plan', 'apply_nni', 'apply_torch_pruning', 'finetune')


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``; the lifetime peak elsewhere)."""
    try:
        with open('/proc/self/statm') as statm:
            return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_memory() -> None:
    """Collect garbage and return glibc's freed heap to the system (the allocator otherwise keeps it)."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:  # not glibc
        pass


@contextlib.contextmanager
def peak_rss(stage: str, results: dict, interval: float = 0.01):
    """Record the highest RSS seen while the block runs, and the wall time, under ``results[stage]``."""
    release_freed_memory()
    peak = [current_rss()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], current_rss())
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    before = current_rss()
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], current_rss())
        results[stage] = {'rss_before_mib': round(before / MIB, 1), 'peak_rss_mib': round(peak[0] / MIB, 1),
                          'seconds': round(time.perf_counter() - started, 1)}
        print(f'{stage:<20} peak RSS {peak[0] / MIB:8.1f} MiB (from {before / MIB:7.1f} MiB) '
              f'in {time.perf_counter() - started:6.1f} s', flush=True)


TRACED = {'hmc_plugin.sensitivity.scan': ('_level_selections', '_prune_weight_changes', '_decompose_changes',
                                         'collect_moments', 'fisher_drops'),
          'hmc_plugin.apply': ('speedup_with_nni', 'prune_physically', 'fit_to_data', 'decompose_layers',
                               'recalibrate_bn')}


PHASES: dict[str, float] = {}  # traced function -> highest peak RSS (MiB) of its calls


def trace_phases(interval: float = 0.005) -> None:
    """Print the RSS before, the peak and the RSS after every call of the ``TRACED`` functions (``--trace``), and
    keep each function's highest peak in ``PHASES``."""
    import functools
    import importlib

    windows: list[list] = []

    def sample():
        while True:
            rss = current_rss()
            for window in list(windows):
                window[0] = max(window[0], rss)
            time.sleep(interval)

    threading.Thread(target=sample, daemon=True).start()

    def traced(module, name):
        function = getattr(module, name)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            before = current_rss()
            window = [before]
            windows.append(window)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                windows[:] = [other for other in windows if other is not window]  # by identity, not equal peaks
                PHASES[name] = max(PHASES.get(name, 0.0), round(window[0] / MIB, 1))
                print(f'  [{name}] {before / MIB:.0f} -> peak {window[0] / MIB:.0f} -> end {current_rss() / MIB:.0f} '
                      f'MiB, {time.perf_counter() - started:.1f}s', flush=True)
        setattr(module, name, wrapper)

    for module_name, names in TRACED.items():
        module = importlib.import_module(module_name)
        for name in names:
            traced(module, name)


def generated_imagefolder(root: Path, classes: int = 10, per_class: int = 32, size: int = 256) -> Path:
    """An ImageFolder tree of ``classes x per_class`` seeded PNGs (a class colour under noise), made once."""
    from PIL import Image

    if root.is_dir() and len(list(root.glob('*/*.png'))) == classes * per_class:
        return root
    generator = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f'class{label:02d}'
        folder.mkdir(parents=True, exist_ok=True)
        colour = generator.uniform(0, 255, size=3)
        for index in range(per_class):
            noise = generator.normal(0, 60, size=(size, size, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f'{index:03d}.png')
    return root


def _commit() -> str:
    """The project's commit, with ``-dirty`` for uncommitted changes ('unknown' outside a git checkout)."""
    import subprocess
    try:
        return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def run(args: argparse.Namespace, work: Path, save) -> dict:
    """Every stage once for one model and calibration size; ``save(entry)`` after each stage (a run stopped early
    keeps its stages, ``'complete': False``); returns the JSON entry."""
    settings = RunSettings(model=args.model, calibration_size=args.calibration_size, batch_size=args.batch_size,
                           finetune_epochs=args.finetune_epochs, methods=('nahc',), threads=args.threads,
                           **({'memory_budget': args.memory_budget} if args.memory_budget else {}))
    results: dict = {'model': args.model, 'data': args.data, 'calibration_size': args.calibration_size,
                     'batch_size': args.batch_size, 'finetune_epochs': args.finetune_epochs, 'torch': torch.__version__,
                     'memory_budget': args.memory_budget, 'threads': args.threads,
                     'allocator': 'default' if args.default_allocator else 'steady', 'code': _commit(),
                     'started': time.strftime('%Y-%m-%dT%H:%M:%S')}
    stages: dict = {}
    results.update(stages=stages, phases=PHASES, complete=False)
    with peak_rss('setup', stages):
        if args.data == 'digits':
            splits = load_digits_data()
        else:
            splits = load_imagefolder_data(generated_imagefolder(work / 'imagefolder', per_class=args.images_per_class))
        torch.manual_seed(settings.seed)
        model = build_model(args.model, splits.num_classes, splits.in_channels).eval()
    results['params'] = count_params(model)
    with peak_rss('scan', stages):
        (work / 'sensitivity.json').unlink(missing_ok=True)
        table = scan(model, splits, settings, work, progress=False)
    save(results)
    (work / 'sensitivity.json').unlink()  # the next run scans again
    compressed = None
    for speedup in ('nni', 'torch_pruning'):
        compressor = make_compressor(model, splits, settings.replace(speedup=speedup), 'nahc', table=table,
                                     progress=False)
        if speedup == 'nni':
            with peak_rss('plan', stages):
                plan = compressor.make_plan()
        else:
            compressor.plan = copy.deepcopy(plan)
        compressed = None  # the previous stage's model goes before this one is made
        with peak_rss(f'apply_{speedup}', stages):
            compressed, _ = compressor.compress()
        save(results)
    results['flops_kept'] = plan.measured
    if args.finetune_epochs:
        with peak_rss('finetune', stages):
            compressor.finetune(compressed, max_epochs=args.finetune_epochs)
    results['complete'] = True
    results['peak_rss_mib'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    print(f'whole run            peak RSS {results["peak_rss_mib"]:8.1f} MiB (getrusage ru_maxrss)')
    return results


def markdown(entries: dict) -> str:
    """The table of every run in ``memory.json``: peak RSS (MiB) per stage."""
    lines = ['# Peak memory (RSS) per stage', '',
             'Peak resident set size of one process, MiB, per stage (the RSS before the stage in brackets); '
             'the data, sizes and settings are in memory.json. Produced by the commands in '
             'recipes/benchmarks/README.md (Memory).', '',
             '| model | calibration images | budget | ' + ' | '.join(STAGES[1:]) + ' | whole run |',
             '|---|---|---|' + '---|' * len(STAGES)]
    for entry in sorted(entries.values(), key=lambda e: (e['model'], e.get('memory_budget') or 0,
                                                          e['calibration_size'])):
        cells = []
        for stage in STAGES[1:]:
            figures = entry['stages'].get(stage)
            cells.append(f"{figures['peak_rss_mib']:.0f} ({figures['rss_before_mib']:.0f})" if figures else '')
        budget = entry.get('memory_budget') or 'auto'
        whole = f"{entry['peak_rss_mib']:.0f}" if entry.get('complete', True) else 'stopped'
        lines.append(f"| {entry['model']} | {entry['calibration_size']} | {budget} | " + ' | '.join(cells)
                     + f' | {whole} |')
    traced = [entry for entry in entries.values() if entry.get('phases')]
    if traced:
        names = [name for names in TRACED.values() for name in names]
        lines += ['', 'Peak RSS (MiB) of the phases inside the stages (`--trace`), the highest of their calls:', '',
                  '| model | calibration images | ' + ' | '.join(f'`{name}`' for name in names) + ' |',
                  '|---|---|' + '---|' * len(names)]
        for entry in traced:
            cells = [f"{entry['phases'][name]:.0f}" if name in entry['phases'] else '' for name in names]
            lines.append(f"| {entry['model']} | {entry['calibration_size']} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/memory', help='where memory.json and memory.md go')
    parser.add_argument('--work', default='runs/memory', help='the generated ImageFolder and the scan cache')
    parser.add_argument('--model', default='torchvision:resnet50')
    parser.add_argument('--data', default='imagefolder', choices=('imagefolder', 'digits'))
    parser.add_argument('--images-per-class', type=int, default=32, help='generated images per class (10 classes)')
    parser.add_argument('--calibration-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--finetune-epochs', type=int, default=1)
    parser.add_argument('--memory-budget', type=int, default=None, help='the memory_budget setting (MiB)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--default-allocator', action='store_true',
                        help="glibc's default allocator thresholds instead of the hmc command's steady_allocator")
    parser.add_argument('--trace', action='store_true', help='also print the RSS of the phases inside the stages')
    parser.add_argument('--table', action='store_true', help='only write OUT/memory.md from OUT/memory.json')
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / 'memory.json'
    entries = json.loads(path.read_text()) if path.exists() else {}
    if not args.table:
        torch.set_num_threads(args.threads)
        if not args.default_allocator:
            steady_allocator()
        if args.trace:
            trace_phases()
        key = f'{args.model}@{args.calibration_size}@{args.memory_budget or "auto"}'

        def save(entry: dict) -> None:  # re-read: runs of other models and sizes may write the same file meanwhile
            entries.update(json.loads(path.read_text()) if path.exists() else {})
            entries[key] = entry
            write_json_atomic(path, entries)
            (out / 'memory.md').write_text(markdown(entries))

        save(run(args, Path(args.work), save))
    (out / 'memory.md').write_text(markdown(entries))


if __name__ == '__main__':
    main()
