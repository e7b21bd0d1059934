"""Data loaders: digits, digits_hard, CIFAR-10 batches on disk, ImageFolder trees, spec parsing, loaders,
calibration."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hmc_plugin.app.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataSplits,
    calibration_batch,
    load_cifar10_data,
    load_digits_data,
    load_hard_digits_data,
    load_imagefolder_data,
    make_loaders,
    parse_data_spec,
)
from hmc_plugin.errors import HMCConfigError


@pytest.fixture(scope='module')
def digits() -> DataSplits:
    return load_digits_data()


# ----------------------------------------------------------------------------------------- digits

def test_digits_shapes_classes_and_sizes(digits):
    image, label = digits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    assert (digits.num_classes, digits.in_channels, digits.image_size, digits.name) == (10, 3, 32, 'digits')
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == pytest.approx(0.2 * 1797, abs=1)
    train_images = digits.train.tensors[0]
    assert train_images.shape == (len(digits.train), 3, 32, 32)
    # Normalised with the train split's statistics.
    assert abs(train_images.mean().item()) < 0.05
    assert torch.equal(train_images[:, 0], train_images[:, 2])


def test_digits_same_seed_gives_identical_tensors(digits):
    again = load_digits_data(seed=0)
    for left, right in zip(digits.train.tensors + digits.test.tensors, again.train.tensors + again.test.tensors):
        assert torch.equal(left, right)


def test_digits_other_seed_gives_other_split(digits):
    other = load_digits_data(seed=1)
    assert not torch.equal(digits.test.tensors[1], other.test.tensors[1])


def test_digits_split_is_stratified(digits):
    test_counts = torch.bincount(digits.test.tensors[1], minlength=10)
    assert (test_counts > 0).all()
    assert test_counts.max() - test_counts.min() <= 3


def test_digits_custom_size_and_channels():
    splits = load_digits_data(image_size=16, in_channels=1)
    assert splits.train[0][0].shape == (1, 16, 16)
    assert splits.image_size == 16 and splits.in_channels == 1


@pytest.mark.parametrize('kwargs', [{'image_size': 0}, {'in_channels': -1}, {'test_fraction': 1.5}])
def test_digits_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(HMCConfigError, match=next(iter(kwargs))):
        load_digits_data(**kwargs)


# ----------------------------------------------------------------------------------------- CIFAR-10

def _write_cifar(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> tuple[dict, dict]:
    """A tiny cifar-10-batches-py in the official pickle format (bytes keys); returns what was written."""
    rng = np.random.default_rng(seed)
    cifar_dir = root / 'cifar-10-batches-py'
    cifar_dir.mkdir(parents=True)
    train = {b'data': rng.integers(0, 256, size=(n_train, 3072), dtype=np.uint8),
             b'labels': [int(v) for v in rng.integers(0, 10, size=n_train)],
             b'batch_label': b'training batch 1 of 5'}
    test = {b'data': rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8),
            b'labels': [int(v) for v in rng.integers(0, 10, size=n_test)], b'batch_label': b'testing batch 1 of 1'}
    meta = {b'label_names': [name.encode() for name in
                             ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')],
            b'num_cases_per_batch': 10000, b'num_vis': 3072}
    for name, content in (('data_batch_1', train), ('test_batch', test), ('batches.meta', meta)):
        with open(cifar_dir / name, 'wb') as handle:
            pickle.dump(content, handle)
    return train, test


def test_cifar_loads_written_batches_exactly(tmp_path):
    train, test = _write_cifar(tmp_path)
    splits = load_cifar10_data(tmp_path / 'cifar-10-batches-py')
    assert (len(splits.train), len(splits.test), splits.num_classes, splits.name) == (20, 10, 10, 'cifar10')
    image, label = splits.train[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert int(label) == train[b'labels'][3]
    assert [int(splits.test[i][1]) for i in range(10)] == test[b'labels']
    # Undo the normalisation on one pixel: channel 1, row 5, column 7 (row-major 3x32x32).
    channel, row, col = 1, 5, 7
    raw = train[b'data'][3, channel * 1024 + row * 32 + col]
    restored = image[channel, row, col].item() * CIFAR10_STD[channel] + CIFAR10_MEAN[channel]
    assert restored * 255.0 == pytest.approx(float(raw), abs=1e-3)


def test_cifar_accepts_parent_dir_and_limits(tmp_path):
    _write_cifar(tmp_path)
    splits = load_cifar10_data(str(tmp_path), image_size=16, max_train=7, max_test=4)
    assert (len(splits.train), len(splits.test)) == (7, 4)
    assert splits.train[0][0].shape == (3, 16, 16) and splits.image_size == 16


def test_cifar_without_meta_has_ten_classes(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / 'cifar-10-batches-py' / 'batches.meta').unlink()
    assert load_cifar10_data(tmp_path).num_classes == 10


def test_cifar_missing_dir_names_path_and_files(tmp_path):
    missing = tmp_path / 'nowhere'
    with pytest.raises(HMCConfigError) as info:
        load_cifar10_data(missing)
    assert 'data_batch_1' in str(info.value) and str(missing) in str(info.value)
    assert 'download' in str(info.value)


def test_cifar_dir_without_batches_names_path_and_files(tmp_path):
    with pytest.raises(HMCConfigError) as info:
        load_cifar10_data(tmp_path)
    assert 'data_batch_1' in str(info.value) and str(tmp_path) in str(info.value)


def test_cifar_missing_test_batch_is_reported(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / 'cifar-10-batches-py' / 'test_batch').unlink()
    with pytest.raises(HMCConfigError, match='test_batch'):
        load_cifar10_data(tmp_path)


# ----------------------------------------------------------------------------------------- ImageFolder

def _write_image_folder(root: Path, classes=('cat', 'dog', 'fox'), per_class: int = 5, seed: int = 0) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f'{index}.png')


def test_imagefolder_single_folder_is_split_per_class(tmp_path):
    _write_image_folder(tmp_path)
    splits = load_imagefolder_data(tmp_path, image_size=32)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (3, 3, 32)
    assert len(splits.train) + len(splits.test) == 15
    assert len(splits.test) == 3
    image, _ = splits.test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert sorted(int(splits.test[i][1]) for i in range(len(splits.test))) == [0, 1, 2]
    again = load_imagefolder_data(tmp_path, image_size=32)
    assert list(again.test.indices) == list(splits.test.indices)
    assert torch.equal(again.test[1][0], splits.test[1][0])


def test_imagefolder_train_val_subfolders(tmp_path):
    _write_image_folder(tmp_path / 'train', classes=('a', 'b'), per_class=4)
    _write_image_folder(tmp_path / 'val', classes=('a', 'b'), per_class=2, seed=1)
    splits = load_imagefolder_data(tmp_path, image_size=32)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (8, 4, 2)
    assert splits.train[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize('make_empty', [False, True])
def test_imagefolder_missing_or_empty_dir_raises(tmp_path, make_empty):
    root = tmp_path / 'images'
    if make_empty:
        (root / 'class_a').mkdir(parents=True)
    with pytest.raises(HMCConfigError) as info:
        load_imagefolder_data(root, image_size=32)
    assert str(root) in str(info.value) and 'class_x' in str(info.value)


# ----------------------------------------------------------------------------------------- specs

def test_parse_data_spec_accepts_the_three_forms(tmp_path):
    assert parse_data_spec('digits').name == 'digits'
    assert parse_data_spec('digits', image_size=16).image_size == 16
    _write_cifar(tmp_path / 'c')
    assert parse_data_spec(f'cifar10:{tmp_path / "c"}').name == 'cifar10'
    _write_image_folder(tmp_path / 'i')
    splits = parse_data_spec(f'imagefolder:{tmp_path / "i"}', image_size=24)
    assert splits.name == 'imagefolder' and splits.train[0][0].shape == (3, 24, 24)


@pytest.mark.parametrize('spec', ['mnist', 'cifar10', 'cifar10:', 'imagefolder', 'digits:x', 'digits_hard:x', ''])
def test_parse_data_spec_rejects_other_values(spec):
    with pytest.raises(HMCConfigError) as info:
        parse_data_spec(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "'digits'" in message and "'cifar10:DIR'" in message and "'imagefolder:DIR'" in message
    assert "'digits_hard'" in message


# ----------------------------------------------------------------------------------------- loaders

def test_make_loaders_shuffle_reproducibly(digits):
    first_train, test_loader = make_loaders(digits, batch_size=32, seed=3)
    second_train, _ = make_loaders(digits, batch_size=32, seed=3)
    other_train, _ = make_loaders(digits, batch_size=32, seed=4)
    labels_first = next(iter(first_train))[1]
    assert torch.equal(labels_first, next(iter(second_train))[1])
    assert not torch.equal(next(iter(first_train))[0], next(iter(other_train))[0])
    # The train loader shuffles; the test loader keeps the dataset order.
    assert not torch.equal(next(iter(make_loaders(digits, 32, seed=3)[0]))[0], digits.train.tensors[0][:32])
    assert torch.equal(next(iter(test_loader))[1], digits.test.tensors[1][:32])


def test_calibration_batch_is_deterministic_and_from_train(digits):
    inputs, labels = calibration_batch(digits, size=16, seed=0)
    again_inputs, again_labels = calibration_batch(digits, size=16, seed=0)
    assert inputs.shape == (16, 3, 32, 32) and labels.shape == (16,) and labels.dtype == torch.int64
    assert torch.equal(inputs, again_inputs) and torch.equal(labels, again_labels)
    assert not torch.equal(inputs, calibration_batch(digits, size=16, seed=1)[0])
    train_images = digits.train.tensors[0]
    assert all((train_images == row).flatten(1).all(1).any() for row in inputs)


def test_calibration_batch_caps_size_and_is_fixed_under_random_flips(tmp_path):
    _write_image_folder(tmp_path)
    splits = load_imagefolder_data(tmp_path, image_size=32)
    inputs, _ = calibration_batch(splits, size=100)
    assert inputs.shape[0] == len(splits.train)
    for _ in range(3):
        assert torch.equal(inputs, calibration_batch(splits, size=100)[0])


def test_held_out_train_images_are_left_out_of_the_probe_split():
    from hmc_plugin.app.data import calibration_batch, load_digits_data, train_permutation, without_train_images

    splits = load_digits_data()
    order = train_permutation(splits, seed=3)
    assert sorted(order) == list(range(len(splits.train)))
    images, _ = calibration_batch(splits, 5, seed=3)
    assert all(torch.equal(images[i], splits.train[order[i]][0]) for i in range(5))  # the same seeded order
    held_out = order[5:25]
    probe = without_train_images(splits, held_out)
    assert len(probe.train) == len(splits.train) - 20 and probe.test is splits.test
    assert not set(probe.train.indices) & set(held_out)


# ----------------------------------------------------------------------------------------- digits_hard

@pytest.fixture(scope='module')
def hard_digits() -> DataSplits:
    return load_hard_digits_data()


def _nearest_class_mean_accuracy(splits: DataSplits) -> float:
    """Test accuracy in [0, 1] of the nearest class mean (Euclidean) on flattened pixels."""
    train_images, train_labels = splits.train.tensors
    test_images, test_labels = splits.test.tensors
    class_means = torch.stack([train_images[train_labels == label].flatten(1).mean(0)
                               for label in range(splits.num_classes)])
    predicted = torch.cdist(test_images.flatten(1), class_means).argmin(1)
    return (predicted == test_labels).float().mean().item()


def test_hard_digits_no_source_digit_crosses_the_split(hard_digits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    targets = load_digits().target
    train_sources = set(hard_digits.train.sources.tolist())
    test_sources = set(hard_digits.test.sources.tolist())
    assert not train_sources & test_sources
    assert train_sources | test_sources == set(range(1797))
    # The stratified split of load_digits_data with the same seed and test_fraction.
    _, expected_test = train_test_split(np.arange(1797), test_size=0.2, stratify=targets, random_state=0)
    assert test_sources == set(expected_test.tolist())
    for split in (hard_digits.train, hard_digits.test):
        assert torch.equal(split.tensors[1], torch.as_tensor(targets, dtype=torch.int64)[split.sources])


def test_hard_digits_sizes_are_sources_times_variants(hard_digits):
    assert (len(hard_digits.train), len(hard_digits.test)) == (1437 * 4, 360 * 6)
    assert len(hard_digits.test) >= 2000
    for split, per_source in ((hard_digits.train, 4), (hard_digits.test, 6)):
        counts = torch.bincount(split.sources, minlength=1797)
        assert set(counts.tolist()) == {0, per_source}
    small = load_hard_digits_data(image_size=16, train_per_source=1, test_per_source=2, test_fraction=0.5)
    assert (len(small.train), len(small.test)) == (898, 899 * 2)
    assert small.train[0][0].shape == (3, 16, 16) and small.image_size == 16


def test_hard_digits_are_deterministic_per_seed(hard_digits):
    again = load_hard_digits_data()
    for left, right in ((hard_digits.train, again.train), (hard_digits.test, again.test)):
        assert all(torch.equal(a, b) for a, b in zip(left.tensors + (left.sources,), right.tensors + (right.sources,)))
    other = load_hard_digits_data(seed=1)
    assert not torch.equal(hard_digits.train.tensors[0], other.train.tensors[0])
    assert not torch.equal(hard_digits.test.sources, other.test.sources)
    # The test images do not depend on how many train variants were drawn (only their normalisation does).
    fewer = load_hard_digits_data(train_per_source=1)
    raw, raw_fewer = (split.test.tensors[0] * split.test.std.view(-1, 1, 1) + split.test.mean.view(-1, 1, 1)
                      for split in (hard_digits, fewer))
    assert torch.allclose(raw, raw_fewer, atol=1e-5)


def test_hard_digits_shapes_dtypes_and_classes(hard_digits):
    assert (hard_digits.num_classes, hard_digits.in_channels, hard_digits.image_size, hard_digits.name) == \
        (10, 3, 32, 'digits_hard')
    for split in (hard_digits.train, hard_digits.test):
        image, label = split[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label.shape == () and label.dtype == torch.int64
        labels = split.tensors[1]
        assert int(labels.min()) >= 0 and int(labels.max()) < 10
        assert (torch.bincount(labels, minlength=10) > 0).all()
        assert split.sources.dtype == torch.int64 and split.sources.shape == labels.shape


def test_hard_digits_are_normalised_with_train_statistics(hard_digits):
    train_images = hard_digits.train.tensors[0]
    assert train_images.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (train_images.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    assert torch.equal(hard_digits.test.mean, hard_digits.train.mean)
    assert torch.equal(hard_digits.test.std, hard_digits.train.std)
    mean, std = hard_digits.train.mean.view(-1, 1, 1), hard_digits.train.std.view(-1, 1, 1)
    raw_test = hard_digits.test.tensors[0] * std + mean
    assert raw_test.min() > -1e-5 and raw_test.max() < 1 + 1e-5  # clipped to [0, 1] before normalising


def test_hard_digits_are_harder_than_digits(hard_digits, digits):
    # Measured: 0.894 on digits, 0.118 on digits_hard (chance 0.1); deterministic data, so no chance failure.
    plain = _nearest_class_mean_accuracy(digits)
    hard = _nearest_class_mean_accuracy(hard_digits)
    assert plain > 0.8 and hard < 0.3 and plain - hard > 0.5


def test_parse_data_spec_gives_digits_hard():
    splits = parse_data_spec(' digits_hard ', image_size=16)
    assert splits.name == 'digits_hard' and splits.train[0][0].shape == (3, 16, 16)
    assert len(splits.test) == 360 * 6


@pytest.mark.parametrize('kwargs', [{'image_size': 0}, {'train_per_source': 0}, {'test_per_source': 1.5},
                                    {'seed': -1}, {'test_fraction': 1.0}])
def test_hard_digits_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(HMCConfigError, match=next(iter(kwargs))):
        load_hard_digits_data(**kwargs)
