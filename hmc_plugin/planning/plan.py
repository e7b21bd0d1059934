"""``CompressionPlan``: the plain-data seam between planning and apply (per layer: group, prune ratio, ranks)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import HMCConfigError
from ..settings import MODES
from ..utils.jsonio import decode_float, encode_float, read_json, write_json

__all__ = ['MODES', 'LayerPlan', 'CompressionPlan', 'UnreachableTargetError']



LAYER_GROUPS = ('prune', 'decompose', 'both', 'keep')


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: its group, the prune ratio of its channel group, its low-rank ranks."""

    name: str
    group: str                      # 'prune' | 'decompose' | 'both' | 'keep' (what the plan does to it)
    prune_ratio: float = 0.0        # fraction of its output channels removed (shared by its pruning group)
    pruning_group: str | None = None  # leader name of the torch-pruning group its out channels belong to
    method: str | None = None       # 'tucker2' | 'svd' | 'cp' when decomposed
    ranks: tuple[int, ...] | None = None  # concrete ranks on the pruned layer, e.g. (r_out, r_in)


@dataclass
class CompressionPlan:
    """Per-layer plan plus the settings that produced it. Plain data: JSON round-trip, readable table."""

    layers: list[LayerPlan]
    mode: str
    target: dict[str, float]              # e.g. {'flops': 0.5} = keep half the FLOPs
    importance: str = 'l1'
    round_to: int = 1
    margin: float | None = None
    decompose_weight: float = 1.0         # decomposition drops counted this many times (operator exchange rate)
    predicted: dict[str, float] = field(default_factory=dict)  # cost model's kept fractions {'flops', 'params'}
    measured: dict[str, float] = field(default_factory=dict)   # kept fraction of the compressed model, when measured

    @property
    def prune_ratios(self) -> dict[str, float]:
        """Pruning group leader -> fraction of its channels removed (groups with ratio 0 omitted)."""
        return {layer.pruning_group: layer.prune_ratio for layer in self.layers
                if layer.pruning_group is not None and layer.prune_ratio > 0}

    @property
    def ranks(self) -> dict[str, tuple[int, ...]]:
        """Layer name -> ranks, for the layers to decompose."""
        return {layer.name: layer.ranks for layer in self.layers if layer.ranks is not None}

    @property
    def methods(self) -> dict[str, str]:
        return {layer.name: layer.method for layer in self.layers if layer.ranks is not None}

    def group_counts(self) -> dict[str, int]:
        return {group: sum(layer.group == group for layer in self.layers) for group in LAYER_GROUPS}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data['margin'] = encode_float(self.margin)
        data['decompose_weight'] = encode_float(self.decompose_weight)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> 'CompressionPlan':
        data = dict(data)
        data['layers'] = [LayerPlan(**{**layer, 'ranks': tuple(layer['ranks']) if layer['ranks'] is not None else None})
                          for layer in data['layers']]
        data['margin'] = decode_float(data.get('margin'))
        if 'decompose_weight' in data:
            data['decompose_weight'] = decode_float(data['decompose_weight'])
        return cls(**data)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        return write_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> 'CompressionPlan':
        return cls.from_dict(read_json(text_or_path))

    def table(self) -> str:
        """The plan as a fixed-width text table, one row per layer."""
        rows = [('layer', 'group', 'prune_ratio', 'method', 'ranks')]
        rows += [(layer.name, layer.group, f'{layer.prune_ratio:.3f}', layer.method or '-',
                  'x'.join(map(str, layer.ranks)) if layer.ranks else '-') for layer in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
        counts = ', '.join(f'{group}: {count}' for group, count in self.group_counts().items())
        target = ', '.join(f'{key}={value:g}' for key, value in self.target.items())
        predicted = ', '.join(f'{key}={value:.3f}' for key, value in self.predicted.items())
        weight = f', decompose_weight={self.decompose_weight:g}' if self.decompose_weight != 1 else ''
        header = f'CompressionPlan(mode={self.mode}{weight}, target {target}, predicted kept {predicted}; {counts})'
        return '\n'.join([header, lines[0], '-' * len(lines[0])] + lines[1:])

    def __str__(self) -> str:
        return self.table()


class UnreachableTargetError(HMCConfigError):
    """The budget cannot be met even with every allowed unit at its highest level.

    ``plan`` is that most compressed plan (the lowest cost the mode reaches), ``metric`` and ``target``
    the budget asked for; ``planning.targets.plan_for_target`` measures ``plan`` to say how far the model can go.
    """

    def __init__(self, message: str, plan: 'CompressionPlan', metric: str, target: float):
        super().__init__(message)
        self.plan = plan
        self.metric = metric
        self.target = target
