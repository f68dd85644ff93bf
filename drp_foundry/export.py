"""``drp-export CHECKPOINT OUT_DIR``: a pruning checkpoint -> a dense, smaller HF model.

Reads a Composer checkpoint of a pruning run (monolithic ``.pt`` file, or the directory of a
sharded ``torch.distributed.checkpoint`` save), rebuilds the Hugging Face model from the config
Composer stored beside the weights, rebuilds the ``L0MaskModule`` from its extra state, takes
the deterministic masks at exactly the target sizes, folds them into the weights and slices
(``drp_foundry.pruning.export.fold_and_slice``). ``OUT_DIR`` receives ``config.json``, safetensors
weights, the tokenizer, ``pruning_report.json`` and a model card (``README.md``, drp_foundry/model_card.py); it loads with
``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and serves as
``pretrained_model_name_or_path`` of a stock ``hf_causal_lm`` for continued pretraining.

Export also says whether the exported model is the one the run trained (ours, issue 26;
``drp_foundry.pruning.fidelity``): the masks' expected size against the target, the expected kept
counts of the kept layers, the share of undecided mask entries and, with ``eval_batches``
(``--eval-data``), the eval loss of the masked model as trained against the exported one. The
figures go into ``pruning_report.json`` (``fidelity``) and the model card; past a tolerance a
``FidelityWarning`` says what differs.

The output is written into a temporary folder beside ``OUT_DIR`` and renamed into place at
the end, so a failed export leaves nothing half-written.

Export never deletes what it did not write: ``OUT_DIR`` must not exist, be empty, or (with
``--overwrite``) hold an earlier export (its ``pruning_report.json``) and nothing else of
value: it replaces only the files the earlier export listed in its report (``written_files``;
anything else there is refused, listed). A folder that holds the checkpoint being exported, the ``--tokenizer`` folder, or any
checkpoint (``*.pt``, sharded checkpoint folders) is refused, with or without ``--overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from drp_foundry.fileio import atomic_folder
from drp_foundry.hf_tied_weights import store_tied_output_embedding
from drp_foundry.model_card import card_facts, write_model_card
from drp_foundry.pruning.export import PruningReport, fold_and_slice
from drp_foundry.pruning.fidelity import FidelityReport, mask_fidelity, masked_lm_loss, mean_lm_loss
from drp_foundry.pruning.hf_injection import MASK_MODULE_NAME, get_mask_module, inject_masks
from drp_foundry.pruning.mask_module import L0MaskModule

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
REPORT_FILENAME = 'pruning_report.json'
COMPOSER_MODEL_PREFIX = 'model.'  # HuggingFaceModel keeps the HF model as its attribute ``model``
MASK_EXTRA_STATE_KEY = f'{MASK_MODULE_NAME}._extra_state'


log = logging.getLogger(__name__)


class ExportError(ValueError):
    """Bad input to the export: the message names the path or key and the fix."""


class FidelityWarning(UserWarning):
    """The exported model differs from the model the pruning run trained (``pruning/fidelity.py``)."""


def export_fidelity(hf_model: torch.nn.Module, pruned_model: torch.nn.Module,
                    eval_batches: Iterable[Mapping[str, torch.Tensor]] | None = None) -> FidelityReport:
    """The ``FidelityReport`` of an export: ``hf_model`` carries the trained masks, ``pruned_model`` is its
    export; with ``eval_batches`` also the two eval losses. Warns (``FidelityWarning``) past a tolerance."""
    mask_module = get_mask_module(hf_model)
    masked_loss = exported_loss = None
    if eval_batches is not None:
        batches = list(eval_batches)
        masked_loss = masked_lm_loss(hf_model, batches)
        was_training = pruned_model.training
        pruned_model.eval()
        exported_loss = mean_lm_loss(pruned_model, batches)
        pruned_model.train(was_training)
    report = mask_fidelity(mask_module, masked_loss=masked_loss, exported_loss=exported_loss)
    problems = report.warnings()
    if problems:
        message = ('the exported model is not the model the run trained: ' + '; '.join(problems) + '. A longer run, '
                   'or drp_lagrangian constraint: projection with harden_fraction, trains the model export cuts '
                   '(docs/PRUNING.md)')
        log.warning(message)
        warnings.warn(message, FidelityWarning, stacklevel=2)
    return report


def eval_batches_from(data: str | os.PathLike, tokenizer, num_sequences: int = 32, seq_len: int = 128,
                      batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Eval batches for ``export_fidelity`` from a data_prep output folder (its ``eval`` split) or ``.jsonl`` text."""
    from drp_foundry.data.token_rows import CalibrationDataError, calibration_sequences, token_batches

    try:
        sequences = calibration_sequences(data, num_sequences, seq_len, tokenizer, split='eval', key='--eval-data')
    except CalibrationDataError as error:
        raise ExportError(str(error)) from error
    return list(token_batches(sequences, batch_size, torch.device('cpu')))


