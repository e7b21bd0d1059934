"""Channel pruning: torch-pruning groups -> NNI masks -> smaller dense modules.

The flow is ``find_pruning_groups`` (which layers share out channels), ``channel_masks`` (which
channels to drop, scored on the whole group; the model is never touched) and then one of two
ways to apply the masks: ``speedup_with_nni`` (NNI's ``ModelSpeedup`` on a ``torch.fx`` graph) or
``prune_physically`` (torch-pruning's ``group.prune()``, the fast path). Both give the same
architecture and the same outputs for the same masks. ``group_channel_selections`` also says, for each
consumer of a group, which of its inputs survive (what a reconstruction of the consumer may still read).

Dependencies are never re-derived here: a torch-pruning ``DependencyGraph`` says which layers are
coupled (a residual addition ties the out channels of every conv that feeds it), so coupled layers
always get identical masks and NNI's mask-conflict repair has nothing to do.

Example
-------
>>> from hmc_plugin.app.models import resnet20
>>> model, dummy = resnet20(), torch.randn(1, 3, 32, 32)
>>> groups = find_pruning_groups(model, dummy)
>>> masks = channel_masks(model, dummy, {'layer1.0.conv1': 0.5})
>>> model = prune_physically(model, dummy, masks)
>>> model.layer1[0].conv1.out_channels
8
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch_pruning as tp
from torch import Tensor, nn

from ..errors import HMCConfigError, UntraceableModelError
from ..settings import IMPORTANCES
from ..utils.counting import as_input_tuple
from ..utils.memory import activation_bytes, budget_bytes

__all__ = ['IMPORTANCES', 'PruningGroup', 'GroupSelection', 'kept_channels', 'find_pruning_groups',
           'group_channel_masks', 'group_channel_selections', 'group_importances', 'channel_masks', 'trace_model',
           'speedup_with_nni', 'nni_batch_size',
           'prune_physically', 'preserved_modes']

_logger = logging.getLogger(__name__)



_ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


_MASKED_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class PruningGroup:
    """Layers whose out channels must be pruned together (one torch-pruning group).

    Attributes
    ----------
    name : str
        The leader: the first member in ``named_modules`` order; ratios are keyed by it.
    members : tuple of str
        Every Conv/Linear whose out channels this group prunes (leader included).
    consumers : tuple of str
        Every Conv/Linear whose in channels shrink with the group.
    channels : int
        Number of coupled channels (out channels of the leader).
    """

    name: str
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    channels: int


@dataclass(frozen=True)
class GroupSelection:
    """One group pruned at one ratio: the out-channel masks and what each consumer keeps of its input.

    Attributes
    ----------
    masks : dict
        NNI masks ``{module_name: {'weight': mask, 'bias': mask}}`` of the group's out-channel side
        (as :func:`group_channel_masks` gives them).
    consumer_keep : dict of str to Tensor
        ``{consumer_name: keep}`` for every Conv (groups=1, not transposed) and Linear reading the group's
        channels: ``keep`` is a bool vector over the consumer's input dimension (``weight.shape[1]``),
        False where the input comes from a pruned channel. A Linear after a flatten has one entry per
        flattened feature (torch-pruning expands the channel indices). Grouped and transposed convs are left out.
    """

    masks: dict[str, dict[str, Tensor]]
    consumer_keep: dict[str, Tensor]


def kept_channels(channels: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept when pruning ``ratio`` of ``channels``, by torch-pruning's rule.

    ``kept = int(channels * (1 - ratio))`` rounded down to a multiple of ``round_to``, but never
    below 1, nor below ``round_to`` when ``round_to <= channels``.
    """
    kept = int(channels * (1.0 - ratio))
    kept -= kept % max(round_to, 1)
    floor = round_to if 1 <= round_to <= channels else 1
    return min(channels, max(kept, floor))


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag (by name) on exit, also for replaced modules."""
    modes = {name: module.training for name, module in model.named_modules()}
    try:
        yield
    finally:
        for name, module in model.named_modules():
            if name in modes:
                module.training = modes[name]


@contextlib.contextmanager
def _quiet_nni() -> Iterator[logging.Logger]:
    """Yield an ERROR-level logger for ``ModelSpeedup`` (its own one logs every node at INFO).

    NNI's other loggers go to ERROR too: its only warning on our masks, "both dim0 and dim1 masks
    found" on residual groups, is benign (outputs are tested equal to torch-pruning's). A stray
    ``print`` in its mask-conflict code is captured and logged at DEBUG.
    """
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == 'nni' or name.startswith('nni.')]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.ERROR))
    speedup_logger = logging.getLogger(f'{__name__}.model_speedup')
    speedup_logger.setLevel(logging.ERROR)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield speedup_logger
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if printed.getvalue():
            _logger.debug('NNI printed: %s', printed.getvalue().strip())


def _build_graph(model: nn.Module, dummy_input: Any) -> tp.DependencyGraph:
    """torch-pruning graph of ``model``, built in eval mode so BN running stats do not move."""
    with preserved_modes(model), torch.enable_grad():
        model.eval()
        try:
            # forward_fn: torch-pruning would otherwise retry ``model(inputs_tuple)`` after any failure and
            # report that second, meaningless error instead of the real one (e.g. a dtype mismatch)
            return tp.DependencyGraph().build_dependency(model, example_inputs=as_input_tuple(dummy_input),
                                                         forward_fn=lambda module, inputs: module(*inputs))
        except Exception as error:
            raise UntraceableModelError(
                f'torch-pruning could not build the dependency graph of {type(model).__name__}: {error}. '
                f'Make sure the model runs on the given dummy input with autograd enabled.') from error


def _is_out_fn(graph: tp.DependencyGraph, item: Any) -> bool:
    return graph.is_out_channel_pruning_fn(item.dep.handler)


def _channel_groups(group: Any) -> int:
    """How many equal slices a group's channels form (grouped convs); depthwise convs do not count."""
    counts = [1]
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups != module.out_channels:
            counts.append(module.groups)
    return max(counts)


