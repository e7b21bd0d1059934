"""The device setting on a machine without a GPU: 'model' (HMCCompressor's default: where the model is), 'cpu', 'auto'
(the CPU there; the hmc command's default), a refused 'cuda', the user's model never moved, and bfloat16
mixed-precision fine-tuning."""
import copy

import nni
import pytest
import torch
from nni.compression import TorchEvaluator
from torch import nn

from hmc_plugin import HMCCompressor
from hmc_plugin.app.cli import main
from hmc_plugin.app.run_settings import RunSettings
from hmc_plugin.app.training import train, training_step
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.nni_api import compressor as compressor_module
from hmc_plugin.nni_api.finetune import finetune
from hmc_plugin.settings import HMCSettings
from hmc_plugin.utils.device import accelerator_label, resolve_device, to_device
from hmc_plugin.utils.fingerprint import model_fingerprint

from .toy_models import Chain

CONFIG = [{'op_types': ['Conv2d'], 'target_flops': 0.6, 'mode': 'ahc', 'levels': [0.3, 0.6]}]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)


def _data(count=32):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 3, 8, 8, generator=generator), torch.randint(0, 10, (count,), generator=generator)


def _evaluator(model, images, labels):
    loader = list(zip(images.split(8), labels.split(8)))

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        train(model, optimizers, training_step, loader, lr_schedulers, max_steps, max_epochs, progress=False)

    return TorchEvaluator(training_func, nni.trace(torch.optim.SGD)(model.parameters(), lr=0.05), training_step,
                          dummy_input=images[:1])


def test_cpu_and_auto_resolve_to_the_cpu_without_a_gpu(no_gpu):
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device('auto') == torch.device('cpu')
    assert RunSettings().device == 'auto' and RunSettings(target_flops=0.3).device == 'auto'


def test_the_compressor_default_stays_on_the_models_device_even_beside_a_gpu(monkeypatch):
    """With a GPU visible, 'auto' would hand the user's evaluator a CUDA copy of a CPU model; 'model' does not."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert HMCSettings().device == 'model'
    assert resolve_device('model', model=Chain()) == torch.device('cpu')
    assert resolve_device('model', model=Chain().to(torch.float64)) == torch.device('cpu')
    assert resolve_device('auto') == torch.device('cuda', 0)


@pytest.mark.parametrize('spec', ['cuda', 'cuda:1'])
def test_cuda_without_a_gpu_is_a_config_error_naming_the_key(no_gpu, spec):
    with pytest.raises(HMCConfigError, match=rf"device='{spec}'.*no CUDA GPU.*device='cpu'"):
        resolve_device(spec)


def test_a_missing_gpu_index_and_a_bad_spec_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(HMCConfigError, match=r"device='cuda:2' but only 1 CUDA GPU"):
        resolve_device('cuda:2')
    with pytest.raises(HMCConfigError, match=r"device='gpu' but expected 'model', 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        HMCSettings(device='gpu')


def test_the_gpu_key_names_the_gpu_and_versions(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'NVIDIA H200')
    label = accelerator_label(torch.device('cuda', 0))
    assert 'NVIDIA H200' in label and torch.__version__ in label and f'CUDA {torch.version.cuda}' in label
    assert accelerator_label(torch.device('cpu')) == ''  # CPU cache keys stay as they were


def test_compressor_refuses_cuda_before_touching_the_model(no_gpu):
    model = Chain().eval()
    images, _ = _data()
    before = model_fingerprint(model)
    with pytest.raises(HMCConfigError, match="device='cuda'"):
        HMCCompressor(model, CONFIG, dummy_input=images[:1], calibration_inputs=images, device='cuda')
    assert model_fingerprint(model) == before and not any('_nni_wrapper' in name for name, _ in model.named_modules())


@pytest.mark.parametrize('device', ['cpu', 'auto', 'model'])
def test_cpu_and_auto_compress_and_fine_tune_in_place(no_gpu, device):
    torch.manual_seed(0)
    model = Chain().eval()
    images, labels = _data()
    compressor = HMCCompressor(model, CONFIG, _evaluator(model, images, labels), calibration_inputs=images,
                               device=device, progress=False)
    compressed, _ = compressor.compress(max_steps=2)
    assert compressor.device == torch.device('cpu') and compressor.bound_model is model  # no copy on its own device
    assert next(compressed.parameters()).device.type == 'cpu'


def test_another_device_works_on_a_copy_and_returns_to_the_users_device(no_gpu, monkeypatch):
    """'cpu:0' is a device other than 'cpu' to torch, so the copy-and-return path runs on a CPU-only machine."""
    monkeypatch.setattr(compressor_module, 'resolve_device', lambda spec, **_: torch.device('cpu', 0))
    torch.manual_seed(0)
    model = Chain().eval()
    images, labels = _data()
    before, reference = model_fingerprint(model), copy.deepcopy(model)
    compressor = HMCCompressor(model, CONFIG, _evaluator(model, images, labels), calibration_inputs=images,
                               progress=False)
    compressed, masks = compressor.compress(max_steps=2)
    assert compressor.bound_model is not model and compressor.bound_model.training == model.training
    assert model_fingerprint(model) == before and not any('_nni_wrapper' in name for name, _ in model.named_modules())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert next(compressed.parameters()).device == torch.device('cpu')
    assert all(mask.device == torch.device('cpu') for value in masks.values() for mask in value.values())
    assert compressed(images[:2]).shape == (2, 10)


def test_to_device_keeps_structure_and_identity():
    images, labels = _data(4)
    batch = (images, labels)
    assert to_device(batch, torch.device('cpu')) is batch
    moved = to_device({'x': [images]}, torch.device('cpu', 0))
    assert isinstance(moved['x'], list) and torch.equal(moved['x'][0], images)


def test_mixed_precision_fine_tunes_under_bfloat16_and_keeps_float32_weights():
    torch.manual_seed(0)
    model = Chain().eval()
    images, labels = _data()
    evaluator = _evaluator(model, images, labels)
    student = copy.deepcopy(model)
    seen = []
    handle = student.blocks[0][0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = [param.detach().clone() for param in student.parameters()]
    finetune(student, evaluator, original=model, max_steps=3, mixed_precision=True)
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(param.dtype == torch.float32 for param in student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert 'forward' not in student.__dict__ and student(images[:2]).dtype == torch.float32


def test_cli_refuses_a_missing_gpu_with_the_flag(no_gpu, tmp_path, capsys):
    assert main(['scan', '--device', 'cuda', '--out', str(tmp_path), '--quiet']) == 2
    assert "device='cuda'" in capsys.readouterr().err and not (tmp_path / 'baseline.pt').exists()


def test_gpu_check_refuses_without_a_gpu(no_gpu, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / 'recipes' / 'benchmarks' / 'gpu_check.py'
    spec = importlib.util.spec_from_file_location('gpu_check', script)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(['--out', str(tmp_path)]) == 2
    assert 'needs a CUDA GPU' in capsys.readouterr().err and not any(tmp_path.iterdir())
