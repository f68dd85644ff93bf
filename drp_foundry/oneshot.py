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
from typing import Any, Mapping

import torch

from drp_foundry.data.token_rows import CalibrationDataError, calibration_sequences, token_batches
from drp_foundry.fileio import atomic_folder
from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.expected_size import GRANULARITIES, pruned_granularities, target_keep_counts
from drp_foundry.pruning.export import PruningReport, fold_and_slice
from drp_foundry.pruning.importance import activation_importance
from drp_foundry.pruning.importance_masks import importance_masks
from drp_foundry.pruning.layouts import get_layout

__all__ = ['OneShotError', 'parse_target', 'oneshot_prune', 'prune_directory']

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
    scores = activation_importance(hf_model, token_batches(sequences, batch_size, device))
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
    try:
        sequences = calibration_sequences(calibration, num_sequences, seq_len, tokenizer, split)
    except CalibrationDataError as err:
        raise OneShotError(str(err)) from None
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
