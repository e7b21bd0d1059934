"""The ``hmc`` command: ``scan``, ``plan``, ``compress`` and ``report`` (the main job).

Every subcommand takes ``--model`` (``resnet56``, ``torchvision:resnet50`` or ``package.module:callable``),
``--data`` (``digits``, ``digits_hard``, ``cifar10:DIR`` or ``imagefolder:DIR``), ``--out`` (output folder) and
``--config`` (a YAML file of ``RunSettings`` fields; flags given on the command line win).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import yaml

from ..errors import HMCConfigError, HMCError
from ..settings import (BUDGET_KEYS, COMPRESSOR_IMPORTANCES, FINETUNE_SCHEDULES, FIT_ORDERS, LATENCY_BACKENDS, MODES,
                        RANK_METHODS, SENSITIVITIES, HMCSettings, unknown_key_message)
from .run_settings import RUN_KEY_HELP, RunSettings

__all__ = ['build_parser', 'main']


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', help='YAML file with run settings (keys as the long options, with _ for -)')
    parser.add_argument('--model', help="zoo name (resnet20..resnet110), 'torchvision:NAME' or 'package.module:callable'"
                                        ' (default resnet56)')
    parser.add_argument('--data', help="'digits' (default), 'digits_hard' (generated, harder), 'cifar10:DIR' or "
                                       "'imagefolder:DIR'")
    parser.add_argument('--image-size', type=int, help="input size (default: the loader's, 32 for digits/CIFAR)")
    parser.add_argument('--out', default='hmc_output', help='output folder (default hmc_output)')
    parser.add_argument('--checkpoint', help='state_dict of the trained model to compress (skips training)')
    parser.add_argument('--train-epochs', type=int, help='epochs to train the baseline when no checkpoint (default 15)')
    for key, kind in (('train_lr', float), ('warmup_epochs', float), ('finetune_lr', float)):
        parser.add_argument('--' + key.replace('_', '-'), type=kind,
                            help=f'{RUN_KEY_HELP[key]} (default {getattr(RunSettings(), key)})')
    parser.add_argument('--finetune-schedule', choices=FINETUNE_SCHEDULES,
                        help=f"{RUN_KEY_HELP['finetune_schedule']} (default constant)")
    parser.add_argument('--allow-chance-baseline', action='store_true', default=None,
                        help=RUN_KEY_HELP['allow_chance_baseline'])
    parser.add_argument('--seed', type=int)
    parser.add_argument('--threads', type=int, help='torch threads for training and latency (default 2)')
    parser.add_argument('--calibration-size', type=int, help='images in the proxy calibration batch (default 64)')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    meaning = {key: meaning for key, _, _, meaning in HMCSettings.table()}
    parser.add_argument('--device', help=f"'auto' (default here), 'model', 'cpu', 'cuda' or 'cuda:N': {meaning['device']}")
    parser.add_argument('--mixed-precision', action=argparse.BooleanOptionalAction, default=None,
                        help=f"{meaning['mixed_precision']} (default off)")
    _add_data(parser)


def _add_data(parser: argparse.ArgumentParser) -> None:
    """The data-aware settings (BatchNorm recalibration, reconstruction, data-aware low rank) and the rank method."""
    meaning = {key: meaning for key, _, _, meaning in HMCSettings.table()}
    parser.add_argument('--bn-batches', type=int, help=f"{meaning['bn_batches']} (default {HMCSettings.bn_batches})")
    parser.add_argument('--fit-batches', type=int, help=f"{meaning['fit_batches']} (default {HMCSettings.fit_batches})")
    parser.add_argument('--fit-order', choices=FIT_ORDERS, help=f"{meaning['fit_order']} (default {HMCSettings.fit_order})")
    parser.add_argument('--data-aware', action=argparse.BooleanOptionalAction, default=None,
                        help=f"{meaning['data_aware']} (default on)")
    parser.add_argument('--reconstruct', action=argparse.BooleanOptionalAction, default=None,
                        help=f"{meaning['reconstruct']} (default on)")
    parser.add_argument('--rank-method', choices=RANK_METHODS, help=f"{meaning['rank_method']} (default auto)")
    parser.add_argument('--memory-budget', type=int, help=f"{meaning['memory_budget']}")


def _add_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--target-flops', type=float, help='fraction of FLOPs to keep (default 0.5)')
    parser.add_argument('--target-params', type=float, help='fraction of parameters to keep (instead of FLOPs)')
    parser.add_argument('--target-latency', type=float,
                        help="fraction of the model's measured CPU time to keep (instead of FLOPs), at --latency-batch "
                             "and --threads on this machine")
    parser.add_argument('--latency-batch', type=int, help='batch size at which --target-latency is measured (default 1)')
    parser.add_argument('--latency-backend', choices=LATENCY_BACKENDS,
                        help="where --target-latency is measured: 'torch' (default) or 'onnxruntime' (exported, all "
                             'graph optimisations, as a CPU deployment runs it)')
    parser.add_argument('--importance', choices=COMPRESSOR_IMPORTANCES)
    parser.add_argument('--prune-spread', type=float,
                        help="cap every group's prune ratio at the budget's uniform ratio plus this (e.g. 0.05)")
    parser.add_argument('--margin', type=_margin_arg,
                        help="HMC margin tau ('inf' = AHC), or 'auto' with --mode hmc: HMC's margin rule picks tau and "
                             "--decompose-weight from probe fine-tunes, falling back to prune-only's plan")
    parser.add_argument('--probe-steps', type=int,
                        help="fine-tuning steps of each candidate of --margin auto (default 60)")
    parser.add_argument('--decompose-weight', type=float,
                        help='each decomposition drop of the scan counts this many times (default 1; above 1 when '
                             'decomposed layers recover less than the zero-shot scan says; inf never decomposes)')
    parser.add_argument('--finetune-epochs', type=int, help='fine-tuning epochs per method (default 3)')


def _margin_arg(text: str) -> float | str:
    if text == 'auto':
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, 'inf' or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='hmc', description='HMC: hybrid model compression by layer sensitivity grouping')
    commands = parser.add_subparsers(dest='command', required=True)
    scan = commands.add_parser('scan', help='sensitivity scan: OUT/sensitivity.json and sensitivity.png')
    _add_common(scan)
    scan.add_argument('--sensitivity', choices=SENSITIVITIES)
    scan.add_argument('--levels', type=float, nargs='+', help='fractions of a layer FLOPs removed (default 0.2 0.4 0.6 0.8)')
    plan = commands.add_parser('plan', help='build a CompressionPlan from OUT/sensitivity.json: OUT/plan.json')
    _add_common(plan)
    _add_budget(plan)
    plan.add_argument('--mode', choices=MODES, default=HMCSettings.mode)
    compress = commands.add_parser('compress', help='compress with one method, fine-tune, save OUT/compressed.pt')
    _add_common(compress)
    _add_budget(compress)
    compress.add_argument('--mode', choices=MODES, default=HMCSettings.mode)
    compress.add_argument('--plan', help='plan.json to apply (skips scan and planning)')
    compress.add_argument('--export', choices=('onnx',),
                          help='also write OUT/model.onnx (BatchNorm folded), checked against ONNX Runtime')
    report = commands.add_parser('report', help='the main job: every method at one budget, report.json/md, PNGs')
    _add_common(report)
    _add_budget(report)
    report.add_argument('--methods', help='comma-separated (default prune,decompose,ahc,nahc)')
    return parser


def _settings(args: argparse.Namespace) -> RunSettings:
    """``RunSettings`` from ``--config``, then the flags given (flags win; a budget flag replaces the file's)."""
    values = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        for key in loaded:
            if key not in RunSettings.keys():
                raise HMCConfigError(unknown_key_message(key, RunSettings.keys(), args.config))
        values.update(loaded)
    flags = {key: value for key, value in vars(args).items() if key in RunSettings.keys() and value is not None}
    if any(key in flags for key in BUDGET_KEYS):
        values = {key: value for key, value in values.items() if key not in BUDGET_KEYS}
    values.update(flags)
    if getattr(args, 'methods', None):
        values['methods'] = [method.strip() for method in args.methods.split(',')]
    if getattr(args, 'mode', None):
        values['methods'] = [args.mode]
    if values.get('margin') == 'auto' and 'hmc' not in values.get('methods', RunSettings().methods):
        raise HMCError("margin 'auto' is HMC's margin rule: use it with --mode hmc (or 'hmc' among --methods)")
    return RunSettings(**values)


def _load(args, settings):
    import torch

    from ..utils.device import resolve_device
    from ..utils.timing import steady_allocator
    from .data import parse_data_spec
    from .models import build_model

    from . import distributed

    distributed.start(resolve_device(settings.device))  # a GPU asked for and missing fails before any work
    torch.set_num_threads(settings.threads)
    steady_allocator()  # timings (reports, target_latency) independent of what the process allocated before
    splits = parse_data_spec(settings.data, settings.image_size)
    torch.manual_seed(settings.seed)  # the initial weights, hence the trained baseline, are reproducible
    model = build_model(settings.model, splits.num_classes, splits.in_channels)
    return model, splits


def _run(args: argparse.Namespace) -> None:
    from . import distributed

    settings = _settings(args)
    if distributed.launched() and args.command not in ('compress', 'report'):
        raise HMCError(f'hmc {args.command} runs in one process; under torchrun use hmc compress or hmc report '
                       f'(rank 0 scans and plans, every rank fine-tunes)')
    out = Path(args.out)
    model, splits = _load(args, settings)
    try:
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
        progress = not args.quiet and distributed.is_main()
        command = 'hmc ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
        if args.command == 'report':
            _report_command(model, splits, settings, out, progress, command)
            return
        from .workflow import train_or_load_baseline

        model = train_or_load_baseline(model, splits, settings, out, progress)
        run = {'scan': _scan_command, 'plan': _plan_command, 'compress': _compress_command}[args.command]
        run(model, splits, settings, out, progress, command, args)
    finally:
        distributed.finish()


def _report_command(model, splits, settings: RunSettings, out: Path, progress: bool, command: str) -> None:
    from . import distributed
    from .report import format_table, write_report
    from .workflow import compare_methods

    rows, _ = compare_methods(model, splits, settings, out, progress)
    if not distributed.is_main():
        return
    write_report(out, rows, settings.as_dict(), [command])
    print(format_table(rows))
    print(f'\nWrote {out}/report.json, report.md, plan.json, pareto.png, sensitivity.png and the compressed model.')


def _scan_command(model, splits, settings: RunSettings, out: Path, progress: bool, command: str, args) -> None:
    from .workflow import scan

    table = scan(model, splits, settings, out, progress)
    print(f'Scanned {len(table.prune)} pruning groups and {len(table.decompose)} layers at levels {table.levels} '
          f'in {table.seconds:.1f} s ({table.evaluations} evaluations, mode {table.mode}).')
    print(f'Wrote {out}/sensitivity.json and {out}/sensitivity.png')


def _plan_command(model, splits, settings: RunSettings, out: Path, progress: bool, command: str, args) -> None:
    from ..sensitivity.table import SensitivityTable
    from .workflow import make_compressor, plan_by_margin_rule

    table_path = out / 'sensitivity.json'
    if not table_path.exists():
        raise HMCError(f'{table_path} not found: run `hmc scan --out {out}` first (same --model/--data)')
    table = SensitivityTable.from_json(table_path)
    if settings.uses_margin_rule(settings.methods[0]):
        plan, margin_rule = plan_by_margin_rule(model, splits, settings, table, cache_path=out / 'margin_rule.json')
        latency_report = margin_rule['latency_budget']
        print(_margin_rule_line(margin_rule))
    else:
        compressor = make_compressor(model, splits, settings, settings.methods[0], table=table, progress=progress)
        plan, latency_report = compressor.make_plan(), compressor.latency_report
    plan.to_json(out / 'plan.json')
    print(plan.table())
    measured = ', '.join(f'{metric} {value:.4f}' for metric, value in plan.measured.items())
    print(f'\nMeasured kept fractions of this plan: {measured}. Wrote {out}/plan.json')
    if latency_report:
        print(_latency_line(latency_report))


def _compress_command(model, splits, settings: RunSettings, out: Path, progress: bool, command: str, args) -> None:
    from ..planning.plan import CompressionPlan
    from ..sensitivity.table import SensitivityTable
    from . import distributed
    from .export import save_compressed
    from .report import format_table, write_report
    from .workflow import compress_and_measure, make_compressor, scan, uncompressed_row

    if args.plan:
        plan = CompressionPlan.from_json(args.plan)
        compressor = make_compressor(model, splits, settings, plan.mode, plan=plan, progress=progress,
                                     data_parallel=distributed.active())
        compressed, _ = compressor.compress(max_epochs=settings.finetune_epochs or None)
        if not distributed.is_main():
            return
        save_compressed(compressed, out / 'compressed.pt', plan)
        print(plan.table())
    else:
        table_path, table = out / 'sensitivity.json', None  # under torchrun only rank 0 scans and plans
        if distributed.is_main():
            table = SensitivityTable.from_json(table_path) if table_path.exists() else scan(model, splits, settings,
                                                                                             out, progress)
        row, compressed, plan = compress_and_measure(model, splits, settings, settings.methods[0], table, progress, out)
        if not distributed.is_main():
            return
        rows = [uncompressed_row(model, splits, settings, latencies=row), row]
        write_report(out, rows, settings.as_dict(), [command])
        plan.to_json(out / 'plan.json')
        save_compressed(compressed, out / 'compressed.pt', plan)
        print(format_table(rows))
        if row.get('margin_rule'):
            print(_margin_rule_line(row['margin_rule']))
        if row.get('latency_budget'):
            print(_latency_line(row['latency_budget']))
    print(f'\nWrote {out}/compressed.pt (load with hmc_plugin.load_compressed).')
    if args.export == 'onnx':
        print(_export_onnx(compressed, splits, settings, out))


def _export_onnx(compressed, splits, settings: RunSettings, out: Path) -> str:
    """Write ``out/model.onnx`` (BatchNorm folded) and say how closely ONNX Runtime reproduces the model."""
    import torch

    from .data import calibration_batch
    from .export import check_onnx, export_onnx

    dummy_input = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    export_onnx(compressed, dummy_input, out / 'model.onnx')
    images, _ = calibration_batch(splits, 8, seed=settings.seed)
    try:
        difference = check_onnx(compressed, out / 'model.onnx', images, threads=settings.threads)
    except HMCConfigError as error:
        return f'Wrote {out}/model.onnx (BatchNorm folded; not checked: {error}).'
    return (f'Wrote {out}/model.onnx (BatchNorm folded); ONNX Runtime reproduces the model to {difference:.1e} '
            f'(largest absolute output difference on 8 training images).')


def _margin_rule_line(rule: dict) -> str:
    trials = [trial for trial in rule['trials'] if trial.get('kl') is not None]
    return (f"HMC margin rule ({rule['probe_steps']} probe steps, {len(trials)} candidates reached the budget): "
            f"tau {rule['margin']}, decompose_weight {rule['decompose_weight']}"
            + (" (prune-only's plan: no hybrid recovered measurably closer)"
               if (rule['margin'], rule['decompose_weight']) == ('inf', 'inf') else ''))


def _latency_line(report: dict) -> str:
    backend = f", {report['backend']}" if report.get('backend', 'torch') != 'torch' else ''
    return (f"CPU time at batch {report['batch']}, {report['threads']} threads{backend}: {report['original_ms']:.2f} ms -> "
            f"{report['measured_ms']:.2f} ms measured ({report['measured']:.3f} kept), {report['predicted_ms']:.2f} ms "
            f"predicted by the latency model (error {100 * report['prediction_error']:+.1f} %)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format='%(message)s')
    for noisy in ('nni', 'torch_pruning'):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        _run(args)
    except HMCError as error:
        print(f'hmc {args.command}: error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
