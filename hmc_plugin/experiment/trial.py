"""One trial of an NNI hyperparameter search over HMC: compress a trained model with the trial's
hyperparameters, fine-tune it epoch by epoch, and measure accuracy, FLOPs, parameters and latency.

``recipes/nni_experiment/trial.py`` calls :func:`run_trial` with ``nni.get_next_parameter()`` and passes
the per-epoch accuracies to ``nni.report_intermediate_result`` and the returned dict to
``nni.report_final_result``. The baseline and the sensitivity scan come from a :class:`SharedCache`,
so only the first trial of an experiment trains and scans.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..app.data import make_loaders, parse_data_spec, subset_splits
from ..app.models import build_model
from ..app.report import flops_kept, latency_fields, method_row, params_kept, speedup
from ..app.training import evaluate_accuracy
from ..app.workflow import RunSettings, make_compressor
from ..errors import HMCConfigError
from ..settings import COMPRESSOR_IMPORTANCES
from ..utils.jsonio import write_json
from ..utils.timing import measure_latency_side_by_side
from .shared_cache import ScanResult, SharedCache

__all__ = ['SEARCHABLE', 'DEFAULT_PARAMETERS', 'FINAL_KEYS', 'TrialOptions', 'trial_settings', 'run_trial',
           'final_result']

_logger = logging.getLogger(__name__)

# Hyperparameters a search space may set -> what is allowed (HMCCompressor checks the values again).
SEARCHABLE = {
    'mode': "'prune', 'decompose', 'ahc', 'nahc' or 'hmc'",
    'margin': "HMC's tau, a number >= 0 or 'inf'; used by mode 'hmc' only ('nahc' is 'hmc' with 0.5)",
    'target_flops': 'fraction of the FLOPs to keep, in (0, 1]',
    'importance': f"channel importance for pruning, one of {COMPRESSOR_IMPORTANCES}",
    'rank_method': "'auto', 'tucker2', 'cp', 'svd' or 'best' (decomposition of kxk convs; 'best': the scan's "
                   'choice per layer)',
    'finetune_epochs': 'fine-tuning epochs after compression, an integer >= 0',
    'finetune_lr': 'fine-tuning learning rate, > 0',
    'sensitivity': "the scan's sensitivity mode, e.g. 'proxy' (default)",
    'distill': 'True to fine-tune with distillation from the uncompressed model',
}


DEFAULT_PARAMETERS: dict[str, Any] = {'mode': 'nahc', 'target_flops': 0.5, 'importance': 'l1', 'rank_method': 'auto',
                                      'finetune_epochs': 2, 'sensitivity': 'proxy'}


# Keys of the final result, filled from the trial's report row by ``final_result`` (``default`` is the
# fine-tuned test accuracy, the metric the tuner maximises).
FINAL_KEYS = ('default', 'acc_zero_shot', 'acc_before', 'flops_kept', 'params_kept', 'flops', 'params',
              'latency_ms', 'latency_ms_before', 'speedup', 'scan_reused', 'scan_seconds', 'seconds')


def _option(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={'help': help_text})


@dataclass
class TrialOptions:
    """What stays fixed over an experiment: the trial command's options (``metadata['help']`` says what each holds)."""

    model: str = _option('resnet20', "zoo name, 'torchvision:NAME' or 'package.module:callable'")
    data: str = _option('digits', "'digits', 'digits_hard', 'cifar10:DIR' or 'imagefolder:DIR'")
    checkpoint: str | None = _option(None, 'trained state_dict to compress (default: train a baseline, once per cache)')
    train_epochs: int = _option(15, 'epochs of the baseline training (when no checkpoint)')
    allow_chance_baseline: bool = _option(False, 'go on when the baseline is within 0.05 of chance accuracy')
    train_images: int | None = _option(None, 'use at most this many training images (default: all)')
    test_images: int | None = _option(None, 'use at most this many test images (default: all)')
    calibration_size: int = _option(64, "images in the proxy scan's calibration batch")
    batch_size: int = _option(64, 'batch size of training, fine-tuning and evaluation')
    latency_repeats: int = _option(21, 'timed batch-1 forward passes per model (the median is reported)')
    threads: int = _option(1, 'torch threads (keep threads x trialConcurrency within the cores)')
    seed: int = _option(0, 'seed of the initial weights, data order and subsets')
    cache_dir: str = _option('~/nni-experiments/hmc_cache', 'folder of the baselines and scans shared by the trials')


def _integer(name: str, value: Any, minimum: int) -> int:
    # NNI's quniform gives floats such as 2.0: accept integral numbers.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise HMCConfigError(f'Got {name}={value!r} but expected an integer >= {minimum}')
    return int(value)


