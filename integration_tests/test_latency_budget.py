"""Latency budgets (target_latency): the latency model's cache, its reported error, and what the allocation refuses.

Times are measured for real but never asserted: the tests pin what the user relies on (the cache is
reused, the error is computed from a real measurement, a slower decomposition is never chosen).
Targets are mild (0.85): these models are tiny and overhead-bound, so even every layer pruned at the top
level keeps about 0.7 of the time on some machines, and a reachable target keeps the tests off that floor.
"""
import copy
import json
import subprocess
import sys

import pytest
import torch

from hmc_plugin import HMCCompressor
from hmc_plugin.app.models import build_model
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.planning.allocation import build_plan
from hmc_plugin.planning.cost import CostModel
from hmc_plugin.planning.latency import LatencyModel
from hmc_plugin.planning.plan import UnreachableTargetError
from hmc_plugin.planning.targets import plan_for_latency
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.utils.fingerprint import model_fingerprint

LEVELS = [0.4, 0.8]
BATCH = 4


@pytest.fixture(scope='module')
def scanned():
    torch.manual_seed(0)
    model = build_model('resnet20', 10, 3).eval()
    dummy = torch.zeros(1, 3, 16, 16)
    groups = find_pruning_groups(model, dummy)
    layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    table = scan_sensitivity(model, dummy, groups=groups, layers=layers, mode='proxy', levels=LEVELS,
                             calibration_inputs=torch.randn(16, 3, 16, 16), progress=False)
    return model, dummy, groups, table


def test_second_plan_on_the_same_machine_measures_nothing_new(scanned, tmp_path):
    model, dummy, groups, table = scanned
    cache_path = tmp_path / 'latency.json'
    cost = CostModel(model, dummy, groups)
    first = LatencyModel(model, dummy, cost, LEVELS, batch=BATCH, threads=1, cache=cache_path)
    build_plan(table, cost, mode='ahc', target_latency=0.85, latency=first)
    first.cache.save()
    assert first.cache.measured > 0 and cache_path.exists()

    second = LatencyModel(model, dummy, CostModel(model, dummy, groups), LEVELS, batch=BATCH, threads=1,
                          cache=cache_path)
    plan = build_plan(table, second.cost, mode='ahc', target_latency=0.85, latency=second)
    assert second.cache.measured == 0
    assert plan.predicted['latency'] <= 0.85 + 1e-9
    # another batch size is another measurement: cached times are only reused for the same setting
    other = LatencyModel(model, dummy, second.cost, LEVELS, batch=BATCH + 1, threads=1, cache=cache_path)
    assert other.cache.measured > 0


def test_plan_for_latency_reports_predicted_and_measured_time(scanned, tmp_path):
    model, dummy, groups, table = scanned
    before = model_fingerprint(model)
    plan, report = plan_for_latency(table, model, dummy, groups, target_latency=0.85, batch=BATCH, threads=1,
                                    mode='prune', latency_cache=tmp_path / 'latency.json', max_rounds=2)
    assert model_fingerprint(model) == before
    assert report['original_ms'] > 0 and report['measured_ms'] > 0
    assert report['measured'] == pytest.approx(report['measured_ms'] / report['original_ms'])
    assert report['prediction_error'] == pytest.approx(report['predicted'] / report['measured'] - 1)
    assert plan.target == {'latency': 0.85}
    assert plan.measured['latency'] == report['measured']
    assert 0 < plan.measured['flops'] < 1 and plan.prune_ratios and not plan.ranks


def test_a_timing_within_tolerance_is_confirmed_before_the_plan_is_accepted(scanned, tmp_path, monkeypatch):
    # Scripted side-by-side timings (original ms, compressed ms): the first lands, its second timing does not
    # (mean 0.90 of the time for a target of 0.85), so the planner corrects once more and accepts on two timings.
    import hmc_plugin.planning.latency

    model, dummy, groups, table = scanned
    timings = iter([(10.0, 8.5), (10.0, 9.5), (10.0, 8.4), (10.0, 8.6)])
    calls = []
    monkeypatch.setattr(hmc_plugin.planning.latency, 'measure_latency_side_by_side',
                        lambda models, *args, **kwargs: calls.append(len(models)) or next(timings))
    plan, report = plan_for_latency(table, model, dummy, groups, target_latency=0.85, batch=BATCH, threads=1,
                                    mode='prune', latency_cache=tmp_path / 'latency.json')
    assert calls == [2, 2, 2, 2]
    assert report['measured'] == pytest.approx(0.85) and report['original_ms'] == pytest.approx(10.0)
    assert plan.measured['latency'] == report['measured']


