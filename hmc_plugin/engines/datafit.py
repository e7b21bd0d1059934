"""Fit a compressed model's layers to calibration data: refit pruned consumers, fit low-rank factors to inputs.

Two data-aware operators, run layer by layer in forward order on a model that pruning has already shrunk:

- **Reconstruction** (He et al., ICCV 2017; Luo et al., ThiNet, ICCV 2017). A layer whose input channels
  were pruned (a consumer of a pruned group, through any BatchNorm, ReLU or residual sum in between) gets new
  input weights, the ridge least-squares fit of the original layer's output from the inputs it now receives:
  ``W' = E[y x^T] (E[x x^T] + lam I)^-1`` with ``y`` the original model's pre-activation output (bias removed;
  the layer's own pruned output channels dropped) and ``x`` the pruned layer's unfolded input.
- **Data-aware low rank** (Kalle, Rudkiewicz et al., arXiv 2511.04494; Zhang et al., TPAMI 2016). A layer
  of the plan's ``ranks`` is replaced by factors minimising ``||(B - W~) S^{1/2}||_F`` (``engines.lowrank``'s
  ``input_moment``), with S its input second moment and B its weight, or its refitted weight when it is
  also a consumer (refit, then truncate).

Whose activations: by default (``sequential=True``) each layer is fitted on the inputs the model compressed
*so far* gives it (every earlier layer already pruned, refitted and factorised), so a layer also absorbs
the error of the layers before it; the targets ``y`` always come from the original model. Each layer costs one
forward pass of both models up to that layer over the batches. ``sequential=False`` collects every layer's
moments in one pass of the pruned model before any layer is fitted (cheaper, and the choice of the anchors,
which use the original network's activations). ``recipes/benchmarks/data_aware.py`` measures the difference.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import HMCConfigError, HMCError
from ..utils.memory import budget_bytes, mib, trim_heap
from .lowrank import decompose_module, symmetrise_
from .moments import LayerMoments, MomentAccumulator, all_finite, batch_inputs, collect_moments, output_rows
from .pruning import preserved_modes

__all__ = ['DEFAULT_RIDGE', 'DataFit', 'ridge_fit', 'refit_layers', 'fit_to_data']

_logger = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-3  # lam as a fraction of the mean input energy tr(S) / D
TARGET_BYTES_LIMIT = 2 * 2 ** 30  # the one-pass sequential fit keeps the original's outputs (float16) up to this size
# The one-pass fit runs all calibration images at once: besides the targets it holds a few activations of the
# largest layer per image (a layer's input, its output and a residual), and while it fits a layer, that layer's
# float64 (D, D) input moment and up to two working copies of it (the refit's factorisation; the factors'
# projections); it is taken only when all of that, for the widest layer, fits the memory budget.
ONE_PASS_LIVE_ACTIVATIONS = 4
FIT_MOMENT_COPIES = 3


@dataclass(frozen=True)
class DataFit:
    """How a compression uses calibration data: the batches of the fit and of the BatchNorm recalibration.

    ``batches`` feed the reconstruction and the data-aware low rank (none: both data-free); ``bn_batches``
    re-estimate the BatchNorm statistics at the end (none: off).
    """

    batches: tuple = ()
    bn_batches: tuple = ()
    reconstruct: bool = True
    data_aware: bool = True
    sequential: bool = True

    @classmethod
    def from_settings(cls, batches: Sequence[Any], settings: Any) -> 'DataFit | None':
        """The use ``settings`` (an ``HMCSettings``) makes of ``batches``: the first ``bn_batches`` recalibrate,
        the first ``fit_batches`` fit (when ``data_aware`` or ``reconstruct``); None when neither applies."""
        bn_batches = tuple(batches[:settings.bn_batches])
        fit_batches = tuple(batches[:settings.fit_batches]) if settings.data_aware or settings.reconstruct else ()
        if not bn_batches and not fit_batches:
            return None
        return cls(batches=fit_batches, bn_batches=bn_batches, reconstruct=settings.reconstruct,
                   data_aware=settings.data_aware, sequential=settings.fit_order == 'sequential')


def ridge_fit(cross: torch.Tensor, input_moment: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """``cross (C, D) @ (S + lam I)^-1`` with ``lam = ridge * tr(S) / D`` (float64): the ridge least-squares weight."""
    dim = input_moment.shape[0]
    lam = ridge * float(torch.trace(input_moment)) / dim
    lam = lam if lam > 0 else 1e-12
    system = input_moment.T.clone().T  # column-major, as LAPACK factorises it: in place, not in a second copy
    system.diagonal().add_(lam)  # S + lam I without a (D, D) identity: D = 4608 is 170 MB in float64
    pivots = torch.empty(dim, dtype=torch.int32, device=system.device)
    factor, pivots = torch.linalg.lu_factor(system, out=(system, pivots))
    return torch.linalg.lu_solve(factor, pivots, cross.T).T  # S symmetric: (S^-1 cross^T)^T = cross S^-1


def refit_layers(original: nn.Module, pruned: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear layers of ``pruned`` whose input dimension shrank against ``original`` (the
    consumers of pruned channels), in module order."""
    reference = dict(original.named_modules())
    names = []
    for name, module in pruned.named_modules():
        before = reference.get(name)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and type(before) is type(module) \
                and module.weight.shape[1] < before.weight.shape[1]:
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                continue  # a depthwise consumer is pruned along with its producer: nothing to refit
            names.append(name)
    return names


