"""Store a tied ``lm_head.weight`` explicitly in a saved Hugging Face model directory.

``save_pretrained`` leaves the output embedding of a model with ``tie_word_embeddings: true``
out of the safetensors file (it is the input embedding). Plain ``from_pretrained`` ties it
back silently, but LLM-Foundry's ``hf_causal_lm`` first loads the model once under
accelerate's ``init_empty_weights``, where the tie does not hold (each parameter registered
on the meta device becomes a new object), so transformers reports ``lm_head.weight`` as
"newly initialized" and advises to "TRAIN this model" -- about a model whose weights are
complete and correct. With the tensor stored under its own name too, nothing is missing in
that pass either; every real load still ties the two (the values are identical), so the
model and its parameter count are unchanged. The price is one more embedding matrix on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from drp_foundry.fileio import atomic_file, atomic_write_text

INPUT_EMBEDDING = 'model.embed_tokens.weight'  # every built-in family; others: their DecoderLayout's paths
OUTPUT_EMBEDDING = 'lm_head.weight'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


def _write_atomically(path: Path, tensors: dict, metadata: dict | None) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _embedding_keys(model_type: str | None) -> tuple[str, str]:
    """(input, output) embedding keys of the family's layout; the Llama names for a family without one."""
    from drp_foundry.pruning.layouts import get_layout

    try:
        layout = get_layout(model_type)
    except ValueError:
        return INPUT_EMBEDDING, OUTPUT_EMBEDDING
    return layout.base_key(f'{layout.embedding}.weight'), f'{layout.lm_head}.weight'


def store_tied_output_embedding(model_dir: str | os.PathLike) -> bool:
    """Add ``lm_head.weight`` (a copy of the input embedding) to a tied model's safetensors; True if added.

    A model without tied embeddings, or one whose files already hold the key, is left alone.
    Handles a single ``model.safetensors`` and a sharded checkpoint (the shard holding the input
    embedding gets the copy; the index is updated).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = json.loads((model_dir / 'config.json').read_text())
    if not config.get('tie_word_embeddings', True):  # transformers' default is tied
        return False
    input_key, output_key = _embedding_keys(config.get('model_type'))
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        weight_map = index['weight_map']
        if output_key in weight_map:
            return False
        if input_key not in weight_map:
            raise KeyError(f'{index_path}: no {input_key!r} to tie {output_key!r} to')
        shard = model_dir / weight_map[input_key]
    else:
        shard = model_dir / SINGLE_FILE
        if not shard.is_file():
            raise FileNotFoundError(f'{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}; save the model with '
                                    'safe_serialization=True')
    with safe_open(str(shard), 'pt') as f:
        metadata = f.metadata()
        if output_key in f.keys():
            return False
        if input_key not in f.keys():
            raise KeyError(f'{shard}: no {input_key!r} to tie {output_key!r} to')
    tensors = load_file(str(shard))
    tensors[output_key] = tensors[input_key].clone()
    _write_atomically(shard, tensors, metadata)
    if index_path.is_file():
        index['weight_map'][output_key] = shard.name
        index.setdefault('metadata', {})['total_size'] = (index.get('metadata', {}).get('total_size', 0)
                                                          + tensors[output_key].nbytes)
        atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + '\n')
    return True
