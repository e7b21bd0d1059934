"""Scans shared across a search space: the pruning half keyed by the importance, the decomposition half by the
rank method, so 2 importances x 2 rank methods scan 4 halves, not 4 whole scans, and merge to the whole scan."""
import pytest
import torch

from hmc_plugin.app.data import load_digits_data
from hmc_plugin.app.run_settings import RunSettings
from hmc_plugin.app.workflow import make_compressor
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.experiment.shared_cache import SharedCache
from hmc_plugin.sensitivity.halves import merge_halves

from .toy_models import Chain

pytestmark = pytest.mark.slow  # six small scans through the compressor: about a minute on two busy cores


@pytest.fixture(scope='module')
def digits():
    return load_digits_data(image_size=16)


def _settings(importance, rank_method):
    return RunSettings(model='chain', importance=importance, rank_method=rank_method, levels=(0.3, 0.6),
                       calibration_size=32, bn_batches=1, fit_batches=1, batch_size=32, target_flops=0.5)


def test_two_importances_by_two_rank_methods_scan_four_halves(digits, tmp_path):
    torch.manual_seed(0)
    model = Chain().eval()
    cache = SharedCache(tmp_path)
    results = {}
    for importance in ('l1', 'l2'):
        for rank_method in ('auto', 'svd'):
            results[importance, rank_method] = cache.scan(model, digits, _settings(importance, rank_method))
    scanned = [(key, part) for key, result in results.items() for part in result.scanned]
    assert scanned == [(('l1', 'auto'), 'prune'), (('l1', 'auto'), 'decompose'), (('l1', 'svd'), 'decompose'),
                       (('l2', 'auto'), 'prune')]
    assert results['l2', 'svd'].reused and len(list((tmp_path / 'scans').glob('*.json'))) == 4
    crossed = results['l2', 'svd'].table
    assert crossed.prune == results['l2', 'auto'].table.prune and crossed.prune != results['l1', 'svd'].table.prune
    assert crossed.decompose == results['l1', 'svd'].table.decompose
    assert crossed.decompose != results['l2', 'auto'].table.decompose
    assert crossed.settings['importance'] == 'l2' and crossed.settings['rank_method'] == 'svd'


def test_merged_halves_equal_the_whole_scan(digits, tmp_path):
    torch.manual_seed(0)
    model = Chain().eval()
    settings = _settings('l2', 'svd')
    merged = SharedCache(tmp_path).scan(model, digits, settings).table
    compressor = make_compressor(model, digits, settings, 'nahc', progress=False)
    try:
        whole = compressor.scan()
    finally:
        compressor.unwrap_model()
    assert merged.groups == whole.groups and sorted(merged.decompose) == sorted(whole.decompose)
    for operator in ('prune', 'decompose'):
        for name, drops in getattr(whole, operator).items():
            assert getattr(merged, operator)[name] == pytest.approx(drops, rel=1e-6, abs=1e-12)


def test_halves_of_other_levels_are_refused(digits, tmp_path):
    torch.manual_seed(0)
    model = Chain().eval()
    halves = []
    for levels, part in (((0.3, 0.6), 'prune'), ((0.5,), 'decompose')):
        compressor = make_compressor(model, digits, _settings('l1', 'auto').replace(levels=levels), 'nahc',
                                     progress=False)
        try:
            halves.append(compressor.scan(part))
        finally:
            compressor.unwrap_model()
    assert not halves[0].decompose and not halves[1].prune
    with pytest.raises(HMCConfigError, match='same levels and mode'):
        merge_halves(*halves)