def _head_layers(model: nn.Module) -> list[nn.Module]:
    """The last Conv/Linear in ``named_modules`` order: its outputs are the model's outputs."""
    layers = [module for module in model.modules() if isinstance(module, _ROOT_TYPES)]
    return layers[-1:]


def _resolve_names(model: nn.Module, names: Iterable[str], what: str) -> list[nn.Module]:
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        example = next((n for n, m in modules.items() if isinstance(m, _ROOT_TYPES)), '')
        raise HMCConfigError(f'Got {what}={unknown} but {type(model).__name__} has no such module; '
                             f'expected names from model.named_modules(), e.g. {example!r}')
    return [modules[name] for name in names]


def _groups(model: nn.Module, dummy_input: Any, ignored_layers: Iterable[str] = ()
            ) -> tuple[tp.DependencyGraph, list[tuple[PruningGroup, Any]]]:
    """Graph plus ``(PruningGroup, tp group over all channels)`` pairs in ``named_modules`` order."""
    ignored = []
    for module in _resolve_names(model, list(ignored_layers), 'ignored_layers') + _head_layers(model):
        ignored.extend(module.modules())
    graph = _build_graph(model, dummy_input)
    order = {module: index for index, (_, module) in enumerate(model.named_modules())}
    names = {module: name for name, module in model.named_modules()}
    found = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=_ROOT_TYPES):
        members, consumers = [], []
        for item in group:
            module = item.dep.target.module
            if isinstance(module, _ROOT_TYPES) and module in names:
                (members if _is_out_fn(graph, item) else consumers).append(module)
        if not members or not consumers:  # no consumer: these channels are model outputs
            continue
        members = sorted(set(members), key=order.get)
        consumers = sorted(set(consumers), key=order.get)
        found.append((order[members[0]], PruningGroup(
            name=names[members[0]], members=tuple(names[m] for m in members),
            consumers=tuple(names[m] for m in consumers), channels=graph.get_out_channels(members[0])), group))
    found.sort(key=lambda entry: entry[0])  # tp yields groups from the output backwards
    return graph, [(pruning_group, group) for _, pruning_group, group in found]


