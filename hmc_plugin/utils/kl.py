"""KL divergence of output distributions: ``kl_divergence`` (the one formula) and the model-level uses of it."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['kl_divergence', 'output_log_probs', 'per_input_kl', 'output_kl', 'kd_loss']


@torch.no_grad()
def output_log_probs(model: nn.Module, batches: Iterable) -> list[torch.Tensor]:
    """``model``'s log-softmax outputs (float64, ``(N, classes)``) per batch of ``batches``; see ``per_input_kl``."""
    was_training = model.training
    model.eval()
    try:
        return [F.log_softmax(model(_inputs(batch)).flatten(1).double(), dim=1) for batch in batches]
    finally:
        model.train(was_training)


def kl_divergence(reference_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_reference || p) of every row, float64 ``(N,)`` in nats: the package's one KL (0 for equal rows).

    Both arguments are log-probabilities ``(N, classes)`` (log-softmax outputs), of any float dtype; the sum
    runs in float64, so that small drops (a scan's) are not lost to rounding.
    """
    if reference_log_probs.shape != log_probs.shape:
        raise ValueError(f'Got reference log-probabilities of shape {tuple(reference_log_probs.shape)} but '
                         f'{tuple(log_probs.shape)}')
    return F.kl_div(log_probs.double(), reference_log_probs.double(), log_target=True, reduction='none').sum(1)


@torch.no_grad()
def per_input_kl(reference: nn.Module | Sequence[torch.Tensor], model: nn.Module, batches: Iterable) -> torch.Tensor:
    """KL(p_reference || p_model) of every input, float64 ``(N,)`` in nats (``kl_divergence`` batch by batch),
    for paired comparisons of several models on the same inputs; ``output_kl`` is its mean.

    ``batches`` yields ``(inputs, labels)`` pairs (e.g. a test loader; labels are ignored) or bare input
    tensors, in the same order every time. ``reference`` is the original model, or its
    ``output_log_probs`` on the same ``batches`` (to compare many models with one reference pass).
    Models run in eval mode; their train/eval modes are restored.
    """
    batches = list(batches)
    reference_log_probs = output_log_probs(reference, batches) if isinstance(reference, nn.Module) else reference
    log_probs = output_log_probs(model, batches)
    if len(reference_log_probs) != len(log_probs):
        raise ValueError(f'Got reference outputs for {len(reference_log_probs)} batches but {len(log_probs)} batches')
    if not log_probs:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([kl_divergence(theirs, mine) for mine, theirs in zip(log_probs, reference_log_probs)])


def output_kl(reference: nn.Module | Sequence[torch.Tensor], model: nn.Module, batches: Iterable) -> float:
    """Mean KL(p_reference || p_model) in nats per input (the mean of ``per_input_kl``, same arguments): how far
    ``model``'s output distribution (softmax of its logits) has moved from ``reference``'s; 0 for identical
    outputs, never negative."""
    kl = per_input_kl(reference, model, batches)
    return max(0.0, float(kl.mean())) if len(kl) else 0.0  # >= 0 up to rounding


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton distillation loss: KL(teacher || student) of the softened outputs, times T^2."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    log_target=True, reduction='batchmean') * temperature ** 2


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch
