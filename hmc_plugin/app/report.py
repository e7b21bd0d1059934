"""Reports a person can read: the method comparison table, ``report.json``, ``report.md`` and ``pareto.png``.

``report.json`` is ``{"version": 1, "created": ISO date, "machine": str, "settings": {...},
"methods": [row, ...]}``; every row has the keys of ``ROW_KEYS`` (see README "report.json").
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..utils.timing import machine_description

__all__ = ['ROW_KEYS', 'TABLE_COLUMNS', 'format_table', 'markdown_table', 'plot_pareto', 'write_report']

ROW_KEYS = ('model', 'mode', 'target_flops', 'params_before', 'params_after', 'flops_before', 'flops_after',
            'acc_before', 'acc_zero_shot', 'acc_after', 'latency_ms_before', 'latency_ms_after',
            'latency_ms_before_b64', 'latency_ms_after_b64', 'layers')


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
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key == 'flops_kept':
        value = row['flops_after'] / row['flops_before']
    elif key.startswith('speedup_'):  # before / after, measured side by side
        suffix = '' if key.endswith('_b1') else '_b64'
        value = row[f'latency_ms_before{suffix}'] / row[f'latency_ms_after{suffix}']
        if key.startswith('speedup_per_flops'):  # real speed-up over FLOPs reduction: 1 = FLOPs tell the truth
            value /= row['flops_before'] / row['flops_after']
    elif key == 'latency_budget':  # the latency budget's fractions (target_latency runs only)
        budget = row.get('latency_budget')
        value = None if not budget else '{:.3f} / {:.3f} (b{})'.format(budget['predicted'], budget['measured'],
                                                                       budget['batch'])
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
        kept = row['flops_after'] / row['flops_before']
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
    (out / 'report.json').write_text(json.dumps(report, indent=1))
    plot_pareto(rows, out / 'pareto.png')
    md = [f'# HMC report: {settings.get("model")} on {settings.get("data")}', '',
          f'Created {report["created"]} on {report["machine"]}.', '',
          f'Budget: {_budget_text(settings)}; fine-tuning: {settings.get("finetune_epochs")} '
          f'epoch(s) per method; latency: median of repeated CPU runs, {settings.get("threads")} threads.', '',
          format_table(rows, markdown=True), '',
          '![accuracy against FLOPs](pareto.png)', '', '![sensitivity](sensitivity.png)', '']
    if commands:
        md += ['Produced by:', '', '```bash', *commands, '```', '']
    (out / 'report.md').write_text('\n'.join(md))
    return report
