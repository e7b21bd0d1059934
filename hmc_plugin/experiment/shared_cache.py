"""Trained baselines and sensitivity scans shared by many runs, e.g. the trials of an NNI experiment.

Layout under ``root``, one entry per key so that runs with other settings never overwrite each other::

    baselines/<model>-<training key hash>/baseline.pt                one per model, data and training settings
    scans/<model>-<weights fingerprint>-prune-<key hash>.json        the pruning half of a scan: per weights and
                                                                     scan settings but the rank method
    scans/<model>-<weights fingerprint>-decompose-<key hash>.json    the decomposition half: the same but the
                                                                     importance
    scans/<same names>.png                                           their curves, drawn when the half ran

Each entry is built under a file lock (``<entry>.lock``): trials running at the same time build it once,
the others wait and reuse it. A scan file is reused only if ``scan_sensitivity`` accepts it (same weights,
units and settings recorded inside), so a stale or foreign file is rescanned, never trusted blindly.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from torch import nn

from ..app.data import DataSplits
from ..app.workflow import RunSettings, make_compressor, train_or_load_baseline
from ..sensitivity.halves import merge_halves
from ..sensitivity.table import SensitivityTable
from ..utils.fingerprint import model_fingerprint
from ..utils.store import key_of

__all__ = ['BASELINE_KEYS', 'SCAN_KEYS', 'HALF_KEYS', 'ScanResult', 'SharedCache']

_logger = logging.getLogger(__name__)

# RunSettings fields that change the trained weights (the data enters the key through the splits).
BASELINE_KEYS = ('model', 'data', 'image_size', 'train_epochs', 'train_lr', 'batch_size', 'seed', 'checkpoint')


# RunSettings fields that change a scan of given weights; each half depends on all of them but one.
SCAN_KEYS = ('data', 'image_size', 'op_types', 'exclude_op_names', 'levels', 'importance', 'rank_method',
             'sensitivity', 'calibration_size', 'seed')
HALF_KEYS = {'prune': tuple(key for key in SCAN_KEYS if key != 'rank_method'),
             'decompose': tuple(key for key in SCAN_KEYS if key != 'importance')}


@dataclass
class ScanResult:
    """A scan from the cache: ``paths`` of its pruning and decomposition halves, ``scanned`` the halves this call
    measured (the others came from their files), ``reused`` True when no evaluation ran."""

    table: SensitivityTable
    paths: tuple[Path, Path]
    reused: bool
    scanned: tuple[str, ...]
    seconds: float  # wall time of the call, waiting for another run's lock included


def _key_hash(settings: RunSettings, keys: tuple[str, ...], splits: DataSplits) -> str:
    values: dict[str, Any] = {key: getattr(settings, key) for key in keys}
    values = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
    values['splits'] = repr(splits)  # data name and split sizes (subsets are seeded by settings.seed)
    return key_of(values)[:16]


def _safe_name(model_name: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.-]+', '_', model_name)


class SharedCache:
    """Baselines and scans under one folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def baseline_dir(self, settings: RunSettings, splits: DataSplits) -> Path:
        """Folder of the baseline trained with these settings on these splits."""
        return self.root / 'baselines' / f'{_safe_name(settings.model)}-{_key_hash(settings, BASELINE_KEYS, splits)}'

    def baseline(self, model: nn.Module, splits: DataSplits, settings: RunSettings, progress: bool = False) -> nn.Module:
        """``model`` with the trained baseline weights: loaded from the cache, or trained once and cached."""
        folder = self.baseline_dir(settings, splits)
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / 'baseline.lock')):
            return train_or_load_baseline(model, splits, settings, folder, progress)

    def scan_path(self, model: nn.Module, splits: DataSplits, settings: RunSettings, part: str = 'prune') -> Path:
        """Cache file of one half of the scan of ``model``'s current weights (``part``: ``'prune'``, keyed by the
        scan settings but ``rank_method``; ``'decompose'``, by all but ``importance``)."""
        fingerprint = model_fingerprint(model)[:16]
        name = f'{_safe_name(settings.model)}-{fingerprint}-{part}-{_key_hash(settings, HALF_KEYS[part], splits)}.json'
        return self.root / 'scans' / name

    def scan(self, model: nn.Module, splits: DataSplits, settings: RunSettings, progress: bool = False) -> ScanResult:
        """The sensitivity scan of ``model`` (trained weights): its pruning half run once per weights and scan
        settings but the rank method, its decomposition half once per weights and settings but the importance
        (``sensitivity.halves``), merged."""
        started = time.perf_counter()
        halves, scanned = {}, []
        for part in ('prune', 'decompose'):
            halves[part], reused = self._half(model, splits, settings, part, progress)
            if not reused:
                scanned.append(part)
        table = merge_halves(halves['prune'], halves['decompose'])
        seconds = time.perf_counter() - started
        paths = tuple(self.scan_path(model, splits, settings, part) for part in ('prune', 'decompose'))
        if not scanned:
            _logger.info('Reused the sensitivity scan %s and %s (no evaluation ran; %.1f s)', *paths, seconds)
        return ScanResult(table=table, paths=paths, reused=not scanned, scanned=tuple(scanned), seconds=seconds)

    def _half(self, model: nn.Module, splits: DataSplits, settings: RunSettings, part: str,
              progress: bool) -> tuple[SensitivityTable, bool]:
        """``(table, reused)`` of one half, scanned under its file lock unless its cache file answers."""
        started = time.perf_counter()
        path = self.scan_path(model, splits, settings, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix('.lock'))):
            stamp_before = path.stat().st_mtime_ns if path.exists() else None
            compressor = make_compressor(model, splits, settings, 'nahc', cache_path=path, progress=progress)
            try:
                table = compressor.scan(part)  # scan_sensitivity answers from the file when it matches
            finally:
                compressor.unwrap_model()
            reused = stamp_before is not None and path.exists() and path.stat().st_mtime_ns == stamp_before
            if not reused:
                table.to_json(path)
                table.plot(path.with_suffix('.png'))
                _logger.info('Scanned %d pruning groups and %d layers in %.1f s; cached in %s',
                             len(table.prune), len(table.decompose), time.perf_counter() - started, path)
        return table, reused
