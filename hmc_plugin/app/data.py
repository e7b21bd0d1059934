"""Datasets the CLI and the tests compress on: scikit-learn digits (plain or a harder generated set), CIFAR-10
batches, any ImageFolder.

Every loader returns a :class:`DataSplits` whose datasets yield ``(image, label)`` with ``image`` a
float32 ``(C, H, W)`` tensor (normalised, ``H == W == image_size``) and ``label`` an int64 scalar.
Nothing here downloads: digits ship inside scikit-learn, CIFAR-10 and ImageFolder data must already
be on disk. Every split and every order is seeded, so the same arguments give identical tensors.

``digits_hard`` (:func:`load_hard_digits_data`) is generated from the 1,797 scikit-learn digits so that
baselines no longer saturate: the source digits are split first (stratified, the same split as
``digits``), then every source gives several randomly warped, coloured and noisy variants, so no
source digit is in both splits. See that function's docstring for every transform and its range.
"""
from __future__ import annotations

import dataclasses
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..errors import HMCConfigError

__all__ = ['CIFAR10_MEAN', 'CIFAR10_STD', 'IMAGENET_MEAN', 'IMAGENET_STD', 'DataSplits', 'load_digits_data',
           'load_hard_digits_data', 'load_cifar10_data', 'load_imagefolder_data', 'parse_data_spec', 'make_loaders',
           'train_permutation', 'without_train_images', 'calibration_batch', 'subset_splits']

_logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)


CIFAR10_STD = (0.2470, 0.2435, 0.2616)


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


_CIFAR_DIRNAME = 'cifar-10-batches-py'


_CIFAR_TRAIN_FILES = tuple(f'data_batch_{i}' for i in range(1, 6))


_CIFAR_TEST_FILE = 'test_batch'


_DATA_SPEC_FORMS = "'digits', 'digits_hard', 'cifar10:DIR' or 'imagefolder:DIR'"


@dataclass
class DataSplits:
    """A train and a test dataset plus what a model needs to know about their images.

    Both datasets yield ``(image, label)``: ``image`` float32 ``(in_channels, image_size, image_size)``,
    ``label`` an int64 in ``[0, num_classes)``.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str

    def __repr__(self) -> str:
        return (f'DataSplits(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, '
                f'num_classes={self.num_classes}, in_channels={self.in_channels}, image_size={self.image_size})')


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise HMCConfigError(f'Got {name}={value!r} but expected a positive integer.')
    return int(value)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise HMCConfigError(f'Got {name}={value!r} but expected a float strictly between 0 and 1.')
    return float(value)


def _resize(images: Tensor, image_size: int) -> Tensor:
    """Bilinear resize of ``(N, C, H, W)`` float images to ``(N, C, image_size, image_size)``."""
    if images.shape[-2:] == (image_size, image_size):
        return images
    return F.interpolate(images, size=(image_size, image_size), mode='bilinear', align_corners=False)


def _split_digits(test_fraction: float, seed: int) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray]:
    """scikit-learn's digits as float ``(1797, 1, 8, 8)`` pixels in [0, 1] and int64 labels, with the indices of
    the stratified, seeded train / test split (shared by ``digits`` and ``digits_hard``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.as_tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           stratify=digits.target, random_state=seed)
    return pixels, labels, train_idx, test_idx


def load_digits_data(image_size: int = 32, in_channels: int = 3, test_fraction: float = 0.2,
                     seed: int = 0) -> DataSplits:
    """scikit-learn's 1797 real 8x8 handwritten digits, upsampled to ``image_size`` (no download).

    Pixels 0..16 are scaled to 0..1, normalised with the train split's mean/std (one scalar each),
    bilinearly upsampled and repeated to ``in_channels``. The split is stratified and seeded by
    ``seed``. Returns TensorDatasets of float32 ``(N, in_channels, image_size, image_size)`` and int64
    labels; 10 classes.
    """
    image_size = _check_positive_int('image_size', image_size)
    in_channels = _check_positive_int('in_channels', in_channels)
    test_fraction = _check_fraction('test_fraction', test_fraction)

    pixels, labels, train_idx, test_idx = _split_digits(test_fraction, seed)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)

    mean = pixels[train_idx].mean()
    std = pixels[train_idx].std()
    images = _resize((pixels - mean) / std, image_size).repeat(1, in_channels, 1, 1).contiguous()
    return DataSplits(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        test=TensorDataset(images[test_idx], labels[test_idx]),
        num_classes=10, in_channels=in_channels, image_size=image_size, name='digits',
    )


