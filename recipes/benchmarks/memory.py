"""Peak memory (RSS) of the main job's stages on CIFAR ResNet-110 with a 4x larger calibration set.

Trains ResNet-110 on the embedded digits data for one epoch (cached in ``--out``), then runs the main
job's stages once each with a 256-image calibration batch (the main job uses 64): the sensitivity
scan, the plan (NaHC at half the FLOPs) and the compression (masks, NNI speedup, low-rank
replacement) plus ``--finetune-epochs`` of fine-tuning. A sampling thread reads the process's
resident set size every 10 ms; the script prints the peak of each stage and of the whole run, and
writes them to ``OUT/memory.json``. Between stages, freed memory is handed back to the system
(``malloc_trim``), so each stage starts from what is really in use. Nothing is asserted:
recipes/benchmarks/README.md quotes the figures.

    .venv/bin/python recipes/benchmarks/memory.py --out runs/memory [--calibration-size 256] [--finetune-epochs 1]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import resource
import threading
import time
from pathlib import Path

import torch

from hmc_plugin.app.data import load_digits_data
from hmc_plugin.app.models import build_model
from hmc_plugin.app.workflow import RunSettings, make_compressor, scan, train_or_load_baseline
from hmc_plugin.utils.counting import count_params
from hmc_plugin.utils.store import write_json_atomic

MIB = 1024 * 1024


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
        print(f'{stage:<10} peak RSS {peak[0] / MIB:8.1f} MiB (from {before / MIB:7.1f} MiB) '
              f'in {time.perf_counter() - started:6.1f} s', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/memory')
    parser.add_argument('--model', default='resnet110')
    parser.add_argument('--calibration-size', type=int, default=256)
    parser.add_argument('--finetune-epochs', type=int, default=1)
    parser.add_argument('--sensitivity', default='proxy', help="scan mode, as the config key 'sensitivity'")
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {'model': args.model, 'calibration_size': args.calibration_size,
                     'finetune_epochs': args.finetune_epochs, 'sensitivity': args.sensitivity, 'torch': torch.__version__}
    settings = RunSettings(model=args.model, train_epochs=1, calibration_size=args.calibration_size,
                           finetune_epochs=args.finetune_epochs, methods=('nahc',), sensitivity=args.sensitivity,
                           threads=args.threads)
    with peak_rss('setup', results):
        splits = load_digits_data()
        torch.manual_seed(settings.seed)
        model = build_model(args.model, splits.num_classes, splits.in_channels)
        model = train_or_load_baseline(model, splits, settings, out, progress=False)
    results['params'] = count_params(model)
    with peak_rss('scan', results):
        table = scan(model, splits, settings, out, progress=False)  # resumable: delete OUT/sensitivity.json to rescan
    compressor = make_compressor(model, splits, settings, 'nahc', table=table, progress=False)
    with peak_rss('plan', results):
        compressor.make_plan()
    with peak_rss('compress', results):
        compressed, _ = compressor.compress()
        if args.finetune_epochs:
            compressor.finetune(compressed, max_epochs=args.finetune_epochs)
    results['peak_rss_mib'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    results['flops_kept'] = compressor.plan.measured
    print(f'whole run  peak RSS {results["peak_rss_mib"]:8.1f} MiB (getrusage ru_maxrss)')
    write_json_atomic(out / 'memory.json', results)


if __name__ == '__main__':
    main()
