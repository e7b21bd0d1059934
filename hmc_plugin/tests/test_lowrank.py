"""Low-rank replacements: exact at full rank, counted FLOPs/params match the formulas, every rank form
resolves to sensible ints, and every mistake names the layer before the model is touched."""
import math

import pytest
import torch
import torchvision
from torch import nn

from hmc_plugin.app.models import resnet56
from hmc_plugin.engines.lowrank import (
    CPConv2d,
    SVDConv2d,
    SVDLinear,
    Tucker2Conv2d,
    decompose_layers,
    decompose_module,
    default_method,
    flops_ratio,
    low_rank_weight,
    low_rank_weights,
    method_for,
    replacement_architecture,
    replacement_params,
    resolve_ranks,
)
from hmc_plugin.errors import LayerCompressionError
from hmc_plugin.utils.counting import count_flops, count_params

SPATIAL = 8  # small inputs keep the 512x512x3x3 shapes fast


def _conv_shapes() -> list[tuple]:
    """Every distinct (in, out, k, stride, padding, groups, bias) conv of CIFAR resnet56 and torchvision resnet50."""
    torch.manual_seed(0)
    shapes = set()
    for model in (resnet56(), torchvision.models.resnet50(weights=None)):
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                shapes.add((module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
                            module.padding[0], module.groups, module.bias is not None))
    return sorted(shapes)


CONV_SHAPES = _conv_shapes()
BIAS_SHAPES = [(16, 32, 3, 1, 1, 1, True), (32, 64, 3, 2, 1, 1, True), (64, 32, 1, 2, 0, 1, True)]


def _make_conv(shape, dtype=torch.float32) -> nn.Conv2d:
    in_channels, out_channels, kernel, stride, padding, groups, bias = shape
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=bias,
                     dtype=dtype)


def _full_ranks(module: nn.Module) -> tuple[int, ...]:
    out_features, in_features = module.weight.shape[:2]
    return (out_features, in_features) if default_method(module) == 'tucker2' else (min(out_features, in_features),)


def _assert_same_output(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


# ----------------------------------------------------------------------------------------------
# Exactness at full rank
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', CONV_SHAPES + BIAS_SHAPES, ids=str)
@torch.no_grad()
def test_full_rank_reproduces_conv_output(shape):
    torch.manual_seed(0)
    conv = _make_conv(shape)
    x = torch.randn(2, conv.in_channels, SPATIAL, SPATIAL)
    replacement = decompose_module(conv, _full_ranks(conv), layer_name='conv')
    expected_type = Tucker2Conv2d if conv.kernel_size[0] > 1 else SVDConv2d
    assert isinstance(replacement, expected_type)
    _assert_same_output(replacement(x), conv(x))


@pytest.mark.parametrize('in_features, out_features, bias', [(64, 10, True), (10, 64, False), (2048, 1000, True)])
@torch.no_grad()
def test_full_rank_svd_reproduces_linear_output(in_features, out_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(4, in_features)
    replacement = SVDLinear.from_linear(linear, (min(in_features, out_features),))
    assert [name for name, _ in replacement.named_children()] == ['first', 'last']
    _assert_same_output(replacement(x), linear(x))


@torch.no_grad()
def test_low_rank_module_matches_its_reconstructed_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1, dilation=1, bias=True)
    x = torch.randn(2, 16, SPATIAL, SPATIAL)
    for method, rank in [('tucker2', (6, 5)), ('cp', 7)]:
        replacement = decompose_module(conv, rank, method=method)
        weight = low_rank_weight(conv, rank, method=method)
        assert weight.shape == conv.weight.shape
        expected = nn.functional.conv2d(x, weight, conv.bias, stride=2, padding=1)
        _assert_same_output(replacement(x), expected)


def test_full_rank_low_rank_weight_equals_weight():
    torch.manual_seed(0)
    for module in (nn.Conv2d(8, 12, 3), nn.Conv2d(8, 12, 1), nn.Linear(20, 6)):
        torch.testing.assert_close(low_rank_weight(module, 1.0), module.weight.detach(), rtol=1e-4, atol=1e-5)


def test_replacement_keeps_dtype_mode_and_leaves_input_unchanged():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, dtype=torch.float64).eval()
    before = {key: value.clone() for key, value in conv.state_dict().items()}
    replacement = decompose_module(conv, 4)
    assert all(p.dtype == torch.float64 and p.device == conv.weight.device for p in replacement.parameters())
    assert not replacement.training and replacement.ranks == (4, 4)
    assert all(torch.equal(before[key], value) for key, value in conv.state_dict().items())
    torch.fx.symbolic_trace(replacement)  # stock layers only: fx-traceable


