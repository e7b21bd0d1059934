"""HMCCompressor through NNI: validation before touching the model, plan reuse, fine-tuning, save/load, ONNX."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from nni.compression.pruning import L1NormPruner

import hmc_plugin.nni_api.compressor as compressor_module
import hmc_plugin.nni_api.finetune as finetune_module
from hmc_plugin import HMCCompressor, export_onnx, load_compressed, save_compressed
from hmc_plugin.app.training import evaluate_accuracy, make_torch_evaluator
from hmc_plugin.engines.pruning import speedup_with_nni
from hmc_plugin.errors import HMCConfigError
from hmc_plugin.utils.counting import count_flops
from hmc_plugin.utils.fingerprint import model_fingerprint


# the fine-tuning tests start from the data-free compression, far from the original, so recovery shows
DATA_FREE = {'bn_batches': 0, 'data_aware': False, 'reconstruct': False}


@pytest.fixture
def evaluator(loaders, trained_resnet20, dummy_input):
    return make_torch_evaluator(loaders[0], loaders[1], trained_resnet20, lr=0.01, dummy_input=dummy_input,
                                progress=False)


def is_wrapped(model):
    return any('_nni_wrapper' in name for name, _ in model.named_modules())


@pytest.mark.parametrize('entry, words', [
    ({'op_types': ['Conv2d'], 'target_flops': 0.5, 'ranks': 4}, ["'ranks'"]),
    ({'op_types': ['Conv2d'], 'target_flops': 0}, ['target_flops=0', '(0, 1]']),
    ({'op_types': ['Conv2d'], 'target_flops': 0.5, 'sensitivity': 'guess'}, ["sensitivity='guess'"]),
    ({'op_names': ['layer9.conv'], 'target_flops': 0.5}, ["'layer9.conv'", 'match no module']),
    ({'op_types': ['GRU'], 'target_flops': 0.5}, ['selects no Conv2d or Linear']),
])
def test_config_errors_name_the_key_and_leave_the_model_untouched(entry, words, trained_resnet20, evaluator, calibration):
    before = model_fingerprint(trained_resnet20)
    with pytest.raises(HMCConfigError) as info:
        HMCCompressor(trained_resnet20, [entry], evaluator, calibration_inputs=calibration[0])
    for word in words:
        assert word in str(info.value)
    assert model_fingerprint(trained_resnet20) == before and not is_wrapped(trained_resnet20)


def test_missing_dummy_input_is_explained(trained_resnet20, calibration):
    with pytest.raises(HMCConfigError, match='dummy_input'):
        HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.5}],
                      calibration_inputs=calibration[0])


def test_compress_returns_a_new_model_and_masks_and_leaves_the_original(trained_resnet20, evaluator, calibration,
                                                                        dummy_input):
    before = model_fingerprint(trained_resnet20)
    compressor = HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.5}], evaluator,
                               calibration_inputs=calibration[0], progress=False)
    compressed, masks = compressor.compress()
    kept = count_flops(compressed, dummy_input) / count_flops(trained_resnet20, dummy_input)
    assert abs(kept - 0.5) <= 0.02
    assert model_fingerprint(trained_resnet20) == before and not is_wrapped(trained_resnet20)
    pruned_groups = compressor.plan.prune_ratios
    if pruned_groups:
        some = next(iter(masks.values()))['weight']
        assert some.dtype.is_floating_point and set(some.unique().tolist()) <= {0.0, 1.0}
    assert compressor.sensitivity.is_complete()


def test_failure_midway_leaves_the_model_exactly_as_it_was(trained_resnet20, evaluator, calibration, monkeypatch):
    before = model_fingerprint(trained_resnet20)

    def broken_apply(*args, **kwargs):
        raise RuntimeError('simulated failure during speedup')

    monkeypatch.setattr(compressor_module, 'apply_plan', broken_apply)
    compressor = HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.5}], evaluator,
                               calibration_inputs=calibration[0], progress=False)
    with pytest.raises(RuntimeError, match='simulated failure'):
        compressor.compress()
    assert model_fingerprint(trained_resnet20) == before and not is_wrapped(trained_resnet20)


def test_given_plan_skips_the_scan_and_gives_the_same_model(trained_resnet20, evaluator, calibration, monkeypatch,
                                                            dummy_input):
    config = [{'op_types': ['Conv2d'], 'target_flops': 0.5, 'mode': 'ahc'}]
    first = HMCCompressor(trained_resnet20, config, evaluator, calibration_inputs=calibration[0], progress=False)
    model_a, _ = first.compress()

    def no_scan(*args, **kwargs):
        raise AssertionError('the scan must not run when a plan is given')

    monkeypatch.setattr(compressor_module, 'scan_sensitivity', no_scan)
    # the same calibration data: the refit, the fitted factors and the BatchNorm statistics come out the same
    second = HMCCompressor(trained_resnet20, config, evaluator, plan=first.plan, calibration_inputs=calibration[0],
                           progress=False)
    model_b, _ = second.compress()
    third = HMCCompressor(trained_resnet20, config, evaluator, sensitivity_table=first.sensitivity,
                          calibration_inputs=calibration[0], progress=False)
    model_c, _ = third.compress()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model_a.eval()(x), model_b.eval()(x))
        torch.testing.assert_close(model_a(x), model_c.eval()(x))


def test_finetuning_through_the_evaluator_beats_zero_shot(trained_resnet20, evaluator, calibration, loaders):
    compressor = HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.3, 'mode': 'ahc',
                                                   **DATA_FREE}],
                               evaluator, calibration_inputs=calibration[0], progress=False)
    compressed, _ = compressor.compress()
    zero_shot = evaluate_accuracy(compressed, loaders[1])
    torch.manual_seed(0)
    compressor.finetune(compressed, max_epochs=2)
    tuned = evaluate_accuracy(compressed, loaders[1])
    assert tuned > zero_shot + 0.02, (zero_shot, tuned)
    # every parameter of the compressed model was trained, low-rank factors included
    assert all(p.grad is not None for p in compressed.parameters())


def test_distillation_switch_trains_with_the_teacher(trained_resnet20, evaluator, calibration, loaders, monkeypatch):
    kd_calls = []
    real_kd_loss = finetune_module.kd_loss
    monkeypatch.setattr(finetune_module, 'kd_loss', lambda *args: kd_calls.append(1) or real_kd_loss(*args))
    compressor = HMCCompressor(trained_resnet20,
                               [{'op_types': ['Conv2d'], 'target_flops': 0.4, 'mode': 'ahc', 'distill': True,
                                 'distill_alpha': 0.7, **DATA_FREE}],
                               evaluator, calibration_inputs=calibration[0], progress=False)
    compressed, _ = compressor.compress()
    zero_shot = evaluate_accuracy(compressed, loaders[1])
    torch.manual_seed(0)
    compressor.finetune(compressed, max_epochs=1)
    assert len(kd_calls) == len(loaders[0])  # one KD term per training step
    assert evaluate_accuracy(compressed, loaders[1]) > zero_shot
    assert not compressed._forward_hooks  # the logits hook is removed after training


def test_model_pruned_by_nni_l1_pruner_can_be_compressed_further(trained_resnet20, evaluator, calibration, dummy_input):
    pruner = L1NormPruner(trained_resnet20, [{'op_names': ['layer1.0.conv1', 'layer2.0.conv1'], 'sparse_ratio': 0.5}])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    nni_pruned = speedup_with_nni(trained_resnet20, dummy_input, masks)
    assert nni_pruned.layer1[0].conv1.out_channels == 8
    compressor = HMCCompressor(nni_pruned, [{'op_types': ['Conv2d'], 'target_flops': 0.6}], calibration_inputs=calibration[0],
                               dummy_input=dummy_input, progress=False)
    compressed, _ = compressor.compress()
    assert abs(count_flops(compressed, dummy_input) / count_flops(nni_pruned, dummy_input) - 0.6) <= 0.02


def test_saved_model_reloads_in_a_fresh_process_and_exports_to_onnx(trained_resnet20, evaluator, calibration, tmp_path):
    onnxruntime = pytest.importorskip('onnxruntime')
    compressor = HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.5, 'mode': 'ahc'}],
                               evaluator, calibration_inputs=calibration[0], progress=False)
    compressed, _ = compressor.compress()
    compressed.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = compressed(x)
    save_compressed(compressed, tmp_path / 'model.pt', compressor.plan)
    torch.save(x, tmp_path / 'x.pt')
    script = ("import torch, hmc_plugin; m, plan = hmc_plugin.load_compressed('model.pt'); "
              "torch.save((m.eval()(torch.load('x.pt')).detach(), plan.to_json()), 'y.pt')")
    subprocess.run([sys.executable, '-c', script], cwd=tmp_path, check=True)
    outputs, plan_json = torch.load(tmp_path / 'y.pt')
    assert torch.equal(outputs, expected)
    assert plan_json == compressor.plan.to_json()

    export_onnx(compressed, x[:1], tmp_path / 'model.onnx')
    session = onnxruntime.InferenceSession(str(tmp_path / 'model.onnx'))
    onnx_out = session.run(None, {'input': x.numpy()})[0]  # dynamic batch: 3 images through a batch-1 export
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-4, atol=1e-4)


def test_load_rejects_other_files(tmp_path):
    torch.save({'state_dict': {}}, tmp_path / 'plain.pt')
    with pytest.raises(HMCConfigError, match='save_compressed'):
        load_compressed(tmp_path / 'plain.pt')


def test_nni_max_sparse_ratio_caps_the_pruned_channel_ratio(trained_resnet20, evaluator, calibration):
    # pruning at most 30 % of every group's channels keeps at least 0.48 of the FLOPs: known before the scan
    with pytest.raises(HMCConfigError, match='target_flops=0.4 but .* cannot keep less than 0.4'):
        HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.4, 'mode': 'prune',
                                          'max_sparse_ratio': 0.3}],
                      evaluator, calibration_inputs=calibration[0], progress=False)
    compressor = HMCCompressor(trained_resnet20, [{'op_types': ['Conv2d'], 'target_flops': 0.7, 'mode': 'prune',
                                                   'max_sparse_ratio': 0.3}],
                               evaluator, calibration_inputs=calibration[0], progress=False)
    compressor.compress()
    assert compressor.plan.prune_ratios and max(compressor.plan.prune_ratios.values()) <= 0.3 + 1e-9
