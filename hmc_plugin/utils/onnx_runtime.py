"""Running a model in ONNX Runtime as a CPU deployment runs it: the latency backend ``'onnxruntime'``.

The model is exported in memory (TorchScript exporter, opset 17, eval mode) and loaded in an
``InferenceSession`` with every graph optimisation on (``ORT_ENABLE_ALL``: BatchNorm folded into the conv
before it, activations fused, 1x1 convs as GEMMs), ``intra_op_num_threads`` = the timing's thread count,
one inter-op thread and sequential execution, on the ``CPUExecutionProvider``.
"""
from __future__ import annotations

import io
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ..errors import HMCConfigError
from .counting import as_input_tuple

__all__ = ['LATENCY_BACKENDS', 'onnxruntime_version', 'onnx_session', 'onnx_runner', 'backend_label']

LATENCY_BACKENDS = ('torch', 'onnxruntime')


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise HMCConfigError("latency_backend='onnxruntime' needs onnxruntime: pip install 'hmc_plugin[deploy]' "
                             "(or pip install onnxruntime), or use latency_backend='torch'") from error
    return onnxruntime


def onnxruntime_version() -> str:
    return _onnxruntime().__version__


def backend_label(backend: str) -> str:
    """What a timing in ``backend`` depends on beyond the machine and torch: '' for torch, the runtime's version."""
    if backend not in LATENCY_BACKENDS:
        raise HMCConfigError(f'Got latency_backend={backend!r} but expected one of {LATENCY_BACKENDS}')
    return '' if backend == 'torch' else f'onnxruntime {onnxruntime_version()}'


def onnx_session(model: nn.Module, example_inputs: Any, threads: int):
    """An ONNX Runtime session of ``model`` (exported at ``example_inputs``' shapes), all optimisations on."""
    onnxruntime = _onnxruntime()
    inputs = as_input_tuple(example_inputs)
    names = ['input'] + [f'input_{index}' for index in range(1, len(inputs))]
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=17, input_names=names,
                              output_names=['output'])
    finally:
        model.train(was_training)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=['CPUExecutionProvider'])


def onnx_runner(model: nn.Module, example_inputs: Any, threads: int) -> Callable[[], Any]:
    """A callable running ``model`` on ``example_inputs`` in ONNX Runtime (the session is built once, here)."""
    session = onnx_session(model, example_inputs, threads)
    feeds = {node.name: tensor.detach().cpu().numpy()
             for node, tensor in zip(session.get_inputs(), as_input_tuple(example_inputs))}
    return lambda: session.run(None, feeds)
