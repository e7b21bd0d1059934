"""Fingerprint."""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from .counting import as_input_tuple

__all__ = ['model_fingerprint', 'inputs_fingerprint']

_logger = logging.getLogger(__name__)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state_dict (names, shapes and bytes): identifies a model's weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b'')
    return digest.hexdigest()


def inputs_fingerprint(inputs: Any) -> str:
    """SHA-256 over a tensor or tuple of tensors (shapes, dtypes and bytes): identifies calibration data."""
    digest = hashlib.sha256()
    for item in as_input_tuple(inputs):
        if isinstance(item, torch.Tensor):
            digest.update(f'{tuple(item.shape)}{item.dtype}'.encode())
            digest.update(item.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                          if item.numel() else b'')
        else:
            digest.update(repr(item).encode())
    return digest.hexdigest()