def test_a_plan_that_met_the_budget_is_kept_over_a_later_round_that_misses_it(scanned, tmp_path, monkeypatch):
    # Scripted timings: the first plan is faster than asked (0.70 for 0.85), so the planner relaxes its internal
    # target to 1.0 and the next plan prunes nothing (0.96 on a noisy machine, closer to 0.85). The plan that
    # met the budget is returned, not the uncompressed one (CI failure of 2026-12-07).
    import hmc_plugin.planning.latency

    model, dummy, groups, table = scanned
    timings = iter([(10.0, 7.0), (10.0, 9.6)])
    monkeypatch.setattr(hmc_plugin.planning.latency, 'measure_latency_side_by_side',
                        lambda models, *args, **kwargs: next(timings))
    plan, report = plan_for_latency(table, model, dummy, groups, target_latency=0.85, batch=BATCH, threads=1,
                                    mode='prune', latency_cache=tmp_path / 'latency.json', max_rounds=2)
    assert report['measured'] == pytest.approx(0.70)
    assert plan.prune_ratios and plan.measured['flops'] < 1


def test_the_same_budget_planned_again_times_nothing_and_gives_the_same_plan(scanned, tmp_path, monkeypatch):
    # The whole-model timings that correct a plan are cached by compressed architecture, so a second plan on the
    # same machine takes the same corrections: HMC's prune-only candidate (tau inf, decompose_weight inf) is
    # prune-only's plan, not a re-timed variant of it.
    import hmc_plugin.planning.latency

    model, dummy, groups, table = scanned
    kwargs = dict(target_latency=0.85, batch=BATCH, threads=1, latency_cache=tmp_path / 'latency.json', max_rounds=3)
    first, first_report = plan_for_latency(table, model, dummy, groups, mode='prune', **kwargs)
    timed = []
    real = hmc_plugin.planning.latency.measure_latency_side_by_side
    monkeypatch.setattr(hmc_plugin.planning.latency, 'measure_latency_side_by_side',
                        lambda *args, **kw: timed.append(1) or real(*args, **kw))
    again, again_report = plan_for_latency(table, model, dummy, groups, mode='prune', **kwargs)
    hybrid_fallback, _ = plan_for_latency(table, model, dummy, groups, mode='hmc', margin=float('inf'),
                                          decompose_weight=float('inf'), **kwargs)
    assert timed == [] and again_report['new_measurements'] == 0
    assert again.prune_ratios == first.prune_ratios and again.measured == first.measured
    assert again_report['measured'] == first_report['measured']
    assert hybrid_fallback.prune_ratios == first.prune_ratios and not hybrid_fallback.ranks


class _SlowDecompositions(LatencyModel):
    """Decompositions of the layers in ``slow`` take 3x their dense time, the others half."""

    slow: set = set()

    def _decomposed_ms(self, name, in_channels, out_channels, level):
        factor = 3.0 if name in self.slow else 0.5
        return factor * self._dense_ms(name, in_channels, out_channels)


def test_a_decomposition_slower_than_its_layer_is_never_chosen(scanned, tmp_path):
    model, dummy, groups, table = scanned
    cost = CostModel(model, dummy, groups)
    convs = [name for name in cost.layers if name in table.decompose]
    _SlowDecompositions.slow = set(convs[::2])
    latency = _SlowDecompositions(model, dummy, cost, LEVELS, batch=BATCH, threads=1, cache=tmp_path / 'l.json')
    for mode in ('decompose', 'ahc', 'nahc'):
        try:
            plan = build_plan(table, cost, mode=mode, target_latency=0.8, latency=latency)
        except UnreachableTargetError as error:
            plan = error.plan
        decomposed = set(plan.ranks)
        assert decomposed, mode
        assert not decomposed & _SlowDecompositions.slow, mode
    # the same table under a FLOPs budget does decompose those layers: the latency budget is what refuses them
    flops_plan = build_plan(table, cost, mode='decompose', target_flops=0.5)
    assert set(flops_plan.ranks) & _SlowDecompositions.slow