# digits_hard: the ranges of the random variants (uniform draws, one per image unless noted).
_HARD_ROTATION_DEG = 20.0  # rotation in [-20, 20] degrees
_HARD_SCALE = (0.8, 1.15)  # isotropic scale of the digit (> 1 enlarges it)
_HARD_SHEAR = 0.15  # horizontal shear factor in [-0.15, 0.15] (about +-8.5 degrees)
_HARD_SHIFT = 0.12  # translation per axis in [-0.12, 0.12] of the image side
_HARD_MIN_CONTRAST = 0.5  # least Euclidean RGB distance between the background and the foreground colour
_HARD_COLOUR_TRIES = 16  # colour pairs drawn per image; the first far enough apart is kept
_HARD_GRADIENT = 0.15  # per-channel background gradient amplitude in [-0.15, 0.15] per unit of the ramp
_HARD_NOISE_STD = (0.03, 0.12)  # std of the additive Gaussian noise, drawn per image
_HARD_SPLIT_STREAMS = {'train': 0, 'test': 1}


class _SourcedTensorDataset(TensorDataset):
    """A TensorDataset of ``(image, label)`` that remembers which scikit-learn digit each image was made from.

    ``sources``: int64 ``(N,)`` indices into ``sklearn.datasets.load_digits()``; ``mean`` / ``std``: float32
    ``(C,)``, the per-channel statistics the images were normalised with (the training split's, in both splits).
    """

    def __init__(self, images: Tensor, labels: Tensor, sources: Tensor, mean: Tensor, std: Tensor):
        super().__init__(images, labels)
        self.sources = sources
        self.mean = mean
        self.std = std


def _check_seed(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2 ** 32:
        raise HMCConfigError(f'Got seed={value!r} but expected an integer in [0, 2**32).')
    return int(value)


def _split_generator(seed: int, split: str) -> torch.Generator:
    """A generator for one split of ``digits_hard``: its stream depends on ``seed`` and the split only."""
    state = np.random.SeedSequence([seed, _HARD_SPLIT_STREAMS[split]]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _hard_variants(masks: Tensor, generator: torch.Generator) -> Tensor:
    """Warped, coloured, noisy images from digit masks: float ``(N, 1, S, S)`` in [0, 1] -> ``(N, 3, S, S)`` in [0, 1].

    Draws, in this order and one vectorised call each: rotation, scale, shear, shift, colour pairs, gradient
    direction, gradient amplitudes, noise std, noise (see :func:`load_hard_digits_data` for the ranges).
    """
    n, _, size, _ = masks.shape
    angle = torch.deg2rad(_uniform(generator, -_HARD_ROTATION_DEG, _HARD_ROTATION_DEG, n))
    scale = _uniform(generator, *_HARD_SCALE, n)
    shear = _uniform(generator, -_HARD_SHEAR, _HARD_SHEAR, n)
    shift = _uniform(generator, -2 * _HARD_SHIFT, 2 * _HARD_SHIFT, n, 2)  # normalised coordinates: a side spans 2

    # The digit moves by p_out = scale * R(angle) @ [[1, shear], [0, 1]] @ p_in + shift; affine_grid wants the
    # inverse map p_in = [[1, -shear], [0, 1]] @ R(angle)^T @ (p_out - shift) / scale.
    cos, sin = angle.cos(), angle.sin()
    rotation_t = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (n, 2, 2)
    unshear = torch.eye(2).repeat(n, 1, 1)
    unshear[:, 0, 1] = -shear
    inverse = unshear @ rotation_t / scale[:, None, None]
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], dim=-1)  # (n, 2, 3)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    warped = F.grid_sample(masks, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

    pairs = torch.rand(n, _HARD_COLOUR_TRIES, 2, 3, generator=generator)  # (image, try, back/fore, RGB)
    distance = (pairs[:, :, 0] - pairs[:, :, 1]).norm(dim=-1)
    far_enough = distance >= _HARD_MIN_CONTRAST
    # The first pair far enough apart (argmax returns the first maximum), else the farthest one.
    choice = torch.where(far_enough.any(1), far_enough.to(torch.uint8).argmax(1), distance.argmax(1))
    chosen = pairs[torch.arange(n), choice]
    background, foreground = chosen[:, 0, :, None, None], chosen[:, 1, :, None, None]  # (n, 3, 1, 1)

    direction = _uniform(generator, 0.0, 2 * np.pi, n)
    amplitude = _uniform(generator, -_HARD_GRADIENT, _HARD_GRADIENT, n, 3)
    centres = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres in (-1, 1)
    ramp = (direction.cos()[:, None, None] * centres[None, None, :]
            + direction.sin()[:, None, None] * centres[None, :, None])  # (n, S, S), |ramp| < sqrt(2)
    background = background + amplitude[:, :, None, None] * ramp[:, None]

    noise_std = _uniform(generator, *_HARD_NOISE_STD, n)
    images = background + warped * (foreground - background)
    images = images + noise_std[:, None, None, None] * torch.randn(n, 3, size, size, generator=generator)
    return images.clamp_(0.0, 1.0)


