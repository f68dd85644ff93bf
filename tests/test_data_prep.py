"""data_prep: per-domain MDS splits, determinism, atomic output, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_trimmed_corpus

from data_prep import build_domain_mds as prep
from data_prep.build_domain_mds import DataPrepError, PrepSettings, build_domain_mds

DOMAINS = ['wiki', 'github', 'cc']
SETTINGS = PrepSettings(max_seq_len=64, seed=3, max_train_samples=30, max_eval_samples=4)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob('*')):
        if path.is_file() and path.name != 'manifest.json':
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def small_corpus(tmp_path, sample_dir) -> Path:
    """Three domains of the shared sample, trimmed so tests stay fast."""
    corpus = write_trimmed_corpus(sample_dir, tmp_path / 'corpus', DOMAINS, documents=6, characters=1500)
    return corpus


def _read_split(folder: Path) -> np.ndarray:
    from streaming import StreamingDataset

    from drp_foundry.data.shm_lock import node_shm_lock

    with node_shm_lock():  # as our loaders build theirs: no collision with a job starting beside this one
        ds = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    return np.stack([ds[i]['tokens'] for i in range(len(ds))])


def test_builds_train_and_eval_splits_readable_as_tokens(small_corpus, tmp_path, tiny_tokenizer_dir):
    out = tmp_path / 'mds'
    manifest = build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    assert list(manifest['domains']) == sorted(DOMAINS)
    for d in DOMAINS:
        train, held_out = _read_split(out / d / 'train'), _read_split(out / d / 'eval')
        assert train.shape == (manifest['domains'][d]['train_samples'], 64)
        assert held_out.shape == (manifest['domains'][d]['eval_samples'], 64)
        assert train.dtype == np.int32 and train.max() < 512
        # documents are separated by EOS in the concatenated stream
        eos = manifest['eos_token_id']
        assert (np.concatenate([train.ravel(), held_out.ravel()]) == eos).any()
    assert json.loads((out / 'manifest.json').read_text())['fingerprint'] == manifest['fingerprint']


def test_deterministic_and_idempotent(small_corpus, tmp_path, tiny_tokenizer_dir):
    a, b = tmp_path / 'a', tmp_path / 'b'
    build_domain_mds(small_corpus, a, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    build_domain_mds(small_corpus, b, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    assert _digest(a) == _digest(b)
    before = (a / 'wiki' / 'train' / 'index.json').stat().st_mtime_ns
    build_domain_mds(small_corpus, a, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)  # no-op
    assert (a / 'wiki' / 'train' / 'index.json').stat().st_mtime_ns == before
    other_seed = PrepSettings(**{**SETTINGS.__dict__, 'seed': 4})
    with pytest.raises(DataPrepError, match='--overwrite'):
        build_domain_mds(small_corpus, a, tokenizer=str(tiny_tokenizer_dir), settings=other_seed)
    build_domain_mds(small_corpus, a, tokenizer=str(tiny_tokenizer_dir), settings=other_seed, overwrite=True)
    assert _digest(a) != _digest(b)


def test_interrupted_run_leaves_no_complete_looking_output(small_corpus, tmp_path, tiny_tokenizer_dir, monkeypatch):
    out = tmp_path / 'mds'
    real_write = prep.write_mds_split
    calls = []

    def failing_write(samples, out_dir):
        calls.append(out_dir)
        if len(calls) == 3:  # dies in the middle of the second domain
            raise KeyboardInterrupt
        real_write(samples, out_dir)

    monkeypatch.setattr(prep, 'write_mds_split', failing_write)
    with pytest.raises(KeyboardInterrupt):
        build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    assert not (out / 'manifest.json').exists()
    assert not (out / 'github' / 'train').exists()  # the split being written never appeared
    monkeypatch.setattr(prep, 'write_mds_split', real_write)
    build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    assert (out / 'manifest.json').exists() and (out / 'github' / 'eval' / 'index.json').exists()


def test_mds_write_is_atomic(tmp_path, monkeypatch):
    import streaming

    class Boom(RuntimeError):
        pass

    class DyingWriter(streaming.MDSWriter):
        def write(self, sample):
            raise Boom

    monkeypatch.setattr(streaming, 'MDSWriter', DyingWriter)
    with pytest.raises(Boom):
        prep.write_mds_split(np.zeros((3, 8), dtype=np.int32), tmp_path / 'train')
    assert not (tmp_path / 'train').exists()


def test_missing_domain_names_the_path(small_corpus, tmp_path, tiny_tokenizer_dir):
    with pytest.raises(DataPrepError, match=r"\['math'\] not found in .*corpus.*domains present"):
        build_domain_mds(small_corpus, tmp_path / 'o', domains=['wiki', 'math'], tokenizer=str(tiny_tokenizer_dir))


def test_empty_jsonl_names_the_file(small_corpus, tmp_path, tiny_tokenizer_dir):
    (small_corpus / 'wiki.jsonl').write_text('')
    with pytest.raises(DataPrepError, match=r'wiki\.jsonl: no documents'):
        build_domain_mds(small_corpus, tmp_path / 'o', tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)


def test_line_without_text_names_file_and_line(small_corpus, tmp_path, tiny_tokenizer_dir):
    with open(small_corpus / 'cc.jsonl', 'a') as f:
        f.write(json.dumps({'content': 'oops'}) + '\n')
    with pytest.raises(DataPrepError, match=r'cc\.jsonl:7: JSON object without a "text" field'):
        build_domain_mds(small_corpus, tmp_path / 'o', tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)


def test_cli_reports_errors_without_traceback(small_corpus, tmp_path, capsys):
    from drp_foundry.commands.data_prep import prepare_data_main as main

    code = main(['--corpus', str(small_corpus), '--out', str(tmp_path / 'o'), '--tokenizer',
                 str(tmp_path / 'nope')])
    assert code == 2
    assert '--tokenizer' in capsys.readouterr().err


def test_trains_its_own_tokenizer(small_corpus, tmp_path):
    out = tmp_path / 'mds'
    manifest = build_domain_mds(small_corpus, out, train_tokenizer_vocab=400, settings=SETTINGS)
    assert manifest['vocab_size'] == 400 and (out / 'tokenizer' / 'tokenizer.json').exists()


def _compress(path: Path, kind: str) -> Path:
    import gzip

    import zstandard

    data = path.read_bytes()
    target = path.with_name(path.name + '.' + kind)
    if kind == 'gz':
        target.write_bytes(gzip.compress(data))
    else:  # two zstd frames: a streaming reader must read across them
        half = len(data) // 2
        c = zstandard.ZstdCompressor()
        target.write_bytes(c.compress(data[:half]) + c.compress(data[half:]))
    path.unlink()
    return target


def test_compressed_inputs_give_the_same_data(small_corpus, tmp_path, tiny_tokenizer_dir):
    plain = tmp_path / 'plain'
    build_domain_mds(small_corpus, plain, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    _compress(small_corpus / 'wiki.jsonl', 'gz')
    (small_corpus / 'cc').mkdir()
    _compress((small_corpus / 'cc.jsonl').rename(small_corpus / 'cc' / 'part-0.jsonl'), 'zst')
    packed = tmp_path / 'packed'
    manifest = build_domain_mds(small_corpus, packed, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    assert sorted(manifest['domains']) == sorted(DOMAINS)
    for d in DOMAINS:
        for split in ('train', 'eval'):
            np.testing.assert_array_equal(_read_split(plain / d / split), _read_split(packed / d / split))


@pytest.mark.parametrize('name', ['wiki.jsonl.bz2', 'wiki.jsonl.xz', 'wiki.parquet', 'wiki.json.gz', 'wiki.zip'])
def test_unreadable_formats_are_refused_by_name(small_corpus, tmp_path, tiny_tokenizer_dir, name):
    (small_corpus / 'wiki.jsonl').rename(small_corpus / name)
    with pytest.raises(DataPrepError, match=rf'{name.replace(".", chr(92) + ".")}: cannot read this file type'):
        build_domain_mds(small_corpus, tmp_path / 'o', tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)


def test_unreadable_format_inside_a_domain_folder_is_refused(small_corpus, tmp_path, tiny_tokenizer_dir):
    (small_corpus / 'cc').mkdir()
    (small_corpus / 'cc.jsonl').rename(small_corpus / 'cc' / 'a.jsonl')
    (small_corpus / 'cc' / 'b.jsonl.bz2').write_bytes(b'BZh9')
    with pytest.raises(DataPrepError, match=r'cc/b\.jsonl\.bz2: cannot read this file type'):
        build_domain_mds(small_corpus, tmp_path / 'o', tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)


def test_domain_given_as_file_and_folder_is_refused(small_corpus, tmp_path, tiny_tokenizer_dir):
    (small_corpus / 'wiki').mkdir()
    (small_corpus / 'wiki' / 'more.jsonl').write_text(json.dumps({'text': 'extra document'}) + '\n')
    with pytest.raises(DataPrepError, match=r"domain 'wiki' is given twice: ") as err:
        build_domain_mds(small_corpus, tmp_path / 'o', tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    assert str(small_corpus / 'wiki.jsonl') in str(err.value) and str(small_corpus / 'wiki') + '/' in str(err.value)
    # only the asked-for domains are checked
    build_domain_mds(small_corpus, tmp_path / 'o', domains=['cc', 'github'], tokenizer=str(tiny_tokenizer_dir),
                     settings=SETTINGS)


def test_domain_given_as_two_files_is_refused(small_corpus, tmp_path, tiny_tokenizer_dir):
    import shutil

    shutil.copy(small_corpus / 'wiki.jsonl', tmp_path / 'w.jsonl')
    _compress(tmp_path / 'w.jsonl', 'gz').rename(small_corpus / 'wiki.jsonl.gz')
    with pytest.raises(DataPrepError, match=r"domain 'wiki' is given twice: .*wiki\.jsonl and .*wiki\.jsonl\.gz"):
        build_domain_mds(small_corpus, tmp_path / 'o', tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)


@pytest.mark.parametrize('payload', [b'{"text": "caf\xe9"}\n', b'\x00\x01\x02\xff\xfe binary'])
def test_non_utf8_or_binary_file_names_the_file(small_corpus, tmp_path, tiny_tokenizer_dir, payload):
    (small_corpus / 'github.jsonl').write_bytes(payload)
    with pytest.raises(DataPrepError, match=r'github\.jsonl:1: not UTF-8 text'):
        build_domain_mds(small_corpus, tmp_path / 'o', tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)


@pytest.mark.parametrize('kind', ['gz', 'zst'])
def test_corrupt_compressed_file_names_the_file(small_corpus, tmp_path, tiny_tokenizer_dir, kind):
    packed = _compress(small_corpus / 'cc.jsonl', kind)
    packed.write_bytes(packed.read_bytes()[:40])  # truncated download
    with pytest.raises(DataPrepError, match=rf'cc\.jsonl\.{kind}: cannot be read'):
        build_domain_mds(small_corpus, tmp_path / 'o', tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)


def test_too_small_domain_is_named(small_corpus, tmp_path, tiny_tokenizer_dir):
    (small_corpus / 'github.jsonl').write_text(json.dumps({'text': 'a tiny document'}) + '\n')
    with pytest.raises(DataPrepError, match=r"domain 'github': only 0 samples"):
        build_domain_mds(small_corpus, tmp_path / 'o', tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)


def test_metadata_beside_the_domains_is_ignored(small_corpus, tmp_path, tiny_tokenizer_dir):
    (small_corpus / 'hf_export.json').write_text('{}')
    (small_corpus / 'NOTES.md').write_text('where the data came from')
    manifest = build_domain_mds(small_corpus, tmp_path / 'o', tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    assert sorted(manifest['domains']) == sorted(DOMAINS)


def test_added_documents_are_not_served_stale(small_corpus, tmp_path, tiny_tokenizer_dir):
    out = tmp_path / 'mds'
    first = build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    assert first['sources']['wiki'][0]['file'] == 'wiki.jsonl' and len(first['sources']['wiki'][0]['sha256']) == 64
    with open(small_corpus / 'wiki.jsonl', 'a') as f:
        f.write(json.dumps({'text': 'a new document ' * 40}) + '\n')
    with pytest.raises(DataPrepError, match=r'built from other inputs \(wiki\.jsonl changed \(\d+ -> \d+ bytes\)\)'):
        build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    second = build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS, overwrite=True)
    assert second['domains']['wiki']['documents'] == first['domains']['wiki']['documents'] + 1
    assert second['fingerprint'] != first['fingerprint']


def test_another_tokenizer_is_a_change(small_corpus, tmp_path, tiny_tokenizer_dir):
    import shutil

    out = tmp_path / 'mds'
    build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    other = tmp_path / 'tok2'
    shutil.copytree(tiny_tokenizer_dir, other)
    # same folder content elsewhere: only the path setting differs
    with pytest.raises(DataPrepError, match=r'setting tokenizer'):
        build_domain_mds(small_corpus, out, tokenizer=str(other), settings=SETTINGS)
    spec = json.loads((other / 'tokenizer.json').read_text())
    spec['added_tokens'].append({**spec['added_tokens'][-1], 'id': 999, 'content': '<|extra|>'})
    (other / 'tokenizer.json').write_text(json.dumps(spec))
    with pytest.raises(DataPrepError, match=r'the tokenizer files differ'):
        build_domain_mds(small_corpus, out, tokenizer=str(other), settings=SETTINGS)


def test_partial_overwrite_that_would_mix_or_drop_domains_is_refused(small_corpus, tmp_path, tiny_tokenizer_dir):
    out = tmp_path / 'mds'
    build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    before = _digest(out)
    with pytest.raises(DataPrepError, match=r"lacks its domains \['cc', 'github'\]"):
        build_domain_mds(small_corpus, out, domains=['wiki'], train_tokenizer_vocab=400, settings=SETTINGS,
                         overwrite=True)
    assert _digest(out) == before


def test_killed_overwrite_keeps_the_old_data_root_whole(small_corpus, tmp_path, tiny_tokenizer_dir, monkeypatch):
    out = tmp_path / 'mds'
    old_manifest = build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    before = _digest(out)
    real_write, calls = prep.write_mds_split, []

    def dying_write(samples, out_dir):
        calls.append(out_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the second domain of the rebuild
        real_write(samples, out_dir)

    monkeypatch.setattr(prep, 'write_mds_split', dying_write)
    new_settings = PrepSettings(**{**SETTINGS.__dict__, 'seed': 9})
    with pytest.raises(KeyboardInterrupt):
        build_domain_mds(small_corpus, out, train_tokenizer_vocab=400, settings=new_settings, overwrite=True)
    assert _digest(out) == before  # untouched: the rebuild happened in the staging folder
    assert json.loads((out / 'manifest.json').read_text()) == old_manifest
    monkeypatch.setattr(prep, 'write_mds_split', real_write)
    build_domain_mds(small_corpus, out, train_tokenizer_vocab=400, settings=new_settings, overwrite=True)
    assert json.loads((out / 'manifest.json').read_text())['tokenizer'] == 'trained:400'
    assert not prep.staging_dir(out).exists()


def test_a_kill_between_the_two_renames_is_finished_by_the_next_run(small_corpus, tmp_path, tiny_tokenizer_dir):
    out = tmp_path / 'mds'
    build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    digest = _digest(out)
    out.rename(prep.staging_dir(out))  # as if killed after `OUT -> .old` and before `staging -> OUT`
    build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)  # up to date
    assert _digest(out) == digest and not prep.staging_dir(out).exists()


@pytest.mark.parametrize('overwrite', [False, True])
def test_a_folder_data_prep_did_not_write_is_never_deleted(small_corpus, tmp_path, tiny_tokenizer_dir, overwrite):
    out = tmp_path / 'mds'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    with pytest.raises(DataPrepError, match=r'has no manifest\.json, so it is not a data_prep output'):
        build_domain_mds(small_corpus, out, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS, overwrite=overwrite)
    assert (out / 'notes.txt').read_text() == 'mine'
    data = tmp_path / 'data'
    build_domain_mds(small_corpus, data, tokenizer=str(tiny_tokenizer_dir), settings=SETTINGS)
    (data / 'runs').mkdir()
    with pytest.raises(DataPrepError, match=r"holds \['runs'\], which data_prep did not write"):
        build_domain_mds(small_corpus, data, tokenizer=str(tiny_tokenizer_dir),
                         settings=PrepSettings(**{**SETTINGS.__dict__, 'seed': 4}), overwrite=True)
    assert (data / 'runs').is_dir()
