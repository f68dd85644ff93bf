"""The public face, as Composer's: every registered class is importable from ``drp_foundry`` and its docstring
has a short ``Example:`` that runs (doctest); importing the pure math never imports Composer."""

from __future__ import annotations

import doctest
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import drp_foundry

REPO = Path(__file__).resolve().parents[1]


def registered_classes() -> list[str]:
    """Class names behind setup.py's LLM-Foundry and policy entry points (functions, e.g. builders, excluded)."""
    namespace: dict = {}
    exec(compile((REPO / 'setup.py').read_text().split('\nsetup(')[0], 'setup.py', 'exec'), namespace)
    names = set()
    for group, entries in namespace['ENTRY_POINTS'].items():
        if group.startswith('llmfoundry_') or group == 'drp_foundry_policies':
            for entry in entries:
                attribute = entry.split(':')[1].strip()
                if attribute[0].isupper():
                    names.add(attribute)
    return sorted(names)


def test_every_public_name_resolves_and_every_registered_class_is_public():
    for name in drp_foundry.__all__:
        assert getattr(drp_foundry, name) is not None, name
    assert set(registered_classes()) <= set(drp_foundry.__all__)
    assert {n for n in drp_foundry.__all__ if n.startswith('apply_')} >= {
        'apply_mask_learner', 'apply_lagrangian', 'apply_dynamic_loading', 'apply_distillation'}


def test_the_pure_math_does_not_pull_composer_in():
    code = ('import sys, drp_foundry, drp_foundry.pruning.mask_module, drp_foundry.scheduling.policies, '
            'drp_foundry.losses.distillation; print(sorted(m for m in ("composer", "llmfoundry") if m in sys.modules))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'


@pytest.mark.parametrize('name', registered_classes())
def test_the_class_docstring_example_runs(name):
    cls = getattr(drp_foundry, name)
    doc = inspect.getdoc(cls) or ''
    assert '\nExample:\n' in doc, f'{name} has no Example: section'
    tests = doctest.DocTestFinder(recurse=False).find(cls, name, globs={})
    examples = sum(len(t.examples) for t in tests)
    assert examples >= 2, f'{name}: the Example: section has {examples} doctest lines'
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f'{name}: {runner.failures} of {examples} example lines failed (see the output above)'
