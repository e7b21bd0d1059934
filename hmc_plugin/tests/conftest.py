"""Unit-test fixtures shared by the engines' tests."""
import pytest
import torch
from torch import nn

from hmc_plugin.app.models import resnet20


@pytest.fixture
def model() -> nn.Module:
    """CIFAR ResNet-20 with seeded weights and random BN affine parameters (importances and outputs not degenerate)."""
    torch.manual_seed(0)
    net = resnet20()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
    return net.eval()


@pytest.fixture(scope='module')
def model_and_inputs() -> tuple[nn.Module, torch.Tensor]:
    """CIFAR ResNet-20 in eval mode with random BN statistics and scales (activations and outputs not degenerate),
    and 16 random 16x16 inputs: what the Fisher pass and its chunking are checked on."""
    torch.manual_seed(0)
    model = resnet20(num_classes=10).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return model, torch.randn(16, 3, 16, 16)


@pytest.fixture(scope='session')
def trained_resnet56():
    """ResNet-56 trained 3 epochs on 16x16 digits (test accuracy checked > 0.5), 512 calibration images of the
    train split and 256 held-out images of the test split: a real network for the data-aware operators."""
    from hmc_plugin.app.data import calibration_batch, load_digits_data, make_loaders
    from hmc_plugin.app.models import resnet56
    from hmc_plugin.app.training import evaluate_accuracy, train, training_step

    digits = load_digits_data(image_size=16)
    train_loader, test_loader = make_loaders(digits, batch_size=32, seed=0)
    torch.manual_seed(0)
    net = resnet56(num_classes=10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train(net, optimizer, training_step, train_loader, max_epochs=3, progress=False)
    accuracy = evaluate_accuracy(net, test_loader)
    assert accuracy > 0.5, f'ResNet-56 did not train (test accuracy {accuracy:.3f}): random weights prove nothing'
    calibration, _ = calibration_batch(digits, 512, seed=0)
    held_out = torch.stack([digits.test[index][0] for index in range(256)])
    return net.eval(), calibration, held_out
