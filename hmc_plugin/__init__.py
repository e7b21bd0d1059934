"""hmc_plugin: HMC, hybrid model compression by layer sensitivity grouping, as an NNI compressor.

Public surface::

    from hmc_plugin import HMCCompressor, CompressionPlan, SensitivityTable
    from hmc_plugin import save_compressed, load_compressed, export_onnx
"""
from __future__ import annotations

__version__ = '0.1.0'

from .compressor import HMCCompressor
from .errors import HMCConfigError, HMCError, LayerCompressionError, UntraceableModelError
from .export import export_onnx, load_compressed, save_compressed
from .plan import CompressionPlan, LayerPlan
from .sensitivity import SensitivityTable

__all__ = ['HMCCompressor', 'CompressionPlan', 'LayerPlan', 'SensitivityTable', 'save_compressed', 'load_compressed',
           'export_onnx', 'HMCConfigError', 'HMCError', 'LayerCompressionError', 'UntraceableModelError', '__version__']
