"""Data-aware low rank: factors fitted to a layer's input second moment S = E[x x^T] lower the output error on
held-out activations of a trained network, reduce to the data-free fit at S = I, stay exact at full rank, and
reject a bad moment naming the layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hmc_plugin.app.models import resnet56
from hmc_plugin.engines.lowrank import (
    CPConv2d,
    SVDConv2d,
    SVDLinear,
    Tucker2Conv2d,
    decompose_layers,
    decompose_module,
    low_rank_weight,
    low_rank_weights,
    resolve_ranks,
)
from hmc_plugin.errors import LayerCompressionError

IMAGE_SIZE = 16  # the digits are 8x8 upsampled; 16x16 trains ResNet-56 4x faster than 32x32 (same weight shapes)


# ----------------------------------------------------------------------------------------------
# Helpers: unfolded inputs, their second moment, and the output error it measures
# ----------------------------------------------------------------------------------------------

def _unfold(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's input patches as rows ``(N*L, D)``, in ``layer.weight.reshape(C_out, -1)``'s order."""
    if isinstance(layer, nn.Linear):
        return inputs.reshape(-1, layer.in_features)
    patches = F.unfold(inputs, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, D, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _moment(rows: torch.Tensor) -> torch.Tensor:
    """``E[x x^T]`` ``(D, D)`` float64 of rows ``(n, D)``."""
    rows = rows.double()
    return rows.T @ rows / len(rows)


@torch.no_grad()
def _input_moments(model: nn.Module, names: list[str], images: torch.Tensor, batch: int = 128) -> dict:
    """Per layer name, the second moment ``(D, D)`` of its unfolded inputs over ``images`` (eval mode)."""
    modules = dict(model.named_modules())
    sums = {name: 0.0 for name in names}
    counts = {name: 0 for name in names}

    def hook(name):
        def record(module, args, output):
            rows = _unfold(module, args[0]).double()
            sums[name] = sums[name] + rows.T @ rows
            counts[name] += len(rows)
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    model.eval()
    try:
        for start in range(0, len(images), batch):
            model(images[start:start + batch])
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in names}


def _output_error(weight: torch.Tensor, approx: torch.Tensor, moment: torch.Tensor) -> float:
    """Relative output error ``sqrt(E||(W - W~) x||^2 / E||W x||^2)`` for inputs of second moment ``moment``."""
    weight, approx = weight.detach().reshape(len(weight), -1).double(), approx.reshape(len(approx), -1).double()
    difference = weight - approx
    return ((difference @ moment * difference).sum() / (weight @ moment * weight).sum()).sqrt().item()


