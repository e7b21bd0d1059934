"""The package's stages import only earlier stages and the shared modules (the module map in hmc_plugin/__init__)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'hmc_plugin'

# stage -> rank; a module may import from its own rank or a lower one
STAGES = {'errors': 0, 'settings': 0, '_version': 0, 'utils': 0, 'engines': 1, 'sensitivity': 2, 'planning': 3,
          'apply': 4, 'nni_api': 5, 'app': 6, 'experiment': 7}


def _stage(module: str) -> str:
    return module.split('.')[1]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        if 'tests' in parts or parts[-1] == '__init__' and len(parts) == 2:
            continue  # unit tests, and the package's public surface, may import anything
        found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return found


def imports_of(module: str, path: Path) -> list[str]:
    """Every hmc_plugin module ``module`` imports, at any depth (function-level imports too), made absolute."""
    package = module.split('.') if path.name == '__init__.py' else module.split('.')[:-1]
    targets = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = '.'.join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ''
            if name == 'hmc_plugin':  # `from hmc_plugin import x` / `from .. import x`
                targets += [f'hmc_plugin.{alias.name}' for alias in node.names]
            elif name.startswith('hmc_plugin.'):
                targets.append(name)
        elif isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names if alias.name.startswith('hmc_plugin.')]
    return targets


def test_every_module_belongs_to_a_known_stage():
    unknown = sorted(module for module in _modules() if _stage(module) not in STAGES)
    assert not unknown, f'add these to STAGES and to the module map in hmc_plugin/__init__.py: {unknown}'


@pytest.mark.parametrize('module', sorted(_modules()))
def test_no_stage_imports_a_later_stage(module):
    rank = STAGES[_stage(module)]
    later = [target for target in imports_of(module, _modules()[module]) if STAGES[_stage(target)] > rank]
    assert not later, f'{module} (stage {_stage(module)}) imports later stages: {later}'


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    source = tmp_path / 'example.py'
    source.write_text('from ..app.cli import main\n\ndef f():\n    from ..utils.counting import count_flops\n')
    assert sorted(imports_of('hmc_plugin.planning.example', source)) == ['hmc_plugin.app.cli',
                                                                          'hmc_plugin.utils.counting']
