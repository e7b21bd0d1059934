"""NNI's ``remote`` training service for real: an OpenSSH server on this machine's loopback (Debian's
``openssh-server``, installed when missing, started on a free port with a throwaway key, stopped afterwards)
stands for two machines, 127.0.0.1 and 127.0.0.2. ``recipes/nni_experiment/launch.py --remote ... --remote ...``
runs four short ResNet-20 trials on them, two at a time, over SSH, with one shared ``--cache-dir``.

Checked: trials ran on both machine entries; the baseline was trained once and each scan half scanned once
although the first two trials ran at the same time on different machines (the cache's file lock holds across
them); the web UI lists every trial; ``nnictl stop`` leaves no process behind, remote trial keepers included.
"""
from __future__ import annotations

import json
import re

import psutil
import pytest

from nni_harness import LoopbackSshServer, RunningExperiment
from test_nni_experiment import RECIPE, TRIAL_ARGS

# One scan setting and four modes: every trial after the first must reuse the baseline and both scan halves.
SEARCH_SPACE = {
    'mode': {'_type': 'choice', '_value': ['prune', 'decompose', 'ahc', 'nahc']},
    'target_flops': {'_type': 'choice', '_value': [0.6]},
    'importance': {'_type': 'choice', '_value': ['l1']},
    'rank_method': {'_type': 'choice', '_value': ['auto']},
    'finetune_epochs': {'_type': 'choice', '_value': [1]},
}
TRIALS = 4
DONE_WITHIN_S = 360


@pytest.fixture(scope='module')
def ssh_server(tmp_path_factory):
    server = LoopbackSshServer(tmp_path_factory.mktemp('sshd'))
    try:
        yield server
    finally:
        server.close()
    assert server.process.poll() is not None and not list(server.root.glob('*key*')), 'sshd or a key is left'


@pytest.fixture(scope='module')
def remote_experiment(ssh_server, tmp_path_factory):
    run = RunningExperiment(tmp_path_factory.mktemp('nni_remote'))
    run.cache_dir = run.root / 'shared_cache'  # the folder both "machines" reach
    search_space = run.root / 'search_space.json'
    search_space.write_text(json.dumps(SEARCH_SPACE))
    remotes = [arg for machine in ssh_server.machines() for arg in ('--remote', machine)]
    try:
        run.launch([str(RECIPE / 'launch.py'), *remotes, '--ssh-key', str(ssh_server.key),
                    '--nni-manager-ip', '127.0.0.1', '--cache-dir', str(run.cache_dir), '--max-trials', str(TRIALS),
                    '--concurrency', '2', '--tuner', 'GridSearch', '--search-space', str(search_space),
                    '--trial-args', TRIAL_ARGS],
                   trials_root=ssh_server.home / 'nni-experiments', done_within_s=DONE_WITHIN_S)
        yield run
    finally:
        if run.id and not run.stopped:
            run.stop()


def _finals(jobs: list[dict]) -> dict[str, dict]:
    return {job['trialJobId']: json.loads(json.loads(job['finalMetricData'][0]['data'])) for job in jobs}


def test_trials_run_over_ssh_on_both_machine_entries(remote_experiment, ssh_server):
    jobs = remote_experiment.rest('trial-jobs')
    assert len(jobs) == TRIALS and {job['status'] for job in jobs} == {'SUCCEEDED'}, remote_experiment.trial_logs()
    # NNI's remote service names each trial's folder HOST:~/nni-experiments/ID/environments/remote-workerN/...
    hosts = {job['trialJobId']: job['logPath'].split(':', 1)[0] for job in jobs}
    assert set(hosts.values()) == set(ssh_server.HOSTS), hosts
    assert {json.loads(job['hyperParameters'][0])['parameters']['mode'] for job in jobs} == {
        'prune', 'decompose', 'ahc', 'nahc'}
    for final in _finals(jobs).values():
        assert abs(final['flops_kept'] - 0.6) <= 0.02 and 0.0 <= final['default'] <= 1.0
    # Each trial ran under the SSH server's sessions: its log lies in the remote HOME, one folder per machine entry.
    logs = remote_experiment.trial_log_paths()
    assert len(logs) == TRIALS
    assert {path.parts[-4] for path in logs} == {'remote-worker1', 'remote-worker2'}


def test_the_shared_cache_trains_and_scans_once_across_machines(remote_experiment):
    jobs = sorted(remote_experiment.rest('trial-jobs'), key=lambda job: job['sequenceId'])
    first, second = jobs[0], jobs[1]
    assert first['logPath'].split(':')[0] != second['logPath'].split(':')[0]
    assert second['startTime'] < first['endTime'], 'the first two trials did not run at the same time'
    cache = remote_experiment.cache_dir
    baselines = list((cache / 'baselines').glob('*/baseline.pt'))
    scans = sorted(path.name.split('-')[-2] for path in (cache / 'scans').glob('*.json'))
    assert len(baselines) == 1 and scans == ['decompose', 'prune']
    logs = {path.parts[-2]: path.read_text() for path in remote_experiment.trial_log_paths()}
    trained = [trial for trial, log in logs.items() if 'train baseline epoch' in log]
    scanned = [trial for trial, log in logs.items() if re.search(r'Scanned \d+ pruning groups', log)]
    assert len(trained) == 1 and trained == scanned, (trained, scanned)
    assert sum('Loaded the cached baseline' in log for log in logs.values()) == TRIALS - 1
    reused = [final['scan_reused'] for final in _finals(jobs).values()]
    assert sorted(reused) == [0] + [1] * (TRIALS - 1)


def test_web_ui_lists_every_remote_trial(remote_experiment, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    trials = [job['trialJobId'] for job in remote_experiment.rest('trial-jobs')]
    body = lambda: browser.find_element(By.TAG_NAME, 'body').text  # noqa: E731
    browser.get(f'http://127.0.0.1:{remote_experiment.port}/detail')
    WebDriverWait(browser, 60, poll_frequency=0.5).until(
        lambda _: all(trial in body() for trial in trials) and body().count('SUCCEEDED') >= TRIALS)
    listed = [row.find_element(By.CSS_SELECTOR, '[data-automation-key=id]').text.split()[0]  # ID + copy icon
              for row in browser.find_elements(By.CSS_SELECTOR, '[data-automationid=DetailsRow]')]
    assert sorted(listed) == sorted(trials)


def test_stopping_leaves_no_remote_trial_keeper_behind(remote_experiment):
    processes = remote_experiment.processes()
    assert any('trial_keeper' in ' '.join(p.cmdline()) for p in processes), 'no remote trial keeper in /proc'
    result = remote_experiment.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [' '.join(p.cmdline()) for p in alive]
