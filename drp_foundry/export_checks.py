"""What ``drp-export`` checks of its inputs before it builds the model (kept apart from export.py).

- every floating tensor of the checkpoint's model (weights, the masks' log-alphas, the λ of
  the Lagrangian) is finite: a damaged file or a diverged run is refused naming the tensors and
  the checkpoint, instead of exporting NaN weights or failing in ``keep_counts``;
- ``--tokenizer`` fits the model (no more ids than its embedding, the checkpoint's own tokenizer
  when it stores one);
- ``--source`` (a local folder) is the model the checkpoint was pruned from.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

__all__ = ['check_export_inputs']


def check_export_inputs(checkpoint: dict[str, Any], path: Path, tokenizer_dir, source: str | None) -> None:
    from drp_foundry.composer.resume_checks import non_finite_tensors
    from drp_foundry.export import ExportError, _composer_parts
    from drp_foundry.identity_checks import IdentityError, check_source_fits, check_tokenizer_fits

    _composer_parts(checkpoint, path)  # export's own messages for a checkpoint that is not one of a pruning run
    state = checkpoint['state']
    model_state = state['model']
    bad = non_finite_tensors(model_state)
    if bad:
        raise ExportError(f'checkpoint {path} holds non-finite values (NaN or inf) in {bad}; the file is damaged or '
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
        raise ExportError(str(err)) from None
