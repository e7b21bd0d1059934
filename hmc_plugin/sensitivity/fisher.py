"""Layer-local Fisher estimate of the KL proxy: one forward/backward pass prices every unit and level.

The ``kl`` proxy runs the whole network once per (unit, level). This estimate runs it once in all.
For a small change ``delta`` of one activation ``a`` (the output of a layer), the KL divergence of the
model's output distribution from the original's is, to second order,

    KL(p || p') ~= 1/2 * dz^T F dz,   dz ~= (dz/da) delta,   F = diag(p) - p p^T

(``z`` the logits, ``F`` the Fisher information of the softmax in logit space). Writing
``F = A^T A`` with rows ``a_c = sqrt(p_c) (e_c - p)``, ``KL ~= 1/2 * sum_c (g_c . delta)^2`` where
``g_c = d(a_c . z)/da`` is one backward pass. With ``C <= projections`` classes all ``C`` rows are used
(exact); otherwise ``projections`` random +-1 combinations of the rows (Hutchinson's estimator,
unbiased). The projections run as one replicated batch, so one backward pass gives every ``g``. Within
``memory_budget`` (``utils.memory``) the calibration batch, and when one image's replicas do not fit, the
projections, are split into chunks (``fisher_chunks``); a chunk's projection blocks share its one forward pass
(one backward pass each). The signs are drawn once for the whole batch, so the estimate depends on the chunking
only through the order of floating-point sums.

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
import logging
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engines.pruning import preserved_modes
from ..errors import HMCConfigError, HMCError
from ..utils.counting import as_input_tuple
from ..utils.memory import activation_bytes, available_bytes, budget_bytes, mib, trim_heap

__all__ = ['DEFAULT_PROJECTIONS', 'FisherChunks', 'chain_ends', 'fisher_chunks', 'fisher_drops']

DEFAULT_PROJECTIONS = 4

_logger = logging.getLogger(__name__)

# Bytes a replicated image takes in the forward/backward pass, per byte of its activations (the outputs of
# every leaf module, batch 1, as ``utils.memory.activation_bytes`` counts them): autograd's saved tensors, the
# hooked outputs kept beside their copies, the gradients and the float64 output changes of the backward pass.
# Measured: torchvision ResNet-50 at 224x224 (122 MiB of activations per image), 3 replicas per pass, raised
# the RSS by 1.87 GB over the RSS before the pass, about 5 per replica (recipes/benchmarks/memory.py).
PASS_BYTES_PER_ACTIVATION_BYTE = 5.0
# Bytes of the per-sample weight gradients built at once (``_weight_grad_scores``, float32): one sample of
# ResNet-50's widest conv (2.4 M weights, 4 projections) takes 38 MiB.
WEIGHT_GRAD_BLOCK_BYTES = 128 * 2 ** 20


Masks = dict[str, dict[str, Tensor]]

Unit = tuple[str, str]  # ('prune', group) or ('decompose', layer)

LayerChanges = dict[str, dict[Unit, list[Tensor | None]]]  # module -> unit -> weight change per level (None: 0)

ChannelSets = dict[str, list[tuple[str, list[Tensor]]]]  # chain end -> [(group, pruned channels at each level)]


@dataclass
class _Accumulator:
    """Per-sample scores of one pass after another (on CPU, float64), each ``(levels, K_pass, N_chunk)``.

    Passes run chunk by chunk of the calibration batch and, within a chunk, block by block of the projections;
    ``blocks`` is the number of projection blocks per chunk, so ``assembled`` can put the pieces back together.
    """

    blocks: int = 1
    # (('prune', group), chain end) -> [(levels, K, N)]: -sum of the pruned channels' g . a
    channel_scores: dict[tuple[Unit, str], list[Tensor]] = field(default_factory=dict)
    # (unit, module) -> [(levels, K, N)]
    layer_scores: dict[tuple[Unit, str], list[Tensor]] = field(default_factory=dict)

    def assembled(self, pieces: list[Tensor]) -> Tensor:
        """``(levels, K, N)`` from the passes' pieces: projection blocks joined along K, chunks along N."""
        chunks = [torch.cat(pieces[start:start + self.blocks], dim=1) for start in range(0, len(pieces), self.blocks)]
        return torch.cat(chunks, dim=2)


@dataclass(frozen=True)
class FisherChunks:
    """How the Fisher pass splits its work: ``samples`` images per chunk, ``directions`` projections per pass.

    ``pass_bytes`` is the estimated working memory of one pass (``samples * directions`` replicated images).
    """

    samples: int
    directions: int
    pass_bytes: int