def load_hard_digits_data(image_size: int = 32, train_per_source: int = 4, test_per_source: int = 6,
                          seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """``digits_hard``: random warped, coloured, noisy variants of scikit-learn's 1,797 digits (no download).

    Split: the SOURCE digits are split first, stratified by class and seeded by ``seed`` (the same split as
    :func:`load_digits_data`; ``test_fraction`` of them, 360 of 1,797 by default, are test sources). Each train
    source gives ``train_per_source`` variants and each test source ``test_per_source``, so no source digit is
    in both splits; the defaults give 1,437 x 4 = 5,748 train and 360 x 6 = 2,160 test images.

    Each variant, drawn independently and uniformly: the 8x8 digit (pixels 0..16 -> 0..1) is bilinearly
    upsampled to ``image_size`` and warped with ``affine_grid`` / ``grid_sample`` (bilinear, zeros outside):
    rotation in +-20 degrees, isotropic scale in [0.8, 1.15], horizontal shear factor in +-0.15, translation
    in +-12 % of the side per axis. Colours: a background and a foreground RGB colour, each channel in [0, 1],
    at least 0.5 apart (Euclidean; the first of 16 drawn pairs that is, else the farthest); the background
    gets a linear gradient along a random direction, per-channel slope in +-0.15 per half side (so at most
    +-0.21 at a corner). Each pixel is ``background + mask * (foreground - background)``, then Gaussian
    noise with a per-image std in [0.03, 0.12] is added and values are clipped to [0, 1]. Finally both
    splits are normalised per channel with the mean/std of the generated TRAIN images.

    Deterministic: each split draws from its own ``torch.Generator`` seeded from ``(seed, split)``, in a
    fixed order, in one vectorised pass. The datasets yield float32 ``(3, image_size, image_size)`` and
    int64 labels (10 classes) and keep ``sources`` (int64 ``(N,)``, indices into ``load_digits()``, the
    sources in increasing order, each repeated per variant) and the ``mean`` / ``std`` used (float32 ``(3,)``).
    """
    image_size = _check_positive_int('image_size', image_size)
    train_per_source = _check_positive_int('train_per_source', train_per_source)
    test_per_source = _check_positive_int('test_per_source', test_per_source)
    seed = _check_seed(seed)
    test_fraction = _check_fraction('test_fraction', test_fraction)

    pixels, labels, train_sources, test_sources = _split_digits(test_fraction, seed)
    masks = _resize(pixels, image_size).clamp_(0.0, 1.0)  # (1797, 1, S, S)

    def generate(sources: np.ndarray, per_source: int, split: str) -> tuple[Tensor, Tensor, Tensor]:
        image_sources = torch.as_tensor(np.sort(sources), dtype=torch.int64).repeat_interleave(per_source)
        images = _hard_variants(masks[image_sources], _split_generator(seed, split))
        return images, labels[image_sources], image_sources

    train_images, train_labels, train_image_sources = generate(train_sources, train_per_source, 'train')
    test_images, test_labels, test_image_sources = generate(test_sources, test_per_source, 'test')
    mean = train_images.to(torch.float64).mean(dim=(0, 2, 3)).to(torch.float32)
    std = train_images.to(torch.float64).std(dim=(0, 2, 3)).to(torch.float32)

    def normalise(images: Tensor) -> Tensor:
        return images.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))

    return DataSplits(
        train=_SourcedTensorDataset(normalise(train_images), train_labels, train_image_sources, mean, std),
        test=_SourcedTensorDataset(normalise(test_images), test_labels, test_image_sources, mean, std),
        num_classes=10, in_channels=3, image_size=image_size, name='digits_hard',
    )


