"""Second moments of a layer's inputs on calibration data: what the data-aware operators fit to.

For a Conv2d (groups=1) the input ``x`` of one output position is its unfolded patch, ``D = C_in * k_h * k_w``
long and ordered like ``weight.reshape(C_out, -1)`` (``F.unfold``'s order); for a Linear it is the input
vector (``D = in_features``). ``collect_moments`` runs the model over calibration batches and accumulates,
per named layer,

- ``input_moment`` S = E[x x^T], ``(D, D)``, float64 (the output error of a weight change ``dW`` is
  ``E||dW x||^2 = tr(dW S dW^T)``);
- with a ``reference`` model (the uncompressed original, same layer names), ``cross`` = E[y x^T],
  ``(C_out_ref, D)``, where ``y`` is the reference layer's output without its bias at the same position:
  the target of a least-squares refit of the layer (Zhang et al. 2016; He et al. 2017).

Rows are unfolded and accumulated a few images at a time (about ``CHUNK_ROWS`` patch rows), so memory is the
``(D, D)`` moments plus one chunk of patches, whatever the batch size. ``stop_after`` ends each forward pass at
that layer (the rest of the network is not run).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HMCConfigError
from ..utils.counting import as_input_tuple

__all__ = ['LayerMoments', 'MomentAccumulator', 'unfold_patches', 'output_rows', 'collect_moments', 'batch_inputs',
           'all_finite']

_logger = logging.getLogger(__name__)

CHUNK_ROWS = 16_384
# Columns per panel of a moment's upper triangle (``_add_upper_gram``): the products skip the blocks below the
# diagonal, about 45 % of a (4608, 4608) moment's work.
PANEL_COLUMNS = 512


@dataclass
class LayerMoments:
    """Moments of one layer's inputs: ``input_moment`` (D, D), ``cross`` (C_out_ref, D) or None, ``samples`` rows."""

    input_moment: torch.Tensor
    cross: torch.Tensor | None
    samples: int


