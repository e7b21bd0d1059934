"""Low-rank replacement of Conv2d/Linear layers: rank specs, tensorly factors, and stock-layer modules.

Three methods, each a ``nn.Sequential`` of stock ``nn.Conv2d``/``nn.Linear`` (fx-traceable,
ONNX-exportable, understood by torch-pruning and NNI's speedup):

- ``'tucker2'`` (k x k convs): 1x1 ``C_in -> r_in``, k x k ``r_in -> r_out``, 1x1 ``r_out -> C_out``
  (Kim et al. 2016), from ``tensorly.decomposition.partial_tucker`` on modes (0, 1).
- ``'cp'`` (k x k convs): 1x1 ``C_in -> r``, k_h x 1 and 1 x k_w depthwise, 1x1 ``r -> C_out``
  (Lebedev et al. 2015), from ``tensorly.decomposition.parafac``.
- ``'svd'`` (any conv with groups=1, and Linear): the SVD of the unfolded weight ``(C_out, C_in*kh*kw)``;
  ``first`` is a kh x kw conv ``C_in -> r`` (the layer's stride, padding, dilation; a 1x1 for a 1x1 conv),
  ``last`` a 1x1 ``r -> C_out``; ``sqrt(S)`` on both sides.

Every rank form (int, tuple, fraction of channels, ``'energy:0.9'``, ``'vbmf'``, ``'flops:0.4'``) goes
through :func:`resolve_ranks` once, before any math. tensorly runs only inside
``tl.backend_context('pytorch')``; the process-wide backend is never changed.

At full rank, Tucker-2 and SVD replacements reproduce the original layer's output (float round-off).

Data-aware factors: given ``input_moment`` ``S = E[x x^T]`` of shape ``(D, D)`` (``x`` the layer's input
patch as ``F.unfold`` orders it, ``D = C_in*kh*kw``; ``in_features`` for a Linear), the factors minimise
the output error ``E||(B - W~) x||^2 = ||(B - W~) S^{1/2}||_F^2`` instead of the weight error, with ``B``
the layer's weight unfolded to ``(C_out, D)`` or a caller's ``target`` (e.g. a ridge-refitted weight).
Ranks are still resolved from the weight; the bias stays the dense layer's; at full rank the output on
the inputs is B's (up to a 1e-6 relative ridge in Tucker-2's least squares). SVD and Tucker-2 are
data-aware (Kalle, Rudkiewicz et al. 2025; Zhang et al. 2016); CP has no closed-form whitened update
here, and with ``input_moment`` it is fitted data-free (to ``target`` when one is given).

References
----------
Kim et al. 2016, "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
Applications", ICLR. Nakajima et al. 2013, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR. Lebedev et al. 2015, "Speeding-up Convolutional Neural Networks
Using Fine-tuned CP-Decomposition", ICLR. Zhang et al. 2016, "Accelerating Very Deep Convolutional
Networks for Classification and Detection", TPAMI. Kalle, Rudkiewicz et al. 2025, "Distribution-aware
tensor decomposition for compression of convolutional neural networks", arXiv:2511.04494.
"""
from __future__ import annotations

import functools
import logging
import math
import numbers
import warnings
from collections import OrderedDict
from typing import Callable, NamedTuple, Union

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker
from torch import nn

from ..errors import LayerCompressionError
from .moments import all_finite

