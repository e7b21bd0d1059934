"""Small training and evaluation loops, and a ready NNI ``TorchEvaluator`` built from them.

HMC never owns a training loop in the NNI path (it trains through the user's ``Evaluator``); these
loops serve the demo, the recipes and the tests, and show the shape an NNI user would write.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import nni
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from torch import nn
from tqdm.auto import tqdm

from ..errors import HMCConfigError
from ..settings import FINETUNE_SCHEDULES
from ..utils.device import model_device, to_device
from ..utils.memory import mib, saved_activation_bytes, training_budget_bytes
from . import distributed

__all__ = ['evaluate_accuracy', 'correct_per_image', 'training_step', 'train', 'micro_batch_size', 'warmup_cosine',
           'train_baseline', 'make_torch_evaluator']

_logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy in [0, 1] over ``loader`` of ``(images, labels)``, on the model's device; restores
    train/eval mode (``correct_per_image``, counted)."""
    hits = correct_per_image(model, loader)
    return int(hits.sum()) / max(1, len(hits))


@torch.no_grad()
def correct_per_image(model: nn.Module, loader: Iterable) -> torch.Tensor:
    """Whether each image of ``loader`` (in its order) is classified right: a bool tensor (N,) on the CPU, computed on
    the model's device; restores the mode."""
    was_training = model.training
    device = model_device(model)
    model.eval()
    hits = []
    try:
        for images, labels in loader:
            images, labels = to_device((images, labels), device)
            hits.append((model(images).argmax(1) == labels).cpu())
    finally:
        model.train(was_training)
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def training_step(batch, model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Cross-entropy loss of one ``(images, labels)`` batch: NNI's ``training_step`` shape."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, step_fn: Callable, loader: Iterable,
          lr_scheduler=None, max_steps: int | None = None, max_epochs: int | None = None,
          progress: bool = True, description: str = 'train',
          on_epoch_end: Callable[[nn.Module, int], None] | None = None, scheduler_per_step: bool = False,
          activation_budget: int | None = None) -> None:
    """Run ``step_fn(batch, model) -> loss`` with ``optimizer`` for ``max_epochs`` epochs or ``max_steps`` steps.

    NNI's ``training_func`` signature minus the loader; one epoch when both limits are None. Batches move to the
    model's device. ``lr_scheduler`` steps after every epoch, or after every batch with ``scheduler_per_step``.
    ``on_epoch_end(model, epoch)`` (epoch counted from 1) runs after every complete epoch. A loader with a
    ``DistributedSampler`` gets ``set_epoch(epoch)`` before each epoch (its shuffle changes per epoch).

    ``activation_budget`` (bytes): where a batch's saved activations would take more, each batch is split into
    micro-batches that fit and their gradients accumulated (weighted by their share of the batch) before one
    optimizer step (``micro_batch_size``, measured on the first batch): the same step as the whole batch's,
    except that BatchNorm normalises each micro-batch.
    """
    epochs = max_epochs if max_epochs is not None else (1 if max_steps is None else 10 ** 9)
    steps = 0
    device = model_device(model)
    model.train()
    micro = None  # images per micro-batch, sized on the first batch; None: whole batches
    for epoch in range(epochs):
        if hasattr(getattr(loader, 'sampler', None), 'set_epoch'):
            loader.sampler.set_epoch(epoch)
        with tqdm(loader, desc=f'{description} epoch {epoch + 1}', disable=not progress, leave=False) as bar:
            for batch in bar:
                batch = to_device(batch, device)
                if activation_budget is not None and steps == 0:
                    micro = micro_batch_size(model, batch, activation_budget)
                optimizer.zero_grad()
                if micro is None or _batch_length(batch) <= micro:
                    loss = step_fn(batch, model)
                    loss.backward()
                else:
                    loss = _accumulated_step(model, step_fn, batch, micro)
                optimizer.step()
                if scheduler_per_step and lr_scheduler is not None:
                    lr_scheduler.step()
                steps += 1
                bar.set_postfix(loss=f'{loss.item():.3f}')
                if max_steps is not None and steps >= max_steps:
                    return
        if lr_scheduler is not None and not scheduler_per_step:
            lr_scheduler.step()
        if on_epoch_end is not None:
            on_epoch_end(model, epoch + 1)


