"""NNI 3.0's own pruning flow, written as its quick start writes it, with ``L1NormPruner`` swapped for
``HMCCompressor``: a user-written ``training_func`` and ``training_step``, a ``TorchEvaluator``, no calibration
argument, ``compress()``, ``unwrap_model()``, then fine-tuning through the same Evaluator."""
from __future__ import annotations

import copy
import hashlib
import logging

import nni
import pytest
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator

from hmc_plugin import HMCCompressor
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.utils.counting import count_flops


def state_hash(model):
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def optimizer_hash(optimizer):
    digest = hashlib.sha256(repr(optimizer.state_dict()['param_groups']).encode())
    for state in optimizer.state_dict()['state'].values():
        for value in state.values():
            digest.update(value.numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
    return digest.hexdigest()


class QuickStart:
    """The pieces of NNI's quick start: the user's training loop, step and evaluation over their loaders."""

    def __init__(self, loaders, max_steps_honoured=True):
        self.train_loader, self.test_loader = loaders[0], loaders[1]
        self.max_steps_honoured = max_steps_honoured
        self.forwards = 0

    def training_step(self, batch, model):
        self.forwards += 1
        data, target = batch
        return F.cross_entropy(model(data), target)

    def training_func(self, model, optimizer, training_step, lr_scheduler=None, max_steps=None, max_epochs=None):
        model.train()
        max_epochs = max_epochs if max_epochs else 1 if max_steps is None else 100
        current_steps = 0
        for _ in range(max_epochs):
            for batch in self.train_loader:
                optimizer.zero_grad()
                loss = training_step(batch, model)
                loss.backward()
                optimizer.step()
                current_steps += 1
                if self.max_steps_honoured and max_steps and current_steps == max_steps:
                    return
            if lr_scheduler:
                lr_scheduler.step()

    def evaluator(self, model, dummy_input):
        optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        return TorchEvaluator(self.training_func, optimizer, self.training_step, dummy_input=dummy_input), optimizer

    def accuracy(self, model):
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for data, target in self.test_loader:
                correct += (model(data).argmax(1) == target).sum().item()
                total += len(target)
        return correct / total


def stepped_optimizer(optimizer, model, loaders):
    """The user's optimizer after one real step of theirs, so it holds momentum buffers HMC must not touch."""
    probe = copy.deepcopy(model)
    data, target = next(iter(loaders[0]))
    F.cross_entropy(probe(data), target).backward()
    for param, probe_param in zip(model.parameters(), probe.parameters()):
        param.grad = probe_param.grad
    saved = copy.deepcopy(model.state_dict())
    optimizer.step()
    optimizer.zero_grad()
    model.load_state_dict(saved)  # the weights as before, the momentum buffers kept


def test_nni_quick_start_with_the_pruner_swapped(trained_resnet20, loaders, dummy_input, caplog):
    user = QuickStart(loaders)
    model = trained_resnet20
    evaluator, optimizer = user.evaluator(model, dummy_input)
    stepped_optimizer(optimizer, model, loaders)
    model_before, optimizer_before = state_hash(model), optimizer_hash(optimizer)
    baseline = user.accuracy(model)

    config_list = [{'op_types': ['Conv2d'], 'target_flops': 0.3}]
    pruner = HMCCompressor(model, config_list, evaluator, progress=False)     # was L1NormPruner(model, config_list)
    with caplog.at_level(logging.INFO, logger='hmc_plugin'):
        compressed, masks = pruner.compress()
    pruner.unwrap_model()                                                    # NNI's line two: a no-op here
    assert 'already compressed' in caplog.text and 'without ModelSpeedup' in caplog.text

    assert count_flops(compressed, dummy_input) / count_flops(model, dummy_input) == pytest.approx(0.3, abs=0.02)
    zero_shot = user.accuracy(compressed)
    weights_before = [param.detach().clone() for param in compressed.parameters()]
    torch.manual_seed(0)
    pruner.finetune(compressed, max_epochs=1)                                # fine-tuning through the same Evaluator
    tuned = user.accuracy(compressed)
    # The epoch trained the compressed model through the user's Evaluator; the data-aware compression already lifts
    # it far above the stepped baseline (CI once: 0.456 -> 0.819 zero-shot), so one epoch may gain no test image.
    assert any(not torch.equal(param, before) for param, before in zip(compressed.parameters(), weights_before))
    assert tuned >= zero_shot, (baseline, zero_shot, tuned)
    assert state_hash(model) == model_before and optimizer_hash(optimizer) == optimizer_before
    assert not any('_nni_wrapper' in name for name, _ in model.named_modules())
    assert masks and all(set(mask) <= {'weight', 'bias'} for mask in masks.values())


def test_evaluator_calibration_gives_the_plan_of_the_same_images_passed_explicitly(trained_resnet20, loaders,
                                                                                    dummy_input):
    """A training_func that ignores max_steps: HMC stops it after the 3 batches it needs, and the plan is the one
    the loader's same first 3 batches give through calibration_loader."""
    in_order = torch.utils.data.DataLoader(loaders[0].dataset, batch_size=64, shuffle=False)
    user = QuickStart((in_order, loaders[1]), max_steps_honoured=False)
    evaluator, _ = user.evaluator(trained_resnet20, dummy_input)
    before = state_hash(trained_resnet20)
    config_list = [{'op_types': ['Conv2d'], 'target_flops': 0.5, 'calibration_steps': 3}]
    through_evaluator = HMCCompressor(trained_resnet20, config_list, evaluator, progress=False)
    plan_a = through_evaluator.make_plan()
    assert user.forwards == 3  # stopped at the third batch, not after an epoch
    assert state_hash(trained_resnet20) == before

    explicit_batches = [batch for batch, _ in zip(in_order, range(3))]
    explicit = HMCCompressor(trained_resnet20, config_list, None, dummy_input, calibration_loader=explicit_batches,
                             progress=False)
    plan_b = explicit.make_plan()
    assert plan_a.to_dict() == plan_b.to_dict()
    for batch_a, (inputs_b, _) in zip(through_evaluator._batches, explicit_batches):
        torch.testing.assert_close(batch_a, inputs_b, rtol=0, atol=0)


def test_explicit_calibration_inputs_win_over_the_evaluator(trained_resnet20, loaders, dummy_input, calibration):
    user = QuickStart(loaders)
    evaluator, _ = user.evaluator(trained_resnet20, dummy_input)
    compressor = HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.5}], evaluator,
                               calibration_inputs=calibration[0], progress=False)
    compressor.unwrap_model()
    compressor.unwrap_model()  # twice is fine too
    assert user.forwards == 0
    assert compressor.calibration_inputs is calibration[0]


