"""Reports a person can read: the method comparison table, ``report.json``, ``report.md`` and ``pareto.png``,
and the one builder of their rows (``method_row``, ``uncompressed_row``).

``report.json`` is ``{"version": 1, "created": ISO date, "machine": str, "settings": {...},
"methods": [row, ...]}``; every row has the keys of ``ROW_KEYS`` (see README "report.json"). A table's
times and speed-ups come from one side-by-side timing (``latency_fields``), so that every ms it prints
divides into the speed-up it prints.
"""
from __future__ import annotations

import datetime
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..planning.plan import CompressionPlan
from ..utils.counting import count_flops, count_params
from ..utils.jsonio import write_json
from ..utils.timing import machine_description

__all__ = ['ROW_KEYS', 'LATENCY_KEYS', 'TABLE_COLUMNS', 'latency_fields', 'size_fields', 'method_row',
           'uncompressed_row', 'flops_kept', 'params_kept', 'speedup', 'paired_difference', 'format_table', 'markdown_table',
           'plot_pareto', 'write_report']

ROW_KEYS = ('model', 'mode', 'target_flops', 'params_before', 'params_after', 'flops_before', 'flops_after',
            'acc_before', 'acc_zero_shot', 'acc_after', 'latency_ms_before', 'latency_ms_after',
            'latency_ms_before_b64', 'latency_ms_after_b64', 'layers')

# Batch-1 and batch-64 CPU times (ms) of the original ("before") and the compressed model ("after").
LATENCY_KEYS = ('latency_ms_before', 'latency_ms_after', 'latency_ms_before_b64', 'latency_ms_after_b64')


def latency_fields(before_ms: float | None = None, after_ms: float | None = None, before_ms_b64: float | None = None,
                   after_ms_b64: float | None = None) -> dict[str, float | None]:
    """A row's ``LATENCY_KEYS`` from one side-by-side timing per batch size (``None``: not timed)."""
    return dict(zip(LATENCY_KEYS, (before_ms, after_ms, before_ms_b64, after_ms_b64)))


def size_fields(original: nn.Module, compressed: nn.Module, dummy_input: Any) -> dict[str, int]:
    """``params_before``/``params_after`` and ``flops_before``/``flops_after`` (MACs per ``dummy_input``)."""
    params, flops = count_params(original), count_flops(original, dummy_input)
    if compressed is original:
        return {'params_before': params, 'params_after': params, 'flops_before': flops, 'flops_after': flops}
    return {'params_before': params, 'params_after': count_params(compressed),
            'flops_before': flops, 'flops_after': count_flops(compressed, dummy_input)}


def _plan_layers(plan: CompressionPlan | None) -> list[dict[str, Any]]:
    if plan is None:
        return []
    return [{'name': layer.name, 'group': layer.group, 'prune_ratio': layer.prune_ratio,
             'ranks': list(layer.ranks) if layer.ranks else None} for layer in plan.layers]


def method_row(model_name: str, mode: str, original: nn.Module, compressed: nn.Module, dummy_input: Any, *,
               acc_before: float, acc_zero_shot: float, acc_after: float,
               latencies: dict[str, float | None] | None = None, target_flops: float | None = None,
               plan: CompressionPlan | None = None, **extra: Any) -> dict[str, Any]:
    """One report row (``ROW_KEYS``, plus ``groups`` when a ``plan`` is given, plus ``extra``).

    ``latencies``: ``latency_fields`` of a side-by-side timing of ``original`` and ``compressed`` (``None``:
    not timed yet; fill them in with ``row.update(latency_fields(...))``). Accuracies are fractions in [0, 1].
    """
    row: dict[str, Any] = {'model': model_name, 'mode': mode, 'target_flops': target_flops,
                           **size_fields(original, compressed, dummy_input),
                           'acc_before': acc_before, 'acc_zero_shot': acc_zero_shot, 'acc_after': acc_after,
                           **(latencies if latencies is not None else latency_fields()),
                           'layers': _plan_layers(plan)}
    if plan is not None:
        row['groups'] = plan.group_counts()
    row.update(extra)
    return row