def find_pruning_groups(model: nn.Module, dummy_input: Any, ignored_layers: Iterable[str] = ()) -> list[PruningGroup]:
    """Every set of Conv/Linear layers whose out channels must be pruned together.

    Parameters
    ----------
    model : nn.Module
        Not modified (the graph is traced in eval mode; the train/eval flags are restored).
    dummy_input : Tensor or tuple of Tensor
        Example input, e.g. ``(1, 3, 32, 32)``.
    ignored_layers : iterable of str
        Module names never pruned on their outputs; a group holding one of them is dropped.
        The head (last Conv/Linear) and any group whose channels reach the output unconsumed are
        always left out.

    Returns
    -------
    list of PruningGroup
        Ordered by the leader's position in ``model.named_modules()``. In a CIFAR ResNet the stem
        conv and every ``conv2`` of stage 1 form one group; each block's ``conv1`` is its own.

    Raises
    ------
    HMCConfigError
        An ignored layer name is not a module of ``model``.
    UntraceableModelError
        torch-pruning cannot build the dependency graph.
    """
    _, found = _groups(model, dummy_input, ignored_layers)
    return [pruning_group for pruning_group, _ in found]


def _importance(name: str) -> tp.importance.Importance:
    if name == 'l1':
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == 'l2':
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == 'fpgm':
        return tp.importance.FPGMImportance()
    if name == 'bn_scale':
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupTaylorImportance()


