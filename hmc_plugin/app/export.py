"""Save, load and export compressed models.

The architecture of a compressed model differs from the original's (pruned channels, low-rank
containers), so a bare ``state_dict`` is not enough: ``save_compressed`` stores the whole module
together with its ``CompressionPlan``, and ``load_compressed`` gives both back in a fresh process.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..engines.batchnorm import fold_batchnorm
from ..errors import HMCConfigError, UntraceableModelError
from ..planning.plan import CompressionPlan
from ..utils.counting import as_input_tuple
from ..utils.device import model_device, to_device

__all__ = ['save_compressed', 'load_compressed', 'export_onnx', 'check_onnx']

_logger = logging.getLogger(__name__)

FORMAT = 'hmc_plugin.compressed/1'


def save_compressed(model: nn.Module, path: str | os.PathLike, plan: CompressionPlan | None = None) -> None:
    """Write ``model`` (module and weights) and ``plan`` to ``path`` (a ``torch.save`` file).

    The module's classes must be importable where it is loaded (true for hmc_plugin's, torchvision's
    and any model defined in an installed package).
    """
    torch.save({'format': FORMAT, 'hmc_plugin_version': __version__, 'model': model,
                'plan': plan.to_dict() if plan is not None else None}, path)


def load_compressed(path: str | os.PathLike, map_location: Any = 'cpu') -> tuple[nn.Module, CompressionPlan | None]:
    """Load what ``save_compressed`` wrote: ``(model, plan)``. Only load files you trust (it unpickles)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(checkpoint, dict) or checkpoint.get('format') != FORMAT:
        raise HMCConfigError(f'{os.fspath(path)} is not a file written by hmc_plugin.save_compressed '
                             f'(expected format {FORMAT!r})')
    plan = CompressionPlan.from_dict(checkpoint['plan']) if checkpoint['plan'] is not None else None
    return checkpoint['model'], plan


def export_onnx(model: nn.Module, dummy_input: Any, path: str | os.PathLike, opset_version: int = 17,
                fold_bn: bool = True) -> None:
    """Export to ONNX with a dynamic batch axis (TorchScript exporter: needs no extra package).

    Input names are ``input``, ``input_1``, ...; the output is ``output``. The model is exported in eval mode;
    with ``fold_bn`` (default) every BatchNorm after a conv or linear is folded into it first
    (``engines.batchnorm.fold_batchnorm``; a model ``torch.fx`` cannot trace is exported unfolded, with a
    warning). ``model`` itself is not changed.
    """
    inputs = to_device(as_input_tuple(dummy_input), model_device(model))
    names = ['input'] + [f'input_{i}' for i in range(1, len(inputs))]
    if fold_bn:
        try:
            model = fold_batchnorm(model)
        except UntraceableModelError as error:
            _logger.warning('%s', error)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            torch.onnx.export(model, inputs, os.fspath(path), dynamo=False, opset_version=opset_version,
                              input_names=names, output_names=['output'],
                              dynamic_axes={**{name: {0: 'batch'} for name in names}, 'output': {0: 'batch'}})
    finally:
        model.train(was_training)


def check_onnx(model: nn.Module, path: str | os.PathLike, inputs: torch.Tensor, threads: int | None = None) -> float:
    """Largest absolute difference between ``model(inputs)`` and ONNX Runtime's run of ``path`` (all graph
    optimisations on, as a deployment runs it); ``HMCConfigError`` when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError as error:
        raise HMCConfigError('Checking an ONNX export needs onnxruntime: pip install onnxruntime') from error
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(os.fspath(path), options, providers=['CPUExecutionProvider'])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(to_device(inputs, model_device(model))).cpu()
    finally:
        model.train(was_training)
    got = session.run(None, {'input': inputs.cpu().numpy()})[0]
    return float((torch.from_numpy(got) - expected).abs().max())
