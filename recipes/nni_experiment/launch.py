"""Launch the HMC hyperparameter search through NNI's Python API (``nni.experiment.Experiment``).

Loads ``config.yml`` (the same file ``nnictl create --config`` takes), runs the trials with this
interpreter, and by default waits for the experiment to finish, prints the Pareto front and keeps the
web UI open until Ctrl-C (which stops the experiment). ``--detach`` starts it and returns at once: stop it
later with ``nnictl stop ID``.

    .venv/bin/python recipes/nni_experiment/launch.py --port 8080 --max-trials 20
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from nni.experiment import Experiment, ExperimentConfig, RunMode

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
    parser.add_argument('--trial-args', default='', help="extra trial.py options, e.g. '--train-epochs 5 --threads 2'")
    parser.add_argument('--detach', action='store_true', help='start the experiment and return (stop it with nnictl stop ID)')
    parser.add_argument('--exit-when-done', action='store_true', help='stop the experiment once it is done')
    return parser


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    """``config.yml`` with the overrides from the command line and this interpreter as the trials' Python."""
    config = ExperimentConfig.load(args.config)
    if args.experiment_dir:
        config.experiment_working_directory = str(Path(args.experiment_dir).expanduser().resolve())
    cache_dir = Path(config.experiment_working_directory).expanduser() / 'hmc_cache'
    config.trial_command = ' '.join([shlex.quote(sys.executable), 'trial.py', '--cache-dir', shlex.quote(str(cache_dir)),
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
