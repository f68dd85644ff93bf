"""Token rows for calibration and quick evals: read directly from a data_prep root's MDS folders (no streaming
dataset, no mixture, the first rows of each domain in order) or tokenised from ``.jsonl`` text; used by one-shot
calibration, export's fidelity eval and the loop-rate prefixes."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from drp_foundry.fileio import JSONLError, read_jsonl, text_field


class CalibrationDataError(ValueError):
    """The data cannot give token rows; the message names the argument and the fix."""


def mds_token_rows(root: Path, split: str, seq_len: int, limit: int = 4096) -> dict[str, list[torch.Tensor]]:
    """``{domain: [token row, ...]}`` from ``ROOT/<domain>/<split>/`` MDS folders: at most ``limit`` rows per
    domain, each cut to ``seq_len`` tokens."""
    from streaming import LocalDataset

    out = {}
    for folder in sorted(path for path in root.iterdir() if (path / split / 'index.json').is_file()):
        dataset = LocalDataset(str(folder), split=split)
        rows = []
        for index in range(len(dataset)):
            sample = dataset[index]
            if 'tokens' not in sample:
                raise ValueError(f'{folder / split}: MDS samples have no tokens column ({sorted(sample)}); '
                                 'pass a data_prep output folder')
            rows.append(torch.as_tensor(sample['tokens'][:seq_len].astype('int64')))
            if len(rows) >= limit:
                break
        out[folder.name] = rows
    return out


def _text_sequences(files: list[Path], tokenizer, seq_len: int, per_domain: int, key: str) -> dict[str, list[torch.Tensor]]:
    out = {}
    for path in files:
        rows: list[torch.Tensor] = []
        buffer: list[int] = []
        try:
            for number, record in read_jsonl(path):
                buffer.extend(tokenizer(text_field(record, path, number))['input_ids']
                              + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
                while len(buffer) >= seq_len and len(rows) < per_domain:
                    rows.append(torch.tensor(buffer[:seq_len]))
                    buffer = buffer[seq_len:]
                if len(rows) >= per_domain:
                    break
        except JSONLError as err:
            raise CalibrationDataError(f'{key} {err}') from None
        out[path.stem] = rows
    return out


def calibration_sequences(data: str | Path, num_sequences: int, seq_len: int, tokenizer=None,
                          split: str = 'train', key: str = '--calibration') -> list[torch.Tensor]:
    """``num_sequences`` token rows of length ``seq_len`` (or shorter MDS rows), round-robin over domains, from a
    data_prep root (its ``split``) or ``.jsonl`` text; ``key`` names the argument in errors."""
    data = Path(data)
    if not data.exists():
        raise CalibrationDataError(f'{key} {data} does not exist; pass a data_prep output folder or .jsonl text')
    if data.is_dir() and any((path / split / 'index.json').is_file() for path in data.iterdir()):
        try:
            per_domain = mds_token_rows(data, split, seq_len)
        except ValueError as err:
            raise CalibrationDataError(f'{key} {err}') from None
    else:
        files = [data] if data.is_file() else sorted(data.glob('*.jsonl'))
        if not files:
            raise CalibrationDataError(f'{key} {data}: no <domain>/{split}/ MDS folders and no .jsonl files there')
        if tokenizer is None:
            raise CalibrationDataError(f'{key}: text data needs the model tokenizer')
        per_domain = _text_sequences(files, tokenizer, seq_len, num_sequences, key)
    domains = [rows for rows in per_domain.values() if rows]
    if not domains:
        raise CalibrationDataError(f'{key} {data}: no sequence of tokens found')
    picked: list[torch.Tensor] = []
    position = 0
    while len(picked) < num_sequences and any(position < len(rows) for rows in domains):
        for rows in domains:
            if position < len(rows) and len(picked) < num_sequences:
                picked.append(rows[position])
        position += 1
    return picked


def token_batches(sequences: list[torch.Tensor], batch_size: int, device: torch.device
                  ) -> Iterable[dict[str, torch.Tensor]]:
    """Right-padded batches of token rows, the padding masked out."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(row.numel() for row in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, row in enumerate(chunk):  # right padding, left out of the scores
            input_ids[i, :row.numel()] = row
            attention_mask[i, :row.numel()] = 1
        yield {'input_ids': input_ids.to(device), 'attention_mask': attention_mask.to(device)}