def trial_settings(parameters: dict[str, Any], options: TrialOptions) -> RunSettings:
    """``RunSettings`` of one trial: ``DEFAULT_PARAMETERS`` updated by the tuner's ``parameters``, plus ``options``."""
    unknown = sorted(set(parameters) - set(SEARCHABLE))
    if unknown:
        raise HMCConfigError(f'search space sets {unknown}, which the HMC trial does not know; searchable: '
                             + '; '.join(f'{key}: {allowed}' for key, allowed in SEARCHABLE.items()))
    values = {**DEFAULT_PARAMETERS, **parameters}
    if values['importance'] == 'taylor':
        raise HMCConfigError("Got importance='taylor' but the trial's scan has no labels for its gradients; "
                             f"use one of {COMPRESSOR_IMPORTANCES}")
    margin = values.pop('margin', None) if values['mode'] == 'hmc' else None
    values.pop('margin', None)
    values['finetune_epochs'] = _integer('finetune_epochs', values['finetune_epochs'], 0)
    mode = values.pop('mode')
    return RunSettings(model=options.model, data=options.data, checkpoint=options.checkpoint,
                       train_epochs=options.train_epochs, allow_chance_baseline=options.allow_chance_baseline,
                       calibration_size=options.calibration_size,
                       batch_size=options.batch_size, threads=options.threads, seed=options.seed,
                       methods=(mode,), margin=margin, **values)


def run_trial(parameters: dict[str, Any], options: TrialOptions, *,
              on_epoch: Callable[[int, float], None] | None = None, output_dir: str | Path | None = None,
              progress: bool = False) -> dict[str, float]:
    """Compress, fine-tune and measure one configuration; returns the final result (keys ``FINAL_KEYS``).

    ``on_epoch(epoch, accuracy)`` gets the test accuracy in [0, 1] after each fine-tuning epoch (epoch from 1).
    ``flops_kept`` / ``params_kept`` are fractions of the uncompressed model's MACs / parameters (per image);
    latencies are batch-1 CPU medians in ms measured side by side; ``output_dir`` receives ``plan.json`` and
    ``result.json``.
    """
    started = time.perf_counter()
    settings = trial_settings(parameters, options)
    torch.set_num_threads(options.threads)
    splits = subset_splits(parse_data_spec(options.data), options.train_images, options.test_images, options.seed)
    torch.manual_seed(options.seed)  # initial weights, hence the baseline, are reproducible
    cache = SharedCache(options.cache_dir)
    model = cache.baseline(build_model(options.model, splits.num_classes, splits.in_channels), splits, settings, progress)
    scan = cache.scan(model, splits, settings, progress)

    _, test_loader = make_loaders(splits, settings.batch_size, seed=settings.seed)
    epoch_accuracies: list[float] = []

    def after_epoch(trained, epoch: int) -> None:
        accuracy = evaluate_accuracy(trained, test_loader)
        epoch_accuracies.append(accuracy)
        _logger.info('fine-tuning epoch %d: test accuracy %.4f', epoch, accuracy)
        if on_epoch is not None:
            on_epoch(epoch, accuracy)

    compressor = make_compressor(model, splits, settings, settings.methods[0], table=scan.table, progress=progress,
                                 on_epoch_end=after_epoch)
    compressed, _ = compressor.compress()
    acc_zero_shot = evaluate_accuracy(compressed, test_loader)
    if settings.finetune_epochs:
        torch.manual_seed(settings.seed)
        compressor.finetune(compressed, max_epochs=settings.finetune_epochs)

    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    latency_before, latency_after = measure_latency_side_by_side(
        [model, compressed], dummy_input, warmup=min(5, options.latency_repeats), repeats=options.latency_repeats,
        num_threads=options.threads)
    row = method_row(settings.model, settings.methods[0], model, compressed, dummy_input,
                     acc_before=evaluate_accuracy(model, test_loader), acc_zero_shot=acc_zero_shot,
                     acc_after=epoch_accuracies[-1] if epoch_accuracies else acc_zero_shot,
                     latencies=latency_fields(latency_before, latency_after), target_flops=settings.target_flops,
                     plan=compressor.plan)
    result = final_result(row, scan, seconds=time.perf_counter() - started)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        compressor.plan.to_json(out / 'plan.json')
        write_json({'parameters': parameters, 'settings': settings.as_dict(), 'options': dataclasses.asdict(options),
                    'scan': [str(path) for path in scan.paths], 'epoch_accuracies': epoch_accuracies, 'row': row, 'result': result},
                   out / 'result.json')
    return result


def final_result(row: dict[str, Any], scan: ScanResult, seconds: float) -> dict[str, float]:
    """The trial's final result (``FINAL_KEYS``) from its report row (``app.report.method_row``, batch 1 timed)."""
    return {'default': row['acc_after'], 'acc_zero_shot': row['acc_zero_shot'], 'acc_before': row['acc_before'],
            'flops_kept': flops_kept(row), 'params_kept': params_kept(row),
            'flops': row['flops_after'], 'params': row['params_after'],
            'latency_ms': row['latency_ms_after'], 'latency_ms_before': row['latency_ms_before'],
            'speedup': speedup(row), 'scan_reused': int(scan.reused), 'scan_seconds': scan.seconds, 'seconds': seconds}
