"""Shared, session-scoped assets: the digits data and a briefly trained CIFAR ResNet-20."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from hmc_plugin.app.data import calibration_batch, load_digits_data, make_loaders
from hmc_plugin.app.models import resnet20
from hmc_plugin.app.training import train, training_step

logging.getLogger('nni').setLevel(logging.WARNING)

# End-to-end modules that train, scan, fine-tune or start NNI: `pytest -m "not slow"` leaves them out (the inner
# loop); CI and the README's test command run everything.
SLOW_MODULES = {'test_benchmarks', 'test_cli_recipes', 'test_compressor', 'test_latency_budget', 'test_margin_rule',
                'test_nni_experiment', 'test_pruning_speedup', 'test_reliability', 'test_reliability_layers',
                'test_sensitivity_plan', 'test_settings_flow', 'test_torchvision_family', 'test_baseline_training',
                'test_warmup_benchmark', 'test_data_aware', 'test_nni_user_flow', 'test_distributed',
                'test_nni_remote'}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit('.', 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope='session')
def digits():
    return load_digits_data()


@pytest.fixture(scope='session')
def loaders(digits):
    return make_loaders(digits, batch_size=64, seed=0)


@pytest.fixture(scope='session')
def calibration(digits):
    return calibration_batch(digits, 32, seed=0)


@pytest.fixture(scope='session')
def trained_resnet20_state(loaders):
    """state_dict of ResNet-20 after 3 epochs on digits (about 10 s; ~90 % test accuracy)."""
    torch.manual_seed(0)
    model = resnet20(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train(model, optimizer, training_step, loaders[0], max_epochs=3, progress=False)
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.fixture
def trained_resnet20(trained_resnet20_state):
    model = resnet20(num_classes=10)
    model.load_state_dict(trained_resnet20_state)
    return model.eval()


@pytest.fixture
def dummy_input():
    return torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope='session')
def chromium_driver_paths():
    """(chromium, chromedriver), installed from Debian's packages when missing."""
    from nni_harness import install_debian_packages

    install_debian_packages(['chromium', 'chromium-driver'], ['chromium', 'chromedriver'])
    chromium, driver = shutil.which('chromium'), shutil.which('chromedriver')
    assert chromium and driver, 'apt-get installed chromium and chromium-driver but they are not on PATH'
    return chromium, driver


@pytest.fixture
def browser(chromium_driver_paths, tmp_path):
    """Headless Chromium through Selenium, with the paths given (nothing is downloaded)."""
    from nni_harness import CHROMIUM_FLAGS
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = chromium_driver_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f'--user-data-dir={tmp_path / "chromium-profile"}'):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