CHECKPOINT_PATTERNS = ('*.pt', '*.pt.tar', '*.distcp', '.metadata')


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_dir(out_dir: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an ``out_dir`` whose replacement would delete anything this export did not write.

    ``inputs`` (the checkpoint, the tokenizer folder) must not lie inside ``out_dir``; a folder
    with any checkpoint is refused; a non-empty one only with ``overwrite`` and only when it
    is an earlier export (holds ``pruning_report.json``).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f'output path {out_dir} exists and is not a directory; choose another OUT_DIR')
    for path in inputs:
        if path is not None and _inside(path, out_dir):
            raise ExportError(f'OUT_DIR {out_dir} holds the input {path}; exporting there would delete it. Choose '
                              'a new folder, e.g. beside the run folder (with or without --overwrite)')
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    for pattern in CHECKPOINT_PATTERNS:
        found = next(iter(out_dir.rglob(pattern)), None)
        if found is not None:
            raise ExportError(f'OUT_DIR {out_dir} holds a checkpoint ({found}); export never replaces a folder with '
                              'checkpoints (a run folder?), with or without --overwrite. Choose a new folder')
    if not overwrite:
        raise ExportError(f'output directory {out_dir} exists and is not empty; pass --overwrite to replace an '
                          'earlier export, or choose another OUT_DIR')
    if not (out_dir / REPORT_FILENAME).is_file():
        raise ExportError(f'OUT_DIR {out_dir} is not an earlier export (no {REPORT_FILENAME}); --overwrite only '
                          'replaces an earlier export. Choose a new folder, or empty this one yourself')
    from drp_foundry.output_files import foreign_files

    foreign = foreign_files(out_dir, REPORT_FILENAME)
    if foreign:
        raise ExportError(f'OUT_DIR {out_dir} holds files the earlier export did not write: {foreign[:10]}'
                          f'{" and more" if len(foreign) > 10 else ""}; --overwrite replaces only what an export '
                          'wrote. Move them out first, or choose a new folder')


def load_composer_checkpoint(path: Path) -> dict[str, Any]:
    """The full Composer checkpoint dict of a monolithic file or a sharded (DCP) directory."""
    if not path.exists():
        raise ExportError(f'checkpoint {path} does not exist')
    if path.is_dir():
        if not (path / '.metadata').is_file():
            raise ExportError(f'checkpoint directory {path} holds no .metadata file, so it is not a sharded '
                              '(torch.distributed.checkpoint) save; pass the sharded checkpoint folder or a '
                              'monolithic .pt file')
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        with tempfile.TemporaryDirectory(prefix='drp-export-') as tmp:
            converted = Path(tmp) / 'checkpoint.pt'
            dcp_to_torch_save(path, converted)
            return torch.load(converted, map_location='cpu', weights_only=False)
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as error:  # torch raises several types for files it cannot read
        others = sorted(p.name for p in path.parent.glob('*.pt') if p.is_file() and p.resolve() != path.resolve())
        raise ExportError(f'could not read checkpoint {path} with torch.load ({error}); pass a monolithic Composer '
                          '.pt checkpoint or the folder of a sharded one'
                          f'{" (other checkpoints there: " + str(others) + ")" if others else ""}') from error


