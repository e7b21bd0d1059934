"""``SensitivityTable``: the plain-data result of a scan (per unit and level: the metric drop), JSON in and out."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..settings import DEFAULT_LEVELS
from ..utils.jsonio import read_json, write_json

__all__ = ['DEFAULT_LEVELS', 'SensitivityTable']





Masks = dict[str, dict[str, torch.Tensor]]


@dataclass
class SensitivityTable:
    """Metric drop per unit and level, for both operators; the seam between scan and plan.

    ``prune[group_name][i]`` and ``decompose[layer_name][i]`` are the drops at ``levels[i]``
    (fraction of the unit's FLOPs removed). ``groups`` maps each pruning group to its member layers.
    ``decompose_methods`` (scans with ``rank_method='best'``) names the decomposition each kxk conv's curve
    belongs to, the one the plan then uses for it.
    """

    levels: list[float]
    mode: str
    baseline: float
    prune: dict[str, list[float]] = field(default_factory=dict)
    decompose: dict[str, list[float]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    decompose_methods: dict[str, str] = field(default_factory=dict)  # kxk conv -> 'tucker2' | 'svd' (rank_method 'best')
    settings: dict[str, Any] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        return write_json(asdict(self), path)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> 'SensitivityTable':
        return cls(**read_json(text_or_path))

    def is_complete(self) -> bool:
        """True when every scheduled unit has a drop for every level."""
        expected = self.settings.get('units', {})
        return all(len(getattr(self, op).get(name, [])) == len(self.levels)
                   for op, names in expected.items() for name in names)

    def mean_drop(self, operator: str, name: str) -> float:
        """Mean drop over the levels (the per-unit sensitivity used for ranking and grouping)."""
        drops = getattr(self, operator)[name]
        return sum(drops) / len(drops)

    def plot(self, path: str | os.PathLike, max_layers: int = 64) -> None:
        """Draw per-layer curves (drop against level), pruning and decomposition side by side, as a PNG."""
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        cmap = plt.get_cmap('viridis')
        for ax, operator, title in ((axes[0], 'prune', 'pruning (per group)'),
                                    (axes[1], 'decompose', 'decomposition (per layer)')):
            curves = list(getattr(self, operator).items())[:max_layers]
            for index, (name, drops) in enumerate(curves):
                ax.plot([0.0] + self.levels, [0.0] + drops, marker='.', linewidth=1,
                        color=cmap(index / max(1, len(curves) - 1)), label=name)
            ax.set_title(title)
            ax.set_yscale('symlog', linthresh=1e-3)  # drops span orders of magnitude
            ax.set_xlabel("fraction of the layer's FLOPs removed")
            ax.grid(alpha=0.3)
            if 0 < len(curves) <= 12:
                ax.legend(fontsize=6)
        axes[0].set_ylabel(f'metric drop ({self.mode})')
        fig.suptitle('HMC sensitivity scan (colour: depth, shallow to deep)')
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
