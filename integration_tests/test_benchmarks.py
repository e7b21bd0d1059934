"""The benchmark suites in recipes/benchmarks: each runs end to end with --quick, its markdown is rendered from
its JSON, and README's "Results" tables are the ones rendered from the committed full-run JSON."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / 'recipes' / 'benchmarks'
RESULTS = BENCHMARKS / 'results'
SUITES = ('quality', 'real_speed', 'pipeline_cost')


def suite_module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _command(suite: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(BENCHMARKS / f'{suite}.py'), '--quick', '--quiet', '--threads', '1',
            '--out', str(out), *extra]


@pytest.fixture(scope='module')
def quick_runs(tmp_path_factory):
    """All three suites with --quick: quality first, then the other two side by side on its cached baseline."""
    root = tmp_path_factory.mktemp('benchmarks')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run(_command('quality', root / 'quality'), check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
    work = ['--work', str(root / 'quality' / 'resnet20' / 'seed0')]
    running = [subprocess.Popen(_command(suite, root / suite, *work), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for suite in ('real_speed', 'pipeline_cost')]
    for process in running:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    return {suite: json.loads((root / suite / f'{suite}.json').read_text()) for suite in SUITES} | {'root': root}


@pytest.mark.parametrize('suite', SUITES)
def test_quick_run_writes_markdown_rendered_from_its_json(quick_runs, suite):
    report = quick_runs[suite]
    markdown = (quick_runs['root'] / suite / f'{suite}.md').read_text()
    assert markdown == suite_module(suite).render_markdown(report)
    assert report['suite'] == suite and report['settings']['quick'] is True
    assert report['machine'] and report['command'].startswith('.venv/bin/python recipes/benchmarks/')


def test_quality_quick_run_covers_every_method_at_the_budget(quick_runs):
    report = quick_runs['quality']
    png = quick_runs['root'] / 'quality' / 'quality_pareto.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert sorted(cell['method'] for cell in report['cells']) == sorted(suite_module('common').METHODS)
    for cell in report['cells']:
        assert abs(cell['flops_kept'] - cell['target']) <= 0.02, cell
        assert 0.0 <= cell['acc_finetuned'] <= 1.0 and cell['kl_zero_shot'] >= 0.0
    hmc = next(cell for cell in report['cells'] if cell['method'] == 'hmc')
    assert hmc['margin'] in {trial['margin'] for trial in hmc['margin_trials']}
    # every comparison the table prints is in the JSON, and the "does not beat" list is derived from it
    markdown = (quick_runs['root'] / 'quality' / 'quality.md').read_text()
    losses = [c for c in report['comparisons'] if not c['beats'] and c['baseline'] not in ('hmc', 'nahc')]
    assert ('does not beat' in markdown.split('## Where HMC')[1]) == bool(losses)


def test_real_speed_quick_run_gives_ratios_of_its_medians(quick_runs):
    report = quick_runs['real_speed']
    assert {row['method'] for row in report['rows']} == set(suite_module('common').METHODS)
    for row in report['rows']:
        for batch in report['settings']['batches']:
            speedup = row[f'latency_ms_before_b{batch}'] / row[f'latency_ms_after_b{batch}']
            assert row[f'speedup_b{batch}'] == pytest.approx(speedup)
            assert row[f'speedup_per_flops_reduction_b{batch}'] == pytest.approx(speedup / row['flops_reduction'])


def test_pipeline_cost_quick_run_measures_every_stage(quick_runs):
    report = quick_runs['pipeline_cost']
    stages = {(row['stage'], row['variant']) for row in report['rows']}
    assert {('scan', 'proxy'), ('scan', 'evaluator'), ('plan', 'nahc@0.5'), ('apply', 'nni'),
            ('apply', 'torch_pruning')} <= stages
    for row in report['rows']:
        assert row['seconds'] > 0 and row['peak_rss_mb'] > 0 and row['stage_increase_mb'] >= 0


@pytest.mark.parametrize('suite', SUITES + ('latency_budget',))
def test_readme_results_are_the_tables_rendered_from_the_committed_json(suite):
    if not (RESULTS / f'{suite}.json').exists():
        pytest.skip(f'no full run of {suite} committed yet (recipes/benchmarks/results/{suite}.json)')
    report = json.loads((RESULTS / f'{suite}.json').read_text())
    assert report['settings']['quick'] is False
    rendered = suite_module(suite).render_markdown(report)
    assert rendered == (RESULTS / f'{suite}.md').read_text()
    readme = (REPO / 'README.md').read_text()
    table_lines = [line for line in rendered.splitlines() if line.startswith('|') or line.startswith('- ')]
    assert table_lines
    missing = [line for line in table_lines if line not in readme.splitlines()]
    assert not missing, f'README lacks these lines of {suite}.md: {missing[:3]}'
    assert report['command'] in readme


def test_latency_budget_quick(tmp_path):
    """Issue #7's benchmark, --quick twice into one --work: every landing row and accuracy cell with sane figures,
    and the second run takes its layer timings from the first run's latency cache."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    reports = []
    for run in ('first', 'second'):
        subprocess.run(_command('latency_budget', tmp_path / run, '--work', str(tmp_path / 'work')), check=True,
                       cwd=REPO, env=env, capture_output=True, timeout=600)
        reports.append(json.loads((tmp_path / run / 'latency_budget.json').read_text()))
    first, second = reports
    assert (tmp_path / 'first' / 'latency_budget.md').read_text() == suite_module('latency_budget').render_markdown(first)
    assert first['suite'] == 'latency_budget' and first['settings']['quick'] is True
    assert first['command'].startswith('.venv/bin/python recipes/benchmarks/latency_budget.py')
    target = first['settings']['target']
    for report in reports:
        assert sorted((row['budget'], row['method']) for row in report['landing']) == \
            [('flops', 'hmc'), ('flops', 'prune'), ('latency', 'hmc'), ('latency', 'prune')]
        for row in report['landing']:
            assert 'error' not in row, row['error']
            assert 0 < row['latency_kept'] < 1.5 and 0 < row['flops_kept'] < 1.5 and row['speedup'] > 0
            assert row['speedup'] == pytest.approx(row['original_ms'] / row['compressed_ms'])
            assert row['latency_kept'] == pytest.approx(1 / row['speedup'])
            assert row['flops_reduction'] == pytest.approx(1 / row['flops_kept'])
            assert row['speedup_per_flops_reduction'] == pytest.approx(row['speedup'] / row['flops_reduction'])
            if row['budget'] == 'latency':
                assert 0 < row['predicted'] < 1.5 and 0 < row['measured_while_planning'] < 1.5
                assert row['prediction_error'] == pytest.approx(row['predicted'] / row['latency_kept'] - 1)
                assert row['within_tolerance'] == (abs(row['latency_kept'] - target) <= 0.1 * target)
            else:
                assert row['new_measurements'] == 0  # FLOPs budgets time nothing
        hmc = next(row for row in report['landing'] if (row['budget'], row['method']) == ('latency', 'hmc'))
        assert hmc['margin_rule'] == 'choose_margin'
        assert (hmc['margin'], hmc['decompose_weight']) in {(t['margin'], t['decompose_weight']) for t in hmc['margin_trials']}
        assert all(t['probe_steps'] == 2 for t in hmc['margin_trials'])
        assert sorted(cell['method'] for cell in report['cells']) == ['hmc', 'prune']
        for cell in report['cells']:
            assert 'error' not in cell, cell['error']
            assert 0 < cell['latency_kept'] < 1.5 and 0 < cell['flops_kept'] < 1.5
            assert all(0 <= cell[phase] <= 1 for phase in ('acc_zero_shot', 'acc_finetuned', 'acc_finetuned_long'))
        summary = next(row for row in report['summary'] if row['method'] == 'hmc')
        assert summary['at_least_as_accurate'] == {phase: summary['vs_prune'][phase] >= 0
                                                   for phase in ('acc_finetuned', 'acc_finetuned_long')}
        hmc_cell, prune_cell = (next(cell for cell in report['cells'] if cell['method'] == m) for m in ('hmc', 'prune'))
        if (hmc_cell['margin'], hmc_cell['decompose_weight']) == ('inf', 'inf'):  # prune-only's plan: the same model
            assert hmc_cell['flops_kept'] == prune_cell['flops_kept'] and hmc_cell['groups'] == prune_cell['groups']
    # The first run times the layers and the correction rounds' whole models; the second finds them all in
    # WORK/latency.json (both are cached), takes the same corrections and makes the same plans.
    new = [sum(row['new_measurements'] for row in report['landing']) for report in reports]
    assert new[0] > 0 and new[1] == 0, new
    assert [row['flops_kept'] for row in first['landing']] == [row['flops_kept'] for row in second['landing']]
