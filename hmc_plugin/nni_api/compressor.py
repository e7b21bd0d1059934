"""``HMCCompressor``: HMC as a custom NNI 3.0 compressor (the ``Pruner`` side of NNI's compressor base).

This module is glue: it validates the config, binds NNI's wrappers and ``Evaluator``, and runs the
pipeline scan -> plan -> masks -> ModelSpeedup -> low-rank replacement -> fine-tuning, each stage
living in its own module.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Sequence

import torch
from nni.compression.base.compressor import Pruner
from nni.compression.base.config import select_modules_by_config
from nni.compression.utils.evaluator import Evaluator, LightningEvaluator
from torch import nn

from ..apply import DataFit, apply_plan
from ..engines.lowrank import decomposable, method_for, resolve_ranks
from ..engines.moments import batch_inputs
from ..engines.pruning import PruningGroup, find_pruning_groups, preserved_modes, trace_model
from ..errors import HMCConfigError, HMCError, LayerCompressionError, UntraceableModelError
from ..planning.measure import plan_masks
from ..planning.plan import CompressionPlan
from ..planning.targets import plan_for_latency, plan_for_target, reachable_fraction, unreachable_message
from ..sensitivity.fisher import fisher_chunks
from ..sensitivity.halves import NEUTRAL_IMPORTANCE, NEUTRAL_RANK_METHOD, PARTS
from ..sensitivity.scan import scan_sensitivity, zeroed_by_masks
from ..sensitivity.table import SensitivityTable
from ..settings import HMCSettings, unknown_key_message
from ..utils.counting import as_input_tuple
from ..utils.device import model_device, resolve_device, to_device
from ..utils.fingerprint import model_fingerprint
from .calibration import gather_calibration_batches
from .config import settings_from_config_list, validate_config_list
from .finetune import finetune

__all__ = ['HMCCompressor']

_logger = logging.getLogger(__name__)

COMPRESSIBLE_TYPES = (nn.Conv2d, nn.Linear)


TARGET_TOLERANCE = 0.01  # plans land within 1 % of the target (planning.targets.plan_for_target)
# the keyword arguments beside HMC's settings, for the "did you mean" of an unknown one
CONSTRUCTOR_KEYWORDS = ('model', 'config_list', 'evaluator', 'dummy_input', 'calibration_inputs', 'calibration_loader',
                        'sensitivity_table',
                        'plan', 'cache_path', 'latency_cache', 'progress') + HMCSettings.keys()
FROM_COMPRESSOR_MESSAGE = (
    "HMCCompressor cannot be made with from_compressor (NNI's compressor chaining): HMC replaces layers by smaller "
    "or factorised ones, which the wrappers of another compressor cannot follow, and it never leaves the model "
    "wrapped. Compress with the other compressor first, apply its masks (NNI's ModelSpeedup), then give the sped-up "
    "model to HMCCompressor (or the reverse).")

LIGHTNING_MESSAGE = (
    "HMCCompressor does not take NNI's LightningEvaluator: NNI 3.0's LightningEvaluator.train(max_steps=...) fails on "
    "pytorch-lightning 2.x (FitLoop.max_steps has no setter), and HMC compresses the plain nn.Module inside your "
    "LightningModule, not the LightningModule. Give HMCCompressor that module with a TorchEvaluator whose "
    "training_func runs your training step (README, 'Use with NNI').")

NO_EVALUATOR_DATA_MESSAGE = (
    "The Evaluator's training_func ran no forward pass of the model given to it, so HMC could not read calibration "
    'data from it: pass calibration_inputs (e.g. 64 training images) or calibration_loader, or make training_func '
    'call model(inputs) on training batches')


class HMCCompressor(Pruner):
    r"""Hybrid model compression by layer sensitivity grouping, as an NNI compressor.

    HMC measures each selected layer's sensitivity to structured pruning (torch-pruning groups) and to
    low-rank decomposition (Tucker-2 / SVD via tensorly), groups the layers by that difference, and
    allocates both operators under one FLOPs, parameter or measured CPU-time budget.

    Parameters
    ----------
    model
        The model to compress. **It is not modified**: ``compress()`` returns a new compressed model and
        leaves ``model`` exactly as it was (NNI's wrappers are removed again), also when anything fails.
    config_list
        NNI ``config_list``: selection keys (``op_types``, ``op_names``, ``exclude_op_names``,
        ``exclude_op_types``, ...), NNI's ``max_sparse_ratio`` (cap on the channel ratio pruned in the
        selected layers), and HMC's keys, the fields of ``hmc_plugin.settings.HMCSettings`` (table:
        ``recipes/configs/README.md``): ``mode``, exactly one budget (``target_flops``, ``target_params``
        or ``target_latency``: the fraction to keep), ``levels``, ``importance``, ``rank_method``,
        ``margin``, ``decompose_weight``, ``sensitivity``, ``round_to``, ``speedup``, ``distill``, ... .
        Unknown keys and bad values raise ``HMCConfigError`` before the model is touched, and so do names
        that match no module, entries that select nothing and budgets below what compressing every
        selected layer fully can reach. Selected layers that are neither Conv2d nor Linear, or that share
        parameters with another module (tied weights), are skipped with a warning naming them; grouped and
        depthwise convs are pruned but never decomposed.
    evaluator
        NNI ``Evaluator`` (e.g. ``TorchEvaluator``). Needed for ``sensitivity='evaluator'`` (its
        ``evaluate()``) and for fine-tuning (``max_steps`` / ``max_epochs`` in ``compress``). Given no
        ``calibration_inputs`` or ``calibration_loader``, HMC reads its calibration batches from the evaluator, as
        NNI's data-driven pruners do: the model inputs of the first ``calibration_steps`` training steps of
        ``evaluator.train`` (default ``max(bn_batches, fit_batches)``), run on a copy of the model, which is
        discarded (``model``, its BatchNorm statistics and the evaluator's optimizer stay as they were).
    dummy_input
        Example input as for NNI's ``ModelSpeedup`` (batch 1 is enough): used to trace the model, build
        torch-pruning's dependency graph and count FLOPs. When omitted, ``evaluator.get_dummy_input()``
        is used; if that is None too, ``HMCConfigError`` is raised.
    calibration_inputs
        A small batch of real inputs (e.g. 64 images) for ``sensitivity='proxy'`` or ``'kl'``; without a
        ``calibration_loader`` it is also the one batch of the BatchNorm recalibration and the data-aware fit.
        Explicit calibration data always wins over the evaluator's.
    calibration_loader
        An iterable of training batches (e.g. a ``DataLoader``; ``(inputs, labels)`` pairs or inputs): its first
        ``max(bn_batches, fit_batches)`` batches are read once and re-estimate the BatchNorm statistics
        (``bn_batches``) and fit the refitted consumers and low-rank factors (``fit_batches``). Its first batch is
        the ``calibration_inputs`` when those are not given.
    sensitivity_table, plan
        A precomputed ``SensitivityTable`` (skips the scan) or ``CompressionPlan`` (skips scan and planning).
    cache_path
        JSON file the scan writes after each unit; an interrupted scan resumes from it.
    latency_cache
        JSON file of per-layer CPU times for ``target_latency`` (default ``$HMC_LATENCY_CACHE`` or
        ``~/.cache/hmc_plugin/latency.json``), shared by every plan on this machine.
    mode, target_flops, ..., distill_temperature, device, mixed_precision
        Keyword-only: any ``HMCSettings`` field, overriding the ``config_list`` (a budget given here
        replaces the config's). An unknown keyword raises ``HMCConfigError`` with a "did you mean".
        ``device`` (``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:N'``): where the scan, the fits, the BatchNorm
        recalibration and fine-tuning run. On a device other than the model's, HMC works on a copy there (inputs
        and calibration batches moved with it); ``model`` stays where it is, and the compressed model and masks
        come back on ``model``'s device. The evaluator's ``training_func`` must move batches to the device of the
        model it is given (``hmc_plugin.app.training.train`` does). A CUDA device torch cannot see is an
        ``HMCConfigError``.

    Examples
    --------
    See README "Use with NNI" and ``recipes/``::

        compressor = HMCCompressor(model, [{'op_types': ['Conv2d'], 'target_flops': 0.5}], evaluator,
                                   dummy_input=torch.rand(1, 3, 32, 32), calibration_inputs=images[:64])
        compressed, masks = compressor.compress(max_epochs=2)
        print(compressor.plan)

    Raises
    ------
    HMCConfigError
        A config key, value or argument is wrong (named in the message, with what is allowed); the model
        holds NaN/Inf; it fails on ``dummy_input``; the budget cannot be reached. Raised by the constructor,
        before the model is wrapped, or by ``compress()`` (an evaluator returning NaN, a budget that the
        sensitivity grouping cannot reach), which leaves the model exactly as it was.
    UntraceableModelError
        Pruning needs NNI's speedup and ``torch.fx`` cannot trace the model (raised by the constructor).

    References
    ----------
    G. Yang, S. Yu, H. Yang, Z. Nie, J. Wang. "HMC: Hybrid model compression method based on layer
    sensitivity grouping." PLOS ONE 18(10): e0292517, 2023.

    Notes
    -----
    No fusion with other compressors is supported: ``HMCCompressor.from_compressor`` raises
    ``HMCConfigError`` saying why. A model pruned by an NNI
    pruner and sped up with ``ModelSpeedup`` is an ordinary model and can be given to ``HMCCompressor``.
    """

    def __init__(self, model: nn.Module, config_list: list[dict], evaluator: Evaluator | None = None,
                 dummy_input: Any = None, *, calibration_inputs: Any = None, calibration_loader: Any = None,
                 sensitivity_table: SensitivityTable | None = None, plan: CompressionPlan | None = None,
                 cache_path: str | None = None, latency_cache: str | None = None, progress: bool = True,
                 mode: str | None = None, target_flops: float | None = None, target_params: float | None = None,
                 target_latency: float | None = None, latency_batch: int | None = None,
                 latency_threads: int | None = None, latency_backend: str | None = None,
                 levels: Sequence[float] | None = None,
                 importance: str | None = None, rank_method: str | None = None, margin: float | str | None = None,
                 decompose_weight: float | str | None = None, prune_spread: float | None = None,
                 sensitivity: str | None = None,
                 round_to: int | None = None, speedup: str | None = None, bn_batches: int | None = None,
                 data_aware: bool | None = None, reconstruct: bool | None = None, fit_batches: int | None = None,
                 fit_order: str | None = None, calibration_steps: int | None = None,
                 memory_budget: int | None = None, distill: bool | None = None,
                 distill_alpha: float | None = None, distill_temperature: float | None = None,
                 device: str | None = None, mixed_precision: bool | None = None, **unknown):
        arguments = dict(locals())
        # Everything that can fail on user input happens before NNI wraps the model.
        _refuse_unknown_keywords(unknown)
        normalised = validate_config_list(config_list)
        self.settings = settings_from_config_list(
            normalised, **{key: value for key, value in arguments.items() if key in HMCSettings.keys()})
        if evaluator is not None and not isinstance(evaluator, Evaluator):
            raise HMCConfigError(f'Got evaluator of type {type(evaluator).__name__} but expected an NNI Evaluator '
                                 f'(e.g. nni.compression.TorchEvaluator)')
        if isinstance(evaluator, LightningEvaluator):
            raise HMCConfigError(LIGHTNING_MESSAGE)
        if dummy_input is None and evaluator is not None:
            dummy_input = evaluator.get_dummy_input()
        self._batches = _first_batches(calibration_loader, self.settings.calibration_batches)
        if dummy_input is None:
            raise HMCConfigError('dummy_input is required (an example input, batch 1 is enough) when the evaluator '
                                 'has none: pass dummy_input=torch.rand(1, 3, H, W) or give the evaluator one')
        if self.settings.sensitivity == 'evaluator' and evaluator is None and sensitivity_table is None and plan is None:
            raise HMCConfigError("sensitivity='evaluator' needs an evaluator; pass one or set sensitivity='proxy'")
        scan_needs_data = self.settings.sensitivity in ('proxy', 'kl') and sensitivity_table is None and plan is None
        if scan_needs_data and calibration_inputs is None and not self._batches and evaluator is None:
            raise HMCConfigError(f"sensitivity={self.settings.sensitivity!r} needs calibration data: pass "
                                 'calibration_inputs (a small batch of real inputs), a calibration_loader, or an '
                                 'evaluator whose training steps HMC can read them from')
        self.device, self._home = resolve_device(self.settings.device, model=model), model_device(model)
        _check_finite(model)
        _check_runs(model, dummy_input, 'dummy_input')
        self.dummy_input = dummy_input
        self._tied = _tied_layers(model)
        self.layers, self.max_ratios = self._select_layers(model, normalised)
        self._user_model, self._weights_before = model, model_fingerprint(model)
        self.groups = find_pruning_groups(model, dummy_input)
        self._check_traceable(model, plan)
        self._warn_unhandled(model)
        if plan is None:
            self._check_reachable(model)
        self.calibration_inputs = self._calibration_data(model, evaluator, calibration_inputs, scan_needs_data)
        if scan_needs_data and self.settings.sensitivity == 'proxy' and self.calibration_inputs is not None:
            # a memory_budget too small for the scan is an error now, not after the masks and moments
            fisher_chunks(model, self.calibration_inputs, memory_budget=self.settings.memory_budget,
                          levels=len(self.settings.levels))
        model = self._on_device(model)
        self._reference = copy.deepcopy(model)  # unwrapped twin: masks and low-rank weights are computed on it
        self.sensitivity = sensitivity_table
        self.plan = plan
        self.cache_path = cache_path
        self.latency_cache = latency_cache
        self.latency_report: dict[str, float] | None = None  # predicted / measured latency of the plan
        self.progress = progress
        self.masks: dict[str, dict[str, torch.Tensor]] = {}
        # NNI wraps exactly the selected Conv2d/Linear layers.
        nni_config = [{'op_names': self.layers}]
        super().__init__(model, nni_config, evaluator)

    # -- config ----------------------------------------------------------------------------------

    def _on_device(self, model: nn.Module) -> nn.Module:
        """The model HMC works on: ``model`` itself on its own device, else a copy on ``self.device`` (the user's
        model is never moved); the inputs and calibration batches move with it."""
        if self.device == self._home:
            return model
        self.dummy_input = to_device(self.dummy_input, self.device)
        self.calibration_inputs = to_device(self.calibration_inputs, self.device)
        self._batches = [to_device(batch, self.device) for batch in self._batches]
        return copy.deepcopy(model).to(self.device)

    def _calibration_data(self, model: nn.Module, evaluator: Evaluator | None, calibration_inputs: Any,
                          scan_needs_data: bool) -> Any:
        """The scan's calibration inputs, and ``self._batches`` for the fit and the BatchNorm recalibration: the
        given ones, else the ``calibration_loader``'s, else read from the evaluator's training steps."""
        fit_uses_data = self.settings.bn_batches or self.settings.data_aware or self.settings.reconstruct
        if calibration_inputs is None and not self._batches and evaluator is not None and (scan_needs_data
                                                                                          or fit_uses_data):
            self._batches = gather_calibration_batches(model, evaluator, self.settings.calibration_batches)
            if not self._batches and scan_needs_data:
                raise HMCConfigError(NO_EVALUATOR_DATA_MESSAGE)
            _logger.info("HMCCompressor: read %d calibration batches from the evaluator's training steps",
                         len(self._batches))
        if calibration_inputs is None and self._batches:
            calibration_inputs = batch_inputs(self._batches[0])
            calibration_inputs = calibration_inputs[0] if len(calibration_inputs) == 1 else calibration_inputs
        if calibration_inputs is not None:
            _check_runs(model, calibration_inputs, 'calibration_inputs', first=2)
        if not self._batches and calibration_inputs is not None:
            self._batches = [calibration_inputs]
        if not self._batches and fit_uses_data:
            _logger.warning('No calibration_inputs, calibration_loader or evaluator training steps: the BatchNorm '
                            'recalibration, the reconstruction of pruned consumers and the data-aware low rank are off '
                            '(data-free compression); pass calibration_inputs (e.g. 64 training images) to turn them on')
        return calibration_inputs

    def _select_layers(self, model: nn.Module, config_list: list[dict]) -> tuple[list[str], dict[str, float]]:
        """Selected Conv2d/Linear names in model order, and the per-layer ``max_sparse_ratio`` caps.

        Names that match nothing and entries that select nothing are errors (a typo would otherwise
        silently compress the wrong layers); selected layers HMC cannot handle are skipped with a warning.
        """
        selected: dict[str, float] = {}
        # NNI selects by every name a module has (remove_duplicate=False); HMC keys layers by the first one
        canonical = {id(module): name for name, module in reversed(list(model.named_modules(remove_duplicate=False)))}
        all_names = {name: canonical[id(module)] for name, module in model.named_modules(remove_duplicate=False)}
        order = {name: index for index, (name, _) in enumerate(model.named_modules())}
        example = [name for name, _ in list(model.named_modules())[1:4]]
        for index, entry in enumerate(config_list):
            # NNI's select_modules_by_config raises a bare KeyError on an unknown name: check first.
            for key in ('op_names', 'exclude_op_names'):
                missing = [name for name in entry.get(key) or [] if name not in all_names]
                if missing:
                    raise HMCConfigError(f'config_list[{index}]: {key} {missing} match no module of the model; '
                                         f'names are those of model.named_modules(), e.g. {example}')
            modules, _, _ = select_modules_by_config(model, entry)
            if not modules:
                types = sorted({type(m).__name__ for m in model.modules() if isinstance(m, COMPRESSIBLE_TYPES)})
                selectors = {key: entry[key] for key in entry if 'op_' in key}
                raise HMCConfigError(f'config_list[{index}] selects no Conv2d or Linear layer: {selectors} match no '
                                     f'module of {type(model).__name__}; its compressible types are {types} and its '
                                     f'names look like {example}')
            for name in sorted({all_names[name] for name in modules}, key=order.get):
                module = modules.get(name, model.get_submodule(name))
                if not isinstance(module, COMPRESSIBLE_TYPES):
                    _logger.warning('Skipping %s (%s): HMC compresses Conv2d and Linear layers only',
                                    name, type(module).__name__)
                    continue
                if name in self._tied:
                    _logger.warning('Skipping %s (%s): it shares parameters with %s (tied weights); HMC leaves tied '
                                    'layers, and the channels feeding them, as they are', name, type(module).__name__,
                                    ', '.join(self._tied[name]))
                    continue
                selected.setdefault(name, entry.get('max_sparse_ratio', 1.0))
        if not selected:
            raise HMCConfigError('config_list selects no Conv2d or Linear layer that HMC can compress; check op_types / '
                                 "op_names (e.g. {'op_types': ['Conv2d']}) and the warnings above")
        return sorted(selected, key=order.get), selected

    def _eligible_groups(self) -> list[PruningGroup]:
        """Pruning groups HMC may prune: every member selected, no tied layer among members or consumers."""
        return [group for group in self.groups if all(member in self.max_ratios for member in group.members)
                and not any(name in self._tied for name in group.consumers)]

    def _decomposable_layers(self, model: nn.Module) -> list[str]:
        """Selected layers the configured ``rank_method`` can decompose (not grouped convs; CP needs zero padding)."""
        rank_method = self.settings.rank_method
        return [name for name in self.layers if decomposable(
            model.get_submodule(name), name, method_for(model.get_submodule(name), rank_method, name))]

    def _why_not_decomposable(self, module: nn.Module, name: str) -> str:
        """The reason, for the warning (``module`` unwrapped, with its weight)."""
        if getattr(module, 'groups', 1) != 1:
            return f'groups={module.groups}: grouped and depthwise convs are only pruned'
        try:
            resolve_ranks(module, 1, method_for(module, self.settings.rank_method, name), name)
        except LayerCompressionError as error:
            return f'{error}; it is only pruned'
        return 'not decomposable'

    def _check_traceable(self, model: nn.Module, plan: CompressionPlan | None) -> None:
        """NNI's speedup needs a ``torch.fx`` trace: fail now rather than after the scan."""
        prunes = self.settings.mode != 'decompose' if plan is None else bool(plan.prune_ratios)
        if self.settings.speedup != 'nni' or not prunes:
            return
        try:
            trace_model(model, self.dummy_input)
        except UntraceableModelError as error:
            raise UntraceableModelError(
                f"{error} Alternatively set speedup='torch_pruning' (it follows the path the dummy_input takes, so "
                f"control flow must take the same path for every input) or mode='decompose' (no pruning).") from error

    def _warn_unhandled(self, model: nn.Module) -> None:
        """One warning per selected layer that HMC will leave as it is, or compress one way only, and why."""
        mode = self.settings.mode
        prunable = {member for group in self._eligible_groups() for member in group.members}
        decomposable_layers = set(self._decomposable_layers(model))
        layers = [name for name, module in model.named_modules() if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))]
        head = layers[-1:]
        for name in self.layers:
            module = model.get_submodule(name)
            prune_ok = name in prunable or name in head  # the head's outputs are never pruned, by design
            if mode != 'decompose' and not prune_ok:
                coupled = next((group for group in self.groups if name in group.members), None)
                if coupled is None:
                    why = ('its output channels are model outputs or feed only layers torch-pruning cannot shrink '
                           '(e.g. ConvTranspose, flatten into a non-Linear)')
                else:
                    others = [m for m in coupled.members if m not in self.max_ratios] + \
                        [c for c in coupled.consumers if c in self._tied]
                    why = f'its channels are coupled with layers HMC leaves as they are: {others}'
                _logger.warning('Not pruning %s (%s): %s', name, type(module).__name__, why)
            if mode != 'prune' and name not in decomposable_layers:
                _logger.warning('Not decomposing %s (%s): %s', name, type(module).__name__,
                                self._why_not_decomposable(module, name))

    def _check_reachable(self, model: nn.Module) -> None:
        """Fail before the scan if the budget is below what compressing every selected layer fully can give."""
        metric, target = self.settings.budget
        if metric == 'latency':  # needs timings; plan_for_latency refuses an unreachable one after the scan
            return
        level = max(self.settings.levels)
        lowest = reachable_fraction(model, self.dummy_input, self._eligible_groups(), self._decomposable_layers(model),
                                    metric=metric, mode=self.settings.mode, level=level,
                                    max_ratios=self.max_ratios, round_to=self.settings.round_to,
                                    rank_method=self.settings.rank_method)
        if lowest > target + TARGET_TOLERANCE:
            raise HMCConfigError(unreachable_message(metric, target, lowest, self.settings.mode, level,
                                                     suggest_ahc=False))

    @classmethod
    def from_compressor(cls, compressor, new_config_list, *args, evaluator=None, **kwargs):
        """Not supported: raises ``HMCConfigError`` saying why and what to do instead."""
        raise HMCConfigError(FROM_COMPRESSOR_MESSAGE)

    def _validate_config(self):
        # Validation of NNI's and HMC's keys already ran in __init__ (validate_config_list).
        pass

    # -- pipeline --------------------------------------------------------------------------------

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None):
        """Scan, plan, prune (masks + speedup), decompose and, if asked, fine-tune.

        Parameters
        ----------
        max_steps, max_epochs
            Fine-tune the compressed model through the evaluator for this many steps or epochs (neither:
            no fine-tuning).

        Returns
        -------
        Tuple[nn.Module, Dict[str, Dict[str, Tensor]]]
            The compressed model (a new module: pruned layers shrunk, decomposed layers replaced; the
            model given to the constructor is unwrapped and left exactly as it was) and the pruning
            masks in NNI's format ``{module_name: {'weight': mask, 'bias': mask}}``. The masks describe
            the pruning half of the plan only (``compressor.plan`` holds the whole ``CompressionPlan``,
            ``compressor.sensitivity`` the ``SensitivityTable``): the compressed model is already sped up and
            decomposed, so it needs no ``ModelSpeedup``; running NNI's ``ModelSpeedup`` on the original model
            with these masks would give a pruned-only model. ``unwrap_model()`` afterwards is a no-op.
        """
        try:
            super().compress(max_steps, max_epochs)  # runs _single_compress
            _logger.info('HMCCompressor: the returned model is already compressed (%d pruning groups shrunk, %d layers '
                         'decomposed): use it as it is, without ModelSpeedup (the masks describe only the pruning half)',
                         len(self.plan.prune_ratios), len(self.plan.ranks))
            return self.compressed_model, self.masks
        finally:
            if self._is_wrapped:
                self.unwrap_model()
            watched = {id(model): model for model in (self.bound_model, self._user_model)}.values()
            if any(model_fingerprint(model) != self._weights_before for model in watched):  # never expected
                raise RuntimeError('HMCCompressor changed the weights of the model it was given; please report this')

    def unwrap_model(self) -> None:
        """NNI's ``unwrap_model``; a no-op when the model is not wrapped (``compress()`` already unwrapped it)."""
        if self._is_wrapped:
            super().unwrap_model()

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
        compressed = apply_plan(compressed, self.plan, self.dummy_input, speedup=self.settings.speedup,
                                masks=self.masks, data=self.data_fit(), memory_budget=self.settings.memory_budget)
        _check_compressed_runs(compressed, self.dummy_input)
        if max_steps is not None or max_epochs is not None:
            self.finetune(compressed, max_steps, max_epochs)
        self.compressed_model = compressed.to(self._home)  # the device the user's model is on
        self.masks = to_device(self.masks, self._home)

    def data_fit(self) -> DataFit | None:
        """How the calibration data is used (``engines.datafit.DataFit``): None when there is none."""
        return DataFit.from_settings(self._batches, self.settings)

    def get_masks(self):
        return self.masks

    def scan(self, part: str = 'both') -> SensitivityTable:
        """Run (or resume from ``cache_path``) the sensitivity scan on the wrapped model; the model is unchanged.

        ``part``: ``'both'``, or one half (``sensitivity.halves``): ``'prune'`` (the groups, scanned with any
        ``rank_method`` alike) or ``'decompose'`` (the layers, with any ``importance`` alike).
        """
        if part not in PARTS:
            raise HMCConfigError(f'Got part={part!r} but expected one of {PARTS}')
        if not self._is_wrapped:
            self.wrap_model()
        groups = self._eligible_groups() if part != 'decompose' else []
        layers = self._decomposable_layers(self.bound_model) if part != 'prune' else []
        importance = self.settings.importance if part != 'decompose' else NEUTRAL_IMPORTANCE
        rank_method = self.settings.rank_method if part != 'prune' else NEUTRAL_RANK_METHOD
        mode = self.settings.sensitivity
        if mode == 'evaluator':
            self.evaluator.bind_model(self.bound_model, self._get_param_names_map())
        try:
            return scan_sensitivity(self.bound_model, self.dummy_input, groups=groups, layers=layers, mode=mode,
                                    eval_fn=self._evaluate if mode == 'evaluator' else None, calibration_inputs=self.calibration_inputs,
                                    levels=self.settings.levels, importance=importance,
                                    round_to=self.settings.round_to, rank_method=rank_method,
                                    cache_path=self.cache_path, progress=self.progress,
                                    mask_context=self._nni_mask_context, mask_model=self._reference,
                                    weight_owner=self._module_wrappers.__getitem__, data=self.data_fit(),
                                    memory_budget=self.settings.memory_budget)
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
        common = dict(mode=self.settings.mode, margin=self.settings.margin,
                      decompose_weight=self.settings.decompose_weight, importance=self.settings.importance,
                      round_to=self.settings.round_to, rank_method=self.settings.rank_method,
                      max_ratios=self.max_ratios, prune_spread=self.settings.prune_spread)
        metric, target = self.settings.budget
        if metric == 'latency':
            plan, self.latency_report = plan_for_latency(
                table, self.bound_model, self.dummy_input, self.groups, target_latency=target,
                batch=self.settings.latency_batch, threads=self.settings.latency_threads,
                latency_cache=self.latency_cache, backend=self.settings.latency_backend, **common)
            return plan
        plan, _ = plan_for_target(table, self.bound_model, self.dummy_input, self.groups,
                                  **{f'target_{metric}': target}, **common)
        return plan

    def finetune(self, compressed: nn.Module, max_steps: int | None = None, max_epochs: int | None = None) -> None:
        """Train ``compressed`` in place through the evaluator (``nni_api.finetune``) on ``device``, distilling from
        the original model when ``distill`` is set, under bfloat16 autocast with ``mixed_precision``; it is back on
        its own device afterwards."""
        where = model_device(compressed)
        compressed.to(self.device)
        try:
            finetune(compressed, self.evaluator, original=self.bound_model, max_steps=max_steps, max_epochs=max_epochs,
                     distill=self.settings.distill, distill_alpha=self.settings.distill_alpha,
                     distill_temperature=self.settings.distill_temperature,
                     mixed_precision=self.settings.mixed_precision)
        finally:
            compressed.to(where)


