"""Low-rank replacement of Conv2d/Linear layers: rank specs, tensorly factors, and stock-layer modules.

Three methods, each a ``nn.Sequential`` of stock ``nn.Conv2d``/``nn.Linear`` (fx-traceable,
ONNX-exportable, understood by torch-pruning and NNI's speedup):

- ``'tucker2'`` (k x k convs): 1x1 ``C_in -> r_in``, k x k ``r_in -> r_out``, 1x1 ``r_out -> C_out``
  (Kim et al. 2016), from ``tensorly.decomposition.partial_tucker`` on modes (0, 1).
- ``'cp'`` (k x k convs): 1x1 ``C_in -> r``, k_h x 1 and 1 x k_w depthwise, 1x1 ``r -> C_out``
  (Lebedev et al. 2015), from ``tensorly.decomposition.parafac``.
- ``'svd'`` (1x1 convs and Linear): ``in -> r -> out``, ``sqrt(S)`` on both sides.

Every rank form (int, tuple, fraction of channels, ``'energy:0.9'``, ``'vbmf'``, ``'flops:0.4'``) goes
through :func:`resolve_ranks` once, before any math. tensorly runs only inside
``tl.backend_context('pytorch')``; the process-wide backend is never changed.

At full rank, Tucker-2 and SVD replacements reproduce the original layer's output (float round-off).

References
----------
Kim et al. 2016, "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
Applications", ICLR. Nakajima et al. 2013, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR. Lebedev et al. 2015, "Speeding-up Convolutional Neural Networks
Using Fine-tuned CP-Decomposition", ICLR.
"""
from __future__ import annotations

import functools
import logging
import math
import numbers
import warnings
from collections import OrderedDict
from typing import Union

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker
from torch import nn

from ..errors import LayerCompressionError

__all__ = ['METHODS', 'RankSpec', 'default_method', 'method_for', 'decomposable', 'flops_ratio', 'replacement_params',
           'resolve_ranks', 'Tucker2Conv2d', 'CPConv2d', 'SVDConv2d', 'SVDLinear', 'decompose_module',
           'replacement_architecture', 'low_rank_weight', 'low_rank_weights', 'decompose_layers']

_logger = logging.getLogger(__name__)

METHODS = ('tucker2', 'cp', 'svd')


RankSpec = Union[int, float, str, tuple, list]


_ALLOWED = ("an int >= 1, a tuple of {n} ints >= 1, a float in (0, 1], 'energy:<fraction>', 'vbmf' "
            "or 'flops:<fraction>' (fractions in (0, 1])")


_CP_RANDOM_STATE = 0


SCAN_TUCKER_ITERATIONS = 2


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def default_method(module: nn.Module, layer_name: str = '') -> str:
    """``'tucker2'`` for a k x k Conv2d (k > 1), ``'svd'`` for a 1x1 Conv2d or a Linear."""
    if isinstance(module, nn.Linear) or _is_pointwise(module):
        return 'svd'
    if isinstance(module, nn.Conv2d):
        return 'tucker2'
    raise LayerCompressionError(
        f"Got {type(module).__name__} for layer '{layer_name}' but expected nn.Conv2d or nn.Linear",
        layer_name=layer_name)


def method_for(module: nn.Module, rank_method: str = 'auto', layer_name: str = '') -> str:
    """The method a plan uses for ``module``: ``rank_method`` ('auto', 'tucker2' or 'cp') for a k x k conv,
    ``'svd'`` for a 1x1 conv or a Linear."""
    method = default_method(module, layer_name)
    return method if method == 'svd' or rank_method == 'auto' else rank_method


def _check_supported(module: nn.Module, method: str, layer_name: str) -> str:
    """The concrete method for ``module``; raises if the layer cannot be decomposed that way."""
    if method == 'auto':
        method = default_method(module, layer_name)
    if method not in METHODS:
        raise LayerCompressionError(
            f"Got method={method!r} for layer '{layer_name}' but expected 'auto' or one of {METHODS}",
            layer_name=layer_name, method=str(method))

    def fail(why: str):
        raise LayerCompressionError(f"Cannot apply method={method!r} to layer '{layer_name}' "
                                    f"({type(module).__name__}): {why}", layer_name=layer_name, method=method)

    if isinstance(module, nn.Linear):
        if method != 'svd':
            fail("a Linear layer only supports 'svd'")
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1:
            fail(f'grouped/depthwise convs (groups={module.groups}) are not supported')
        if method == 'svd' and not _is_pointwise(module):
            fail(f"'svd' needs a 1x1 conv, got kernel_size={tuple(module.kernel_size)}; use 'tucker2' or 'cp'")
        if method != 'svd' and _is_pointwise(module):
            fail("a 1x1 conv has no spatial modes; use 'svd'")
        if method == 'cp' and module.padding_mode != 'zeros':
            fail(f"'cp' needs padding_mode='zeros', got {module.padding_mode!r}")
    else:
        fail('expected nn.Conv2d (groups=1) or nn.Linear')
    return method