class _NormalizedUint8Dataset(Dataset):
    """Keeps uint8 ``(N, 3, 32, 32)`` images (4x less memory) and normalises/resizes one per access."""

    def __init__(self, images: Tensor, labels: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                 image_size: int):
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = (self.images[index].to(torch.float32) / 255.0 - self.mean) / self.std
        image = _resize(image.unsqueeze(0), self.image_size).squeeze(0)
        return image, self.labels[index]


def _cifar_layout_error(data_dir: Path, problem: str) -> HMCConfigError:
    return HMCConfigError(
        f"CIFAR-10 data not usable at '{data_dir}': {problem}. Expected the python version directory "
        f"'{_CIFAR_DIRNAME}' (either '{data_dir}' itself or '{data_dir / _CIFAR_DIRNAME}') containing "
        f"{', '.join(_CIFAR_TRAIN_FILES)} (at least data_batch_1) and {_CIFAR_TEST_FILE}, optionally "
        f"batches.meta. hmc_plugin never downloads data: download cifar-10-python.tar.gz from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it there beforehand.")


def _read_pickle(path: Path, data_dir: Path) -> dict:
    try:
        with open(path, 'rb') as handle:
            content = pickle.load(handle, encoding='bytes')
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise _cifar_layout_error(data_dir, f"cannot read '{path}' ({exc})") from exc
    if not isinstance(content, dict):
        raise _cifar_layout_error(data_dir, f"'{path}' is not a pickled dict")
    # Files written by Python 3 tools may use str keys; the official ones use bytes.
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()}


