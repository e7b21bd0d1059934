"""What the benchmark suites share: settings, cached baselines and scans, one compressed model per method,
the common fine-tuning budget, progress lines and the JSON / markdown files.

Methods (``METHODS``): ``nahc`` (HMC's grouping at its default margin 0.5), ``hmc`` (margin chosen by
``hmc_plugin.app.workflow.choose_margin``), ``ahc`` (both operators on every layer), ``prune`` (torch-pruning
only, L1 importance), ``decompose`` (Tucker-2 for kxk convs, SVD for 1x1 convs, same FLOPs rank rule)
and ``nni_l1`` (NNI's ``L1NormPruner`` + ``ModelSpeedup``, ``hmc_plugin.app.baselines``). Every method but
``nni_l1`` runs through ``HMCCompressor`` on one shared sensitivity scan.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from hmc_plugin.app.baselines import nni_l1_prune
from hmc_plugin.app.data import DataSplits, parse_data_spec
from hmc_plugin.app.models import build_model
from hmc_plugin.app.report import flops_kept, params_kept, size_fields
from hmc_plugin.app.workflow import (
    MARGIN_CANDIDATES,
    RunSettings,
    choose_margin,
    make_compressor,
    scan,
    sgd_finetune,
    train_or_load_baseline,
)
from hmc_plugin.sensitivity.table import SensitivityTable
from hmc_plugin.utils.jsonio import encode_float
from hmc_plugin.utils.store import JsonStore, key_of, write_json_atomic
from hmc_plugin.utils.timing import machine_description, steady_allocator

METHODS = ('nahc', 'hmc', 'ahc', 'prune', 'decompose', 'nni_l1')
METHOD_LABELS = {'uncompressed': 'uncompressed', 'nahc': 'NaHC', 'hmc': 'HMC', 'ahc': 'AHC', 'prune': 'prune-only',
                 'decompose': 'decompose-only', 'nni_l1': 'NNI L1NormPruner'}
MODEL_LABELS = {'resnet20': 'ResNet-20', 'resnet56': 'ResNet-56', 'torchvision:resnet50': 'ResNet-50'}

# The quality suite's budget; real_speed reuses its cached baselines and scans when given the same settings.
# lr 0.05, not the main job's 0.1: at 0.1 a ResNet-56 trained 12 epochs reached 0.77 test accuracy (seed 0),
# at 0.05 it reaches 0.99 by epoch 8.
TRAIN_EPOCHS = 12
TRAIN_LR = 0.05
FINETUNE_EPOCHS = 1
FINETUNE_LR = 0.01
# Scan levels (fractions of a unit's FLOPs removed). 0.9 is added to the default 0.2-0.8 so that every
# method can reach target 0.125: with levels up to 0.8, a layer given one operator keeps at least 0.2 of
# its FLOPs, and NaHC cannot go below about 0.156 of ResNet-20's FLOPs.
LEVELS = (0.2, 0.4, 0.6, 0.8, 0.9)


class Progress:
    """Timestamped progress lines on stdout, flushed at once (the suites run for minutes)."""

    def __init__(self, quiet: bool = False):
        self.started = time.perf_counter()
        self.quiet = quiet

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, message: str) -> None:
        if not self.quiet:
            minutes, seconds = divmod(int(self.elapsed), 60)
            print(f'[{minutes:3d}:{seconds:02d}] {message}', flush=True)


def configure(threads: int) -> None:
    """Fixed thread count, a steady allocator for the timings (``counting.steady_allocator``) and quiet
    libraries for a benchmark process."""
    torch.set_num_threads(threads)
    steady_allocator()
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    for noisy in ('nni', 'torch_pruning', 'hmc_plugin'):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_DATA: dict[str, DataSplits] = {}
DATA_LABELS = {'digits': 'digits', 'digits_hard': 'digits_hard'}


def data_splits(name: str = 'digits') -> DataSplits:
    """The embedded data sets by name, ``'digits'`` or ``'digits_hard'`` (each loaded once per process)."""
    if name not in _DATA:
        _DATA[name] = parse_data_spec(name)
    return _DATA[name]


def digits() -> DataSplits:
    """The embedded digits data (loaded once per process)."""
    return data_splits('digits')


def settings_for(model: str, seed: int, *, train_epochs: int = TRAIN_EPOCHS, threads: int = 1,
                 finetune_epochs: int = FINETUNE_EPOCHS, finetune_lr: float = FINETUNE_LR,
                 data: str = 'digits') -> RunSettings:
    """The run settings of one (model, seed) on ``data``: proxy sensitivity, ``LEVELS``, L1 importance."""
    return RunSettings(model=model, data=data, seed=seed, train_epochs=train_epochs, train_lr=TRAIN_LR,
                       finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, threads=threads,
                       methods=METHODS, levels=LEVELS)


def prepare_baseline(settings: RunSettings, work_dir: Path, progress: Progress) -> tuple[nn.Module, DataSplits]:
    """Trained baseline of ``settings.model`` with ``settings.seed`` on ``settings.data``, cached in ``work_dir``."""
    splits = data_splits(settings.data)
    torch.manual_seed(settings.seed)  # initial weights, as the CLI does
    model = build_model(settings.model, splits.num_classes, splits.in_channels)
    cached = (work_dir / 'baseline.pt').exists()
    progress(f'{settings.model} seed {settings.seed}: {"loading" if cached else "training"} the baseline '
             f'({settings.train_epochs} epochs)')
    return train_or_load_baseline(model, splits, settings, work_dir, progress=False).eval(), splits


def prepare(settings: RunSettings, work_dir: Path, progress: Progress) -> tuple[nn.Module, DataSplits, SensitivityTable]:
    """Trained baseline and sensitivity scan of ``settings.model`` with ``settings.seed``, both cached in
    ``work_dir`` (a rerun with the same settings loads them)."""
    model, splits = prepare_baseline(settings, work_dir, progress)
    progress(f'{settings.model} seed {settings.seed}: sensitivity scan ({settings.sensitivity})')
    table = scan(model, splits, settings, work_dir, progress=False)
    return model, splits, table


def compress(model: nn.Module, splits: DataSplits, settings: RunSettings, method: str, table: SensitivityTable,
             margin_candidates: Sequence[float] = MARGIN_CANDIDATES) -> tuple[nn.Module, dict[str, Any]]:
    """A compressed copy of ``model`` at ``settings.target_flops`` by ``method`` (no fine-tuning); ``model`` untouched.

    Returns the model and ``{'seconds', 'flops_kept', 'params_kept', ...}`` with the method's own facts:
    ``groups`` (layers per sensitivity group), ``margin`` and ``margin_trials`` (HMC), ``sparse_ratio`` (NNI).
    """
    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    started = time.perf_counter()
    info: dict[str, Any] = {}
    if method == 'nni_l1':
        compressed, nni_info = nni_l1_prune(model, dummy_input, target_flops=settings.target_flops)
        info.update(sparse_ratio=nni_info['sparse_ratio'], widest_ratio=nni_info['widest_ratio'])
    else:
        plan = None
        if method == 'hmc':
            margin, plan, trials = choose_margin(model, splits, settings, table, candidates=margin_candidates)
            info.update(margin=encode_float(margin), margin_trials=[{**trial, 'margin': encode_float(trial['margin'])}
                                                                   for trial in trials])
        compressor = make_compressor(model, splits, settings, method, table=table, plan=plan, progress=False)
        compressed, _ = compressor.compress()
        info['groups'] = compressor.plan.group_counts()
    info['seconds'] = time.perf_counter() - started
    sizes = size_fields(model, compressed, dummy_input)
    info['flops_kept'], info['params_kept'] = flops_kept(sizes), params_kept(sizes)
    return compressed.eval(), info


def finetune(model: nn.Module, splits: DataSplits, settings: RunSettings, max_steps: int | None = None) -> float:
    """The one fine-tuning budget every method gets: ``settings.finetune_epochs`` epochs (or ``max_steps``) of
    ``hmc_plugin.app.workflow.sgd_finetune`` (SGD as ``make_torch_evaluator``, batch order seeded by
    ``settings.seed``). Returns the seconds it took."""
    return sgd_finetune(model, splits, settings, max_steps=max_steps)




def table_fingerprint(table: SensitivityTable) -> str:
    """Digest of a scan's drops (not its timing): cached results made from another scan are not reused."""
    return key_of([table.levels, table.prune, table.decompose])[:16]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(value) for value in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def command_line() -> str:
    """The command that started this process, as typed from the repository root."""
    return '.venv/bin/python ' + ' '.join(shlex.quote(arg) for arg in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def git_commit() -> str | None:
    """The repository's commit, with ``-dirty`` when the working tree has changes (None outside git)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ('-dirty' if dirty else '')


def header(suite: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The fields every suite's JSON starts with."""
    return {'suite': suite, 'version': 1, 'created': datetime.datetime.now().isoformat(timespec='seconds'),
            'machine': machine_description(), 'threads': torch.get_num_threads(), 'command': command_line(),
            'commit': git_commit(), 'settings': settings}


def write_suite(out: Path, report: dict[str, Any], markdown: str, *, also: Sequence[str] = (),
                quiet: bool = False) -> None:
    """Write ``out/SUITE.json`` and ``out/SUITE.md`` (``markdown``, rendered from the report), print the markdown
    unless ``quiet``, and say what was written (``also``: other files the suite wrote into ``out``)."""
    suite = report['suite']
    write_json_atomic(out / f'{suite}.json', report)
    (out / f'{suite}.md').write_text(markdown)
    if not quiet:
        print(markdown)
    files = [f'{suite}.json', f'{suite}.md', *also]
    print(f'Wrote {out}/{", ".join(files[:-1])} and {files[-1]} in {report["wall_seconds"] / 60:.1f} min.')


def cached_cell(path: Path, key: Any, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, stored in the ``JsonStore`` at ``path`` under ``key`` (JSON data: the cell's settings,
    weights and scan); read back instead while a stored entry has the same key, so a rerun resumes and a cell
    made from other settings, weights or scans is made again (beside the old one)."""
    return JsonStore(path).get_or_compute(key, compute)


def finetune_budget(settings: dict[str, Any]) -> str:
    """The fine-tuning budget of a report's settings, in words: 'N step(s)' (quick runs) or 'N epoch(s)'."""
    return (f'{settings["finetune_steps"]} step(s)' if settings.get('finetune_steps')
            else f'{settings["finetune_epochs"]} epoch(s)')


# settings no benchmark cell depends on: where the weights come from, and how HMCCompressor reads calibration data
# from an Evaluator (the benchmarks always pass it); left out of the cells' keys, so adding one keeps the caches
UNKEYED_SETTINGS = ('checkpoint', 'calibration_steps')
# settings added after cells were cached, at the default that behaves as before: left out of the keys at that value
KEYED_UNLESS_DEFAULT = {'latency_backend': 'torch', 'prune_spread': None, 'finetune_schedule': 'constant',
                        'device': 'auto', 'mixed_precision': False, 'memory_budget': None}


def settings_dict(settings: RunSettings) -> dict[str, Any]:
    """The settings a cached cell is keyed by (every run and HMC setting but ``UNKEYED_SETTINGS``, and those of
    ``KEYED_UNLESS_DEFAULT`` only away from their default)."""
    return {key: value for key, value in settings.as_dict().items()
            if key not in UNKEYED_SETTINGS and KEYED_UNLESS_DEFAULT.get(key, object()) != value}


def replace(settings: RunSettings, **changes) -> RunSettings:
    return dataclasses.replace(settings, **changes)