def decomposable(module: nn.Module, layer_name: str = '', method: str = 'auto') -> bool:
    """Whether ``module`` can be replaced by a low-rank module with ``method`` (no exception)."""
    try:
        _check_supported(module, method, layer_name)
    except LayerCompressionError:
        return False
    return True


def _mode_dims(module: nn.Module, method: str) -> tuple[int, ...]:
    """Upper bound of each rank: (C_out, C_in) for tucker2, (min(out, in),) for svd, (prod/max,) for cp."""
    out_features, in_features = module.weight.shape[:2]
    if method == 'tucker2':
        return (out_features, in_features)
    if method == 'svd':
        return (min(out_features, in_features),)
    shape = module.weight.shape  # the trivial CP rank bound: product of all dims but the largest
    return (math.prod(shape) // max(shape),)


def _mode_unfoldings(weight: torch.Tensor, method: str) -> list[torch.Tensor]:
    """Matrices whose spectra set the ranks: mode-0 and mode-1 unfoldings (tucker2), mode-0 (cp), the matrix (svd)."""
    if weight.is_meta:
        raise ValueError('needs real weights, not meta tensors')
    weight = weight.detach().to(torch.float64)
    if method == 'svd':
        return [weight.reshape(weight.shape[0], -1)]
    mode0 = weight.reshape(weight.shape[0], -1)
    return [mode0] if method == 'cp' else [mode0, weight.transpose(0, 1).reshape(weight.shape[1], -1)]


def _energy_rank(matrix: torch.Tensor, fraction: float) -> int:
    """Smallest rank whose singular values keep ``fraction`` of the squared Frobenius norm."""
    energy = torch.linalg.svdvals(matrix) ** 2
    cumulative = torch.cumsum(energy, 0) / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)
    return int(torch.searchsorted(cumulative, torch.tensor(fraction - 1e-12, dtype=cumulative.dtype))) + 1


def _vbmf_rank(matrix: torch.Tensor) -> int:
    """Rank estimated by Empirical VBMF's global analytic solution (Nakajima et al. 2013), at least 1.

    The noise variance ``sigma2`` minimises the EVB free energy over its analytic bounds (a log-spaced
    grid search refined once); the rank is the number of singular values above the EVB threshold.
    """
    values = matrix.cpu().numpy()
    if values.shape[0] > values.shape[1]:
        values = values.T
    rows, cols = values.shape  # rows <= cols
    if rows < 2:
        return 1
    singular = np.linalg.svd(values, compute_uv=False)
    alpha = rows / cols
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    eh_ub = int(min(np.ceil(rows / (1 + alpha)) - 1, rows)) - 1
    upper = np.sum(singular ** 2) / (rows * cols)
    lower = max(singular[eh_ub + 1] ** 2 / (cols * x_bar), np.mean(singular[eh_ub + 1:] ** 2) / cols)
    if not upper > 0:
        return 1
    lower = min(max(lower, upper * 1e-12), upper)

    def free_energy(sigma2: np.ndarray) -> np.ndarray:  # (n,) -> (n,), Nakajima et al. 2013, eq. (A.1)
        x = singular[None, :] ** 2 / (cols * sigma2[:, None])
        big = x > x_bar
        x_big = np.where(big, x, 2 * x_bar)  # keeps the unused branch finite
        tau = 0.5 * (x_big - (1 + alpha) + np.sqrt((x_big - (1 + alpha)) ** 2 - 4 * alpha))
        big_terms = x_big - tau + np.log((tau + 1) / x_big) + alpha * np.log(tau / alpha + 1)
        small_terms = x - np.log(np.maximum(x, 1e-300))
        return np.where(big, big_terms, small_terms).sum(1)

    grid = np.geomspace(lower, upper, 2000) if lower < upper else np.array([upper])
    best = grid[np.argmin(free_energy(grid))]
    fine = np.linspace(best / 1.01, min(best * 1.01, upper), 400)
    sigma2 = fine[np.argmin(free_energy(fine))]
    threshold = np.sqrt(cols * sigma2 * x_bar)
    return max(1, int(np.sum(singular > threshold)))


