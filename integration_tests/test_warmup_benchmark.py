"""The warm-up benchmark's harness: every cell is measured, rendered from its JSON, and reused on a rerun."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'recipes' / 'benchmarks' / 'baseline_warmup.py'


def run(out: Path, work: Path) -> dict:
    subprocess.run([sys.executable, str(SCRIPT), '--out', str(out), '--work', str(work), '--quick', '--threads', '1'],
                   check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads((out / 'baseline_warmup.json').read_text())


def test_quick_run_measures_both_data_sets_with_and_without_warm_up_and_resumes(tmp_path):
    report = run(tmp_path / 'out', tmp_path / 'work')
    cells = report['cells']
    assert [(cell['data'], cell['warmup_epochs'], cell['lr']) for cell in cells] == [
        ('digits', 0.0, 0.1), ('digits', 1.0, 0.1), ('hard', 0.0, 0.1), ('hard', 1.0, 0.1), ('hard', 1.0, 0.05)]
    assert all(0 <= cell['accuracy'] <= 1 and cell['test_images'] > 0 for cell in cells)
    hard = tmp_path / 'work' / 'hard_digits'
    assert len(list((hard / 'train').rglob('*.png'))) == cells[2]['train_images']  # the generated ImageFolder
    markdown = (tmp_path / 'out' / 'baseline_warmup.md').read_text()
    for cell in cells:
        assert f"| {cell['data']} | " in markdown and f"| {cell['accuracy']:.4f} |" in markdown
    again = run(tmp_path / 'out2', tmp_path / 'work')
    assert again['cells'] == cells  # read back from the cell store, not trained again
