"""Multi-process fine-tuning under ``torchrun --nproc_per_node N``: the process group, rank 0's results broadcast,
sharded training batches and ``DistributedDataParallel`` around the model being fine-tuned.

The workflow's division of labour: rank 0 trains (or loads) the baseline, scans and plans; the baseline's weights
and the plan (plain data, ``CompressionPlan.to_dict``) are broadcast; every rank applies the plan to its own copy
and fine-tunes it with DDP on its shard of the training set (``DistributedSampler``); only rank 0 writes files.
Gloo on the CPU, NCCL on CUDA. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function is a no-op.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..utils.device import model_device
from ..utils.fingerprint import model_fingerprint

__all__ = ['launched', 'start', 'active', 'rank', 'is_main', 'world_size', 'broadcast_object', 'broadcast_module',
           'shard_loader', 'data_parallel', 'trained_samples', 'gather', 'record', 'finish']

# rank 0 trains the baseline and scans while the other ranks wait in a broadcast: far longer than a step
WAIT = datetime.timedelta(hours=12)


def launched() -> bool:
    """Started by ``torchrun`` (or any launcher setting ``WORLD_SIZE``) with more than one process."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def start(device: torch.device) -> bool:
    """Join the process group of a ``torchrun`` launch (gloo on the CPU, NCCL on CUDA); False when not launched."""
    if not launched():
        return False
    if not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=WAIT)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that scans, plans and writes files."""
    return rank() == 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (plain, picklable data) on every rank; ``value`` itself outside a launch."""
    if not active():
        return value
    holder = [value if is_main() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_module(model: nn.Module) -> nn.Module:
    """Every parameter and buffer of ``model`` set to rank 0's, in place (same architecture on every rank)."""
    if active():
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
    return model


def shard_loader(loader: DataLoader, seed: int) -> DataLoader:
    """``loader``'s data set and batch size, each rank reading its own shuffled ``1 / world_size`` of it per epoch
    (``DistributedSampler``, seeded; ``training.train`` calls its ``set_epoch``); ``loader`` outside a launch."""
    if not active():
        return loader
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers)


@contextlib.contextmanager
def data_parallel(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` wrapped in ``DistributedDataParallel`` (rank 0's weights broadcast at the start, gradients averaged
    at every step); ``model`` itself outside a launch. Afterwards the buffers (BatchNorm statistics, which each rank
    updates on its own batches) are set to rank 0's, so every rank ends with the same model."""
    if not active():
        yield model
        return
    device = model_device(model)
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    handle = model.register_forward_pre_hook(_count_samples)
    try:
        yield wrapped
    finally:
        handle.remove()
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)


_SAMPLES = {'trained': 0}  # this process's training samples under data_parallel, for the run's record


def _count_samples(module: nn.Module, args: tuple) -> None:
    if module.training and args and isinstance(args[0], torch.Tensor):
        _SAMPLES['trained'] += len(args[0])


def trained_samples() -> int:
    """Training samples this rank's model saw under ``data_parallel`` so far (its shard, every epoch)."""
    return _SAMPLES['trained']


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order (``[value]`` outside a launch)."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def record(model: nn.Module) -> dict[str, Any]:
    """What a report row says of a DDP fine-tune: world size, each rank's fingerprint of its fine-tuned ``model``
    (equal when the ranks agree bit for bit) and the training samples each rank saw."""
    return {'world_size': world_size(), 'fingerprints': gather(model_fingerprint(model)),
            'trained_samples': gather(trained_samples())}


def finish() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still sends)."""
    if active():
        dist.barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