def flops_ratio(module: nn.Module, ranks: tuple[int, ...], method: str = 'auto') -> float:
    """Replacement MACs / original MACs per output pixel (conv/linear MACs, bias ignored).

    The first 1x1 of Tucker-2 and CP runs at the input resolution, so a stride ``(s_h, s_w)`` makes it
    cost ``s_h * s_w`` times more per output pixel (exact for 'same'-padded convs); the ratio does not
    depend on the spatial size. Works on ``device='meta'`` modules.
    """
    method = _check_supported(module, method, '')
    out_features, in_features = module.weight.shape[:2]
    kh, kw = module.weight.shape[2:] if module.weight.dim() == 4 else (1, 1)
    sh, sw = module.stride if isinstance(module, nn.Conv2d) else (1, 1)
    dense = out_features * in_features * kh * kw
    if method == 'tucker2':
        r_out, r_in = ranks
        return (sh * sw * in_features * r_in + r_in * r_out * kh * kw + r_out * out_features) / dense
    (rank,) = ranks
    if method == 'cp':
        return rank * (sh * sw * in_features + sw * kh + kw + out_features) / dense
    return rank * (in_features + out_features) / dense  # svd: the first 1x1 carries the stride


def replacement_params(module: nn.Module, ranks: tuple[int, ...], method: str = 'auto') -> int:
    """Parameters of the replacement module (bias included), from shapes only."""
    method = _check_supported(module, method, '')
    out_features, in_features = module.weight.shape[:2]
    kh, kw = module.weight.shape[2:] if module.weight.dim() == 4 else (1, 1)
    bias = out_features if module.bias is not None else 0
    if method == 'tucker2':
        r_out, r_in = ranks
        return in_features * r_in + r_in * r_out * kh * kw + r_out * out_features + bias
    (rank,) = ranks
    spatial = kh + kw if method == 'cp' else 0
    return rank * (in_features + spatial + out_features) + bias


def _flops_ranks(module: nn.Module, fraction: float, method: str) -> tuple[int, ...]:
    """Ranks whose replacement costs ``fraction`` of the layer's MACs (clipped silently to the dims)."""
    dims = _mode_dims(module, method)
    if method == 'tucker2':
        # ratio(rho) = rho^2 + b * rho with r_out = rho * C_out, r_in = rho * C_in; take the positive root
        out_features, in_features = dims
        kh, kw = module.kernel_size
        sh, sw = module.stride
        b = (sh * sw * in_features ** 2 + out_features ** 2) / (out_features * in_features * kh * kw)
        rho = (-b + math.sqrt(b * b + 4 * fraction)) / 2
        ranks = (round(rho * out_features), round(rho * in_features))
    else:
        ranks = (round(fraction / flops_ratio(module, (1,), method)),)
    return tuple(min(max(1, rank), dim) for rank, dim in zip(ranks, dims))