__all__ = ['METHODS', 'RankSpec', 'default_method', 'method_for', 'decomposable', 'flops_ratio', 'replacement_params',
           'resolve_ranks', 'round_ranks', 'Tucker2Conv2d', 'CPConv2d', 'SVDConv2d', 'SVDLinear', 'decompose_module',
           'replacement_architecture', 'low_rank_weight', 'low_rank_weights', 'decompose_layers', 'symmetrise_']

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
    """The method a plan uses for ``module``: ``rank_method`` ('auto' = 'tucker2', 'tucker2', 'cp' or 'svd') for a
    k x k conv, ``'svd'`` for a 1x1 conv or a Linear. ``'best'`` is the scan's choice per layer
    (``SensitivityTable.decompose_methods``); without a scan it stands for Tucker-2, whose layers SVD covers too."""
    method = default_method(module, layer_name)
    return method if method == 'svd' or rank_method in ('auto', 'best') else rank_method


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
    """Upper bound of each rank: (C_out, C_in) for tucker2, (min(C_out, C_in*kh*kw),) for svd, (prod/max,) for cp."""
    out_features, in_features = module.weight.shape[:2]
    if method == 'tucker2':
        return (out_features, in_features)
    if method == 'svd':
        return (min(out_features, module.weight[0].numel()),)
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
    threshold = torch.tensor(fraction - 1e-12, dtype=cumulative.dtype, device=cumulative.device)
    return int(torch.searchsorted(cumulative, threshold)) + 1


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
    depend on the spatial size. SVD's first conv (kh x kw, or 1x1) carries the stride and runs at the
    output resolution: ``r * (C_in*kh*kw + C_out) / (C_out*C_in*kh*kw)``. Works on ``device='meta'`` modules.
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
    return rank * (in_features * kh * kw + out_features) / dense  # svd: the first conv carries the stride


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
    if method == 'cp':
        return rank * (in_features + kh + kw + out_features) + bias
    return rank * (in_features * kh * kw + out_features) + bias


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
          (svd: ``ceil(f * min(C_out, C_in*kh*kw))``; cp: ``ceil(f * C_out)``).
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


