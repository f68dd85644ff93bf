"""The embedded demo corpus: what its README says it is, readable by data_prep, shipped in the wheel; and the
demo run from that wheel installed away from any checkout."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import zstandard
from conftest import copy_tracked_files

from data_prep.build_domain_mds import find_domain_files
from drp_foundry.demo.pipeline import DEMO_CORPUS

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ['arxiv', 'book', 'c4-rp', 'cc', 'github', 'stackexchange', 'wiki']


def _decompressed(domain: str) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(open(DEMO_CORPUS / f'{domain}.jsonl.zst', 'rb')).read()


def test_every_file_matches_the_digest_and_count_in_its_readme():
    table = {m[1]: (int(m[2].replace(',', '')), m[3]) for m in
             re.finditer(r'^\| ([\w-]+) \| ([\d,]+) \| [\d,]+ \| [\d,]+ \| `([0-9a-f]{64})` \|$',
                         (DEMO_CORPUS / 'README.md').read_text(), re.M)}
    assert sorted(table) == DOMAINS
    for domain, (documents, digest) in table.items():
        data = _decompressed(domain)
        assert hashlib.sha256(data).hexdigest() == digest, domain
        assert data.count(b'\n') == documents, domain


def test_data_prep_finds_the_seven_domains_and_ignores_the_readme_silently(caplog):
    with caplog.at_level(logging.WARNING):
        files = find_domain_files(DEMO_CORPUS)
    assert sorted(files) == DOMAINS
    assert [p.name for p in files['wiki']] == ['wiki.jsonl.zst']
    assert not caplog.records, [r.getMessage() for r in caplog.records]


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    """Built from the tracked files as a clone has them (untracked files cannot sneak in)."""
    tmp_path = tmp_path_factory.mktemp('wheel')
    clone = copy_tracked_files(tmp_path / 'clone')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(tmp_path / 'wheel'), str(clone)], check=True, capture_output=True)
    (built,) = (tmp_path / 'wheel').glob('drp_foundry-*.whl')
    return built


def test_the_wheel_ships_the_corpus(wheel):
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name: archive.getinfo(name).file_size for name in archive.namelist()
                   if name.startswith('drp_foundry/demo/corpus/')}
    assert sorted(shipped) == sorted([f'drp_foundry/demo/corpus/{d}.jsonl.zst' for d in DOMAINS]
                                     + ['drp_foundry/demo/corpus/README.md'])
    assert sum(shipped.values()) < 5_000_000


@pytest.mark.slow
def test_the_demo_resolves_everything_from_an_installed_wheel(wheel, tmp_path):
    """Installed with --target into a folder, run from a folder outside the checkout with only that folder on
    the path: the corpus, the recipes and the stage modules all resolve inside the installed package."""
    site = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / 'elsewhere'
    (elsewhere / 'models').mkdir(parents=True)
    shutil.copytree(REPO / 'yamls' / 'demo' / 'models' / 'tiny-llama', elsewhere / 'models' / 'smollm2-135m')
    env = {**os.environ, 'PYTHONPATH': str(site)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)

    result = run('-c', 'import drp_foundry, data_prep; print(drp_foundry.__file__, data_prep.__file__)')
    assert result.stdout.split() == [str(site / 'drp_foundry' / '__init__.py'), str(site / 'data_prep' / '__init__.py')]
    result = run('-m', 'drp_foundry.commands.demo', '--check', '--work', 'runs/demo')
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert str(site / 'drp_foundry' / 'demo' / 'corpus') in lines['corpus'] and '7 domains' in lines['corpus']
    assert str(elsewhere / 'models' / 'smollm2-135m') in lines['source']  # the default source: under the cwd
    recipes = [line for line in result.stdout.splitlines() if line.startswith('recipe')]
    assert [Path(line.split()[1]).name for line in recipes] == ['smollm2_prune.yaml', 'smollm2_continue.yaml']
    assert all(line.split()[1].startswith(str(site / 'drp_foundry' / 'demo' / 'recipes')) for line in recipes)
    modules = [line for line in result.stdout.splitlines() if line.startswith('module') and 'drp_foundry' in line]
    assert len(modules) == 4 and all(str(site) in line for line in modules)
    # nothing resolves into the checkout; the environment's own tools (Composer's launcher) may live in a venv
    # inside it, as `make setup`'s default `.venv` does
    assert str(REPO) not in result.stdout.replace(str(Path(sys.prefix).resolve()), '<venv>').replace(sys.prefix, '<venv>')
    assert not (elsewhere / 'runs').exists()  # --check writes nothing
    # the training entry the stages launch starts from the wheel
    result = run('-m', 'drp_foundry.commands.train', '--help')
    assert result.returncode == 0 and 'composer -m drp_foundry.commands.train' in result.stdout
    # a missing source model is named with the way to make it
    shutil.rmtree(elsewhere / 'models')
    result = run('-m', 'drp_foundry.commands.demo', '--check')
    assert result.returncode != 0 and 'drp_foundry.commands.smollm2 --out models/smollm2-135m' in result.stderr