def test_target_latency_through_hmc_compressor(scanned, tmp_path):
    model, dummy, groups, table = scanned
    original = copy.deepcopy(model)
    compressor = HMCCompressor(model, [{'op_types': ['Conv2d'], 'mode': 'prune', 'target_latency': 0.85,
                                        'latency_batch': BATCH, 'latency_threads': 1, 'levels': LEVELS}],
                               dummy_input=dummy, sensitivity_table=table, latency_cache=str(tmp_path / 'lat.json'),
                               progress=False)
    compressed, masks = compressor.compress()
    report = compressor.latency_report
    assert report['batch'] == BATCH and report['threads'] == 1
    assert compressor.plan.target == {'latency': 0.85} and masks
    assert sum(p.numel() for p in compressed.parameters()) < sum(p.numel() for p in original.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


@pytest.mark.parametrize('entry, message', [
    ({'target_latency': 0.5, 'target_flops': 0.5}, "'target_flops' and 'target_latency'"),
    ({'target_latency': 1.5}, 'target_latency=1.5'),
    ({'target_latency': 0.5, 'latency_batch': 0}, 'latency_batch=0'),
    ({'target_latency': 0.5, 'latency_threads': 'all'}, "latency_threads='all'"),
    ({'target_latncy': 0.5}, "did you mean 'target_latency'"),
])
def test_latency_config_errors_name_the_key(scanned, entry, message):
    model, dummy, _, _ = scanned
    with pytest.raises(HMCConfigError, match=message):
        HMCCompressor(model, [{'op_types': ['Conv2d'], **entry}], dummy_input=dummy,
                      calibration_inputs=torch.randn(4, 3, 16, 16))


def test_cli_compress_with_a_latency_budget_reports_predicted_and_measured_time(tmp_path, capsys, monkeypatch):
    import json

    from hmc_plugin.app.cli import main

    monkeypatch.setenv('HMC_LATENCY_CACHE', str(tmp_path / 'latency.json'))
    out = ['--model', 'resnet20', '--data', 'digits', '--out', str(tmp_path), '--train-epochs', '1', '--quiet',
           '--threads', '1']
    assert main(['compress', '--mode', 'prune', '--target-latency', '0.85', '--latency-batch', '8',
                 '--finetune-epochs', '1', *out]) == 0
    printed = capsys.readouterr().out
    assert 'CPU time at batch 8, 1 threads' in printed and 'predicted by the latency model' in printed
    row = json.loads((tmp_path / 'report.json').read_text())['methods'][-1]
    assert row['target_latency'] == 0.85 and row['target_flops'] is None
    assert row['latency_budget']['batch'] == 8 and row['latency_budget']['measured'] > 0
    assert (tmp_path / 'latency.json').exists()
    assert 'target_latency=0.85 at batch 8' in (tmp_path / 'report.md').read_text()


def test_a_cache_made_under_other_load_is_reported(scanned, tmp_path, caplog):
    import json

    model, dummy, groups, _ = scanned
    cache_path = tmp_path / 'latency.json'
    cost = CostModel(model, dummy, groups)
    LatencyModel(model, dummy, cost, LEVELS, batch=BATCH, threads=1, cache=cache_path)
    data = json.loads(cache_path.read_text())
    for entry in data['entries'].values():  # the store keeps what each time was measured for beside it
        entry['value'] *= 10 if '|model ' in entry['key'] else 1
    cache_path.write_text(json.dumps(data))
    with caplog.at_level('WARNING', logger='hmc_plugin.planning.latency'):
        LatencyModel(model, dummy, cost, LEVELS, batch=BATCH, threads=1, cache=cache_path)
    assert 'Delete the cache to re-measure' in caplog.text and str(cache_path) in caplog.text


def test_an_interrupted_plan_keeps_the_layer_times_it_measured(tmp_path):
    import json

    from hmc_plugin.planning.latency import LatencyCache

    cache = LatencyCache(tmp_path / 'latency.json', save_every=3)
    calls = []

    def interrupt_after_four():
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return 1.0

    with pytest.raises(KeyboardInterrupt):
        for index in range(10):
            cache.get(f'shape {index}', interrupt_after_four)
    saved = json.loads((tmp_path / 'latency.json').read_text())['entries']
    # the first save_every measurements survived
    assert sorted(entry['key'] for entry in saved.values()) == ['shape 0', 'shape 1', 'shape 2']
    again = LatencyCache(tmp_path / 'latency.json')
    assert again.get('shape 1', lambda: pytest.fail('measured again')) == 1.0 and again.measured == 0


_RSS_AFTER_FREEING = '''
import sys, torch
from hmc_plugin.utils.timing import steady_allocator
if sys.argv[1] == 'steady':
    assert steady_allocator()
buffer = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, as a large activation
del buffer
print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmRSS')))
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_steady_allocator_keeps_freed_buffers_for_reuse():
    # Default glibc unmaps a freed 64 MiB buffer (the next forward faults its pages in again); with
    # steady_allocator the process keeps it for the next allocation.
    rss_kib = {mode: int(subprocess.run([sys.executable, '-c', _RSS_AFTER_FREEING, mode], capture_output=True, text=True,
                                        check=True).stdout) for mode in ('default', 'steady')}
    assert rss_kib['steady'] - rss_kib['default'] > 48 * 1024


def test_cli_margin_auto_picks_tau_and_weight_by_probe_fine_tunes(tmp_path, capsys, monkeypatch):
    # `hmc compress --mode hmc --margin auto`: choose_margin over tau 0, 0.5, inf x decompose_weight 1, 10, inf with
    # probe fine-tunes; the row records every candidate, the chosen one's latency report, and the plan applied.
    import json
    import math

    from hmc_plugin.app.cli import main
    from hmc_plugin.app.workflow import AUTO_DECOMPOSE_WEIGHTS, AUTO_MARGINS
    from hmc_plugin.planning.plan import CompressionPlan

    monkeypatch.setenv('HMC_LATENCY_CACHE', str(tmp_path / 'latency.json'))
    out = ['--model', 'resnet20', '--data', 'digits', '--out', str(tmp_path), '--train-epochs', '1', '--quiet',
           '--threads', '1']
    assert main(['compress', '--mode', 'hmc', '--margin', 'auto', '--probe-steps', '2', '--target-latency', '0.85',
                 '--latency-batch', '8', '--finetune-epochs', '1', *out]) == 0
    printed = capsys.readouterr().out
    assert 'HMC margin rule (2 probe steps' in printed and 'CPU time at batch 8, 1 threads' in printed
    row = json.loads((tmp_path / 'report.json').read_text())['methods'][-1]
    rule = row['margin_rule']
    encode = lambda value: 'inf' if math.isinf(value) else value  # noqa: E731
    assert [(t['margin'], t['decompose_weight']) for t in rule['trials']] == \
        [(encode(m), encode(w)) for w in AUTO_DECOMPOSE_WEIGHTS for m in AUTO_MARGINS]
    assert all(t['probe_steps'] == 2 for t in rule['trials'])
    plan = CompressionPlan.from_json(tmp_path / 'plan.json')
    assert (encode(plan.margin), encode(plan.decompose_weight)) == (rule['margin'], rule['decompose_weight'])
    assert row['latency_budget'] == rule['latency_budget'] and row['latency_budget']['batch'] == 8
    # an infinite weight never decomposes (a finite one may still leave every layer dense under this budget)
    assert rule['decompose_weight'] != 'inf' or plan.ranks == {}


def test_onnxruntime_backend_plans_on_its_own_cached_timings(scanned, tmp_path):
    """latency_backend='onnxruntime': every layer and the model are timed in ONNX Runtime, the cache keys name the
    backend and its version (torch keys stay as they were), and a second plan measures nothing new."""
    import onnxruntime

    model, dummy, groups, table = scanned
    cache_path = tmp_path / 'latency.json'
    before = model_fingerprint(model)
    plan, report = plan_for_latency(table, model, dummy, groups, target_latency=0.85, batch=BATCH, threads=1,
                                    mode='prune', latency_cache=cache_path, max_rounds=2, backend='onnxruntime')
    assert model_fingerprint(model) == before
    assert report['backend'] == 'onnxruntime' and report['original_ms'] > 0 and report['measured_ms'] > 0
    assert plan.prune_ratios and 0 < plan.measured['latency'] < 1.2
    keys = [entry['key'] for entry in json.loads(cache_path.read_text())['entries'].values()]
    assert keys and all(f'backend onnxruntime {onnxruntime.__version__}' in key for key in keys)
    again, again_report = plan_for_latency(table, model, dummy, groups, target_latency=0.85, batch=BATCH, threads=1,
                                           mode='prune', latency_cache=cache_path, max_rounds=2, backend='onnxruntime')
    assert again_report['new_measurements'] == 0 and again.prune_ratios == plan.prune_ratios
    torch_model = LatencyModel(model, dummy, CostModel(model, dummy, groups), LEVELS, batch=BATCH, threads=1,
                               cache=cache_path)
    assert torch_model.cache.measured > 0 and 'backend' not in torch_model._prefix()


def test_an_unknown_latency_backend_is_named(scanned):
    from hmc_plugin.settings import HMCSettings
    from hmc_plugin.utils.timing import measure_latency

    model, dummy, groups, _ = scanned
    with pytest.raises(HMCConfigError, match="latency_backend='tensorrt'.*'torch', 'onnxruntime'"):
        measure_latency(model, dummy, backend='tensorrt')
    with pytest.raises(HMCConfigError, match='latency_backend'):
        HMCSettings(latency_backend='tensorrt')


def test_onnxruntime_backend_without_onnxruntime_says_how_to_install_it(scanned, monkeypatch):
    from hmc_plugin.utils.timing import measure_latency

    model, dummy, _, _ = scanned
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import onnxruntime now raises ImportError
    with pytest.raises(HMCConfigError, match=r"needs onnxruntime: pip install 'hmc_plugin\[deploy\]'"):
        measure_latency(model, dummy, backend='onnxruntime')