def all_finite(tensor: torch.Tensor, block: int = 1 << 20) -> bool:
    """Whether every entry of ``tensor`` is finite, checked about ``block`` entries at a time along dim 0:
    ``isfinite`` of a whole (D, D) float64 moment, or of a chunk of unfolded patches, makes a copy and a mask."""
    if tensor.dim() == 0:
        return bool(torch.isfinite(tensor))
    rows = max(1, block * max(tensor.shape[0], 1) // max(tensor.numel(), 1))  # rows of about block entries
    return all(bool(torch.isfinite(part).all()) for part in tensor.split(rows))


def batch_inputs(batch: Any) -> tuple:
    """The model inputs of one batch: a tensor, a tuple of inputs, or a DataLoader's ``(inputs, labels)``."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) \
            and not batch[1].is_floating_point() and batch[1].dim() == 1:
        return as_input_tuple(batch[0])
    return as_input_tuple(batch)


def unfold_patches(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's input rows ``(positions, D)``: unfolded patches of a Conv2d, flattened vectors of a Linear."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        raise TypeError(f'unfold_patches needs nn.Linear or nn.Conv2d with groups=1, got {module}')
    if module.padding_mode != 'zeros':
        pad_h, pad_w = module._reversed_padding_repeated_twice[0], module._reversed_padding_repeated_twice[2]
        inputs = F.pad(inputs, (pad_h, pad_h, pad_w, pad_w), mode=module.padding_mode)
        padding = 0
    elif isinstance(module.padding, str):  # 'same' / 'valid'
        if module.padding == 'valid':
            padding = 0
        else:
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            inputs = F.pad(inputs, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = 0
    else:
        padding = module.padding
    patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N, D, L) -> (N * L, D)


def output_rows(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """The layer's output rows ``(positions, C_out)`` without the bias, in :func:`unfold_patches`' order."""
    if module.bias is not None:
        shape = [1] * output.dim()
        shape[1 if isinstance(module, nn.Conv2d) else -1] = -1
        output = output - module.bias.view(shape)
    if isinstance(module, nn.Conv2d):
        return output.flatten(2).transpose(1, 2).reshape(-1, output.shape[1])
    return output.reshape(-1, output.shape[-1])


class _Stop(Exception):
    """Ends a forward pass once the last layer of interest has run."""


class MomentAccumulator:
    """Sums of ``x x^T`` (and ``y x^T``) over the rows it is given; ``result()`` divides by their count.

    ``x x^T`` is summed in panels of its upper triangle (``_add_upper_gram``); ``result()`` mirrors them.
    """

    def __init__(self):
        self.moment: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.samples = 0

    def add(self, rows: torch.Tensor, targets: torch.Tensor | None, name: str) -> None:
        if not all_finite(rows):
            raise HMCConfigError(f"The inputs of layer '{name}' hold NaN or Inf on the calibration data; the data-aware "
                                 f'operators cannot fit to them. Check the calibration inputs (and the layers before '
                                 f"'{name}'), or turn the data-aware fit off (data_aware=False, reconstruct=False)")
        # float32 products of CHUNK_ROWS rows (relative error ~1e-6), summed in float64, in place: a float64 sum
        # takes the float32 product exactly, so no (D, D) float64 copy of it is made
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            chunk = rows[start:start + CHUNK_ROWS].float()
            self.moment = _add_upper_gram(self.moment, chunk)
            if targets is not None:
                self.cross = _added(self.cross, targets[start:start + CHUNK_ROWS].float().T @ chunk)
        self.samples += rows.shape[0]

    def add_inputs(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None, name: str) -> None:
        """``add`` the unfolded rows of a batch of layer ``inputs (N, ...)`` (and their ``targets``, ``output_rows``
        of the same batch), a few images at a time: never more than about ``CHUNK_ROWS`` rows unfolded at once."""
        samples = inputs.shape[0] if inputs.dim() > 1 else 1
        first = unfold_patches(module, inputs[:1])
        rows_per_sample = max(first.shape[0], 1)
        step = max(1, CHUNK_ROWS // rows_per_sample)
        for start in range(0, samples, step):
            rows = first if start == 0 and step == 1 else unfold_patches(module, inputs[start:start + step])
            part = None if targets is None else targets[start * rows_per_sample:(start + step) * rows_per_sample]
            self.add(rows, part, name)

    def result(self) -> LayerMoments:
        """The moments: the sums divided by the row count in place and handed over (the accumulator is empty
        after), so no second (D, D) float64 copy is held."""
        scale = 1.0 / max(self.samples, 1)
        moment, cross, samples = self.moment, self.cross, self.samples
        self.moment, self.cross, self.samples = None, None, 0
        return LayerMoments(_mirrored_upper(moment).mul_(scale), None if cross is None else cross.mul_(scale),
                            samples)


def _add_upper_gram(total: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """``total += rows^T rows`` (float64 ``(D, D)``, in place) on the panels of the upper triangle only: rows
    ``[s, s + PANEL_COLUMNS)`` from column ``s`` on, each a float32 product of ``rows (n, D)`` (the diagonal blocks
    whole). ``_mirrored_upper`` fills the rest once the sum is complete."""
    features = rows.shape[1]
    if total is None:
        total = torch.zeros((features, features), dtype=torch.float64, device=rows.device)
    for start in range(0, features, PANEL_COLUMNS):
        stop = min(start + PANEL_COLUMNS, features)
        total[start:stop, start:].add_(rows[:, start:stop].T @ rows[:, start:])
    return total


def _mirrored_upper(total: torch.Tensor) -> torch.Tensor:
    """``total`` with the blocks below its diagonal panels copied from above (in place): exactly symmetric."""
    for start in range(0, total.shape[0], PANEL_COLUMNS):
        stop = min(start + PANEL_COLUMNS, total.shape[0])
        total[stop:, start:stop].copy_(total[start:stop, stop:].T)
    return total


def _added(total: torch.Tensor | None, product: torch.Tensor) -> torch.Tensor:
    """``total + product`` in float64, into ``total`` (the same bits as ``total + product.double()``)."""
    return product.double() if total is None else total.add_(product)


@torch.no_grad()
def collect_moments(model: nn.Module, layer_names: Sequence[str], batches: Iterable[Any], *,
                    reference: nn.Module | None = None, stop_after: str | None = None) -> dict[str, LayerMoments]:
    """Input moments (and, with ``reference``, cross moments with its outputs) of ``layer_names`` over ``batches``.

    Both models run in eval mode on every batch (their train/eval flags are restored); nothing else changes.
    ``reference`` must have modules of the same names (e.g. the original model of a pruned copy).
    """
    modules = dict(model.named_modules())
    reference_modules = dict(reference.named_modules()) if reference is not None else {}
    missing = [name for name in layer_names if name not in modules or (reference is not None
                                                                      and name not in reference_modules)]
    if missing:
        raise HMCConfigError(f'collect_moments: no layer named {missing[0]!r}')
    accumulators = {name: MomentAccumulator() for name in layer_names}
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def capture(name):
        def hook(module, args, output):
            captured[name] = output_rows(module, output)
            if name == stop_after:
                raise _Stop
        return hook

    def accumulate(name):
        def hook(module, args):
            accumulators[name].add_inputs(module, args[0], captured.pop(name, None), name)
            if name == stop_after:
                raise _Stop
        return hook

    modes = [(module, module.training) for net in (model, reference) if net is not None for module in net.modules()]
    try:
        for name in layer_names:
            handles.append(modules[name].register_forward_pre_hook(accumulate(name)))
            if reference is not None:
                handles.append(reference_modules[name].register_forward_hook(capture(name)))
        model.eval()
        if reference is not None:
            reference.eval()
        for batch in batches:
            inputs = batch_inputs(batch)
            if reference is not None:
                _run(reference, inputs)
            _run(model, inputs)
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.train(training)
    empty = [name for name, accumulator in accumulators.items() if accumulator.samples == 0]
    if empty:
        raise HMCConfigError(f"Layer '{empty[0]}' never ran on the calibration batches; it cannot be fitted to data")
    return {name: accumulator.result() for name, accumulator in accumulators.items()}


def _run(model: nn.Module, inputs: tuple) -> None:
    try:
        model(*inputs)
    except _Stop:
        pass
