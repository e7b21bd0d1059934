"""Latency timers, the package's one home for timing a forward pass: ``measure_latency`` and
``measure_latency_side_by_side`` (interleaved runs, for ratios), and the machine they ran on.

``torch.utils.benchmark.Timer`` is not used: it cannot interleave models, its samples are means of blocks
whose count follows a time budget rather than a number of repeats, and importing it loads
``torch.utils.cpp_extension`` (a warning on machines without a CUDA runtime).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .counting import as_input_tuple
from .device import synchronize
from .onnx_runtime import backend_label, onnx_runner

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
def _torch_threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs: Any, *, warmup: int = 5, repeats: int = 21,
                    num_threads: int = 2, min_seconds: float = 0.0, max_repeats: int | None = None,
                    backend: str = 'torch') -> float:
    """Median wall time of one forward pass in milliseconds, on CPU (on CUDA inputs: GPU time), in eval mode.

    ``warmup`` untimed runs first, then ``repeats`` timed ones (more, up to ``max_repeats``, until
    ``min_seconds`` were timed: for layers of unknown cost). ``num_threads`` is fixed for the measurement
    and restored after, and so is the model's train/eval mode. The one-model case of
    :func:`measure_latency_side_by_side`: a time measured alone and one measured side by side are alike.
    """
    return measure_latency_side_by_side([model], example_inputs, warmup=warmup, repeats=repeats,
                                        num_threads=num_threads, min_seconds=min_seconds, max_repeats=max_repeats,
                                        backend=backend)[0]


@torch.no_grad()
def measure_latency_side_by_side(models: Sequence[nn.Module], example_inputs: Any, *, warmup: int = 5,
                                 repeats: int = 21, num_threads: int = 2, min_seconds: float = 0.0,
                                 max_repeats: int | None = None, backend: str = 'torch') -> list[float]:
    """Median forward time (ms) of each model, runs interleaved (A B A B ...) so that machine drift hits
    all models alike: use this for speed-up ratios, and time every model of one table in one call.

    ``warmup`` untimed rounds, then ``repeats`` timed rounds; with ``min_seconds`` > 0, as many rounds as the
    first one says make up that much time, between ``repeats`` and ``max_repeats``. ``num_threads`` is fixed
    and restored after. Eval mode during, modes restored after. ``backend``: ``'torch'`` (eager PyTorch) or
    ``'onnxruntime'`` (each model exported and run as a deployment runs it: ``utils.onnx_runtime``). Inputs on a
    CUDA device are timed there, with CUDA events after a synchronisation (``num_threads`` then only fixes the
    host's threads).
    """
    inputs = as_input_tuple(example_inputs)
    device = next((item.device for item in inputs if isinstance(item, torch.Tensor)), torch.device('cpu'))
    timed_run = _cuda_timed_run if device.type == 'cuda' and backend == 'torch' else _wall_timed_run
    modes = [model.training for model in models]
    times: list[list[float]] = [[] for _ in models]
    try:
        for model in models:
            model.eval()
        if backend == 'torch':
            runners = [functools.partial(model, *inputs) for model in models]
        else:
            backend_label(backend)  # an unknown backend or a missing runtime fails here, naming the setting
            runners = [onnx_runner(model, inputs, num_threads) for model in models]
        with _torch_threads(num_threads):
            for _ in range(warmup):
                for run in runners:
                    run()
            rounds, done = repeats, 0
            while done < rounds:
                for index, run in enumerate(runners):
                    times[index].append(timed_run(run, device))
                if done == 0 and min_seconds > 0:
                    first = sum(model_times[0] for model_times in times)
                    rounds = min(max(repeats, math.ceil(min_seconds / max(first, 1e-6))), max(repeats, max_repeats or 0))
                done += 1
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return [statistics.median(model_times) * 1000.0 for model_times in times]


def _wall_timed_run(run, device: torch.device) -> float:
    """Seconds ``run()`` takes by the wall clock (CPU work is done when it returns)."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _cuda_timed_run(run, device: torch.device) -> float:
    """Seconds the GPU spends on ``run()``: CUDA events around it, after the queue before it has drained."""
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


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
