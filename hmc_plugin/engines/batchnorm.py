"""BatchNorm recalibration (adaptive BN): re-estimate every BatchNorm's running statistics on a few batches.

After pruning or decomposition the activations a BatchNorm normalises have new means and variances,
while its buffers still hold the uncompressed network's. ``recalibrate_bn`` resets them and takes the
cumulative average (``momentum=None``) over a few training batches, in train mode, without gradients;
weights and biases are untouched and every module's train/eval flag is restored afterwards. Li et al.
(EagleEye, ECCV 2020) show that accuracy after this step predicts accuracy after fine-tuning.

Only the BatchNorm layers run in train mode: dropout and other mode-dependent layers stay as they were,
so the statistics are those of the network the user evaluates.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..errors import HMCConfigError, UntraceableModelError
from .moments import batch_inputs

__all__ = ['batchnorm_layers', 'bn_state', 'restore_bn_state', 'recalibrate_bn', 'recalibrated_bn', 'fold_batchnorm']

_logger = logging.getLogger(__name__)

_STATISTICS = ('running_mean', 'running_var', 'num_batches_tracked')


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (1d/2d/3d, SyncBatchNorm) of ``model`` that tracks running statistics, by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and module.running_mean is not None}


def bn_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every tracked BatchNorm's running statistics (``{name: {buffer: tensor}}``)."""
    return {name: {key: getattr(module, key).clone() for key in _STATISTICS if getattr(module, key) is not None}
            for name, module in batchnorm_layers(model).items()}


def restore_bn_state(model: nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put back the statistics :func:`bn_state` copied (in place, same tensors as the model holds)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, buffers in state.items():
            for key, value in buffers.items():
                getattr(modules[name], key).copy_(value)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], *, warn: bool = True) -> int:
    """Re-estimate every BatchNorm's ``running_mean`` / ``running_var`` from ``batches``; return the batch count.

    Parameters
    ----------
    model : nn.Module
        Changed in place: only the BatchNorm buffers (``running_mean``, ``running_var``,
        ``num_batches_tracked``). Parameters stay bit-identical; every module's train/eval flag and each
        BatchNorm's ``momentum`` are restored.
    batches : iterable
        Batches of model inputs: tensors ``(N, ...)``, tuples of inputs, or a DataLoader's
        ``(inputs, targets)`` pairs (the targets are ignored). All of them are used (cap them yourself).
    warn : bool
        Log a warning when the model has no BatchNorm to recalibrate or a BatchNorm does not track
        running statistics (``track_running_stats=False``: it normalises by the batch and is left alone).

    Raises
    ------
    HMCConfigError
        ``batches`` is empty, or the re-estimated statistics of a layer are NaN/Inf (the statistics are
        then put back as they were, and the error names the layer).
    """
    layers = batchnorm_layers(model)
    if warn:
        untracked = [name for name, module in model.named_modules()
                     if isinstance(module, nn.modules.batchnorm._BatchNorm) and name not in layers]
        if untracked:
            _logger.warning('BatchNorm recalibration skips %s: track_running_stats=False (they normalise by each '
                            'batch and hold no statistics)', ', '.join(untracked))
        if not layers:
            _logger.warning('BatchNorm recalibration: %s has no BatchNorm with running statistics; nothing to do',
                            type(model).__name__)
    if not layers:
        return 0
    saved = bn_state(model)
    modes = {module: module.training for module in model.modules()}
    momenta = {name: module.momentum for name, module in layers.items()}
    count = 0
    try:
        for module in layers.values():
            module.reset_running_stats()
            module.momentum = None  # cumulative moving average over the batches
            module.train()
        for batch in batches:
            model(*batch_inputs(batch))
            count += 1
        if count == 0:
            raise HMCConfigError('BatchNorm recalibration got no batches; give calibration inputs or a calibration '
                                 'loader, or set bn_batches=0 to turn it off')
        bad = [name for name, module in layers.items()
               if not (torch.isfinite(module.running_mean).all() and torch.isfinite(module.running_var).all())]
        if bad:
            raise HMCConfigError(f'BatchNorm recalibration gave NaN or Inf statistics in {bad[:3]} (the activations '
                                 f'feeding them are not finite); the statistics were put back. Check the calibration '
                                 f'inputs, or set bn_batches=0')
    except BaseException:
        restore_bn_state(model, saved)
        raise
    finally:
        for name, module in layers.items():
            module.momentum = momenta[name]
        for module, training in modes.items():
            module.train(training)
    return count


@contextlib.contextmanager
def recalibrated_bn(model: nn.Module, batches: Iterable[Any] | None) -> Iterator[None]:
    """Recalibrate the BatchNorm statistics for the block, put the previous ones back after (a no-op for None)."""
    if not batches:
        yield
        return
    saved = bn_state(model)
    try:
        recalibrate_bn(model, batches, warn=False)
        yield
    finally:
        restore_bn_state(model, saved)



def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm folded into the Conv2d or Linear before it.

    ``torch.fx.experimental.optimization.fuse`` (``fuse_conv_bn_eval``) on a traced copy in eval mode: a BatchNorm
    whose input is the output of a conv used nowhere else becomes that conv's scale and bias, including the last
    1x1 of a Tucker-2 chain and the second conv of an SVD pair (their containers are traced through). BatchNorms
    after anything else (an addition, a pooling) stay. Returns a ``torch.fx.GraphModule`` in eval mode with the
    same outputs up to float rounding; ``model`` is left as it was. ``UntraceableModelError`` when ``torch.fx``
    cannot trace it.
    """
    from torch.fx.experimental.optimization import fuse

    scratch = copy.deepcopy(model).eval()
    try:
        folded = fuse(scratch, inplace=True)
    except Exception as error:
        raise UntraceableModelError(f'Cannot fold the BatchNorms of {type(model).__name__}: torch.fx cannot trace it '
                                    f'({type(error).__name__}: {error}); export or time it unfolded') from error
    remaining = [name for name, module in folded.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    _logger.info('Folded %d BatchNorm(s) into the layers before them; %d stay (not after a conv or linear)',
                 len(batchnorm_layers(model)) - len(remaining), len(remaining))
    return folded.eval()

