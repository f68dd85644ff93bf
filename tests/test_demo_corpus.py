"""The embedded demo corpus: what its README says it is, readable by data_prep, shipped in the wheel."""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import zstandard
from conftest import copy_tracked_files

from data_prep.build_domain_mds import find_domain_files
from drp_foundry.demo import DEMO_CORPUS

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


def test_it_is_the_shared_sample_in_full(shared_sample_dir):
    for domain in DOMAINS:
        assert _decompressed(domain) == (shared_sample_dir / f'{domain}.jsonl').read_bytes(), domain


def test_data_prep_finds_the_seven_domains_and_ignores_the_readme_silently(caplog):
    with caplog.at_level(logging.WARNING):
        files = find_domain_files(DEMO_CORPUS)
    assert sorted(files) == DOMAINS
    assert [p.name for p in files['wiki']] == ['wiki.jsonl.zst']
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_the_wheel_ships_the_corpus_and_the_makefile_defaults_to_it(tmp_path):
    """Built from the tracked files as a clone has them (untracked files cannot sneak in)."""
    clone = copy_tracked_files(tmp_path / 'clone')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(tmp_path / 'wheel'), str(clone)], check=True, capture_output=True)
    (wheel,) = (tmp_path / 'wheel').glob('drp_foundry-*.whl')
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name: archive.getinfo(name).file_size for name in archive.namelist()
                   if name.startswith('drp_foundry/demo_corpus/')}
    assert sorted(shipped) == sorted([f'drp_foundry/demo_corpus/{d}.jsonl.zst' for d in DOMAINS]
                                     + ['drp_foundry/demo_corpus/README.md'])
    assert sum(shipped.values()) < 5_000_000
    assert re.search(r'^CORPUS \?= drp_foundry/demo_corpus$', (REPO / 'Makefile').read_text(), re.M)
