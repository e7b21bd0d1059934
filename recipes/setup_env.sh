#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install hmc_plugin with its test extra. Idempotent: reruns are quick.
# torch is pinned to the releases this machine kind has on disk (2.14.1 with torchvision 0.29.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! grep -q "hmc_plugin.app.cli" .venv/bin/hmc 2>/dev/null || ! .venv/bin/python -c "import hmc_plugin, torchvision, onnxruntime, nni, torch_pruning, tensorly, selenium, filelock, pkg_resources" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[test]"
fi
