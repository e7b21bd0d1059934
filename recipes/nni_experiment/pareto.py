"""Print the Pareto front (test accuracy against FLOPs kept) of an NNI experiment's HMC trials and draw it.

Reads the succeeded trials through NNI's REST API: of the running experiment on ``--port``, or of
``--experiment-id`` (looked up in NNI's manifest like ``nnictl`` does; a stopped experiment is reopened
with NNI's view mode while it is read).

    .venv/bin/python recipes/nni_experiment/pareto.py --experiment-id ID --out pareto.png
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from hmc_plugin.errors import HMCError
from hmc_plugin.experiment.results import experiment_trials, format_front, open_experiment, pareto_front, plot_front


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--experiment-id', help='NNI experiment ID (nnictl experiment list --all)')
    source.add_argument('--port', type=int, help='web UI port of a running experiment')
    parser.add_argument('--out', help='PNG to write (default pareto_<ID>.png)')
    parser.add_argument('--accuracy-key', default='default', help="final-result key to maximise (default 'default')")
    parser.add_argument('--cost-key', default='flops_kept', help="final-result key to minimise (default 'flops_kept')")
    args = parser.parse_args(argv)
    try:
        opened = open_experiment(args.experiment_id) if args.experiment_id else contextlib.nullcontext(args.port)
        with opened as port:
            outcomes = experiment_trials(port)
    except HMCError as error:
        print(f'pareto.py: error: {error}', file=sys.stderr)
        return 2
    if not outcomes:
        print('pareto.py: error: no succeeded trial with a final result yet', file=sys.stderr)
        return 1
    front = pareto_front(outcomes, args.accuracy_key, args.cost_key)
    best = max(outcomes, key=lambda outcome: outcome.metrics.get(args.accuracy_key, float('-inf')))
    print(f'{len(outcomes)} succeeded trials; {len(front)} on the Pareto front ({args.accuracy_key} up, {args.cost_key} down):\n')
    print(format_front(front, args.accuracy_key, args.cost_key))
    print(f'\nBest {args.accuracy_key}: trial {best.trial_id}, {best.metrics[args.accuracy_key]:.4f} at '
          f'{args.cost_key} {best.metrics.get(args.cost_key, float("nan")):.4f}, hyperparameters {best.parameters}')
    out = args.out or f'pareto_{args.experiment_id or args.port}.png'
    plot_front(outcomes, front, out, args.accuracy_key, args.cost_key)
    print(f'Wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
