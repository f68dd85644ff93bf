"""The import graph follows the layout, read from the source (ast), so an import inside a function counts too:

- no import cycle among the project's modules (``drp_foundry`` and ``data_prep``);
- the math and the data never import the glue, ``eval/`` never imports ``composer/``;
- only ``drp_foundry/commands/`` parses arguments or has ``__main__``, and nothing else imports it;
- nothing imports the demo (``drp_foundry/demo/``) but the demo itself and its two commands;
- ``data_prep`` never imports the commands, and ``drp_foundry`` imports ``data_prep`` in one module only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('drp_foundry', 'data_prep')

# folder of drp_foundry -> module prefixes none of its files may import
FORBIDDEN = {
    'pruning': ('composer', 'llmfoundry', 'drp_foundry.composer', 'drp_foundry.eval', 'drp_foundry.commands'),
    'losses': ('composer', 'llmfoundry', 'drp_foundry.composer', 'drp_foundry.eval', 'drp_foundry.commands'),
    'scheduling': ('composer', 'llmfoundry', 'drp_foundry.composer', 'drp_foundry.eval', 'drp_foundry.commands'),
    'data': ('composer', 'llmfoundry', 'drp_foundry.composer', 'drp_foundry.eval', 'drp_foundry.commands'),
    'eval': ('drp_foundry.composer', 'drp_foundry.commands'),
    'composer': ('drp_foundry.commands',),
}
DEMO_ENTRIES = ('drp_foundry.commands.demo', 'drp_foundry.commands.smollm2')
DATA_PREP_GATE = 'drp_foundry.commands.data_prep'  # the one module of drp_foundry that imports data_prep


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def project_modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for package in PACKAGES if (root / package).is_dir()
            for p in sorted((root / package).rglob('*.py'))}


def imported_modules(root: Path, path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved), at any depth."""
    name = module_name(root, path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1])
                module = f'{base}.{node.module}' if node.module else base
            else:
                module = node.module or ''
            names.add(module)
            names.update(f'{module}.{alias.name}' for alias in node.names)
    return names


def project_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (``a.b.c`` counts as its longest known prefix)."""
    modules = project_modules(root)
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in imported_modules(root, path):
            while imported and imported not in modules:
                imported = imported.rpartition('.')[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + '.')


def layer_violations(root: Path, folder: str) -> list[str]:
    found = []
    for path in sorted((root / 'drp_foundry' / folder).rglob('*.py')):
        for name in sorted(imported_modules(root, path)):
            if any(_within(name, prefix) for prefix in FORBIDDEN[folder]):
                found.append(f'{path.relative_to(root)} imports {name}')
    return found


def placement_violations(root: Path) -> list[str]:
    found = []
    graph = project_graph(root)
    for module, edges in sorted(graph.items()):
        for imported in sorted(edges):
            if _within(imported, 'drp_foundry.commands') and not _within(module, 'drp_foundry.commands'):
                found.append(f'{module} imports the command {imported}')
            if (_within(imported, 'drp_foundry.demo') and not _within(module, 'drp_foundry.demo')
                    and module not in DEMO_ENTRIES):
                found.append(f'{module} imports the demo ({imported})')
    gates = sorted(m for m, edges in graph.items()
                   if _within(m, 'drp_foundry') and any(_within(e, 'data_prep') for e in edges))
    if len(gates) > 1:
        found.append(f'drp_foundry imports data_prep in {len(gates)} modules: {gates} (only {DATA_PREP_GATE} may)')
    for module, path in sorted(project_modules(root).items()):
        if _within(module, 'drp_foundry.commands'):
            continue
        source = path.read_text()
        if "__name__ == '__main__'" in source or '__name__ == "__main__"' in source:
            found.append(f'{module} has a __main__ block (commands live in drp_foundry/commands/)')
        if any(_within(name, 'argparse') for name in imported_modules(root, path)):
            found.append(f'{module} parses arguments (commands live in drp_foundry/commands/)')
    return found


def test_the_tree_has_no_import_cycle():
    assert import_cycles(project_graph(ROOT)) == []


@pytest.mark.parametrize('folder', sorted(FORBIDDEN))
def test_layers_import_only_downwards(folder):
    assert layer_violations(ROOT, folder) == []


def test_commands_demo_and_data_prep_sit_where_the_layout_says():
    assert placement_violations(ROOT) == []


def _plant(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_planted_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    root = _plant(tmp_path, {
        'drp_foundry/__init__.py': '',
        'drp_foundry/pruning/__init__.py': '',
        'drp_foundry/pruning/a.py': 'from drp_foundry.pruning.b import g\n',
        'drp_foundry/pruning/b.py': 'def g():\n    from .c import h\n    return h\n',
        'drp_foundry/pruning/c.py': 'def h():\n    from drp_foundry.pruning import a\n',
        'drp_foundry/pruning/d.py': 'import drp_foundry.pruning.a\n',  # imports into the cycle, not part of it
        'data_prep/__init__.py': '',
    })
    assert import_cycles(project_graph(root)) == [['drp_foundry.pruning.a', 'drp_foundry.pruning.b',
                                                   'drp_foundry.pruning.c']]


def test_the_placement_rules_see_commands_demo_main_blocks_and_data_prep(tmp_path):
    root = _plant(tmp_path, {
        'drp_foundry/__init__.py': '',
        'drp_foundry/commands/__init__.py': '',
        'drp_foundry/commands/demo.py': 'import argparse\nfrom drp_foundry.demo import pipeline\n',
        'drp_foundry/commands/data_prep.py': 'from data_prep import build\n',
        'drp_foundry/demo/__init__.py': '',
        'drp_foundry/demo/pipeline.py': '',
        'drp_foundry/export.py': "def f():\n    from drp_foundry.commands import demo\nif __name__ == '__main__':\n    f()\n",
        'drp_foundry/eval/score.py': 'def f():\n    from ..demo.pipeline import x\n',
        'drp_foundry/composer/checks.py': 'def f():\n    import data_prep.build\n',
        'data_prep/__init__.py': '',
        'data_prep/build.py': 'import argparse\n',
    })
    assert placement_violations(root) == [
        'drp_foundry.eval.score imports the demo (drp_foundry.demo.pipeline)',
        'drp_foundry.export imports the command drp_foundry.commands',
        'drp_foundry.export imports the command drp_foundry.commands.demo',
        "drp_foundry imports data_prep in 2 modules: ['drp_foundry.commands.data_prep', 'drp_foundry.composer.checks'] "
        '(only drp_foundry.commands.data_prep may)',
        'data_prep.build parses arguments (commands live in drp_foundry/commands/)',
        'drp_foundry.export has a __main__ block (commands live in drp_foundry/commands/)',
    ]


def test_the_layer_check_sees_nested_and_relative_imports(tmp_path):
    root = _plant(tmp_path, {'drp_foundry/eval/x.py': 'def f():\n    from ..composer import hf_model\n    import llmfoundry\n'})
    assert layer_violations(root, 'eval') == ['drp_foundry/eval/x.py imports drp_foundry.composer',
                                              'drp_foundry/eval/x.py imports drp_foundry.composer.hf_model']
