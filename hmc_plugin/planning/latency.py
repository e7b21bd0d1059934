"""Latency model: measured CPU time of every layer as it is and as each candidate replacement, for latency budgets.

FLOPs are a poor stand-in for speed on a CPU (a Tucker-2 conv with 4x fewer FLOPs can run slower than the
conv it replaces). A latency budget (``target_latency``) is allocated on times measured on this machine:

- every Conv2d/Linear is timed alone, at the budget's batch size and thread count, on a grid of pruned
  shapes (its input and output channels at each scanned level of the groups they belong to; times in
  between are interpolated bilinearly in the channel counts) and decomposed at each scanned level (a
  factor on the time of its possibly pruned shape);
- the rest of the model (BN, ReLU, pooling, additions) takes the whole model's measured time minus the
  layers' times, shared among the layers by the size of their outputs and shrinking with their output
  channels;
- measurements are cached on disk (:class:`LatencyCache`) by machine, torch version, batch, threads, backend
  (``'torch'``, or ``'onnxruntime'`` and its version: ``utils.onnx_runtime``), on a GPU by its name and the
  torch and CUDA versions (a model on CUDA is timed there, with CUDA events), layer shape and replacement, so a
  second plan on the same machine measures nothing new. The side-by-side
  timings of whole compressed models that ``planning.targets.plan_for_latency`` checks its plans with are cached too,
  by the compressed architecture: the same budget planned twice takes the same corrections and gives the
  same plan (HMC's prune-only candidate is prune-only's plan).

``planning.targets.plan_for_latency`` checks the prediction against a measurement of the compressed model and
corrects the plan's target by the miss.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..engines.lowrank import decomposable, replacement_architecture
from ..engines.pruning import kept_channels
from ..errors import HMCConfigError
from ..utils.counting import as_input_tuple, forward_with_hooks
from ..utils.device import accelerator_label, model_device
from ..utils.store import JsonStore, key_of
from ..utils.onnx_runtime import backend_label
from ..utils.timing import machine_description, measure_latency, measure_latency_side_by_side
from .cost import CostModel, LayerCost, decomposed_cost, shape_module

__all__ = ['default_cache_path', 'batched_input', 'LatencyCache', 'LatencyModel']

_logger = logging.getLogger(__name__)

STALE_CACHE_TOLERANCE = 0.25  # warn when the whole model's time differs this much from the cached one


_MIN_TIMED_SECONDS = 0.05   # repeat a layer until its timed runs add up to this much (or MAX_REPEATS)
_MIN_REPEATS, _MAX_REPEATS, _WARMUP = 5, 41, 2


def default_cache_path() -> Path:
    """``$HMC_LATENCY_CACHE``, else ``~/.cache/hmc_plugin/latency.json``."""
    return Path(os.environ.get('HMC_LATENCY_CACHE') or Path.home() / '.cache' / 'hmc_plugin' / 'latency.json')


def batched_input(dummy_input: Any, batch: int) -> tuple:
    """The dummy input (batch 1) repeated to ``batch`` along dimension 0, as a tuple of tensors."""
    return tuple(tensor[:1].expand(batch, *tensor.shape[1:]).contiguous() for tensor in as_input_tuple(dummy_input))


class LatencyCache:
    """Milliseconds per measurement key, in a JSON file shared by all plans on this machine (a ``JsonStore``).

    A key names what was timed (machine, torch version, batch, threads, layer shape, replacement); the store
    keeps it beside the time under its digest. ``measured`` counts the keys this object had to measure (0 when
    everything came from the file). Writes merge with the file under a lock, so concurrent runs (NNI trials)
    keep each other's entries; every ``save_every`` new measurements are written (and logged), so an
    interrupted plan keeps them. A file of another layout reads as empty.
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike | None = None, save_every: int = 50):
        self.path = Path(path) if path is not None else default_cache_path()
        self.store = JsonStore(self.path, version=self.VERSION, save_every=save_every)
        self.measured = 0
        self._digests: dict[str, str] = {}  # the planner asks for the same keys at every allocation step

    def _digest(self, key: str) -> str:
        digest = self._digests.get(key)
        if digest is None:
            digest = self._digests[key] = key_of(key)
        return digest

    def __contains__(self, key: str) -> bool:
        return self._digest(key) in self.store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: str) -> float:
        """The cached time (ms) of ``key``; ``KeyError`` when it was never measured."""
        digest = self._digest(key)
        if digest not in self.store:
            raise KeyError(key)
        return float(self.store.get(digest))

    def get(self, key: str, measure: Callable[[], float]) -> float:
        """The cached time of ``key``, or ``measure()`` (ms), stored."""
        if key not in self:
            self.put(key, measure())
        return self[key]

    def put(self, key: str, ms: float) -> None:
        """Store a new measurement (ms) of ``key``."""
        self.measured += 1
        self.store.put(self._digest(key), float(ms), key_data=key)
        if self.store.unsaved == 0:
            _logger.info('Timed %d layer shapes so far (saved to %s)', self.measured, self.path)

    def save(self) -> None:
        """Write the new measurements (merged with the file's)."""
        self.store.save()


