"""Finding the Hugging Face model (and its tokenizer) inside the wrappers Composer and LLM-Foundry put around it."""

from __future__ import annotations

import torch


def unwrap_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model in a (possibly DDP-wrapped) Composer HF model (its ``.model``).

    A bare HF model (``PreTrainedModel``) comes back unchanged: its own ``.model`` is the decoder
    stack, not a wrapper. Anything else without ``.model`` comes back unchanged too.
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    model = getattr(model, 'module', model)  # DistributedDataParallel
    return model if isinstance(model, PreTrainedModel) else getattr(model, 'model', model)


def unwrap_hf_model_and_tokenizer(model: torch.nn.Module):
    """``(HF model, tokenizer)`` of a (possibly DDP-wrapped) Composer HF model; tokenizer None when it has none."""
    wrapper = getattr(model, 'module', model)  # DistributedDataParallel
    return unwrap_hf_model(model), getattr(wrapper, 'tokenizer', None)