def _refuse_unknown_keywords(unknown: dict[str, Any]) -> None:
    """``HMCConfigError`` for a keyword ``HMCCompressor`` does not take, with a "did you mean" suggestion."""
    if 'existed_wrappers' in unknown:
        raise HMCConfigError(FROM_COMPRESSOR_MESSAGE)
    if unknown:
        key = next(iter(unknown))
        raise HMCConfigError(unknown_key_message(key, CONSTRUCTOR_KEYWORDS, 'HMCCompressor', 'keyword argument'))


def _first_batches(loader: Any, count: int) -> list:
    """The first ``count`` batches of ``loader`` (read once; none for None or ``count == 0``)."""
    if loader is None or count == 0:
        return []
    if isinstance(loader, torch.Tensor):
        raise HMCConfigError('calibration_loader must be an iterable of batches (e.g. a DataLoader); pass one tensor '
                             'batch as calibration_inputs instead')
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    if not batches:
        raise HMCConfigError('calibration_loader yielded no batch; give a loader over (a few) training images')
    return batches


def _tied_layers(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> the other modules it shares a parameter with (tied weights), for every such module."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    tied: dict[str, list[str]] = {}
    for names in owners.values():
        for name in names:
            tied.setdefault(name, [])
            tied[name] += [other for other in names if other != name and other not in tied[name]]
    return {name: others for name, others in tied.items() if others}


def _check_finite(model: nn.Module) -> None:
    """``HMCConfigError`` naming the parameters and buffers that hold NaN or Inf."""
    bad = [f'{name} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()})'
           for name, tensor in (*model.named_parameters(), *model.named_buffers())
           if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all()]
    if bad:
        more = f' and {len(bad) - 5} more' if len(bad) > 5 else ''
        raise HMCConfigError(f'Got a model with NaN or Inf values in {", ".join(bad[:5])}{more}; HMC measures how '
                             f'compression changes the outputs and cannot work from non-finite weights: load finite '
                             f'weights (e.g. the last good checkpoint) first')


def _check_runs(model: nn.Module, inputs: Any, what: str, first: int | None = None) -> None:
    """Run ``model`` once on ``inputs`` (their ``first`` samples) in eval mode; ``HMCConfigError`` if it fails."""
    bad = [index for index, item in enumerate(as_input_tuple(inputs)) if isinstance(item, torch.Tensor)
           and item.is_floating_point() and not torch.isfinite(item).all()]
    if bad:
        raise HMCConfigError(f'Got {what} with NaN or Inf values (input {bad[0]}); pass finite inputs')
    sample = tuple(item[:first] if first and isinstance(item, torch.Tensor) and item.dim() > 0 else item
                   for item in as_input_tuple(inputs))
    param = next(model.parameters(), None)
    expected = f'dtype {param.dtype} and device {param.device}, like the model\'s parameters' if param is not None else ''
    try:
        with torch.no_grad(), preserved_modes(model):
            model.eval()
            model(*sample)
    except Exception as error:
        raise HMCConfigError(f'The model fails on {what}: {type(error).__name__}: {error}. Pass {what} the model '
                             f'accepts ({expected}; shapes as in training)') from error


def _check_compressed_runs(compressed: nn.Module, dummy_input: Any) -> None:
    """The compressed model must run where the original did; ``HMCError`` (a bug or an unsupported layer) if not."""
    try:
        with torch.no_grad(), preserved_modes(compressed):
            compressed.eval()
            compressed(*as_input_tuple(dummy_input))
    except Exception as error:
        raise HMCError(f'The compressed model fails on dummy_input ({type(error).__name__}: {error}); the model you '
                       f'gave is unchanged. Exclude the layers around the failure (exclude_op_names) or try '
                       f"speedup='torch_pruning', and please report it with the model's definition") from error
