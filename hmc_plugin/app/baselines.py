"""NNI's own structured pruning as a comparison point: ``L1NormPruner`` at one uniform ratio + ``ModelSpeedup``.

Every other method of the benchmarks comes out of HMC's plan builder (``prune``, ``decompose``, ``ahc``,
``nahc``, ``hmc``); this one is what an NNI user gets without HMC: every Conv2d pruned by the same
``sparse_ratio`` of its output channels, ranked by the L1 norm of its filters, then shrunk by NNI's
``ModelSpeedup``. The ratio is found by bisection on the *measured* FLOPs of the pruned model, so the
baseline meets the same budget as the others.

Residual-coupled convs must lose the same channels, or ``ModelSpeedup`` keeps the union of what they
keep. NNI expresses this with ``dependency_group_id`` (the group's L1 norms are averaged and one mask
is shared); NNI 3.0's own finder (``nni.compression.speedup.dependency.auto_set_denpendency_group_ids``)
misses the identity-shortcut chains of a CIFAR ResNet (on ResNet-20 it couples the first block of
each stage only), so the ids come from torch-pruning's groups (``pruning.find_pruning_groups``).

Example
-------
>>> from hmc_plugin.app.models import resnet20
>>> model, dummy = resnet20(), torch.zeros(1, 3, 32, 32)
>>> pruned, info = nni_l1_prune(model, dummy, target_flops=0.5)
>>> abs(info['flops_kept'] - 0.5) <= 0.02
True
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch import nn

from ..engines.pruning import (PruningGroup, channel_masks, find_pruning_groups, group_importances, prune_physically,
                               speedup_with_nni)
from ..errors import HMCConfigError
from ..utils.counting import count_flops, count_params
from .report import flops_kept, params_kept, size_fields

__all__ = ['nni_l1_config', 'nni_l1_masks', 'nni_l1_prune', 'ALLOCATIONS', 'torch_pruning_prune']

ALLOCATIONS = ('uniform', 'global')
MAX_GROUP_RATIO = 0.95  # global allocation never removes more of one group (torch-pruning keeps >= 1 channel too)

_logger = logging.getLogger(__name__)


def nni_l1_config(model: nn.Module, groups: list[PruningGroup], sparse_ratio: float | dict[str, float]
                  ) -> list[dict[str, Any]]:
    """NNI ``config_list``: ``sparse_ratio`` (one for all, or per group leader) on every Conv2d of every
    pruning group, one ``dependency_group_id`` per group (groups holding a non-Conv2d member are left alone)."""
    modules = dict(model.named_modules())
    config_list = []
    for group in groups:
        ratio = sparse_ratio.get(group.name, 0.0) if isinstance(sparse_ratio, dict) else sparse_ratio
        if ratio > 0 and all(isinstance(modules[name], nn.Conv2d) for name in group.members):
            config_list.append({'op_names': list(group.members), 'sparse_ratio': float(ratio),
                                'dependency_group_id': group.name})
    return config_list


def nni_l1_masks(model: nn.Module, groups: list[PruningGroup], sparse_ratio: float | dict[str, float]
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """NNI-format masks of ``L1NormPruner``; ``model`` is wrapped and unwrapped again, unchanged."""
    with warnings.catch_warnings():  # NNI 3.0 registers pytree nodes with a deprecated torch API
        warnings.simplefilter('ignore', FutureWarning)
        warnings.simplefilter('ignore', UserWarning)
        from nni.compression.pruning import L1NormPruner

    config_list = nni_l1_config(model, groups, sparse_ratio)
    if not config_list:
        return {}
    pruner = L1NormPruner(model, config_list)
    try:
        _, masks = pruner.compress()
    finally:
        pruner.unwrap_model()
    return masks


def _budget(model: nn.Module, dummy_input: Any, target_flops: float | None, target_params: float | None):
    """``(name, target, kept)`` of the one budget given: ``kept(pruned)`` is the fraction of the FLOPs (MACs) or of
    the parameters ``pruned`` keeps of ``model``'s."""
    if (target_flops is None) == (target_params is None):
        raise HMCConfigError('Got ' + ('both target_flops and target_params' if target_flops is not None else
                                       'neither target_flops nor target_params') + ' but expected exactly one budget')
    name, target = ('target_flops', target_flops) if target_flops is not None else ('target_params', target_params)
    if not (isinstance(target, (int, float)) and 0.0 < target < 1.0):
        raise HMCConfigError(f'Got {name}={target!r} but expected a fraction to keep in (0, 1)')
    if name == 'target_flops':
        full = count_flops(model, dummy_input)
        return name, float(target), lambda pruned: count_flops(pruned, dummy_input) / full
    full = count_params(model)
    return name, float(target), lambda pruned: count_params(pruned) / full


