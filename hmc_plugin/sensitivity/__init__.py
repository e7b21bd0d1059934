"""Sensitivity: the ``SensitivityTable``, the scans that fill it, and the one-pass Fisher proxy."""
from .scan import scan_sensitivity
from .table import SensitivityTable

__all__ = ['SensitivityTable', 'scan_sensitivity']
