"""``drp-prune-oneshot MODEL OUT --target ... --calibration DATA``: prune without training (ours).

The baseline that learned masks are compared against, and a fast start for continued
pretraining: score layers / KV groups / FFN units / hidden channels by activations on a few
calibration sequences (``drp_foundry.pruning.importance``, Minitron-style; layers by block
importance), keep the target top-k of each (per layer for KV groups and FFN units) and export
with the same fold-and-slice as a pruning run (``drp_foundry.pruning.export``), masks at 1.

``--calibration`` is either a ``data_prep`` output folder (``<root>/<domain>/<split>/`` MDS with a
``tokens`` column; ``--split``, default ``train``) or text: one ``.jsonl`` file or a folder of
``<domain>.jsonl`` files with a ``text`` field, tokenised with the model's tokenizer and cut into
``--seq-len`` chunks. Sequences are taken round-robin over domains. The output folder gets the HF
model, the tokenizer and ``pruning_report.json``, written atomically (as ``drp-export``).

    drp-prune-oneshot models/smollm2-135m runs/oneshot-50m \\
        --target layers=20,hidden=384,heads=6,kv_heads=2,intermediate=1024 --calibration data/demo-smollm2
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from drp_foundry.data.token_rows import mds_token_rows
from drp_foundry.fileio import JSONLError, atomic_folder, read_jsonl, text_field
from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.expected_size import GRANULARITIES, pruned_granularities, target_keep_counts
from drp_foundry.pruning.export import PruningReport, fold_and_slice
from drp_foundry.pruning.importance import activation_importance, importance_masks
from drp_foundry.pruning.layouts import get_layout

__all__ = ['OneShotError', 'parse_target', 'calibration_sequences', 'oneshot_prune', 'prune_directory']

REPORT_FILENAME = 'pruning_report.json'


class OneShotError(ValueError):
    """Bad input: the message names the argument and the fix."""


def parse_target(text: str) -> TargetArchitecture:
    """``layers=20,hidden=384,heads=6,kv_heads=2,intermediate=1024`` (or the same as a JSON object)."""
    text = text.strip()
    try:
        values: dict[str, Any] = json.loads(text) if text.startswith('{') else {
            key.strip(): int(value) for key, value in (item.split('=', 1) for item in text.split(',') if item.strip())}
    except ValueError as error:
        raise OneShotError(f'--target {text!r}: write it as layers=N,hidden=N,heads=N,kv_heads=N,intermediate=N '
                           f'({error})') from error
    try:
        return TargetArchitecture.from_config(values, key_prefix='--target')
    except ValueError as error:
        raise OneShotError(str(error)) from error


def _text_sequences(files: list[Path], tokenizer, seq_len: int, per_domain: int) -> dict[str, list[torch.Tensor]]:
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
            raise OneShotError(f'--calibration {err}') from None
        out[path.stem] = rows
    return out


def calibration_sequences(data: str | Path, num_sequences: int, seq_len: int, tokenizer=None,
                          split: str = 'train') -> list[torch.Tensor]:
    """``num_sequences`` token rows of length ``seq_len`` (or shorter MDS rows), round-robin over domains."""
    data = Path(data)
    if not data.exists():
        raise OneShotError(f'--calibration {data} does not exist; pass a data_prep output folder or .jsonl text')
    if data.is_dir() and any((path / split / 'index.json').is_file() for path in data.iterdir()):
        try:
            per_domain = mds_token_rows(data, split, seq_len)
        except ValueError as err:
            raise OneShotError(f'--calibration {err}') from None
    else:
        files = [data] if data.is_file() else sorted(data.glob('*.jsonl'))
        if not files:
            raise OneShotError(f'--calibration {data}: no <domain>/{split}/ MDS folders and no .jsonl files there')
        if tokenizer is None:
            raise OneShotError('text calibration data needs the model tokenizer')
        per_domain = _text_sequences(files, tokenizer, seq_len, num_sequences)
    domains = [rows for rows in per_domain.values() if rows]
    if not domains:
        raise OneShotError(f'--calibration {data}: no sequence of tokens found')
    picked: list[torch.Tensor] = []
    position = 0
    while len(picked) < num_sequences and any(position < len(rows) for rows in domains):
        for rows in domains:
            if position < len(rows) and len(picked) < num_sequences:
                picked.append(rows[position])
        position += 1
    return picked


def _batches(sequences: list[torch.Tensor], batch_size: int, device: torch.device) -> Iterable[dict[str, torch.Tensor]]:
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(row.numel() for row in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, row in enumerate(chunk):  # right padding, left out of the scores
            input_ids[i, :row.numel()] = row
            attention_mask[i, :row.numel()] = 1
        yield {'input_ids': input_ids.to(device), 'attention_mask': attention_mask.to(device)}


def keep_counts(source: DecoderArchitecture, target: TargetArchitecture) -> dict[str, Any]:
    return target_keep_counts(source, target)


def oneshot_prune(hf_model, target: TargetArchitecture | Mapping[str, int], sequences: list[torch.Tensor],
                  batch_size: int = 8) -> tuple[Any, PruningReport, dict[str, torch.Tensor]]:
    """(pruned HF model, report, importance scores): the importance top-k at ``target``, sliced."""
    source = DecoderArchitecture.from_hf_config(hf_model.config)
    if isinstance(target, Mapping):
        target = TargetArchitecture.from_config(target)
    target = target.resolve(source)
    layout = get_layout(source.model_type)
    layout.check_granularities(GRANULARITIES, pruned_granularities(source, target))
    if layout.check_target is not None:
        layout.check_target(hf_model.config, source, target)
    device = next(hf_model.parameters()).device
    scores = activation_importance(hf_model, _batches(sequences, batch_size, device))
    masks = importance_masks(scores, keep_counts(source, target))
    pruned, report = fold_and_slice(hf_model, masks)
    expected = source.pruned(target).count_parameters()
    if report.params_after != expected:
        raise RuntimeError(f'one-shot model has {report.params_after} parameters, the target {expected}; a bug')
    return pruned, report, scores


def prune_directory(model_dir: str | Path, out_dir: str | Path, target: TargetArchitecture, calibration: str | Path,
                    num_sequences: int = 64, seq_len: int = 128, batch_size: int = 8, split: str = 'train',
                    overwrite: bool = False) -> PruningReport:
    """The CLI's work: load, score, slice, write ``out_dir`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drp_foundry.export import ExportError, check_output_dir
    from drp_foundry.hf_tied_weights import store_tied_output_embedding
    from drp_foundry.model_card import card_facts, write_model_card

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / 'config.json').is_file():
        raise OneShotError(f'MODEL {model_dir} is not a Hugging Face model directory (no config.json)')
    try:
        check_output_dir(out_dir, overwrite, inputs=(model_dir, Path(calibration)))
    except ExportError as error:
        raise OneShotError(str(error)) from error
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    from transformers import AutoConfig

    from drp_foundry.identity_checks import IdentityError, check_data_root_fits

    try:  # a data_prep root tokenised with another tokenizer would score the model on foreign ids
        check_data_root_fits(Path(calibration), tokenizer, AutoConfig.from_pretrained(str(model_dir)),
                             '--calibration', 'MODEL')
    except IdentityError as error:
        raise OneShotError(str(error)) from error
    hf_model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    try:
        source = DecoderArchitecture.from_hf_config(hf_model.config)
        target = target.resolve(source, key_prefix='--target')
    except ValueError as error:
        raise OneShotError(str(error)) from error
    sequences = calibration_sequences(calibration, num_sequences, seq_len, tokenizer, split)
    pruned, report, _ = oneshot_prune(hf_model, target, sequences, batch_size)
    with atomic_folder(out_dir) as staging:
        pruned.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {'method': 'one-shot activation importance (drp-prune-oneshot)', 'source': str(model_dir),
                  'calibration': str(calibration), 'calibration_sequences': len(sequences),
                  'calibration_tokens': int(sum(row.numel() for row in sequences)), 'target': target.to_dict(),
                  **report.to_dict()}
        (staging / REPORT_FILENAME).write_text(json.dumps(record, indent=2))
        store_tied_output_embedding(staging)  # a tied lm_head loads through Foundry without a false warning
        write_model_card(staging, card_facts({}, 'none (one-shot pruning: no training run)', record,
                                             record['target'], list(GRANULARITIES), 'float32', source=str(model_dir)),
                         name=out_dir.name)
        from drp_foundry.output_files import record_written_files

        record_written_files(staging, REPORT_FILENAME)  # what --overwrite may replace later
    return report
