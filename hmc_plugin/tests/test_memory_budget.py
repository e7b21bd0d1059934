"""memory_budget: the Fisher pass and the moment passes in chunks give the same results, chunks follow the budget,
a budget too small for one image fails before anything runs, and the data-aware fit counts its moments."""
import copy
import logging

import pytest
import torch
from torch import nn

from hmc_plugin.app.models import resnet20
from hmc_plugin.engines import moments as moments_module
from hmc_plugin.engines.datafit import DEFAULT_RIDGE, DataFit, fit_to_data, ridge_fit
from hmc_plugin.engines.lowrank import low_rank_weight, symmetrise_
from hmc_plugin.engines.moments import MomentAccumulator, collect_moments
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


def _three_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 8, 3)).eval()


def test_the_one_pass_fit_counts_the_widest_layers_moments_against_the_budget(caplog):
    """Two 8x8 images: the activations take kilobytes, but fitting conv '2' holds its (576, 576) float64 moment and
    its working copies (8 MB): a 4 MiB budget fits layer by layer, a 16 MiB one in one pass, to the same factors."""
    original = _three_convs()
    batches = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))]
    fitted = {}
    for budget in (4, 16):
        fitted[budget] = copy.deepcopy(original)
        with caplog.at_level(logging.INFO, logger='hmc_plugin.engines.datafit'):
            caplog.clear()
            report = fit_to_data(original, fitted[budget], batches, ranks={'2': (16, 16)}, memory_budget=budget)
        assert report['decomposed'] == ['2']
        assert ('Fitting layer by layer' in caplog.text) == (budget == 4), caplog.text
    for key, value in fitted[16].state_dict().items():
        torch.testing.assert_close(fitted[4].state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_ridge_fit_gives_the_dense_solve_and_leaves_the_moment_unchanged():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(300, 40, generator=generator, dtype=torch.float64)
    moment, cross = inputs.T @ inputs / 300, torch.randn(6, 40, generator=generator, dtype=torch.float64)
    moment[0, 39] += 1e-9  # not exactly symmetric, as summed float32 products are not
    before = moment.clone()
    lam = DEFAULT_RIDGE * float(torch.trace(moment)) / 40
    expected = torch.linalg.solve(moment + lam * torch.eye(40, dtype=torch.float64), cross.T).T
    assert torch.equal(ridge_fit(cross, moment), expected)
    assert torch.equal(moment, before)


@pytest.mark.parametrize('size', [1, 7, 512, 1030])
def test_symmetrising_in_place_gives_the_bits_of_the_copy(size):
    matrix = torch.randn(size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    expected = (matrix + matrix.T) * 0.5
    assert symmetrise_(matrix) is matrix
    assert torch.equal(matrix, expected)


def test_moments_summed_in_place_are_handed_over_once():
    rows = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    accumulator = MomentAccumulator()
    accumulator.add(rows[:20], None, 'layer')
    accumulator.add(rows[20:], None, 'layer')
    moments = accumulator.result()
    expected = ((rows[:20].T @ rows[:20]).double() + (rows[20:].T @ rows[20:]).double()) * (1.0 / 50)
    assert torch.equal(moments.input_moment, expected) and moments.samples == 50
    assert accumulator.moment is None and accumulator.samples == 0  # nothing kept: no second (D, D) copy