def round_ranks(module: nn.Module, ranks: tuple[int, ...], method: str = 'auto', round_to: int = 1) -> tuple[int, ...]:
    """``ranks`` rounded up to multiples of ``round_to`` (hardware-friendly widths, e.g. 8), each capped at its
    mode's dimension (``resolve_ranks``' bounds); ``round_to=1`` returns them as they are."""
    if round_to <= 1:
        return tuple(ranks)
    dims = _mode_dims(module, _check_supported(module, method, ''))
    return tuple(min(dim, -(-int(rank) // round_to) * round_to) for rank, dim in zip(ranks, dims))


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


# ----------------------------------------------------------------------------------------------
# Data-aware factors: minimise ||(B - W~) S^{1/2}||_F^2 with S = E[x x^T] of the layer's unfolded input
# ----------------------------------------------------------------------------------------------

_RIDGE = 1e-6  # relative ridge of the projected moment (Tucker-2) and eigenvalue floor of S_c (channel whitening)


class _Calibration(NamedTuple):
    """The data of a data-aware fit, float64: ``target`` B ``(C_out, D)``, ``moment`` S ``(D, D)`` (symmetric) and
    ``weighted`` ``B S`` ``(C_out, D)``, shared by every candidate and rank (None for cp)."""

    target: torch.Tensor
    moment: torch.Tensor
    weighted: torch.Tensor | None


def _checked_tensor(key: str, value, shapes: list[tuple[int, ...]], non_finite: str, layer_name: str,
                    method: str) -> torch.Tensor:
    """``value`` as a detached tensor of one of ``shapes`` with finite entries; raises naming the layer."""
    value = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if tuple(value.shape) not in shapes:
        expected = ' or '.join(str(shape) for shape in shapes)
        raise LayerCompressionError(f"Got {key} of shape {tuple(value.shape)} for layer '{layer_name}' but expected "
                                    f"{expected}", layer_name=layer_name, method=method)
    if not all_finite(value):
        raise LayerCompressionError(f"Got {key} for layer '{layer_name}' with NaN or Inf entries: {non_finite}",
                                    layer_name=layer_name, method=method)
    return value


def _calibration(module: nn.Module, input_moment, target, layer_name: str, method: str) -> _Calibration | None:
    """The checked data of a data-aware fit on ``module``'s device (None: data-free).

    ``input_moment`` must be ``(D, D)`` with ``D = C_in*kh*kw`` (``in_features``); ``target`` ``(C_out, D)`` or the
    weight's shape, and only with ``input_moment``.
    """
    if input_moment is None:
        if target is not None:
            raise LayerCompressionError(f"Got a target for layer '{layer_name}' but no input_moment: a target is "
                                        "fitted in the norm of the layer's inputs; pass input_moment too",
                                        layer_name=layer_name, method=method)
        return None
    weight = module.weight.detach()
    out_features, features = weight.shape[0], weight[0].numel()
    moment = _checked_tensor('input_moment', input_moment, [(features, features)],
                             'the activations hold NaN or Inf; check the calibration inputs', layer_name, method)
    matrix = weight if target is None else _checked_tensor(
        'target', target, [(out_features, features), tuple(weight.shape)], 'check the refitted weight', layer_name,
        method)
    moment = moment.to(device=weight.device, dtype=torch.float64)
    if not torch.equal(moment, moment.T):  # a caller's symmetric moment (symmetrise_) is used without a copy
        moment = _symmetrised(moment)
    if (moment.diagonal() < 0).any():
        raise LayerCompressionError(f"Got input_moment for layer '{layer_name}' with negative diagonal entries but "
                                    "expected E[x x^T] (symmetric positive semi-definite)", layer_name=layer_name,
                                    method=method)
    matrix = matrix.to(device=weight.device, dtype=torch.float64).reshape(out_features, features)
    return _Calibration(matrix, moment, None if method == 'cp' else matrix @ moment)  # cp fits data-free


def _symmetrised(matrix: torch.Tensor) -> torch.Tensor:
    """``(matrix + matrix^T) / 2`` with one (D, D) temporary instead of two (the same bits: halving is exact)."""
    return (matrix + matrix.T).mul_(0.5)


def symmetrise_(matrix: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``matrix`` (D, D) replaced by ``(matrix + matrix^T) / 2`` in place, ``block`` rows at a time: the bits of the
    symmetrisation a data-aware fit applies, without its (D, D) copy. Returns ``matrix``."""
    for start in range(0, matrix.shape[0], block):
        stop = start + block
        average = (matrix[start:stop, start:] + matrix[start:, start:stop].T).mul_(0.5)
        matrix[start:stop, start:].copy_(average)
        matrix[start:, start:stop].copy_(average.T)
    return matrix


def _whitened_svd_basis(data: _Calibration) -> torch.Tensor:
    """Eigenvectors ``(C_out, C_out)`` of ``B S B^T``, largest eigenvalue first (left singular vectors of B S^{1/2})."""
    gram = data.weighted @ data.target.T
    return torch.linalg.eigh(_symmetrised(gram))[1].flip(1)


def _whitened_svd_factors(data: _Calibration, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """left ``L_r`` (C_out, r), right ``L_r^T B`` (r, D): ``L_r L_r^T B`` minimises ``||(B - W~) S^{1/2}||_F``
    over rank-r ``W~``.

    ``L_r`` are the top-r eigenvectors of ``B S B^T``; no inverse of S, so a singular S is fine. S = I gives
    the truncated SVD of B.
    """
    left = _whitened_svd_basis(data)[:, :rank]
    return left, left.T @ data.target


def _ridge_cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of ``matrix + lam*I``, ``lam = 1e-6 * tr(matrix) / dim`` (raised if round-off or a
    moment that is not PSD needs it)."""
    size = len(matrix)
    ridge = (_RIDGE * matrix.trace().abs() / size).clamp_min(torch.finfo(matrix.dtype).tiny)
    for _ in range(6):
        shifted = matrix.clone()
        shifted.diagonal().add_(ridge)  # matrix + ridge I, without a (D, D) identity
        factor, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0:
            return factor
        ridge = ridge * 100
    raise ValueError('Got an input moment that is not positive semi-definite but expected E[x x^T]')


def _tucker2_given_input(data: _Calibration, kernel_size: tuple[int, int], u_in: torch.Tensor,
                         r_out: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The optimal ``(core (r_out, r_in, kh, kw), U_out (C_out, r_out))`` for a fixed ``U_in (C_in, r_in)``, and the
    fit's in-sample error ``tr((B - W~) S (B - W~)^T)`` less the constant ``tr(B S B^T)``.

    With ``P = U_in^T (x) I_{kh*kw}`` ((r_in*kh*kw, D), input channel major as in the unfolding) and
    ``M = P S P^T + lam*I``: ``B* = B S P^T M^{-1}`` (C_out, r_in*kh*kw) is the least-squares map from the
    projected input, ``U_out`` the top-r_out eigenvectors of ``B* M B*^T`` (whose eigenvalues sum to the
    error's decrease) and ``core = U_out^T B*``; then ``W~ = U_out core P``.
    """
    features = data.moment.shape[0]
    out_features = data.target.shape[0]
    in_features, r_in = u_in.shape
    area = features // in_features
    size = r_in * area
    # S P^T as (P S)^T, S symmetric: one product of S's rows as they lie, not a permuted (D, D) copy of S
    moment_projected = (u_in.T @ data.moment.reshape(in_features, area * features)).reshape(size, features).T
    projected_moment = torch.einsum('csm,cb->bsm', moment_projected.reshape(in_features, area, size), u_in)
    projected_moment = projected_moment.reshape(size, size)  # P S P^T
    del moment_projected  # (D, r_in*kh*kw): freed before the factorisation's copies
    cross = torch.einsum('ocs,cb->obs', data.weighted.reshape(out_features, in_features, area), u_in)  # B S P^T
    factor = _ridge_cholesky(symmetrise_(projected_moment))  # L L^T = M
    scaled_cross = torch.linalg.solve_triangular(factor, cross.reshape(out_features, size).T, upper=False)  # L^-1 (.)^T
    response = scaled_cross.T @ scaled_cross  # B S P^T M^{-1} P S B^T = B* M B*^T
    values, vectors = torch.linalg.eigh(_symmetrised(response))
    u_out = vectors.flip(1)[:, :r_out]
    core = torch.linalg.solve_triangular(factor.T, scaled_cross @ u_out, upper=True).T  # U_out^T B*
    return core.reshape(r_out, r_in, *kernel_size), u_out, -float(values.flip(0)[:r_out].sum())


def _channel_whitening(data: _Calibration, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_c^{1/2}`` and ``S_c^{-1/2}`` (C_in, C_in) of the channel moment ``S_c`` (the mean of S's kh*kw diagonal
    blocks); eigenvalues below ``1e-6`` of the largest are raised to it (dead channels stay bounded)."""
    area = data.moment.shape[0] // in_features
    blocks = data.moment.reshape(in_features, area, in_features, area)
    channel_moment = blocks.diagonal(dim1=1, dim2=3).mean(-1)
    values, vectors = torch.linalg.eigh(_symmetrised(channel_moment))
    values = values.clamp_min((_RIDGE * values.max()).clamp_min(torch.finfo(values.dtype).tiny))
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


class _Tucker2InputCandidates:
    """The two input factors (C_in, r_in) a data-aware Tucker-2 fit tries, at any ranks up to ``max_ranks``:
    data-free HOOI's U_in (``input_factor(B)``, or the scans' HOOI), and ``S_c^{-1/2} U_in'`` with ``U_in'`` the scans'
    HOOI input factor of the channel-whitened ``B x_1 S_c^{1/2}`` (orthonormalised; only its span matters).

    ``B x = (B S_c^{1/2}) (S_c^{-1/2} x)`` with ``S_c^{-1/2} x`` of unit channel moment, so the whitened
    projection ``U_in'^T S_c^{-1/2} x`` keeps the input directions that matter for the output. The whitening and
    the truncated HOSVD bases (the HOOI starting points, each on first use) are computed once, for every rank a scan
    asks for.
    """

    def __init__(self, data: _Calibration, kernel_size: tuple[int, int], max_ranks: tuple[int, int]):
        out_features, features = data.target.shape
        in_features = features // (kernel_size[0] * kernel_size[1])
        self.tensor = data.target.reshape(out_features, in_features, *kernel_size)
        root, self.inv_root = _channel_whitening(data, in_features)
        self.whitened = torch.einsum('ochw,cd->odhw', self.tensor, root)
        self.max_ranks = max_ranks
        self.bases: dict[str, list[torch.Tensor]] = {}

    def __call__(self, ranks: tuple[int, int],
                 input_factor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Both candidates at ``ranks``; ``input_factor`` (None: the scans' HOOI) gives the data-free one."""
        plain = self._scan_input('plain', ranks) if input_factor is None else input_factor(self.tensor)
        return [plain, torch.linalg.qr(self.inv_root @ self._scan_input('whitened', ranks)).Q]

    def _scan_input(self, key: str, ranks: tuple[int, int]) -> torch.Tensor:
        """U_in of the scans' cheap HOOI: the truncated HOSVD then ``SCAN_TUCKER_ITERATIONS`` sweeps."""
        tensor = self.tensor if key == 'plain' else self.whitened
        if key not in self.bases:  # apply's fit, given data-free HOOI's factor, never needs the plain tensor's
            self.bases[key] = [_gram_svd(matrix, n_eigenvecs=size)[0]
                               for matrix, size in zip(_mode_unfoldings(tensor, 'tucker2'), self.max_ranks)]
        bases = [basis[:, :size] for basis, size in zip(self.bases[key], ranks)]
        return _hooi_factors(tensor, bases, SCAN_TUCKER_ITERATIONS)[1]


def _whitened_tucker2_factors(data: _Calibration, kernel_size: tuple[int, int], ranks: tuple[int, int],
                              candidates: list[torch.Tensor]):
    """core (r_out, r_in, kh, kw), U_out (C_out, r_out), U_in (C_in, r_in) minimising ``||(B - W~) S^{1/2}||_F``
    over ``(core, U_out)`` for each candidate U_in (:class:`_Tucker2InputCandidates`); the lower in-sample error
    wins, so the result is never worse in-sample than data-free HOOI at the same ranks (up to the ridge)."""
    fits = [(_tucker2_given_input(data, kernel_size, u_in, ranks[0]), u_in) for u_in in candidates]
    (core, u_out, _), u_in = min(fits, key=lambda fit: fit[0][2])
    return core, u_out, u_in


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
    def from_dense(cls, module: nn.Module, ranks: RankSpec, layer_name: str = '', *,
                   input_moment: torch.Tensor | None = None, target: torch.Tensor | None = None) -> _LowRank:
        """Replacement of ``module`` (any rank spec of :func:`resolve_ranks`); same dtype, device and mode.

        With ``input_moment`` S ``(D, D)`` the factors minimise the output error ``||(B - W~) S^{1/2}||_F`` instead
        of the weight error, B = ``target`` ``(C_out, D)`` or the weight (see :func:`low_rank_weight`).
        """
        ranks = resolve_ranks(module, ranks, method=cls.method, layer_name=layer_name)
        _require_real_weight(module, layer_name, cls.method)
        data = _calibration(module, input_moment, target, layer_name, cls.method)
        replacement = cls._build(module, ranks, cls._factors(module, ranks, data))
        replacement.ranks = tuple(int(r) for r in ranks)
        return replacement.train(module.training)

    @classmethod
    def _factors(cls, module: nn.Module, ranks: tuple[int, ...], data: _Calibration | None):
        """The factors of ``module`` at ``ranks``: of its weight (data-free) when ``data`` is None."""
        raise NotImplementedError

    @staticmethod
    def _reconstruct(factors) -> torch.Tensor:
        """The weight the factors stand for (reshape it to the dense weight's shape)."""
        raise NotImplementedError

    @classmethod
    def _build(cls, module: nn.Module, ranks: tuple[int, ...], factors) -> _LowRank:
        """The replacement with ``factors`` (those of :meth:`_factors` or :meth:`_random_factors`)."""
        raise NotImplementedError

    @classmethod
    def _random_factors(cls, module: nn.Module, ranks: tuple[int, ...]):
        """Factors of the right shapes, random: the architecture without a factorisation."""
        raise NotImplementedError


class _ConvLowRank(_LowRank):
    """A replacement of an ``nn.Conv2d``."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: RankSpec, layer_name: str = '', *,
                  input_moment: torch.Tensor | None = None, target: torch.Tensor | None = None) -> _ConvLowRank:
        """The replacement of ``conv`` at ``ranks`` (``from_dense``)."""
        return cls.from_dense(conv, ranks, layer_name, input_moment=input_moment, target=target)


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
    Data-aware: ``first`` is ``U_in^T`` (not orthonormal in general), see :func:`_whitened_tucker2_factors`.
    """

    method = 'tucker2'

    @classmethod
    def _factors(cls, conv, ranks, data):
        if data is None:
            return _tucker2_factors(conv.weight, ranks)
        candidates = _Tucker2InputCandidates(data, conv.kernel_size, ranks)
        return _whitened_tucker2_factors(data, conv.kernel_size, ranks,
                                         candidates(ranks, lambda tensor: _tucker2_factors(tensor, ranks)[2]))

    @staticmethod
    def _reconstruct(factors):
        core, u_out, u_in = factors
        return torch.einsum('abhw,oa,ib->oihw', core, u_out, u_in)

    @classmethod
    def _build(cls, conv, ranks, factors):
        r_out, r_in = ranks
        core, u_out, u_in = factors
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

    The stride, padding and dilation are split by axis between ``vertical`` and ``horizontal``. CP has no
    closed-form whitened update here: with an input moment it is fitted data-free (to the target, if any).
    """

    method = 'cp'

    @classmethod
    def _factors(cls, conv, ranks, data):
        return _cp_factors(conv.weight if data is None else data.target.reshape(conv.weight.shape), ranks[0])

    @staticmethod
    def _reconstruct(factors):
        cp_weights, (a_out, b_in, k_h, k_w) = factors
        return torch.einsum('r,or,ir,hr,wr->oihw', cp_weights, a_out, b_in, k_h, k_w)

    @classmethod
    def _build(cls, conv, ranks, factors):
        (rank,) = ranks
        cp_weights, (a_out, b_in, k_h, k_w) = factors
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
    """Truncated SVD of a dense layer's unfolded weight ``(out, D)``: ``first`` in -> r (no bias), ``last`` r -> out
    (bias), ``sqrt(S)`` on both sides.

    ``ranks = (r,)``; exact at ``r == min(out, D)``. Data-aware: ``last = L_r``, ``first = L_r^T B``
    (:func:`_whitened_svd_factors`). Subclasses build the two stock layers (``_layers``).
    """

    method = 'svd'

    @classmethod
    def _factors(cls, dense, ranks, data):
        if data is None:
            return _svd_factors(dense.weight.reshape(dense.weight.shape[0], -1), ranks[0])
        return _whitened_svd_factors(data, ranks[0])

    @staticmethod
    def _reconstruct(factors):
        left, right = factors
        return left @ right

    @classmethod
    def _build(cls, dense, ranks, factors):
        (rank,) = ranks
        left, right = factors
        first, last = cls._layers(dense, rank)
        first.weight = _param(right, first.weight)
        last.weight = _param(left, last.weight)
        _copy_bias(dense, last)
        return cls(OrderedDict(first=first, last=last))

    @classmethod
    def _random_factors(cls, dense, ranks):
        (rank,) = ranks
        return torch.randn(dense.weight.shape[0], rank), torch.randn(rank, dense.weight[0].numel())

    @staticmethod
    def _layers(dense: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
        """``(first, last)``: the stock layers in -> r and r -> out, same device and dtype as ``dense``."""
        raise NotImplementedError


class SVDConv2d(_SVD, _ConvLowRank):
    """Truncated SVD of a conv's unfolded weight ``(C_out, C_in*kh*kw)``: ``first`` kh x kw conv C_in -> r (the
    conv's stride, padding, dilation and padding mode; no bias), ``last`` 1x1 r -> C_out (bias).

    ``ranks = (r,)``; exact at ``r == min(C_out, C_in*kh*kw)``. A 1x1 conv gets two 1x1 convs.
    """

    @staticmethod
    def _layers(conv, rank):
        first = _conv(conv, conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, padding_mode=conv.padding_mode)
        last = _conv(conv, rank, conv.out_channels, bias=conv.bias is not None)
        return first, last


class SVDLinear(_SVD):
    """Truncated SVD of a Linear: ``first`` in -> r (no bias), ``last`` r -> out (bias). ``ranks = (r,)``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, ranks: RankSpec, layer_name: str = '', *,
                    input_moment: torch.Tensor | None = None, target: torch.Tensor | None = None) -> SVDLinear:
        return cls.from_dense(linear, ranks, layer_name, input_moment=input_moment, target=target)

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


def decompose_module(module: nn.Module, rank: RankSpec, method: str = 'auto', layer_name: str = '', *,
                     input_moment: torch.Tensor | None = None, target: torch.Tensor | None = None) -> nn.Module:
    """The low-rank replacement of ``module`` (a new module; ``module`` is not changed).

    ``input_moment`` S ``(D, D)`` and ``target`` B ``(C_out, D)``: data-aware factors, see :func:`low_rank_weight`.
    """
    method = _check_supported(module, method, layer_name)
    return _replacement_class(module, method).from_dense(module, rank, layer_name, input_moment=input_moment,
                                                         target=target)


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
def low_rank_weight(module: nn.Module, rank: RankSpec, method: str = 'auto', layer_name: str = '', *,
                    input_moment: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
    """The reconstructed weight (shape, dtype and device of ``module.weight``) of the low-rank approximation.

    Lets a caller simulate decomposition by swapping weights without changing the architecture:
    Tucker-2 / CP reconstruction for k x k convs, the rank-r matrix for svd.

    Data-free (``input_moment=None``): minimises ``||W - W~||_F``. With ``input_moment`` S ``(D, D)`` (symmetric
    PSD, ``D = C_in*kh*kw`` in ``F.unfold``'s order, ``in_features`` for a Linear): minimises the output error
    ``E||(B - W~) x||^2 = ||(B - W~) S^{1/2}||_F^2`` over the factors, with B = ``target`` ``(C_out, D)`` or the
    weight. svd: ``L_r L_r^T B`` with ``L_r`` the top-r eigenvectors of ``B S B^T``; tucker2: the exact
    ``(core, U_out)`` for the better of two input factors (:func:`_whitened_tucker2_factors`); cp: data-free
    (to B). The ranks are resolved from the weight as without data.
    """
    method = _check_supported(module, method, layer_name)
    ranks = resolve_ranks(module, rank, method, layer_name)
    _require_real_weight(module, layer_name, method)
    data = _calibration(module, input_moment, target, layer_name, method)
    cls = _replacement_class(module, method)
    rebuilt = cls._reconstruct(cls._factors(module, ranks, data))
    return rebuilt.reshape(module.weight.shape).to(module.weight.dtype)


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
def low_rank_weights(module: nn.Module, ranks: list[RankSpec], method: str = 'auto', layer_name: str = '', *,
                     input_moment: torch.Tensor | None = None,
                     target: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Reconstructed weights at several ranks from one factorisation (for sensitivity scans).

    ``'svd'``: one SVD, truncated per rank (exactly ``low_rank_weight``). ``'tucker2'``: per rank, the
    truncated HOSVD (tensorly's ``partial_tucker`` starting point) from one Gram eigendecomposition per
    mode, refined by ``SCAN_TUCKER_ITERATIONS`` HOOI sweeps (:func:`_refine_tucker2`). Its error is within
    a few percent of ``low_rank_weight``'s. ``'cp'``: one ``parafac`` per rank.

    With ``input_moment`` (and ``target``), as :func:`low_rank_weight`'s data-aware fit: svd from one ``eigh`` of
    ``B S B^T``; tucker2 per rank, its input-factor candidates from the scans' HOOI above.
    """
    method = _check_supported(module, method, layer_name)
    resolved = [resolve_ranks(module, rank, method, layer_name) for rank in ranks]
    _require_real_weight(module, layer_name, method)
    data = _calibration(module, input_moment, target, layer_name, method)
    if method == 'cp':
        return [low_rank_weight(module, rank, method, layer_name, input_moment=input_moment, target=target)
                for rank in resolved]
    weight = module.weight.detach()
    if data is not None:
        return [rebuilt.reshape(weight.shape).to(weight.dtype)
                for rebuilt in _data_aware_weights(module, resolved, method, data)]
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


def _data_aware_weights(module: nn.Module, resolved: list[tuple[int, ...]], method: str,
                        data: _Calibration) -> list[torch.Tensor]:
    """Data-aware ``W~`` (C_out, D) per rank for svd (one ``eigh`` of ``B S B^T``) or tucker2 (a fit per rank)."""
    if method == 'svd':
        basis = _whitened_svd_basis(data)
        return [basis[:, :rank] @ (basis[:, :rank].T @ data.target) for (rank,) in resolved]
    candidates = _Tucker2InputCandidates(data, module.kernel_size, tuple(max(sizes) for sizes in zip(*resolved)))
    return [Tucker2Conv2d._reconstruct(_whitened_tucker2_factors(data, module.kernel_size, ranks, candidates(ranks)))
            for ranks in resolved]


def _hooi_factors(tensor: torch.Tensor, factors: list[torch.Tensor], iterations: int) -> list[torch.Tensor]:
    """HOOI on modes (0, 1) of ``tensor (C_out, C_in, kh, kw)`` from ``factors [(C_out, r_out), (C_in, r_in)]``.

    The same sweep as tensorly 0.10's ``partial_tucker``, whose loop calls ``svd_interface`` without its
    ``svd`` argument (a full SVD of every wide unfolding); here each update is one ``eigh`` of a C x C Gram matrix.
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
    return factors


def _refine_tucker2(tensor: torch.Tensor, factors: list[torch.Tensor], iterations: int) -> torch.Tensor:
    """The reconstruction ``core x_0 U_out x_1 U_in`` after :func:`_hooi_factors` (``tensor`` float64)."""
    factors = _hooi_factors(tensor, factors, iterations)
    with tl.backend_context('pytorch'):
        core = tl.tenalg.multi_mode_dot(tensor, factors, modes=[0, 1], transpose=True)
        return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def decompose_layers(model: nn.Module, ranks_by_name: dict[str, RankSpec], method: str | dict[str, str] = 'auto', *,
                     input_moments: dict[str, torch.Tensor] | None = None,
                     targets: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[int, ...]]:
    """Replace, in place, each named layer of ``model`` by its low-rank module under the same name.

    Parameters
    ----------
    model : nn.Module
        Changed in place; layer names as in ``model.named_modules()`` (e.g. ``'layer1.0.conv1'``).
    ranks_by_name : dict of str to rank spec
        Any form :func:`resolve_ranks` accepts.
    method : str or dict of str to str
        One method for every layer, or per name (missing names use ``'auto'``).
    input_moments : dict of str to Tensor, optional
        Per layer name, the input second moment ``(D, D)`` of a data-aware fit (:func:`low_rank_weight`);
        layers without one are factorised data-free, moments of layers not in ``ranks_by_name`` are unused.
    targets : dict of str to Tensor, optional
        Per layer name, the ``(C_out, D)`` weight to approximate instead of the layer's (needs its input moment).

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
    input_moments, targets = input_moments or {}, targets or {}
    unknown = [name for name in [*ranks_by_name, *input_moments, *targets] if not name or name not in modules]
    if unknown:
        valid = [name for name, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))][:5]
        raise LayerCompressionError(f"Got layer name {unknown[0]!r} but expected a submodule name of the model, "
                                    f"e.g. {valid}", layer_name=unknown[0])
    methods = {name: method.get(name, 'auto') if isinstance(method, dict) else method for name in ranks_by_name}
    ranks = {name: resolve_ranks(modules[name], spec, methods[name], name) for name, spec in ranks_by_name.items()}
    replacements = {name: decompose_module(modules[name], ranks[name], methods[name], name,
                                           input_moment=input_moments.get(name), target=targets.get(name))
                    for name in ranks}
    for name, replacement in replacements.items():
        _set_submodule(model, name, replacement)
        _logger.debug('Decomposed %s with %s ranks %s%s', name, replacement.method, ranks[name],
                      ' (data-aware)' if name in input_moments else '')
    return ranks