# ----------------------------------------------------------------------------------------------
# CP
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def test_cp_is_a_decent_approximation_with_the_right_shape_and_stride():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    factors = [torch.randn(dim, 4) for dim in (24, 16, 3, 3)]
    conv.weight.copy_(torch.einsum('or,ir,hr,wr->oihw', *factors))  # CP rank 4
    x = torch.randn(2, 16, SPATIAL, SPATIAL)
    ref = conv(x)
    errors = {rank: _relative_error(CPConv2d.from_conv(conv, rank)(x), ref) for rank in (1, 4)}
    assert errors[4] < 0.05 < errors[1]
    replacement = CPConv2d.from_conv(conv, 4)
    assert replacement.vertical.stride == (2, 1) and replacement.horizontal.stride == (1, 2)
    assert replacement.vertical.groups == 4 and replacement(x).shape == ref.shape


def test_cp_error_decreases_with_rank_on_random_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    errors = [_relative_error(low_rank_weight(conv, rank, method='cp'), conv.weight.detach()) for rank in (1, 16)]
    assert errors[1] < errors[0]


# ----------------------------------------------------------------------------------------------
# SVD of a k x k conv
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs', [
    dict(kernel_size=3, stride=2, padding=1, bias=True),
    dict(kernel_size=3, padding=2, dilation=2, bias=False),
    dict(kernel_size=3, padding=1, padding_mode='reflect', bias=True),
    dict(kernel_size=(3, 5), stride=(1, 2), padding=(1, 2), bias=True),
    dict(kernel_size=5, stride=2, padding=0, bias=False),
], ids=str)
@torch.no_grad()
def test_full_rank_kxk_svd_reproduces_conv_output(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, **kwargs)
    x = torch.randn(2, 6, SPATIAL + 1, SPATIAL + 1)
    rank = min(10, conv.weight[0].numel())
    replacement = decompose_module(conv, rank, method='svd', layer_name='conv')
    assert isinstance(replacement, SVDConv2d) and replacement.ranks == (rank,)
    first, last = replacement.first, replacement.last
    assert first.kernel_size == conv.kernel_size and first.bias is None and last.kernel_size == (1, 1)
    assert (first.stride, first.padding, first.dilation, first.padding_mode) == \
        (conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    assert (last.bias is not None) == (conv.bias is not None)
    _assert_same_output(replacement(x), conv(x))
    torch.testing.assert_close(low_rank_weight(conv, rank, method='svd'), conv.weight, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_kxk_svd_is_the_truncated_svd_of_the_unfolded_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 8, SPATIAL, SPATIAL)
    u, s, vt = torch.linalg.svd(conv.weight.reshape(12, -1).double(), full_matrices=False)
    best = ((u[:, :4] * s[:4]) @ vt[:4]).reshape(conv.weight.shape).float()
    torch.testing.assert_close(low_rank_weight(conv, 4, method='svd'), best, rtol=1e-4, atol=1e-5)
    expected = nn.functional.conv2d(x, best, conv.bias, padding=1)
    _assert_same_output(decompose_module(conv, 4, method='svd')(x), expected)
    scan_weight = low_rank_weights(conv, [4, 'flops:0.5'], method='svd')[0]
    torch.testing.assert_close(scan_weight, best, rtol=1e-4, atol=1e-5)


def test_kxk_svd_ranks_architecture_and_method_choice():
    conv = nn.Conv2d(16, 64, 3, stride=2, padding=1, device='meta')
    with pytest.warns(UserWarning, match='clipped'):
        assert resolve_ranks(conv, 1000, method='svd') == (64,)
    assert resolve_ranks(nn.Conv2d(16, 200, 3), 1.0, method='svd') == (144,)  # min(C_out, C_in*kh*kw)
    assert resolve_ranks(conv, 0.5, method='svd') == (32,)
    assert math.isclose(flops_ratio(conv, (8,), 'svd'), 8 * (16 * 9 + 64) / (64 * 16 * 9))
    assert replacement_params(conv, (8,), 'svd') == 8 * (16 * 9 + 64) + 64
    architecture = replacement_architecture(conv, (8,), 'svd')
    assert isinstance(architecture, SVDConv2d) and architecture.first.weight.shape == (8, 16, 3, 3)
    assert architecture.first.stride == (2, 2) and architecture.last.weight.shape == (64, 8, 1, 1)
    assert method_for(conv, 'svd') == 'svd' and method_for(conv, 'auto') == 'tucker2'
    assert method_for(conv, 'cp') == 'cp' and method_for(nn.Conv2d(16, 64, 1), 'tucker2') == 'svd'
    assert default_method(conv) == 'tucker2'


# ----------------------------------------------------------------------------------------------
# FLOPs and parameters
# ----------------------------------------------------------------------------------------------

def _expected_macs(conv: nn.Conv2d, method: str, ranks: tuple[int, ...], height: int) -> int:
    """MACs + bias adds of the replacement on a (1, C_in, height, height) input, stage by stage."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (height + 2 * pw - kw) // sw + 1
    in_pixels, out_pixels = height * height, out_h * out_w
    bias = out_pixels * conv.out_channels if conv.bias is not None else 0
    if method == 'tucker2':
        r_out, r_in = ranks
        return (in_pixels * conv.in_channels * r_in + out_pixels * r_in * r_out * kh * kw
                + out_pixels * r_out * conv.out_channels + bias)
    (rank,) = ranks
    if method == 'cp':
        return (in_pixels * conv.in_channels * rank + out_h * height * rank * kh + out_pixels * rank * kw
                + out_pixels * rank * conv.out_channels + bias)
    return out_pixels * rank * (conv.in_channels * kh * kw + conv.out_channels) + bias


@pytest.mark.parametrize('shape, method, ranks', [
    ((16, 32, 3, 1, 1, 1, True), 'tucker2', (12, 5)),
    ((32, 64, 3, 2, 1, 1, False), 'tucker2', (20, 9)),
    ((3, 64, 7, 2, 3, 1, False), 'tucker2', (16, 3)),
    ((16, 32, 3, 2, 1, 1, True), 'cp', (7,)),
    ((64, 128, 1, 2, 0, 1, False), 'svd', (10,)),
    ((64, 32, 1, 1, 0, 1, True), 'svd', (10,)),
    ((16, 32, 3, 1, 1, 1, True), 'svd', (9,)),
    ((32, 64, 3, 2, 1, 1, False), 'svd', (20,)),
    ((3, 64, 7, 2, 3, 1, False), 'svd', (16,)),
], ids=str)
def test_counted_flops_and_params_match_the_formulas(shape, method, ranks):
    torch.manual_seed(0)
    conv = _make_conv(shape)
    x = torch.randn(1, conv.in_channels, 16, 16)
    replacement = decompose_module(conv, ranks, method=method)
    assert count_flops(replacement, x) == _expected_macs(conv, method, ranks, 16)
    assert count_params(replacement) == replacement_params(conv, ranks, method)
    # 'same' padding: the ratio of conv MACs (bias excluded) is exactly flops_ratio
    bias = count_flops(conv, x) - count_flops(nn.Conv2d(**_conv_kwargs(conv), bias=False), x)
    dense = count_flops(conv, x) - bias
    assert math.isclose((count_flops(replacement, x) - bias) / dense, flops_ratio(conv, ranks, method))


def _conv_kwargs(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding)


def test_counted_linear_flops_and_params_match_the_formulas():
    linear = nn.Linear(64, 10)
    replacement = decompose_module(linear, 4)
    assert count_flops(replacement, torch.randn(1, 64)) == 4 * (64 + 10) + 10
    assert count_params(replacement) == replacement_params(linear, (4,)) == 4 * (64 + 10) + 10


@pytest.mark.parametrize('channels, kernel, method', [(64, 3, 'tucker2'), (64, 3, 'cp'), (256, 1, 'svd'),
                                                     (128, 3, 'svd')])
@pytest.mark.parametrize('fraction', [0.2, 0.4, 0.7])
def test_flops_spec_hits_the_flops_fraction(channels, kernel, method, fraction):
    # one rank step of a 64x64 1x1 SVD is 3% of its FLOPs (1.7% for a 3x3), hence 256 (128) channels there
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False)
    x = torch.randn(1, channels, 16, 16)
    ranks = resolve_ranks(conv, f'flops:{fraction}', method=method, layer_name='conv')
    counted = count_flops(decompose_module(conv, ranks, method=method), x) / count_flops(conv, x)
    assert abs(counted - fraction) < 0.03 * fraction


def test_flops_spec_accounts_for_the_stride_of_tucker2():
    strided = nn.Conv2d(64, 64, 3, stride=2, padding=1, device='meta')
    plain = nn.Conv2d(64, 64, 3, padding=1, device='meta')
    assert resolve_ranks(strided, 'flops:0.4')[0] < resolve_ranks(plain, 'flops:0.4')[0]
    assert math.isclose(flops_ratio(strided, resolve_ranks(strided, 'flops:0.4')), 0.4, rel_tol=0.05)


# ----------------------------------------------------------------------------------------------
# Rank specs
# ----------------------------------------------------------------------------------------------

def test_default_method_by_layer_kind():
    assert default_method(nn.Conv2d(4, 8, 3)) == 'tucker2'
    assert default_method(nn.Conv2d(4, 8, 1, stride=2)) == 'svd'
    assert default_method(nn.Linear(4, 8)) == 'svd'


@pytest.mark.parametrize('rank, method, expected', [
    (5, 'tucker2', (5, 5)), ((12, 3), 'tucker2', (12, 3)), ([7], 'svd', (7,)), (5, 'cp', (5,)),
    (0.5, 'tucker2', (16, 8)), (0.3, 'tucker2', (10, 5)), (0.5, 'svd', (8,)), (1.0, 'cp', (32,)),
])
def test_explicit_rank_forms_resolve_to_ints(rank, method, expected):
    module = nn.Conv2d(16, 32, 3) if method != 'svd' else nn.Conv2d(16, 32, 1)
    assert resolve_ranks(module, rank, method=method) == expected


def _matrix_with_rank(out_features: int, in_features: int, rank: int, noise: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(out_features, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator)
    return low + noise * torch.randn(out_features, in_features, generator=generator)


def test_energy_and_vbmf_find_the_rank_of_a_low_rank_matrix():
    linear = nn.Linear(300, 64)
    with torch.no_grad():
        linear.weight.copy_(_matrix_with_rank(64, 300, 5, noise=0.1))
    assert resolve_ranks(linear, 'vbmf') == (5,)
    assert resolve_ranks(linear, 'energy:0.99') == (5,)
    assert resolve_ranks(linear, 'energy:1') == (64,)
    assert resolve_ranks(linear, 'energy:0.3')[0] < 5


def test_energy_and_vbmf_on_conv_modes():
    conv = nn.Conv2d(32, 48, 3)
    with torch.no_grad():  # mode-0 rank 6, mode-1 rank 4: W = core x0 A x1 B
        core = torch.randn(6, 4, 3, 3)
        conv.weight.copy_(torch.einsum('abhw,oa,ib->oihw', core, torch.randn(48, 6), torch.randn(32, 4)))
        conv.weight.add_(1e-3 * torch.randn_like(conv.weight))
    assert resolve_ranks(conv, 'vbmf') == (6, 4)
    assert resolve_ranks(conv, 'energy:0.9999') == (6, 4)
    assert resolve_ranks(conv, 'vbmf', method='cp') == (6,)
    torch.manual_seed(0)
    noise_only = nn.Conv2d(32, 48, 3)
    assert all(1 <= r <= dim for r, dim in zip(resolve_ranks(noise_only, 'vbmf'), (48, 32)))


def test_rank_above_the_dimension_is_clipped_with_a_warning():
    conv = nn.Conv2d(8, 16, 3)
    with pytest.warns(UserWarning, match=r"layer1\.0\.conv1.*clipped to \(16, 8\)"):
        assert resolve_ranks(conv, 100, layer_name='layer1.0.conv1') == (16, 8)
    with pytest.warns(UserWarning, match='fc'):
        assert resolve_ranks(nn.Linear(8, 4), 9, layer_name='fc') == (4,)


@pytest.mark.parametrize('rank', [0, -1, 1.5, 0.0, 'foo', 'energy:2', 'flops:x', 'vbmf:3', True, None, (3,),
                                  (3, 0), (2.5, 2)])
def test_invalid_rank_error_names_layer_and_value(rank):
    with pytest.raises(LayerCompressionError) as info:
        resolve_ranks(nn.Conv2d(8, 16, 3), rank, layer_name='layer2.1.conv2')
    message = str(info.value)
    assert 'layer2.1.conv2' in message and repr(rank) in message and 'expected' in message
    assert info.value.layer_name == 'layer2.1.conv2'


@pytest.mark.parametrize('module, method', [
    (nn.Conv2d(8, 8, 3, groups=8), 'tucker2'), (nn.Conv2d(8, 8, 3, groups=2), 'cp'),
    (nn.Conv2d(8, 16, 1), 'tucker2'), (nn.Conv2d(8, 8, 3, groups=2), 'svd'), (nn.Linear(8, 4), 'cp'),
    (nn.ConvTranspose2d(8, 16, 3), 'auto'), (nn.Conv1d(8, 16, 3), 'auto'), (nn.Conv3d(8, 16, 3), 'auto'),
    (nn.Conv2d(8, 16, 3), 'lowrank'),
], ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else value)
def test_unsupported_layer_error_names_layer(module, method):
    with pytest.raises(LayerCompressionError, match='blocks.3'):
        decompose_module(module, 2, method=method, layer_name='blocks.3')


# ----------------------------------------------------------------------------------------------
# Replacing layers of a model
# ----------------------------------------------------------------------------------------------

def test_decompose_layers_replaces_by_name_and_model_still_runs():
    torch.manual_seed(0)
    model = resnet56().eval()
    ranks = decompose_layers(model, {'layer1.0.conv1': 0.5, 'layer3.2.conv2': 'flops:0.3', 'fc': 4},
                             method={'layer3.2.conv2': 'cp'})
    names = dict(model.named_modules())
    assert ranks['layer1.0.conv1'] == (8, 8) and ranks['fc'] == (4,)
    assert isinstance(names['layer1.0.conv1'], Tucker2Conv2d) and 'layer1.0.conv1.core' in names
    assert isinstance(names['layer3.2.conv2'], CPConv2d) and 'layer3.2.conv2.vertical' in names
    assert isinstance(names['fc'], SVDLinear) and names['fc'].ranks == (4,)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize('ranks_by_name', [{'layer1.0.conv1': 4, 'layer1.0.nope': 4},
                                           {'layer1.0.conv1': 4, 'layer1.0.bn1': 4},
                                           {'layer1.0.conv1': 4, 'layer2.0.conv1': 0}])
def test_decompose_layers_error_leaves_model_untouched(ranks_by_name):
    torch.manual_seed(0)
    model = resnet56()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(LayerCompressionError) as info:
        decompose_layers(model, ranks_by_name)
    assert list(ranks_by_name)[-1] in str(info.value)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[key], after[key]) for key in before)
    assert isinstance(model.layer1[0].conv1, nn.Conv2d)


def test_a_channel_fraction_cp_rank_stays_within_the_tensors_bound():
    # a 3x3 conv from 1 channel to 10 has 9 weights per output channel: its CP rank is at most 9
    assert resolve_ranks(nn.Conv2d(1, 10, 3), 1.0, method='cp') == (9,)
