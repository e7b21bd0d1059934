"""Small training and evaluation loops, and a ready NNI ``TorchEvaluator`` built from them.

HMC never owns a training loop in the NNI path (it trains through the user's ``Evaluator``); these
loops serve the demo, the recipes and the tests, and show the shape an NNI user would write.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import nni
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from torch import nn
from tqdm.auto import tqdm

__all__ = ['evaluate_accuracy', 'output_log_probs', 'output_kl', 'per_input_kl', 'training_step', 'kd_loss', 'train', 'make_torch_evaluator']

_logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy in [0, 1] over ``loader`` of ``(images, labels)``; restores train/eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    return correct / max(1, total)


@torch.no_grad()
def output_log_probs(model: nn.Module, batches: Iterable) -> list[torch.Tensor]:
    """``model``'s log-softmax outputs (float64, ``(N, classes)``) per batch of ``batches``; see ``output_kl``."""
    was_training = model.training
    model.eval()
    try:
        return [F.log_softmax(model(_inputs(batch)).flatten(1).double(), dim=1) for batch in batches]
    finally:
        model.train(was_training)


@torch.no_grad()
def output_kl(reference: nn.Module | Sequence[torch.Tensor], model: nn.Module, batches: Iterable) -> float:
    """Mean KL(p_reference || p_model) in nats per input: how far ``model``'s output distribution (softmax of
    its logits) has moved from ``reference``'s; 0 for identical outputs.

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
    total = sum(float(F.kl_div(mine, theirs, log_target=True, reduction='sum'))
                for mine, theirs in zip(log_probs, reference_log_probs))
    return max(0.0, total) / max(1, sum(len(mine) for mine in log_probs))  # >= 0 up to rounding


@torch.no_grad()
def per_input_kl(reference: nn.Module | Sequence[torch.Tensor], model: nn.Module, batches: Iterable) -> torch.Tensor:
    """KL(p_reference || p_model) of every input, float64 ``(N,)`` in nats: ``output_kl`` before the mean, for
    paired comparisons of several models on the same inputs."""
    batches = list(batches)
    reference_log_probs = output_log_probs(reference, batches) if isinstance(reference, nn.Module) else reference
    log_probs = output_log_probs(model, batches)
    if len(reference_log_probs) != len(log_probs):
        raise ValueError(f'Got reference outputs for {len(reference_log_probs)} batches but {len(log_probs)} batches')
    return torch.cat([F.kl_div(mine, theirs, log_target=True, reduction='none').sum(1)
                      for mine, theirs in zip(log_probs, reference_log_probs)])


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def training_step(batch, model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Cross-entropy loss of one ``(images, labels)`` batch: NNI's ``training_step`` shape."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton distillation loss: KL(teacher || student) of the softened outputs, times T^2."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    log_target=True, reduction='batchmean') * temperature ** 2


def train(model: nn.Module, optimizer: torch.optim.Optimizer, step_fn: Callable, loader: Iterable,
          lr_scheduler=None, max_steps: int | None = None, max_epochs: int | None = None,
          progress: bool = True, description: str = 'train',
          on_epoch_end: Callable[[nn.Module, int], None] | None = None) -> None:
    """Run ``step_fn(batch, model) -> loss`` with ``optimizer`` for ``max_epochs`` epochs or ``max_steps`` steps.

    NNI's ``training_func`` signature minus the loader; one epoch when both limits are None.
    ``on_epoch_end(model, epoch)`` (epoch counted from 1) runs after every complete epoch.
    """
    epochs = max_epochs if max_epochs is not None else (1 if max_steps is None else 10 ** 9)
    steps = 0
    model.train()
    for epoch in range(epochs):
        with tqdm(loader, desc=f'{description} epoch {epoch + 1}', disable=not progress, leave=False) as bar:
            for batch in bar:
                optimizer.zero_grad()
                loss = step_fn(batch, model)
                loss.backward()
                optimizer.step()
                steps += 1
                bar.set_postfix(loss=f'{loss.item():.3f}')
                if max_steps is not None and steps >= max_steps:
                    return
        if lr_scheduler is not None:
            lr_scheduler.step()
        if on_epoch_end is not None:
            on_epoch_end(model, epoch + 1)


def make_torch_evaluator(train_loader: Iterable, test_loader: Iterable, model: nn.Module, *, lr: float = 0.01,
                         momentum: float = 0.9, weight_decay: float = 5e-4, dummy_input=None,
                         progress: bool = True,
                         on_epoch_end: Callable[[nn.Module, int], None] | None = None) -> TorchEvaluator:
    """An NNI ``TorchEvaluator``: SGD (``nni.trace``d), cross-entropy steps on ``train_loader``,
    accuracy on ``test_loader`` as the metric; ``on_epoch_end(model, epoch)`` runs after each training epoch."""

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        train(model, optimizers, training_step, train_loader, lr_schedulers, max_steps, max_epochs,
              progress=progress, description='fine-tune', on_epoch_end=on_epoch_end)

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return TorchEvaluator(training_func, optimizer, training_step, dummy_input=dummy_input,
                          evaluating_func=lambda model: evaluate_accuracy(model, test_loader))