def _check_ratio(key: str, ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise HMCConfigError(f'Got ratio={ratio!r} for {key!r} but expected a float in [0, 1)')
    return float(ratio)


def _out_dim(module: nn.Module) -> int:
    return 1 if getattr(module, 'transposed', False) else 0


def _row_mask(param: Tensor, keep: Tensor, dim: int) -> Tensor:
    """0/1 mask of ``param``'s shape that zeroes the slices ``keep == 0`` along ``dim``."""
    shape = [1] * param.dim()
    shape[dim] = -1
    return keep.to(param.dtype).view(shape).expand_as(param).clone()


def _pruned_channels(scores: Tensor, ratio: float, round_to: int, slices: int) -> Tensor:
    """Root indices to prune: the lowest scores, the same positions in each of ``slices`` slices."""
    slice_size = scores.numel() // slices
    slice_scores = scores.view(slices, slice_size).mean(0) if slices > 1 else scores
    n_pruned = slice_size - kept_channels(slice_size, ratio, round_to)
    lowest = torch.argsort(slice_scores.float().cpu(), stable=True)[:n_pruned]
    return torch.cat([lowest + index * slice_size for index in range(slices)])


def _group_masks(graph: tp.DependencyGraph, group: Any, pruned: Tensor, names: dict) -> dict[str, dict[str, Tensor]]:
    """NNI masks for the out-channel side of every Conv/Linear/BN item of a tp group."""
    pruned_roots = set(pruned.tolist())
    masks = {}
    for item in group:
        module = item.dep.target.module
        if not _is_out_fn(graph, item) or not isinstance(module, _MASKED_TYPES) or module not in names:
            continue
        if getattr(module, 'weight', None) is None:  # BN without affine: nothing to mask
            continue
        dim = _out_dim(module)
        keep = torch.ones(module.weight.shape[dim], device=module.weight.device)
        for index, root in zip(item.idxs, item.root_idxs):
            if root in pruned_roots:
                keep[index] = 0
        masks[names[module]] = {'weight': _row_mask(module.weight.detach(), keep, dim)}
        if getattr(module, 'bias', None) is not None:
            masks[names[module]]['bias'] = _row_mask(module.bias.detach(), keep, 0)
    return masks


def _consumer_keeps(graph: tp.DependencyGraph, group: Any, pruned: Tensor, names: dict) -> dict[str, Tensor]:
    """Each consumer's kept inputs when a tp group loses its root channels ``pruned``: bool ``(weight.shape[1],)``.

    The in-channel items of a group index the consumer's input dimension (``item.idxs``) and name the root
    channel each index comes from (``item.root_idxs``).
    """
    pruned_roots = set(pruned.tolist())
    keeps: dict[str, Tensor] = {}
    for item in group:
        module = item.dep.target.module
        if _is_out_fn(graph, item) or module not in names or not _reads_input_columns(module):
            continue
        keep = keeps.get(names[module])
        if keep is None:
            keep = torch.ones(module.weight.shape[1], dtype=torch.bool, device=module.weight.device)
        for index, root in zip(item.idxs, item.root_idxs):
            if root in pruned_roots:
                keep[index] = False
        keeps[names[module]] = keep
    return keeps


def _reads_input_columns(module: nn.Module) -> bool:
    """A Linear or a plain conv (groups=1, not transposed): weight dim 1 is its whole input."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 and not module.transposed


def group_channel_masks(model: nn.Module, dummy_input: Any, ratios: dict[str, float], *, importance: str = 'l1',
                        round_to: int = 1, ignored_layers: Iterable[str] = (),
                        calibration: tuple[Tensor, Tensor] | None = None) -> dict[str, dict[str, dict[str, Tensor]]]:
    """Which channels to prune, as NNI masks per group ``{group_name: masks}``; ``model`` is left exactly as it was.

    Parameters
    ----------
    model : nn.Module
        Scored on a deep copy: parameters, gradients, ``requires_grad`` and BN statistics stay.
    dummy_input : Tensor or tuple of Tensor
        Example input for the dependency graph.
    ratios : dict of str to float
        Group name (or the name of any member of the group) -> fraction of its channels to prune,
        in [0, 1). Kept channels follow :func:`kept_channels`.
    importance : {'l1', 'l2', 'fpgm', 'bn_scale', 'taylor'}
        torch-pruning scorer applied to the whole group (all members, BNs and consumers).
    round_to : int
        Keep a multiple of this many channels.
    ignored_layers : iterable of str
        As in :func:`find_pruning_groups`.
    calibration : (inputs, targets), optional
        A batch, inputs ``(N, ...)`` and class targets ``(N,)``, for the cross-entropy gradients
        that ``'taylor'`` needs.

    Returns
    -------
    dict
        ``{group_name: {module_name: {'weight': mask, 'bias': mask}}}`` for every Conv/Linear/BatchNorm on the
        out-channel side of each group in ``ratios``: 0/1 tensors of the parameter's shape and
        dtype. Coupled layers get identical channel masks, and ``param * mask`` makes the pruned
        channels exactly zero.

    Raises
    ------
    HMCConfigError
        Unknown importance, group name or ignored layer; ratio outside [0, 1); ``'taylor'``
        without ``calibration``; two names of one group with different ratios.
    """
    selections = group_channel_selections(model, dummy_input, ratios, importance=importance, round_to=round_to,
                                          ignored_layers=ignored_layers, calibration=calibration)
    return {name: selection.masks for name, selection in selections.items()}


def group_channel_selections(model: nn.Module, dummy_input: Any, ratios: dict[str, float], *, importance: str = 'l1',
                             round_to: int = 1, ignored_layers: Iterable[str] = (),
                             calibration: tuple[Tensor, Tensor] | None = None) -> dict[str, GroupSelection]:
    """:func:`group_channel_masks` plus each consumer's kept inputs: ``{group_name: GroupSelection}``.

    Same arguments, same masks and errors; ``model`` is left exactly as it was. A consumer's kept inputs are
    the producer's kept out channels, as the consumer sees them (through BatchNorms, ReLUs, residual sums and
    flattens): what a reconstruction of the consumer may still read.
    """
    checked = _checked_ratios(ratios, importance, round_to, calibration)
    # A copy keeps the caller's grads, BN statistics and requires_grad flags untouched.
    scratch = copy.deepcopy(model)
    graph, found = _groups(scratch, dummy_input, ignored_layers)
    group_ratios = _ratio_per_group(found, checked)
    if importance == 'taylor':
        _accumulate_gradients(scratch, calibration)
    return _selections_per_group(graph, scratch, group_ratios, importance, round_to)


def _checked_ratios(ratios: dict[str, float], importance: str, round_to: Any,
                    calibration: tuple[Tensor, Tensor] | None) -> dict[str, float]:
    """``ratios`` as floats, after checking them and the other arguments of :func:`group_channel_masks`."""
    if importance not in IMPORTANCES:
        raise HMCConfigError(f'Got importance={importance!r} but expected one of {IMPORTANCES}')
    if importance == 'taylor' and calibration is None:
        raise HMCConfigError("Got importance='taylor' without calibration; pass calibration=(inputs, targets)")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise HMCConfigError(f'Got round_to={round_to!r} but expected an int >= 1')
    return {key: _check_ratio(key, ratio) for key, ratio in ratios.items()}


def _ratio_per_group(found: list[tuple[PruningGroup, Any]], ratios: dict[str, float]) -> dict[str, tuple[float, Any]]:
    """Group name -> ``(ratio, tp group)`` from ratios keyed by group names or members; one ratio per group."""
    by_name = {}
    for pruning_group, group in found:
        for name in pruning_group.members:
            by_name[name] = (pruning_group, group)
    group_ratios: dict[str, tuple[float, Any]] = {}
    for key, ratio in ratios.items():
        if key not in by_name:
            valid = [pruning_group.name for pruning_group, _ in found]
            raise HMCConfigError(f'Got ratio for {key!r} but it is not an out-channel member of any prunable '
                                 f'group; expected a group name, one of {valid}, or a member of one')
        pruning_group, group = by_name[key]
        previous = group_ratios.get(pruning_group.name)
        if previous is not None and previous[0] != ratio:
            raise HMCConfigError(f'Got ratios {previous[0]} and {ratio} for group {pruning_group.name!r} '
                                 f'(through {key!r}); give each group one ratio')
        group_ratios[pruning_group.name] = (ratio, group)
    return group_ratios


def _selections_per_group(graph: tp.DependencyGraph, scratch: nn.Module, group_ratios: dict[str, tuple[float, Any]],
                          importance: str, round_to: int) -> dict[str, GroupSelection]:
    """Score each group of ``scratch`` (the scored copy) with ``importance`` and mask its lowest channels."""
    scorer = _importance(importance)
    names = {module: name for name, module in scratch.named_modules()}
    selections: dict[str, GroupSelection] = {}
    for name, (ratio, group) in group_ratios.items():
        scores = _group_scores(scorer, group, importance, name)
        pruned = _pruned_channels(scores, ratio, round_to, _channel_groups(group))
        # the copy sits on the model's device
        selections[name] = GroupSelection(masks=_group_masks(graph, group, pruned, names),
                                          consumer_keep=_consumer_keeps(graph, group, pruned, names))
    return selections


def group_importances(model: nn.Module, dummy_input: Any, *, importance: str = 'l2', ignored_layers: Iterable[str] = (),
                      calibration: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Each prunable group's channel scores, ``{group_name: (channels,) float}``; ``model`` is left as it was.

    torch-pruning's group importance over all members, BatchNorms and consumers, normalised by its mean (the
    importances' default ``normalizer='mean'``), so scores of different groups compare as in torch-pruning's
    global pruning. Arguments as in :func:`group_channel_masks`; grouped convs score each slice's mean.
    """
    _checked_ratios({}, importance, 1, calibration)
    scratch = copy.deepcopy(model)
    graph, found = _groups(scratch, dummy_input, ignored_layers)
    if importance == 'taylor':
        _accumulate_gradients(scratch, calibration)
    scorer = _importance(importance)
    scores = {}
    for pruning_group, group in found:
        values = _group_scores(scorer, group, importance, pruning_group.name).detach().float().cpu()
        slices = _channel_groups(group)
        scores[pruning_group.name] = values.view(slices, -1).mean(0) if slices > 1 else values
    return scores


