"""The benchmark suites in recipes/benchmarks: each runs end to end with --quick and its markdown shows what it
measured; recipes/benchmarks/README.md holds the tables rendered from the committed full-run JSON next to the
command that produced them, and the figures its prose quotes are those of the JSON."""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / 'recipes' / 'benchmarks'
RESULTS = BENCHMARKS / 'results'
BENCHMARKS_README = BENCHMARKS / 'README.md'
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


def _as_typed(command: list[str]) -> str:
    """``command`` (interpreter, script, arguments) as typed from the repository root: what the JSON must record."""
    return '.venv/bin/python ' + shlex.join([os.path.relpath(command[1], REPO), *command[2:]])


def markdown_rows(markdown: str, first_columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The body rows of the markdown table whose header starts with ``first_columns``, keyed by header."""
    lines = markdown.splitlines()
    for index, line in enumerate(lines):
        cells = [cell.strip() for cell in line.strip().strip('|').split(' | ')]
        if line.startswith('|') and tuple(cells[:len(first_columns)]) == first_columns:
            rows = []
            for body in lines[index + 2:]:
                if not body.startswith('|'):
                    break
                rows.append(dict(zip(cells, (cell.strip() for cell in body.strip().strip('|').split(' | ')))))
            return rows
    raise AssertionError(f'no table with columns {first_columns} in:\n{markdown[:2000]}')


def level2_sections(text: str) -> list[str]:
    """``text`` cut at its level-2 headings (``## ``); the part before the first one comes first."""
    return re.split(r'(?m)^(?=## )', text)


@pytest.fixture(scope='module')
def quick_runs(tmp_path_factory):
    """All three suites with --quick: quality first, then the other two side by side on its cached baseline."""
    root = tmp_path_factory.mktemp('benchmarks')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    commands = {'quality': _command('quality', root / 'quality')}
    subprocess.run(commands['quality'], check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
    work = ['--work', str(root / 'quality' / 'resnet20' / 'seed0')]
    commands.update({suite: _command(suite, root / suite, *work) for suite in ('real_speed', 'pipeline_cost')})
    running = [subprocess.Popen(commands[suite], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for suite in ('real_speed', 'pipeline_cost')]
    for process in running:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    return {suite: json.loads((root / suite / f'{suite}.json').read_text()) for suite in SUITES} | \
        {'root': root, 'commands': {suite: _as_typed(command) for suite, command in commands.items()}}


@pytest.mark.parametrize('suite', SUITES)
def test_quick_run_writes_markdown_rendered_from_its_json(quick_runs, suite):
    report = quick_runs[suite]
    markdown = (quick_runs['root'] / suite / f'{suite}.md').read_text()
    assert markdown == suite_module(suite).render_markdown(report)
    assert report['suite'] == suite and report['settings']['quick'] is True and report['machine']
    # the JSON and the markdown name the command that really ran, as one would type it
    assert report['command'] == quick_runs['commands'][suite]
    assert quick_runs['commands'][suite] in markdown


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
    # every comparison is the difference of the cells' mean fine-tuned accuracies (not of the summary rows)
    for comparison in report['comparisons']:
        means = [statistics.fmean(cell['acc_finetuned'] for cell in report['cells']
                                  if (cell['model'], cell['target'], cell['method']) ==
                                  (comparison['model'], comparison['target'], method))
                 for method in (comparison['subject'], comparison['baseline'])]
        assert comparison['difference'] == pytest.approx(means[0] - means[1], abs=1e-12), comparison
        assert comparison['beats'] == (means[0] - means[1] > 0), comparison
    markdown = (quick_runs['root'] / 'quality' / 'quality.md').read_text()
    losses = [c for c in report['comparisons'] if not c['beats'] and c['baseline'] not in ('hmc', 'nahc')]
    assert ('does not beat' in markdown.split('## Where HMC')[1]) == bool(losses)


def test_real_speed_quick_run_shows_ratios_of_what_it_measured(quick_runs):
    from hmc_plugin.app.models import resnet20
    from hmc_plugin.utils.counting import count_flops

    report = quick_runs['real_speed']
    assert {row['method'] for row in report['rows']} == set(suite_module('common').METHODS)
    # the uncompressed FLOPs are the architecture's, counted here independently of the run
    flops = count_flops(resnet20(num_classes=10), torch.zeros(1, 3, 32, 32))
    shown = markdown_rows((quick_runs['root'] / 'real_speed' / 'real_speed.md').read_text(), ('target', 'method'))
    assert len(shown) == len(report['rows'])
    for row, cells in zip(report['rows'], shown):
        assert row['flops_before'] == flops
        assert abs(row['flops_after'] / row['flops_before'] - row['target']) <= 0.02, row
        assert cells['FLOPs reduction'] == f'{row["flops_before"] / row["flops_after"]:.2f}x'
        for batch in report['settings']['batches']:
            before, after = row[f'latency_ms_before_b{batch}'], row[f'latency_ms_after_b{batch}']
            assert 0 < before < math.inf and 0 < after < math.inf
            assert cells[f'speed-up b{batch}'] == f'{before / after:.2f}x'
            reduction = row['flops_before'] / row['flops_after']
            assert cells[f'speed-up / FLOPs reduction b{batch}'] == f'{before / after / reduction:.2f}'


def test_pipeline_cost_quick_run_measures_every_stage(quick_runs):
    report = quick_runs['pipeline_cost']
    stages = {(row['stage'], row['variant']) for row in report['rows']}
    assert {('scan', 'proxy'), ('scan', 'evaluator'), ('plan', 'nahc@0.5'), ('apply', 'nni'),
            ('apply', 'torch_pruning')} <= stages
    for row in report['rows']:
        assert row['seconds'] > 0 and row['peak_rss_mb'] > 0 and row['stage_increase_mb'] >= 0
    # the scans count their own evaluations; the full scan's size is counted from the model's units
    scans = [row for row in report['rows'] if row['stage'] == 'scan']
    assert len({row['full_evaluations'] for row in scans}) == 1
    for row in scans:
        assert 0 < row['evaluations'] <= row['full_evaluations']
        assert (row['evaluations'] == row['full_evaluations']) == (not row['subset']), row
    proxy = next(row for row in scans if row['variant'] == 'proxy')
    shown = markdown_rows((quick_runs['root'] / 'pipeline_cost' / 'pipeline_cost.md').read_text(), ('model', 'stage'))
    for row, cells in zip(report['rows'], shown):
        if row['stage'] == 'scan':
            projected = row['seconds'] / row['evaluations'] * row['full_evaluations']
            assert cells['relative wall'] == f'{projected / proxy["seconds"]:.2f}'


def _normalised(value):
    """A setting as the JSON records it or as argparse leaves it, in one comparable form."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_normalised(item) for item in value]
    if isinstance(value, str):
        if ',' in value:
            return [_normalised(item) for item in value.split(',')]
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, (int, float)) else value


SCRIPT_OF = {'power_cosine': 'power'}  # a suite written by another suite's script (power.py --finetune-schedule cosine)


@pytest.mark.parametrize('suite', SUITES + ('latency_budget', 'power', 'power_cosine'))
def test_benchmarks_readme_holds_the_tables_of_the_committed_json_next_to_their_command(suite):
    if not (RESULTS / f'{suite}.json').exists():
        pytest.skip(f'no full run of {suite} committed yet (recipes/benchmarks/results/{suite}.json)')
    report = json.loads((RESULTS / f'{suite}.json').read_text())
    assert report['settings']['quick'] is False and report['suite'] == suite
    script = SCRIPT_OF.get(suite, suite)
    rendered = suite_module(script).render_markdown(report)
    assert rendered == (RESULTS / f'{suite}.md').read_text()
    table_lines = [line for line in rendered.splitlines() if line.startswith('|') or line.startswith('- ')]
    assert table_lines
    # every line of the tables is in the level-2 section of recipes/benchmarks/README.md that gives the command
    holding = [section for section in level2_sections(BENCHMARKS_README.read_text())
               if report['command'] in section]
    assert holding, f'recipes/benchmarks/README.md does not give the command {report["command"]!r}'
    missing = [line for line in table_lines if not any(line in section.splitlines() for section in holding)]
    assert not missing, f'recipes/benchmarks/README.md lacks, next to its command, these lines of {suite}.md: {missing[:3]}'
    # and that command, run again, would make a report with these settings
    argv = shlex.split(report['command'])
    assert argv[:2] == ['.venv/bin/python', f'recipes/benchmarks/{script}.py'], argv
    args = suite_module(script).parse_args(argv[2:])
    compared = 0
    for key, recorded in report['settings'].items():
        if not hasattr(args, key):
            continue
        given, recorded = _normalised(getattr(args, key)), _normalised(recorded)
        if isinstance(recorded, list) and not isinstance(given, list):
            given = [given]
        assert given == recorded, (key, getattr(args, key), report['settings'][key])
        compared += 1
    assert compared >= 4
    assert report['threads'] == args.threads


def _committed(suite: str) -> dict:
    path = RESULTS / f'{suite}.json'
    if not path.exists():
        pytest.skip(f'no full run of {suite} committed yet ({path.relative_to(REPO)})')
    return json.loads(path.read_text())


def _section(heading: str) -> str:
    return next(section for section in level2_sections(BENCHMARKS_README.read_text()) if section.startswith(heading))


def _prose(section: str) -> str:
    """The section's prose with lines joined (tables and code blocks left out)."""
    return ' '.join(line.strip() for line in section.splitlines() if line.strip() and not line.startswith(('|', '```')))


def _signed(points: float) -> str:
    return f'{points:+.1f}'.replace('-', '−')


def test_benchmarks_readme_prose_quotes_the_committed_json():
    """The figures recipes/benchmarks/README.md gives in words, recomputed from the JSON's measured fields."""
    quality, speed, cost = (_committed(suite) for suite in SUITES)
    text = _prose(_section('## Quality, real speed and pipeline cost'))

    def accuracy(model, target, method):
        return statistics.fmean(cell['acc_finetuned'] for cell in quality['cells']
                                if (cell['model'], cell['target'], cell['method']) == (model, target, method))

    for baseline, words in (('nahc', 'The margin rule helps HMC over NaHC at every (model, target)'),
                            ('ahc', 'Against AHC')):
        gaps = {model: [_signed(100 * (accuracy(model, target, 'hmc') - accuracy(model, target, baseline)))
                        for target in (0.5, 0.25, 0.125)] for model in ('resnet20', 'resnet56')}
        expected = (f'{gaps["resnet20"][0]}, {gaps["resnet20"][1]} and {gaps["resnet20"][2]} pp on ResNet-20, '
                    f'{gaps["resnet56"][0]}, {gaps["resnet56"][1]} and {gaps["resnet56"][2]} pp on ResNet-56')
        assert expected in text.split(words, 1)[1][:200], (words, expected)

    def per_flops(row, batch):  # from the raw medians and FLOPs counts, not the JSON's derived ratios
        return (row[f'latency_ms_before_b{batch}'] / row[f'latency_ms_after_b{batch}']
                / (row['flops_before'] / row['flops_after']))

    def span(methods, target):
        values = [per_flops(row, batch) for row in speed['rows'] if row['method'] in methods and row['target'] == target
                  for batch in speed['settings']['batches']]
        return f'{min(values):.2f}–{max(values):.2f}'

    pruners, hybrids = ('prune', 'nni_l1'), ('nahc', 'hmc', 'ahc', 'decompose')
    assert f'(prune-only and NNI: {span(pruners, 0.5)} at half the FLOPs, {span(pruners, 0.25)} at a quarter)' in text
    assert f'get {span(hybrids, 0.5)} at half the FLOPs and {span(hybrids, 0.25)} at a quarter' in text
    b64 = {row['method']: row['latency_ms_before_b64'] / row['latency_ms_after_b64'] for row in speed['rows']
           if row['target'] == 0.5}
    assert (f'decompose-only is slower than the original ({b64["decompose"]:.2f}×) and AHC barely breaks even '
            f'({b64["ahc"]:.2f}×)') in text

    rows = {(row['model'], row['stage'], row['variant']): row for row in cost['rows']}

    def full(model, variant):
        row = rows[(model, 'scan', variant)]
        return row['seconds'] / row['evaluations'] * row['full_evaluations']

    r56, r50 = 'resnet56', 'torchvision:resnet50'
    proxy56, proxy50 = rows[(r56, 'scan', 'proxy')], rows[(r50, 'scan', 'proxy')]
    assert (f'scans ResNet-56 {full(r56, "kl") / proxy56["seconds"]:.0f}× faster than the whole-network KL and '
            f'{full(r56, "evaluator") / proxy56["seconds"]:.0f}× faster than the evaluator') in text
    assert (f'and ResNet-50 in {proxy50["seconds"] / 60:.1f} min, {full(r50, "kl") / proxy50["seconds"]:.0f}× '
            f'faster than the projected KL scan') in text
    increase = {key: row['stage_increase_mb'] / 1000 for key, row in rows.items()}
    assert (f'(+{increase[(r56, "scan", "proxy")]:.1f} GB on ResNet-56, +{increase[(r50, "scan", "proxy")]:.1f} GB on '
            f'ResNet-50, against +{increase[(r56, "scan", "kl")]:.1f} and +{increase[(r50, "scan", "kl")]:.1f} GB '
            f'for `kl`)') in text
    shrink = {model: rows[(model, 'apply', 'nni')]['seconds_shrink'] / rows[(model, 'apply', 'torch_pruning')]['seconds_shrink']
              for model in (r56, r50)}
    assert f'its shrink step takes {shrink[r56]:.0f}× (ResNet-56) and {shrink[r50]:.0f}× (ResNet-50)' in text
    assert (f'+{increase[(r50, "apply", "nni")]:.1f} GB of memory against +{increase[(r50, "apply", "torch_pruning")]:.1f} '
            f'GB') in text
    assert (f'the full scans would take about {full(r50, "evaluator") / 60:.0f} min and {full(r50, "kl") / 60:.0f} '
            f'min here)') in text
    minutes = [round(report['wall_seconds'] / 60) for report in (quality, speed, cost)]
    assert f'(quality {minutes[0]} min, real speed {minutes[1]} min, pipeline cost {minutes[2]} min)' in text


def test_benchmarks_readme_latency_prose_quotes_the_committed_json():
    report = _committed('latency_budget')
    text = _prose(_section('## Latency budgets'))
    landing = [row for row in report['landing'] if 'error' not in row]
    kept = {id(row): row['compressed_ms'] / row['original_ms'] for row in landing}
    latency = [row for row in landing if row['budget'] == 'latency']
    errors = [100 * (row['predicted'] / kept[id(row)] - 1) for row in latency]
    assert f'within {_signed(min(errors))} % to {_signed(max(errors))} % of the whole model' in text
    target = report['settings']['target']
    landed = sum(abs(kept[id(row)] - target) <= report['settings']['tolerance'] * target for row in latency)
    assert f'{landed} of {len(latency)} latency rows land within ±10 %.' in text
    if landed == len(latency):
        assert 'Every latency budget lands within ±10 % of half the original time' in text
    resnet50 = {(row['budget'], row['method']): row for row in landing if row['model'] == 'torchvision:resnet50'}
    if resnet50:
        timings = [row['original_ms'] for row in resnet50.values()]
        assert f'({min(timings):.0f}–{max(timings):.0f} ms in this run\'s re-timings)' in text
        flops, budget = resnet50[('flops', 'hmc')], resnet50[('latency', 'hmc')]
        assert (f'NaHC on ResNet-50 with half the FLOPs keeps {kept[id(flops)]:.3f} of the time (speed-up / FLOPs '
                f'reduction {flops["flops_kept"] / kept[id(flops)]:.2f}), with a latency budget '
                f'{kept[id(budget)]:.3f} ({budget["flops_kept"] / kept[id(budget)]:.2f})') in text
    hmc56 = next(row for row in latency if (row['model'], row['method']) == ('resnet56', 'hmc'))
    assert f'({hmc56["new_measurements"]} on ResNet-56)' in text
    cells = {method: [cell for cell in report['cells'] if cell['method'] == method and cell['model'] == 'resnet56']
             for method in ('hmc', 'prune')}
    means = {method: statistics.fmean(cell['compressed_ms'] / cell['original_ms'] for cell in group)
             for method, group in cells.items()}
    assert f'({means["hmc"]:.3f} against {means["prune"]:.3f})' in text
    if all(cell['margin'] == 'inf' and cell['decompose_weight'] == 'inf' for cell in cells['hmc']):
        assert "because it chose prune-only's plan in every seed" in text
        assert [cell['flops_kept'] for cell in cells['hmc']] == [cell['flops_kept'] for cell in cells['prune']]


def test_latency_budget_quick(tmp_path):
    """Issue #7's benchmark, --quick twice into one --work: every landing row and accuracy cell with sane figures,
    and the second run takes its layer timings from the first run's latency cache."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    reports, markdowns, commands = [], [], []
    for run in ('first', 'second'):
        command = _command('latency_budget', tmp_path / run, '--work', str(tmp_path / 'work'))
        subprocess.run(command, check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
        reports.append(json.loads((tmp_path / run / 'latency_budget.json').read_text()))
        markdowns.append((tmp_path / run / 'latency_budget.md').read_text())
        commands.append(_as_typed(command))
    first, second = reports
    assert markdowns[0] == suite_module('latency_budget').render_markdown(first)
    assert first['suite'] == 'latency_budget' and first['settings']['quick'] is True
    assert [report['command'] for report in reports] == commands
    target = first['settings']['target']
    for report, markdown in zip(reports, markdowns):
        assert sorted((row['budget'], row['method']) for row in report['landing']) == \
            [('flops', 'hmc'), ('flops', 'prune'), ('latency', 'hmc'), ('latency', 'prune')]
        shown = markdown_rows(markdown, ('model', 'budget'))
        assert len(shown) == len(report['landing'])
        for row, cells in zip(report['landing'], shown):
            assert 'error' not in row, row['error']
            assert 0 < row['flops_kept'] < 1.5 and row['original_ms'] > 0 and row['compressed_ms'] > 0
            # what the table shows, recomputed from the two measured medians
            kept = row['compressed_ms'] / row['original_ms']
            assert 0 < kept < 1.5
            assert cells['latency kept'] == f'{kept:.3f}'
            assert cells['speed-up'] == f'{row["original_ms"] / row["compressed_ms"]:.2f}x'
            assert cells['FLOPs reduction'] == f'{1 / row["flops_kept"]:.2f}x'
            if row['budget'] == 'latency':
                assert 0 < row['predicted'] < 1.5 and 0 < row['measured_while_planning'] < 1.5
                assert cells['prediction error'] == f'{100 * (row["predicted"] / kept - 1):+.1f} %'
                assert cells['within ±10 %'] == ('yes' if abs(kept - target) <= 0.1 * target else '**no**')
            else:
                assert abs(row['flops_kept'] - target) <= 0.02, row  # the FLOPs budget it was given
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
        # HMC against prune-only, from the cells' own accuracies
        summary = next(row for row in report['summary'] if row['method'] == 'hmc')
        for phase in ('acc_finetuned', 'acc_finetuned_long'):
            difference = (statistics.fmean(cell[phase] for cell in report['cells'] if cell['method'] == 'hmc')
                          - statistics.fmean(cell[phase] for cell in report['cells'] if cell['method'] == 'prune'))
            assert summary['vs_prune'][phase] == pytest.approx(difference, abs=1e-12)
            assert summary['at_least_as_accurate'][phase] == (difference >= 0)
        hmc_cell, prune_cell = (next(cell for cell in report['cells'] if cell['method'] == m) for m in ('hmc', 'prune'))
        if (hmc_cell['margin'], hmc_cell['decompose_weight']) == ('inf', 'inf'):  # prune-only's plan: the same model
            assert hmc_cell['flops_kept'] == prune_cell['flops_kept'] and hmc_cell['groups'] == prune_cell['groups']
    # The first run times the layers and the correction rounds' whole models; the second finds them all in
    # WORK/latency.json (both are cached), takes the same corrections and makes the same plans.
    new = [sum(row['new_measurements'] for row in report['landing']) for report in reports]
    assert new[0] > 0 and new[1] == 0, new
    assert [row['flops_kept'] for row in first['landing']] == [row['flops_kept'] for row in second['landing']]


def test_recovery_scores_rank_the_scores_by_their_correlation_with_the_fine_tuned_accuracy():
    """A score that orders the candidates as their fine-tuned accuracy does gets rho +1, the reverse -1 (KL scores
    count lower as better); groups are (model, data, target, seed)."""
    recovery = suite_module('recovery_scores')
    cells = []
    for seed in (0, 1):
        for index, truth in enumerate((0.5, 0.6, 0.7, 0.8)):
            cell = {'model': 'resnet20', 'data': 'digits_hard', 'target': 0.5, 'seed': seed, 'acc_finetuned': truth}
            cell.update({score: 0.0 for score in recovery.SCORES})
            cell.update(kl_probe=1.0 - truth, acc_probe=truth + 0.01 * seed, kl_data_free=truth,
                        acc_bn=[0.2, 0.1, 0.4, 0.3][index], kl_bn=float(index % 2))
            cells.append(cell)
    result = recovery.correlations(cells)
    assert result['kl_probe']['rho_mean'] == pytest.approx(1.0) and result['kl_probe']['groups'] == 2
    assert result['acc_probe']['rho_mean'] == pytest.approx(1.0)
    assert result['kl_data_free']['rho_mean'] == pytest.approx(-1.0)
    assert result['acc_bn']['rho_mean'] == pytest.approx(0.6)
    assert result['kl_data_aware']['groups'] == 0 and math.isnan(result['kl_data_aware']['rho_mean'])  # constant


def test_power_pairs_seeds_and_names_the_cells_hmc_loses():
    """The powered benchmark's statistics on made-up cells: paired differences per seed with a 95 % t interval,
    the strongest pruner by mean fine-tuned accuracy, a seed that misses the budget left out of the pairs, and
    the goal counted over fine-tuned cells with the lost ones named."""
    power = suite_module('power')
    cells = []
    for seed in range(5):
        for method, base in (('hmc', 0.80), ('prune', 0.78), ('tp_l2', 0.75), ('nni_l1', 0.70)):
            acc = {'0': base - 0.3, '1': base + 0.01 * seed, '5': base + 0.05 - (0.1 if method == 'hmc' else 0)}
            cell = {'model': 'resnet20', 'data': 'digits_hard', 'seed': seed, 'budget': 'flops', 'target': 0.5,
                    'method': method, 'acc': acc, 'kl': {key: 1 - value for key, value in acc.items()},
                    'flops_kept': 0.5, 'params_kept': 0.4}
            if method == 'tp_l2' and seed == 4:
                cell = {key: cell[key] for key in ('model', 'data', 'seed', 'budget', 'target', 'method')}
                cell['unreachable'] = 'cannot reach'
            cells.append(cell)
    for cell in cells:  # HMC's lead over prune-only varies by seed after one epoch
        if cell['method'] == 'prune':
            cell['acc']['1'] = 0.78 + [0.01, -0.02, 0.0, 0.03, -0.01][cell['seed']]
    summary = power.summarise(cells, [1, 5])
    one = next(row for row in summary if row['epochs'] == 1)
    assert one['strongest_pruner'] == 'prune'
    assert one['methods']['tp_l2'] == pytest.approx({'seeds': 5, 'reached': 4, 'acc_mean': 0.75 + 0.015,
                                                     'acc_std': one['methods']['tp_l2']['acc_std'],
                                                     'kl_mean': 0.25 - 0.015, 'kl_std': one['methods']['tp_l2']['kl_std'],
                                                     'flops_kept': 0.5, 'params_kept': 0.4})
    pair = power.paired(one, 'hmc', 'prune')
    differences = [0.80 + 0.01 * seed - (0.78 + [0.01, -0.02, 0.0, 0.03, -0.01][seed]) for seed in range(5)]
    assert pair['differences'] == pytest.approx(differences)
    half = 2.7764451 * statistics.stdev(differences) / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    assert (pair['low'], pair['high']) == pytest.approx((statistics.fmean(differences) - half,
                                                         statistics.fmean(differences) + half))
    assert power.paired(one, 'hmc', 'tp_l2')['seeds'] == [0, 1, 2, 3]
    report = {'summary': summary}
    result = power.verdict(report)
    assert result['cells'] == 2 and result['hmc_at_least_every_baseline'] == 1
    assert result['interval_above_zero_vs_strongest'] == (1 if pair['low'] > 0 else 0)
    assert result['lost'] == ['ResNet-20 on digits_hard, flops 0.5, 5 epoch(s): below prune-only (HMC, L1); '
                              'torch-pruning group-L2, global']
    report.update(command='.venv/bin/python recipes/benchmarks/power.py', machine='m', threads=1, commit='c',
                  wall_seconds=60.0, baselines=[{'model': 'resnet20', 'data': 'digits_hard', 'seed': 0, 'acc': 0.9}],
                  settings={'seeds': [0, 1, 2, 3, 4], 'data': ['digits_hard'], 'models': ['resnet20'], 'epochs': [1, 5],
                            'train_epochs': 12, 'finetune_lr': 0.01, 'probe_steps': 60, 'latency_batch': 64})
    markdown = power.render_markdown(report)
    assert '**Goal, HMC (margin rule)** (fine-tuned cells): at least every baseline in 1 of 2' in markdown
    rows = markdown_rows(markdown.split('### flops 0.5, 1 fine-tuning epoch(s)')[1], ('method', 'seeds'))
    by_method = {row['method']: row for row in rows}
    assert by_method['torch-pruning group-L2, global']['seeds'] == '4 of 5'
    assert by_method['prune-only (HMC, L1) (strongest pruner)']['HMC − it, pp [95 % CI]'] == \
        f'{100 * pair["mean"]:+.1f} [{100 * pair["low"]:+.1f}, {100 * pair["high"]:+.1f}]'
