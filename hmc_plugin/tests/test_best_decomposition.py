"""``rank_method='best'``: the scan tries Tucker-2 and SVD on every kxk conv, keeps the curve that drops less, and
the plan decomposes each layer by the method its curve came from, at the FLOPs the budget asks for."""
from __future__ import annotations

import copy

import pytest
import torch

from hmc_plugin.app.models import resnet20
from hmc_plugin.apply import DataFit, apply_plan
from hmc_plugin.engines.lowrank import SVDConv2d, Tucker2Conv2d
from hmc_plugin.engines.pruning import find_pruning_groups
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.planning.targets import plan_for_target
from hmc_plugin.sensitivity.scan import best_decompositions, scan_sensitivity
from hmc_plugin.sensitivity.table import SensitivityTable
from hmc_plugin.utils.counting import count_flops
from hmc_plugin.utils.fingerprint import model_fingerprint

LEVELS = (0.3, 0.6)


def _layers(model):
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]


@pytest.fixture(scope='module')
def scanned(tmp_path_factory):
    """ResNet-20 (seeded, random BN affine parameters) scanned with 'best', 'auto' and 'svd' on random images."""
    torch.manual_seed(0)
    model = resnet20()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.1, 0.1)
    model.eval()
    tmp_path = tmp_path_factory.mktemp('best')
    torch.manual_seed(1)
    dummy = torch.zeros(1, 3, 32, 32)
    calibration = torch.randn(32, 3, 32, 32)
    groups = find_pruning_groups(model, dummy)
    data = DataFit(batches=(calibration[:16], calibration[16:]))
    before = model_fingerprint(model)
    scan = lambda method, path=None: scan_sensitivity(  # noqa: E731
        model, dummy, groups=groups, layers=_layers(model), mode='proxy', calibration_inputs=calibration,
        levels=LEVELS, rank_method=method, cache_path=path, progress=False, data=data)
    best = scan('best', tmp_path / 'scan.json')
    assert model_fingerprint(model) == before
    return {'model': model, 'best': best, 'tucker2': scan('auto'), 'svd': scan('svd'), 'dummy': dummy, 'groups': groups,
            'calibration': calibration, 'data': data, 'cache': tmp_path}


def test_best_keeps_the_lower_curve_of_each_kxk_conv(scanned):
    model, best, tucker2, svd = scanned['model'], scanned['best'], scanned['tucker2'], scanned['svd']
    kxk = [name for name in _layers(model) if model.get_submodule(name).kernel_size != (1, 1)]
    assert sorted(best.decompose_methods) == sorted(kxk)
    for name in kxk:
        lower = min(('tucker2', tucker2), ('svd', svd), key=lambda item: item[1].mean_drop('decompose', name))
        assert best.decompose_methods[name] == lower[0]
        assert best.decompose[name] == pytest.approx(lower[1].decompose[name], rel=1e-9)
    assert best.prune.keys() == tucker2.prune.keys()
    assert all(best.prune[name] == pytest.approx(tucker2.prune[name], rel=1e-9) for name in best.prune)
    assert set(best.decompose_methods.values()) == {'tucker2', 'svd'}, 'both methods should win somewhere here'
    assert best.settings['rank_method'] == 'best' and best.is_complete()
    # both halves are cached beside the table's path: a rerun resumes them
    assert sorted(path.name for path in scanned['cache'].iterdir() if path.suffix == '.json') == \
        ['scan.auto.json', 'scan.svd.json']


def test_a_plan_from_a_best_scan_decomposes_each_layer_by_its_method(scanned):
    model, best, dummy = scanned['model'], scanned['best'], scanned['dummy']
    plan, kept = plan_for_target(best, model, dummy, scanned['groups'], mode='decompose', target_flops=0.5,
                                 rank_method='best')
    assert abs(kept - 0.5) <= 0.01
    assert plan.ranks and all(plan.methods[name] == best.decompose_methods.get(name, 'svd') for name in plan.ranks)
    compressed = apply_plan(copy.deepcopy(model), plan, dummy, speedup='torch_pruning', data=scanned['data'])
    modules = dict(compressed.named_modules())
    for name, method in plan.methods.items():
        assert isinstance(modules[name], {'svd': SVDConv2d, 'tucker2': Tucker2Conv2d}[method]), (name, method)
    assert count_flops(compressed, dummy) / count_flops(model, dummy) == pytest.approx(kept, abs=1e-6)
    assert compressed(scanned['calibration'][:2]).shape == (2, 10)
    # the table's choice survives its JSON round trip
    assert SensitivityTable.from_json(best.to_json()).decompose_methods == best.decompose_methods


def test_best_refuses_scans_at_other_levels(scanned):
    other = copy.deepcopy(scanned['svd'])
    other.levels = [0.2, 0.4]
    with pytest.raises(HMCConfigError, match='same levels'):
        best_decompositions(scanned['tucker2'], other)


def test_hmc_compressor_takes_best_from_the_config_list(scanned):
    """The NNI path: ``'rank_method': 'best'`` in a config_list scans both decompositions and applies the choice."""
    from hmc_plugin import HMCCompressor

    model, dummy = scanned['model'], scanned['dummy']
    before = model_fingerprint(model)
    compressor = HMCCompressor(model, [{'op_types': ['Conv2d'], 'mode': 'decompose', 'target_flops': 0.5,
                                        'rank_method': 'best', 'levels': list(LEVELS)}], dummy_input=dummy,
                               calibration_inputs=scanned['calibration'], progress=False, speedup='torch_pruning')
    compressed, _ = compressor.compress()
    assert model_fingerprint(model) == before
    chosen = compressor.sensitivity.decompose_methods
    assert chosen and compressor.plan.ranks
    assert all(compressor.plan.methods[name] == chosen.get(name, 'svd') for name in compressor.plan.ranks)
    modules = dict(compressed.named_modules())
    assert all(isinstance(modules[name], {'svd': SVDConv2d, 'tucker2': Tucker2Conv2d}[method])
               for name, method in compressor.plan.methods.items())
