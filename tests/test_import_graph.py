"""The import graph follows the layout: the math and the data never import the glue, eval/ never imports
composer/, and nothing outside the commands imports the commands. Read from the source (ast), so an import
inside a function counts too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'drp_foundry'

# folder of drp_foundry -> module prefixes none of its files may import
FORBIDDEN = {
    'pruning': ('composer', 'llmfoundry', 'drp_foundry.composer', 'drp_foundry.eval', 'drp_foundry.commands'),
    'scheduling': ('composer', 'llmfoundry', 'drp_foundry.composer', 'drp_foundry.eval', 'drp_foundry.commands'),
    'data': ('composer', 'llmfoundry', 'drp_foundry.composer', 'drp_foundry.eval', 'drp_foundry.commands'),
    'eval': ('drp_foundry.composer', 'drp_foundry.commands'),
    'composer': ('drp_foundry.commands',),
}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved), at any depth."""
    package = '.'.join(path.relative_to(PACKAGE.parent).with_suffix('').parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
                module = f'{base}.{node.module}' if node.module else base
            else:
                module = node.module or ''
            names.add(module)
            names.update(f'{module}.{alias.name}' for alias in node.names)
    return names


def _violations(folder: str) -> list[str]:
    found = []
    for path in sorted((PACKAGE / folder).rglob('*.py')):
        for name in sorted(imported_modules(path)):
            if any(name == prefix or name.startswith(prefix + '.') for prefix in FORBIDDEN[folder]):
                found.append(f'{path.relative_to(PACKAGE.parent)} imports {name}')
    return found


@pytest.mark.parametrize('folder', sorted(FORBIDDEN))
def test_layers_import_only_downwards(folder):
    assert _violations(folder) == []


def test_the_check_sees_nested_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: a lazy import inside a function and a relative import are both found."""
    fake = tmp_path / 'drp_foundry'
    (fake / 'eval').mkdir(parents=True)
    (fake / 'eval' / 'x.py').write_text('def f():\n    from ..composer import hf_model\n    import llmfoundry\n')
    monkeypatch.setattr(sys.modules[__name__], 'PACKAGE', fake)
    assert _violations('eval') == ['drp_foundry/eval/x.py imports drp_foundry.composer',
                                   'drp_foundry/eval/x.py imports drp_foundry.composer.hf_model']
