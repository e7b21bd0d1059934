"""What the NNI experiment tests share: a started experiment's handles, Debian packages installed when missing,
headless Chromium for the web UI, and a throwaway OpenSSH server on loopback for NNI's remote training service.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

VENV_BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--window-size=1920,1080')


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def install_debian_packages(packages: list[str], wanted: list[str]) -> None:
    """``apt-get install`` ``packages`` unless every path or command in ``wanted`` exists; skip the test when
    that cannot be done here (no apt-get, no root and no passwordless sudo)."""
    if all(Path(name).exists() if '/' in name else shutil.which(name) for name in wanted):
        return
    apt = shutil.which('apt-get')
    if apt is None:
        pytest.skip(f'{", ".join(packages)} missing and apt-get is not available to install them')
    prefix = [] if os.geteuid() == 0 else (['sudo', '-n'] if shutil.which('sudo') else None)
    if prefix is None:
        pytest.skip(f'{", ".join(packages)} missing and apt-get needs root (no sudo available)')
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    install = [*prefix, apt, 'install', '-y', *packages]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run([*prefix, apt, 'update'], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


class RunningExperiment:
    """Handles of the experiment under test: its ID, port, folders and environment."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / 'home'
        self.working_dir = root / 'experiments'
        self.port = free_loopback_port()
        self.env = {**os.environ, 'HOME': str(self.home), 'OMP_NUM_THREADS': '1',
                    'MPLCONFIGDIR': str(root / 'matplotlib')}
        self.id: str | None = None
        self.seconds = 0.0  # from launch to DONE
        self.stopped = False

    def rest(self, api: str):
        response = requests.get(f'http://127.0.0.1:{self.port}/api/v1/nni/{api}', timeout=20)
        response.raise_for_status()
        return response.json()

    def launch(self, argv: list[str], trials_root: Path, done_within_s: float) -> None:
        """Run ``launch.py ARGV --detach`` and wait through REST until the experiment is DONE; ``trials_root``
        holds the trial logs (``<root>/<id>/environments/*/trials/*/trial.log``)."""
        self.trials_root = trials_root
        started = time.monotonic()
        launched = subprocess.run([sys.executable, *argv, '--port', str(self.port), '--experiment-dir',
                                   str(self.working_dir), '--detach'],
                                  env=self.env, capture_output=True, text=True, timeout=120)
        assert launched.returncode == 0, launched.stdout + launched.stderr
        self.id = self.rest('experiment')['id']
        assert self.id in launched.stdout
        status = None
        while time.monotonic() - started < done_within_s:
            status = self.rest('check-status')['status']
            if status in ('DONE', 'ERROR', 'STOPPED'):  # NO_MORE_TRIAL: the last trial still runs
                break
            time.sleep(2)
        self.seconds = time.monotonic() - started
        assert status == 'DONE', f'experiment status {status} after {self.seconds:.0f} s\n{self.trial_logs()}'

    def processes(self) -> list[psutil.Process]:
        """The NNI manager of this experiment and everything it started (tuner, trial keepers, trials), in /proc."""
        found = []
        for process in psutil.process_iter(['pid', 'cmdline', 'status']):
            try:
                cmdline = ' '.join(process.info['cmdline'] or [])
                environ = process.environ() if process.info['status'] != psutil.STATUS_ZOMBIE else {}
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if (f'--experiment-id {self.id}' in cmdline or str(self.working_dir) in cmdline
                    or f'nni-experiments/{self.id}/' in cmdline or environ.get('NNI_EXP_ID') == self.id):
                found.append(process)
        return found

    def stop(self) -> subprocess.CompletedProcess:
        self.stopped = True
        return subprocess.run([str(VENV_BIN / 'nnictl'), 'stop', self.id], env=self.env, capture_output=True,
                              text=True, timeout=90)

    def trial_log_paths(self) -> list[Path]:
        return sorted(self.trials_root.glob(f'{self.id}/environments/*/trials/*/trial.log'))

    def trial_logs(self) -> str:
        return '\n'.join(f'--- {path}\n' + path.read_text()[-3000:] for path in self.trial_log_paths())


class LoopbackSshServer:
    """Debian's ``sshd`` on a free loopback port, listening on 127.0.0.1 and 127.0.0.2 (two "machines"), letting
    in only this user with a throwaway key. Its sessions get ``home`` as ``HOME`` (so NNI's remote files stay in
    the test's folder) and ``PIP_NO_INDEX=1``: NNI's worker runs ``pip install nni --upgrade`` on every machine,
    which finds this venv's NNI 3.0 (the last release) installed without asking an index."""

    HOSTS = ('127.0.0.1', '127.0.0.2')

    def __init__(self, root: Path):
        install_debian_packages(['openssh-server'], ['/usr/sbin/sshd'])
        self.root = root
        self.user = getpass.getuser()
        self.home = root / 'remote_home'
        self.home.mkdir(parents=True)
        self.port = free_loopback_port()
        self.key = root / 'client_key'
        for key in (root / 'host_key', self.key):
            subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(key)], check=True)
        (root / 'authorized_keys').write_text(self.key.with_suffix('.pub').read_text())
        config = root / 'sshd_config'
        config.write_text('\n'.join([
            f'Port {self.port}', *(f'ListenAddress {host}' for host in self.HOSTS),
            f'HostKey {root / "host_key"}', f'AuthorizedKeysFile {root / "authorized_keys"}',
            f'PidFile {root / "sshd.pid"}', f'AllowUsers {self.user}', 'StrictModes no', 'UsePAM no',
            'PasswordAuthentication no', 'KbdInteractiveAuthentication no', 'PermitRootLogin prohibit-password',
            'Subsystem sftp internal-sftp', f'SetEnv HOME={self.home} PIP_NO_INDEX=1', '']))
        if os.geteuid() == 0:
            Path('/run/sshd').mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation folder
        self.log = root / 'sshd.log'
        self.process = subprocess.Popen(['/usr/sbin/sshd', '-D', '-f', str(config), '-E', str(self.log)])
        deadline = time.monotonic() + 20
        while not self.answers():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def answers(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex((self.HOSTS[-1], self.port)) == 0

    def machines(self) -> list[str]:
        """``launch.py --remote`` values, one per host."""
        return [f'{self.user}@{host}:{self.port}' for host in self.HOSTS]

    def close(self) -> None:
        """Stop ``sshd`` and remove the throwaway keys (the server's and the client's) and the key list."""
        self.process.terminate()
        self.process.wait(timeout=20)
        for key in ('host_key', 'client_key', 'authorized_keys'):
            for path in (self.root / key, self.root / f'{key}.pub'):
                path.unlink(missing_ok=True)
