"""The fine-tuning schedule: a cosine anneals the rate per step to 0, exactly as plain SGD with the rate set by hand."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from hmc_plugin.app.cli import _settings, build_parser
from hmc_plugin.app.run_settings import RunSettings
from hmc_plugin.app.training import make_torch_evaluator
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.nni_api.finetune import finetune

LR = 0.1


@pytest.fixture
def loader():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(32, 4, generator=generator)
    labels = (images[:, 0] > 0).long()
    return [(images[start:start + 8], labels[start:start + 8]) for start in range(0, 32, 8)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def _tuned(loader, schedule: str, epochs: int, *, max_epochs: int | None = None, max_steps: int | None = None):
    model = _model()
    evaluator = make_torch_evaluator(loader, loader, model, lr=LR, schedule=schedule, epochs=epochs, progress=False)
    finetune(model, evaluator, original=model, max_epochs=max_epochs, max_steps=max_steps)
    return model


def _by_hand(loader, rates: list[float]) -> nn.Module:
    """Plain SGD (momentum 0.9, weight decay 5e-4, as the evaluator) with step ``s``'s rate ``rates[s]``, over the
    loader's batches in order, as many epochs as ``rates`` has steps."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=rates[0], momentum=0.9, weight_decay=5e-4)
    batches = [batch for _ in range(len(rates) // len(loader)) for batch in loader]
    for rate, (images, labels) in zip(rates, batches):
        for group in optimizer.param_groups:
            group['lr'] = rate
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model


def _cosine(steps: int) -> list[float]:
    return [LR * 0.5 * (1 + math.cos(math.pi * step / steps)) for step in range(steps)]


def test_cosine_anneals_the_rate_after_each_step_to_zero_at_the_end_of_the_run(loader):
    tuned = _tuned(loader, 'cosine', 3, max_epochs=3)
    expected = _by_hand(loader, _cosine(3 * len(loader)))  # 12 steps: LR, 0.98 LR, ..., 0.017 LR
    for name, tensor in tuned.state_dict().items():
        assert torch.allclose(tensor, expected.state_dict()[name], atol=1e-6), name
    constant = _tuned(loader, 'constant', 3, max_epochs=3)
    assert not torch.allclose(constant.weight, tuned.weight, atol=1e-4)


def _first_epoch_of(loader, schedule: str, epochs: int) -> dict[str, torch.Tensor]:
    """The state after epoch 1 of a fine-tune of ``epochs`` epochs under ``schedule``."""
    states = {}
    model = _model()
    evaluator = make_torch_evaluator(loader, loader, model, lr=LR, schedule=schedule, epochs=epochs, progress=False,
                                     on_epoch_end=lambda tuned, epoch: states.setdefault(
                                         epoch, copy.deepcopy(tuned.state_dict())))
    finetune(model, evaluator, original=model, max_epochs=epochs)
    return states[1]


def test_a_one_epoch_cosine_run_is_its_own_run_not_the_first_epoch_of_a_longer_one(loader):
    one_epoch = _tuned(loader, 'cosine', 1, max_epochs=1)
    expected = _by_hand(loader, _cosine(len(loader)))
    assert torch.allclose(one_epoch.weight, expected.weight, atol=1e-6)
    assert not torch.allclose(_first_epoch_of(loader, 'cosine', 5)['weight'], one_epoch.weight, atol=1e-4)
    # at the constant rate the first epoch of a longer run is the 1-epoch run, bit for bit
    assert torch.equal(_first_epoch_of(loader, 'constant', 5)['weight'],
                       _tuned(loader, 'constant', 1, max_epochs=1).weight)


def test_a_wrong_schedule_is_refused_by_name():
    with pytest.raises(HMCConfigError, match=r"finetune_schedule='step'.*'constant', 'cosine'"):
        RunSettings(finetune_schedule='step')
    with pytest.raises(HMCConfigError, match='finetune_schedule'):
        make_torch_evaluator([], [], _model(), schedule='linear')
    with pytest.raises(HMCConfigError, match='finetune_epochs=0'):
        make_torch_evaluator([], [], _model(), schedule='cosine', epochs=0)
    with pytest.raises(HMCConfigError, match="loader with a length.*finetune_schedule='constant'"):
        make_torch_evaluator(iter([]), [], _model(), schedule='cosine', epochs=2)


def test_the_schedule_is_a_flag():
    assert _settings(build_parser().parse_args(['plan', '--finetune-schedule', 'cosine'])).finetune_schedule == 'cosine'
    assert _settings(build_parser().parse_args(['plan'])).finetune_schedule == 'constant'
