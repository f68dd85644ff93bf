"""Is this data root / tokenizer the one this model was made for? The check ``train.py`` does, for every tool.

- ``check_data_root_fits(root, tokenizer, config, data_key, model_key)``: a data_prep root
  (``manifest.json``) tokenised with another tokenizer than ``tokenizer``, or with more token ids
  than the model's ``vocab_size``, is refused (one-shot calibration, ``drp-domain-loss``).
- ``check_tokenizer_fits(tokenizer, config, key, reference=None)``: a tokenizer with more ids than
  the model's embedding, or another identity than ``reference`` (the tokenizer the checkpoint
  stored), is refused (``drp-export --tokenizer``).
- ``check_source_fits(source_dir, config, key)``: a ``--source`` model whose architecture (type,
  vocabulary, widths) is not the one the checkpoint's masks were trained on.

Identity is ``drp_foundry.data.manifest.tokenizer_identity``: vocabulary, merges and EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ['IdentityError', 'check_data_root_fits', 'check_tokenizer_fits', 'check_source_fits']


class IdentityError(ValueError):
    """A model, tokenizer or data that do not belong together; the message names the argument."""


def _identity(tokenizer) -> str:
    from drp_foundry.data.manifest import tokenizer_identity

    return tokenizer_identity(tokenizer)


def check_data_root_fits(root: Path, tokenizer, config: Any, data_key: str, model_key: str) -> None:
    from drp_foundry.data.manifest import ManifestError, read_manifest

    try:
        manifest = read_manifest(root)
    except ManifestError as err:
        raise IdentityError(f'{data_key}: {err}') from None
    if manifest is None:
        return
    if tokenizer is not None and manifest.get('tokenizer_identity') and _identity(tokenizer) != manifest['tokenizer_identity']:
        raise IdentityError(f'{data_key}: {root} was tokenised with {manifest.get("tokenizer")}, not with the '
                            f'tokenizer of {model_key} (other vocabulary, merges or EOS), so its token ids mean other '
                            'text to this model; rebuild the data with the model\'s tokenizer (data_prep --tokenizer)')
    vocab = manifest.get('vocab_size')
    model_vocab = getattr(config, 'vocab_size', None)
    if vocab is not None and model_vocab is not None and int(vocab) > int(model_vocab):
        raise IdentityError(f'{data_key}: {root} holds token ids up to {vocab} (manifest.json), more than the '
                            f'{model_vocab} of {model_key}\'s vocabulary; the data was tokenised for another model')


def check_tokenizer_fits(tokenizer, config: Any, key: str, reference=None) -> None:
    model_vocab = getattr(config, 'vocab_size', None)
    if model_vocab is not None and len(tokenizer) > int(model_vocab):
        raise IdentityError(f'{key}: the tokenizer has {len(tokenizer)} ids, more than the model\'s vocab_size '
                            f'{model_vocab}: it belongs to another model. Pass the tokenizer the run trained with '
                            '(or leave the option out: the checkpoint stores it)')
    if reference is not None and _identity(tokenizer) != _identity(reference):
        raise IdentityError(f'{key}: this tokenizer is not the one the checkpoint stores (other vocabulary, merges or '
                            'EOS), so the exported model would ship with a tokenizer that does not fit it; leave the '
                            'option out to use the stored one')


# architecture fields that pruning keeps from the source (the checkpoint's config holds the source's)
_SOURCE_FIELDS = ('model_type', 'vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                  'num_key_value_heads', 'intermediate_size', 'tie_word_embeddings')


def check_source_fits(source: str | None, config: Any, key: str) -> None:
    if not source or not (Path(source) / 'config.json').is_file():
        return  # a hub name: nothing local to compare (the model card records it as given)
    try:
        theirs = json.loads((Path(source) / 'config.json').read_text())
    except ValueError as err:
        raise IdentityError(f'{key}: {source}/config.json is not valid JSON ({err})') from None
    ours = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
    differ = {f: (theirs.get(f), ours.get(f)) for f in _SOURCE_FIELDS
              if f in theirs and f in ours and theirs.get(f) != ours.get(f)}
    if differ:
        raise IdentityError(f'{key}: {source} is not the model this checkpoint was pruned from (source vs checkpoint: '
                            f'{differ}); pass the source model of the run, or leave the option out')
