"""Layer-local Fisher estimate of the KL proxy: one forward/backward pass prices every unit and level.

The ``kl`` proxy runs the whole network once per (unit, level). This estimate runs it once in all.
For a small change ``delta`` of one activation ``a`` (the output of a layer), the KL divergence of the
model's output distribution from the original's is, to second order,

    KL(p || p') ~= 1/2 * dz^T F dz,   dz ~= (dz/da) delta,   F = diag(p) - p p^T

(``z`` the logits, ``F`` the Fisher information of the softmax in logit space). Writing
``F = A^T A`` with rows ``a_c = sqrt(p_c) (e_c - p)``, ``KL ~= 1/2 * sum_c (g_c . delta)^2`` where
``g_c = d(a_c . z)/da`` is one backward pass. With ``C <= projections`` classes all ``C`` rows are used
(exact); otherwise ``projections`` random +-1 combinations of the rows (Hutchinson's estimator,
unbiased). The projections run as one replicated batch, so one backward pass gives every ``g``.

The perturbations, from the original activations of the calibration batch:

- pruning a group at a level zeroes its pruned channels. The change is taken where the group's chain
  ends (the last masked module of each chain, e.g. the BatchNorm after a conv): ``delta = -a[:, S]``,
  summed over the group's chain ends before squaring (they act jointly);
- pruning a group with reconstruction (``prune_weight_changes``): each consumer of the pruned channels
  gets refitted input weights ``W'`` (zero on the pruned inputs), so the change is where the consumers
  write: ``delta_L = layer_L(x_L; W'_L - W_L)``, bias-free, from each consumer's original input, summed
  over the group's consumers before squaring (the zeroed inputs and the refit are both in ``W' - W``);
- decomposing a layer at a level: ``delta = layer(x; W_low_rank - W)``, bias-free, from the layer's input.

BatchNorm recalibration (re-estimating the running statistics after a change) cannot enter this estimate:
it is a global re-normalisation of the compressed network, not a local perturbation of the original
network's activations. After reconstruction the consumers reproduce their original outputs, so the
BatchNorms after them see nearly their original statistics; that is why the estimate without
recalibration still ranks the units as the recalibrated ``kl`` and ``evaluator`` scans do.

References: Amari 1998 (natural gradient / Fisher); Molchanov et al. 2019, "Importance Estimation for
Neural Network Pruning" (CVPR; first-order channel scores); Hutchinson 1989 (trace estimator);
He et al. 2017, "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV; reconstruction).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engines.pruning import preserved_modes
from ..errors import HMCError
from ..utils.counting import as_input_tuple

__all__ = ['DEFAULT_PROJECTIONS', 'chain_ends', 'fisher_drops']

DEFAULT_PROJECTIONS = 4


_MAX_REPLICATED_BATCH = 128


_MAX_BATCH_ELEMENTS = 2_500_000  # input elements per replicated batch (~16 images of 3x224x224)


Masks = dict[str, dict[str, Tensor]]

Unit = tuple[str, str]  # ('prune', group) or ('decompose', layer)

LayerChanges = dict[str, dict[Unit, list[Tensor | None]]]  # module -> unit -> weight change per level (None: 0)


@dataclass
class _Accumulator:
    """Per-sample scores of one calibration chunk after another (all on CPU, float64)."""

    channel_scores: dict[str, list[Tensor]] = field(default_factory=dict)  # module -> [(K, N, C)]
    # (unit, module) -> [(levels, K, N)]
    layer_scores: dict[tuple[Unit, str], list[Tensor]] = field(default_factory=dict)


def _pruned_channels(module: nn.Module, mask: Tensor) -> Tensor:
    """Indices of the out channels a weight mask zeroes (dim 1 for transposed convs)."""
    out_dim = 1 if getattr(module, 'transposed', False) else 0
    keep = mask.transpose(0, out_dim).reshape(mask.shape[out_dim], -1).any(dim=1)
    return torch.nonzero(~keep).flatten()


@torch.no_grad()
def chain_ends(model: nn.Module, example_inputs: tuple, groups: dict[str, Sequence[str]]) -> dict[str, list[str]]:
    """For each group, its masked modules whose output no other module of the same group reads directly.

    A conv followed by its BatchNorm in the same group ends at the BatchNorm: zeroing the BN's output
    channels is what pruning does to the network (an in-place ReLU in between keeps the tensor, so it
    is still a direct read).
    """
    modules = dict(model.named_modules())
    wanted = {name for names in groups.values() for name in names}
    seen_inputs: dict[str, set[int]] = {name: set() for name in wanted}
    seen_outputs: dict[str, set[int]] = {name: set() for name in wanted}
    alive: list[Tensor] = []  # keep tensors alive so their ids are not reused during the pass

    def record(name):
        def hook(module, inputs, output):
            for tensor in inputs:
                if isinstance(tensor, Tensor):
                    seen_inputs[name].add(id(tensor))
                    alive.append(tensor)
            if isinstance(output, Tensor):
                seen_outputs[name].add(id(output))
                alive.append(output)
        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in wanted]
    try:
        model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    ends = {}
    for group, names in groups.items():
        ends[group] = [name for name in names
                       if not any(seen_outputs[name] & seen_inputs[other] for other in names if other != name)]
    return ends


def _projections(logits: Tensor, count: int, generator: torch.Generator) -> tuple[Tensor, float]:
    """Vectors ``v (K, N, C)`` with ``E[sum_k (v_k . dz)^2] * scale = dz^T F dz`` per sample, and ``scale``."""
    probs = torch.softmax(logits.detach().double(), dim=1)                     # (N, C)
    root = probs.sqrt()
    classes = probs.shape[1]
    if classes <= count:  # exact: every row a_c = sqrt(p_c) (e_c - p)
        eye = torch.eye(classes, dtype=probs.dtype, device=probs.device)
        rows = root.T[:, :, None] * (eye[:, None, :] - probs[None, :, :])       # (C, N, C)
        return rows, 1.0
    signs = torch.randint(0, 2, (count,) + probs.shape, generator=generator).to(probs) * 2 - 1  # (K, N, C)
    weighted = signs * root[None]                                              # eps_c sqrt(p_c)
    rows = weighted - weighted.sum(dim=2, keepdim=True) * probs[None]          # sum_c eps_c sqrt(p_c) (e_c - p)
    return rows, 1.0 / count


def _delta_output(module: nn.Module, inputs: Tensor, weight_change: Tensor) -> Tensor:
    """``module``'s output change when its weight changes by ``weight_change`` (bias unchanged)."""
    weight_change = weight_change.to(inputs.dtype)
    if isinstance(module, nn.Linear):
        return F.linear(inputs, weight_change)
    return module._conv_forward(inputs, weight_change, None)