@dataclass
class _PassShape:
    """The current pass, as the hooks read it: ``replicas`` of each image in the forward pass, ``projections``
    carried by this backward pass (the first ones of the replicas), and whether more than one backward pass shares
    the forward pass (``shared``: the hooks keep what every one of them needs, e.g. a layer's unfolded input)."""

    replicas: int = 1
    projections: int = 1
    shared: bool = False


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


def _signs(count: int, samples: int, classes: int, generator: torch.Generator) -> Tensor | None:
    """Hutchinson's +-1 signs ``(K, N, C)`` (int8) for the whole batch; None when every class row is used."""
    if classes <= count:
        return None
    return (torch.randint(0, 2, (count, samples, classes), generator=generator) * 2 - 1).to(torch.int8)


def _projections(logits: Tensor, count: int, signs: Tensor | None) -> tuple[Tensor, float]:
    """Vectors ``v (K, N, C)`` with ``E[sum_k (v_k . dz)^2] * scale = dz^T F dz`` per sample, and ``scale``;
    ``signs (K, N, C)`` are this chunk's Hutchinson signs (``_signs``)."""
    probs = torch.softmax(logits.detach().double(), dim=1)                     # (N, C)
    root = probs.sqrt()
    classes = probs.shape[1]
    if classes <= count:  # exact: every row a_c = sqrt(p_c) (e_c - p)
        eye = torch.eye(classes, dtype=probs.dtype, device=probs.device)
        rows = root.T[:, :, None] * (eye[:, None, :] - probs[None, :, :])       # (C, N, C)
        return rows, 1.0
    weighted = signs.to(probs) * root[None]                                    # eps_c sqrt(p_c)
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
    """``g . delta`` per level, projection and sample ``(levels, K, N)`` for weight changes of ``module``: one
    output change per level (``_delta_output``). The general path; ``_weight_grad_scores`` replaces it where it can."""
    changes = [torch.zeros_like(module.weight) if change is None else change for change in changes]
    deltas = torch.stack([_delta_output(module, layer_input, change) for change in changes])  # (levels, N, ...)
    scores = torch.einsum('kn...,ln...->lkn', grad.double(), deltas.double())                 # (levels, K, N)
    # A copy, not einsum's view: the pass keeps every layer's scores until it ends, and keeping the views took
    # about 1 GB more peak RSS on a ResNet-50 at 224x224 (2 images, 4 levels, 2 units per conv) than copies.
    return scores.clone()


def _weight_grad_scores(module: nn.Module, layer_input: Tensor, grad: Tensor,
                        unit_changes: dict[Unit, list[Tensor | None]],
                        unfolded: dict[int, Tensor] | None = None) -> dict[Unit, Tensor] | None:
    """``{unit: (levels, K, N)}`` scores ``g . layer(x; dW)`` of every unit changing ``module``, from its per-sample
    weight gradients; None where only ``_unit_scores`` applies (grouped convs, padding modes other than zeros,
    ``padding='same'``).

    The output change is linear in the weight change, so ``g . layer(x; dW) = dW . G`` with ``G = d(g . layer(x))
    / dW`` (in the layer's dtype, float32 for half types): one gradient per sample and projection prices every unit and
    level of the layer, where ``_unit_scores`` runs one convolution per unit and level (and again for every block
    of projections). ``G (n, K, O, D)`` is built a few samples at a time, one product per sample of the output
    gradients ``(K*O, R)`` and the unfolded input patches ``(R, D)`` (summed over the ``R`` output positions),
    within ``WEIGHT_GRAD_BLOCK_BYTES``; it meets every unit's change at every level in one product with their
    stack ``(P, L)`` (a copy of the layer's changes for the call). ``unfolded`` (a dict kept across the backward
    passes of one forward pass) keeps the patches of each block for the next pass instead of unfolding the input
    again.
    """
    weight = module.weight
    projections, samples, outputs = grad.shape[0], grad.shape[1], weight.shape[0]
    work = torch.float32 if layer_input.dtype in (torch.float16, torch.bfloat16) else layer_input.dtype
    if isinstance(module, nn.Linear):  # rows R: every position of the leading dims
        grads = grad.reshape(projections, samples, -1, outputs).transpose(2, 3)            # (K, N, O, R)
        patches = layer_input.reshape(samples, -1, weight.shape[1]).transpose(1, 2)         # (N, D, R)
    elif (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == 'zeros'
          and not isinstance(module.padding, str)):
        grads = grad.reshape(projections, samples, outputs, -1)                              # (K, N, O, R)
        patches = None
    else:
        return None
    per_sample = WEIGHT_GRAD_BLOCK_BYTES // (4 * projections * weight.numel() + 4 * grads[:, :1].numel())
    if per_sample < 1:  # a weight too large for one sample's gradients (a huge Linear): one output change per level
        return None
    # Every unit's weight change at every level as one column of ``(P, L)``: one product prices them all.
    columns = [(unit, level) for unit, changes in unit_changes.items()
               for level, change in enumerate(changes) if change is not None]
    scores = {unit: torch.zeros(len(changes), projections, samples, dtype=torch.float64, device=grad.device)
              for unit, changes in unit_changes.items()}
    if not columns:
        return scores
    stacked = torch.stack([unit_changes[unit][level].detach().reshape(-1).to(work) for unit, level in columns], 1)
    for start in range(0, samples, per_sample):
        stop = min(start + per_sample, samples)
        if unfolded is not None and start in unfolded:
            block = unfolded[start]
        elif patches is None:  # (n, D, R), D in the order of the flattened weight (O, D)
            block = F.unfold(layer_input[start:stop].to(work), module.kernel_size, module.dilation, module.padding,
                             module.stride)
        else:
            block = patches[start:stop].to(work)
        if unfolded is not None:
            unfolded[start] = block
        count = stop - start
        # (n, K*O, R) @ (n, R, D): one product per sample for every projection, then (n*K, O*D) @ (P, L)
        sample_grads = grads[:, start:stop].to(work).transpose(0, 1).reshape(count, projections * outputs, -1)
        weight_grads = torch.bmm(sample_grads, block.transpose(1, 2)).reshape(count * projections, -1)  # (n*K, P)
        del sample_grads, block
        products = (weight_grads @ stacked).reshape(count, projections, len(columns))            # (n, K, L)
        del weight_grads
        for column, (unit, level) in enumerate(columns):
            scores[unit][level, :, start:stop] = products[:, :, column].T
    return scores
    return scores


