"""Inputs of the per-domain eval loss of a Hugging Face model folder on per-domain MDS eval splits.

The measurement itself runs through Composer (``composer/domain_eval_losses.evaluate_domains``:
LLM-Foundry's ``hf_causal_lm``, one ``text`` eval loader per domain, ``Trainer.eval``); the
command is ``drp-domain-loss MODEL_DIR DATA_ROOT`` (``drp_foundry/commands/domain_loss.py``).
This module holds what needs no Composer: the domains of a data root and the checks of the
inputs, run before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from drp_foundry.data.manifest import ManifestError, read_manifest


def domains_in(data_root: str | Path, split: str = 'eval') -> list[str]:
    """Domains that have ``DATA_ROOT/<domain>/<split>/index.json``, sorted."""
    root = Path(data_root)
    found = sorted(p.parent.parent.name for p in root.glob(f'*/{split}/index.json'))
    if not found:
        raise FileNotFoundError(f'no <domain>/{split}/index.json under {root}; build it with data_prep')
    return found


class DomainLossError(ValueError):
    """Bad input to the per-domain eval; the message names the folder, domain or option."""


def check_inputs(model_dir: str | Path, data_root: str | Path, domains: Sequence[str] | None, split: str,
                 max_seq_len: int) -> list[str]:
    """Refuse a missing model folder, data root or domain, and a sequence length the data was not built with.

    Runs before any model is loaded; returns the domains to evaluate.
    """
    model_dir, data_root = Path(model_dir), Path(data_root)
    if not (model_dir / 'config.json').is_file():
        what = 'does not exist' if not model_dir.exists() else 'has no config.json'
        raise DomainLossError(f'MODEL_DIR {model_dir} {what}; pass a Hugging Face model folder (the output of '
                              '`drp-export`, or a save_pretrained folder). Nothing is downloaded')
    if not data_root.is_dir():
        raise DomainLossError(f'DATA_ROOT {data_root} does not exist; pass the --out folder of data_prep')
    try:
        available = domains_in(data_root, split)
    except FileNotFoundError as err:
        raise DomainLossError(str(err)) from None
    chosen = list(domains) if domains else available
    missing = [d for d in chosen if d not in available]
    if missing:
        raise DomainLossError(f'--domains {missing}: no {split} split under {data_root} (present: {available})')
    try:
        manifest = read_manifest(data_root)
    except ManifestError as err:
        raise DomainLossError(f'DATA_ROOT: {err}') from None
    if manifest is not None:
        built = manifest['settings'].get('max_seq_len')
        if built is not None and int(built) != int(max_seq_len):
            raise DomainLossError(f'--max-seq-len {max_seq_len}, but {data_root} was built with max_seq_len {built} '
                                  f'(manifest.json); pass --max-seq-len {built}')
        _check_identity(model_dir, data_root)
    return chosen


def _check_identity(model_dir: Path, data_root: Path) -> None:
    """The data root was tokenised with the model's tokenizer (when the model folder has one) and fits its vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    from drp_foundry.identity_checks import IdentityError, check_data_root_fits

    tokenizer = None
    if any((model_dir / name).is_file() for name in ('tokenizer.json', 'tokenizer_config.json', 'vocab.json')):
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    try:
        check_data_root_fits(data_root, tokenizer, AutoConfig.from_pretrained(str(model_dir)), 'DATA_ROOT', 'MODEL_DIR')
    except IdentityError as err:
        raise DomainLossError(str(err)) from None
