"""hmc_plugin: HMC, hybrid model compression by layer sensitivity grouping, as an NNI compressor."""
from __future__ import annotations

__version__ = '0.1.0'

from .errors import HMCConfigError, HMCError, LayerCompressionError, UntraceableModelError

__all__ = ['HMCConfigError', 'HMCError', 'LayerCompressionError', 'UntraceableModelError', '__version__']
