"""The fine-tuning schedule: a cosine anneals the rate per epoch, exactly as plain SGD with the rate set by hand."""
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
    """Plain SGD (momentum 0.9, weight decay 5e-4, as the evaluator) with epoch ``e``'s rate ``rates[e]``."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=rates[0], momentum=0.9, weight_decay=5e-4)
    for rate in rates:
        for group in optimizer.param_groups:
            group['lr'] = rate
        for images, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return model


def test_cosine_anneals_the_rate_after_each_epoch(loader):
    tuned = _tuned(loader, 'cosine', 3, max_epochs=3)
    rates = [LR * 0.5 * (1 + math.cos(math.pi * epoch / 3)) for epoch in range(3)]  # LR, 0.75 LR, 0.25 LR
    expected = _by_hand(loader, rates)
    for name, tensor in tuned.state_dict().items():
        assert torch.allclose(tensor, expected.state_dict()[name], atol=1e-6), name
    constant = _tuned(loader, 'constant', 3, max_epochs=3)
    assert not torch.allclose(constant.weight, tuned.weight, atol=1e-4)


def test_epoch_one_and_a_short_probe_run_at_the_plain_rate(loader):
    one_epoch = _tuned(loader, 'constant', 1, max_epochs=1)
    after_first = {}
    model = _model()
    evaluator = make_torch_evaluator(loader, loader, model, lr=LR, schedule='cosine', epochs=5, progress=False,
                                     on_epoch_end=lambda tuned, epoch: after_first.setdefault(
                                         epoch, copy.deepcopy(tuned.state_dict())))
    finetune(model, evaluator, original=model, max_epochs=5)
    for name, tensor in one_epoch.state_dict().items():
        assert torch.equal(tensor, after_first[1][name]), name
    assert torch.equal(_tuned(loader, 'cosine', 5, max_steps=3).weight, _tuned(loader, 'constant', 5, max_steps=3).weight)


def test_a_wrong_schedule_is_refused_by_name():
    with pytest.raises(HMCConfigError, match=r"finetune_schedule='step'.*'constant', 'cosine'"):
        RunSettings(finetune_schedule='step')
    with pytest.raises(HMCConfigError, match='finetune_schedule'):
        make_torch_evaluator([], [], _model(), schedule='linear')
    with pytest.raises(HMCConfigError, match='finetune_epochs=0'):
        make_torch_evaluator([], [], _model(), schedule='cosine', epochs=0)


def test_the_schedule_is_a_flag():
    assert _settings(build_parser().parse_args(['plan', '--finetune-schedule', 'cosine'])).finetune_schedule == 'cosine'
    assert _settings(build_parser().parse_args(['plan'])).finetune_schedule == 'constant'
