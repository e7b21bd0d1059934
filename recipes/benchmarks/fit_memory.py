"""Peak memory (RSS) of the data-aware fit (``engines.datafit.fit_to_data``) alone, on a pruned ResNet-50.

torchvision ResNet-50 (10 classes, seeded random weights): every pruning group outside layer4 pruned by half
(L1, torch-pruning's shrink), layer4's three 3x3 convs decomposed (Tucker-2 at half the channels: their input
moments are 4,608 x 4,608), then fitted to ``--images`` seeded random 224x224 images in batches of
``--batch-size`` (the refit of every consumer of a pruned group and the data-aware factors), with the allocator
the ``hmc`` command sets (``utils.timing.steady_allocator``) unless ``--default-allocator``. A thread reads the
process's RSS every 5 ms, and glibc's heap in use (``mallinfo2``: what is allocated, without the freed memory
the allocator keeps); the script prints both before the fit and at its peak, the path the fit took (one pass
or layer by layer) and its seconds. ``--trace`` prints the peak RSS inside the fit's steps (the moments, the
refit, the factors, the one pass).

    .venv/bin/python recipes/benchmarks/fit_memory.py --images 16 [--memory-budget MIB] [--trace]
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import logging
import os
import threading
import time

import torch
import torchvision

from hmc_plugin.engines import datafit
from hmc_plugin.engines.lowrank import resolve_ranks
from hmc_plugin.engines.pruning import channel_masks, find_pruning_groups, prune_physically
from hmc_plugin.utils.memory import release_memory
from hmc_plugin.utils.timing import steady_allocator

MIB = 1024 * 1024
DECOMPOSED = ('layer4.0.conv2', 'layer4.1.conv2', 'layer4.2.conv2')


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``)."""
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
                 'keepcost')]


def heap_mib() -> tuple[float, float] | None:
    """glibc's ``(in use, free but kept)`` MiB of the heap and its mmapped blocks (None without glibc 2.33+)."""
    try:
        mallinfo2 = ctypes.CDLL('libc.so.6').mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / MIB, info.fordblks / MIB


class PeakSampler:
    """The highest RSS (and heap in use) seen in each open window, read every ``interval`` seconds by a thread."""

    def __init__(self, interval: float = 0.005):
        self.windows: list[list[float]] = []
        threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    def _sample(self, interval: float) -> None:
        while True:
            rss, heap = current_rss(), heap_mib()
            for window in list(self.windows):
                window[0] = max(window[0], rss)
                window[1] = max(window[1], heap[0] if heap else 0.0)
            time.sleep(interval)

    def window(self) -> list[float]:
        """A new window ``[peak RSS bytes, peak heap in use MiB]``, open until :meth:`close`."""
        heap = heap_mib()
        window = [current_rss(), heap[0] if heap else 0.0]
        self.windows.append(window)
        return window

    def close(self, window: list[float]) -> list[float]:
        self.windows = [other for other in self.windows if other is not window]
        window[0] = max(window[0], current_rss())
        return window


def trace_steps(sampler: PeakSampler, steps: dict[str, list[float]]) -> None:
    """Wrap the fit's steps (``datafit``'s module globals) to keep each one's highest peak RSS and its calls."""
    for name in ('collect_moments', 'ridge_fit', 'decompose_module', '_fit_in_one_pass'):
        function = getattr(datafit, name)

        def wrapper(*args, _function=function, _name=name, **kwargs):
            window = sampler.window()
            try:
                return _function(*args, **kwargs)
            finally:
                peak = sampler.close(window)[0] / MIB
                entry = steps.setdefault(_name, [0.0, 0])
                entry[0], entry[1] = max(entry[0], peak), entry[1] + 1
        setattr(datafit, name, functools.wraps(function)(wrapper))


def pruned_resnet50(dummy: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module, dict, dict]:
    """``(original, pruned, masks, ranks)``: the groups outside layer4 pruned by half, layer4's 3x3 convs to
    decompose."""
    torch.manual_seed(0)
    original = torchvision.models.resnet50(num_classes=10).eval()
    groups = [group for group in find_pruning_groups(original, dummy) if not group.name.startswith('layer4')]
    masks = channel_masks(original, dummy, {group.name: 0.5 for group in groups})
    pruned = prune_physically(copy.deepcopy(original), dummy, masks)
    ranks = {name: resolve_ranks(pruned.get_submodule(name), 0.5, 'tucker2', name) for name in DECOMPOSED}
    return original, pruned, masks, ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=16, help='calibration images (default 16)')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--memory-budget', type=int, default=None, help='MiB (default: the automatic budget)')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--default-allocator', action='store_true', help="glibc's defaults, not steady_allocator")
    parser.add_argument('--trace', action='store_true', help="the peak RSS of the fit's steps")
    args = parser.parse_args()
    if not args.default_allocator:
        steady_allocator()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format='%(name)s: %(message)s')
    logging.getLogger('hmc_plugin.engines.datafit').setLevel(logging.INFO)

    dummy = torch.zeros(1, 3, 224, 224)
    original, pruned, masks, ranks = pruned_resnet50(dummy)
    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    batches = list(images.split(args.batch_size))
    one_pass = []
    run_one_pass = datafit._fit_in_one_pass

    def recorded_one_pass(*args, **kwargs):
        one_pass.append(True)
        return run_one_pass(*args, **kwargs)
    datafit._fit_in_one_pass = recorded_one_pass
    sampler, steps = PeakSampler(), {}
    if args.trace:
        trace_steps(sampler, steps)
    release_memory()
    window = sampler.window()
    (before, heap_before), started = window, time.perf_counter()
    report = datafit.fit_to_data(original, pruned, batches, ranks=ranks, masks=masks,
                                 memory_budget=args.memory_budget)
    seconds, (peak, heap_peak) = time.perf_counter() - started, sampler.close(window)
    for name, (step_peak, calls) in steps.items():
        print(f'  {name:<18} peak RSS {step_peak:8.0f} MiB ({calls} calls)')
    print(f"fit_to_data: {args.images} images, {'one pass' if one_pass else 'layer by layer'}, "
          f"{len(report['refitted'])} refitted, {len(report['decomposed'])} decomposed, {seconds:.0f} s")
    print(f'peak RSS {peak / MIB:.0f} MiB, from {before / MIB:.0f} MiB: {(peak - before) / MIB:.0f} MiB above the '
          f'models; heap in use: peak {heap_peak:.0f} MiB, from {heap_before:.0f} MiB')


if __name__ == '__main__':
    main()