def _kept_outputs(mask: dict[str, torch.Tensor] | None, channels: int) -> torch.Tensor | None:
    """Indices of the output channels an NNI weight mask keeps (None: all of ``channels``)."""
    if not mask or 'weight' not in mask:
        return None
    keep = mask['weight'].reshape(mask['weight'].shape[0], -1).any(dim=1)
    return None if bool(keep.all()) else torch.nonzero(keep).flatten()


def _execution_order(original: nn.Module, pruned: nn.Module, names: set[str], refit: set[str],
                     example: tuple) -> tuple[list[str], int, int]:
    """``names`` in the order ``pruned``'s forward pass reaches them, the bytes per input sample of the
    original's outputs at the ``refit`` layers (what the one-pass fit keeps), and of its largest leaf output."""
    order: list[str] = []
    sizes: list[int] = []
    outputs: list[int] = [0]
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: order.append(name) if name not in order else None)
               for name, module in pruned.named_modules() if name in names]
    handles += [module.register_forward_hook(lambda m, a, output: sizes.append(output.numel() * 2))
                for name, module in original.named_modules() if name in refit]
    handles += [module.register_forward_hook(
        lambda m, a, output: outputs.append(output.numel() * output.element_size())
        if isinstance(output, torch.Tensor) else None)
        for module in original.modules() if not list(module.children())]
    try:
        with _eval_mode(pruned), _eval_mode(original):
            pruned(*example)
            original(*example)
    finally:
        for handle in handles:
            handle.remove()
    batch = next((item.shape[0] for item in example if isinstance(item, torch.Tensor) and item.dim() > 0), 1)
    missed = [name for name, _ in pruned.named_modules() if name in names and name not in order]
    if missed:
        raise HMCConfigError(f"Layer '{missed[0]}' never ran on the calibration batches; it cannot be fitted to data")
    return order, sum(sizes) // batch, max(outputs) // batch


def _one_pass_bytes(pruned: nn.Module, names: list[str], images: int, bytes_per_input: int, largest: int) -> int:
    """Bytes the one-pass fit of ``names`` holds at most over ``images``: per image the targets
    (``bytes_per_input``) and ``ONE_PASS_LIVE_ACTIVATIONS`` outputs of ``largest`` bytes, plus the fit of the
    widest layer, ``FIT_MOMENT_COPIES`` float64 (D, D) moments (D: its input length, ``C_in*kh*kw``)."""
    widest = max(pruned.get_submodule(name).weight[0].numel() for name in names)
    return images * (bytes_per_input + ONE_PASS_LIVE_ACTIVATIONS * largest) + FIT_MOMENT_COPIES * 8 * widest ** 2


