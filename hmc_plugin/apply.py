"""Apply a ``CompressionPlan``: pruning masks -> speedup -> refit and low rank -> BatchNorm recalibration.

Apply order is fixed: the pruning groups' channel masks are computed with torch-pruning, the model
is shrunk (NNI ``ModelSpeedup`` by default, torch-pruning's physical pruning as the fast path),
then, with calibration data (``engines.datafit.DataFit``), the consumers of pruned channels are refitted
and the decomposed layers replaced by factors fitted to their inputs, layer by layer (without data: the
data-free factors at the plan's ranks); last, every BatchNorm's statistics are re-estimated.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .engines.batchnorm import recalibrate_bn
from .engines.datafit import DataFit, fit_to_data
from .engines.lowrank import decompose_layers
from .engines.pruning import prune_physically, speedup_with_nni
from .errors import HMCConfigError
from .planning.measure import plan_masks
from .planning.plan import CompressionPlan
from .settings import SPEEDUPS
from .utils.memory import release_memory

__all__ = ['SPEEDUPS', 'DataFit', 'apply_plan']


def apply_plan(model: nn.Module, plan: CompressionPlan, dummy_input: Any, *, speedup: str = 'nni',
               masks: dict | None = None, calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
               data: DataFit | None = None, memory_budget: int | None = None) -> nn.Module:
    """Compress ``model`` in place by ``plan`` and return it (the same object for ``torch_pruning``).

    ``masks`` may be given (e.g. from ``plan_masks``) to skip recomputing them; ``calibration`` is the labelled
    batch of ``importance='taylor'``. ``data`` turns on the data-aware steps (module docstring); ``None`` is the
    data-free apply. Applying the same plan with the same data to a fresh copy of the same architecture with
    the same weights gives the same model. ``memory_budget`` (MiB) bounds NNI's sparsity inference
    (``engines.pruning.nni_batch_size``) and the data-aware fit (``engines.datafit.fit_to_data``).
    """
    if speedup not in SPEEDUPS:
        raise HMCConfigError(f'Got speedup={speedup!r} but expected one of {SPEEDUPS}')
    masks = plan_masks(model, plan, dummy_input, calibration) if masks is None else masks
    fits = data is not None and bool(data.batches) and (data.data_aware or (data.reconstruct and bool(masks)))
    original = copy.deepcopy(model) if fits else None
    if masks:
        model = prune_physically(model, dummy_input, masks) if speedup == 'torch_pruning' else \
            speedup_with_nni(model, dummy_input, masks, memory_budget=memory_budget)
        release_memory()  # NNI's mask propagation leaves gigabytes of freed tensors in the heap
    if fits:
        fit_to_data(original, model, list(data.batches), ranks=plan.ranks, methods=plan.methods, masks=masks,
                    reconstruct=data.reconstruct, data_aware=data.data_aware, sequential=data.sequential,
                    memory_budget=memory_budget)
    elif plan.ranks:
        decompose_layers(model, plan.ranks, method=plan.methods)
    if data is not None and data.bn_batches:
        recalibrate_bn(model, data.bn_batches)
    release_memory()
    return model
