"""Launch the HMC hyperparameter search through NNI's Python API (``nni.experiment.Experiment``).

Loads ``config.yml`` (the same file ``nnictl create --config`` takes), runs the trials with this
interpreter, and by default waits for the experiment to finish, prints the Pareto front and keeps the
web UI open until Ctrl-C (which stops the experiment). ``--detach`` starts it and returns at once: stop it
later with ``nnictl stop ID``. ``--remote USER@HOST[:PORT]`` (repeatable) runs the trials on those machines
over SSH instead (NNI's ``remote`` training service), with a ``--cache-dir`` they all reach.

    .venv/bin/python recipes/nni_experiment/launch.py --port 8080 --max-trials 20
    .venv/bin/python recipes/nni_experiment/launch.py --remote me@10.0.0.2 --remote me@10.0.0.3 \
        --ssh-key ~/.ssh/id_ed25519 --nni-manager-ip 10.0.0.1 --cache-dir /shared/hmc_cache --concurrency 2
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from nni.experiment import Experiment, ExperimentConfig, RemoteConfig, RemoteMachineConfig, RunMode

HERE = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=str(HERE / 'config.yml'), help='nnictl experiment config (default config.yml here)')
    parser.add_argument('--port', type=int, default=8080, help='web UI and REST API port (default 8080)')
    parser.add_argument('--max-trials', type=int, help="maximum number of trials (default: the config's)")
    parser.add_argument('--concurrency', type=int, help="trials run at once (default: the config's)")
    parser.add_argument('--search-space', help="JSON search space file (default: the config's)")
    parser.add_argument('--tuner', help="NNI tuner name, e.g. TPE, Random, GridSearch (default: the config's)")
    parser.add_argument('--experiment-dir', help="NNI's experiment working directory (default: the config's, "
                                                 '~/nni-experiments); the shared cache goes in its hmc_cache/')
    parser.add_argument('--cache-dir', help='baselines and scans shared by the trials (default: hmc_cache/ in the '
                                            'experiment directory); with --remote, a folder every machine reaches')
    parser.add_argument('--trial-args', default='', help="extra trial.py options, e.g. '--train-epochs 5 --threads 2'")
    remote = parser.add_argument_group('remote machines (NNI\'s remote training service over SSH)')
    remote.add_argument('--remote', action='append', metavar='USER@HOST[:PORT]', type=remote_machine,
                        help='run the trials on this machine over SSH (repeat for more machines)')
    remote.add_argument('--ssh-key', default='~/.ssh/id_rsa', help='private key for every --remote machine '
                                                                   '(default ~/.ssh/id_rsa)')
    remote.add_argument('--remote-python', default=str(Path(sys.executable).parent),
                        help="folder of the python with hmc_plugin installed on the machines (default: this "
                             "interpreter's folder, i.e. the same path there)")
    remote.add_argument('--nni-manager-ip', help="address at which the machines reach this one (default: NNI's guess)")
    parser.add_argument('--detach', action='store_true', help='start the experiment and return (stop it with nnictl stop ID)')
    parser.add_argument('--exit-when-done', action='store_true', help='stop the experiment once it is done')
    return parser


def remote_machine(spec: str) -> dict:
    """``'USER@HOST[:PORT]'`` -> ``{'user', 'host', 'port'}`` (port 22 by default)."""
    user, at, address = spec.rpartition('@')
    host, colon, port = address.partition(':')
    if not (at and user and host) or (colon and not port.isdigit()):
        raise argparse.ArgumentTypeError(f'expected USER@HOST or USER@HOST:PORT, got {spec!r}')
    return {'user': user, 'host': host, 'port': int(port) if colon else 22}


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    """``config.yml`` with the overrides from the command line; the trials run this interpreter locally, or the
    ``--remote-python`` one on each ``--remote`` machine."""
    config = ExperimentConfig.load(args.config)
    if args.experiment_dir:
        config.experiment_working_directory = str(Path(args.experiment_dir).expanduser().resolve())
    cache_dir = args.cache_dir or Path(config.experiment_working_directory).expanduser() / 'hmc_cache'
    python = shlex.quote(sys.executable)
    if args.remote:  # NNI puts --remote-python first on each machine's PATH
        config.training_service = RemoteConfig(machine_list=[
            RemoteMachineConfig(**machine, ssh_key_file=str(Path(args.ssh_key).expanduser()),
                                python_path=args.remote_python) for machine in args.remote])
        if args.nni_manager_ip:
            config.nni_manager_ip = args.nni_manager_ip
        python = 'python'
    config.trial_command = ' '.join([python, 'trial.py', '--cache-dir', shlex.quote(str(cache_dir)),
                                     args.trial_args]).strip()
    if args.search_space:
        config.search_space = json.loads(Path(args.search_space).read_text())
        config.search_space_file = None
    if args.max_trials is not None:
        config.max_trial_number = args.max_trials
    if args.concurrency is not None:
        config.trial_concurrency = args.concurrency
    if args.tuner:
        config.tuner.name = args.tuner  # keeps the config's classArgs (optimize_mode: maximize)
    return config


def print_pareto(experiment: Experiment) -> None:
    from hmc_plugin.experiment.results import experiment_trials, format_front, pareto_front, plot_front

    outcomes = experiment_trials(experiment.port)
    front = pareto_front(outcomes)
    print(f'\n{len(outcomes)} trials succeeded; Pareto front (test accuracy against FLOPs kept):\n')
    print(format_front(front))
    png = Path(experiment.config.experiment_working_directory).expanduser() / experiment.id / 'pareto.png'
    plot_front(outcomes, front, png)
    print(f'\nWrote {png}')


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    experiment = Experiment(experiment_config(args))
    if args.detach:
        experiment.start(args.port, run_mode=RunMode.Detach)
        print(f'Experiment {experiment.id} started: web UI http://127.0.0.1:{args.port}; '
              f'stop it with `nnictl stop {experiment.id}`')
        return 0
    succeeded = experiment.run(args.port)  # blocks until the experiment is done (or fails)
    if succeeded is None:  # Ctrl-C: NNI stopped the experiment already
        return 1
    try:
        print_pareto(experiment)
        if not args.exit_when_done:
            print(f'Web UI: http://127.0.0.1:{args.port}  (Ctrl-C stops the experiment)')
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        experiment.stop()
    return 0 if succeeded else 1


if __name__ == '__main__':
    sys.exit(main())
