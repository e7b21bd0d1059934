"""recipes/configs/README.md is the table of every config key, generated from the settings objects."""
from pathlib import Path

from hmc_plugin.app.config_keys import config_keys_markdown
from hmc_plugin.app.run_settings import RunSettings
from hmc_plugin.settings import HMCSettings

TABLE = Path(__file__).resolve().parents[1] / 'recipes' / 'configs' / 'README.md'


def test_the_config_key_table_matches_the_code():
    assert TABLE.read_text() == config_keys_markdown(), (
        'recipes/configs/README.md is out of date: run `.venv/bin/python -m hmc_plugin.app.config_keys > '
        'recipes/configs/README.md`')


def test_the_table_lists_every_key_with_its_default():
    text = TABLE.read_text()
    for key, default, _, _ in HMCSettings.table():
        assert f'| `{key}` | {default} |' in text
    for key in RunSettings.run_keys():
        assert f'| `{key}` |' in text
