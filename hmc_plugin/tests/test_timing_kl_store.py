"""The shared homes: one timer (utils.timing), one KL (utils.kl), one keyed JSON store (utils.store)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hmc_plugin.planning.latency import LatencyCache
from hmc_plugin.sensitivity.scan import proxy_metric
from hmc_plugin.utils.jsonio import write_json
from hmc_plugin.utils.kl import kl_divergence, output_kl, output_log_probs, per_input_kl
from hmc_plugin.utils.store import FORMAT, JsonStore
from hmc_plugin.utils.timing import measure_latency, measure_latency_side_by_side


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, inputs):
        self.calls += 1
        return self.linear(inputs)


def test_the_timer_runs_warmup_then_repeats_and_restores_the_mode():
    model = CountingNet().train()
    assert measure_latency(model, torch.zeros(1, 4), warmup=2, repeats=5, num_threads=1) > 0
    assert model.calls == 7 and model.training


def test_the_timer_repeats_until_min_seconds_within_max_repeats():
    model = CountingNet()
    measure_latency(model, torch.zeros(1, 4), warmup=1, repeats=3, num_threads=1, min_seconds=60.0, max_repeats=9)
    assert model.calls == 1 + 9  # a minute is never reached: capped at max_repeats


def test_side_by_side_interleaves_every_model_the_same_number_of_times():
    models = [CountingNet() for _ in range(3)]
    times = measure_latency_side_by_side(models, torch.zeros(2, 4), warmup=1, repeats=4, num_threads=1)
    assert len(times) == 3 and all(ms > 0 for ms in times) and [m.calls for m in models] == [5, 5, 5]


def test_output_kl_is_the_mean_of_the_per_input_kl_in_float64():
    torch.manual_seed(0)
    reference, other = nn.Linear(4, 5), nn.Linear(4, 5)
    batches = [torch.randn(6, 4), torch.randn(3, 4)]
    kl = per_input_kl(reference, other, batches)
    assert kl.dtype == torch.float64 and kl.shape == (9,) and bool((kl > 0).all())
    assert output_kl(reference, other, batches) == pytest.approx(float(kl.mean()), rel=1e-12)
    assert output_kl(reference, reference, batches) == 0.0


def test_the_kl_scan_metric_is_the_same_kl_as_output_kl():
    torch.manual_seed(0)
    reference, other = nn.Linear(4, 5), nn.Linear(4, 5)
    inputs = torch.randn(8, 4)
    log_probs = output_log_probs(reference, [inputs])[0]
    assert proxy_metric(other, (inputs,), log_probs) == pytest.approx(output_kl(reference, other, [inputs]), rel=1e-12)
    float32_reference = torch.log_softmax(reference(inputs).detach(), dim=1)
    assert proxy_metric(reference, (inputs,), float32_reference) == 0.0  # unchanged: exactly 0


def test_kl_divergence_refuses_outputs_of_different_shapes():
    with pytest.raises(ValueError, match='shape'):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


def test_store_keeps_every_writers_entries_and_reads_another_layout_as_empty(tmp_path):
    path = tmp_path / 'store.json'
    first, second = JsonStore(path), JsonStore(path)
    assert first.get_or_compute({'cell': 1}, lambda: {'acc': 0.5}) == {'acc': 0.5}
    assert second.get_or_compute({'cell': 2}, lambda: {'acc': 0.7}) == {'acc': 0.7}
    again = JsonStore(path)
    assert again.get_or_compute({'cell': 1}, lambda: pytest.fail('computed again')) == {'acc': 0.5}
    assert len(again) == 2 and json.loads(path.read_text())['format'] == FORMAT
    write_json({'ms': {'old layout': 1.0}}, path)
    assert len(LatencyCache(path)) == 0


def test_latency_cache_reads_back_what_it_measured(tmp_path):
    cache = LatencyCache(tmp_path / 'latency.json', save_every=1)
    assert cache.get('conv 16->16', lambda: 2.5) == 2.5 and cache.measured == 1
    again = LatencyCache(tmp_path / 'latency.json')
    assert 'conv 16->16' in again and again['conv 16->16'] == 2.5
    assert again.get('conv 16->16', lambda: pytest.fail('measured again')) == 2.5 and again.measured == 0
    with pytest.raises(KeyError):
        again['never timed']