def _parse_fraction(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value <= 1 else None


def resolve_ranks(module: nn.Module, rank: RankSpec, method: str = 'auto', layer_name: str = '') -> tuple[int, ...]:
    """Turn any rank spec into concrete ranks: ``(r_out, r_in)`` for tucker2, ``(r,)`` for svd and cp.

    Parameters
    ----------
    module : nn.Conv2d or nn.Linear
        The dense layer; weight of shape ``(C_out, C_in, k_h, k_w)`` or ``(out, in)``.
    rank : int, tuple of int, float, 'energy:<f>', 'vbmf' or 'flops:<f>'
        - int >= 1: the same rank on every mode; tuple/list: per mode ``(r_out, r_in)`` (``(r,)`` for svd/cp).
        - float in (0, 1]: fraction of channels, ``ceil(f * C_out)``, ``ceil(f * C_in)``
          (svd: ``ceil(f * min(out, in))``; cp: ``ceil(f * C_out)``).
        - ``'energy:f'``: smallest rank keeping fraction ``f`` of the squared singular values of each
          mode unfolding (cp uses mode 0).
        - ``'vbmf'``: Empirical VBMF rank of each mode unfolding (cp uses mode 0), at least 1.
        - ``'flops:f'``: the replacement costs fraction ``f`` of the layer's MACs (see :func:`flops_ratio`);
          tucker2 keeps the same fraction of channels on both modes.
    method : {'auto', 'tucker2', 'cp', 'svd'}
        ``'auto'`` is :func:`default_method`.
    layer_name : str
        Used in error and warning messages.

    Returns
    -------
    tuple of int
        Each in ``[1, dim]``. Explicit ranks above the dimension are clipped with a warning.

    Raises
    ------
    LayerCompressionError
        Unsupported layer for ``method``, or a rank spec of the wrong type or value.
    """
    method = _check_supported(module, method, layer_name)
    dims = _mode_dims(module, method)
    is_int = isinstance(rank, numbers.Integral) and not isinstance(rank, bool)
    if is_int or isinstance(rank, (tuple, list)):
        return _explicit_ranks(rank, is_int, dims, method, layer_name)
    if isinstance(rank, numbers.Real) and not isinstance(rank, bool):
        return _channel_fraction_ranks(module, rank, dims, method, layer_name)
    if not isinstance(rank, str):
        raise _rank_error(rank, dims, method, layer_name)
    return _spectral_ranks(module, rank, dims, method, layer_name)


def _rank_error(rank: RankSpec, dims: tuple[int, ...], method: str, layer_name: str) -> LayerCompressionError:
    """The error for a rank spec of the wrong type or value, naming the layer and the allowed forms."""
    return LayerCompressionError(f"Got rank={rank!r} for layer '{layer_name}' but expected "
                                 f"{_ALLOWED.format(n=len(dims))}", layer_name=layer_name, method=method)


def _explicit_ranks(rank: RankSpec, is_int: bool, dims: tuple[int, ...], method: str,
                    layer_name: str) -> tuple[int, ...]:
    """An int (every mode) or a tuple/list (per mode) of ranks >= 1, clipped to ``dims`` with a warning."""
    ranks = (rank,) * len(dims) if is_int else tuple(rank)
    if len(ranks) != len(dims) or not all(isinstance(r, numbers.Integral) and not isinstance(r, bool)
                                          and r >= 1 for r in ranks):
        raise _rank_error(rank, dims, method, layer_name)
    clipped = tuple(min(int(r), dim) for r, dim in zip(ranks, dims))
    if clipped != ranks:  # stacklevel 3: the warning points at resolve_ranks' caller
        warnings.warn(f"rank={rank!r} for layer '{layer_name}' exceeds the dimensions {dims} of "
                      f"method={method!r}; clipped to {clipped}", UserWarning, stacklevel=3)
    return clipped


def _channel_fraction_ranks(module: nn.Module, rank: float, dims: tuple[int, ...], method: str,
                            layer_name: str) -> tuple[int, ...]:
    """A fraction ``f`` in (0, 1] of the channels: ``ceil(f * C)`` per mode, at least 1, at most the mode's bound
    (a CP rank of a conv with few input channels is bounded below its output channels)."""
    if not 0 < rank <= 1:
        raise _rank_error(rank, dims, method, layer_name)
    out_features, in_features = module.weight.shape[:2]
    channels = {'tucker2': (out_features, in_features), 'cp': (out_features,), 'svd': dims}[method]
    return tuple(min(bound, max(1, math.ceil(rank * c - 1e-9))) for c, bound in zip(channels, dims))


def _spectral_ranks(module: nn.Module, rank: str, dims: tuple[int, ...], method: str,
                    layer_name: str) -> tuple[int, ...]:
    """``'flops:f'`` (by cost), or ``'energy:f'`` / ``'vbmf'`` from the spectra of the mode unfoldings."""
    kind, _, value = rank.partition(':')
    if kind == 'vbmf' and not value:
        estimate = _vbmf_rank
    elif kind in ('energy', 'flops') and _parse_fraction(value) is not None:
        fraction = _parse_fraction(value)
        if kind == 'flops':
            return _flops_ranks(module, fraction, method)
        estimate = functools.partial(_energy_rank, fraction=fraction)
    else:
        raise _rank_error(rank, dims, method, layer_name)
    try:
        matrices = _mode_unfoldings(module.weight, method)
    except ValueError as error:
        raise LayerCompressionError(f"Got rank={rank!r} for layer '{layer_name}', which {error}",
                                    layer_name=layer_name, method=method) from None
    return tuple(min(max(1, estimate(matrix)), dim) for matrix, dim in zip(matrices, dims))


def _tucker2_factors(weight: torch.Tensor, ranks: tuple[int, int]):
    """core (r_out, r_in, kh, kw), U_out (C_out, r_out), U_in (C_in, r_in)."""
    # random_state: when a rank exceeds what the other modes span (e.g. r_in > r_out * kh * kw), tensorly pads
    # the SVD with random columns; unseeded, the same layer would get different (equivalent) factors each call
    with tl.backend_context('pytorch'):
        (core, (u_out, u_in)), _ = partial_tucker(weight.detach().to(torch.float64), rank=list(ranks),
                                                  modes=[0, 1], init='svd', random_state=_CP_RANDOM_STATE)
    return core, u_out, u_in


def _cp_factors(weight: torch.Tensor, rank: int):
    """weights (r,), factors [(C_out, r), (C_in, r), (kh, r), (kw, r)]."""
    with tl.backend_context('pytorch'), warnings.catch_warnings():
        # svd init of a spatial mode (size k < rank) pads with seeded random columns; tensorly warns about it
        warnings.filterwarnings('ignore', message='Trying to compute SVD', category=UserWarning)
        cp_weights, factors = parafac(weight.detach().to(torch.float64), rank=rank, init='svd',
                                      random_state=_CP_RANDOM_STATE)
    return cp_weights, factors


def _svd_factors(matrix: torch.Tensor, rank: int):
    """left (out, r), right (r, in) with ``left @ right`` the best rank-r approximation of ``matrix``."""
    with tl.backend_context('pytorch'):
        u, s, vt = tl.tenalg.svd_interface(matrix.detach().to(torch.float64), n_eigenvecs=rank)
    root = s.sqrt()
    return u * root, root[:, None] * vt


def _require_real_weight(module: nn.Module, layer_name: str, method: str) -> None:
    if module.weight.is_meta:
        raise LayerCompressionError(f"Got a meta-device weight for layer '{layer_name}' but expected real weights "
                                    "to decompose", layer_name=layer_name, method=method)


def _param(tensor: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.reshape(like.shape).to(like.dtype).contiguous())


class _LowRank(nn.Sequential):
    """Base of the replacements: a Sequential of stock layers that remembers its ``ranks``."""

    method = ''
    ranks: tuple[int, ...]

    def extra_repr(self) -> str:
        return f'ranks={self.ranks}'

    @classmethod
    def from_dense(cls, module: nn.Module, ranks: RankSpec, layer_name: str = '') -> _LowRank:
        """Replacement of ``module`` (any rank spec of :func:`resolve_ranks`); same dtype, device and mode."""
        ranks = resolve_ranks(module, ranks, method=cls.method, layer_name=layer_name)
        _require_real_weight(module, layer_name, cls.method)
        replacement = cls._build(module, ranks)
        replacement.ranks = tuple(int(r) for r in ranks)
        return replacement.train(module.training)

    @classmethod
    def _build(cls, module: nn.Module, ranks: tuple[int, ...], factors=None) -> _LowRank:
        """The replacement with ``factors`` (computed from ``module.weight`` when None)."""
        raise NotImplementedError

    @classmethod
    def _random_factors(cls, module: nn.Module, ranks: tuple[int, ...]):
        """Factors of the right shapes, random: the architecture without a factorisation."""
        raise NotImplementedError


class _ConvLowRank(_LowRank):
    """A replacement of an ``nn.Conv2d``."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: RankSpec, layer_name: str = '') -> _ConvLowRank:
        """The replacement of ``conv`` at ``ranks`` (``from_dense``)."""
        return cls.from_dense(conv, ranks, layer_name)


def _copy_bias(dense: nn.Module, last: nn.Module) -> None:
    """The replacement's ``last`` layer takes a copy of the dense layer's bias (if it has one)."""
    if dense.bias is not None:
        last.bias = nn.Parameter(dense.bias.detach().clone())


def _conv(conv: nn.Conv2d, in_channels: int, out_channels: int, kernel_size=1, bias: bool = False, **kwargs):
    return nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias, device=conv.weight.device,
                     dtype=conv.weight.dtype, **kwargs)


class Tucker2Conv2d(_ConvLowRank):
    """Tucker-2 k x k conv: ``first`` 1x1 C_in -> r_in, ``core`` k x k r_in -> r_out, ``last`` 1x1 r_out -> C_out.

    ``ranks = (r_out, r_in)`` (tensorly's mode order). ``core`` keeps the original stride, padding,
    dilation and padding mode; ``last`` carries the bias. Exact at ``ranks == (C_out, C_in)``.
    """

    method = 'tucker2'

    @classmethod
    def _build(cls, conv, ranks, factors=None):
        r_out, r_in = ranks
        core, u_out, u_in = factors or _tucker2_factors(conv.weight, ranks)
        first = _conv(conv, conv.in_channels, r_in)
        middle = _conv(conv, r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, padding_mode=conv.padding_mode)
        last = _conv(conv, r_out, conv.out_channels, bias=conv.bias is not None)
        first.weight = _param(u_in.T, first.weight)
        middle.weight = _param(core, middle.weight)
        last.weight = _param(u_out, last.weight)
        _copy_bias(conv, last)
        return cls(OrderedDict(first=first, core=middle, last=last))

    @classmethod
    def _random_factors(cls, conv, ranks):
        r_out, r_in = ranks
        return (torch.randn(r_out, r_in, *conv.kernel_size), torch.randn(conv.out_channels, r_out),
                torch.randn(conv.in_channels, r_in))


class CPConv2d(_ConvLowRank):
    """CP k x k conv: ``first`` 1x1 C_in -> r, ``vertical`` k_h x 1 and ``horizontal`` 1 x k_w depthwise
    (groups=r), ``last`` 1x1 r -> C_out with the bias. ``ranks = (r,)``. Not exact at any rank in general.

    The stride, padding and dilation are split by axis between ``vertical`` and ``horizontal``.
    """

    method = 'cp'

    @classmethod
    def _build(cls, conv, ranks, factors=None):
        (rank,) = ranks
        cp_weights, (a_out, b_in, k_h, k_w) = factors or _cp_factors(conv.weight, rank)
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        pad_v, pad_h = (conv.padding, conv.padding) if isinstance(conv.padding, str) else \
            ((conv.padding[0], 0), (0, conv.padding[1]))
        first = _conv(conv, conv.in_channels, rank)
        vertical = _conv(conv, rank, rank, (kh, 1), stride=(sh, 1), padding=pad_v, dilation=(dh, 1), groups=rank)
        horizontal = _conv(conv, rank, rank, (1, kw), stride=(1, sw), padding=pad_h, dilation=(1, dw), groups=rank)
        last = _conv(conv, rank, conv.out_channels, bias=conv.bias is not None)
        first.weight = _param(b_in.T, first.weight)
        vertical.weight = _param(k_h.T, vertical.weight)
        horizontal.weight = _param(k_w.T, horizontal.weight)
        last.weight = _param(a_out * cp_weights, last.weight)
        _copy_bias(conv, last)
        return cls(OrderedDict(first=first, vertical=vertical, horizontal=horizontal, last=last))

    @classmethod
    def _random_factors(cls, conv, ranks):
        (rank,) = ranks
        return torch.ones(rank), [torch.randn(size, rank) for size in (conv.out_channels, conv.in_channels,
                                                                      *conv.kernel_size)]


class _SVD(_LowRank):
    """Truncated SVD of a dense layer: ``first`` in -> r (no bias), ``last`` r -> out (bias), ``sqrt(S)`` on both sides.

    ``ranks = (r,)``; exact at ``r == min(in, out)``. Subclasses build the two stock layers (``_layers``).
    """

    method = 'svd'

    @classmethod
    def _build(cls, dense, ranks, factors=None):
        (rank,) = ranks
        out_features, in_features = dense.weight.shape[:2]
        left, right = factors or _svd_factors(dense.weight.reshape(out_features, in_features), rank)
        first, last = cls._layers(dense, rank)
        first.weight = _param(right, first.weight)
        last.weight = _param(left, last.weight)
        _copy_bias(dense, last)
        return cls(OrderedDict(first=first, last=last))

    @classmethod
    def _random_factors(cls, dense, ranks):
        (rank,) = ranks
        out_features, in_features = dense.weight.shape[:2]
        return torch.randn(out_features, rank), torch.randn(rank, in_features)

    @staticmethod
    def _layers(dense: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
        """``(first, last)``: the stock layers in -> r and r -> out, same device and dtype as ``dense``."""
        raise NotImplementedError


class SVDConv2d(_SVD, _ConvLowRank):
    """Truncated SVD of a 1x1 conv: ``first`` 1x1 C_in -> r (stride, padding), ``last`` 1x1 r -> C_out (bias).

    ``ranks = (r,)``; exact at ``r == min(C_in, C_out)``.
    """

    @staticmethod
    def _layers(conv, rank):
        first = _conv(conv, conv.in_channels, rank, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, padding_mode=conv.padding_mode)
        last = _conv(conv, rank, conv.out_channels, bias=conv.bias is not None)
        return first, last


class SVDLinear(_SVD):
    """Truncated SVD of a Linear: ``first`` in -> r (no bias), ``last`` r -> out (bias). ``ranks = (r,)``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, ranks: RankSpec, layer_name: str = '') -> SVDLinear:
        return cls.from_dense(linear, ranks, layer_name)

    @staticmethod
    def _layers(linear, rank):
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        first = nn.Linear(linear.in_features, rank, bias=False, **factory)
        last = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, **factory)
        return first, last