def _channel_scores(grad: Tensor, activation: Tensor, channel_sets: list[tuple[str, list[Tensor]]]
                    ) -> dict[str, Tensor]:
    """``{group: (levels, K, N)}``: minus the pruned channels' ``sum_hw g * a``, from one module's ``grad (K, N, C,
    ...)`` and ``activation (N, C, ...)``; the ``(K, N, C)`` channel scores are dropped once summed."""
    per_channel = (grad * activation[None]).flatten(3).sum(3) if grad.dim() > 3 else grad * activation[None]
    per_channel = per_channel.double()                                                   # (K, N, C)
    return {group: -torch.stack([per_channel[:, :, channels].sum(2) for channels in levels])
            for group, levels in channel_sets}


@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Module], channel_sets: ChannelSets, layer_changes: LayerChanges,
           shape: _PassShape, accumulator: _Accumulator) -> Iterator[None]:
    """Record, per backward pass, the pruned channels' scores ``sum_hw g * a`` and layer scores ``sum g * delta``
    per unit and level; ``shape`` is the current pass's (the replicas past its projections carry zero gradients
    and are left out)."""

    def forward_hook(name):
        def hook(module, inputs, output):
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None
            samples = output.shape[0] // shape.replicas
            # A view, no copy: autograd keeps the layer's input for its own backward pass anyway (and
            # refuses to run if it was modified in place), so the output changes are computed there.
            layer_input = inputs[0].detach()[:samples] if name in layer_changes else None
            activation = output.detach()[:samples]
            unfolded = {} if shape.shared and layer_input is not None else None  # this forward pass's patches

            def on_grad(grad: Tensor) -> None:
                grad = grad.detach().reshape((-1, samples) + tuple(grad.shape[1:]))[:shape.projections]  # (K, N, ...)
                if name in channel_sets:
                    for group, scores in _channel_scores(grad, activation, channel_sets[name]).items():
                        accumulator.channel_scores.setdefault((('prune', group), name), []).append(scores.cpu())
                if layer_input is not None:
                    by_unit = _weight_grad_scores(module, layer_input, grad, layer_changes[name], unfolded)
                    if by_unit is None:
                        by_unit = {unit: _unit_scores(module, layer_input, grad, changes)
                                   for unit, changes in layer_changes[name].items()}
                    for unit, scores in by_unit.items():
                        accumulator.layer_scores.setdefault((unit, name), []).append(scores.cpu())

            output.register_hook(on_grad)
            # Later in-place ops (``out += identity``, ``relu_``) act on a copy, so ``output`` keeps the
            # activation and its gradient stays the gradient of this module's output.
            return output.clone()
        return hook

    names = set(channel_sets) | set(layer_changes)
    handles = [modules[name].register_forward_hook(forward_hook(name)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fisher_drops(model: nn.Module, calibration_inputs, *, prune_masks: dict[str, list[Masks]] | None = None,
                 weight_changes: dict[str, list[Tensor]] | None = None,
                 prune_weight_changes: dict[str, list[dict[str, Tensor]]] | None = None,
                 projections: int = DEFAULT_PROJECTIONS, seed: int = 0, memory_budget: int | None = None,
                 chunks: FisherChunks | None = None,
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
    memory_budget, chunks
        MiB the pass's working memory may take (None: ``utils.memory.budget_bytes``' automatic choice), or the
        chunking itself (``fisher_chunks``); the drops do not depend on it beyond floating-point summation order.

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
        if chunks is None:
            level_counts = [len(levels) for changes in (weight_changes, prune_weight_changes)
                            for levels in changes.values()]
            chunks = fisher_chunks(model, inputs, projections=projections, memory_budget=memory_budget,
                                   levels=max(level_counts or [1]))
        accumulator, scale = _fisher_scores(model, inputs, modules, prune_masks, layer_changes, projections,
                                            seed, chunks, progress)
    prune = _unit_drops({group: ('prune', group) for group in prune_masks}, accumulator.channel_scores,
                        accumulator, scale, {group: len(levels) for group, levels in prune_masks.items()})
    refitted = {group: len(levels) for group, levels in prune_weight_changes.items()}
    prune.update(_unit_drops({group: ('prune', group) for group in refitted}, accumulator.layer_scores, accumulator,
                             scale, refitted))
    decompose = _unit_drops({layer: ('decompose', layer) for layer in weight_changes}, accumulator.layer_scores,
                            accumulator, scale, {layer: len(levels) for layer, levels in weight_changes.items()})
    return prune, decompose


def fisher_chunks(model: nn.Module, calibration_inputs, *, projections: int = DEFAULT_PROJECTIONS,
                  memory_budget: int | None = None, levels: int = 1) -> FisherChunks:
    """The chunking of the Fisher pass over ``calibration_inputs`` that keeps its working memory in the budget.

    One replicated image costs ``PASS_BYTES_PER_ACTIVATION_BYTE`` times its activations, plus the float64 output
    changes of the largest hooked layer at ``levels`` levels; a chunk holds as many images times projections as
    the budget allows (all projections of an image together when they fit). Raises ``HMCConfigError`` naming
    ``memory_budget`` when a single image with a single projection does not fit, before anything runs.
    """
    inputs = as_input_tuple(calibration_inputs)
    samples = inputs[0].shape[0]
    with preserved_modes(model), torch.no_grad():
        model.eval()
        classes = model(*(tensor[:1] for tensor in inputs)).flatten(1).shape[1]
        total, largest = activation_bytes(model, tuple(tensor[:1] for tensor in inputs))
    copies = min(classes, projections)
    per_replica = int(PASS_BYTES_PER_ACTIVATION_BYTE * total) + 2 * (levels + 2) * largest  # float64: twice float32
    device = inputs[0].device
    budget = budget_bytes(memory_budget, device)
    replicas = budget // max(per_replica, 1)
    if replicas < 1:
        raise HMCConfigError(
            f'memory_budget={memory_budget!r} ({mib(budget)} MiB) is below what the sensitivity scan needs for one '
            f'calibration image at this input size: about {mib(per_replica)} MiB. Raise memory_budget to at least '
            f'{mib(per_replica) + 1} (MiB), lower the input size (image_size), or use sensitivity="kl"')
    available = available_bytes(device)
    if memory_budget is not None and available is not None and budget > available:
        _logger.warning('memory_budget=%d MiB is more than the %d MiB this system has available: the sensitivity scan '
                        'may be killed for lack of memory; lower memory_budget (or leave it unset for an automatic '
                        'one)', memory_budget, mib(available))
    directions = min(copies, replicas)
    chunk = max(1, min(samples, replicas // directions)) if directions == copies else 1
    return FisherChunks(samples=chunk, directions=directions, pass_bytes=per_replica * chunk * directions)


def _channel_sets(prune_masks: dict[str, list[Masks]], ends: dict[str, list[str]],
                  modules: dict[str, nn.Module]) -> ChannelSets:
    """``{chain end: [(group, pruned channels at each level)]}`` of the groups priced by their masks."""
    sets: ChannelSets = {}
    for group, levels in prune_masks.items():
        for name in ends.get(group, []):
            channels = [_pruned_channels(modules[name], masks[name]['weight']) for masks in levels]
            sets.setdefault(name, []).append((group, channels))
    return sets


def _fisher_scores(model: nn.Module, inputs: tuple, modules: dict[str, nn.Module], prune_masks: dict[str, list[Masks]],
                   layer_changes: LayerChanges, projections: int, seed: int, chunks: FisherChunks,
                   progress: bool) -> tuple[_Accumulator, float]:
    """The passes, ``model`` in eval mode: ``(per-sample scores, projection scale)``."""
    with torch.no_grad():
        classes = model(*(tensor[:1] for tensor in inputs)).flatten(1).shape[1]
    copies = min(classes, projections)
    group_members = {group: list(levels[0]) for group, levels in prune_masks.items() if levels}
    ends = chain_ends(model, tuple(tensor[:1] for tensor in inputs), group_members)
    channel_sets = _channel_sets(prune_masks, ends, modules)
    blocks = [(start, min(start + chunks.directions, copies)) for start in range(0, copies, chunks.directions)]
    accumulator = _Accumulator(blocks=len(blocks))
    shape = _PassShape()
    with _hooks(modules, channel_sets, layer_changes, shape, accumulator):
        signs = _signs(copies, inputs[0].shape[0], classes, torch.Generator().manual_seed(seed))
        scale = _backward_passes(model, inputs, copies, signs, chunks.samples, blocks, shape, progress)
    return accumulator, scale


def _backward_passes(model: nn.Module, inputs: tuple, copies: int, signs: Tensor | None, chunk: int,
                     blocks: list[tuple[int, int]], shape: _PassShape, progress: bool) -> float:
    """Forward the batch ``chunk`` images at a time, each replicated once per projection of a block (``blocks``:
    ``[(first, end)]`` of the ``copies`` projections, every block at most as large as the first), and backward each
    block through that one forward pass; returns the projections' scale.

    ``_hooks`` records the scores (``shape``: the replicas, and the current block's size). One forward pass
    per chunk however many blocks its projections take (the graph is kept for the next block's backward pass):
    where the budget holds one replica of an image, its four projections cost one forward and four backward passes,
    not four of each. The random ``signs (K, N, C)`` of the projections are drawn once for the whole batch
    (``_signs``), so the chunking changes no draw.
    """
    samples = inputs[0].shape[0]
    replicas = blocks[0][1] - blocks[0][0]
    scale = 1.0
    with tqdm(total=samples, desc='HMC sensitivity scan (proxy, Fisher)', unit='img', disable=not progress) as bar:
        for start in range(0, samples, chunk):
            part = tuple(tensor[start:start + chunk] for tensor in inputs)
            n = part[0].shape[0]
            shape.replicas, shape.shared = replicas, len(blocks) > 1
            # Gradients are taken w.r.t. the input only: every activation is on that path, and no
            # parameter gradient is computed (or left behind).
            replicated = tuple(_replicate(tensor, replicas) for tensor in part)
            with torch.enable_grad():
                logits = model(*replicated).flatten(1)
                chunk_signs = None if signs is None else signs[:, start:start + n]
                rows, scale = _projections(logits[:n], copies, chunk_signs)                 # (K, N, C)
                targets = [t for t in replicated if t.requires_grad]
                for index, (first, end) in enumerate(blocks):
                    shape.projections = end - first
                    block_rows = rows.new_zeros((replicas,) + tuple(rows.shape[1:])).to(logits.dtype)
                    block_rows[:end - first] = rows[first:end]                               # zero past the block
                    loss = (logits * block_rows.reshape(replicas * n, -1)).sum()
                    torch.autograd.grad(loss, targets, retain_graph=index < len(blocks) - 1)
                    del loss
            del replicated, logits
            trim_heap()
            bar.update(n)
    return scale


def _unit_drops(units: dict[str, Unit], scores: dict[tuple[Unit, str], list[Tensor]], accumulator: _Accumulator,
                scale: float, levels: dict[str, int]) -> dict[str, list[float]]:
    """Each unit's drop per level: its modules' scores ``(levels, K, N)`` summed before squaring (they act
    jointly), then ``_kl_estimate``; a unit no module scored (nothing changes) drops 0 at every level."""
    keys_by_unit: dict[Unit, list[tuple[Unit, str]]] = {}
    for key in scores:
        keys_by_unit.setdefault(key[0], []).append(key)
    drops = {}
    for name, unit in units.items():
        joint = None
        for key in sorted(keys_by_unit.get(unit, [])):
            part = accumulator.assembled(scores.pop(key))  # each module's pieces go once they are summed
            joint = part if joint is None else joint + part
        drops[name] = [0.0] * levels[name] if joint is None else [_kl_estimate(level, scale) for level in joint]
    return drops

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
