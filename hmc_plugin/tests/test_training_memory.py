"""Training under a memory budget: batches split into micro-batches whose gradients add up to the batch's step."""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from hmc_plugin.app.training import make_torch_evaluator, micro_batch_size, train, training_step
from hmc_plugin.nni_api.finetune import finetune
from hmc_plugin.utils.memory import saved_activation_bytes


def _batches(count: int = 3, size: int = 8, pixels: int = 8):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count * size, 3, pixels, pixels, generator=generator)
    labels = torch.randint(0, 4, (count * size,), generator=generator)
    return [(images[start:start + size], labels[start:start + size]) for start in range(0, count * size, size)]


def _model(batchnorm: bool, dropout: bool = True, pixels: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6) if batchnorm else nn.Identity(), nn.ReLU(),
                         nn.Dropout(0.2) if dropout else nn.Identity(), nn.Flatten(), nn.Linear(6 * pixels ** 2, 4))


def _trained(model: nn.Module, batches, budget: int | None) -> nn.Module:
    torch.manual_seed(1)  # dropout's masks
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, training_step, batches, max_epochs=2, progress=False, activation_budget=budget)
    return model


def _per_image(model: nn.Module, batches) -> float:
    return saved_activation_bytes(model, lambda: model(batches[0][0][:2])) / 2


def test_micro_batches_take_the_whole_batch_step_without_batchnorm():
    batches = _batches()
    model = _model(batchnorm=False, dropout=False)  # each image's loss independent of the others
    per_image = _per_image(model, batches)
    assert per_image > 6 * 8 * 8 * 4  # at least the conv's output, per image
    whole = _trained(copy.deepcopy(model), batches, budget=None)
    split = _trained(copy.deepcopy(model), batches, budget=int(3 * per_image))  # micro-batches of 3, 3, 2
    assert micro_batch_size(model, batches[0], int(3 * per_image)) == 3
    for name, tensor in whole.state_dict().items():
        assert torch.allclose(tensor, split.state_dict()[name], atol=1e-6), name


def test_a_budget_the_batch_fits_leaves_training_bit_identical():
    # the measurement forks the random state (dropout) and puts BatchNorm's running statistics back
    batches = _batches()
    model = _model(batchnorm=True)
    plain = _trained(copy.deepcopy(model), batches, budget=None)
    measured = _trained(copy.deepcopy(model), batches, budget=10 ** 12)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, measured.state_dict()[name]), name


def test_the_evaluator_splits_by_memory_budget_and_says_so(caplog):
    batches = _batches(count=1, pixels=64)  # about 0.5 MiB of saved activations per 64x64 image: 8 take > 1 MiB
    model = _model(batchnorm=True, pixels=64)
    per_image = _per_image(model, batches)
    expected = int((1 << 20) // per_image)
    assert 1 <= expected < 8
    with caplog.at_level(logging.INFO, logger='hmc_plugin.app.training'):
        evaluator = make_torch_evaluator(batches, batches, model, progress=False, memory_budget=1)
        tuned = copy.deepcopy(model)
        finetune(tuned, evaluator, original=model, max_epochs=1)
    message = next(record.getMessage() for record in caplog.records if 'micro-batches' in record.getMessage())
    assert f'batches of 8 images in micro-batches of {expected}' in message and 'memory_budget' in message
    assert not torch.equal(tuned[0].weight, model[0].weight)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='hmc_plugin.app.training'):
        assert micro_batch_size(model, batches[0], 1024) == 1
    assert any('more than the' in record.getMessage() and 'raise memory_budget' in record.getMessage()
               for record in caplog.records)


def test_the_measurement_is_not_seen_by_forward_hooks():
    # a hook that counts training images (as app.distributed's sample counter) counts only the training steps
    batches = _batches()
    model = _model(batchnorm=True)
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    _trained(model, batches, budget=10 ** 12)
    handle.remove()
    assert sum(seen) == 2 * 3 * 8 and model._forward_pre_hooks == {}
