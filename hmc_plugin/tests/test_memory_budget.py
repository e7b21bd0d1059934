"""memory_budget: the Fisher pass and the moment passes in chunks give the same results, chunks follow the budget,
and a budget too small for one image fails before anything runs."""
import copy

import pytest
import torch
from torch import nn

from hmc_plugin.app.models import resnet20
from hmc_plugin.engines import moments as moments_module
from hmc_plugin.engines.datafit import DataFit
from hmc_plugin.engines.lowrank import low_rank_weight
from hmc_plugin.engines.moments import collect_moments
from hmc_plugin.engines.pruning import find_pruning_groups, group_channel_masks
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.sensitivity.fisher import FisherChunks, fisher_chunks, fisher_drops
from hmc_plugin.sensitivity.scan import scan_sensitivity
from hmc_plugin.settings import HMCSettings
from hmc_plugin.utils.fingerprint import model_fingerprint
from hmc_plugin.utils.memory import activation_bytes, budget_bytes

RELATIVE = 1e-6


def _assert_close(chunked: dict, whole: dict) -> None:
    assert chunked.keys() == whole.keys()
    for name, drops in whole.items():
        assert chunked[name] == pytest.approx(drops, rel=RELATIVE, abs=1e-12), name


@pytest.mark.parametrize('projections', [4, 10])  # Hutchinson's signs (10 classes > 4), every class row
def test_the_fisher_pass_in_chunks_gives_the_drops_of_one_pass(model_and_inputs, projections):
    model, inputs = model_and_inputs
    groups = find_pruning_groups(model, inputs[:1])
    prune_masks = {group.name: [group_channel_masks(model, inputs[:1], {group.name: level})[group.name]
                                for level in (0.25, 0.5)] for group in groups[:3]}
    conv = model.layer2[0].conv1
    weight_changes = {'layer2.0.conv1': [low_rank_weight(conv, f'flops:{keep}') - conv.weight.detach()
                                         for keep in (0.75, 0.5)]}
    refit = {groups[3].name: [{'layer3.0.conv1': -0.1 * model.layer3[0].conv1.weight.detach()}]}
    kwargs = dict(prune_masks=prune_masks, weight_changes=weight_changes, prune_weight_changes=refit,
                  projections=projections, progress=False)
    whole = fisher_drops(model, inputs, chunks=FisherChunks(samples=16, directions=projections, pass_bytes=0),
                         **kwargs)
    for chunks in (FisherChunks(samples=5, directions=projections, pass_bytes=0),   # uneven chunks of the batch
                   FisherChunks(samples=1, directions=3, pass_bytes=0)):             # projections split as well
        chunked = fisher_drops(model, inputs, chunks=chunks, **kwargs)
        for part, reference in zip(chunked, whole):
            _assert_close(part, reference)
    assert all(value > 0 for drops in whole[0].values() for value in drops)


def test_the_scan_table_is_the_same_with_and_without_chunking(model_and_inputs):
    # float64, so that each entry, even a drop 1e-5 of the largest, is compared at 1e-6 relative: in float32 the
    # convolutions of a 16-image and a 1-image batch round differently, by about 1e-7 of the largest drop
    model, inputs = model_and_inputs
    model, inputs = copy.deepcopy(model).double(), inputs.double()
    groups = find_pruning_groups(model, inputs[:1])
    layers = ['layer1.0.conv1', 'layer2.1.conv2', 'layer3.2.conv1', 'fc']
    data = DataFit(batches=(inputs[:8], inputs[8:]))
    kwargs = dict(groups=groups, layers=layers, calibration_inputs=inputs, levels=(0.25, 0.5), progress=False,
                  data=data)
    before = model_fingerprint(model)
    assert fisher_chunks(model, inputs, memory_budget=8, levels=2).samples < len(inputs)  # 8 MiB: it chunks
    small = scan_sensitivity(model, inputs[:1], memory_budget=8, **kwargs)
    large = scan_sensitivity(model, inputs[:1], memory_budget=4096, **kwargs)
    assert model_fingerprint(model) == before
    _assert_close(small.prune, large.prune)
    _assert_close(small.decompose, large.decompose)


def test_chunks_grow_with_the_budget_and_stay_inside_it(model_and_inputs):
    model, inputs = model_and_inputs
    total, largest = activation_bytes(model, (inputs[:1],))
    assert 0 < largest < total
    previous = None
    for budget in (4, 6, 16, 64, 4096):
        chunks = fisher_chunks(model, inputs, memory_budget=budget, levels=4)
        assert chunks.pass_bytes <= budget_bytes(budget)
        assert 1 <= chunks.samples <= len(inputs) and 1 <= chunks.directions <= 4
        if previous is not None:
            assert (chunks.samples, chunks.directions) >= (previous.samples, previous.directions)
        previous = chunks
    assert (previous.samples, previous.directions) == (len(inputs), 4)  # a large budget: one pass
    assert budget_bytes(None) >= 256 * 2 ** 20  # automatic: at least MIN_AUTO_BUDGET_MIB


def test_a_budget_too_small_for_one_image_fails_before_the_scan_naming_the_setting():
    torch.manual_seed(0)
    model = resnet20(num_classes=10).eval()
    inputs = torch.randn(4, 3, 224, 224)  # ~60 MiB of activations per image
    before = model_fingerprint(model)
    with pytest.raises(HMCConfigError, match=r'memory_budget=1 .*Raise memory_budget to at least \d+'):
        scan_sensitivity(model, inputs[:1], groups=find_pruning_groups(model, inputs[:1]), layers=['fc'],
                         calibration_inputs=inputs, memory_budget=1, progress=False)
    assert model_fingerprint(model) == before


def test_the_compressor_refuses_a_budget_too_small_before_wrapping_the_model():
    from hmc_plugin.nni_api.compressor import HMCCompressor

    torch.manual_seed(0)
    model = resnet20(num_classes=10).eval()
    inputs = torch.randn(2, 3, 224, 224)
    with pytest.raises(HMCConfigError, match='memory_budget'):
        HMCCompressor(model, [{'op_types': ['Conv2d']}], None, inputs[:1], calibration_inputs=inputs,
                      target_flops=0.5, memory_budget=1, progress=False)
    assert not any('_nni_wrapper' in name or 'wrapper' in type(module).__name__.lower()
                   for name, module in model.named_modules())


@pytest.mark.parametrize('value', [0, -5, 1.5, True, '1G'])
def test_memory_budget_must_be_a_positive_int_of_mib(value):
    with pytest.raises(HMCConfigError, match='memory_budget'):
        HMCSettings(memory_budget=value)


def test_moments_unfolded_a_few_images_at_a_time_match_the_whole_batch(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2)).eval()
    batches = [torch.randn(6, 3, 12, 12), torch.randn(5, 3, 12, 12)]
    whole = collect_moments(model, ['0', '2'], batches, reference=model)
    monkeypatch.setattr(moments_module, 'CHUNK_ROWS', 150)  # one image (144 or 25 rows) or a few at a time
    pieces = collect_moments(model, ['0', '2'], batches, reference=model)
    for name in ('0', '2'):  # float32 products summed in float64: equal within 1e-6 of the moment's scale
        assert pieces[name].samples == whole[name].samples
        for field in ('input_moment', 'cross'):
            expected = getattr(whole[name], field)
            torch.testing.assert_close(getattr(pieces[name], field), expected, rtol=RELATIVE,
                                       atol=RELATIVE * float(expected.abs().max()))