def _group_scores(scorer: tp.importance.Importance, group: Any, importance: str, name: str) -> Tensor:
    """``scorer``'s scores of a tp group's root channels, or the l1 scores (with a warning) when it cannot score it
    (e.g. bn_scale on a group without BatchNorm)."""
    scores = scorer(group)
    if scores is None:
        _logger.warning('Importance %r cannot score group %r; using l1 instead', importance, name)
        scores = _importance('l1')(group)
    return scores


def channel_masks(model: nn.Module, dummy_input: Any, ratios: dict[str, float], **kwargs) -> dict[str, dict[str, Tensor]]:
    """The masks of :func:`group_channel_masks` merged into one NNI mask dict (same arguments)."""
    masks: dict[str, dict[str, Tensor]] = {}
    for group_masks in group_channel_masks(model, dummy_input, ratios, **kwargs).values():
        masks.update(group_masks)
    return masks


def _accumulate_gradients(model: nn.Module, calibration: tuple[Tensor, Tensor]) -> None:
    """Cross-entropy gradients of one calibration batch in ``model``'s ``.grad`` (a scratch copy)."""
    inputs, targets = calibration
    for param in model.parameters():
        param.requires_grad_(True)
        param.grad = None
    with torch.enable_grad():
        outputs = model(*as_input_tuple(inputs))
        nn.functional.cross_entropy(outputs, targets).backward()


