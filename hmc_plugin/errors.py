"""Exceptions raised for the user's mistakes: each names the key or layer, the value and what is allowed."""
from __future__ import annotations

__all__ = ['HMCError', 'HMCConfigError', 'LayerCompressionError', 'UntraceableModelError']


class HMCError(Exception):
    """Base class of every error hmc_plugin raises on purpose."""


class HMCConfigError(HMCError, ValueError):
    """A config key or argument has a wrong name, type or value (also a ``ValueError``)."""


class LayerCompressionError(HMCError, ValueError):
    """A layer cannot be compressed as asked; ``layer_name`` and ``method`` say which and how."""

    def __init__(self, message: str, layer_name: str = '', method: str = ''):
        super().__init__(message)
        self.layer_name = layer_name
        self.method = method


class UntraceableModelError(HMCError, RuntimeError):
    """The model cannot be traced by ``torch.fx`` / torch-pruning; raised before the model is changed."""
