"""data_prep.hf_corpora on local miniatures of SlimPajama and CulturaX (same fields, same file types).

The hub is out of reach here, so the miniatures are read through the same ``datasets``
streaming path with ``dataset='json'`` and ``data_files``: SlimPajama as ``.jsonl.zst`` and
``.jsonl`` chunks with ``text`` and ``meta.redpajama_set_name``; CulturaX as one folder of
files per language with ``text`` (and its other fields).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from data_prep.build_domain_mds import PrepSettings, build_domain_mds, find_domain_files, read_documents
from data_prep.hf_corpora import (
    EXPORT_MANIFEST,
    SLIMPAJAMA_DOMAINS,
    CorpusExportError,
    export_culturax,
    export_slimpajama,
)
from drp_foundry.commands.data_prep import hf_corpora_main as main

SET_NAMES = list(SLIMPAJAMA_DOMAINS)  # RedPajamaCommonCrawl, RedPajamaC4, ...


def _text(tag: str, i: int) -> str:
    return f'{tag} document {i}: ' + ' '.join(f'{tag}{i}w{j}' for j in range(30))


def _slimpajama_rows(n: int) -> list[dict]:
    """``n`` records cycling through the seven subsets (CommonCrawl twice as often), in a fixed order."""
    cycle = [SET_NAMES[0]] + SET_NAMES
    return [{'text': _text(cycle[i % len(cycle)], i), 'meta': {'redpajama_set_name': cycle[i % len(cycle)]}}
            for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict], zst: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ''.join(json.dumps(row) + '\n' for row in rows).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if zst else data)


@pytest.fixture
def slimpajama_dir(tmp_path) -> tuple[str, list[dict]]:
    """Two chunks in SlimPajama's layout (train/chunkN/*.jsonl.zst); returns the glob and the rows in order."""
    rows = _slimpajama_rows(48)
    root = tmp_path / 'SlimPajama-mini' / 'train'
    _write_jsonl(root / 'chunk1' / 'example_train_0.jsonl.zst', rows[:24], zst=True)
    _write_jsonl(root / 'chunk2' / 'example_train_1.jsonl.zst', rows[24:], zst=True)
    return str(root / 'chunk*' / '*.jsonl.zst'), rows


def _exported_texts(out: Path, domain: str) -> list[str]:
    return read_documents(find_domain_files(out, [domain])[domain])


def _first(rows: list[dict], set_name: str, n: int) -> list[str]:
    return [r['text'] for r in rows if r['meta']['redpajama_set_name'] == set_name][:n]


def test_slimpajama_routes_each_subset_to_its_domain_up_to_the_cap(slimpajama_dir, tmp_path):
    files, rows = slimpajama_dir
    out = tmp_path / 'corpus'
    manifest = export_slimpajama(out, dataset='json', data_files=files, max_documents={**dict.fromkeys(
        SLIMPAJAMA_DOMAINS.values(), 3), 'cc': 5, 'stackexchange': 100})
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(SLIMPAJAMA_DOMAINS.values())
    for set_name, domain in SLIMPAJAMA_DOMAINS.items():
        cap = {'cc': 5, 'stackexchange': 100}.get(domain, 3)
        assert _exported_texts(out, domain) == _first(rows, set_name, cap)
    # the stream ran out before 100 StackExchange documents: counted and flagged, not hidden
    assert manifest['domains']['stackexchange'] == {**manifest['domains']['stackexchange'], 'documents': 6,
                                                    'reached_cap': False}
    assert manifest['domains']['cc']['reached_cap'] is True
    assert json.loads((out / EXPORT_MANIFEST).read_text()) == manifest
    assert not list(out.glob('.*')), 'no partial folders may remain'


def test_export_is_deterministic_and_build_domain_mds_reads_it(slimpajama_dir, tmp_path, tiny_tokenizer_dir):
    files, _ = slimpajama_dir
    kwargs = dict(dataset='json', data_files=files, domains=['cc', 'github', 'wiki'], max_documents=4,
                  docs_per_file=3, shuffle_buffer=5, seed=3)
    first, second = tmp_path / 'a', tmp_path / 'b'
    export_slimpajama(first, **kwargs)
    export_slimpajama(second, **kwargs)
    for path in sorted(first.rglob('*.jsonl')):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes()
    assert sorted(p.name for p in (first / 'cc').iterdir()) == ['part-00000.jsonl', 'part-00001.jsonl']
    manifest = build_domain_mds(first, tmp_path / 'mds', tokenizer=str(tiny_tokenizer_dir),
                                settings=PrepSettings(max_seq_len=16, min_eval_samples=1, eval_fraction=0.2))
    assert sorted(manifest['domains']) == ['cc', 'github', 'wiki']
    assert all(info['documents'] == 4 and info['train_samples'] > 0 for info in manifest['domains'].values())


def test_character_cap_keeps_the_document_that_crosses_it(slimpajama_dir, tmp_path):
    files, rows = slimpajama_dir
    github = _first(rows, 'RedPajamaGithub', 10)
    cap = len(github[0]) + 1  # crossed by the second document
    manifest = export_slimpajama(tmp_path / 'out', dataset='json', data_files=files, domains=['github'],
                                 max_characters=cap)
    assert _exported_texts(tmp_path / 'out', 'github') == github[:2]
    assert manifest['domains']['github']['characters'] == len(github[0]) + len(github[1])