def _replacement_class(module: nn.Module, method: str) -> type[_LowRank]:
    if method == 'svd':
        return SVDLinear if isinstance(module, nn.Linear) else SVDConv2d
    return Tucker2Conv2d if method == 'tucker2' else CPConv2d


def decompose_module(module: nn.Module, rank: RankSpec, method: str = 'auto', layer_name: str = '') -> nn.Module:
    """The low-rank replacement of ``module`` (a new module; ``module`` is not changed)."""
    method = _check_supported(module, method, layer_name)
    return _replacement_class(module, method).from_dense(module, rank, layer_name)


def replacement_architecture(module: nn.Module, ranks: tuple[int, ...], method: str = 'auto') -> nn.Module:
    """The low-rank replacement of ``module`` at concrete ``ranks`` with random factors, without factorising.

    Same layers, shapes, strides and dtype as :func:`decompose_module` builds: for timing (``latency``).
    """
    method = _check_supported(module, method, '')
    cls = _replacement_class(module, method)
    replacement = cls._build(module, tuple(ranks), cls._random_factors(module, tuple(ranks)))
    replacement.ranks = tuple(int(r) for r in ranks)
    return replacement.train(module.training)


@torch.no_grad()
def low_rank_weight(module: nn.Module, rank: RankSpec, method: str = 'auto', layer_name: str = '') -> torch.Tensor:
    """The reconstructed weight (shape, dtype and device of ``module.weight``) of the low-rank approximation.

    Lets a caller simulate decomposition by swapping weights without changing the architecture:
    Tucker-2 / CP reconstruction for k x k convs, the rank-r matrix for svd.
    """
    method = _check_supported(module, method, layer_name)
    ranks = resolve_ranks(module, rank, method, layer_name)
    _require_real_weight(module, layer_name, method)
    weight = module.weight
    if method == 'tucker2':
        core, u_out, u_in = _tucker2_factors(weight, ranks)
        rebuilt = torch.einsum('abhw,oa,ib->oihw', core, u_out, u_in)
    elif method == 'cp':
        cp_weights, (a_out, b_in, k_h, k_w) = _cp_factors(weight, ranks[0])
        rebuilt = torch.einsum('r,or,ir,hr,wr->oihw', cp_weights, a_out, b_in, k_h, k_w)
    else:
        left, right = _svd_factors(weight.reshape(weight.shape[0], -1), ranks[0])
        rebuilt = left @ right
    return rebuilt.reshape(weight.shape).to(weight.dtype)


