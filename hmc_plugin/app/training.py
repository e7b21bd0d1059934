"""Small training and evaluation loops, and a ready NNI ``TorchEvaluator`` built from them.

HMC never owns a training loop in the NNI path (it trains through the user's ``Evaluator``); these
loops serve the demo, the recipes and the tests, and show the shape an NNI user would write.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import nni
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from torch import nn
from tqdm.auto import tqdm

__all__ = ['evaluate_accuracy', 'training_step', 'train', 'make_torch_evaluator']

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


def training_step(batch, model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Cross-entropy loss of one ``(images, labels)`` batch: NNI's ``training_step`` shape."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


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
