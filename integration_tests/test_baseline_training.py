"""The baseline a run trains: warm-up, progress per epoch, a chance-level check, and resume after an interruption."""
from __future__ import annotations

import logging

import pytest
import torch

import hmc_plugin.app.training as training
from hmc_plugin.app.cli import _settings, build_parser
from hmc_plugin.app.data import subset_splits
from hmc_plugin.app.models import resnet20
from hmc_plugin.app.run_settings import RunSettings
from hmc_plugin.app.training import warmup_cosine
from hmc_plugin.app.workflow import train_or_load_baseline
from hmc_plugin.errors import HMCConfigError


@pytest.fixture(scope='module')
def small_digits(digits):
    return subset_splits(digits, 320, 180, seed=0)


def fresh_model():
    torch.manual_seed(0)
    return resnet20(num_classes=10)


def test_warm_up_rises_linearly_then_the_cosine_falls_to_zero():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert [factor(step) for step in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.5) and factor(99) < 0.001


def test_a_baseline_at_chance_stops_the_run_with_the_figure_and_the_remedies(small_digits, tmp_path, caplog):
    settings = RunSettings(model='resnet20', train_epochs=0)
    with pytest.raises(HMCConfigError) as info:
        train_or_load_baseline(fresh_model(), small_digits, settings, tmp_path, progress=False)
    message = str(info.value)
    assert 'trained for 0 epoch(s)' in message and 'chance (0.100 for 10 classes)' in message
    for remedy in ('--train-epochs', '--train-lr', '--checkpoint', '--allow-chance-baseline'):
        assert remedy in message
    with caplog.at_level(logging.WARNING, logger='hmc_plugin.app.workflow'):
        train_or_load_baseline(fresh_model(), small_digits, settings.replace(allow_chance_baseline=True), tmp_path,
                               progress=False)
    assert 'going on (allow_chance_baseline)' in caplog.text


def test_progress_counts_epochs_and_reports_held_out_accuracy(small_digits, tmp_path, caplog, capsys):
    settings = RunSettings(model='resnet20', train_epochs=2, allow_chance_baseline=True)
    with caplog.at_level(logging.INFO, logger='hmc_plugin.app.training'):
        train_or_load_baseline(fresh_model(), small_digits, settings, tmp_path, progress=True)
    lines = [record.getMessage() for record in caplog.records if 'train baseline epoch' in record.getMessage()]
    assert [line.split(':')[0] for line in lines] == ['train baseline epoch 1/2', 'train baseline epoch 2/2']
    assert all('loss' in line and 'held-out accuracy' in line for line in lines)
    assert 'train baseline epoch 2/2' in capsys.readouterr().err  # the progress bar's label


def test_an_interrupted_training_resumes_to_the_weights_of_an_uninterrupted_one(small_digits, tmp_path,
                                                                               monkeypatch):
    settings = RunSettings(model='resnet20', train_epochs=3, allow_chance_baseline=True)
    whole = train_or_load_baseline(fresh_model(), small_digits, settings, tmp_path / 'whole', progress=False)
    real_save, saved = training._save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(args[2])  # epochs done
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, '_save_checkpoint', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_or_load_baseline(fresh_model(), small_digits, settings, tmp_path / 'cut', progress=False)
    assert saved == [1, 2] and (tmp_path / 'cut' / 'baseline.partial.pt').exists()
    monkeypatch.setattr(training, '_save_checkpoint',
                        lambda *args, **kw: saved.append(args[2]) or real_save(*args, **kw))
    resumed = train_or_load_baseline(fresh_model(), small_digits, settings, tmp_path / 'cut', progress=False)
    assert saved == [1, 2, 3]  # only the third epoch ran again
    assert not (tmp_path / 'cut' / 'baseline.partial.pt').exists()
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_the_training_rates_and_the_chance_check_are_flags():
    args = build_parser().parse_args(['plan', '--train-lr', '0.05', '--finetune-lr', '0.01', '--warmup-epochs', '0',
                                      '--allow-chance-baseline'])
    settings = _settings(args)
    assert (settings.train_lr, settings.finetune_lr, settings.warmup_epochs) == (0.05, 0.01, 0.0)
    assert settings.allow_chance_baseline is True
    assert _settings(build_parser().parse_args(['plan'])).allow_chance_baseline is False