def _batch_length(batch) -> int | None:
    """Images in ``batch`` (a tensor, or a tuple/list of tensors sharing their first dim); None for other shapes."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch) if isinstance(batch, (tuple, list)) else []
    if not tensors or not all(isinstance(item, torch.Tensor) and item.dim() > 0 for item in tensors):
        return None
    lengths = {len(item) for item in tensors}
    return lengths.pop() if len(lengths) == 1 else None


def _split(batch, start: int, stop: int):
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    return type(batch)(item[start:stop] for item in batch)


def micro_batch_size(model: nn.Module, batch, activation_budget: int) -> int | None:
    """Images per micro-batch whose saved activations fit ``activation_budget`` bytes, measured on the model's
    forward pass of two images of ``batch`` (its inputs: the batch, or its first tensor;
    ``utils.memory.saved_activation_bytes``; not through the training step, whose side effects, such as a
    distillation term, belong to training); None when the whole batch fits or it cannot be split. Logs the split, and
    warns when one image alone takes more than the budget."""
    length = _batch_length(batch)
    if length is None or length < 2:
        return None
    inputs = _split(batch, 0, 2)
    inputs = inputs if isinstance(inputs, torch.Tensor) else inputs[0]
    measured = getattr(model, 'module', model)  # past a DDP wrapper: a forward without its backward leaves no trace
    per_image = saved_activation_bytes(measured, lambda: measured(inputs)) / 2
    fitting = int(activation_budget // max(per_image, 1))
    if fitting >= length:
        return None
    if fitting < 1:
        _logger.warning('One training image saves about %d MiB of activations for its backward pass, more than the '
                        '%d MiB memory budget: training one image at a time, which may still exceed it (raise '
                        'memory_budget, or lower the input size)', mib(per_image), mib(activation_budget))
    micro = max(1, fitting)
    _logger.info('Training batches of %d images in micro-batches of %d (about %d MiB of saved activations per image, '
                 'memory budget %d MiB; memory_budget sets it): gradients are accumulated into one step, BatchNorm '
                 'normalises each micro-batch', length, micro, mib(per_image), mib(activation_budget))
    return micro


def _accumulated_step(model: nn.Module, step_fn: Callable, batch, micro: int) -> torch.Tensor:
    """The batch's mean loss, its gradient accumulated over micro-batches of ``micro`` images (each loss weighted by
    its share of the batch); a DDP model reduces its gradients once, on the last micro-batch."""
    length = _batch_length(batch)
    total = torch.zeros(())
    for start in range(0, length, micro):
        stop = min(start + micro, length)
        last = stop == length
        syncing = model.no_sync() if hasattr(model, 'no_sync') and not last else contextlib.nullcontext()
        with syncing:
            loss = step_fn(_split(batch, start, stop), model) * ((stop - start) / length)
            loss.backward()
        total = total + loss.detach().cpu()
    return total


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor of step ``s`` (from 0): linear from ``1 / warmup_steps`` to 1 over ``warmup_steps``,
    then a cosine from 1 to 0 over the rest (``torch.optim.lr_scheduler.LambdaLR``'s ``lr_lambda``)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return factor


def train_baseline(model: nn.Module, train_loader, test_loader: Iterable, *, epochs: int, lr: float,
                   warmup_epochs: float = 1.0, checkpoint: str | os.PathLike | None = None, key: str = '',
                   progress: bool = True) -> nn.Module:
    """Train ``model`` in place: SGD (momentum 0.9, Nesterov, weight decay 5e-4) at ``lr``, per-step linear warm-up
    over ``warmup_epochs`` (at most a fifth of the training), then a cosine to 0.

    Progress reads ``train baseline epoch k/N`` with the running loss; each epoch ends with a log line of its mean
    loss and the accuracy on ``test_loader``. With ``checkpoint``, the model, optimizer, schedule and random
    states are saved there after every epoch under ``key``: a rerun with the same key resumes after the last
    finished epoch and ends with the same weights as an uninterrupted run (the loader must shuffle with its own
    ``generator``, as ``make_loaders``'). The checkpoint is removed when training ends.
    """
    steps_per_epoch = len(train_loader)
    total = epochs * steps_per_epoch
    warmup = min(round(warmup_epochs * steps_per_epoch), total // 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))
    start = _resume(checkpoint, key, model, optimizer, scheduler, train_loader)
    for epoch in range(start, epochs):
        model.train()
        losses = []
        with tqdm(train_loader, desc=f'train baseline epoch {epoch + 1}/{epochs}', disable=not progress,
                  leave=False) as bar:
            for images, labels in bar:
                images, labels = to_device((images, labels), model_device(model))
                optimizer.zero_grad()
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f'{sum(losses) / len(losses):.3f}')
        _logger.info('train baseline epoch %d/%d: loss %.4f, held-out accuracy %.4f', epoch + 1, epochs,
                     sum(losses) / max(1, len(losses)), evaluate_accuracy(model, test_loader))
        if checkpoint is not None:
            _save_checkpoint(checkpoint, key, epoch + 1, model, optimizer, scheduler, train_loader)
    if checkpoint is not None and Path(checkpoint).exists():
        Path(checkpoint).unlink()
    return model.eval()


def _save_checkpoint(path, key: str, epochs_done: int, model, optimizer, scheduler, train_loader) -> None:
    state = {'key': key, 'epochs_done': epochs_done, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
             'scheduler': scheduler.state_dict(), 'torch_rng': torch.get_rng_state(),
             'loader_rng': train_loader.generator.get_state() if train_loader.generator is not None else None}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f'{path.name}.{os.getpid()}.tmp')
    torch.save(state, temporary)
    os.replace(temporary, path)


def _resume(path, key: str, model, optimizer, scheduler, train_loader) -> int:
    """Epochs already done by a checkpoint of ``key`` at ``path`` (its states loaded), else 0."""
    if path is None or not Path(path).exists():
        return 0
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # a damaged checkpoint only costs training again
        _logger.warning('Baseline checkpoint %s cannot be read (%s); training from the start', path, error)
        return 0
    if state.get('key') != key:
        return 0
    model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    scheduler.load_state_dict(state['scheduler'])
    torch.set_rng_state(state['torch_rng'])
    if state['loader_rng'] is not None and train_loader.generator is not None:
        train_loader.generator.set_state(state['loader_rng'])
    _logger.info('Resuming the baseline training from %s after epoch %d', path, state['epochs_done'])
    return int(state['epochs_done'])


def make_torch_evaluator(train_loader: Iterable, test_loader: Iterable, model: nn.Module, *, lr: float = 0.01,
                         momentum: float = 0.9, weight_decay: float = 5e-4, dummy_input=None,
                         progress: bool = True, schedule: str = 'constant', epochs: int | None = None,
                         on_epoch_end: Callable[[nn.Module, int], None] | None = None,
                         data_parallel: bool = False, memory_budget: int | None = None) -> TorchEvaluator:
    """An NNI ``TorchEvaluator``: SGD (``nni.trace``d), cross-entropy steps on ``train_loader``,
    accuracy on ``test_loader`` as the metric; ``on_epoch_end(model, epoch)`` runs after each training epoch.

    ``schedule='cosine'`` anneals the rate from ``lr`` to 0 over the run's ``epochs * len(train_loader)`` steps
    (``CosineAnnealingLR``, stepped after each batch, as timm and most recipes do): a 1-epoch run ends at rate 0
    as a 5-epoch run does, so each length is its own run; ``'constant'`` keeps ``lr``. ``data_parallel``: under
    ``torchrun``, every rank trains the model wrapped in ``DistributedDataParallel``
    (``app.distributed.data_parallel``; give each rank its shard, ``distributed.shard_loader``).
    ``memory_budget`` (MiB; None: a quarter of the memory available): a batch whose saved activations would take
    more is trained in micro-batches with their gradients accumulated (``train``'s ``activation_budget``).
    """
    if schedule not in FINETUNE_SCHEDULES:
        raise HMCConfigError(f'Got finetune_schedule={schedule!r} but expected one of {list(FINETUNE_SCHEDULES)}')
    if schedule == 'cosine' and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise HMCConfigError(f"finetune_schedule='cosine' needs the number of fine-tuning epochs (an int >= 1), "
                             f'got finetune_epochs={epochs!r}')
    if schedule == 'cosine' and not hasattr(train_loader, '__len__'):
        raise HMCConfigError("finetune_schedule='cosine' needs a training loader with a length (its steps per "
                             "epoch): pass a DataLoader or a list of batches, or use finetune_schedule='constant'")

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        epoch_end = None if on_epoch_end is None else (lambda trained, epoch: on_epoch_end(model, epoch))
        with (distributed.data_parallel(model) if data_parallel else contextlib.nullcontext(model)) as trained:
            train(trained, optimizers, training_step, train_loader, lr_schedulers, max_steps, max_epochs,
                  progress=progress, description='fine-tune', on_epoch_end=epoch_end,
                  scheduler_per_step=schedule == 'cosine',
                  activation_budget=training_budget_bytes(memory_budget, model_device(model)))

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = nni.trace(torch.optim.lr_scheduler.CosineAnnealingLR)(optimizer, T_max=epochs * len(train_loader)) \
        if schedule == 'cosine' else None
    return TorchEvaluator(training_func, optimizer, training_step, lr_schedulers=scheduler, dummy_input=dummy_input,
                          evaluating_func=lambda model: evaluate_accuracy(model, test_loader))