def test_a_training_func_that_never_runs_the_model_is_explained(trained_resnet20, dummy_input):
    def training_func(model, optimizer, training_step, lr_scheduler=None, max_steps=None, max_epochs=None):
        pass  # e.g. a loop over an exhausted iterator

    optimizer = nni.trace(torch.optim.SGD)(trained_resnet20.parameters(), lr=0.01)
    evaluator = TorchEvaluator(training_func, optimizer, lambda batch, model: model(batch[0]).sum(),
                               dummy_input=dummy_input)
    with pytest.raises(HMCConfigError, match='ran no forward pass.*calibration_inputs'):
        HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.5}], evaluator)
    assert not any('_nni_wrapper' in name for name, _ in trained_resnet20.named_modules())


def test_a_training_func_that_trains_a_global_model_is_undone(trained_resnet20, loaders, dummy_input, caplog):
    """A common slip: the loop closes over the user's global model instead of its ``model`` argument."""
    user = QuickStart(loaders)
    global_model = trained_resnet20
    optimizer_of_global = torch.optim.SGD(global_model.parameters(), lr=0.1)

    def training_func(model, optimizer, training_step, lr_scheduler=None, max_steps=None, max_epochs=None):
        global_model.train()
        for batch in user.train_loader:
            optimizer_of_global.zero_grad()
            training_step(batch, global_model).backward()
            optimizer_of_global.step()
            model(batch[0])

    optimizer = nni.trace(torch.optim.SGD)(global_model.parameters(), lr=0.01)
    evaluator = TorchEvaluator(training_func, optimizer, user.training_step, dummy_input=dummy_input)
    before = state_hash(global_model)
    with caplog.at_level(logging.WARNING, logger='hmc_plugin'):
        compressor = HMCCompressor(global_model, [{'op_types': ['Conv2d'], 'target_flops': 0.5,
                                                   'calibration_steps': 2}], evaluator, progress=False)
    compressor.unwrap_model()
    assert state_hash(global_model) == before and not global_model.training
    assert 'changed the model given to HMCCompressor' in caplog.text


def test_lightning_evaluator_is_refused_with_the_reason(trained_resnet20, dummy_input):
    from nni.compression.utils.evaluator import LightningEvaluator

    evaluator = LightningEvaluator.__new__(LightningEvaluator)  # its __init__ needs pytorch-lightning installed
    with pytest.raises(HMCConfigError, match="LightningEvaluator.*pytorch-lightning 2.x.*TorchEvaluator"):
        HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.5}], evaluator, dummy_input)
    assert not any('_nni_wrapper' in name for name, _ in trained_resnet20.named_modules())