def _read_cifar_batch(path: Path, data_dir: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR batch file -> uint8 ``(N, 3, 32, 32)`` images and int64 ``(N,)`` labels."""
    content = _read_pickle(path, data_dir)
    if 'data' not in content or 'labels' not in content:
        raise _cifar_layout_error(data_dir, f"'{path}' lacks the b'data' or b'labels' entry")
    data = np.asarray(content['data'], dtype=np.uint8)
    labels = np.asarray(content['labels'], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise _cifar_layout_error(
            data_dir, f"'{path}' holds data of shape {data.shape} and {len(labels)} labels; "
                      f"expected (N, 3072) uint8 and N labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _resolve_cifar_dir(data_dir: Path) -> Path:
    nested = data_dir / _CIFAR_DIRNAME
    return nested if nested.is_dir() else data_dir


def load_cifar10_data(data_dir: str | Path, image_size: int = 32, max_train: int | None = None,
                      max_test: int | None = None) -> DataSplits:
    """CIFAR-10 from the extracted python-version batches already on disk (never downloads).

    ``data_dir`` is ``cifar-10-batches-py`` itself or its parent. Every ``data_batch_*`` present is
    loaded (at least one is required) plus ``test_batch``; ``max_train``/``max_test`` keep the first
    N images of each split. Images are normalised with the usual CIFAR-10 mean/std and bilinearly
    resized when ``image_size != 32``; the datasets yield float32 ``(3, image_size, image_size)``.
    """
    image_size = _check_positive_int('image_size', image_size)
    if max_train is not None:
        max_train = _check_positive_int('max_train', max_train)
    if max_test is not None:
        max_test = _check_positive_int('max_test', max_test)

    given_dir = Path(data_dir).expanduser()
    if not given_dir.is_dir():
        raise _cifar_layout_error(given_dir, 'the directory does not exist')
    cifar_dir = _resolve_cifar_dir(given_dir)
    train_files = [cifar_dir / name for name in _CIFAR_TRAIN_FILES if (cifar_dir / name).is_file()]
    test_file = cifar_dir / _CIFAR_TEST_FILE
    if not train_files:
        raise _cifar_layout_error(given_dir, f"no data_batch_1 .. data_batch_5 file in '{cifar_dir}'")
    if not test_file.is_file():
        raise _cifar_layout_error(given_dir, f"'{test_file}' is missing")
    if len(train_files) < len(_CIFAR_TRAIN_FILES):
        _logger.info('CIFAR-10: using %d of 5 training batches found in %s', len(train_files), cifar_dir)

    train_parts = [_read_cifar_batch(path, given_dir) for path in train_files]
    train_images = torch.cat([images for images, _ in train_parts])[:max_train]
    train_labels = torch.cat([labels for _, labels in train_parts])[:max_train]
    test_images, test_labels = _read_cifar_batch(test_file, given_dir)
    test_images, test_labels = test_images[:max_test], test_labels[:max_test]

    num_classes = 10
    meta_file = cifar_dir / 'batches.meta'
    if meta_file.is_file():
        label_names = _read_pickle(meta_file, given_dir).get('label_names')
        if label_names:
            num_classes = len(label_names)
    all_labels = torch.cat([train_labels, test_labels])
    if len(all_labels) and (int(all_labels.min()) < 0 or int(all_labels.max()) >= num_classes):
        raise _cifar_layout_error(
            given_dir, f'labels range over [{int(all_labels.min())}, {int(all_labels.max())}] '
                       f'but there are {num_classes} classes')

    return DataSplits(
        train=_NormalizedUint8Dataset(train_images, train_labels, CIFAR10_MEAN, CIFAR10_STD, image_size),
        test=_NormalizedUint8Dataset(test_images, test_labels, CIFAR10_MEAN, CIFAR10_STD, image_size),
        num_classes=num_classes, in_channels=3, image_size=image_size, name='cifar10',
    )


def _imagefolder_layout_error(data_dir: Path, problem: str) -> HMCConfigError:
    return HMCConfigError(
        f"ImageFolder data not usable at '{data_dir}': {problem}. Expected one folder per class holding "
        f"images (root/class_x/xxx.png, root/class_y/yyy.jpg), either directly in '{data_dir}' (split "
        f"into train/test by a seeded permutation) or in '{data_dir / 'train'}' and "
        f"'{data_dir / 'val'}' (or '{data_dir / 'test'}').")


def _seeded_stratified_split(targets: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, a seeded permutation of its indices; the first ``round(n * test_fraction)`` go to test.

    Every class with at least two images keeps at least one image on each side.
    """
    generator = torch.Generator().manual_seed(seed)
    targets_tensor = torch.as_tensor(targets, dtype=torch.int64)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for label in torch.unique(targets_tensor).tolist():
        class_idx = torch.nonzero(targets_tensor == label).flatten()
        class_idx = class_idx[torch.randperm(len(class_idx), generator=generator)].tolist()
        n_test = round(len(class_idx) * test_fraction)
        if len(class_idx) >= 2:
            n_test = min(max(n_test, 1), len(class_idx) - 1)
        test_idx.extend(class_idx[:n_test])
        train_idx.extend(class_idx[n_test:])
    return sorted(train_idx), sorted(test_idx)


def load_imagefolder_data(data_dir: str | Path, image_size: int = 224, test_fraction: float = 0.2,
                          seed: int = 0) -> DataSplits:
    """A torchvision ImageFolder tree (root/class_x/xxx.png), with ``train``/``val`` subfolders or split here.

    Test transform: Resize(int(image_size * 1.14)) of the shorter side, CenterCrop(image_size),
    ImageNet mean/std; train adds a RandomHorizontalFlip (the only randomness). A single folder is
    split per class by a permutation seeded with ``seed``. The datasets yield float32
    ``(3, image_size, image_size)``. Needs torchvision (``pip install hmc_plugin[vision]``).
    """
    image_size = _check_positive_int('image_size', image_size)
    test_fraction = _check_fraction('test_fraction', test_fraction)
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise HMCConfigError(
            "Got data='imagefolder:...' but torchvision is not installed; "
            "run `pip install hmc_plugin[vision]`.") from exc

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise _imagefolder_layout_error(root, 'the directory does not exist')

    test_transform = transforms.Compose([
        transforms.Resize(int(image_size * 1.14)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    train_transform = transforms.Compose([
        transforms.Resize(int(image_size * 1.14)),
        transforms.CenterCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])

    def open_folder(folder: Path, transform) -> Dataset:
        try:
            return datasets.ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, RuntimeError) as exc:
            # torchvision raises FileNotFoundError for no class folders or no images in them.
            raise _imagefolder_layout_error(root, f"'{folder}' has no class folders with images ({exc})") from exc

    test_dir = next((root / name for name in ('val', 'test') if (root / name).is_dir()), None)
    if (root / 'train').is_dir() and test_dir is not None:
        train_set = open_folder(root / 'train', train_transform)
        test_set = open_folder(test_dir, test_transform)
        if train_set.classes != test_set.classes:
            raise _imagefolder_layout_error(
                root, f"'{root / 'train'}' has classes {train_set.classes} but '{test_dir}' has "
                      f"{test_set.classes}; both must hold the same class folders")
        classes = train_set.classes
    else:
        train_full = open_folder(root, train_transform)
        test_full = open_folder(root, test_transform)
        train_idx, test_idx = _seeded_stratified_split(train_full.targets, test_fraction, seed)
        if not train_idx or not test_idx:
            raise _imagefolder_layout_error(
                root, f'{len(train_full)} images are too few to split into train and test')
        train_set, test_set = Subset(train_full, train_idx), Subset(test_full, test_idx)
        classes = train_full.classes

    return DataSplits(train=train_set, test=test_set, num_classes=len(classes), in_channels=3,
                      image_size=image_size, name='imagefolder')


def parse_data_spec(spec: str, image_size: int | None = None) -> DataSplits:
    """Load the data a CLI string names: ``'digits'``, ``'digits_hard'``, ``'cifar10:DIR'`` or ``'imagefolder:DIR'``.

    ``image_size=None`` keeps the loader's default (32 for both digits sets and CIFAR-10, 224 for ImageFolder).
    """
    if not isinstance(spec, str):
        raise HMCConfigError(f'Got data={spec!r} but expected {_DATA_SPEC_FORMS}.')
    kind, sep, location = spec.strip().partition(':')
    kind = kind.strip().lower()
    size_kwargs = {} if image_size is None else {'image_size': image_size}
    if kind == 'digits' and not sep:
        return load_digits_data(**size_kwargs)
    if kind == 'digits_hard' and not sep:
        return load_hard_digits_data(**size_kwargs)
    if kind == 'cifar10' and location.strip():
        return load_cifar10_data(location.strip(), **size_kwargs)
    if kind == 'imagefolder' and location.strip():
        return load_imagefolder_data(location.strip(), **size_kwargs)
    raise HMCConfigError(f'Got data={spec!r} but expected {_DATA_SPEC_FORMS}.')


def make_loaders(splits: DataSplits, batch_size: int = 64, seed: int = 0,
                 num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled by a generator seeded with ``seed``) and test loader (in order).

    Two calls with the same ``seed`` give the same sequence of train batches.
    """
    batch_size = _check_positive_int('batch_size', batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise HMCConfigError(f'Got num_workers={num_workers!r} but expected a non-negative integer.')
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(splits.train, batch_size=batch_size, shuffle=True, generator=generator,
                              num_workers=num_workers)
    test_loader = DataLoader(splits.test, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, test_loader


def train_permutation(splits: DataSplits, seed: int = 0) -> list[int]:
    """The seeded order of the train split's indices that ``calibration_batch`` takes its images from."""
    return torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed)).tolist()


def without_train_images(splits: DataSplits, indices: Sequence[int]) -> DataSplits:
    """``splits`` whose train split leaves out ``indices`` (e.g. images held out to choose a setting on)."""
    left_out = set(indices)
    kept = [index for index in range(len(splits.train)) if index not in left_out]
    return dataclasses.replace(splits, train=Subset(splits.train, kept))


def calibration_batch(splits: DataSplits, size: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed batch from the train split for cheap proxy scans: the first ``size`` of a seeded permutation.

    Returns float32 inputs ``(size, C, H, W)`` and int64 labels ``(size,)``; ``size`` is capped at the
    train split's length. Identical across calls with the same ``seed``, even with random train
    transforms, and leaves the global RNG untouched.
    """
    size = _check_positive_int('size', size)
    n_train = len(splits.train)
    if size > n_train:
        _logger.info('calibration_batch: asked for %d images, train split has %d; using all', size, n_train)
        size = n_train
    indices = train_permutation(splits, seed)[:size]
    # fork_rng: random train transforms (ImageFolder's flip) draw from a seeded, private RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = [splits.train[index] for index in indices]
    inputs = torch.stack([image for image, _ in samples])
    labels = torch.as_tensor([int(label) for _, label in samples], dtype=torch.int64)
    return inputs, labels


def subset_splits(splits: DataSplits, max_train: int | None = None, max_test: int | None = None,
                  seed: int = 0) -> DataSplits:
    """At most ``max_train`` / ``max_test`` images of each split (None keeps all): the first of a permutation
    seeded with ``seed``, so short runs (tests, quick trials) see a fixed, class-mixed sample."""
    def limit(dataset: Dataset, size: int | None, name: str) -> Dataset:
        if size is None or _check_positive_int(name, size) >= len(dataset):
            return dataset
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
        return Subset(dataset, sorted(indices.tolist()))

    return DataSplits(train=limit(splits.train, max_train, 'max_train'), test=limit(splits.test, max_test, 'max_test'),
                      num_classes=splits.num_classes, in_channels=splits.in_channels,
                      image_size=splits.image_size, name=splits.name)
