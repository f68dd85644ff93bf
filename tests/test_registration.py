"""Our components resolve by name through LLM-Foundry's registries, via entry points."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import distribution

import pytest


def _our_registry_entry_points():
    eps = [ep for ep in distribution('drp-foundry').entry_points if ep.group.startswith('llmfoundry_')]
    assert eps, 'drp-foundry declares no llmfoundry_* entry points (is it installed with pip install -e .?)'
    return eps


def test_entry_points_are_declared_for_every_component():
    names = {(ep.group, ep.name) for ep in _our_registry_entry_points()}
    assert ('llmfoundry_callbacks', 'drp_domain_eval_loss') in names
    for ep in _our_registry_entry_points():
        assert ep.name.startswith('drp_'), f'{ep.name}: our registered names carry the drp_ prefix'
        assert ep.value.startswith('drp_foundry.'), ep.value


@pytest.mark.slow
def test_names_resolve_in_a_fresh_interpreter_without_importing_drp_foundry():
    """A stock LLM-Foundry process finds our names only through entry points."""
    pairs = [(ep.group.removeprefix('llmfoundry_'), ep.name, ep.value) for ep in _our_registry_entry_points()]
    script = f'''
import json, sys
from llmfoundry import registry
assert not any(m.startswith('drp_foundry') for m in sys.modules), 'drp_foundry imported before lookup'
out = []
for registry_name, name, value in {pairs!r}:
    obj = getattr(registry, registry_name).get(name)
    out.append([name, obj.__module__ + ':' + obj.__qualname__, value])
print(json.dumps(out))
'''
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(resolved) == len(pairs)
    for name, found, declared in resolved:
        assert found == declared, f'{name} resolved to {found}, declared {declared}'


@pytest.mark.parametrize('group_suffix', ['callbacks'])
def test_registry_lists_our_names(group_suffix):
    from llmfoundry import registry

    assert 'drp_domain_eval_loss' in getattr(registry, group_suffix).get_all()
