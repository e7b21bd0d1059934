"""The `hmc` command and the recipes, on tiny settings (ResNet-20, short schedules, generated data)."""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hmc_plugin.app.cli import main
from hmc_plugin.app.export import load_compressed
from hmc_plugin.app.report import ROW_KEYS

REPO = Path(__file__).resolve().parents[1]
TINY = ['--train-epochs', '1', '--finetune-epochs', '1', '--quiet']
# random pixels cannot be learnt: recipes on generated noise go on past the chance-level check
NOISE = [*TINY, '--allow-chance-baseline']


def test_help_lists_the_subcommands():
    result = subprocess.run([sys.executable, '-m', 'hmc_plugin.app.cli', '--help'], capture_output=True, text=True, check=True)
    for command in ('scan', 'plan', 'compress', 'report'):
        assert command in result.stdout


@pytest.fixture(scope='module')
def digits_report(tmp_path_factory):
    """`hmc report` on digits (ResNet-20, prune and NaHC, one epoch each): its folder and what it printed."""
    out = tmp_path_factory.mktemp('report')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(['report', '--model', 'resnet20', '--data', 'digits', '--methods', 'prune,nahc',
                     '--target-flops', '0.5', '--threads', '1', '--out', str(out), *TINY]) == 0
    return out, printed.getvalue()


def printed_table(printed: str) -> dict[str, dict[str, str]]:
    """The comparison table `hmc report` printed: method -> column header -> cell."""
    lines = printed.strip().split('\n\n')[0].splitlines()
    header = re.split(r'\s{2,}', lines[0].strip())
    cells = [re.split(r'\s{2,}', line.strip()) for line in lines[2:]]
    assert all(len(row) == len(header) for row in cells), lines
    return {row[0]: dict(zip(header, row)) for row in cells}


def test_report_on_digits_writes_every_file_with_the_documented_rows(digits_report):
    tmp_path, printed = digits_report
    assert 'uncompressed' in printed and 'nahc' in printed and 'acc fine-tuned' in printed
    for name in ('report.json', 'report.md', 'plan.json', 'pareto.png', 'sensitivity.png', 'sensitivity.json',
                 'compressed_nahc.pt'):
        assert (tmp_path / name).exists(), name
    report = json.loads((tmp_path / 'report.json').read_text())
    assert [row['mode'] for row in report['methods']] == ['uncompressed', 'prune', 'nahc']
    for row in report['methods']:
        assert set(ROW_KEYS) <= set(row)
    nahc = report['methods'][-1]
    assert abs(nahc['flops_after'] / nahc['flops_before'] - 0.5) <= 0.02
    assert {'name', 'group', 'prune_ratio', 'ranks'} <= set(nahc['layers'][0])
    prune = report['methods'][1]
    assert 'paired_vs_prune' not in prune and nahc['paired_vs_prune']['images'] > 0
    assert abs(nahc['paired_vs_prune']['mean_pp'] - 100 * (nahc['acc_after'] - prune['acc_after'])) < 1e-9
    assert nahc['paired_vs_prune']['low_pp'] <= nahc['paired_vs_prune']['mean_pp'] <= nahc['paired_vs_prune']['high_pp']
    assert printed_table(printed)['nahc']['fine-tuned − prune, pp [95 % CI]'].startswith(('+', '-'))
    model, plan = load_compressed(tmp_path / 'compressed_nahc.pt')
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_report_table_takes_every_time_and_speed_up_from_one_side_by_side_timing(digits_report):
    out, printed = digits_report
    rows = json.loads((out / 'report.json').read_text())['methods']
    table = printed_table(printed)
    uncompressed = rows[0]
    assert uncompressed['mode'] == 'uncompressed' and set(table) == {row['mode'] for row in rows}
    for row in rows:
        printed_row = table[row['mode']]
        for suffix, batch in (('', 'b1'), ('_b64', 'b64')):
            before, after = row[f'latency_ms_before{suffix}'], row[f'latency_ms_after{suffix}']
            # the uncompressed model's time is every row's "before": one timing, not one per method
            assert before == uncompressed[f'latency_ms_after{suffix}'] == uncompressed[f'latency_ms_before{suffix}']
            assert printed_row[f'speed-up {batch}'] == f'{before / after:.2f}x'
        assert printed_row['lat b1 ms'] == f"{row['latency_ms_after']:.2f}"
        # and the printed ms divide into the printed speed-up, up to their rounding
        reference_ms, ms = float(table['uncompressed']['lat b1 ms']), float(printed_row['lat b1 ms'])
        lowest, highest = (reference_ms - 0.005) / (ms + 0.005), (reference_ms + 0.005) / max(ms - 0.005, 1e-9)
        assert lowest - 0.005 <= float(printed_row['speed-up b1'].rstrip('x')) <= highest + 0.005


