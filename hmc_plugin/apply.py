"""Apply a ``CompressionPlan``: pruning masks -> speedup -> low-rank replacement (plan -> model, nothing else).

Apply order is fixed: the pruning groups' channel masks are computed with torch-pruning, the model
is shrunk (NNI ``ModelSpeedup`` by default, torch-pruning's physical pruning as the fast path),
then the decomposed layers are replaced by their low-rank containers at the plan's ranks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .engines.lowrank import decompose_layers
from .engines.pruning import speedup_with_nni
from .errors import HMCConfigError
from .planning.measure import compress_fast, plan_masks
from .planning.plan import CompressionPlan
from .settings import SPEEDUPS

__all__ = ['SPEEDUPS', 'apply_plan']



def apply_plan(model: nn.Module, plan: CompressionPlan, dummy_input: Any, *, speedup: str = 'nni',
               masks: dict | None = None, calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """Compress ``model`` in place by ``plan`` and return it (the same object for both speedups).

    ``masks`` may be given (e.g. from ``plan_masks``) to skip recomputing them. Applying the same plan
    to a fresh copy of the same architecture with the same weights gives the same model.
    """
    if speedup not in SPEEDUPS:
        raise HMCConfigError(f'Got speedup={speedup!r} but expected one of {SPEEDUPS}')
    masks = plan_masks(model, plan, dummy_input, calibration) if masks is None else masks
    if speedup == 'torch_pruning':
        return compress_fast(model, plan, dummy_input, masks)
    if masks:
        model = speedup_with_nni(model, dummy_input, masks)
    if plan.ranks:
        decompose_layers(model, plan.ranks, method=plan.methods)
    return model
