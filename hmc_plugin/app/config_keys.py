"""The table of every config key, generated from ``HMCSettings`` and ``RunSettings`` (``recipes/configs/README.md``).

Regenerate with ``.venv/bin/python -m hmc_plugin.app.config_keys > recipes/configs/README.md``;
``integration_tests/test_config_keys.py`` fails when the file and the code disagree.
"""
from __future__ import annotations

import dataclasses

from ..nni_api.config import NNI_KEYS
from ..settings import HMCSettings
from .run_settings import DEFAULT_BUDGET, RUN_KEY_HELP, RunSettings

__all__ = ['config_keys_markdown']

NNI_KEY_HELP = {
    'op_types': 'layer types to select, e.g. ["Conv2d"]', 'op_names': 'layer names to select',
    'op_names_re': 'regular expressions of layer names to select', 'exclude_op_names': 'layer names to leave out',
    'exclude_op_types': 'layer types to leave out', 'exclude_op_names_re': 'regular expressions of names to leave out',
    'max_sparse_ratio': 'the largest fraction of channels pruned in the selected layers',
}


def _row(cells) -> str:
    return '| ' + ' | '.join(str(cell).replace('|', '\\|') for cell in cells) + ' |'


def config_keys_markdown() -> str:
    """The Markdown of ``recipes/configs/README.md``."""
    lines = ['# Config keys', '', 'Generated from the code by `.venv/bin/python -m hmc_plugin.app.config_keys > '
             'recipes/configs/README.md` (`integration_tests/test_config_keys.py` checks it).', '',
             "## HMC's keys (`hmc_plugin.settings.HMCSettings`)", '',
             'In an NNI `config_list` entry, as `HMCCompressor(..., key=value)`, in a `--config` YAML file of the '
             '`hmc` command and, where a flag exists, as `--key-with-dashes`. Exactly one budget '
             f'(`target_flops`, `target_params`, `target_latency`); a run of the `hmc` command that names none keeps '
             f"{', '.join(f'`{key}: {value}`' for key, value in DEFAULT_BUDGET.items())}.", '',
             _row(('key', 'default', 'allowed', 'meaning')), _row(('---',) * 4)]
    lines += [_row((f'`{key}`', default, allowed, meaning)) for key, default, allowed, meaning in HMCSettings.table()]
    lines += ['', "## NNI's selection keys (a `config_list` entry)", '', _row(('key', 'meaning')), _row(('---',) * 2)]
    lines += [_row((f'`{key}`', NNI_KEY_HELP[key])) for key in NNI_KEYS]
    lines += ['', '## Run keys (`hmc_plugin.app.run_settings.RunSettings`)', '',
              'In a `--config` YAML file of the `hmc` command (see the files beside this one) and as flags.', '',
              _row(('key', 'default', 'meaning')), _row(('---',) * 3)]
    for spec in dataclasses.fields(RunSettings):
        if spec.name != 'hmc':
            default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
            shown = 'not set' if default is None else repr(list(default) if isinstance(default, tuple) else default)
            lines.append(_row((f'`{spec.name}`', shown, RUN_KEY_HELP[spec.name])))
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    print(config_keys_markdown(), end='')
