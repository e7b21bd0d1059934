"""A real NNI experiment over HMC's hyperparameters (recipes/nni_experiment): local training service, NNI
manager on a loopback port, three short ResNet-20 trials one at a time; checked through NNI's REST API,
the Pareto command and the web UI in headless Chromium; stopped with ``nnictl stop`` and no process left.

The experiment runs under a temporary HOME, so NNI's manifest (``~/nni-experiments/.experiment``) and the
shared cache are the test's own.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from hmc_plugin.errors import HMCConfigError
from hmc_plugin.experiment.results import TrialOutcome, format_front, pareto_front
from hmc_plugin.experiment.trial import FINAL_KEYS, TrialOptions, trial_settings
from nni_harness import RunningExperiment

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / 'recipes' / 'nni_experiment'
# Tiny trials: 1-epoch baseline on 256 images, small calibration batch, 3 latency repeats.
# a 4-step baseline is at chance: these tests run NNI's plumbing, so they go on past the chance-level check
TRIAL_ARGS = ('--train-epochs 1 --train-images 256 --test-images 180 --calibration-size 16 --latency-repeats 3 '
              '--threads 1 --allow-chance-baseline')
# GridSearch over three modes with one scan setting, so trials 2 and 3 must reuse trial 1's scan.
SEARCH_SPACE = {
    'mode': {'_type': 'choice', '_value': ['prune', 'hmc', 'decompose']},
    'margin': {'_type': 'choice', '_value': [1.0]},
    'target_flops': {'_type': 'choice', '_value': [0.6]},
    'importance': {'_type': 'choice', '_value': ['l1']},
    'rank_method': {'_type': 'choice', '_value': ['auto']},
    'finetune_epochs': {'_type': 'choice', '_value': [2]},
}
TRIALS = 3
DONE_WITHIN_S = 240


def test_pareto_front_keeps_the_undominated_trials_cheapest_first():
    def outcome(trial, accuracy, flops_kept):
        return TrialOutcome(trial, {'mode': 'prune'}, {'default': accuracy, 'flops_kept': flops_kept})

    trials = [outcome('a', 0.90, 0.5), outcome('b', 0.95, 0.7), outcome('c', 0.85, 0.6),  # c: a is cheaper and better
              outcome('d', 0.90, 0.5), outcome('e', 0.80, 0.3), outcome('f', 0.95, 0.8)]  # d ties a, f: b is cheaper
    front = pareto_front(trials)
    assert [o.trial_id for o in front] == ['e', 'a', 'b']
    table = format_front(front)
    assert table.splitlines()[0].split()[:3] == ['trial', 'flops_kept', 'default'] and 'prune' in table


def test_trial_settings_map_the_search_space_onto_run_settings():
    options = TrialOptions(model='resnet20', train_epochs=2)
    settings = trial_settings({'mode': 'hmc', 'margin': 1.5, 'target_flops': 0.4, 'finetune_epochs': 3.0}, options)
    assert (settings.methods, settings.margin, settings.target_flops, settings.finetune_epochs) == (('hmc',), 1.5, 0.4, 3)
    assert settings.sensitivity == 'proxy' and settings.train_epochs == 2
    assert trial_settings({'mode': 'prune', 'margin': 1.5}, options).margin is None  # tau belongs to mode 'hmc'
    with pytest.raises(HMCConfigError, match="'ranks'.*searchable"):
        trial_settings({'ranks': 3}, options)
    with pytest.raises(HMCConfigError, match='taylor'):
        trial_settings({'importance': 'taylor'}, options)
    with pytest.raises(HMCConfigError, match='finetune_epochs=1.5'):
        trial_settings({'finetune_epochs': 1.5}, options)


@pytest.fixture(scope='module')
def experiment(tmp_path_factory):
    """Start the experiment with recipes/nni_experiment/launch.py --detach and wait for it through REST."""
    run = RunningExperiment(tmp_path_factory.mktemp('nni_experiment'))
    search_space = run.root / 'search_space.json'
    search_space.write_text(json.dumps(SEARCH_SPACE))
    try:
        run.launch([str(RECIPE / 'launch.py'), '--max-trials', str(TRIALS), '--concurrency', '1', '--tuner',
                    'GridSearch', '--search-space', str(search_space), '--trial-args', TRIAL_ARGS],
                   trials_root=run.working_dir, done_within_s=DONE_WITHIN_S)
        yield run
    finally:
        if run.id and not run.stopped:
            run.stop()


def test_every_trial_succeeds_and_reports_the_final_metrics(experiment):
    jobs = experiment.rest('trial-jobs')
    assert len(jobs) == TRIALS
    assert {job['status'] for job in jobs} == {'SUCCEEDED'}, experiment.trial_logs()
    modes = set()
    for job in jobs:
        final = json.loads(json.loads(job['finalMetricData'][0]['data']))
        parameters = json.loads(job['hyperParameters'][0])['parameters']
        modes.add(parameters['mode'])
        assert set(FINAL_KEYS) <= set(final)
        assert 0.0 <= final['default'] <= 1.0 and 0.0 <= final['acc_zero_shot'] <= 1.0
        assert abs(final['flops_kept'] - parameters['target_flops']) <= 0.02, (parameters, final)
        assert 0.0 < final['params_kept'] < 1.0
        assert final['latency_ms'] > 0 and final['latency_ms_before'] > 0
    assert modes == {'prune', 'hmc', 'decompose'}
    intermediate = [m for m in experiment.rest('metric-data') if m['type'] == 'PERIODICAL']
    per_trial = {job['trialJobId']: 0 for job in jobs}
    for metric in intermediate:
        per_trial[metric['trialJobId']] += 1
        assert 0.0 <= float(json.loads(metric['data'])) <= 1.0
    assert set(per_trial.values()) == {SEARCH_SPACE['finetune_epochs']['_value'][0]}  # one per fine-tuning epoch


def test_only_the_first_trial_trains_and_scans(experiment):
    jobs = sorted(experiment.rest('trial-jobs'), key=lambda job: job['sequenceId'])
    reused = [json.loads(json.loads(job['finalMetricData'][0]['data']))['scan_reused'] for job in jobs]
    assert reused == [0] + [1] * (TRIALS - 1)
    cache = experiment.working_dir / 'hmc_cache'
    scans = list((cache / 'scans').glob('*.json'))
    baselines = list((cache / 'baselines').glob('*/baseline.pt'))
    assert sorted(path.name.split('-')[-2] for path in scans) == ['decompose', 'prune'] and len(baselines) == 1
    # Both halves of the scan were written during trial 1 and never again.
    for scan in scans:
        assert jobs[0]['startTime'] <= scan.stat().st_mtime * 1000 <= jobs[1]['startTime']
    logs = experiment.trial_logs()
    assert logs.count('Reused the sensitivity scan') == TRIALS - 1
    assert logs.count('Loaded the cached baseline') == TRIALS - 1


def test_pareto_command_prints_the_front_and_writes_a_png(experiment):
    out = experiment.root / 'pareto.png'
    result = subprocess.run([sys.executable, str(RECIPE / 'pareto.py'), '--experiment-id', experiment.id,
                             '--out', str(out)], env=experiment.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    finals = {job['trialJobId']: json.loads(json.loads(job['finalMetricData'][0]['data']))
              for job in experiment.rest('trial-jobs')}
    # The front by definition: no other trial at least as accurate with fewer FLOPs kept (or equal and better).
    expected = {trial for trial, mine in finals.items()
                if not any(other['default'] >= mine['default'] and other['flops_kept'] <= mine['flops_kept']
                           and (other['default'] > mine['default'] or other['flops_kept'] < mine['flops_kept'])
                           for other in finals.values())}
    table = result.stdout.split('Best default')[0]
    listed = {trial for trial in finals if trial in table}
    assert listed == expected, result.stdout
    assert f'{len(finals)} succeeded trials; {len(expected)} on the Pareto front' in result.stdout
    best = max(finals, key=lambda trial: finals[trial]['default'])
    assert f'Best default: trial {best}' in result.stdout
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 10_000


def _web_ui_number(value: float) -> str:
    """How the web UI prints a metric: JavaScript's Number -> string (Python's repr for these floats)."""
    return repr(value) if value != int(value) else str(int(value))


def test_web_ui_lists_the_hmc_trials_with_their_metrics(experiment, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    jobs = experiment.rest('trial-jobs')
    finals = {job['trialJobId']: json.loads(json.loads(job['finalMetricData'][0]['data'])) for job in jobs}
    modes = {job['trialJobId']: json.loads(job['hyperParameters'][0])['parameters']['mode'] for job in jobs}
    body = lambda: browser.find_element(By.TAG_NAME, 'body').text  # noqa: E731
    wait = WebDriverWait(browser, 60, poll_frequency=0.5)
    browser.get(f'http://127.0.0.1:{experiment.port}/detail')
    try:
        wait.until(lambda _: all(trial in body() for trial in finals) and body().count('SUCCEEDED') >= TRIALS)
        # The default metric (fine-tuned accuracy) is a column, rounded to 6 decimals.
        text = body()
        assert 'Trial jobs' in text
        for trial, final in finals.items():
            assert f'{_web_ui_number(round(final["default"], 6))} (FINAL)' in text, (final['default'], text)
        # The other final metrics and the hyperparameters are columns the user can add.
        next(b for b in browser.find_elements(By.TAG_NAME, 'button') if 'Add/Remove columns' in b.text).click()
        for label in ('mode (space)', 'flops_kept (metric)', 'params_kept (metric)', 'latency_ms (metric)'):
            wait.until(lambda _: browser.find_elements(By.XPATH, f"//label[.//span[normalize-space()='{label}']]"))
            browser.find_element(By.XPATH, f"//label[.//span[normalize-space()='{label}']]").click()
        next(b for b in browser.find_elements(By.TAG_NAME, 'button') if b.text.strip() == 'Save').click()
        wait.until(lambda _: 'flops_kept (metric)' in body() and 'Customize columns' not in body())
        rows = {row.find_element(By.CSS_SELECTOR, '[data-automation-key=id]').text.split()[0]: row.text  # ID + copy icon
                for row in browser.find_elements(By.CSS_SELECTOR, '[data-automationid=DetailsRow]')}
        assert set(rows) == set(finals)
        for trial, final in finals.items():
            for key in ('flops_kept', 'params_kept', 'latency_ms'):
                assert _web_ui_number(final[key]) in rows[trial], (trial, key, final[key], rows[trial])
            assert modes[trial] in rows[trial].split('\n'), rows[trial]
    finally:
        browser.save_screenshot(str(tmp_path / 'trials_detail.png'))
    assert (tmp_path / 'trials_detail.png').stat().st_size > 10_000


def test_stopping_the_experiment_leaves_no_process_behind(experiment):
    processes = experiment.processes()
    assert any('main.js' in ' '.join(p.cmdline()) for p in processes), 'the NNI manager was not found in /proc'
    result = experiment.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    gone, alive = psutil.wait_procs(processes, timeout=30)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [' '.join(p.cmdline()) for p in alive]
    assert not [p for p in experiment.processes() if p.status() != psutil.STATUS_ZOMBIE]
    with socket.socket() as sock:
        assert sock.connect_ex(('127.0.0.1', experiment.port)) != 0, 'the web UI port still answers'

    # The Pareto command reopens a stopped experiment with NNI's view mode, reads it and closes it again.
    result = subprocess.run([sys.executable, str(RECIPE / 'pareto.py'), '--experiment-id', experiment.id,
                             '--out', str(experiment.root / 'pareto_stopped.png')],
                            env=experiment.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'{TRIALS} succeeded trials' in result.stdout
    assert not [p for p in experiment.processes() if p.status() != psutil.STATUS_ZOMBIE]
