"""Timing."""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .counting import as_input_tuple

__all__ = ['steady_allocator', 'measure_latency', 'measure_latency_side_by_side', 'machine_description']

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_STEADY_BYTES = 1 << 30


def steady_allocator() -> bool:
    """Keep freed activation buffers in the process heap, so that every timed forward allocates alike (glibc).

    glibc gives allocations above its mmap threshold fresh pages and unmaps them on free, and the threshold
    adapts to what the process freed before: a model with large activations pays page faults on every
    forward, by an amount that depends on the process's history. Torchvision ResNet-50 at batch 16 timed
    about 1.3 s per batch in a fresh process and 0.87 s after a few copies of the model had been freed,
    which skewed side-by-side ratios and the latency planner's corrections. This sets the mmap and trim
    thresholds to 1 GiB for the whole process (as ``MALLOC_MMAP_THRESHOLD_`` would): memory PyTorch frees
    stays reserved for reuse instead of going back to the system. The ``hmc`` command and the benchmarks
    call it; call it in your own process before timing or planning for ``target_latency``. Returns whether
    it applied (False without glibc).
    """
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _STEADY_BYTES))


@contextlib.contextmanager
def _torch_threads(num_threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs: Any, *, warmup: int = 5, repeats: int = 21,
                    num_threads: int = 2) -> float:
    """Median wall time of one forward pass in milliseconds, on CPU, in eval mode.

    ``warmup`` untimed runs first; ``num_threads`` is fixed for the measurement and restored after.
    The model's train/eval mode is restored too.
    """
    inputs = as_input_tuple(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with _torch_threads(num_threads):
            for _ in range(warmup):
                model(*inputs)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(*inputs)
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times) * 1000.0


@torch.no_grad()
def measure_latency_side_by_side(models: list[nn.Module], example_inputs: Any, *, warmup: int = 5, repeats: int = 21,
                                 num_threads: int = 2) -> list[float]:
    """Median forward time (ms) of each model, runs interleaved (A B A B ...) so that machine drift hits
    all models alike: use this for speed-up ratios. Eval mode during, modes restored after."""
    inputs = as_input_tuple(example_inputs)
    modes = [model.training for model in models]
    times: list[list[float]] = [[] for _ in models]
    try:
        for model in models:
            model.eval()
        with _torch_threads(num_threads):
            for round_index in range(warmup + repeats):
                for index, model in enumerate(models):
                    start = time.perf_counter()
                    model(*inputs)
                    if round_index >= warmup:
                        times[index].append(time.perf_counter() - start)
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return [statistics.median(model_times) * 1000.0 for model_times in times]


def machine_description() -> str:
    """One line: CPU model, cores, torch version and threads (the context of every latency figure)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return f'{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}'