def _kept_fractions(model: nn.Module, pruned: nn.Module, dummy_input: Any) -> tuple[float, float]:
    """The fractions of ``model``'s FLOPs and parameters ``pruned`` keeps (``report.size_fields``)."""
    sizes = size_fields(model, pruned, dummy_input)
    return flops_kept(sizes), params_kept(sizes)


def _bisect(kept_at, target: float, low: float, high: float, tolerance: float, iterations: int):
    """Ratios ``(lower, upper)`` around the target (``kept_at`` falls with the ratio), the closest one, steps."""
    best = None
    steps = 0
    for steps in range(1, iterations + 1):
        ratio = (low + high) / 2
        kept = kept_at(ratio)
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (ratio, kept)
        if abs(kept - target) <= tolerance:
            break
        if kept > target:
            low = ratio
        else:
            high = ratio
    return low, best, steps


def nni_l1_prune(model: nn.Module, dummy_input: Any, *, target_flops: float | None = None,
                 target_params: float | None = None, tolerance: float = 0.005, max_iterations: int = 14,
                 speedup: str = 'nni') -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``model`` keeping ``target_flops`` of its FLOPs (or ``target_params`` of its parameters):
    NNI ``L1NormPruner`` + ``ModelSpeedup``.

    The ratio is one ``sparse_ratio`` for every group, found by bisection on the measured FLOPs (parameters).
    Channel counts are integers, so the kept fraction jumps as the ratio grows (on ResNet-20, from
    0.532 to 0.478 when the 16-channel groups lose a fifth channel); when the uniform ratio cannot
    land within ``tolerance``, the groups with the most channels (the finest steps) get their own
    ratio, bisected again from the uniform one.

    Parameters
    ----------
    model
        Not modified.
    dummy_input
        Example input (batch 1) for tracing and counting.
    target_flops, target_params
        Fraction of the FLOPs (MACs) or of the parameters to keep, in (0, 1); exactly one of them.
    tolerance
        Bisection stops once the measured fraction is this close to the target; the closest reachable
        fraction is used otherwise, and more than 0.02 away is an error.
    speedup
        ``'nni'`` (``ModelSpeedup``, the default) or ``'torch_pruning'`` for the final model; the
        bisection always measures through torch-pruning's physical pruning (same architecture, faster).

    Returns
    -------
    (nn.Module, dict)
        The pruned model and ``{'sparse_ratio', 'widest_ratio', 'flops_kept', 'params_kept', 'iterations',
        'masks'}`` (``masks``: the NNI masks that were applied, e.g. for ``engines.datafit.fit_to_data``).
    """
    budget, target, kept_of = _budget(model, dummy_input, target_flops, target_params)
    groups = find_pruning_groups(model, dummy_input)
    widest = max(group.channels for group in groups)

    def kept_with(ratios: dict[str, float]) -> float:
        pruned = copy.deepcopy(model)
        pruned = prune_physically(pruned, dummy_input, nni_l1_masks(pruned, groups, ratios))
        return kept_of(pruned)

    def uniform(ratio: float) -> dict[str, float]:
        return {group.name: ratio for group in groups}

    def widest_at(base: float):
        return lambda ratio: {group.name: ratio if group.channels == widest else base for group in groups}

    lower, (ratio, kept), steps = _bisect(lambda r: kept_with(uniform(r)), target, 0.0, 0.99, tolerance,
                                          max_iterations)
    ratios = uniform(ratio)
    widest_ratio = ratio
    if abs(kept - target) > tolerance:
        ratios_at = widest_at(lower)
        _, (widest_ratio, kept), more = _bisect(lambda r: kept_with(ratios_at(r)), target, lower, 0.99,
                                                tolerance, max_iterations)
        ratio, ratios, steps = lower, ratios_at(widest_ratio), steps + more
    if abs(kept - target) > 0.02:
        raise HMCConfigError(f'Got {budget}={target} but L1 ratios reach {kept:.3f} at best')
    final = copy.deepcopy(model)
    masks = nni_l1_masks(final, groups, ratios)
    final = speedup_with_nni(final, dummy_input, masks) if speedup == 'nni' else prune_physically(final, dummy_input, masks)
    flops, params = _kept_fractions(model, final, dummy_input)
    _logger.info('NNI L1NormPruner: sparse_ratio %.4f (widest groups %.4f) keeps %.4f of the FLOPs, %.4f of the '
                 'parameters (%d steps)', ratio, widest_ratio, flops, params, steps)
    return final, {'sparse_ratio': ratio, 'widest_ratio': widest_ratio, 'flops_kept': flops, 'params_kept': params,
                   'iterations': steps, 'masks': masks}


def torch_pruning_prune(model: nn.Module, dummy_input: Any, *, target_flops: float | None = None,
                        target_params: float | None = None, importance: str = 'l2', allocation: str = 'global',
                        calibration: tuple[torch.Tensor, torch.Tensor] | None = None, tolerance: float = 0.005,
                        max_iterations: int = 16, speedup: str = 'nni') -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``model`` keeping ``target_flops`` of its FLOPs (or ``target_params`` of its parameters;
    exactly one of them), pruned the way torch-pruning prunes.

    Channels are ranked by torch-pruning's group importance (``'l2'``: group-norm, ``GroupMagnitudeImportance(p=2)``;
    ``'l1'``, ``'fpgm'``, ``'bn_scale'``, or ``'taylor'``: ``GroupTaylorImportance`` on the cross-entropy gradients
    of ``calibration``) over every member, BatchNorm and consumer of each dependency group. ``allocation``:

    - ``'uniform'``: every group loses the same fraction of its channels;
    - ``'global'``: torch-pruning's global pruning: the mean-normalised scores of all groups are ranked together
      and every channel below one threshold goes (at most ``MAX_GROUP_RATIO`` of a group).

    The ratio (uniform) or the threshold (global) is found by bisection on the measured FLOPs (parameters), so the
    baseline meets the same budget as HMC. ``model`` is not modified; the head's outputs are never pruned.

    Returns
    -------
    (nn.Module, dict)
        The pruned model and ``{'importance', 'allocation', 'ratios' (group -> fraction pruned), 'flops_kept',
        'params_kept', 'iterations', 'masks'}`` (``masks``: the NNI masks applied, e.g. for
        ``engines.datafit.fit_to_data``).
    """
    budget, target, kept_of = _budget(model, dummy_input, target_flops, target_params)
    if allocation not in ALLOCATIONS:
        raise HMCConfigError(f'Got allocation={allocation!r} but expected one of {ALLOCATIONS}')
    scores = group_importances(model, dummy_input, importance=importance, calibration=calibration)

    def masks_for(ratios: dict[str, float]) -> dict[str, dict[str, torch.Tensor]]:
        ratios = {name: ratio for name, ratio in ratios.items() if ratio > 0}
        return channel_masks(model, dummy_input, ratios, importance=importance, calibration=calibration) if ratios else {}

    def kept_with(ratios: dict[str, float]) -> float:
        return kept_of(prune_physically(copy.deepcopy(model), dummy_input, masks_for(ratios)))

    if allocation == 'uniform':
        ratios_at = lambda ratio: dict.fromkeys(scores, ratio)  # noqa: E731
        high = 0.99
    else:
        ratios_at = lambda threshold: {name: min(MAX_GROUP_RATIO, float((values < threshold).float().mean()))  # noqa: E731
                                       for name, values in scores.items()}
        high = float(max(values.max() for values in scores.values())) * 1.0001
    _, (point, kept), steps = _bisect(lambda value: kept_with(ratios_at(value)), target, 0.0, high, tolerance,
                                      max_iterations)
    if abs(kept - target) > 0.02:
        raise HMCConfigError(f'Got {budget}={target} but {allocation} {importance} pruning reaches '
                             f'{kept:.3f} at best')
    ratios = ratios_at(point)
    masks = masks_for(ratios)
    final = copy.deepcopy(model)
    final = speedup_with_nni(final, dummy_input, masks) if speedup == 'nni' else prune_physically(final, dummy_input, masks)
    flops, params = _kept_fractions(model, final, dummy_input)
    _logger.info('torch-pruning %s %s: keeps %.4f of the FLOPs, %.4f of the parameters (%d steps)', allocation,
                 importance, flops, params, steps)
    return final, {'importance': importance, 'allocation': allocation, 'ratios': ratios, 'flops_kept': flops,
                   'params_kept': params, 'iterations': steps, 'masks': masks}
