"""The README's "Use with NNI" snippet runs exactly as written."""
from __future__ import annotations

import re
from pathlib import Path

import onnxruntime
import torch

README = Path(__file__).resolve().parents[1] / 'README.md'


def readme_snippet(name: str) -> str:
    text = README.read_text()
    match = re.search(rf'<!-- readme-snippet: {name} -->\s*```python\n(.*?)```', text, re.S)
    assert match, f'README has no snippet {name!r}'
    return match.group(1)


def test_use_with_nni_snippet_runs_and_its_files_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_snippet('use-with-nni'), str(README), 'exec'), namespace)
    compressed, reloaded = namespace['compressed'].eval(), namespace['reloaded'].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), compressed(x), rtol=0, atol=0)
    session = onnxruntime.InferenceSession('resnet56_hmc.onnx')
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {'input': x.numpy()})[0]), compressed(x),
                                   rtol=1e-4, atol=1e-4)
