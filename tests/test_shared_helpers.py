"""The small shared helpers: atomic folder/file writes and JSON lines (drp_foundry/fileio.py), unwrapping the HF
model (composer/hf_model.py) and the run length in batches (composer/run_length.py)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from drp_foundry import fileio
from drp_foundry.fileio import (
    JSONLError,
    atomic_file,
    atomic_folder,
    atomic_write_text,
    read_jsonl,
    replace_folder,
    text_field,
)


def _folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def test_atomic_folder_replaces_the_whole_folder_on_success(tmp_path):
    out = _folder(tmp_path / 'out', {'old.txt': 'old', 'keep-not.txt': 'x'})
    with atomic_folder(out) as staging:
        assert staging.parent == tmp_path and staging.is_dir() and not any(staging.iterdir())
        (staging / 'new.txt').write_text('new')
        assert _contents(out) == {'keep-not.txt': 'x', 'old.txt': 'old'}  # untouched until the end
    assert _contents(out) == {'new.txt': 'new'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # no staging or old copy left


def test_atomic_folder_failure_midway_leaves_the_old_folder_and_no_staging(tmp_path):
    out = _folder(tmp_path / 'out', {'old.txt': 'old'})
    with pytest.raises(RuntimeError, match='midway'):
        with atomic_folder(out) as staging:
            (staging / 'half.txt').write_text('half')
            raise RuntimeError('failed midway')
    assert _contents(out) == {'old.txt': 'old'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
    # a first write (no old folder) that fails leaves nothing at all
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / 'fresh'):
            raise RuntimeError('no')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_atomic_folder_removes_the_staging_folder_of_a_killed_writer(tmp_path):
    stale = _folder(tmp_path / '.out.tmp-killed', {'partial': 'x'})
    other = _folder(tmp_path / '.other.tmp-1', {'partial': 'x'})  # another folder's staging is not ours
    with atomic_folder(tmp_path / 'out') as staging:
        (staging / 'a').write_text('a')
    assert not stale.exists() and other.exists() and _contents(tmp_path / 'out') == {'a': 'a'}


def test_replace_folder_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    out = _folder(tmp_path / 'out', {'old.txt': 'old'})
    new = _folder(tmp_path / 'new', {'new.txt': 'new'})
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == new:
            raise OSError('disk full')
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, 'replace', failing_replace)
    with pytest.raises(OSError, match='disk full'):
        replace_folder(new, out)
    assert _contents(out) == {'old.txt': 'old'} and _contents(new) == {'new.txt': 'new'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['new', 'out']


def test_atomic_file_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / 'report.json'
    atomic_write_text(path, 'first')
    with pytest.raises(ValueError):
        with atomic_file(path) as tmp:
            tmp.write_text('half')
            raise ValueError('stop')
    assert path.read_text() == 'first' and sorted(p.name for p in tmp_path.iterdir()) == ['report.json']
    atomic_write_text(path, 'second')
    assert path.read_text() == 'second' and sorted(p.name for p in tmp_path.iterdir()) == ['report.json']


def test_read_jsonl_numbers_lines_and_names_file_and_line_of_a_bad_one(tmp_path):
    path = tmp_path / 'wiki.jsonl'
    path.write_text('{"text": "a"}\n\n{"text": "b", "n": 2}\n')
    assert list(read_jsonl(path)) == [(1, {'text': 'a'}), (3, {'text': 'b', 'n': 2})]
    path.write_text('{"text": "a"}\n\n{oops\n')
    with pytest.raises(JSONLError, match=r'wiki\.jsonl:3: not valid JSON'):
        list(read_jsonl(path))
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(JSONLError, match=r'wiki\.jsonl:2: expected a JSON object, got list'):
        list(read_jsonl(path))
    with pytest.raises(JSONLError, match=r'wiki\.jsonl:4: JSON object without a "text" field'):
        text_field({'content': 'x'}, path, 4)
    with pytest.raises(JSONLError, match=r'wiki\.jsonl:5: "text" must be a string, got int'):
        text_field({'text': 3}, path, 5)
    assert text_field({'text': 'ok'}, path, 1) == 'ok'


def test_unwrap_hf_model_through_composer_and_ddp_wrappers(llama_config, tiny_tokenizer):
    from composer.models import HuggingFaceModel
    from transformers import LlamaForCausalLM

    from drp_foundry.composer.hf_model import unwrap_hf_model, unwrap_hf_model_and_tokenizer

    hf = LlamaForCausalLM(llama_config)
    assert unwrap_hf_model(hf) is hf  # not its decoder stack hf.model
    wrapped = HuggingFaceModel(hf, tokenizer=tiny_tokenizer)
    assert unwrap_hf_model(wrapped) is hf
    ddp = SimpleNamespace(module=wrapped)  # DistributedDataParallel keeps the wrapped model in .module
    assert unwrap_hf_model_and_tokenizer(ddp) == (hf, tiny_tokenizer)
    assert unwrap_hf_model_and_tokenizer(SimpleNamespace(module=hf)) == (hf, None)
    plain = torch.nn.Linear(2, 2)
    assert unwrap_hf_model(plain) is plain


def test_max_duration_in_batches():
    from composer.core import Time

    from drp_foundry.composer.run_length import max_duration_in_batches

    def state(duration, dataloader_len=None):
        return SimpleNamespace(max_duration=None if duration is None else Time.from_timestring(duration),
                               dataloader_len=dataloader_len)

    assert max_duration_in_batches(state('3200ba'), 'x') == 3200
    assert max_duration_in_batches(state('2ep', dataloader_len=50), 'x') == 100
    with pytest.raises(ValueError, match=r'^drp_lagrangian needs `max_duration`.* or set warmup'):
        max_duration_in_batches(state(None), 'drp_lagrangian', alternative=' or set warmup')
    with pytest.raises(ValueError, match=r'^drp_dynamic_loading counts in batches .*1000tok'):
        max_duration_in_batches(state('1000tok'), 'drp_dynamic_loading')
    with pytest.raises(ValueError, match='cannot turn'):
        max_duration_in_batches(state('1ep'), 'x')  # an endless stream has no epoch length
