"""Fingerprints of weights and inputs (SHA-256): the keys caches compare to know what they were made from."""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from .counting import as_input_tuple

__all__ = ['model_fingerprint', 'inputs_fingerprint']


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b''


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state_dict (names, shapes and bytes): identifies a model's weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def inputs_fingerprint(inputs: Any) -> str:
    """SHA-256 over a tensor or tuple of tensors (shapes, dtypes and bytes): identifies calibration data."""
    digest = hashlib.sha256()
    for item in as_input_tuple(inputs):
        if isinstance(item, torch.Tensor):
            digest.update(f'{tuple(item.shape)}{item.dtype}'.encode())
            digest.update(_tensor_bytes(item))
        else:
            digest.update(repr(item).encode())
    return digest.hexdigest()
