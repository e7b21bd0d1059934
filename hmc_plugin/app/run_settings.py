"""``RunSettings``: what an end-to-end run depends on (model, data, training), around one ``HMCSettings``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import HMCConfigError
from ..settings import BUDGET_KEYS, FINETUNE_SCHEDULES, HMCSettings, unknown_key_message

__all__ = ['DEFAULT_BUDGET', 'RunSettings', 'RUN_KEY_HELP']

DEFAULT_BUDGET = {'target_flops': 0.5}  # a run that names no budget keeps half the FLOPs
# A run builds its model on the CPU and moves it itself, so its HMC settings start from a GPU when there is one.
RUN_HMC_DEFAULTS = {'device': 'auto'}

# run key -> what it means (the config-key table and the CLI's help come from here)
RUN_KEY_HELP = {
    'model': "zoo name (resnet20..resnet110), 'torchvision:NAME' or 'package.module:callable'",
    'data': "'digits', 'digits_hard', 'cifar10:DIR' or 'imagefolder:DIR'",
    'image_size': "input size (default: the loader's, 32 for digits/CIFAR)",
    'latency_cache': 'JSON file of measured layer times (default $HMC_LATENCY_CACHE or '
                     '~/.cache/hmc_plugin/latency.json)',
    'methods': 'the modes `hmc report` compares, in order',
    'op_types': 'layer types to compress (NNI op_types)',
    'exclude_op_names': 'layers to leave as they are (NNI exclude_op_names)',
    'probe_steps': "fine-tuning steps of each candidate of margin 'auto'",
    'calibration_size': 'images in the calibration batch of the proxy and KL scans',
    'train_epochs': 'epochs to train the baseline when no checkpoint is given',
    'train_lr': "the baseline's peak learning rate (SGD; linear warm-up, then cosine)",
    'warmup_epochs': "epochs of the baseline's linear learning-rate warm-up (at most a fifth of the training)",
    'allow_chance_baseline': 'go on when the baseline is within 0.05 of chance accuracy (else an error)',
    'finetune_epochs': 'fine-tuning epochs of each compressed model',
    'finetune_lr': 'fine-tuning learning rate (SGD)',
    'finetune_schedule': "fine-tuning learning rate: 'constant' or 'cosine' (annealed to 0 over the run's steps)",
    'batch_size': 'batch size of training and fine-tuning',
    'seed': 'seed of the initial weights, the data order and the calibration batch',
    'threads': 'torch threads for training and timing (also the latency budget\'s threads)',
    'checkpoint': 'state_dict of the trained model to compress (skips training)',
}


@dataclass(init=False)
class RunSettings:
    """Everything a run depends on; written into report.json (``as_dict``) so a run can be reproduced.

    HMC's settings are one ``HMCSettings`` (``hmc``); they can be given flat as well, and read flat
    (``RunSettings(target_params=0.4).target_params``). A budget given replaces the other budgets; with
    none given the run keeps ``DEFAULT_BUDGET``. Unknown keys raise ``HMCConfigError`` with a
    "did you mean".
    """

    model: str = 'resnet56'
    data: str = 'digits'
    image_size: int | None = None
    latency_cache: str | None = None
    methods: Sequence[str] = ('prune', 'decompose', 'ahc', 'nahc', 'hmc')
    op_types: Sequence[str] = ('Conv2d',)
    exclude_op_names: Sequence[str] = ()
    probe_steps: int = 60
    calibration_size: int = 64
    train_epochs: int = 15
    train_lr: float = 0.1
    warmup_epochs: float = 1.0
    allow_chance_baseline: bool = False
    finetune_epochs: int = 3
    finetune_lr: float = 0.003
    finetune_schedule: str = 'constant'
    batch_size: int = 64
    seed: int = 0
    threads: int = 2
    checkpoint: str | None = None
    hmc: HMCSettings = field(default_factory=HMCSettings)

    def __init__(self, hmc: HMCSettings | None = None, **values: Any):
        run_keys = self.run_keys()
        for key in values:
            if key not in run_keys and key not in HMCSettings.keys():
                raise HMCConfigError(unknown_key_message(key, run_keys + HMCSettings.keys(), 'RunSettings'))
        for spec in dataclasses.fields(self):
            if spec.name != 'hmc':
                default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
                value = values.get(spec.name, default)
                setattr(self, spec.name, tuple(value) if isinstance(value, list) else value)
        hmc_values = {key: value for key, value in values.items() if key in HMCSettings.keys()}
        merged = (hmc or HMCSettings(**RUN_HMC_DEFAULTS)).as_dict()
        if any(hmc_values.get(key) is not None for key in BUDGET_KEYS):
            merged.update(dict.fromkeys(BUDGET_KEYS))
        merged.update(hmc_values)
        if all(merged[key] is None for key in BUDGET_KEYS):
            merged.update(DEFAULT_BUDGET)
        self.hmc = HMCSettings(**merged)
        if self.finetune_schedule not in FINETUNE_SCHEDULES:
            raise HMCConfigError(f'Got finetune_schedule={self.finetune_schedule!r} but expected one of '
                                 f'{list(FINETUNE_SCHEDULES)}')

    def __getattr__(self, name: str) -> Any:
        if name in HMCSettings.keys() and 'hmc' in self.__dict__:
            return getattr(self.__dict__['hmc'], name)
        raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')

    @classmethod
    def run_keys(cls) -> tuple[str, ...]:
        return tuple(spec.name for spec in dataclasses.fields(cls) if spec.name != 'hmc')

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every key a ``--config`` file may set: the run's and HMC's."""
        return cls.run_keys() + HMCSettings.keys()

    def replace(self, **changes: Any) -> 'RunSettings':
        """A copy with ``changes`` (run or HMC keys; a new budget replaces the old one)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Every setting, flat (HMC's and the run's), tuples as lists."""
        run = {key: getattr(self, key) for key in self.run_keys()}
        run = {key: list(value) if isinstance(value, tuple) else value for key, value in run.items()}
        return {**run, **self.hmc.as_dict()}

    def uses_margin_rule(self, mode: str) -> bool:
        """Whether ``mode`` is planned by HMC's margin rule: ``'hmc'`` with margin ``'auto'`` or no margin given (a
        margin given as a number is that tau; ``'nahc'`` is ``'hmc'`` at tau 0.5)."""
        return mode == 'hmc' and self.margin in ('auto', None)

    def compressor_options(self, mode: str) -> dict[str, Any]:
        """``HMCCompressor`` keyword arguments of ``mode``: HMC's settings, the latency threads, no margin 'auto'."""
        options = {**self.hmc.as_dict(), 'mode': mode}
        if options['margin'] == 'auto':
            options['margin'] = None
        if options['target_latency'] is not None and options['latency_threads'] is None:
            options['latency_threads'] = self.threads
        return options
