"""README is a guide: its "Use with NNI" snippet runs exactly as written, it stays short with "Use with NNI" near
the top, its links resolve, and its results summary quotes recipes/benchmarks/README.md."""
from __future__ import annotations

import re
from pathlib import Path

import onnxruntime
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
BENCHMARKS_README = REPO / 'recipes' / 'benchmarks' / 'README.md'
NNI_EXPERIMENT_README = REPO / 'recipes' / 'nni_experiment' / 'README.md'
CONFIG_KEYS_README = REPO / 'recipes' / 'configs' / 'README.md'  # generated from hmc_plugin.settings.HMCSettings
MAX_LINES = 350
USE_WITH_NNI_WITHIN = 120
NUMBER = re.compile(r'\d+(?:[.,]\d+)*')


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
    session = onnxruntime.InferenceSession('resnet20_hmc.onnx')
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {'input': x.numpy()})[0]), compressed(x),
                                   rtol=1e-4, atol=1e-4)


def test_readme_is_a_guide_of_at_most_350_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, (f'README has {len(lines)} lines; move reference material next to what it '
                                     f'describes (recipes/benchmarks/README.md, recipes/nni_experiment/README.md)')


def test_use_with_nni_is_within_the_first_120_lines():
    lines = README.read_text().splitlines()
    headings = [number for number, line in enumerate(lines, 1) if line.strip() == '## Use with NNI']
    assert len(headings) == 1, headings
    assert headings[0] <= USE_WITH_NNI_WITHIN, f'"## Use with NNI" is on line {headings[0]}'
    # the snippet follows its heading, before the next section
    section = '\n'.join(lines[headings[0]:]).split('\n## ', 1)[0]
    assert '<!-- readme-snippet: use-with-nni -->' in section


def test_quick_start_keeps_its_two_commands():
    text = README.read_text()
    assert 'bash recipes/setup_env.sh && .venv/bin/hmc report --out hmc_output\n' in text
    assert 'bash recipes/setup_env.sh && .venv/bin/python -m pytest -q\n' in text  # what CI runs


@pytest.mark.parametrize('reference', [BENCHMARKS_README, NNI_EXPERIMENT_README], ids=lambda path: path.parent.name)
def test_reference_readmes_exist_and_are_linked_from_readme(reference):
    assert reference.is_file(), reference
    assert len(reference.read_text().splitlines()) > 20
    relative = reference.relative_to(REPO).as_posix()
    assert f']({relative})' in README.read_text(), f'README does not link {relative}'


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of ``markdown`` (lower case, punctuation dropped, spaces to hyphens)."""
    body = re.sub(r'(?ms)^```.*?^```', '', markdown)  # no headings inside code blocks
    return {re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
            for heading in re.findall(r'(?m)^#{1,6} (.+)$', body)}


@pytest.mark.parametrize('document', [README, BENCHMARKS_README, NNI_EXPERIMENT_README], ids=lambda path: path.parent.name)
def test_relative_links_resolve(document):
    broken = []
    for target in re.findall(r'\]\(([^)\s]+)\)', document.read_text()):
        if re.match(r'[a-z]+://', target):
            continue
        path, _, anchor = target.partition('#')
        resolved = (document.parent / path).resolve() if path else document
        if resolved == CONFIG_KEYS_README and not resolved.exists():
            continue  # the generated key table lands with the HMCSettings change
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == '.md' and anchor not in _anchors(resolved.read_text()):
            broken.append(target)
    assert not broken, f'{document.relative_to(REPO)}: links that do not resolve: {broken}'


def test_results_summary_quotes_the_benchmarks_readme_next_to_its_commands():
    """Every figure of README's results summary is in the section of recipes/benchmarks/README.md that gives the
    command the summary names beside it."""
    results = README.read_text().split('\n## Results\n', 1)[1].split('\n## ', 1)[0]
    sections = re.split(r'(?m)^(?=## )', BENCHMARKS_README.read_text())
    items = re.split(r'(?m)^- ', results)[1:]
    assert len(items) >= 4, results
    for item in items:
        commands = re.findall(r'`(\.venv/bin/python recipes/benchmarks/[^`]+)`', item)
        assert len(commands) == 1, item
        holding = [section for section in sections if commands[0] in section]
        assert holding, f'recipes/benchmarks/README.md does not give {commands[0]!r}'
        quoted = set(NUMBER.findall(' '.join(holding)))
        figures = NUMBER.findall(item.replace(commands[0], ''))
        assert figures, item
        missing = [figure for figure in figures if figure not in quoted]
        assert not missing, f'{missing} are not next to {commands[0]!r} in recipes/benchmarks/README.md'