def _warn_few_samples(name: str, moments: LayerMoments) -> None:
    dim = moments.input_moment.shape[0]
    if moments.samples < dim:
        _logger.warning("Layer '%s' has %d calibration samples for %d inputs: its input moment is singular, so the "
                        'fit is regularised (ridge); give more calibration images for a better fit',
                        name, moments.samples, dim)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def fit_to_data(original: nn.Module, pruned: nn.Module, batches: Sequence[Any], *,
                ranks: dict[str, tuple[int, ...]] | None = None, methods: dict[str, str] | None = None,
                masks: dict[str, dict[str, torch.Tensor]] | None = None, reconstruct: bool = True,
                data_aware: bool = True, sequential: bool = True, ridge: float = DEFAULT_RIDGE,
                memory_budget: int | None = None) -> dict[str, Any]:
    """Refit the consumers of pruned channels and replace the layers of ``ranks`` by data-aware factors, in place.

    Parameters
    ----------
    original
        The uncompressed model (same module names as ``pruned``); only read.
    pruned
        ``original`` after pruning (ModelSpeedup or torch-pruning), changed in place.
    batches
        Calibration batches (tensors, input tuples or ``(inputs, labels)``); all are used for every layer.
    ranks, methods
        The plan's low-rank layers: concrete ranks and method per name (see ``engines.lowrank``).
    masks
        The NNI masks the pruning applied (to know each refitted layer's kept output channels).
    reconstruct, data_aware
        Turn the refit of consumers, or the data-aware fit of the factors (data-free HOOI/SVD instead), off.
    sequential
        Fit each layer on the inputs of the model compressed so far (default), or all from one pass.
    memory_budget
        MiB the sequential fit may hold (None: ``utils.memory.budget_bytes``' automatic budget): all layers in
        one forward pass over every image when that fits, else one pass per layer, batch by batch (slower).

    Returns
    -------
    dict
        ``{'refitted': [names], 'decomposed': [names], 'samples': {name: rows}}``.
    """
    ranks, methods, masks = ranks or {}, methods or {}, masks or {}
    refit = refit_layers(original, pruned) if reconstruct else []
    needs_data = (set(refit) | (set(ranks) if data_aware else set())) if batches else set()
    report: dict[str, Any] = {'refitted': [], 'decomposed': [], 'samples': {}}

    def fit_layer(name: str, moments: LayerMoments | None) -> nn.Module | None:
        """Refit and/or decompose one layer of ``pruned``; return its replacement (None: changed in place)."""
        module = pruned.get_submodule(name)
        trim_heap()  # the pass's freed activations and unfolded patches, before the fit's (D, D) copies
        if moments is not None:
            report['samples'][name] = moments.samples
            _warn_few_samples(name, moments)
        if name in refit and moments is not None and _refit_consumer(module, name, moments, masks.get(name), ridge):
            report['refitted'].append(name)
        if name not in ranks:
            return None
        # the fit owns the moment and is done with it after this: symmetrised in place, the factors take it uncopied
        input_moment = symmetrise_(moments.input_moment) if data_aware and moments is not None else None
        replacement = decompose_module(module, tuple(ranks[name]), methods.get(name, 'auto'), name,
                                       input_moment=input_moment)
        _set_submodule(pruned, name, replacement)
        report['decomposed'].append(name)
        return replacement

    data_free = [name for name, _ in pruned.named_modules() if name in ranks and name not in needs_data]
    for name in data_free:
        fit_layer(name, None)
    if not needs_data:
        return report
    _fit_with_data(original, pruned, batches, needs_data, set(refit), fit_layer, sequential, memory_budget)
    trim_heap()  # the last layer's (D, D) moments and solves (each layer's fit trims before it starts)
    _check_finite_outputs(pruned, batches, sequential)
    return report


FINITE_CHECK_IMAGES = 8  # calibration images the fitted model is run on to check its outputs


def _check_finite_outputs(pruned: nn.Module, batches: Sequence[Any], sequential: bool) -> None:
    """Raise ``HMCError`` when ``pruned`` gives NaN/Inf outputs on the first ``FINITE_CHECK_IMAGES`` calibration
    images after the fit: a diverged fit (weights growing layer after layer) names the settings that avoid it."""
    sample = tuple(item[:FINITE_CHECK_IMAGES] if isinstance(item, torch.Tensor) and item.dim() > 0 else item
                   for item in batch_inputs(batches[0]))
    with _eval_mode(pruned):
        output = pruned(*sample)
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    if all(all_finite(item) for item in outputs if isinstance(item, torch.Tensor)):
        return
    cause = ("with fit_order='one_pass' every layer is fitted to the inputs of the unfitted pruned model, and the "
             "fits can diverge from layer to layer; use fit_order='sequential' (the default)") if not sequential else \
        'give more calibration images (fit_batches), or turn the fit off (reconstruct=False, data_aware=False)'
    raise HMCError(f'The data-aware fit left the compressed model with NaN/Inf outputs on the calibration images: '
                   f'{cause}')


