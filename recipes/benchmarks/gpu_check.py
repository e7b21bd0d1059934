"""GPU check: HMC's device path end to end on a CUDA GPU in a few minutes, with its figures and CPU/GPU ratios.

torchvision ResNet-50 (random weights, seeded) on a generated ImageFolder (``--classes`` classes of
``--per-class`` random-texture images, ``--image-size`` pixels), all on ``--device`` (default ``cuda``):

1. the model as initialised, moved to the device (nothing is learnt from random images, so no baseline is
   trained: the check runs the path, its accuracies mean nothing);
2. the proxy sensitivity scan (``hmc_plugin.app.workflow.scan``);
3. a NaHC plan at ``target_flops`` 0.5, and one at a latency budget of half the GPU time (``target_latency`` 0.5 at
   ``--latency-batch``, timed with CUDA events, cached by the GPU's name and the torch/CUDA versions);
4. the FLOPs plan applied (masks, NNI's speedup, data-aware fits, BatchNorm recalibration) and one fine-tuning
   epoch (``--mixed-precision``: bfloat16 autocast);
5. ONNX export of the compressed model, checked against ONNX Runtime on the CPU;
6. forward times of the original and the compressed model on the GPU and on the CPU (side by side, batch 1 and
   ``--latency-batch``) and their CPU/GPU ratios.

Without a GPU it stops at once with exit status 2 and says so; ``--device cpu`` runs the same steps on the CPU
(a smoke test of the script: its "GPU" columns are then CPU times). Writes ``gpu_check.json`` and ``gpu_check.md``.

    .venv/bin/python recipes/benchmarks/gpu_check.py --out recipes/benchmarks/results
    .venv/bin/python recipes/benchmarks/gpu_check.py --out /tmp/gpu_check --device cpu --image-size 32 --per-class 4
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (recipes/benchmarks is not a package)

from hmc_plugin.app.data import calibration_batch, parse_data_spec  # noqa: E402
from hmc_plugin.app.export import check_onnx, export_onnx  # noqa: E402
from hmc_plugin.app.models import build_model  # noqa: E402
from hmc_plugin.app.report import flops_kept, markdown_table, size_fields  # noqa: E402
from hmc_plugin.app.training import evaluate_accuracy  # noqa: E402
from hmc_plugin.app.workflow import RunSettings, make_compressor, scan  # noqa: E402
from hmc_plugin.errors import HMCConfigError  # noqa: E402
from hmc_plugin.utils.device import accelerator_label, resolve_device  # noqa: E402
from hmc_plugin.utils.timing import measure_latency_side_by_side  # noqa: E402

MODEL = 'torchvision:resnet50'


def write_imagefolder(root: Path, classes: int, per_class: int, size: int) -> Path:
    """``root/class_k/i.png``: seeded random textures, ``size`` x ``size`` RGB (nothing to learn, everything to run)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f'class_{label}'
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f'{index}.png')
    return root


def timed(figures: dict[str, Any], name: str, step: Callable[[], Any], device: torch.device) -> Any:
    """``step()``, its wall seconds (after the device's queue drained) stored as ``figures['seconds'][name]``."""
    started = time.perf_counter()
    result = step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    figures['seconds'][name] = round(time.perf_counter() - started, 3)
    return result


