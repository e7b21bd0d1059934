"""``HMCCompressor``: HMC as a custom NNI 3.0 compressor (the ``Pruner`` side of NNI's compressor base).

This module is glue: it validates the config, binds NNI's wrappers and ``Evaluator``, and runs the
pipeline scan -> plan -> masks -> ModelSpeedup -> low-rank replacement -> fine-tuning, each stage
living in its own module.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch
from nni.compression.base.compressor import Pruner
from nni.compression.base.config import select_modules_by_config
from nni.compression.utils.evaluator import Evaluator
from torch import nn

from .apply import apply_plan, plan_for_target, plan_masks
from .config import hmc_settings, validate_config_list
from .errors import HMCConfigError
from .plan import CompressionPlan
from .lowrank import decomposable
from .pruning import find_pruning_groups
from .sensitivity import SensitivityTable, model_fingerprint, scan_sensitivity, zeroed_by_masks
from .training import kd_loss

__all__ = ['HMCCompressor']

_logger = logging.getLogger(__name__)

COMPRESSIBLE_TYPES = (nn.Conv2d, nn.Linear)


class HMCCompressor(Pruner):
    r"""Hybrid model compression by layer sensitivity grouping, as an NNI compressor.

    HMC measures each selected layer's sensitivity to structured pruning (torch-pruning groups) and to
    low-rank decomposition (Tucker-2 / SVD via tensorly), groups the layers by that difference, and
    allocates both operators under one FLOPs or parameter budget.

    Parameters
    ----------
    model
        The model to compress. **It is not modified**: ``compress()`` returns a new compressed model and
        leaves ``model`` exactly as it was (NNI's wrappers are removed again), also when anything fails.
    config_list
        NNI ``config_list``: selection keys (``op_types``, ``op_names``, ``exclude_op_names``,
        ``exclude_op_types``, ...), NNI's ``max_sparse_ratio`` (cap on the channel ratio pruned in the
        selected layers), and HMC's keys: ``mode`` ('prune', 'decompose', 'ahc', 'nahc', 'hmc'),
        ``target_flops`` or ``target_params`` (fraction to keep), ``levels``, ``importance``,
        ``rank_method``, ``margin`` (tau; 'inf' gives AHC), ``sensitivity`` ('evaluator' or 'proxy'),
        ``round_to``, ``speedup`` ('nni' or 'torch_pruning'), ``distill``, ``distill_alpha``,
        ``distill_temperature``. Unknown keys and bad values raise ``HMCConfigError`` before the model is
        touched. Selected layers that are neither Conv2d nor Linear are skipped with a warning.
    evaluator
        NNI ``Evaluator`` (e.g. ``TorchEvaluator``). Needed for ``sensitivity='evaluator'`` (its
        ``evaluate()``) and for fine-tuning (``max_steps`` / ``max_epochs`` in ``compress``).
    dummy_input
        Example input as for NNI's ``ModelSpeedup`` (batch 1 is enough): used to trace the model, build
        torch-pruning's dependency graph and count FLOPs. When omitted, ``evaluator.get_dummy_input()``
        is used; if that is None too, ``HMCConfigError`` is raised.
    calibration_inputs
        A small batch of real inputs (e.g. 64 images) for ``sensitivity='proxy'``.
    sensitivity_table, plan
        A precomputed ``SensitivityTable`` (skips the scan) or ``CompressionPlan`` (skips scan and planning).
    cache_path
        JSON file the scan writes after each unit; an interrupted scan resumes from it.

    Examples
    --------
    See README "Use with NNI" and ``recipes/``::

        compressor = HMCCompressor(model, [{'op_types': ['Conv2d'], 'target_flops': 0.5}], evaluator,
                                   dummy_input=torch.rand(1, 3, 32, 32), calibration_inputs=images[:64])
        compressed, masks = compressor.compress(max_epochs=2)
        print(compressor.plan)

    References
    ----------
    G. Yang, S. Yu, H. Yang, Z. Nie, J. Wang. "HMC: Hybrid model compression method based on layer
    sensitivity grouping." PLOS ONE 18(10): e0292517, 2023.

    Notes
    -----
    No fusion with other compressors (``from_compressor`` chains) is supported. A model pruned by an NNI
    pruner and sped up with ``ModelSpeedup`` is an ordinary model and can be given to ``HMCCompressor``.
    """

    def __init__(self, model: nn.Module, config_list: list[dict], evaluator: Evaluator | None = None,
                 dummy_input: Any = None, *, calibration_inputs: Any = None,
                 sensitivity_table: SensitivityTable | None = None, plan: CompressionPlan | None = None,
                 cache_path: str | None = None, progress: bool = True, **overrides):
        # Everything that can fail on user input happens before NNI wraps the model.
        normalised = validate_config_list(config_list)
        self.settings = hmc_settings(normalised, **overrides)
        if evaluator is not None and not isinstance(evaluator, Evaluator):
            raise HMCConfigError(f'Got evaluator of type {type(evaluator).__name__} but expected an NNI Evaluator '
                                 f'(e.g. nni.compression.TorchEvaluator)')
        if dummy_input is None and evaluator is not None:
            dummy_input = evaluator.get_dummy_input()
        if dummy_input is None:
            raise HMCConfigError('dummy_input is required (an example input, batch 1 is enough) when the evaluator '
                                 'has none: pass dummy_input=torch.rand(1, 3, H, W) or give the evaluator one')
        if self.settings['sensitivity'] == 'evaluator' and evaluator is None and sensitivity_table is None and plan is None:
            raise HMCConfigError("sensitivity='evaluator' needs an evaluator; pass one or set sensitivity='proxy'")
        if self.settings['sensitivity'] == 'proxy' and calibration_inputs is None and sensitivity_table is None and plan is None:
            raise HMCConfigError("sensitivity='proxy' needs calibration_inputs (a small batch of real inputs)")
        self.dummy_input = dummy_input
        self.calibration_inputs = calibration_inputs
        self.layers, self.max_ratios = self._select_layers(model, normalised)
        self._weights_before = model_fingerprint(model)
        self.groups = find_pruning_groups(model, dummy_input)
        self._reference = copy.deepcopy(model)  # unwrapped twin: masks and low-rank weights are computed on it
        self.sensitivity = sensitivity_table
        self.plan = plan
        self.cache_path = cache_path
        self.progress = progress
        self.masks: dict[str, dict[str, torch.Tensor]] = {}
        # NNI wraps exactly the selected Conv2d/Linear layers.
        nni_config = [{'op_names': self.layers}]
        super().__init__(model, nni_config, evaluator)

    # -- config ----------------------------------------------------------------------------------

    @staticmethod
    def _select_layers(model: nn.Module, config_list: list[dict]) -> tuple[list[str], dict[str, float]]:
        """Selected Conv2d/Linear names in model order, and the per-layer ``max_sparse_ratio`` caps."""
        selected: dict[str, float] = {}
        module_names = {name for name, _ in model.named_modules()}
        for index, entry in enumerate(config_list):
            # NNI's select_modules_by_config raises a bare KeyError on an unknown name: check first.
            missing = [name for name in entry.get('op_names') or [] if name not in module_names]
            if missing:
                raise HMCConfigError(f'config_list[{index}]: op_names {missing} match no module of the model; '
                                     f'names look like {[n for n, _ in list(model.named_modules())[1:4]]}')
            modules, _, _ = select_modules_by_config(model, entry)
            for name, module in modules.items():
                if not isinstance(module, COMPRESSIBLE_TYPES):
                    _logger.warning('Skipping %s (%s): HMC compresses Conv2d and Linear layers only',
                                    name, type(module).__name__)
                    continue
                selected.setdefault(name, entry.get('max_sparse_ratio', 1.0))
        if not selected:
            raise HMCConfigError('config_list selects no Conv2d or Linear layer; check op_types / op_names '
                                 "(e.g. {'op_types': ['Conv2d']})")
        order = [name for name, _ in model.named_modules() if name in selected]
        return order, selected

    def _validate_config(self):
        # Validation of NNI's and HMC's keys already ran in __init__ (validate_config_list).
        pass

    # -- pipeline --------------------------------------------------------------------------------

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None):
        """Scan, plan, prune (masks + speedup), decompose, fine-tune; return ``(compressed_model, masks)``.

        ``compressor.plan`` holds the ``CompressionPlan`` and ``compressor.sensitivity`` the table.
        Fine-tuning runs through the evaluator when ``max_steps`` or ``max_epochs`` is given.
        The model given to the constructor is unwrapped and left exactly as it was.
        """
        try:
            super().compress(max_steps, max_epochs)  # runs _single_compress
            return self.compressed_model, self.masks
        finally:
            if self._is_wrapped:
                self.unwrap_model()
            if model_fingerprint(self.bound_model) != self._weights_before:  # never expected; guard the promise
                raise RuntimeError('HMCCompressor changed the weights of the model it was given; please report this')

    def make_plan(self) -> CompressionPlan:
        """Scan if no table was given, then build the plan (measured within 1 % of the target); model unwrapped."""
        if self.plan is None:
            if self.sensitivity is None:
                self.sensitivity = self.scan()
            if self._is_wrapped:
                self.unwrap_model()
            self.plan = self._build_plan(self.sensitivity)
        elif self._is_wrapped:
            self.unwrap_model()
        return self.plan

    def _single_compress(self, max_steps: int | None, max_epochs: int | None):
        self.make_plan()
        compressed = copy.deepcopy(self.bound_model)
        self.masks = plan_masks(compressed, self.plan, self.dummy_input)
        compressed = apply_plan(compressed, self.plan, self.dummy_input, speedup=self.settings['speedup'],
                                masks=self.masks)
        if max_steps is not None or max_epochs is not None:
            self.finetune(compressed, max_steps, max_epochs)
        self.compressed_model = compressed

    def get_masks(self):
        return self.masks

    def scan(self) -> SensitivityTable:
        """Run (or resume from ``cache_path``) the sensitivity scan on the wrapped model; the model is unchanged."""
        if not self._is_wrapped:
            self.wrap_model()
        groups = [group for group in self.groups if all(m in self.max_ratios for m in group.members)]
        layers = [name for name in self.layers if decomposable(self.bound_model.get_submodule(name), name)]
        mode = self.settings['sensitivity']
        if mode == 'evaluator':
            self.evaluator.bind_model(self.bound_model, self._get_param_names_map())
        try:
            return scan_sensitivity(self.bound_model, self.dummy_input, groups=groups, layers=layers, mode=mode,
                                    eval_fn=self._evaluate if mode == 'evaluator' else None, calibration_inputs=self.calibration_inputs,
                                    levels=self.settings['levels'], importance=self.settings['importance'],
                                    round_to=self.settings['round_to'], rank_method=self.settings['rank_method'],
                                    cache_path=self.cache_path, progress=self.progress,
                                    mask_context=self._nni_mask_context, mask_model=self._reference,
                                    weight_owner=self._module_wrappers.__getitem__)
        finally:
            if mode == 'evaluator':
                self.evaluator.unbind_model()

    def _evaluate(self, model: nn.Module) -> float:
        result = self.evaluator.evaluate()
        metric = result[0] if isinstance(result, tuple) else result
        if metric is None:
            raise HMCConfigError('evaluator.evaluate() returned None: give the evaluator an evaluating_func that '
                                 'returns a float (higher is better) or a dict with a "default" key')
        return float(metric)

    @contextlib.contextmanager
    def _nni_mask_context(self, masks):
        """Simulate pruning through NNI's wrappers (Conv/Linear) and zeroed BN parameters (not wrapped)."""
        wrapped = {name: value for name, value in masks.items() if name in self._module_wrappers}
        others = {name: value for name, value in masks.items() if name not in self._module_wrappers}
        with zeroed_by_masks(self.bound_model, others):
            self.update_masks(wrapped)
            try:
                yield
            finally:
                self.update_masks({name: {key: torch.ones_like(mask) for key, mask in value.items()}
                                   for name, value in wrapped.items()})

    def _build_plan(self, table: SensitivityTable) -> CompressionPlan:
        plan, _ = plan_for_target(
            table, self.bound_model, self.dummy_input, self.groups, mode=self.settings['mode'],
            margin=self.settings['margin'], importance=self.settings['importance'], round_to=self.settings['round_to'],
            rank_method=self.settings['rank_method'], max_ratios=self.max_ratios,
            target_flops=self.settings['target_flops'], target_params=self.settings['target_params'])
        return plan

    def finetune(self, compressed: nn.Module, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        """Train ``compressed`` in place through the evaluator (its optimizer re-bound to the new parameters),
        distilling from the original model when ``distill`` is set."""
        if self.evaluator is None:
            raise HMCConfigError('fine-tuning (max_steps / max_epochs) needs an evaluator')
        known = set(dict(self.bound_model.named_parameters()))
        new_params: dict[str, list[torch.Tensor]] = {}
        for name, param in compressed.named_parameters():
            if name not in known:
                new_params.setdefault(name.rsplit('.', 1)[0], []).append(param)
        self.evaluator.bind_model(compressed)
        try:
            if new_params:
                self.evaluator.patch_optim_param_group(new_params)
            hook = self._patch_distillation(compressed) if self.settings['distill'] else None
            try:
                self.evaluator.train(max_steps, max_epochs)
            finally:
                if hook is not None:
                    hook.remove()
        finally:
            self.evaluator.unbind_model()

    def _patch_distillation(self, student: nn.Module):
        """Add ``alpha * KD(teacher=original model)`` to the evaluator's loss (Hinton et al. 2015).

        The student's logits are caught by a forward hook (returned, to be removed after training), so the
        user's ``training_step`` runs unchanged; NNI's ``patch_loss`` adds the KD term.
        """
        teacher = copy.deepcopy(self.bound_model).eval()
        alpha, temperature = self.settings['distill_alpha'], self.settings['distill_temperature']
        last_output: dict[str, torch.Tensor] = {}
        handle = student.register_forward_hook(lambda module, inputs, output: last_output.__setitem__('logits', output))

        def patch(loss: torch.Tensor, batch) -> torch.Tensor:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            return (1 - alpha) * loss + alpha * kd_loss(last_output['logits'], teacher_logits, temperature)

        self.evaluator.patch_loss(patch)
        return handle
