"""Devices: the ``device`` setting resolved to a ``torch.device``, a model's device, tensors moved there, and the
accelerator's name for cache keys. ``'model'`` is where the model already is (nothing moves); ``'auto'`` is the first
CUDA GPU when one is visible, else the CPU."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import HMCConfigError

__all__ = ['DEVICE_PATTERN', 'DEVICE_CHOICES', 'valid_device_spec', 'resolve_device', 'model_device', 'to_device', 'synchronize',
           'accelerator_label']

DEVICE_PATTERN = re.compile(r'model|auto|cpu|cuda(:\d+)?')
DEVICE_CHOICES = "'model', 'auto', 'cpu', 'cuda' or 'cuda:N'"


def valid_device_spec(value: Any) -> bool:
    """``'model'``, ``'auto'``, ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` (the settings check; availability is
    ``resolve_device``'s)."""
    return isinstance(value, str) and DEVICE_PATTERN.fullmatch(value) is not None


def resolve_device(spec: str, local_rank: int | None = None, model: nn.Module | None = None) -> torch.device:
    """The ``torch.device`` of a ``device`` setting, or ``HMCConfigError`` naming the key when it is not there.

    ``'model'``: ``model``'s own device (the CPU without a model). ``'auto'``: ``cuda`` (``cuda:local_rank`` under
    ``torchrun``) when ``torch.cuda.is_available()``, else ``cpu``. ``'cuda'`` is ``cuda:local_rank`` too when
    ``local_rank`` is given.
    """
    if not valid_device_spec(spec):
        raise HMCConfigError(f'Got device={spec!r} but expected {DEVICE_CHOICES}')
    if spec == 'model':
        return model_device(model) if model is not None else torch.device('cpu')
    if spec == 'cpu' or (spec == 'auto' and not torch.cuda.is_available()):
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise HMCConfigError(f"Got device={spec!r} but torch sees no CUDA GPU (torch {torch.__version__}, built "
                             f"for CUDA {torch.version.cuda}): set device='cpu' or 'auto' (--device cpu), or install "
                             f"a CUDA build of torch on a machine with a GPU")
    index = int(spec.split(':')[1]) if ':' in spec else (local_rank or 0)
    if index >= torch.cuda.device_count():
        raise HMCConfigError(f'Got device={spec!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible: use '
                             f"an index below {torch.cuda.device_count()}, or 'cuda' / 'auto'")
    return torch.device('cuda', index)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else buffer); ``cpu`` for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device('cpu')


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (nested tuples, lists, dicts) on ``device``; the same object when all are."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, (tuple, list)):
        moved = [to_device(item, device) for item in value]
        if all(new is old for new, old in zip(moved, value)):
            return value
        return type(value)(moved) if not hasattr(value, '_fields') else type(value)(*moved)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def accelerator_label(device: torch.device) -> str:
    """``''`` on the CPU (cache keys as they were); on CUDA the GPU's name and the torch and CUDA versions."""
    if device.type != 'cuda':
        return ''
    return f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}'
