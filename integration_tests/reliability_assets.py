"""Tiny models and helpers for the reliability catalogue (test_reliability*.py), importable by a subprocess.

Every model is a few layers on 8x8 (or shorter) inputs, so a full HMCCompressor run (evaluator scan,
plan, NNI speedup, low-rank replacement) takes well under a second.
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import nni
import torch
from nni.compression import TorchEvaluator
from torch import nn

from hmc_plugin import HMCCompressor
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.utils.fingerprint import model_fingerprint

LEVELS = [0.25, 0.5, 0.75]


# ----------------------------------------------------------------------------------------------- models

class SmallCNN(nn.Module):
    """conv-bn-relu x 3 and a Linear head: the reference tiny model (input 3x8x8)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class GroupedConvs(nn.Module):
    """A grouped conv (groups=2), a depthwise conv, a dilated conv and a strided 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.pointwise = nn.Conv2d(16, 16, 1, stride=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        for conv in (self.stem, self.grouped, self.depthwise, self.dilated, self.pointwise):
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


class WithConvTranspose(nn.Module):
    """A ConvTranspose2d upsampler between two convs (HMC skips it; the conv feeding it stays unpruned)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.up(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    """A small Conv1d front end (skipped: not Conv2d) and a Linear body that carries most of the cost (input 2x8)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Conv3dNet(nn.Module):
    """A Conv3d front end (skipped) feeding Conv2d layers (input 3x2x8x8)."""

    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(3, 4, (2, 1, 1))
        self.conv1 = nn.Conv2d(4, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv3d(x)).squeeze(2)
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    """Linear layers only (input 16 features)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Thin(nn.Module):
    """Layers with 1 and 2 channels around one wider conv (input 1x8x8)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv3 = nn.Conv2d(2, 16, 3, padding=1)
        self.conv4 = nn.Conv2d(16, 2, 1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        if x.mean() > -1:  # always true, but fx cannot know
            x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class TiedWeights(SmallCNN):
    """conv4 shares conv3's weight (tied parameters)."""

    def __init__(self):
        super().__init__()
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv4.weight = self.conv3.weight

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv4(torch.relu(self.conv3(x))))
        return self.fc(x.mean((2, 3)))


class ReusedModule(SmallCNN):
    """conv3 is called twice in a row (one module, two call sites)."""

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(torch.relu(self.conv3(x))))
        return self.fc(x.mean((2, 3)))


def build(cls: type[nn.Module], seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A seeded instance in eval mode, BN given non-trivial statistics so every channel matters."""
    torch.manual_seed(seed)
    model = cls()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def inputs_for(model: nn.Module, batch: int = 16, seed: int = 1) -> torch.Tensor:
    """A fixed batch of inputs of the shape each tiny model takes."""
    shapes = {Conv1dNet: (2, 8), Conv3dNet: (3, 2, 8, 8), MLP: (16,), Thin: (1, 8, 8)}
    shape = shapes.get(type(model), (3, 8, 8))
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------- metric

def output_metric(reference: nn.Module, inputs: torch.Tensor):
    """``eval_fn(model) -> -MSE`` of the model's outputs against ``reference``'s on ``inputs`` (0 is best).

    Deterministic and continuous, so sensitivity tables can be compared across runs and processes.
    """
    with torch.no_grad():
        target = reference.eval()(inputs).double()

    def metric(model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return -float(((model(inputs).double() - target) ** 2).mean())
        finally:
            model.train(was_training)
    return metric


def evaluator(model: nn.Module, inputs: torch.Tensor, metric=None) -> TorchEvaluator:
    """An NNI ``TorchEvaluator`` whose ``evaluate()`` is ``metric`` (default ``output_metric``); no training."""
    metric = metric or output_metric(copy.deepcopy(model), inputs)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        pass

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    return TorchEvaluator(training_func, optimizer, lambda batch, model: model(batch[0]).sum(),
                          dummy_input=inputs[:1], evaluating_func=metric)


def compressor(model: nn.Module, entry: dict, inputs: torch.Tensor | None = None, *, metric=None,
               **kwargs) -> HMCCompressor:
    """``HMCCompressor`` with an evaluator-mode scan at ``LEVELS`` (override in ``entry``)."""
    inputs = inputs_for(model) if inputs is None else inputs
    entry = {'sensitivity': 'evaluator', 'levels': LEVELS, **entry}
    return HMCCompressor(model, [entry], evaluator(model, inputs, metric), inputs[:1], progress=False, **kwargs)


def is_wrapped(model: nn.Module) -> bool:
    return any('_nni_wrapper' in name for name, _ in model.named_modules())


# ----------------------------------------------------------------------------------------------- scans

def scan_units(model: nn.Module, dummy_input: torch.Tensor):
    groups = find_pruning_groups(model, dummy_input)
    layers = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    return groups, layers


@contextlib.contextmanager
def single_thread():
    """One intra-op thread, so float results are bit-identical across processes; restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def wide_cnn() -> nn.Module:
    return SmallCNN(16)


def evaluator_scan(cache_path=None, eval_delay: float = 0.0, count: list | None = None):
    """Evaluator-mode scan of a seeded ``SmallCNN(16)``, one thread; ``eval_delay`` seconds per evaluation,
    each evaluation appended to ``count`` when given."""
    model = build(wide_cnn)
    inputs = inputs_for(model)
    metric = output_metric(copy.deepcopy(model), inputs)

    def slow_metric(module):
        time.sleep(eval_delay)
        if count is not None:
            count.append(1)
        return metric(module)

    groups, layers = scan_units(model, inputs[:1])
    with single_thread():
        return scan_sensitivity(model, inputs[:1], groups=groups, layers=layers, mode='evaluator',
                                eval_fn=slow_metric, levels=LEVELS, cache_path=cache_path, progress=False)


def compress_once(out_path: str) -> None:
    """One seeded compression (evaluator scan, AHC with CP ranks), written as plan JSON + weights fingerprint."""
    model = build(SmallCNN)
    hmc = compressor(model, {'op_types': ['Conv2d', 'Linear'], 'target_flops': 0.5, 'mode': 'ahc',
                             'rank_method': 'cp'})
    with single_thread():
        compressed, masks = hmc.compress()
    Path(out_path).write_text(json.dumps({
        'plan': hmc.plan.to_json(), 'weights': model_fingerprint(compressed),
        'masks': sorted(masks), 'prune': hmc.sensitivity.prune, 'decompose': hmc.sensitivity.decompose}))


if __name__ == '__main__':  # python reliability_assets.py scan CACHE DELAY | compress OUT
    if sys.argv[1] == 'scan':
        evaluator_scan(sys.argv[2], float(sys.argv[3]))
    else:
        compress_once(sys.argv[2])