def trace_model(model: nn.Module, dummy_input: Any) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` of ``model``, or an error saying what to change.

    ``dummy_input`` is accepted for symmetry with the other functions; symbolic tracing needs none.
    The returned graph module shares its submodules with ``model``.

    Raises
    ------
    UntraceableModelError
        Tracing failed, e.g. on control flow that depends on tensor values.
    """
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as error:
        raise UntraceableModelError(
            f'torch.fx cannot trace {type(model).__name__}: {type(error).__name__}: {error}. '
            f'Make its control flow static (no Python branches on tensor values), or wrap the untraceable '
            f'part in a function decorated with torch.fx.wrap (or a leaf module).') from error


def speedup_with_nni(model: nn.Module, dummy_input: Any, masks: dict[str, dict[str, Tensor]], *,
                     memory_budget: int | None = None) -> nn.Module:
    """Replace masked modules by smaller dense ones with NNI's ``ModelSpeedup``.

    Works **in place**: ``model`` itself is changed and returned. It is traced first (with
    ``torch.fx``), so an untraceable model raises before anything changes. NNI runs in eval mode (BN
    statistics stay as they are) and every module's train/eval flag is restored afterwards, and so is
    every parameter's and buffer's dtype (float64, float16 and bfloat16 models stay so).

    Parameters
    ----------
    model : nn.Module
        Plain (unwrapped) model.
    dummy_input : Tensor or tuple of Tensor
        Example input.
    masks : dict
        NNI masks ``{module_name: {'weight': mask, 'bias': mask}}``, e.g. from :func:`channel_masks`.
    memory_budget : int, optional
        MiB NNI's sparsity inference may take: it runs on a random batch of :func:`nni_batch_size` images.

    Returns
    -------
    nn.Module
        ``model``, with pruned channels removed.
    """
    with warnings.catch_warnings():  # NNI 3.0 registers pytree nodes with a deprecated torch API
        warnings.simplefilter('ignore', FutureWarning)
        warnings.simplefilter('ignore', UserWarning)
        from nni.compression.speedup import ModelSpeedup

    graph_module = trace_model(model, dummy_input)
    _check_masks(model, masks)
    # NNI builds its replacement modules in the default dtype and its mask propagation fails on float16 /
    # bfloat16: run it in float32 (exact for half types) and give every tensor its dtype back afterwards.
    dtypes = {name: tensor.dtype for name, tensor in (*model.named_parameters(), *model.named_buffers())}
    tied = _tied_parameters(model)
    if any(dtype in _HALF_TYPES for dtype in dtypes.values()):
        model.float()
        dummy_input = _float32(dummy_input)
        masks = {name: {key: mask.float() for key, mask in module_masks.items()} for name, module_masks in masks.items()}
    with preserved_modes(model), _quiet_nni() as speedup_logger:
        # eval mode while NNI propagates shapes: train-mode BN would update its running statistics on the
        # dummy input, and fails outright on a batch of one 1x1 feature map
        model.eval()
        graph_module.eval()
        batch_size = nni_batch_size(model, dummy_input, memory_budget)
        model = ModelSpeedup(model, dummy_input, masks, graph_module=graph_module, batch_size=batch_size,
                             logger=speedup_logger).speedup_model()
    _restore_dtypes(model, dtypes)
    _retie(model, tied)
    return model


def _tied_parameters(model: nn.Module) -> list[list[tuple[str, str]]]:
    """``(module name, parameter name)`` lists of the parameters that several modules share."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module_name, param_name))
    return [names for names in owners.values() if len(names) > 1]


def _retie(model: nn.Module, tied: list[list[tuple[str, str]]]) -> None:
    """Share tied parameters again: NNI's speedup rebuilds every module it visits with its own copy."""
    for owners in tied:
        modules = [model.get_submodule(module_name) for module_name, _ in owners]
        params = [getattr(module, param_name) for module, (_, param_name) in zip(modules, owners)]
        first = params[0]
        if all(param.shape == first.shape and torch.equal(param, first) for param in params[1:]):
            for module, (_, param_name) in zip(modules[1:], owners[1:]):
                setattr(module, param_name, first)
        else:
            _logger.warning('Tied parameters %s were pruned differently and are no longer shared',
                            ', '.join(f'{m}.{p}' for m, p in owners))


_HALF_TYPES = (torch.float16, torch.bfloat16)

NNI_BATCH_SIZE = 8  # ModelSpeedup's default: the random batch its sparsity inference runs the model on
MIN_NNI_BATCH_SIZE = 2
# Measured: NNI's sparsity inference on torchvision ResNet-50 at 224x224 took 4,753 MiB at its batch of 8,
# 1,329 MiB at 2, for 122 MiB of leaf-module outputs per image (about 5 bytes per byte of activation).
NNI_BYTES_PER_ACTIVATION_BYTE = 5


def nni_batch_size(model: nn.Module, dummy_input: Any, memory_budget: int | None = None) -> int:
    """The batch of NNI's sparsity inference: its default 8, or fewer images (down to 2) where 8 would take
    more than ``memory_budget`` MiB (``utils.memory.budget_bytes``' automatic budget when None). The speedup's
    result does not depend on it (checked on ResNet-50 and in ``hmc_plugin/tests/test_pruning.py``)."""
    inputs = tuple(tensor[:1] for tensor in as_input_tuple(dummy_input))
    with preserved_modes(model), torch.no_grad():
        model.eval()
        per_image = NNI_BYTES_PER_ACTIVATION_BYTE * activation_bytes(model, inputs)[0]
    fitting = budget_bytes(memory_budget, inputs[0].device) // max(per_image, 1)
    return int(max(MIN_NNI_BATCH_SIZE, min(NNI_BATCH_SIZE, fitting)))


def _float32(inputs: Any) -> Any:
    """``inputs`` (a tensor, or a tuple/list of them) with every floating tensor in float32."""
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_float32(item) for item in inputs)
    return inputs.float() if isinstance(inputs, Tensor) and inputs.is_floating_point() else inputs


@torch.no_grad()
def _restore_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Cast each parameter and buffer back to the dtype it had under the same name."""
    for name, param in model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])
    for module_name, module in model.named_modules():
        for key, buffer in module._buffers.items():
            name = f'{module_name}.{key}' if module_name else key
            if buffer is not None and name in dtypes and buffer.dtype != dtypes[name]:
                module._buffers[key] = buffer.to(dtypes[name])


def _check_masks(model: nn.Module, masks: dict[str, dict[str, Tensor]]) -> None:
    modules = dict(model.named_modules())
    for name, module_masks in masks.items():
        if name not in modules:
            raise HMCConfigError(f'Got a mask for {name!r} but {type(model).__name__} has no such module')
        for key, mask in module_masks.items():
            param = getattr(modules[name], key, None)
            if isinstance(param, Tensor) and param.shape != mask.shape:
                raise HMCConfigError(f'Got a {key!r} mask of shape {tuple(mask.shape)} for {name!r} but the '
                                     f'parameter has shape {tuple(param.shape)}')


def prune_physically(model: nn.Module, dummy_input: Any, masks: dict[str, dict[str, Tensor]]) -> nn.Module:
    """Remove masked channels with torch-pruning (the fast path), **in place**.

    A group's channel is removed when its weight rows are all zero in any member's mask (masks
    from :func:`channel_masks` agree across members). Train/eval flags, dtype and
    ``requires_grad`` are kept.

    Parameters
    ----------
    model : nn.Module
        Plain model; modified in place.
    dummy_input : Tensor or tuple of Tensor
        Example input for the dependency graph.
    masks : dict
        NNI masks ``{module_name: {'weight': mask, ...}}``.

    Returns
    -------
    nn.Module
        ``model`` with the same architecture :func:`speedup_with_nni` gives for these masks.
    """
    _check_masks(model, masks)
    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    graph = _build_graph(model, dummy_input)
    names = {module: name for name, module in model.named_modules()}
    plans = []
    for group in graph.get_all_groups(root_module_types=_ROOT_TYPES):
        pruned_roots: set[int] = set()
        for item in group:
            module = item.dep.target.module
            mask = masks.get(names.get(module, ''), {}).get('weight')
            if mask is None or not _is_out_fn(graph, item) or not isinstance(module, _ROOT_TYPES):
                continue
            dropped = mask.transpose(0, _out_dim(module)).flatten(1).sum(1) == 0
            pruned_roots.update(root for index, root in zip(item.idxs, item.root_idxs) if dropped[index])
        if pruned_roots:
            root = group[0].dep.target.module
            plans.append((root, group[0].dep.handler, sorted(pruned_roots)))
    # Indices were all read before any change, and pruning one group leaves the others' out channels alone.
    with preserved_modes(model), torch.enable_grad():
        for root, handler, indices in plans:
            _logger.debug('Pruning %d channels of group %r', len(indices), names[root])
            graph.get_pruning_group(root, handler, indices).prune()
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))
    return model
