"""Checks of a checkpoint's values and of what ``drp-export`` pairs with it, before any model is built.

- ``non_finite_tensors(state_dict)``: the floating tensors holding NaN or infinity (also used by
  the pre-flight of a resumed run, ``drp_foundry/composer/resume_checks.py``);
- ``check_export_inputs``, kept apart from export.py (raises ``ExportInputError``, which export
  turns into its ``ExportError``): every floating tensor of the checkpoint's model (weights, the masks' log-alphas, the λ of
  the Lagrangian) is finite: a damaged file or a diverged run is refused naming the tensors and
  the checkpoint, instead of exporting NaN weights or failing in ``keep_counts``;
- ``--tokenizer`` fits the model (no more ids than its embedding, the checkpoint's own tokenizer
  when it stores one);
- ``--source`` (a local folder) is the model the checkpoint was pruned from.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ['ExportInputError', 'non_finite_tensors', 'check_export_inputs']


class ExportInputError(ValueError):
    """A checkpoint, tokenizer or source that must not be exported together; names the argument."""


def _values(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, (torch.Tensor, float)):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _values(v, f'{prefix}.{k}' if prefix else str(k))


def non_finite_tensors(state_dict: dict[str, Any], limit: int = 5) -> list[str]:
    """Names of (at most ``limit``) floating tensors or floats holding NaN or infinity."""
    bad = []
    for name, value in _values(state_dict, ''):
        if isinstance(value, float):
            finite = math.isfinite(value)
        elif value.is_floating_point() and value.numel():
            finite = bool(torch.isfinite(value).all())
        else:
            continue
        if not finite:
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def check_export_inputs(checkpoint: dict[str, Any], path: Path, tokenizer_dir, source: str | None) -> None:
    """Call after export has checked the checkpoint's layout (``_composer_parts``)."""
    from drp_foundry.identity_checks import IdentityError, check_source_fits, check_tokenizer_fits

    state = checkpoint['state']
    model_state = state['model']
    bad = non_finite_tensors(model_state)
    if bad:
        raise ExportInputError(f'checkpoint {path} holds non-finite values (NaN or inf) in {bad}; the file is damaged or '
                          'the run diverged. Export an earlier checkpoint of the run')
    huggingface = state['integrations']['huggingface']
    from composer.models.huggingface import get_hf_config_from_composer_state_dict

    try:
        config = get_hf_config_from_composer_state_dict(checkpoint)
    except Exception:  # a damaged config: build_masked_model reports it
        return
    try:
        check_source_fits(source, config, '--source')
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            reference = None
            if huggingface.get('tokenizer'):
                from composer.models.huggingface import HuggingFaceModel

                with tempfile.TemporaryDirectory(prefix='drp-export-tok-') as scratch:
                    reference = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(
                        huggingface, tokenizer_save_dir=scratch)
            check_tokenizer_fits(tokenizer, config, '--tokenizer', reference)
    except IdentityError as err:
        raise ExportInputError(str(err)) from None
