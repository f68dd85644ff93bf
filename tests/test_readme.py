"""The README is the front door: it fits on a screen, and what it shows a user to type is valid.

Its YAML snippets (fenced blocks and the inline ``algorithms: {...}``) go through the same checks the pre-flight
runs on a training config: registered names, accepted keys, the ``drp_multidomain`` dataset rules, and the
safe components (ours) constructed, which validates the policy and its keys. The names in its components table
and its commands are the ones setup.py registers, and every ``make`` target it names exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'


def _setup_entry_points() -> dict[str, list[str]]:
    namespace: dict = {}
    source = (REPO / 'setup.py').read_text()
    exec(compile(source.split('\nsetup(')[0], 'setup.py', 'exec'), namespace)  # ENTRY_POINTS, not setup()
    return {group: [entry.split('=')[0].strip() for entry in entries]
            for group, entries in namespace['ENTRY_POINTS'].items()}


def yaml_snippets(text: str) -> list[dict]:
    fenced = re.findall(r'```yaml\n(.*?)```', text, re.S)
    inline = [m.replace('\n', ' ') for m in re.findall(r'`(algorithms: \{.*?\})`', text, re.S)]
    return [yaml.safe_load(s) for s in fenced + inline]


def check_snippet(snippet: dict, data_root: Path | None = None) -> None:
    """The pre-flight's own checks of the sections a snippet has (ConfigError on the first mistake); a
    ``drp_multidomain`` loader reads its shards from ``data_root`` instead of the README's path."""
    from llmfoundry import registry

    from drp_foundry.composer import config_checks as checks

    cfg = OmegaConf.create(snippet)
    if data_root is not None and cfg.get('train_loader', {}).get('name') == 'drp_multidomain':
        cfg.train_loader.dataset.data_root = str(data_root)
    for section, reg in (('callbacks', registry.callbacks), ('algorithms', registry.algorithms),
                         ('loggers', registry.loggers)):
        checks._check_named_components(cfg, section, reg)
    for key in ('train_loader', 'eval_loader'):
        if key in cfg:
            if cfg[key].get('name') == 'drp_multidomain':
                checks._check_multidomain(key, OmegaConf.to_container(cfg[key], resolve=True))
            checks._check_loader(key, cfg[key])


def test_the_readme_fits_on_a_screen():
    assert len(README.read_bytes()) <= 8192


def one_sample_shards(root: Path, domains: list[str], split: str = 'train') -> Path:
    """``root/<domain>/<split>/``: an MDS dataset of one sample each, as data_prep writes them."""
    import numpy as np

    from data_prep.build_domain_mds import write_mds_split

    for domain in domains:
        write_mds_split(np.zeros((1, 8), dtype=np.int32), root / domain / split)
    return root


def test_every_yaml_snippet_passes_the_preflight_checks(tmp_path):
    snippets = yaml_snippets(README.read_text())
    assert len(snippets) >= 2  # the scheduler block and the pruning algorithms
    sections = set()
    for snippet in snippets:
        loader = snippet.get('train_loader') or {}
        data_root = one_sample_shards(tmp_path / 'mds', loader['dataset']['domains']) if loader else None
        check_snippet(snippet, data_root)
        sections.update(snippet)
    assert {'train_loader', 'eval_loader', 'callbacks', 'algorithms'} <= sections


def test_the_check_refuses_a_snippet_with_a_mistake(tmp_path):
    from drp_foundry.composer.config_checks import ConfigError

    (scheduler, *_) = yaml_snippets(README.read_text())
    data_root = one_sample_shards(tmp_path / 'mds', scheduler['train_loader']['dataset']['domains'])
    scheduler['callbacks']['drp_dynamic_loading']['policy']['rhoo'] = 0.1
    with pytest.raises(ConfigError, match='rhoo'):
        check_snippet(scheduler, data_root)
    del scheduler['callbacks']['drp_dynamic_loading']['policy']['rhoo']
    with pytest.raises(ConfigError, match='no MDS dataset'):  # the README's own path is checked too
        check_snippet(scheduler)
    with pytest.raises(ConfigError, match='drp_mask_lerner'):
        check_snippet({'algorithms': {'drp_mask_lerner': {}}})


def test_the_components_and_commands_it_names_are_registered():
    text = README.read_text()
    entry_points = _setup_entry_points()
    registered = {name for group, names in entry_points.items() if group.startswith('llmfoundry_') for name in names}
    table = re.findall(r'^\| (`drp_[^|]*) \|', text, re.M)
    named = {n for cell in table for n in re.findall(r'`(drp_\w+)`', cell)}
    assert named and named <= registered, named - registered
    assert registered - {'drp_domain_evals'} <= named | {'drp_domain_evals'}, registered - named  # every one listed
    commands = set(re.findall(r'`(drp-[a-z-]+)`', text)) | set(re.findall(r'^(drp-[a-z-]+) ', text, re.M))
    assert commands and commands <= set(entry_points['console_scripts']), commands - set(entry_points['console_scripts'])
    targets = set(re.findall(r'^([\w-]+):', (REPO / 'Makefile').read_text(), re.M))
    assert set(re.findall(r'^make ([\w-]+)', text, re.M)) | set(re.findall(r'`make ([\w-]+)`', text)) <= targets
