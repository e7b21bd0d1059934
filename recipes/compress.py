"""Run a recipe: compress a model on your data with HMC and every baseline, from a YAML config.

    .venv/bin/python recipes/compress.py --config recipes/configs/cifar10_resnet56.yaml \
        --data-dir ~/data/cifar-10-batches-py [--checkpoint trained.pt] [--out runs/cifar10_resnet56]
    .venv/bin/python recipes/compress.py --config recipes/configs/imagefolder_resnet50.yaml \
        --data-dir ~/data/my_images [--checkpoint trained.pt]

The config's ``data`` names the loader (``cifar10``: the python-pickle batches directory with
data_batch_1..5 and test_batch; ``imagefolder``: root/class_x/*.png, or root/train and root/val) and
``--data-dir`` where the data is; nothing is downloaded. Any other ``hmc report`` option may follow
(e.g. ``--finetune-epochs 10``). Runs resume: the trained baseline and the sensitivity scan are cached
in the output folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from hmc_plugin.app.cli import main as hmc_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', required=True, help='YAML recipe, e.g. recipes/configs/cifar10_resnet56.yaml')
    parser.add_argument('--data-dir', required=True, help='where the data set is (see the config\'s data)')
    parser.add_argument('--out', help='output folder (default runs/<config name>)')
    args, rest = parser.parse_known_args(argv)
    kind = (yaml.safe_load(Path(args.config).read_text()) or {}).get('data', 'cifar10')
    out = args.out or str(Path('runs') / Path(args.config).stem)
    return hmc_main(['report', '--config', args.config, '--data', f'{kind}:{args.data_dir}', '--out', out, *rest])


if __name__ == '__main__':
    sys.exit(main())
