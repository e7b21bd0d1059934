"""`hmc compress` under `torchrun --nproc_per_node 2` on the CPU (gloo on loopback): rank 0 trains, scans and
plans, every rank applies the broadcast plan and fine-tunes its shard with DistributedDataParallel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_two_cpu_processes_fine_tune_to_identical_weights_above_zero_shot(tmp_path):
    out = tmp_path / 'ddp'
    # data-free compression (no refit, no fitted low rank, no BatchNorm recalibration) leaves the zero-shot
    # accuracy low, so that fine-tuning has something to recover
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               '-m', 'hmc_plugin.app.cli', 'compress', '--model', 'resnet20', '--data', 'digits',
               '--image-size', '16', '--train-epochs', '3', '--finetune-epochs', '2', '--finetune-lr', '0.02',
               '--mode', 'prune', '--target-flops', '0.5', '--no-data-aware', '--no-reconstruct', '--bn-batches', '0',
               '--threads', '1', '--device', 'cpu', '--out', str(out), '--quiet']
    environment = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'MASTER_ADDR': '127.0.0.1'}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / 'report.json').read_text())
    row = report['methods'][1]
    assert row['distributed']['world_size'] == 2
    first, second = row['distributed']['fingerprints']
    assert first == second  # bit-identical parameters and buffers on both ranks after fine-tuning
    # each rank fine-tuned on its half of the 1,437 training images, in each of the 2 epochs (DistributedSampler)
    assert row['distributed']['trained_samples'] == [2 * 719, 2 * 719]
    assert row['acc_after'] > row['acc_zero_shot'] + 0.05, (row['acc_zero_shot'], row['acc_after'])
    assert sorted(path.name for path in out.iterdir()) == ['baseline.pt', 'compressed.pt', 'pareto.png', 'plan.json',
                                                           'report.json', 'report.md', 'sensitivity.json',
                                                           'sensitivity.png']
    assert result.stdout.count('(load with hmc_plugin.load_compressed)') == 1  # only rank 0 reports