def _refit_consumer(module: nn.Module, name: str, moments: LayerMoments, mask: dict[str, torch.Tensor] | None,
                    ridge: float) -> bool:
    """Replace ``module``'s weight by the ridge fit of its original outputs (the rows ``mask`` keeps) from the
    inputs it now gets; False (a warning, the weight left) when its outputs do not match the mask's."""
    kept = _kept_outputs(mask, module.weight.shape[0])
    cross = moments.cross if kept is None else moments.cross[kept]
    if cross.shape[0] != module.weight.shape[0]:  # the speedup removed channels the masks do not name
        _logger.warning('Not refitting %s: it has %d output channels but its masks keep %d (the speedup removed '
                        'channels the masks did not name); its weights stay as the speedup left them', name,
                        module.weight.shape[0], cross.shape[0])
        return False
    module.weight.data = ridge_fit(cross, moments.input_moment, ridge).reshape(module.weight.shape).to(
        module.weight.dtype)
    return True


def _fit_with_data(original: nn.Module, pruned: nn.Module, batches: Sequence[Any], names: set[str], refit: set[str],
                   fit_layer, sequential: bool, memory_budget: int | None) -> None:
    """``fit_layer(name, moments)`` for every layer of ``names`` in forward order: from one pass of the pruned
    model (``sequential=False``), else sequentially in one pass over all images when it fits ``memory_budget``,
    else one forward pass per layer."""
    order, bytes_per_input, largest = _execution_order(original, pruned, names, refit, _first_inputs(batches))
    if not sequential:
        snapshot = collect_moments(pruned, order, batches, reference=original if refit else None)
        for name in order:
            fit_layer(name, snapshot.pop(name))
        return
    images = sum(len(batch_inputs(batch)[0]) for batch in batches)
    one_pass_bytes = _one_pass_bytes(pruned, order, images, bytes_per_input, largest)
    budget = budget_bytes(memory_budget, _first_inputs(batches)[0].device)
    if bytes_per_input * images <= TARGET_BYTES_LIMIT and one_pass_bytes <= budget:
        _fit_in_one_pass(original, pruned, order, refit, batches, fit_layer)
        return
    _logger.info('Fitting layer by layer (one forward pass per layer): fitting all %d layers in one pass over '
                 '%d images would take about %d MiB, above the memory budget of %d MiB', len(order), images,
                 mib(one_pass_bytes), mib(budget))
    for name in order:
        fit_layer(name, collect_moments(pruned, [name], batches, reference=original if name in refit else None,
                                        stop_after=name)[name])


def _fit_in_one_pass(original: nn.Module, pruned: nn.Module, order: list[str], refit: set[str],
                     batches: Sequence[Any], fit_layer) -> None:
    """The sequential fit in one forward pass over all batches at once: each layer, when the pass reaches it, is
    fitted to the inputs it receives and its new output is what the rest of the pass sees. The original's outputs
    at the refitted layers are kept in float16 (relative rounding 5e-4, noise the least-squares fit averages out)."""
    inputs = _concatenated(batches)
    targets: dict[str, torch.Tensor] = {}
    reference = dict(original.named_modules())
    handles = [reference[name].register_forward_hook(
        lambda module, args, output, name=name: targets.__setitem__(name, output_rows(module, output).half()))
        for name in order if name in refit]
    with _eval_mode(original):
        try:
            original(*inputs)
        finally:
            for handle in handles:
                handle.remove()
    trim_heap()  # the original's activations over all images, freed
    handles = {}

    def refit_hook(name):
        def hook(module, args, output):
            handles.pop(name).remove()
            accumulator = MomentAccumulator()
            accumulator.add_inputs(module, args[0], targets.pop(name, None), name)
            replacement = fit_layer(name, accumulator.result())
            return (replacement if replacement is not None else module)(*args)
        return hook

    for name in order:
        handles[name] = pruned.get_submodule(name).register_forward_hook(refit_hook(name))
    with _eval_mode(pruned):
        try:
            pruned(*inputs)
        finally:
            for handle in handles.values():
                handle.remove()
    missed = [name for name in order if name in handles]
    if missed:
        raise HMCConfigError(f"Layer '{missed[0]}' never ran on the calibration batches; it cannot be fitted to data")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block; every module's flag restored after (``preserved_modes``)."""
    with preserved_modes(model):
        model.eval()
        yield


def _concatenated(batches: Sequence[Any]) -> tuple:
    """All batches as one input tuple (tensors concatenated along dim 0)."""
    inputs = [batch_inputs(batch) for batch in batches]
    return tuple(torch.cat(items) if isinstance(items[0], torch.Tensor) and items[0].dim() > 0 else items[0]
                 for items in zip(*inputs))


def _first_inputs(batches: Sequence[Any]) -> tuple:
    """The first sample of the first batch, as an input tuple (to find the execution order)."""
    return tuple(item[:1] if isinstance(item, torch.Tensor) and item.dim() > 0 else item
                 for item in batch_inputs(batches[0]))
