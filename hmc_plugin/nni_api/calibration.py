"""Calibration batches gathered through an NNI ``Evaluator``, the way NNI's data-driven pruners collect data.

NNI's Taylor and activation pruners never ask for data separately: they run a few training steps through
the Evaluator with hooks. ``gather_calibration_batches`` does the same on a twin of the model, with a
forward pre-hook registered through ``Evaluator.register_hooks``, and stops the user's ``training_func``
as soon as it has the batches it needs, whatever that function does with ``max_steps``. The user's model
and optimizer are checked and restored afterwards.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from nni.compression.utils.evaluator import Evaluator, ModuleHook
from torch import nn

from ..engines.pruning import preserved_modes

__all__ = ['gather_calibration_batches']

_logger = logging.getLogger(__name__)


class _EnoughBatches(BaseException):
    """Raised by the pre-hook once enough batches are captured: a BaseException, so that a ``training_func``
    catching ``Exception`` cannot swallow it."""


class ForwardPreHook(ModuleHook):
    """NNI ``Hook`` around ``register_forward_pre_hook``: ``hook(module, args)`` sees the module's inputs."""

    def _register(self, hook_func: Callable[[nn.Module, tuple], None]):
        return self.target.register_forward_pre_hook(hook_func)


def gather_calibration_batches(model: nn.Module, evaluator: Evaluator, steps: int) -> list:
    """The model inputs of the first ``steps`` forward passes of ``evaluator.train(max_steps=steps)``.

    The training runs on a deep copy of ``model`` (with the optimizer NNI rebuilds for it), which is
    discarded; ``model``, its BatchNorm statistics, its train/eval flags and the optimizers the evaluator was
    built with are exactly as before afterwards, also when the ``training_func`` reaches for the original
    model. Each batch is the forward's one positional input (a tensor), or the tuple of them. Fewer passes
    than ``steps`` give a warning; a ``training_func`` that never runs the model gives ``[]``.
    """
    if not evaluator._initialization_complete:  # as NNI's Compressor.__init__ does for an evaluator it is given
        user_optimizers = list(getattr(evaluator, '_tmp_optimizers', []))
        evaluator._init_optimizer_helpers(model)
    else:
        user_optimizers = []
    state = copy.deepcopy(model.state_dict())
    optimizer_states = [copy.deepcopy(optimizer.state_dict()) for optimizer in user_optimizers]
    batches: list = []
    twin = copy.deepcopy(model)

    def factory(buffer: list) -> Callable[[nn.Module, tuple], None]:
        def capture(module: nn.Module, args: tuple) -> None:
            inputs = tuple(item.detach().clone() if isinstance(item, torch.Tensor) else item for item in args)
            batches.append(inputs[0] if len(inputs) == 1 else inputs)
            if len(batches) >= steps:
                raise _EnoughBatches
        return capture

    evaluator.bind_model(twin)
    with preserved_modes(model):
        try:
            evaluator.register_hooks([ForwardPreHook(twin, '', factory)])
            evaluator.train(max_steps=steps)
        except _EnoughBatches:
            pass
        finally:
            evaluator.unbind_model()
            _restore_weights(model, state)
            for optimizer, saved in zip(user_optimizers, optimizer_states):
                optimizer.load_state_dict(saved)
    if batches and len(batches) < steps:
        _logger.warning('The Evaluator gave %d of the %d calibration batches asked for (calibration_steps); HMC '
                        'uses those', len(batches), steps)
    return batches


def _restore_weights(model: nn.Module, state: dict[str, Any]) -> None:
    """Put ``state`` back if anything changed it (a ``training_func`` that trains a global model rather than the
    one it is given)."""
    current = model.state_dict()
    if any(not torch.equal(current[key], value) for key, value in state.items()):
        _logger.warning("The Evaluator's training_func changed the model given to HMCCompressor (it trains a model "
                        'other than its `model` argument); HMC put its weights and statistics back')
        model.load_state_dict(state)