def _gram_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **kwargs):
    """Truncated SVD ``(U, S, V)`` from the eigenvectors of the smaller Gram matrix (a tensorly ``svd`` callable).

    For the wide unfoldings of conv weights (C x C*k*k) this is one C x C ``eigh``. tensorly's own
    ``symeig_svd`` (0.10) takes the larger Gram for wide matrices (3136 x 3136 for ResNet-50's stem).
    """
    wide = matrix.shape[0] <= matrix.shape[1]
    gram = matrix @ matrix.T if wide else matrix.T @ matrix
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0), vectors.flip(1)
    count = min(n_eigenvecs or len(values), len(values))
    singular = values[:count].clamp_min(0).sqrt()
    safe = singular.clamp_min(torch.finfo(matrix.dtype).tiny)
    if wide:
        left = vectors[:, :count]
        return left, singular, (left.T @ matrix) / safe[:, None]
    right = vectors[:, :count]
    return (matrix @ right) / safe[None, :], singular, right.T


@torch.no_grad()
def low_rank_weights(module: nn.Module, ranks: list[RankSpec], method: str = 'auto',
                     layer_name: str = '') -> list[torch.Tensor]:
    """Reconstructed weights at several ranks from one factorisation (for sensitivity scans).

    ``'svd'``: one SVD, truncated per rank (exactly ``low_rank_weight``). ``'tucker2'``: per rank, the
    truncated HOSVD (tensorly's ``partial_tucker`` starting point) from one Gram eigendecomposition per
    mode, refined by ``SCAN_TUCKER_ITERATIONS`` HOOI sweeps (:func:`_refine_tucker2`). Its error is within
    a few percent of ``low_rank_weight``'s. ``'cp'``: one ``parafac`` per rank.
    """
    method = _check_supported(module, method, layer_name)
    resolved = [resolve_ranks(module, rank, method, layer_name) for rank in ranks]
    _require_real_weight(module, layer_name, method)
    if method == 'cp':
        return [low_rank_weight(module, rank, method, layer_name) for rank in resolved]
    weight = module.weight.detach()
    unfoldings = _mode_unfoldings(weight, method)
    # eigenvectors of the (C x C) Gram matrix: far cheaper than an SVD of the wide unfolding
    bases = [_gram_svd(matrix, n_eigenvecs=max(rank[index] for rank in resolved))[0]
             for index, matrix in enumerate(unfoldings)]
    weights = []
    for rank in resolved:
        factors = [basis[:, :size] for basis, size in zip(bases, rank)]
        if method == 'svd':
            rebuilt = factors[0] @ (factors[0].T @ unfoldings[0])
        else:
            rebuilt = _refine_tucker2(weight.to(torch.float64), factors, SCAN_TUCKER_ITERATIONS)
        weights.append(rebuilt.reshape(weight.shape).to(weight.dtype))
    return weights