def _correlated_images(count: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Images ``(count, channels, size, size)`` with correlated channels (a fixed random mixing with a decaying
    spectrum) and smooth pixels (a 3x3 blur), like the activations of a conv net."""
    mixing = torch.randn(channels, channels, generator=torch.Generator().manual_seed(0))
    mixing = mixing * torch.logspace(0, -2, channels)[None, :]
    noise = torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(seed))
    mixed = torch.einsum('dc,nchw->ndhw', mixing, noise)
    return F.avg_pool2d(mixed, 3, stride=1, padding=1) + 0.3


def _random_moment(features: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    """A symmetric PSD ``(features, features)`` float64 moment with a decaying spectrum (rank ``rank`` if given)."""
    generator = torch.Generator().manual_seed(seed)
    columns = rank or features
    factor = torch.randn(features, columns, generator=generator, dtype=torch.float64)
    factor = factor * torch.logspace(0, -1.5, columns, dtype=torch.float64)[None, :]
    return factor @ factor.T / columns


# ----------------------------------------------------------------------------------------------
# A real trained network: ResNet-56 on digits
# ----------------------------------------------------------------------------------------------

def _representative_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The first conv/linear of each distinct (weight shape, stride): stem 3->16, 16->16, 16->32/2, 32->32, ..."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            key = (tuple(module.weight.shape), getattr(module, 'stride', None))
            layers.setdefault(key, (name, module))
    return dict(layers.values())


@pytest.fixture(scope='module')
def resnet56_moments(trained_resnet56):
    """Per representative layer: (module, S on the calibration images, S on the held-out images)."""
    model, calibration, held_out = trained_resnet56
    layers = _representative_layers(model)
    fitted = _input_moments(model, list(layers), calibration)
    tested = _input_moments(model, list(layers), held_out)
    return {name: (module, fitted[name], tested[name]) for name, module in layers.items()}


KXK_LAYERS = ['conv1', 'layer1.0.conv1', 'layer2.0.conv1', 'layer2.0.conv2', 'layer3.0.conv1', 'layer3.0.conv2']
MATRIX_LAYERS = ['layer2.0.downsample.0', 'layer3.0.downsample.0', 'fc']


def test_representative_layers_cover_every_conv_shape_of_resnet56(resnet56_moments):
    shapes = {name: tuple(module.weight.shape) for name, (module, _, _) in resnet56_moments.items()}
    assert sorted(shapes) == sorted(KXK_LAYERS + MATRIX_LAYERS)
    assert shapes['conv1'] == (16, 3, 3, 3) and shapes['layer2.0.conv1'] == (32, 16, 3, 3)
    assert shapes['layer3.0.conv2'] == (64, 64, 3, 3) and shapes['fc'] == (10, 64)


@pytest.mark.parametrize('name', KXK_LAYERS)
def test_data_aware_tucker2_and_kxk_svd_beat_data_free_hooi_on_held_out_activations(resnet56_moments, name):
    module, fitted, tested = resnet56_moments[name]
    tucker_ranks = resolve_ranks(module, 'flops:0.5', 'tucker2', name)
    svd_ranks = resolve_ranks(module, 'flops:0.5', 'svd', name)
    hooi = low_rank_weight(module, tucker_ranks, 'tucker2', name)
    tucker = low_rank_weight(module, tucker_ranks, 'tucker2', name, input_moment=fitted)
    svd = low_rank_weight(module, svd_ranks, 'svd', name, input_moment=fitted)
    errors = {key: _output_error(module.weight, weight, tested) for key, weight in
              [('hooi', hooi), ('tucker2', tucker), ('svd', svd)]}
    assert errors['tucker2'] < errors['hooi'], errors
    if name == 'conv1':
        # the digits' three input channels are copies: S has rank kh*kw = 9, which Tucker-2's r_in = 1 spans
        # exactly, so even data-free HOOI beats a rank-5 SVD there (both errors < 1 %)
        assert torch.linalg.matrix_rank(fitted, rtol=1e-9) == 9 and tucker_ranks[1] == 1 and errors['svd'] < 0.01
    else:
        assert errors['svd'] < errors['hooi'], errors
    # in-sample, data-aware Tucker-2 is never worse than data-free HOOI at the same ranks
    assert _output_error(module.weight, tucker, fitted) <= _output_error(module.weight, hooi, fitted) * (1 + 1e-6)


@pytest.mark.parametrize('name', MATRIX_LAYERS + KXK_LAYERS)
def test_data_aware_svd_beats_data_free_svd_on_held_out_activations(resnet56_moments, name):
    module, fitted, tested = resnet56_moments[name]
    ranks = resolve_ranks(module, 'flops:0.5', 'svd', name)
    plain = low_rank_weight(module, ranks, 'svd', name)
    aware = low_rank_weight(module, ranks, 'svd', name, input_moment=fitted)
    assert _output_error(module.weight, aware, tested) < _output_error(module.weight, plain, tested)


def test_decompose_layers_with_moments_builds_the_data_aware_weights(trained_resnet56, resnet56_moments):
    model, _, held_out = trained_resnet56
    names = ['layer2.0.conv1', 'layer3.0.conv2', 'layer2.0.downsample.0', 'fc']
    moments = {name: resnet56_moments[name][1] for name in names}
    specs = {'layer2.0.conv1': 'flops:0.5', 'layer3.0.conv2': 'flops:0.4', 'layer2.0.downsample.0': 0.5, 'fc': 4}
    expected = {name: low_rank_weight(resnet56_moments[name][0], spec, 'svd' if name == 'layer3.0.conv2' else 'auto',
                                      name, input_moment=moments[name]) for name, spec in specs.items()}
    compressed = resnet56(num_classes=10)
    compressed.load_state_dict(model.state_dict())
    compressed.eval()
    dense = {name: module for name, module in compressed.named_modules() if name in names}
    inputs = {}
    handles = [dense[name].register_forward_pre_hook(lambda m, args, name=name: inputs.update({name: args[0]}))
               for name in names]
    with torch.no_grad():
        compressed(held_out[:8])
    for handle in handles:
        handle.remove()
    decompose_layers(compressed, specs, method={'layer3.0.conv2': 'svd'}, input_moments=moments)
    replaced = dict(compressed.named_modules())
    assert isinstance(replaced['layer2.0.conv1'], Tucker2Conv2d) and isinstance(replaced['fc'], SVDLinear)
    assert isinstance(replaced['layer3.0.conv2'], SVDConv2d) and replaced['layer3.0.conv2'].first.kernel_size == (3, 3)
    with torch.no_grad():
        for name in names:
            module, weight = dense[name], expected[name]
            if isinstance(module, nn.Linear):
                reference = F.linear(inputs[name], weight, module.bias)
            else:
                reference = F.conv2d(inputs[name], weight, module.bias, module.stride, module.padding, module.dilation)
            torch.testing.assert_close(replaced[name](inputs[name]), reference, rtol=1e-4,
                                       atol=1e-4 * reference.abs().max().item())
        assert compressed(held_out[:4]).shape == (4, 10)


# ----------------------------------------------------------------------------------------------
# The fits on synthetic layers and inputs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('module', [nn.Linear(40, 24), nn.Conv2d(24, 16, 1), nn.Conv2d(6, 20, 3, padding=1)],
                         ids=lambda module: type(module).__name__ + str(tuple(module.weight.shape)))
def test_identity_moment_reproduces_the_data_free_svd(module):
    torch.manual_seed(0)
    features = module.weight[0].numel()
    identity = torch.eye(features, dtype=torch.float64)
    for rank in (3, 7):
        plain = low_rank_weight(module, rank, 'svd').double()
        aware = low_rank_weight(module, rank, 'svd', input_moment=identity).double()
        assert ((aware - plain).norm() / plain.norm()).item() < 1e-6
    scanned = low_rank_weights(module, [3, 7], 'svd', input_moment=identity)
    for rank, weight in zip((3, 7), scanned):
        plain = low_rank_weight(module, rank, 'svd').double()
        assert ((weight.double() - plain).norm() / plain.norm()).item() < 1e-6


def test_identity_moment_tucker2_is_no_worse_than_data_free_hooi():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1)
    identity = torch.eye(12 * 9, dtype=torch.float64)
    plain = low_rank_weight(conv, (6, 5), 'tucker2')
    aware = low_rank_weight(conv, (6, 5), 'tucker2', input_moment=identity)
    assert (conv.weight - aware).norm() <= (conv.weight - plain).norm() * (1 + 1e-6)


@pytest.mark.parametrize('module', [
    nn.Linear(30, 12), nn.Linear(8, 20), nn.Conv2d(16, 24, 1, stride=2, bias=False),
    nn.Conv2d(6, 10, 3, stride=2, padding=1), nn.Conv2d(4, 8, 3, padding=2, dilation=2, padding_mode='reflect'),
], ids=lambda module: type(module).__name__ + str(tuple(module.weight.shape)))
@torch.no_grad()
def test_full_rank_data_aware_svd_reproduces_the_layer(module):
    torch.manual_seed(0)
    out_features, features = module.weight.shape[0], module.weight[0].numel()
    replacement = decompose_module(module, min(out_features, features), 'svd', input_moment=_random_moment(features))
    inputs = torch.randn(3, features) if isinstance(module, nn.Linear) else torch.randn(2, module.in_channels, 9, 9)
    reference = module(inputs)
    torch.testing.assert_close(replacement(inputs), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


@pytest.mark.parametrize('kwargs', [dict(stride=2, padding=1, bias=True), dict(padding=1, padding_mode='reflect'),
                                    dict(padding=2, dilation=2, bias=False)], ids=str)
@torch.no_grad()
def test_full_rank_data_aware_tucker2_reproduces_the_conv(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, **kwargs)
    images = _correlated_images(16, 8, 10, seed=1)
    moment = _moment(_unfold(conv, images))
    replacement = decompose_module(conv, (12, 8), 'tucker2', input_moment=moment)
    reference = conv(images[:4])
    torch.testing.assert_close(replacement(images[:4]), reference, rtol=1e-4,
                               atol=1e-4 * reference.abs().max().item())


@pytest.mark.parametrize('method, rank', [('tucker2', (8, 6)), ('svd', (10,))])
def test_data_aware_fit_lowers_the_held_out_output_error_on_correlated_inputs(method, rank):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    fitted = _moment(_unfold(conv, _correlated_images(64, 16, 12, seed=1)))
    tested = _moment(_unfold(conv, _correlated_images(64, 16, 12, seed=2)))
    plain = low_rank_weight(conv, rank, method)
    aware = low_rank_weight(conv, rank, method, input_moment=fitted)
    assert _output_error(conv.weight, aware, tested) < 0.8 * _output_error(conv.weight, plain, tested)


@torch.no_grad()
def test_replacement_output_equals_its_data_aware_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(10, 14, 3, stride=2, padding=1, bias=True)
    images = _correlated_images(8, 10, 9, seed=3)
    moment = _moment(_unfold(conv, images))
    for method, rank in [('tucker2', (6, 4)), ('svd', 7), ('cp', 5)]:
        replacement = decompose_module(conv, rank, method, input_moment=moment)
        weight = low_rank_weight(conv, rank, method, input_moment=moment)
        reference = F.conv2d(images, weight, conv.bias, stride=2, padding=1)
        torch.testing.assert_close(replacement(images), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_scan_weights_take_the_moment_too():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    moment = _moment(_unfold(conv, _correlated_images(32, 16, 10, seed=1)))
    specs = ['flops:0.3', 'flops:0.6']
    for method in ('svd', 'tucker2'):
        plain = low_rank_weights(conv, specs, method)
        aware = low_rank_weights(conv, specs, method, input_moment=moment)
        for spec, before, after in zip(specs, plain, aware):
            assert after.shape == conv.weight.shape and after.dtype == conv.weight.dtype
            assert _output_error(conv.weight, after, moment) <= _output_error(conv.weight, before, moment) * 1.000001
            if method == 'svd':  # one eigh of B S B^T, truncated: exactly the single-rank fit
                single = low_rank_weight(conv, spec, method, input_moment=moment)
                torch.testing.assert_close(after, single, rtol=1e-5, atol=1e-6)


def test_singular_moment_is_fine_for_svd_and_tucker2():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    moment = _random_moment(72, rank=20)
    moment[:, :9] = moment[:9, :] = 0  # a dead input channel
    for method, rank in [('svd', 6), ('tucker2', (6, 4))]:
        weight = low_rank_weight(conv, rank, method, input_moment=moment)
        assert torch.isfinite(weight).all()
        assert _output_error(conv.weight, weight, moment) <= \
            _output_error(conv.weight, low_rank_weight(conv, rank, method), moment) * (1 + 1e-6)


@torch.no_grad()
def test_target_is_approximated_with_the_dense_bias():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=True)
    target = torch.randn(10, 6 * 9)
    moment = torch.eye(54, dtype=torch.float64) + _random_moment(54)  # white test images: a well-conditioned S
    images = torch.randn(2, 6, 8, 8)
    reference = F.conv2d(images, target.reshape(conv.weight.shape), conv.bias, padding=1)
    for method, rank in [('svd', 10), ('tucker2', (10, 6))]:
        replacement = decompose_module(conv, rank, method, input_moment=moment, target=target)
        torch.testing.assert_close(replacement(images), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
        torch.testing.assert_close(replacement.last.bias, conv.bias)
    assert low_rank_weight(conv, 4, 'svd', input_moment=moment, target=target.reshape(conv.weight.shape)).shape == \
        conv.weight.shape
    with pytest.raises(ValueError, match='input_moment'):
        low_rank_weight(conv, 4, 'svd', target=target)
    with pytest.raises(LayerCompressionError, match=r"\(10, 53\).*'head'"):
        low_rank_weight(conv, 4, 'svd', 'head', input_moment=moment, target=target[:, :53])


def test_cp_accepts_the_moment_and_fits_data_free():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    moment = _random_moment(54)
    torch.testing.assert_close(low_rank_weight(conv, 5, 'cp', input_moment=moment), low_rank_weight(conv, 5, 'cp'))
    assert isinstance(decompose_module(conv, 5, 'cp', input_moment=moment), CPConv2d)


def test_data_aware_weight_keeps_the_dtype_and_the_moment_may_be_float32():
    conv = nn.Conv2d(4, 6, 3, dtype=torch.float64)
    weight = low_rank_weight(conv, (3, 2), 'tucker2', input_moment=_random_moment(36).float())
    assert weight.dtype == torch.float64 and weight.shape == conv.weight.shape
    linear = nn.Linear(12, 5)
    assert low_rank_weight(linear, 2, input_moment=_random_moment(12)).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Mistakes
# ----------------------------------------------------------------------------------------------

def test_moment_of_the_wrong_shape_names_the_layer_and_both_shapes():
    conv = nn.Conv2d(8, 16, 3)
    with pytest.raises(LayerCompressionError, match=r"\(8, 8\).*'layer1\.0\.conv1'.*\(72, 72\)") as info:
        decompose_module(conv, 4, input_moment=torch.eye(8), layer_name='layer1.0.conv1')
    assert info.value.layer_name == 'layer1.0.conv1'
    with pytest.raises(LayerCompressionError, match=r"\(12,\).*'fc'.*\(12, 12\)"):
        low_rank_weights(nn.Linear(12, 4), [2], input_moment=torch.ones(12), layer_name='fc')


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_moment_with_nan_or_inf_names_the_layer(bad):
    moment = torch.eye(72)
    moment[3, 5] = bad
    with pytest.raises(LayerCompressionError, match=r"'layer2\.1\.conv2'.*activations hold NaN or Inf; check the "
                                                    r'calibration inputs'):
        low_rank_weight(nn.Conv2d(8, 16, 3), 4, layer_name='layer2.1.conv2', input_moment=moment)


def test_moment_with_a_negative_diagonal_names_the_layer():
    with pytest.raises(LayerCompressionError, match=r"'fc'.*negative diagonal"):
        decompose_module(nn.Linear(6, 4), 2, layer_name='fc', input_moment=-torch.eye(6))


def test_decompose_layers_with_a_bad_moment_leaves_the_model_untouched(model):
    before = {key: value.clone() for key, value in model.state_dict().items()}
    moments = {'layer1.0.conv1': torch.eye(144), 'layer1.0.conv2': torch.eye(16)}
    with pytest.raises(LayerCompressionError, match=r'layer1\.0\.conv2'):
        decompose_layers(model, {'layer1.0.conv1': 4, 'layer1.0.conv2': 4}, input_moments=moments)
    with pytest.raises(LayerCompressionError, match='layer9'):
        decompose_layers(model, {'layer1.0.conv1': 4}, input_moments={'layer9.conv': torch.eye(144)})
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert isinstance(model.layer1[0].conv1, nn.Conv2d)
