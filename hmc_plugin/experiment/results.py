"""The finished trials of an NNI experiment over HMC, read through NNI's REST API, and their Pareto front
of test accuracy (higher is better) against FLOPs kept (lower is better).

A running experiment (``nnictl create`` or ``Experiment.run``/``start``) answers on its web UI port; a stopped
one is reopened read-only with NNI's ``view`` for as long as :func:`open_experiment` is active.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..errors import HMCError

__all__ = ['TrialOutcome', 'open_experiment', 'experiment_trials', 'pareto_front', 'format_front', 'plot_front']

_logger = logging.getLogger(__name__)

PARAMETER_COLUMNS = ('mode', 'margin', 'target_flops', 'importance', 'rank_method', 'finetune_epochs')


@dataclass(frozen=True)
class TrialOutcome:
    """One succeeded trial: its hyperparameters and its final result dict (``default`` = accuracy)."""

    trial_id: str
    parameters: dict[str, Any]
    metrics: dict[str, Any]


def _port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(('127.0.0.1', port)) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def open_experiment(experiment_id: str) -> Iterator[int]:
    """Yield the web UI port of experiment ``experiment_id``; a stopped experiment is viewed meanwhile.

    The experiment is looked up in NNI's manifest (``~/nni-experiments/.experiment``), as ``nnictl`` does.
    """
    from nni.experiment import Experiment
    from nni.tools.nnictl.config_utils import Experiments
    from nni.tools.nnictl.nnictl_utils import update_experiment

    update_experiment()  # marks experiments whose NNI manager died as STOPPED
    record = Experiments().get_all_experiments().get(experiment_id)
    if record is None:
        raise HMCError(f"experiment {experiment_id!r} is not in NNI's manifest (run `nnictl experiment list --all` "
                       f'to see the known ones)')
    if record.get('status') != 'STOPPED' and record.get('port') and _port_answers(int(record['port'])):
        yield int(record['port'])
        return
    experiment = Experiment(None, id=experiment_id)
    port = _free_port()
    _logger.info('Experiment %s is stopped: viewing it on port %d meanwhile', experiment_id, port)
    experiment.view(port=port, non_blocking=True)
    try:
        yield port
    finally:
        experiment.stop()


def experiment_trials(port: int) -> list[TrialOutcome]:
    """Succeeded trials with a final result, from the experiment answering on ``port`` (NNI's export data)."""
    from nni.experiment import Experiment

    experiment = Experiment(None)
    experiment.port = port  # what Experiment.connect sets, without its process lookup
    outcomes = []
    for record in experiment.export_data():
        metrics = record.value if isinstance(record.value, dict) else {'default': record.value}
        outcomes.append(TrialOutcome(record.trialJobId, dict(record.parameter), dict(metrics)))
    return outcomes


def pareto_front(outcomes: Sequence[TrialOutcome], accuracy_key: str = 'default',
                 cost_key: str = 'flops_kept') -> list[TrialOutcome]:
    """The trials no other trial beats on both accuracy (higher) and cost (lower), cheapest first.

    Among trials with equal cost and accuracy the first one listed is kept.
    """
    usable = [o for o in outcomes if isinstance(o.metrics.get(accuracy_key), (int, float))
              and isinstance(o.metrics.get(cost_key), (int, float))]
    ranked = sorted(usable, key=lambda o: (o.metrics[cost_key], -o.metrics[accuracy_key]))
    front: list[TrialOutcome] = []
    for outcome in ranked:
        if not front or outcome.metrics[accuracy_key] > front[-1].metrics[accuracy_key]:
            front.append(outcome)
    return front


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'{value:.4f}'
    return '-' if value is None else str(value)


def format_front(front: Sequence[TrialOutcome], accuracy_key: str = 'default', cost_key: str = 'flops_kept') -> str:
    """A text table of the front: metrics, then the hyperparameters that produced them."""
    metric_columns = [cost_key, accuracy_key, 'params_kept', 'latency_ms', 'speedup']
    header = ['trial'] + metric_columns + list(PARAMETER_COLUMNS)
    rows = [[o.trial_id] + [_cell(o.metrics.get(k)) for k in metric_columns]
            + [_cell(o.parameters.get(k) if k != 'margin' or o.parameters.get('mode') == 'hmc' else None)
               for k in PARAMETER_COLUMNS] for o in front]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    return '\n'.join([lines[0], '-' * len(lines[0])] + lines[1:])


def plot_front(outcomes: Sequence[TrialOutcome], front: Sequence[TrialOutcome], path: str | os.PathLike,
               accuracy_key: str = 'default', cost_key: str = 'flops_kept', title: str = '') -> None:
    """PNG: every trial as a dot coloured by mode, the front as a step line with trial IDs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    colours = plt.get_cmap('tab10')
    modes = sorted({str(o.parameters.get('mode')) for o in outcomes})
    for index, mode in enumerate(modes):
        points = [o for o in outcomes if str(o.parameters.get('mode')) == mode]
        ax.scatter([o.metrics[cost_key] for o in points], [o.metrics[accuracy_key] for o in points],
                   color=colours(index % 10), s=40, label=mode, zorder=3)
    if front:
        ax.step([o.metrics[cost_key] for o in front], [o.metrics[accuracy_key] for o in front], where='post',
                color='black', linewidth=1, label='Pareto front', zorder=2)
        for outcome in front:
            ax.annotate(outcome.trial_id, (outcome.metrics[cost_key], outcome.metrics[accuracy_key]),
                        textcoords='offset points', xytext=(4, -10), fontsize=7)
    ax.set_xlabel('FLOPs kept (fraction of the uncompressed model)' if cost_key == 'flops_kept' else cost_key)
    ax.set_ylabel('test accuracy after fine-tuning' if accuracy_key == 'default' else accuracy_key)
    ax.set_title(title or f'HMC trials: {len(outcomes)}, on the front: {len(front)}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