def test_unknown_subset_name_is_refused_and_nothing_is_left(tmp_path):
    rows = _slimpajama_rows(6)
    rows[4]['meta']['redpajama_set_name'] = 'RedPajamaWiki'
    _write_jsonl(tmp_path / 'src' / 'part.jsonl', rows)
    out = tmp_path / 'out'
    with pytest.raises(CorpusExportError, match=r"redpajama_set_name='RedPajamaWiki'.*RedPajamaWikipedia"):
        export_slimpajama(out, dataset='json', data_files=str(tmp_path / 'src' / '*.jsonl'), max_documents=10)
    assert list(out.iterdir()) == []


def test_record_without_text_names_the_record(tmp_path):
    rows = _slimpajama_rows(4)
    rows[2] = {'content': 'x', 'meta': rows[2]['meta']}
    _write_jsonl(tmp_path / 'src' / 'part.jsonl', rows)
    with pytest.raises(CorpusExportError, match=r'record 2: no string field "text"'):
        export_slimpajama(tmp_path / 'out', dataset='json', data_files=str(tmp_path / 'src' / '*.jsonl'),
                          max_documents=10)


@pytest.mark.parametrize('kwargs, message', [
    (dict(), r'have no cap'),
    (dict(max_documents={'cc': 2}), r"domains \[.*'github'.*\] have no cap"),
    (dict(max_documents={'wikipedia': 2}, max_characters=10), r"max_documents names unknown domains \['wikipedia'\]"),
    (dict(max_documents=0), r'max_documents must be a positive integer'),
    (dict(domains=['c4'], max_documents=2), r"\['c4'\] are not SlimPajama domains"),
])
def test_bad_caps_and_domains_are_refused_before_reading(tmp_path, kwargs, message):
    with pytest.raises(CorpusExportError, match=message):
        export_slimpajama(tmp_path / 'out', dataset='json', data_files=str(tmp_path / 'missing' / '*.jsonl'), **kwargs)


def test_existing_domain_is_kept_unless_overwrite(slimpajama_dir, tmp_path):
    files, rows = slimpajama_dir
    out = tmp_path / 'out'
    export_slimpajama(out, dataset='json', data_files=files, domains=['arxiv'], max_documents=1)
    with pytest.raises(CorpusExportError, match=r"already holds domains \['arxiv'\].*--overwrite"):
        export_slimpajama(out, dataset='json', data_files=files, domains=['arxiv'], max_documents=2)
    export_slimpajama(out, dataset='json', data_files=files, domains=['arxiv'], max_documents=2, overwrite=True)
    assert _exported_texts(out, 'arxiv') == _first(rows, 'RedPajamaArXiv', 2)


def test_culturax_exports_one_domain_per_language(tmp_path):
    rows = {lang: [{'text': _text(lang, i), 'timestamp': '2023', 'url': f'https://{lang}/{i}', 'source': 'mc4'}
                   for i in range(5)] for lang in ('en', 'ru', 'th')}
    for lang, lang_rows in rows.items():
        _write_jsonl(tmp_path / 'CulturaX-mini' / lang / f'{lang}_part_00000.jsonl', lang_rows)
    out = tmp_path / 'out'
    manifest = export_culturax(out, languages=['en', 'ru', 'th'], dataset='json',
                               data_files=str(tmp_path / 'CulturaX-mini' / '{language}' / '*.jsonl'),
                               max_documents={'en': 3, 'ru': 2, 'th': 9})
    assert _exported_texts(out, 'en') == [r['text'] for r in rows['en'][:3]]
    assert _exported_texts(out, 'ru') == [r['text'] for r in rows['ru'][:2]]
    assert _exported_texts(out, 'th') == [r['text'] for r in rows['th']]
    assert sorted(manifest['domains']) == ['en', 'ru', 'th']
    assert manifest['domains']['th']['reached_cap'] is False
    with pytest.raises(CorpusExportError, match=r'must contain \{language\}'):
        export_culturax(tmp_path / 'out2', languages=['en'], dataset='json', data_files=str(tmp_path / '*.jsonl'),
                        max_documents=1)


def test_cli_takes_a_default_cap_and_per_domain_caps(slimpajama_dir, tmp_path, capsys):
    files, rows = slimpajama_dir
    out = tmp_path / 'out'
    code = main(['slimpajama', '--out', str(out), '--dataset', 'json', '--data-files', files,
                 '--domains', 'cc', 'book', '--max-documents', '2', 'cc=4'])
    assert code == 0
    assert _exported_texts(out, 'cc') == _first(rows, 'RedPajamaCommonCrawl', 4)
    assert _exported_texts(out, 'book') == _first(rows, 'RedPajamaBook', 2)
    assert main(['slimpajama', '--out', str(out), '--dataset', 'json', '--data-files', files,
                 '--max-documents', 'cc=x']) == 2
    assert "--max-documents 'cc=x'" in capsys.readouterr().err