def _layer_changes(weight_changes: dict[str, list[Tensor]],
                   prune_weight_changes: dict[str, list[dict[str, Tensor]]]) -> LayerChanges:
    """The weight changes of every unit, by the module they change: ``{module: {unit: [change or None per level]}}``."""
    changes: LayerChanges = {}
    for layer, levels in weight_changes.items():
        changes.setdefault(layer, {})[('decompose', layer)] = list(levels)
    for group, levels in prune_weight_changes.items():
        consumers = sorted({name for level in levels for name in level})
        for name in consumers:
            changes.setdefault(name, {})[('prune', group)] = [level.get(name) for level in levels]
    return changes


def _unit_scores(module: nn.Module, layer_input: Tensor, grad: Tensor, changes: list[Tensor | None]) -> Tensor:
    """``g . delta`` per level, projection and sample ``(levels, K, N)`` for weight changes of ``module``."""
    changes = [torch.zeros_like(module.weight) if change is None else change for change in changes]
    deltas = torch.stack([_delta_output(module, layer_input, change) for change in changes])  # (levels, N, ...)
    return torch.einsum('kn...,ln...->lkn', grad.double(), deltas.double())                   # (levels, K, N)


@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Module], channel_modules: set[str], layer_changes: LayerChanges,
           copies: int, accumulator: _Accumulator) -> Iterator[None]:
    """Record, per chunk, channel scores ``sum_hw g * a`` and layer scores ``sum g * delta`` per unit and level."""

    def forward_hook(name):
        def hook(module, inputs, output):
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None
            samples = output.shape[0] // copies
            # A view, no copy: autograd keeps the layer's input for its own backward pass anyway (and
            # refuses to run if it was modified in place), so the output changes are computed there.
            layer_input = inputs[0].detach()[:samples] if name in layer_changes else None
            activation = output.detach()[:samples]

            def on_grad(grad: Tensor) -> None:
                grad = grad.detach().reshape((copies, samples) + tuple(grad.shape[1:]))  # (K, N, ...)
                if name in channel_modules:
                    per_channel = (grad * activation[None]).flatten(3).sum(3) if grad.dim() > 3 \
                        else grad * activation[None]                                     # (K, N, C)
                    accumulator.channel_scores.setdefault(name, []).append(per_channel.double().cpu())
                if layer_input is not None:
                    for unit, changes in layer_changes[name].items():
                        scores = _unit_scores(module, layer_input, grad, changes)
                        accumulator.layer_scores.setdefault((unit, name), []).append(scores.cpu())

            output.register_hook(on_grad)
            # Later in-place ops (``out += identity``, ``relu_``) act on a copy, so ``output`` keeps the
            # activation and its gradient stays the gradient of this module's output.
            return output.clone()
        return hook

    names = channel_modules | set(layer_changes)
    handles = [modules[name].register_forward_hook(forward_hook(name)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fisher_drops(model: nn.Module, calibration_inputs, *, prune_masks: dict[str, list[Masks]] | None = None,
                 weight_changes: dict[str, list[Tensor]] | None = None,
                 prune_weight_changes: dict[str, list[dict[str, Tensor]]] | None = None,
                 projections: int = DEFAULT_PROJECTIONS, seed: int = 0,
                 progress: bool = True) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Estimated KL drop (nats, batch mean) of every pruning group and decomposed layer at every level.

    Parameters
    ----------
    model
        Classifier whose output flattens to logits ``(N, C)``; run in eval mode, left as it was.
    calibration_inputs
        Tensor (or tuple) with batch ``N`` (e.g. 64 images).
    prune_masks
        ``{group_name: [masks at level 0, masks at level 1, ...]}``, NNI-format out-channel masks of the
        group's members (Conv/Linear/BatchNorm), as ``pruning.group_channel_masks`` gives them.
    weight_changes
        ``{layer_name: [W_low_rank - W at each level]}`` for the layers to decompose.
    prune_weight_changes
        ``{group_name: [{consumer_name: W' - W} at each level]}``: groups pruned with reconstruction, priced by
        the change of their consumers' outputs instead of the zeroed channels (a group is in this or in
        ``prune_masks``). ``W'`` is the consumer's refitted weight, zero on the pruned inputs; a consumer
        missing at a level is unchanged there.
    projections
        Backward passes' worth of Fisher directions: all ``C`` rows when ``C <= projections``.

    Returns
    -------
    prune, decompose
        ``{name: [drop at each level]}``; 0 means no change.
    """
    prune_masks = prune_masks or {}
    weight_changes = weight_changes or {}
    prune_weight_changes = prune_weight_changes or {}
    both = sorted(set(prune_masks) & set(prune_weight_changes))
    if both:
        raise HMCError(f'fisher_drops got groups {both} in both prune_masks and prune_weight_changes; give each once')
    inputs = as_input_tuple(calibration_inputs)
    modules = dict(model.named_modules())
    layer_changes = _layer_changes(weight_changes, prune_weight_changes)
    with preserved_modes(model):  # every submodule's own train/eval flag comes back
        model.eval()
        ends, accumulator, scale = _fisher_scores(model, inputs, modules, prune_masks, layer_changes, projections,
                                                  seed, progress)
    prune = _prune_drops(prune_masks, ends, modules, accumulator, scale)
    prune.update(_refitted_prune_drops(prune_weight_changes, accumulator, scale))
    return prune, _decompose_drops(weight_changes, accumulator, scale)


def _fisher_scores(model: nn.Module, inputs: tuple, modules: dict[str, nn.Module], prune_masks: dict[str, list[Masks]],
                   layer_changes: LayerChanges, projections: int, seed: int,
                   progress: bool) -> tuple[dict[str, list[str]], _Accumulator, float]:
    """The one pass, ``model`` in eval mode: ``(chain ends of each group, per-sample scores, projection scale)``."""
    with torch.no_grad():
        classes = model(*(tensor[:1] for tensor in inputs)).flatten(1).shape[1]
    copies = min(classes, projections)
    group_members = {group: list(levels[0]) for group, levels in prune_masks.items() if levels}
    ends = chain_ends(model, tuple(tensor[:1] for tensor in inputs), group_members)
    channel_modules = {name for names in ends.values() for name in names}
    accumulator = _Accumulator()
    with _hooks(modules, channel_modules, layer_changes, copies, accumulator):
        scale = _backward_passes(model, inputs, copies, seed, progress)
    return ends, accumulator, scale


def _backward_passes(model: nn.Module, inputs: tuple, copies: int, seed: int, progress: bool) -> float:
    """Forward and backward the batch in chunks, each replicated ``copies`` times; returns the projections' scale.

    ``_hooks`` records the scores. A replicated chunk holds at most ``_MAX_REPLICATED_BATCH`` samples and
    ``_MAX_BATCH_ELEMENTS`` input elements (but at least one sample); the scale is 1 (exact rows) or ``1 / copies``.
    """
    samples = inputs[0].shape[0]
    per_sample = max(1, inputs[0][:1].numel())
    chunk = max(1, min(_MAX_REPLICATED_BATCH, _MAX_BATCH_ELEMENTS // per_sample) // copies)
    generator = torch.Generator().manual_seed(seed)
    scale = 1.0
    with tqdm(total=samples, desc='HMC sensitivity scan (proxy, Fisher)', unit='img', disable=not progress) as bar:
        for start in range(0, samples, chunk):
            part = tuple(tensor[start:start + chunk] for tensor in inputs)
            # Gradients are taken w.r.t. the input only: every activation is on that path, and no
            # parameter gradient is computed (or left behind).
            replicated = tuple(_replicate(tensor, copies) for tensor in part)
            with torch.enable_grad():
                logits = model(*replicated).flatten(1)
                n = part[0].shape[0]
                rows, scale = _projections(logits[:n], copies, generator)          # (K, N, C)
                loss = (logits * rows.reshape(copies * n, -1).to(logits.dtype)).sum()
                torch.autograd.grad(loss, [t for t in replicated if t.requires_grad])
            bar.update(n)
    return scale


def _prune_drops(prune_masks: dict[str, list[Masks]], ends: dict[str, list[str]], modules: dict[str, nn.Module],
                 accumulator: _Accumulator, scale: float) -> dict[str, list[float]]:
    """Each group's drop per level: the pruned channels' scores, summed over the group's chain ends."""
    channel_scores = {name: torch.cat(chunks, dim=1) for name, chunks in accumulator.channel_scores.items()}  # (K, N, C)
    prune = {}
    for group, levels in prune_masks.items():
        drops = []
        for masks in levels:
            joint = None  # (K, N): -sum of the chain ends' pruned channel scores
            for name in ends[group]:
                channels = _pruned_channels(modules[name], masks[name]['weight'])
                scores = channel_scores[name][:, :, channels].sum(2)
                joint = -scores if joint is None else joint - scores
            drops.append(_kl_estimate(joint, scale))
        prune[group] = drops
    return prune


def _refitted_prune_drops(prune_weight_changes: dict[str, list[dict[str, Tensor]]], accumulator: _Accumulator,
                          scale: float) -> dict[str, list[float]]:
    """Each reconstructed group's drop per level: its consumers' scores ``g . delta``, summed before squaring."""
    prune = {}
    for group, levels in prune_weight_changes.items():
        joint = None  # (levels, K, N)
        for name in sorted({name for level in levels for name in level}):
            scores = torch.cat(accumulator.layer_scores[(('prune', group), name)], dim=2)
            joint = scores if joint is None else joint + scores
        prune[group] = [0.0] * len(levels) if joint is None else [_kl_estimate(level, scale) for level in joint]
    return prune


def _decompose_drops(weight_changes: dict[str, list[Tensor]], accumulator: _Accumulator,
                     scale: float) -> dict[str, list[float]]:
    """Each decomposed layer's drop per level, from its scores ``g . delta``."""
    decompose = {}
    for layer in weight_changes:
        scores = torch.cat(accumulator.layer_scores[(('decompose', layer), layer)], dim=2)  # (levels, K, N)
        decompose[layer] = [_kl_estimate(level_scores, scale) for level_scores in scores]
    return decompose


def _replicate(tensor: Tensor, copies: int) -> Tensor:
    """``copies`` stacked copies along the batch; floating inputs require grad (the backward pass's target)."""
    stacked = tensor.detach().repeat((copies,) + (1,) * (tensor.dim() - 1))
    return stacked.requires_grad_() if stacked.is_floating_point() else stacked


def _kl_estimate(scores: Tensor | None, scale: float) -> float:
    """``1/2 * scale * mean_n sum_k scores[k, n]^2``; scores (K, N) are ``g_k . delta`` per sample."""
    if scores is None:
        return 0.0
    value = 0.5 * scale * float(scores.pow(2).sum(0).mean())
    if not math.isfinite(value):
        raise HMCError('The Fisher sensitivity estimate is not finite; check the model and calibration inputs '
                       'for NaN/Inf, or use sensitivity="kl"')
    return value