def _composer_parts(checkpoint: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The HF model's state dict (Composer prefix removed) and Composer's HF metadata."""
    state = checkpoint.get('state') if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get('model'), dict):
        raise ExportError(f"checkpoint {path} has no ['state']['model']; pass a checkpoint written by a Composer "
                          'Trainer')
    huggingface = (state.get('integrations') or {}).get('huggingface')
    if not isinstance(huggingface, dict) or 'config' not in huggingface.get('model', {}):
        raise ExportError(f"checkpoint {path} has no ['state']['integrations']['huggingface'] config; it was not "
                          'saved from a Composer HuggingFaceModel (LLM-Foundry hf_causal_lm)')
    model_state = {key[len(COMPOSER_MODEL_PREFIX):]: value for key, value in state['model'].items()
                   if key.startswith(COMPOSER_MODEL_PREFIX)}
    if not model_state:
        raise ExportError(f"checkpoint {path}: no key of ['state']['model'] starts with '{COMPOSER_MODEL_PREFIX}'; "
                          'expected the state dict of a Composer HuggingFaceModel')
    if MASK_EXTRA_STATE_KEY not in model_state:
        raise ExportError(f"checkpoint {path} carries no pruning masks (no key '{COMPOSER_MODEL_PREFIX}"
                          f"{MASK_EXTRA_STATE_KEY}'); export needs a checkpoint of a run with the drp mask learner, "
                          'not of the source or an already exported model')
    return model_state, huggingface


def build_masked_model(checkpoint: dict[str, Any], path: Path) -> torch.nn.Module:
    """The float32 HF model of the checkpoint with its ``L0MaskModule`` injected and every weight loaded."""
    from composer.models.huggingface import get_hf_config_from_composer_state_dict
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    model_state, _ = _composer_parts(checkpoint, path)
    config = get_hf_config_from_composer_state_dict(checkpoint)
    with no_init_weights():
        hf_model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    hf_model.tie_weights()  # no_init_weights() also skips tying; tied models must share lm_head again
    try:
        mask_module = L0MaskModule.from_extra_state(model_state[MASK_EXTRA_STATE_KEY], eval_mode='target')
        inject_masks(hf_model, mask_module)
    except ValueError as error:
        raise ExportError(f"checkpoint {path}: the masks in '{COMPOSER_MODEL_PREFIX}{MASK_EXTRA_STATE_KEY}' do not "
                          f'fit the model in its stored config ({error}); export the checkpoint the masks were '
                          'trained with') from error
    try:
        missing, unexpected = hf_model.load_state_dict(model_state, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        raise ExportError(f'checkpoint {path}: its weights do not match the {type(hf_model).__name__} of its config '
                          f"and masks ({error}); export the checkpoint unchanged, as the Trainer wrote it") from error
    missing = [key for key in missing if key != 'lm_head.weight' or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ExportError(f'checkpoint {path}: its weights do not match the {type(hf_model).__name__} of its config '
                          f'and masks (missing {missing[:5]}, unexpected {unexpected[:5]}, under '
                          f"'{COMPOSER_MODEL_PREFIX}'); the checkpoint is damaged or from another model")
    return hf_model.eval()


def _load_tokenizer(checkpoint: dict[str, Any], path: Path, tokenizer_dir: Path | None, scratch: Path):
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        if not tokenizer_dir.is_dir():
            raise ExportError(f'--tokenizer {tokenizer_dir} is not a directory; pass a HF tokenizer folder')
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    from composer.models.huggingface import HuggingFaceModel

    huggingface = checkpoint['state']['integrations']['huggingface']
    if not huggingface.get('tokenizer'):
        raise ExportError(f'checkpoint {path} stores no tokenizer; pass --tokenizer DIR (a HF tokenizer folder)')
    return HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(huggingface,
                                                                        tokenizer_save_dir=str(scratch))


def export_checkpoint(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                      tokenizer_dir: str | os.PathLike | None = None, dtype: str = 'float32',
                      source: str | None = None, eval_data: str | os.PathLike | None = None,
                      eval_sequences: int = 32, eval_seq_len: int = 128) -> PruningReport:
    """Export a pruning checkpoint to a HF model folder; returns what was kept. ``eval_data`` (a data_prep
    folder or ``.jsonl`` text): ``eval_sequences`` sequences of ``eval_seq_len`` tokens on which the masked
    and the exported model's losses are compared (module doc)."""
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f'--dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}')
    inputs = (checkpoint_path,) + (() if tokenizer_dir is None else (Path(tokenizer_dir),))
    check_output_dir(out_dir, overwrite, inputs)
    checkpoint = load_composer_checkpoint(checkpoint_path)
    from drp_foundry.checkpoint_checks import ExportInputError, check_export_inputs

    _composer_parts(checkpoint, checkpoint_path)
    try:  # finite values; --tokenizer and --source fit the checkpoint
        check_export_inputs(checkpoint, checkpoint_path, tokenizer_dir, source)
    except ExportInputError as error:
        raise ExportError(str(error)) from None
    hf_model = build_masked_model(checkpoint, checkpoint_path)
    mask_module = get_mask_module(hf_model)
    pruned_model, report = fold_and_slice(hf_model, mask_module.deterministic('target'))
    target_parameters = mask_module.target_num_parameters()
    if report.params_after != target_parameters:
        raise RuntimeError(f'exported model has {report.params_after} parameters but the target architecture '
                           f'{mask_module.target} has {target_parameters}; please report this as a bug')
    fidelity_batches = None
    if eval_data is not None:
        scratch = Path(tempfile.mkdtemp(prefix='drp-export-tokenizer-'))
        try:
            tokenizer = _load_tokenizer(checkpoint, checkpoint_path, None if tokenizer_dir is None else Path(tokenizer_dir),
                                        scratch)
            fidelity_batches = eval_batches_from(eval_data, tokenizer, eval_sequences, eval_seq_len)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    fidelity = export_fidelity(hf_model, pruned_model, fidelity_batches)
    pruned_model.to(DTYPES[dtype])
    pruned_model.config.torch_dtype = DTYPES[dtype]

    with atomic_folder(out_dir) as staging:
        tokenizer = _load_tokenizer(checkpoint, checkpoint_path, None if tokenizer_dir is None else Path(tokenizer_dir),
                                    staging / 'tokenizer-scratch')
        pruned_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(staging / 'tokenizer-scratch', ignore_errors=True)
        record = {'checkpoint': str(checkpoint_path), 'dtype': dtype, 'target': mask_module.target.to_dict(),
                  'granularities': list(mask_module.granularities), **report.to_dict(),
                  'fidelity': {**fidelity.to_dict(), 'warnings': fidelity.warnings()}}
        (staging / REPORT_FILENAME).write_text(json.dumps(record, indent=2))
        store_tied_output_embedding(staging)  # a tied lm_head loads through Foundry without a false warning
        facts = card_facts(checkpoint, checkpoint_path, record, record['target'], record['granularities'], dtype,
                           source=source)
        facts['fidelity'] = record['fidelity']
        write_model_card(staging, facts, name=out_dir.name)
        from drp_foundry.output_files import record_written_files

        record_written_files(staging, REPORT_FILENAME)  # what --overwrite may replace later
        check_output_dir(out_dir, overwrite, inputs)  # nothing appeared meanwhile
    return report