def _time_ms(module: nn.Module, inputs: torch.Tensor, threads: int, backend: str = 'torch') -> float:
    """Median time (ms) of ``module(inputs)`` in ``backend``: warm-up, then repeats until about 50 ms were timed."""
    return measure_latency(module, inputs, warmup=_WARMUP, repeats=_MIN_REPEATS, num_threads=threads,
                           min_seconds=_MIN_TIMED_SECONDS, max_repeats=_MAX_REPEATS, backend=backend)


def _nearest(nodes: Sequence[int], value: int) -> int:
    return min(nodes, key=lambda node: (abs(node - value), -node))


def _interpolate(nodes: Sequence[int], value: int) -> tuple[int, int, float]:
    """Neighbouring grid nodes of ``value`` and its weight on the upper one (nodes ascending)."""
    if value <= nodes[0] or len(nodes) == 1:
        return nodes[0], nodes[0], 0.0
    if value >= nodes[-1]:
        return nodes[-1], nodes[-1], 0.0
    upper = int(np.searchsorted(nodes, value))
    low, high = nodes[upper - 1], nodes[upper]
    return low, high, (value - low) / (high - low)


class LatencyModel:
    """Predicted CPU time (ms, one forward pass at ``batch``) of the model under any plan state.

    Parameters
    ----------
    model, dummy_input
        The original model and a batch-1 example input (repeated to ``batch`` for timing).
    cost
        The plan's ``CostModel`` (layer shapes and pruning groups) of the same model.
    levels
        The sensitivity table's levels: the pruning grid and the decomposition levels that are timed.
    batch, threads
        Batch size and torch threads of the budget.
    backend
        Where the times are measured: ``'torch'`` (eager PyTorch) or ``'onnxruntime'`` (every layer and model
        exported and run in ONNX Runtime with all graph optimisations, ``utils.onnx_runtime``); part of the
        cache keys, with the runtime's version.
    cache
        A :class:`LatencyCache` or its path (``None``: the default path).
    """

    def __init__(self, model: nn.Module, dummy_input: Any, cost: CostModel, levels: Sequence[float], *,
                 batch: int = 1, threads: int | None = None, round_to: int = 1,
                 cache: LatencyCache | str | os.PathLike | None = None, backend: str = 'torch'):
        self.backend = backend
        self.backend_label = backend_label(backend)  # an unknown backend or a missing runtime fails first
        self.device = model_device(model)
        if self.device.type != 'cpu' and backend != 'torch':
            raise HMCConfigError(f"Got latency_backend={backend!r} with the model on {self.device}: ONNX Runtime times "
                                 f"on the CPU here; use latency_backend='torch' on a GPU, or device='cpu'")
        self.accelerator = accelerator_label(self.device)
        self.cost = cost
        self.levels = sorted(float(level) for level in levels)
        self.batch = int(batch)
        self.threads = int(threads or torch.get_num_threads())
        self.round_to = round_to
        self.cache = cache if isinstance(cache, LatencyCache) else LatencyCache(cache)
        self.machine = machine_description()
        self._factors: dict[tuple[str, int, int], list[float]] = {}   # decomposed / dense time per grid shape
        self.input_sizes = _input_sizes(model, dummy_input, list(cost.layers))
        now_ms = measure_latency(model, batched_input(dummy_input, self.batch), warmup=2, repeats=7,
                                 num_threads=self.threads, backend=backend)
        self.original_ms = self.cache.get(self._model_key(model, dummy_input), lambda: now_ms)
        if abs(now_ms / self.original_ms - 1) > STALE_CACHE_TOLERANCE:
            # Cached layer times and today's machine disagree (other processes, another CPU governor): a
            # prediction mixing them would be wrong in ways the plan's correction cannot see.
            _logger.warning('The model runs in %.2f ms now but %.2f ms when the latency cache %s was made (batch %d, '
                            '%d threads): the machine is busier or faster than then. Delete the cache to re-measure '
                            'on a quiet machine.', now_ms, self.original_ms, self.cache.path, self.batch, self.threads)
        layers_ms = {name: self._dense_ms(name, layer.in_channels, layer.out_channels)
                     for name, layer in cost.layers.items()}
        total_layers = sum(layers_ms.values())
        # Timed alone, layers can add up to more than the whole model (cold caches): then scale them down.
        self.layer_scale = min(1.0, self.original_ms / total_layers) if total_layers > 0 else 1.0
        rest = max(0.0, self.original_ms - total_layers)
        outputs = {name: layer.out_channels * layer.positions for name, layer in cost.layers.items()}
        total_outputs = sum(outputs.values()) or 1
        self.rest_share = {name: rest * outputs[name] / total_outputs for name in cost.layers}
        self.cache.save()

    # -- keys and measurements ---------------------------------------------------------------------

    def _prefix(self) -> str:
        backend = f'|backend {self.backend_label}' if self.backend_label else ''  # torch keys as they were
        accelerator = f'|device {self.accelerator}' if self.accelerator else ''  # CPU keys as they were
        return f'{self.machine}|batch {self.batch}|threads {self.threads}{backend}{accelerator}'

    def _model_key(self, model: nn.Module, dummy_input: Any) -> str:
        return f'{self._prefix()}|model {_architecture(model, dummy_input)}'

    def side_by_side_ms(self, model: nn.Module, compressed: nn.Module, dummy_input: Any,
                        confirm=lambda fraction: False) -> tuple[float, float]:
        """``(original_ms, compressed_ms)``: ``compressed`` timed side by side with ``model`` at the batch and threads.

        Interleaved runs (``utils.timing.measure_latency_side_by_side``: 2 warm-up, median of 7); when
        ``confirm(compressed_ms / original_ms)`` is true the pair is timed again and the means are kept (one
        timing can be lucky on a busy machine). Cached by the original's and the compressed model's
        architectures, so a compressed model that was timed before is not timed again.
        """
        key = f'{self._model_key(model, dummy_input)}|compressed {_architecture(compressed, dummy_input)}'
        keys = (f'{key}|original', f'{key}|compressed')
        if not all(name in self.cache for name in keys):
            inputs = batched_input(dummy_input, self.batch)
            original_ms, compressed_ms = measure_latency_side_by_side([model, compressed], inputs, warmup=2, repeats=7,
                                                                      num_threads=self.threads, backend=self.backend)
            if confirm(compressed_ms / original_ms):
                again_original_ms, again_ms = measure_latency_side_by_side([model, compressed], inputs, warmup=1,
                                                                          repeats=7, num_threads=self.threads,
                                                                          backend=self.backend)
                original_ms, compressed_ms = (original_ms + again_original_ms) / 2, (compressed_ms + again_ms) / 2
            self.cache.put(keys[0], original_ms)
            self.cache.put(keys[1], compressed_ms)
        return self.cache[keys[0]], self.cache[keys[1]]

    def _layer_key(self, layer: LayerCost, in_channels: int, out_channels: int, replacement: str) -> str:
        size = self.input_sizes[layer.name]
        return (f'{self._prefix()}|{layer.kind} {in_channels}->{out_channels} k{layer.kernel} s{layer.stride} '
                f'p{layer.padding} d{layer.dilation} g{layer.conv_groups} bias {layer.bias} in {size}|{replacement}')

    @staticmethod
    def _shape(layer: LayerCost, in_channels: int, out_channels: int) -> nn.Module:
        """A randomly initialised layer of the pruned shape (real values: uninitialised memory can hold
        denormals, which are slow)."""
        if layer.kind == 'linear':
            return nn.Linear(in_channels, out_channels, bias=layer.bias)
        groups = layer.conv_groups
        if groups == layer.in_channels == layer.out_channels:
            groups = in_channels                       # depthwise stays depthwise when pruned
        elif in_channels % groups or out_channels % groups:
            groups = math.gcd(math.gcd(in_channels, out_channels), groups)
        return nn.Conv2d(in_channels, out_channels, layer.kernel, stride=layer.stride, padding=layer.padding,
                         dilation=layer.dilation, groups=groups, bias=layer.bias)

    def _input(self, layer: LayerCost, in_channels: int) -> torch.Tensor:
        size = self.input_sizes[layer.name]
        if layer.kind == 'linear':
            return torch.randn(self.batch, *size, in_channels, device=self.device)
        return torch.randn(self.batch, in_channels, *size, device=self.device)

    def _dense_ms(self, name: str, in_channels: int, out_channels: int) -> float:
        layer = self.cost.layers[name]
        return self.cache.get(self._layer_key(layer, in_channels, out_channels, 'dense'),
                              lambda: _time_ms(self._shape(layer, in_channels, out_channels).to(self.device),
                                               self._input(layer, in_channels), self.threads, self.backend))

    def _decomposed_ms(self, name: str, in_channels: int, out_channels: int, level: float) -> float:
        """Time of the layer at a (grid) pruned shape, decomposed to keep ``1 - level`` of that shape's FLOPs."""
        layer = self.cost.layers[name]
        _, _, ranks, method = decomposed_cost(layer, in_channels, out_channels, level, self.cost.method_of(name),
                                              self.round_to)
        replacement = f'{method} {tuple(ranks)}'
        return self.cache.get(self._layer_key(layer, in_channels, out_channels, replacement),
                              lambda: _time_ms(replacement_architecture(
                                  self._shape(layer, in_channels, out_channels), ranks, method).to(self.device),
                                  self._input(layer, in_channels), self.threads, self.backend))

    # -- prediction ----------------------------------------------------------------------------------

    def _grid(self, channels: int, group: str | None) -> list[int]:
        if group is None:
            return [channels]
        return sorted({kept_channels(channels, ratio, self.round_to) for ratio in [0.0] + self.levels})

    def pruned_ms(self, name: str, in_channels: int, out_channels: int) -> float:
        """Time of the dense layer at a pruned shape, bilinear between timed grid shapes."""
        layer = self.cost.layers[name]
        in_low, in_high, in_weight = _interpolate(self._grid(layer.in_channels, self.cost.in_group.get(name)),
                                                  in_channels)
        out_low, out_high, out_weight = _interpolate(self._grid(layer.out_channels, self.cost.out_group.get(name)),
                                                     out_channels)
        corners = [(in_low, out_low, (1 - in_weight) * (1 - out_weight)), (in_high, out_low, in_weight * (1 - out_weight)),
                   (in_low, out_high, (1 - in_weight) * out_weight), (in_high, out_high, in_weight * out_weight)]
        return sum(weight * self._dense_ms(name, i, o) for i, o, weight in corners if weight > 0)

    def decomposition_factor(self, name: str, level: float, in_channels: int | None = None,
                             out_channels: int | None = None) -> float:
        """Time of the layer decomposed at ``level`` over its dense time (> 1: the decomposition is slower).

        Timed on the grid shape nearest the (pruned) shape, at the scanned levels; linear in between.
        The overhead of a decomposition's extra layers weighs more on a pruned layer, so the factor is
        not taken from the unpruned shape.
        """
        layer = self.cost.layers[name]
        if level <= 0 or not decomposable(shape_module(layer, layer.in_channels, layer.out_channels)):
            return 1.0
        in_node = _nearest(self._grid(layer.in_channels, self.cost.in_group.get(name)),
                           layer.in_channels if in_channels is None else in_channels)
        out_node = _nearest(self._grid(layer.out_channels, self.cost.out_group.get(name)),
                            layer.out_channels if out_channels is None else out_channels)
        key = (name, in_node, out_node)
        if key not in self._factors:  # the allocation asks for every unit at every step
            dense = self._dense_ms(name, in_node, out_node)
            self._factors[key] = [self._decomposed_ms(name, in_node, out_node, scanned) / dense
                                  for scanned in self.levels]
        return float(np.interp(level, self.levels, self._factors[key]))

    def layer_ms(self, name: str, prune_ratios: dict[str, float], dec_levels: dict[str, float],
                 round_to: int = 1) -> float:
        """Predicted time of layer ``name`` (its share of BN/ReLU/pooling included) in the given plan state."""
        layer = self.cost.layers[name]
        in_channels, out_channels = self.cost.pruned_shape(name, prune_ratios, round_to)
        dense = self.pruned_ms(name, in_channels, out_channels)
        own = dense * self.decomposition_factor(name, dec_levels.get(name, 0.0), in_channels, out_channels)
        return self.layer_scale * own + self.rest_share[name] * out_channels / layer.out_channels

    def predict_ms(self, prune_ratios: dict[str, float], dec_levels: dict[str, float], round_to: int = 1) -> float:
        """Predicted time of the whole model (ms) in the given plan state."""
        return sum(self.layer_ms(name, prune_ratios, dec_levels, round_to) for name in self.cost.layers)

    def describe(self) -> dict[str, Any]:
        return {'batch': self.batch, 'threads': self.threads, 'backend': self.backend, 'machine': self.machine,
                **({'device': self.accelerator} if self.accelerator else {}),
                'original_ms': self.original_ms, 'cache': str(self.cache.path), 'new_measurements': self.cache.measured}


def _input_sizes(model: nn.Module, dummy_input: Any, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Each layer's input size besides batch and channels: (H, W) of a conv, the middle dims of a Linear."""
    sizes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())

    def recorder(name):
        def record(module, inputs, output):
            shape = tuple(inputs[0].shape)
            sizes[name] = shape[1:-1] if isinstance(module, nn.Linear) else shape[2:]
        return record

    forward_with_hooks(model, dummy_input, {modules[name]: recorder(name) for name in names})
    return sizes


def _architecture(model: nn.Module, dummy_input: Any) -> str:
    """The model's class and a digest of its input shapes and every module's parameter shapes (not values)."""
    shapes = [tuple(tensor.shape[1:]) for tensor in as_input_tuple(dummy_input)]
    signature = [(name, type(module).__name__, tuple(p.shape for p in module.parameters(recurse=False)))
                 for name, module in model.named_modules()]
    return f'{type(model).__name__} {key_of(repr((type(model).__name__, shapes, signature)))[:12]}'
