"""The one fine-tuning path of every compressed model: NNI's ``Evaluator``, optionally with distillation."""
from __future__ import annotations

import copy

import torch
from nni.compression.utils.evaluator import Evaluator
from torch import nn

from ..errors import HMCConfigError
from ..utils.kl import kd_loss

__all__ = ['finetune']


def finetune(compressed: nn.Module, evaluator: Evaluator | None, *, original: nn.Module,
             max_steps: int | None = None, max_epochs: int | None = None, distill: bool = False,
             distill_alpha: float = 0.5, distill_temperature: float = 4.0) -> None:
    """Train ``compressed`` in place through ``evaluator.train(max_steps, max_epochs)``.

    The evaluator's optimizer is re-bound to ``compressed``: parameters whose names ``original`` (the
    model the evaluator was made for) does not have, such as low-rank factors, join its param groups
    (NNI's ``patch_optim_param_group``). With ``distill`` the loss becomes ``(1 - alpha) * loss + alpha *
    KD(teacher=original)`` (Hinton et al. 2015). An evaluator no compressor has bound yet is initialised on
    ``original``; it is unbound again afterwards.
    """
    if evaluator is None:
        raise HMCConfigError('fine-tuning (max_steps / max_epochs) needs an evaluator')
    if not evaluator._initialization_complete:  # as NNI's Compressor.__init__ does for an evaluator it is given
        evaluator._init_optimizer_helpers(original)
    known = set(dict(original.named_parameters()))
    new_params: dict[str, list[torch.Tensor]] = {}
    for name, param in compressed.named_parameters():
        if name not in known:
            new_params.setdefault(name.rsplit('.', 1)[0], []).append(param)
    evaluator.bind_model(compressed)
    try:
        if new_params:
            evaluator.patch_optim_param_group(new_params)
        hook = _patch_distillation(evaluator, compressed, original, distill_alpha,
                                   distill_temperature) if distill else None
        try:
            evaluator.train(max_steps, max_epochs)
        finally:
            if hook is not None:
                hook.remove()
    finally:
        evaluator.unbind_model()


def _patch_distillation(evaluator: Evaluator, student: nn.Module, original: nn.Module, alpha: float,
                        temperature: float):
    """Add ``alpha * KD(teacher=original)`` to the evaluator's loss; returns the hook to remove afterwards.

    The student's logits are caught by a forward hook, so the user's ``training_step`` runs unchanged;
    NNI's ``patch_loss`` adds the KD term.
    """
    teacher = copy.deepcopy(original).eval()
    last_output: dict[str, torch.Tensor] = {}
    handle = student.register_forward_hook(lambda module, inputs, output: last_output.__setitem__('logits', output))

    def patch(loss: torch.Tensor, batch) -> torch.Tensor:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        return (1 - alpha) * loss + alpha * kd_loss(last_output['logits'], teacher_logits, temperature)

    evaluator.patch_loss(patch)
    return handle
