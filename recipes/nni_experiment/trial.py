"""NNI trial: compress with HMCCompressor using the tuner's hyperparameters and report to NNI.

Reports the test accuracy after every fine-tuning epoch (``nni.report_intermediate_result``) and a final
dict (``nni.report_final_result``): ``default`` (fine-tuned test accuracy, what the tuner maximises),
``flops_kept``, ``params_kept``, ``latency_ms`` and the rest of ``hmc_plugin.experiment.trial.FINAL_KEYS``.
The trained baseline and the sensitivity scan are cached in ``--cache-dir`` and shared by all trials.

Outside an experiment it runs one configuration: ``python trial.py --parameters '{"mode": "prune"}'``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import nni

from hmc_plugin.errors import HMCError
from hmc_plugin.experiment.trial import TrialOptions, run_trial


def parse_options(argv: list[str] | None = None) -> tuple[TrialOptions, dict]:
    defaults = TrialOptions()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(TrialOptions):
        default = getattr(defaults, field.name)
        flag = '--' + field.name.replace('_', '-')
        if isinstance(default, bool):
            parser.add_argument(flag, action='store_true', help=field.metadata['help'])
            continue
        kind = type(default) if default is not None else (str if field.name == 'checkpoint' else int)
        parser.add_argument(flag, type=kind, default=default,
                            help=field.metadata['help'] + ('' if default is None else f' (default {default})'))
    parser.add_argument('--parameters', type=json.loads, default={},
                        help='JSON hyperparameters when run outside NNI (NNI gives them otherwise)')
    args = vars(parser.parse_args(argv))
    parameters = args.pop('parameters')
    return TrialOptions(**args), parameters


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    for noisy in ('nni', 'torch_pruning'):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    options, parameters = parse_options(argv)
    parameters = {**parameters, **(nni.get_next_parameter() or {})}
    logging.info('trial %s, hyperparameters %s', nni.get_trial_id(), parameters)
    try:
        result = run_trial(parameters, options, on_epoch=lambda epoch, accuracy: nni.report_intermediate_result(accuracy),
                           output_dir=os.environ.get('NNI_OUTPUT_DIR'))
    except HMCError as error:
        print(f'trial.py: error: {error}', file=sys.stderr)
        return 2
    nni.report_final_result(result)
    logging.info('final result %s', json.dumps(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