def uncompressed_row(model_name: str, model: nn.Module, dummy_input: Any, *, accuracy: float,
                     latencies: dict[str, float | None] | None = None) -> dict[str, Any]:
    """The reference row: ``model`` as trained, its own "before" and "after"; ``latencies`` as ``method_row``'s
    (the original's times taken from the same timing as the method rows')."""
    return method_row(model_name, 'uncompressed', model, model, dummy_input, acc_before=accuracy,
                      acc_zero_shot=accuracy, acc_after=accuracy, latencies=latencies)


def flops_kept(row: dict[str, Any]) -> float:
    """The compressed model's FLOPs over the original's."""
    return row['flops_after'] / row['flops_before']


def params_kept(row: dict[str, Any]) -> float:
    """The compressed model's parameters over the original's."""
    return row['params_after'] / row['params_before']


def speedup(row: dict[str, Any], batch: int = 1) -> float | None:
    """Original time over compressed time at batch 1 or 64, from the row's side-by-side timing (None: untimed)."""
    suffix = '' if batch == 1 else f'_b{batch}'
    before, after = row.get(f'latency_ms_before{suffix}'), row.get(f'latency_ms_after{suffix}')
    return None if before is None or after is None else before / after


def paired_difference(correct: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean per-image accuracy difference ``correct - reference`` (bool tensors (N,), the same images), in percentage
    points, with its 95 % interval (1.96 standard errors of the N per-image differences)."""
    if correct.shape != reference.shape or correct.ndim != 1 or len(correct) == 0:
        raise ValueError(f'paired_difference needs two (N,) tensors over the same images, got {tuple(correct.shape)} '
                         f'and {tuple(reference.shape)}')
    difference = correct.double() - reference.double()
    mean = float(difference.mean()) * 100
    half = 1.96 * float(difference.std()) / math.sqrt(len(difference)) * 100 if len(difference) > 1 else 0.0
    return {'mean_pp': mean, 'low_pp': mean - half, 'high_pp': mean + half, 'images': len(difference)}


# (header, row key, format)
TABLE_COLUMNS = (
    ('method', 'mode', '{}'),
    ('params', 'params_after', '{:,}'),
    ('FLOPs (MACs)', 'flops_after', '{:,}'),
    ('FLOPs kept', 'flops_kept', '{:.3f}'),
    ('lat b1 ms', 'latency_ms_after', '{:.2f}'),
    ('lat b64 ms', 'latency_ms_after_b64', '{:.1f}'),
    ('speed-up b1', 'speedup_b1', '{:.2f}x'),
    ('speed-up b64', 'speedup_b64', '{:.2f}x'),
    ('speed-up / FLOPs red. b1', 'speedup_per_flops_b1', '{:.2f}'),
    ('speed-up / FLOPs red. b64', 'speedup_per_flops_b64', '{:.2f}'),
    ('latency kept pred. / meas.', 'latency_budget', '{}'),
    ('acc zero-shot', 'acc_zero_shot', '{:.4f}'),
    ('acc fine-tuned', 'acc_after', '{:.4f}'),
    ('fine-tuned − prune, pp [95 % CI]', 'paired_vs_prune', '{}'),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key == 'flops_kept':
        value = flops_kept(row)
    elif key.startswith('speedup_'):  # before / after, measured side by side
        value = speedup(row, 1 if key.endswith('_b1') else 64)
        if value is not None and key.startswith('speedup_per_flops'):
            value *= flops_kept(row)  # over the FLOPs reduction (1 / kept): 1 = FLOPs tell the truth
    elif key == 'latency_budget':  # the latency budget's fractions (target_latency runs only)
        budget = row.get('latency_budget')
        value = None if not budget else '{:.3f} / {:.3f} (b{})'.format(budget['predicted'], budget['measured'],
                                                                       budget['batch'])
    elif key == 'paired_vs_prune':  # hmc report with prune among the methods (workflow.compare_methods)
        paired = row.get('paired_vs_prune')
        value = None if not paired else '{:+.1f} [{:+.1f}, {:+.1f}]'.format(paired['mean_pp'], paired['low_pp'],
                                                                          paired['high_pp'])
    else:
        value = row.get(key)
    return '-' if value is None else fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The comparison table: one line per method."""
    header = [column[0] for column in TABLE_COLUMNS]
    cells = [[_cell(row, key, fmt) for _, key, fmt in TABLE_COLUMNS] for row in rows]
    if markdown:
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
        return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in cells])
    widths = [max(len(r[i]) for r in [header] + cells) for i in range(len(header))]
    lines = ['  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header] + cells]
    return '\n'.join([lines[0], '-' * len(lines[0])] + lines[1:])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table of already formatted cells (``|`` inside a cell is escaped)."""
    def line(cells):
        return '| ' + ' | '.join(str(cell).replace('|', '\\|') for cell in cells) + ' |'
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f'every row needs {len(header)} cells: {header}')
    return '\n'.join([line(header), '|' + '|'.join('---' for _ in header) + '|'] + [line(row) for row in rows])


def plot_pareto(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Accuracy (fine-tuned, and zero-shot hollow) against FLOPs kept, one colour per method."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colours = plt.get_cmap('tab10')
    methods = list(dict.fromkeys(row['mode'] for row in rows))
    for row in rows:
        colour = colours(methods.index(row['mode']) % 10)
        kept = flops_kept(row)
        ax.scatter([kept], [row['acc_after']], color=colour, s=50,
                   label=row['mode'] if row['mode'] not in ax.get_legend_handles_labels()[1] else None)
        if row.get('acc_zero_shot') is not None and row['mode'] != 'uncompressed':
            ax.scatter([kept], [row['acc_zero_shot']], facecolors='none', edgecolors=colour, s=50)
    ax.set_xlabel('FLOPs kept (fraction of the original)')
    ax.set_ylabel('test accuracy')
    ax.set_title('Accuracy against FLOPs (filled: fine-tuned, hollow: zero-shot)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _budget_text(settings: dict[str, Any]) -> str:
    for key in ('target_latency', 'target_flops', 'target_params'):
        if settings.get(key) is not None:
            extra = f' at batch {settings.get("latency_batch", 1)}' if key == 'target_latency' else ''
            return f'{key}={settings[key]}{extra}'
    return 'none'


def write_report(out_dir: str | os.PathLike, rows: Sequence[dict[str, Any]], settings: dict[str, Any],
                 commands: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``pareto.png`` into ``out_dir``; return the JSON object."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f'report row {row.get("mode")} lacks keys {missing}')
    report = {'version': 1, 'created': datetime.datetime.now().isoformat(timespec='seconds'),
              'machine': machine_description(), 'settings': settings, 'methods': list(rows)}
    write_json(report, out / 'report.json')
    plot_pareto(rows, out / 'pareto.png')
    md = [f'# HMC report: {settings.get("model")} on {settings.get("data")}', '',
          f'Created {report["created"]} on {report["machine"]}.', '',
          f'Budget: {_budget_text(settings)}; fine-tuning: {settings.get("finetune_epochs")} '
          f'epoch(s) per method; latency: median of repeated CPU runs, {settings.get("threads")} threads, '
          f'{settings.get("latency_backend", "torch")}.', '',
          format_table(rows, markdown=True), '',
          '![accuracy against FLOPs](pareto.png)', '', '![sensitivity](sensitivity.png)', '']
    if commands:
        md += ['Produced by:', '', '```bash', *commands, '```', '']
    (out / 'report.md').write_text('\n'.join(md))
    return report