def _refine_tucker2(tensor: torch.Tensor, factors: list[torch.Tensor], iterations: int) -> torch.Tensor:
    """HOOI on modes (0, 1) of ``tensor (C_out, C_in, kh, kw)`` from ``factors [(C_out, r_out), (C_in, r_in)]``.

    Returns the reconstruction ``core x_0 U_out x_1 U_in``. The same sweep as tensorly 0.10's
    ``partial_tucker``, whose loop calls ``svd_interface`` without its ``svd`` argument (a full SVD of
    every wide unfolding); here each update is one ``eigh`` of a C x C Gram matrix.
    """
    factors = list(factors)
    with tl.backend_context('pytorch'):
        for _ in range(iterations):
            for mode in (0, 1):
                rank = factors[mode].shape[1]
                projected = tl.unfold(tl.tenalg.mode_dot(tensor, factors[1 - mode].T, 1 - mode), mode)
                basis = _gram_svd(projected, n_eigenvecs=rank)[0]
                if basis.shape[1] < rank:  # rank above what the reduced tensor spans: complete the basis
                    basis = torch.linalg.eigh(projected @ projected.T)[1].flip(1)[:, :rank]
                factors[mode] = basis
        core = tl.tenalg.multi_mode_dot(tensor, factors, modes=[0, 1], transpose=True)
        return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def decompose_layers(model: nn.Module, ranks_by_name: dict[str, RankSpec],
                     method: str | dict[str, str] = 'auto') -> dict[str, tuple[int, ...]]:
    """Replace, in place, each named layer of ``model`` by its low-rank module under the same name.

    Parameters
    ----------
    model : nn.Module
        Changed in place; layer names as in ``model.named_modules()`` (e.g. ``'layer1.0.conv1'``).
    ranks_by_name : dict of str to rank spec
        Any form :func:`resolve_ranks` accepts.
    method : str or dict of str to str
        One method for every layer, or per name (missing names use ``'auto'``).

    Returns
    -------
    dict of str to tuple of int
        The concrete ranks used per layer.

    Notes
    -----
    All names and ranks are checked, and every replacement is built, before the model is changed:
    an error leaves ``model`` untouched.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in ranks_by_name if not name or name not in modules]
    if unknown:
        valid = [name for name, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))][:5]
        raise LayerCompressionError(f"Got layer name {unknown[0]!r} but expected a submodule name of the model, "
                                    f"e.g. {valid}", layer_name=unknown[0])
    methods = {name: method.get(name, 'auto') if isinstance(method, dict) else method for name in ranks_by_name}
    ranks = {name: resolve_ranks(modules[name], spec, methods[name], name) for name, spec in ranks_by_name.items()}
    replacements = {name: decompose_module(modules[name], ranks[name], methods[name], name) for name in ranks}
    for name, replacement in replacements.items():
        _set_submodule(model, name, replacement)
        _logger.debug('Decomposed %s with %s ranks %s', name, replacement.method, ranks[name])
    return ranks