def test_scan_plan_compress_steps_share_the_output_folder(tmp_path, capsys):
    out = ['--model', 'resnet20', '--data', 'digits', '--out', str(tmp_path), '--train-epochs', '1', '--quiet']
    assert main(['scan', *out]) == 0
    assert (tmp_path / 'sensitivity.json').exists() and (tmp_path / 'sensitivity.png').exists()
    assert main(['plan', '--mode', 'ahc', '--target-flops', '0.6', *out]) == 0
    assert 'CompressionPlan(mode=ahc' in capsys.readouterr().out
    assert main(['compress', '--plan', str(tmp_path / 'plan.json'), '--finetune-epochs', '1', '--export', 'onnx',
                 *out]) == 0
    model, plan = load_compressed(tmp_path / 'compressed.pt')
    assert plan.mode == 'ahc'
    # the deployable file: BatchNorm folded into the convs, and ONNX Runtime gives the model's outputs
    import onnx
    import onnxruntime

    printed = capsys.readouterr().out
    assert 'model.onnx (BatchNorm folded); ONNX Runtime reproduces the model' in printed
    graph = onnx.load(tmp_path / 'model.onnx').graph
    assert 'BatchNormalization' not in {node.op_type for node in graph.node}
    session = onnxruntime.InferenceSession(str(tmp_path / 'model.onnx'), providers=['CPUExecutionProvider'])
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {'input': x.numpy()})[0]), model.eval()(x),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('argv, words', [
    (['scan', '--model', 'resnet57'], ["model='resnet57'", 'torchvision:NAME']),
    (['scan', '--model', 'torchvision:resnet9000'], ['resnet9000']),
    (['scan', '--model', 'no_such_pkg.models:net'], ['could not import']),
    (['scan', '--data', 'mnist'], ["data='mnist'", 'cifar10:DIR']),
    (['scan', '--data', 'cifar10:/nonexistent/dir'], ['/nonexistent/dir', 'data_batch_1']),
    (['compress', '--mode', 'nahc', '--margin', 'auto'], ["margin 'auto'", '--mode hmc']),
])
def test_wrong_names_and_paths_say_what_was_expected(argv, words, tmp_path, capsys):
    assert main([*argv, '--out', str(tmp_path), '--quiet']) == 2
    error = capsys.readouterr().err
    for word in words:
        assert word in error


def write_cifar_batches(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """A tiny CIFAR-10 python-pickle batches directory (random images, real format)."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (('data_batch_1', n_train), ('test_batch', n_test)):
        batch = {b'data': rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b'labels': [int(i % 10) for i in range(count)]}
        with open(folder / name, 'wb') as handle:
            pickle.dump(batch, handle)
    with open(folder / 'batches.meta', 'wb') as handle:
        pickle.dump({b'label_names': [f'class{i}'.encode() for i in range(10)]}, handle)
    return folder


def write_imagefolder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f'class_{c}').mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f'class_{c}' / f'{i}.png')
    return root


def run_recipe(args, cwd):
    return subprocess.run([sys.executable, str(REPO / 'recipes' / 'compress.py'), *args], cwd=cwd,
                          capture_output=True, text=True)


def test_cifar10_recipe_runs_on_generated_batches(tmp_path):
    data = write_cifar_batches(tmp_path / 'data')
    result = run_recipe(['--config', str(REPO / 'recipes/configs/cifar10_resnet20.yaml'), '--data-dir', str(data),
                         '--out', str(tmp_path / 'out'), '--methods', 'nahc', '--calibration-size', '16', *NOISE],
                        tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / 'out' / 'report.json').read_text())
    assert report['settings']['model'] == 'resnet20' and report['methods'][-1]['mode'] == 'nahc'


def test_imagefolder_recipe_runs_on_a_generated_folder(tmp_path):
    pytest.importorskip('torchvision')
    data = write_imagefolder(tmp_path / 'images')
    result = run_recipe(['--config', str(REPO / 'recipes/configs/imagefolder_resnet18.yaml'), '--data-dir', str(data),
                         '--out', str(tmp_path / 'out'), '--methods', 'nahc', '--image-size', '32',
                         '--calibration-size', '8', *NOISE], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / 'out' / 'report.json').read_text())
    assert report['settings']['model'] == 'torchvision:resnet18'
    assert abs(report['methods'][-1]['flops_after'] / report['methods'][-1]['flops_before'] - 0.5) <= 0.02


@pytest.mark.parametrize('argv, budget', [
    ([], {'target_flops': 0.5, 'target_params': None, 'target_latency': None}),
    (['--target-params', '0.4'], {'target_flops': None, 'target_params': 0.4, 'target_latency': None}),
    (['--target-latency', '0.6'], {'target_flops': None, 'target_params': None, 'target_latency': 0.6}),
])
def test_a_parameter_or_latency_budget_replaces_the_default_flops_budget(argv, budget):
    from hmc_plugin.app.cli import _settings, build_parser

    settings = _settings(build_parser().parse_args(['plan', *argv]))
    assert {key: getattr(settings, key) for key in budget} == budget