def timing_ratios(original, compressed, image_size: int, batch: int, device: torch.device) -> dict[str, Any]:
    """Forward ms of both models on ``device`` and on the CPU (side by side), batch 1 and ``batch``; CPU/GPU."""
    rows = {}
    cpu_models = [copy.deepcopy(original).cpu(), copy.deepcopy(compressed).cpu()]
    for size in (1, batch):
        inputs = torch.zeros(size, 3, image_size, image_size)
        gpu_ms = measure_latency_side_by_side([original, compressed], inputs.to(device), warmup=3, repeats=11)
        cpu_ms = measure_latency_side_by_side(cpu_models, inputs, warmup=1, repeats=3,
                                              num_threads=torch.get_num_threads())
        rows[f'batch {size}'] = {'gpu_ms': gpu_ms, 'cpu_ms': cpu_ms,
                                 'cpu_over_gpu': [cpu / gpu for cpu, gpu in zip(cpu_ms, gpu_ms)],
                                 'speedup_gpu': gpu_ms[0] / gpu_ms[1], 'speedup_cpu': cpu_ms[0] / cpu_ms[1]}
    return rows


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    out = Path(args.out)
    data = write_imagefolder(out / 'gpu_check_images', args.classes, args.per_class, args.image_size)
    splits = parse_data_spec(f'imagefolder:{data}', args.image_size)
    settings = RunSettings(model=MODEL, data=f'imagefolder:{data}', image_size=args.image_size, device=str(device),
                           batch_size=args.batch_size,
                           calibration_size=args.batch_size, finetune_epochs=1, mixed_precision=args.mixed_precision,
                           mode='nahc', target_flops=0.5, latency_batch=args.latency_batch,
                           latency_cache=str(out / 'gpu_check_latency.json'))
    figures: dict[str, Any] = {'device': str(device), 'gpu': accelerator_label(device), 'seconds': {}}
    torch.manual_seed(0)
    model = timed(figures, 'model to device', lambda: build_model(MODEL, splits.num_classes).to(device).eval(),
                  device)
    work = out / 'gpu_check_work'
    table = timed(figures, 'proxy scan', lambda: scan(model, splits, settings, work, progress=False), device)
    compressor = make_compressor(model, splits, settings, 'nahc', table=table, progress=False)
    timed(figures, 'plan target_flops 0.5', compressor.make_plan, device)
    latency = make_compressor(model, splits, settings.replace(target_latency=0.5), 'nahc', table=table,
                              progress=False)
    timed(figures, 'plan target_latency 0.5', latency.make_plan, device)
    figures['latency_budget'] = latency.latency_report
    compressed, _ = timed(figures, 'apply (masks, speedup, fits, BN)', compressor.compress, device)
    test_loader = torch.utils.data.DataLoader(splits.test, batch_size=args.batch_size)
    figures['acc_zero_shot'] = evaluate_accuracy(compressed, test_loader)
    timed(figures, 'fine-tune 1 epoch', lambda: compressor.finetune(compressed, max_epochs=1), device)
    figures['acc_fine_tuned'] = evaluate_accuracy(compressed, test_loader)
    dummy = torch.zeros(1, 3, args.image_size, args.image_size, device=device)
    figures['flops_kept'] = flops_kept(size_fields(model, compressed, dummy))
    timed(figures, 'ONNX export', lambda: export_onnx(compressed, dummy, out / 'gpu_check_model.onnx'), device)
    images, _ = calibration_batch(splits, 4, seed=0)
    figures['onnx_max_abs_difference'] = check_onnx(compressed, out / 'gpu_check_model.onnx', images)
    figures['timings'] = timing_ratios(model, compressed, args.image_size, args.latency_batch, device)
    return figures


def markdown(figures: dict[str, Any]) -> str:
    steps = markdown_table(['step', 'seconds'], [[name, f'{value:.2f}'] for name, value in figures['seconds'].items()])
    rows = []
    for batch, timing in figures['timings'].items():
        for index, label in enumerate(('original', 'compressed')):
            rows.append([label, batch, f"{timing['gpu_ms'][index]:.2f}", f"{timing['cpu_ms'][index]:.1f}",
                         f"{timing['cpu_over_gpu'][index]:.1f}x"])
    times = markdown_table(['model', 'batch', 'device ms', 'CPU ms', 'CPU / device'], rows)
    budget = figures.get('latency_budget') or {}
    return (f"# GPU check\n\n{figures['device']} ({figures['gpu'] or 'no GPU: CPU smoke run'}); "
            f"FLOPs kept {figures['flops_kept']:.3f}; accuracy zero-shot {figures['acc_zero_shot']:.3f}, after one "
            f"epoch {figures['acc_fine_tuned']:.3f} (random images: only that it runs is checked); latency budget "
            f"0.5 measured {budget.get('measured', float('nan')):.3f}; ONNX Runtime max difference "
            f"{figures['onnx_max_abs_difference']:.1e}.\n\n{steps}\n\n{times}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True)
    parser.add_argument('--device', default='cuda', help="'cuda' (default), 'cuda:N', or 'cpu' for a smoke run")
    parser.add_argument('--image-size', type=int, default=128)
    parser.add_argument('--classes', type=int, default=10)
    parser.add_argument('--per-class', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--latency-batch', type=int, default=32)
    parser.add_argument('--mixed-precision', action='store_true')
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except HMCConfigError as error:
        print(f'gpu_check: {error}. This check needs a CUDA GPU; --device cpu runs it as a CPU smoke test.',
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    common.configure(torch.get_num_threads())
    figures = run(args, device)
    report = {**common.header('gpu_check', vars(args)), **figures, 'wall_seconds': time.perf_counter() - started}
    common.write_suite(Path(args.out), report, markdown(figures))
    return 0


if __name__ == '__main__':
    sys.exit(main())
