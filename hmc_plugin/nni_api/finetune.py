"""The one fine-tuning path of every compressed model: NNI's ``Evaluator``, optionally with distillation."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from nni.compression.utils.evaluator import Evaluator
from torch import nn

from ..errors import HMCConfigError
from ..utils.kl import kd_loss

__all__ = ['finetune']


def finetune(compressed: nn.Module, evaluator: Evaluator | None, *, original: nn.Module,
             max_steps: int | None = None, max_epochs: int | None = None, distill: bool = False,
             distill_alpha: float = 0.5, distill_temperature: float = 4.0, mixed_precision: bool = False) -> None:
    """Train ``compressed`` in place through ``evaluator.train(max_steps, max_epochs)``.

    The evaluator's optimizer is re-bound to ``compressed``: parameters whose names ``original`` (the
    model the evaluator was made for) does not have, such as low-rank factors, join its param groups
    (NNI's ``patch_optim_param_group``). With ``distill`` the loss becomes ``(1 - alpha) * loss + alpha *
    KD(teacher=original)`` (Hinton et al. 2015). With ``mixed_precision`` the model's forward runs under
    ``torch.autocast`` in bfloat16 on its device (CPU or CUDA; bfloat16 keeps float32's range, so no gradient
    scaling is needed) and its outputs come back as float32; backward and the optimizer step run outside it and
    the weights keep their dtype. An evaluator no compressor has bound yet is initialised on
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
            with _autocast_forward(compressed, mixed_precision):
                evaluator.train(max_steps, max_epochs)
        finally:
            if hook is not None:
                hook.remove()
    finally:
        evaluator.unbind_model()


@contextlib.contextmanager
def _autocast_forward(model: nn.Module, enabled: bool) -> Iterator[None]:
    """``model.forward`` under bfloat16 autocast on the model's device while inside, float outputs as float32."""
    if not enabled:
        yield
        return
    forward = model.forward
    device_type = next(model.parameters()).device.type

    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            output = forward(*args, **kwargs)
        return output.float() if isinstance(output, torch.Tensor) and output.is_floating_point() else output

    model.forward = autocast_forward
    try:
        yield
    finally:
        del model.forward


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
