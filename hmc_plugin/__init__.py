"""hmc_plugin: HMC, hybrid model compression by layer sensitivity grouping, as an NNI compressor.

Public surface::

    from hmc_plugin import HMCCompressor, HMCSettings, CompressionPlan, SensitivityTable
    from hmc_plugin import save_compressed, load_compressed, export_onnx

Module map: the stages in pipeline order. A module imports only from its own stage, from earlier
stages and from the shared modules; ``integration_tests/test_layering.py`` fails when one reaches forward.

======================  =========================================================================
stage                   modules
======================  =========================================================================
shared                  ``errors`` (the exception family), ``settings`` (``HMCSettings``: every
                        HMC setting with its default and check, once), ``utils/`` (``counting``:
                        FLOPs and parameters; ``timing``: latency timers; ``onnx_runtime``: the ONNX Runtime
                        latency backend; ``kl``: output KL; ``memory``: the calibration passes' budget;
                        ``device``: the device setting resolved;
                        ``store``: the keyed JSON store behind every cache; ``fingerprint``)
1. engines              ``engines/lowrank`` (tensorly factors -> ``nn.Module`` replacements, data-free
                        or fitted to an input moment), ``engines/pruning`` (torch-pruning groups, masks,
                        NNI speedup), ``engines/moments`` (layer input moments on calibration data),
                        ``engines/datafit`` (refit pruned consumers, data-aware low rank, layer by
                        layer), ``engines/batchnorm`` (BatchNorm recalibration and folding); no planning
2. sensitivity          ``sensitivity/table`` (``SensitivityTable``), ``sensitivity/scan``
                        (evaluator, KL and proxy scans), ``sensitivity/fisher`` (one-pass proxy),
                        ``sensitivity/halves`` (a scan's pruning and decomposition halves merged)
3. planning             ``planning/plan`` (``CompressionPlan``), ``cost``, ``latency`` (cost and
                        latency models), ``grouping``, ``allocation`` (greedy budget allocation),
                        ``measure`` (what a plan keeps), ``targets`` (loops that land on a FLOPs,
                        parameter or latency target), ``margin`` (HMC's margin rule)
4. apply                ``apply`` (plan -> compressed model: masks, NNI ModelSpeedup, refit and
                        low rank, BatchNorm recalibration)
5. nni_api              ``nni_api/compressor`` (``HMCCompressor``), ``nni_api/config``
                        (``config_list`` schema), ``nni_api/calibration`` (calibration batches
                        read from the Evaluator's training steps), ``nni_api/finetune`` (the one
                        fine-tuning path: NNI's Evaluator, optional distillation)
6. app                  ``app/cli`` (the ``hmc`` command), ``run_settings`` (``RunSettings``),
                        ``workflow``, ``report`` (the one report-row builder), ``data``,
                        ``models``, ``training``, ``baselines``, ``export``, ``config_keys``,
                        ``distributed`` (DDP fine-tuning under ``torchrun``)
7. experiment           ``experiment/trial`` (an NNI trial), ``shared_cache``, ``results``
======================  =========================================================================

Data flows one way: scan -> plan -> apply -> fine-tune -> report; each stage takes the earlier
stage's plain-data result (``SensitivityTable``, ``CompressionPlan``).
"""
from __future__ import annotations

from ._version import __version__
from .app.export import export_onnx, load_compressed, save_compressed
from .engines.batchnorm import recalibrate_bn
from .errors import HMCConfigError, HMCError, LayerCompressionError, UntraceableModelError
from .nni_api.compressor import HMCCompressor
from .planning.plan import CompressionPlan, LayerPlan
from .sensitivity.table import SensitivityTable

__all__ = ['HMCCompressor', 'CompressionPlan', 'LayerPlan', 'SensitivityTable', 'save_compressed', 'load_compressed',
           'export_onnx', 'recalibrate_bn', 'HMCConfigError', 'HMCError', 'LayerCompressionError', 'UntraceableModelError', '__version__']
