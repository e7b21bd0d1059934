"""Memory budget of the calibration passes: the budget in bytes, a model's activation sizes, freeing memory.

``memory_budget`` (MiB) bounds the working memory of the passes over calibration data (the Fisher pass of the
``proxy`` scan splits its batch and projections to stay under it); ``None`` picks ``AUTO_BUDGET_MIB``, or a
quarter of the memory available where the pass runs (the system's, or the CUDA device's free memory for
inputs on a CUDA device) when that is less. A training step's saved activations (``training_budget_bytes``,
``saved_activation_bytes``) follow ``memory_budget`` too, unset a quarter of the available memory.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ['AUTO_BUDGET_MIB', 'MIN_AUTO_BUDGET_MIB', 'available_bytes', 'budget_bytes', 'activation_bytes', 'mib',
           'release_memory', 'trim_heap', 'training_budget_bytes', 'saved_activation_bytes']

AUTO_BUDGET_MIB = 1024
MIN_AUTO_BUDGET_MIB = 256

_MIB = 1 << 20


def mib(size: float) -> int:
    """``size`` bytes in MiB, rounded up."""
    return int(math.ceil(size / _MIB))


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Memory the system can still give this process (Linux ``MemAvailable``), or a CUDA ``device``'s free memory;
    None where it is unknown."""
    if device is not None and torch.device(device).type == 'cuda':
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open('/proc/meminfo') as meminfo:
            for line in meminfo:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def budget_bytes(memory_budget: int | None, device: torch.device | str | None = None) -> int:
    """The budget in bytes: ``memory_budget`` MiB, or the automatic one (``AUTO_BUDGET_MIB``, at most a quarter
    of the memory available on ``device``, at least ``MIN_AUTO_BUDGET_MIB``)."""
    if memory_budget is not None:
        return int(memory_budget) * _MIB
    available = available_bytes(device)
    automatic = AUTO_BUDGET_MIB * _MIB
    if available is not None:
        automatic = min(automatic, max(available // 4, MIN_AUTO_BUDGET_MIB * _MIB))
    return automatic


def training_budget_bytes(memory_budget: int | None, device: torch.device | str | None = None) -> int | None:
    """The bytes a training step's saved activations may take: ``memory_budget`` MiB, or a quarter of the memory
    available on ``device`` (None where unknown). Unlike the calibration passes' budget, the automatic one is not
    capped at ``AUTO_BUDGET_MIB``: a step that fits the machine is left whole."""
    if memory_budget is not None:
        return int(memory_budget) * _MIB
    available = available_bytes(device)
    return None if available is None else available // 4


_FORWARD_HOOKS = ('_forward_pre_hooks', '_forward_pre_hooks_with_kwargs', '_forward_hooks', '_forward_hooks_with_kwargs',
                  '_forward_hooks_always_called')


@contextlib.contextmanager
def _forward_hooks_off(model: nn.Module) -> Iterator[None]:
    """The forward (pre-)hooks of ``model``'s modules set aside while inside (a sample counter or a distillation
    hook sees no pass that is not training), put back afterwards."""
    kept = [(module, name, getattr(module, name)) for module in model.modules() for name in _FORWARD_HOOKS
            if getattr(module, name, None)]
    for module, name, hooks in kept:
        setattr(module, name, type(hooks)())
    try:
        yield
    finally:
        for module, name, hooks in kept:
            setattr(module, name, hooks)


def saved_activation_bytes(model: nn.Module, step: Any) -> int:
    """Bytes autograd saves for the backward pass of ``step()`` (a forward and loss on ``model``), parameters and
    tensors saved twice counted once; ``step`` runs in a forked random state with the modules' forward hooks set
    aside, and ``model``'s buffers (BatchNorm's running statistics) are put back, so the measurement leaves no
    trace on the training that follows."""
    parameters = {param.data_ptr() for param in model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.data_ptr()
        if pointer not in parameters:
            seen[(pointer, tensor.numel())] = tensor.numel() * tensor.element_size()
        return tensor

    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), _forward_hooks_off(model), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            step()
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
    return sum(seen.values())


@torch.no_grad()
def activation_bytes(model: nn.Module, example_inputs: tuple[Any, ...]) -> tuple[int, int]:
    """``(total, largest)`` bytes of the tensors the leaf modules output for ``example_inputs`` (e.g. batch 1):
    what one sample's forward pass writes, and its largest single output."""
    sizes: list[int] = []

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    handles = [module.register_forward_hook(record) for module in model.modules() if not list(module.children())]
    try:
        model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sum(sizes), max(sizes, default=0)


def trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; else a no-op): after a pass over
    large activations the allocator otherwise keeps them as resident memory, and they fragment pass by pass."""
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Collect garbage, then ``trim_heap``."""
    gc.collect()
    trim_heap()
