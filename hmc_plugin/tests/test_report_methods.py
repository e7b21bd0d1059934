"""The main job's methods: HMC by its margin rule beside the others, each paired with prune-only per test image."""
from __future__ import annotations

import math

import pytest
import torch

from hmc_plugin.app.report import format_table, paired_difference
from hmc_plugin.app.run_settings import RunSettings


def test_paired_difference_is_the_mean_per_image_difference_with_its_interval():
    correct = torch.tensor([True, True, False, True])
    reference = torch.tensor([True, False, False, False])  # differences 0, 1, 0, 1
    paired = paired_difference(correct, reference)
    standard_error = math.sqrt(1 / 3) / 2  # sample std of (0, 1, 0, 1) over sqrt(4)
    assert paired['mean_pp'] == pytest.approx(50.0)
    assert paired['low_pp'] == pytest.approx(50.0 - 196 * standard_error)
    assert paired['high_pp'] == pytest.approx(50.0 + 196 * standard_error)
    assert paired['images'] == 4
    assert paired_difference(reference, reference)['high_pp'] == 0.0


def test_paired_difference_refuses_other_images():
    with pytest.raises(ValueError, match='same images'):
        paired_difference(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))


def test_the_table_prints_the_paired_column_with_signs():
    row = {'mode': 'hmc', 'flops_after': 1, 'flops_before': 2, 'paired_vs_prune':
           {'mean_pp': 0.25, 'low_pp': -1.0, 'high_pp': 1.5, 'images': 360}}
    table = format_table([row, {**row, 'mode': 'prune', 'paired_vs_prune': None}])
    assert '+0.2 [-1.0, +1.5]' in table.splitlines()[2]
    assert table.splitlines()[3].rstrip().endswith('-')


def test_the_main_job_runs_hmc_by_its_margin_rule_unless_a_margin_is_given():
    settings = RunSettings()
    assert settings.methods[-1] == 'hmc' and settings.uses_margin_rule('hmc')
    assert RunSettings(margin='auto').uses_margin_rule('hmc')
    assert not RunSettings(margin=0.25).uses_margin_rule('hmc')
    assert not settings.uses_margin_rule('nahc') and not settings.uses_margin_rule('prune')
