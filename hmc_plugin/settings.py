"""Every HMC setting once: its default, its check and what it means (``HMCSettings``), and the choices behind them.

An NNI ``config_list`` entry, a YAML ``--config`` file and the ``hmc`` command's flags all end up here,
in that order of precedence (later wins). The budget is one of ``target_flops``, ``target_params`` or
``target_latency`` (fractions to keep), exactly one (``HMCSettings.budget``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import HMCConfigError
from .utils.device import DEVICE_CHOICES, valid_device_spec
from .utils.onnx_runtime import LATENCY_BACKENDS

__all__ = ['MODES', 'IMPORTANCES', 'COMPRESSOR_IMPORTANCES', 'SENSITIVITIES', 'RANK_METHODS', 'SPEEDUPS',
           'FIT_ORDERS', 'LATENCY_BACKENDS', 'FINETUNE_SCHEDULES', 'DEFAULT_LEVELS', 'BUDGET_KEYS', 'HMCSettings', 'unknown_key_message']

MODES = ('prune', 'decompose', 'ahc', 'nahc', 'hmc')
IMPORTANCES = ('l1', 'l2', 'fpgm', 'bn_scale', 'taylor')  # torch-pruning importances the pruning engine knows
# 'taylor' scores channels by gradients of labelled batches, which HMCCompressor does not take
COMPRESSOR_IMPORTANCES = tuple(name for name in IMPORTANCES if name != 'taylor')
SENSITIVITIES = ('proxy', 'kl', 'evaluator')
RANK_METHODS = ('auto', 'tucker2', 'cp', 'svd', 'best')
FIT_ORDERS = ('sequential', 'one_pass')
FINETUNE_SCHEDULES = ('constant', 'cosine')  # the fine-tuning learning rate: kept, or annealed to 0 per step
SPEEDUPS = ('nni', 'torch_pruning')
DEFAULT_LEVELS = (0.2, 0.4, 0.6, 0.8)
BUDGET_KEYS = ('target_flops', 'target_params', 'target_latency')


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fraction(value) -> bool:  # (0, 1]
    return _number(value) and 0 < value <= 1


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _count(value) -> bool:  # an int >= 0
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _flag(value) -> bool:
    return isinstance(value, bool)


def _levels(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0 and all(_number(v) and 0 < v < 1 for v in value)
            and list(value) == sorted(set(value)))


def _margin(value) -> bool:
    return value in ('inf', 'auto', math.inf) or (_number(value) and value >= 0)


def _weight(value) -> bool:
    return value in ('inf', math.inf) or (_number(value) and 0 < value < math.inf)


def setting(default: Any, check: Callable[[Any], bool], allowed: str, meaning: str, optional: bool = True):
    """A settings field: ``default``, ``check(value) -> bool`` and the texts of the config-key table."""
    metadata = {'check': check, 'allowed': allowed, 'meaning': meaning, 'optional': optional}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class HMCSettings:
    """HMC's settings, validated on construction (``HMCConfigError`` naming the key, the value and what is allowed).

    ``None`` means "not set": no budget, the mode's own margin, torch's thread count. ``'inf'`` is read as
    ``math.inf`` for ``margin`` and ``decompose_weight``.
    """

    mode: str = setting('nahc', lambda v: v in MODES, f'one of {MODES}',
                        "which operators a layer may get: 'prune' / 'decompose' only, 'ahc' both everywhere, "
                        "'nahc' / 'hmc' by sensitivity grouping", optional=False)
    target_flops: float | None = setting(None, _fraction, 'a fraction in (0, 1]',
                                         'fraction of the FLOPs (MACs) to keep')
    target_params: float | None = setting(None, _fraction, 'a fraction in (0, 1]', 'fraction of the parameters to keep')
    target_latency: float | None = setting(None, _fraction, 'a fraction in (0, 1]',
                                           "fraction of the model's measured CPU time to keep")
    latency_batch: int = setting(1, _positive_int, 'an int >= 1', 'batch size at which target_latency is measured',
                                 optional=False)
    latency_threads: int | None = setting(None, _positive_int, 'an int >= 1',
                                          "torch threads at which target_latency is measured (default: torch's)")
    latency_backend: str = setting('torch', lambda v: v in LATENCY_BACKENDS, f'one of {LATENCY_BACKENDS}',
                                   "where target_latency is measured: 'torch' (eager PyTorch) or 'onnxruntime' (exported, "
                                   'all graph optimisations, as a CPU deployment runs it)', optional=False)
    levels: tuple[float, ...] = setting(DEFAULT_LEVELS, _levels, 'increasing fractions in (0, 1)',
                                        "fractions of a layer's FLOPs the scan removes", optional=False)
    importance: str = setting('l1', lambda v: v in COMPRESSOR_IMPORTANCES, f'one of {COMPRESSOR_IMPORTANCES}',
                              "torch-pruning's channel importance ('taylor' needs labelled calibration batches: use it "
                              'through hmc_plugin.engines.pruning.channel_masks(..., calibration=(inputs, targets)))',
                              optional=False)
    rank_method: str = setting('auto', lambda v: v in RANK_METHODS, f'one of {RANK_METHODS}',
                               "decomposition of kxk convs ('auto': Tucker-2; 'svd': a kxk conv to r channels then "
                               "a 1x1; 'best': the scan tries both per layer and keeps the one that drops less; "
                               "linear and 1x1 layers always use SVD)",
                               optional=False)
    margin: float | str | None = setting(None, _margin, "a number >= 0 or 'inf' ('auto' on the hmc command)",
                                         "HMC's margin tau in units of the median drop ('inf' = AHC; default 0.5 for "
                                         "nahc/hmc); 'auto' picks it by probe fine-tunes (the hmc command only)")
    prune_spread: float | None = setting(None, lambda v: _number(v) and 0 <= v <= 1, 'a fraction in [0, 1]',
                                         "no pruning group loses more than the budget's uniform prune ratio plus this "
                                         'fraction of its channels (None: no such cap)')
    decompose_weight: float = setting(1.0, _weight, "a number > 0 or 'inf'",
                                      "each decomposition drop of the scan counts this many times ('inf' never "
                                      'decomposes)', optional=False)
    sensitivity: str = setting('proxy', lambda v: v in SENSITIVITIES, f'one of {SENSITIVITIES}',
                               "'proxy' (one-pass Fisher estimate of the KL), 'kl' (KL per unit and level) or "
                               "'evaluator' (the Evaluator's metric)", optional=False)
    round_to: int = setting(1, _positive_int, 'an int >= 1',
                            'kept channel counts and low-rank ranks are multiples of this (ranks rounded up, at most '
                            "the layer's dimension; e.g. 8 for vector units)", optional=False)
    speedup: str = setting('nni', lambda v: v in SPEEDUPS, f'one of {SPEEDUPS}',
                           "how pruned layers are shrunk: NNI's ModelSpeedup or torch-pruning", optional=False)
    bn_batches: int = setting(8, _count, 'an int >= 0',
                              "calibration batches that re-estimate every BatchNorm's statistics after each compression "
                              '(in the kl/evaluator scans, the margin rule and the result; 0: off)', optional=False)
    data_aware: bool = setting(True, _flag, 'True or False',
                               "low-rank factors minimise the output error on each layer's calibration inputs "
                               '(False: the data-free weight error)', optional=False)
    reconstruct: bool = setting(True, _flag, 'True or False',
                                "after pruning, refit each consumer's input weights to its original output (ridge "
                                'least squares on calibration activations)', optional=False)
    fit_batches: int = setting(4, _positive_int, 'an int >= 1',
                               'calibration batches the data-aware fit and the reconstruction use', optional=False)
    calibration_steps: int | None = setting(None, _positive_int, 'an int >= 1',
                                            'training steps HMCCompressor runs through the Evaluator to gather its '
                                            'calibration batches when given no calibration_inputs or calibration_loader '
                                            '(default: max(bn_batches, fit_batches))')
    fit_order: str = setting('sequential', lambda v: v in FIT_ORDERS, f'one of {FIT_ORDERS}',
                             "whose inputs a layer is fitted to: the model compressed so far, layer by layer "
                             "('sequential'), or the pruned model's from one pass ('one_pass')", optional=False)
    memory_budget: int | None = setting(None, _positive_int, 'an int >= 1 (MiB)',
                                        "MiB the scan's Fisher pass may use for activations: it splits the calibration "
                                        'batch and the projections into chunks that fit (default: 1024, at most a '
                                        "quarter of the system's available memory); a budget too small for one image "
                                        "is an error before the scan. It also sizes NNI's speedup batch, whether "
                                        'the data-aware fit runs all layers in one pass, and the micro-batches of a '
                                        "fine-tuning step of make_torch_evaluator (the hmc command's) whose saved "
                                        'activations exceed it (unset there: a quarter of the available memory)')
    distill: bool = setting(False, lambda v: isinstance(v, bool), 'True or False',
                            'fine-tune with knowledge distillation from the original model', optional=False)
    distill_alpha: float = setting(0.5, _fraction, 'a fraction in (0, 1]', 'weight of the distillation loss',
                                   optional=False)
    distill_temperature: float = setting(4.0, lambda v: _number(v) and v > 0, 'a number > 0',
                                         'temperature of the distillation loss', optional=False)
    device: str = setting('model', valid_device_spec, DEVICE_CHOICES,
                          "where the scan, the fits, BatchNorm recalibration, fine-tuning and evaluation run: "
                          "'model' (HMCCompressor's default) where the model you pass is, so your evaluator's "
                          "functions get the model where they expect it; 'auto' (the hmc command's default) the first "
                          "CUDA GPU if torch sees one, else the CPU. The model you pass is not moved and the "
                          'compressed model comes back on its device', optional=False)
    mixed_precision: bool = setting(False, _flag, 'True or False',
                                    'fine-tune under torch.autocast in bfloat16 (CPU and CUDA; no loss scaling '
                                    'needed); weights stay in their dtype', optional=False)

    def __post_init__(self):
        for key in self.keys():
            self.check_value(key, getattr(self, key))
        self.levels = tuple(self.levels)
        for key in ('margin', 'decompose_weight'):
            if getattr(self, key) == 'inf':
                setattr(self, key, math.inf)
        budgets = [key for key in BUDGET_KEYS if getattr(self, key) is not None]
        if len(budgets) > 1:
            raise HMCConfigError(f"Got {' and '.join(f'{key}={getattr(self, key)!r}' for key in budgets)}; "
                                 f'keep exactly one budget')

    @property
    def calibration_batches(self) -> int:
        """Calibration batches a compression reads: ``calibration_steps``, or ``max(bn_batches, fit_batches)``."""
        return self.calibration_steps or max(self.bn_batches, self.fit_batches)

    @property
    def budget(self) -> tuple[str, float]:
        """``('flops' | 'params' | 'latency', fraction to keep)``; ``HMCConfigError`` when no budget is set."""
        for key in BUDGET_KEYS:
            if getattr(self, key) is not None:
                return key[len('target_'):], getattr(self, key)
        raise HMCConfigError("No budget is set: give 'target_flops' (fraction of FLOPs to keep, e.g. 0.5), "
                             "'target_params' or 'target_latency'")

    @property
    def budget_entry(self) -> dict[str, float]:
        """The budget as its config key, e.g. ``{'target_flops': 0.5}``."""
        metric, fraction = self.budget
        return {f'target_{metric}': fraction}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(spec.name for spec in dataclasses.fields(cls))

    @classmethod
    def check_value(cls, key: str, value: Any) -> None:
        """``HMCConfigError`` naming ``key``, ``value``, what is allowed and what the key means, unless it passes."""
        spec = next(spec for spec in dataclasses.fields(cls) if spec.name == key)
        if value is None and spec.metadata['optional']:
            return
        if not spec.metadata['check'](value):
            raise HMCConfigError(f"Got {key}={value!r} but expected {spec.metadata['allowed']} "
                                 f"({spec.metadata['meaning']})")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = 'settings') -> 'HMCSettings':
        """Settings from a plain dict; an unknown key is an ``HMCConfigError`` with a "did you mean"."""
        for key in values:
            if key not in cls.keys():
                raise HMCConfigError(unknown_key_message(key, cls.keys(), where))
        return cls(**values)

    def replace(self, **changes) -> 'HMCSettings':
        """A validated copy with ``changes``; a new budget key replaces the budget (the others are cleared)."""
        for key in changes:
            if key not in self.keys():
                raise HMCConfigError(unknown_key_message(key, self.keys(), 'HMCSettings'))
        values = self.as_dict()
        if any(changes.get(key) is not None for key in BUDGET_KEYS):
            values.update(dict.fromkeys(BUDGET_KEYS))
        return HMCSettings(**{**values, **changes})

    def as_dict(self) -> dict[str, Any]:
        """Every setting as a plain value (levels as a list; ``math.inf`` kept)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.__dict__.items()}

    @classmethod
    def table(cls) -> list[tuple[str, str, str, str]]:
        """``(key, default, allowed, meaning)`` for every setting: the source of the config-key table."""
        rows = []
        for spec in dataclasses.fields(cls):
            default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
            rows.append((spec.name, _shown(default), spec.metadata['allowed'], spec.metadata['meaning']))
        return rows


def _shown(value: Any) -> str:
    if value is None:
        return 'not set'
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def unknown_key_message(key: str, allowed: Iterable[str], where: str, what: str = 'key') -> str:
    """``"<where>: unknown <what> 'x' (did you mean 'y'?); allowed <what>s are [...]"``."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(key), allowed, n=1)
    suggestion = f' (did you mean {close[0]!r}?)' if close else ''
    return f'{where}: unknown {what} {key!r}{suggestion}; allowed {what}s are {allowed}'
