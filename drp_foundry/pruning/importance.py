"""Activation-based importance of layers, KV groups, FFN units and hidden channels (ours).

Used to initialise the L0 masks (``drp_mask_learner`` ``init: importance``) and by the
one-shot pruning path (``drp-prune-oneshot``). Scores follow Minitron (Muralidharan et al.
2024, activation-based) and ShortGPT (Men et al. 2024, block importance), computed in one pass
over a few calibration batches with forward hooks on a stock HF decoder, at the modules its family's
``DecoderLayout`` names (Llama's below):

- ``intermediate (L, F)``: mean over tokens of ``|act(gate(x)) * up(x)|`` per FFN unit (the
  input of ``down_proj``);
- ``head (L, G)``: mean over tokens of the L2 norm of each KV group's attention output (the
  slice of ``o_proj``'s input that belongs to the group's H/G query heads);
- ``hidden (D,)``: mean over tokens of ``|y_d|``, summed over every hidden-width norm output (two
  per layer, four with sandwich norms, and the final norm);
- ``layer (L,)``: block importance ``1 - cos(h_in, h_out)`` of each decoder layer, averaged over
  tokens (a layer that barely changes the residual stream scores near 0).

Padding positions (``attention_mask == 0``) are left out. Higher means more important.

Scores become masks and log-alphas in ``pruning/importance_masks.py``.

Pure torch (+ transformers model classes): no Composer or LLM-Foundry import.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Mapping

import torch
from torch import nn

from drp_foundry.pruning.architecture import DecoderArchitecture
from drp_foundry.pruning.hf_injection import get_mask_module, layout_of

__all__ = ['activation_importance']


@contextmanager
def _all_ones_masks(hf_model: nn.Module):
    """Run a model that carries L0 masks as the unmasked source model."""
    masks = get_mask_module(hf_model)
    if masks is None:
        yield
        return
    saved = masks.fixed_masks
    deterministic = masks.deterministic('target')
    masks.fixed_masks = {key: torch.ones_like(value) for key, value in deterministic.items()}
    try:
        yield
    finally:
        masks.fixed_masks = saved


def activation_importance(hf_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Importance scores ``{'layer', 'head', 'intermediate', 'hidden'}`` of ``hf_model`` (module doc).

    ``batches``: mappings with ``input_ids`` (and optionally ``attention_mask``) on the model's
    device. The model runs in eval mode without gradients; a model carrying L0 masks runs with
    all masks at 1. Scores are sums over tokens divided by the token count (float32, on CPU).
    """
    arch = DecoderArchitecture.from_hf_config(hf_model.config)
    layout = layout_of(hf_model)
    layers = layout.decoder_layers(hf_model)
    L, G, F, D = arch.num_layers, arch.num_kv_heads, arch.intermediate_size, arch.hidden_size
    sums = {'layer': torch.zeros(L, dtype=torch.float64), 'head': torch.zeros(L, G, dtype=torch.float64),
            'intermediate': torch.zeros(L, F, dtype=torch.float64), 'hidden': torch.zeros(D, dtype=torch.float64)}
    current: dict[str, torch.Tensor | None] = {'keep': None}

    def token_rows(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        keep = current['keep']
        return rows if keep is None else rows[keep]

    handles = []
    for index, layer in enumerate(layers):
        def on_o_proj(module, args, index=index):
            rows = token_rows(args[0])
            per_group = rows.view(rows.shape[0], G, -1).norm(dim=-1)
            sums['head'][index] += per_group.sum(dim=0).double().cpu()

        def on_down_proj(module, args, index=index):
            sums['intermediate'][index] += token_rows(args[0]).abs().sum(dim=0).double().cpu()

        def on_layer(module, args, kwargs, output, index=index):
            hidden_in = args[0] if args else kwargs['hidden_states']
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(token_rows(hidden_in), token_rows(hidden_out), dim=-1, eps=1e-8)
            sums['layer'][index] += (1.0 - cos).sum().double().cpu()

        handles.append(layer.get_submodule(layout.attention_output).register_forward_pre_hook(on_o_proj))
        handles.append(layer.get_submodule(layout.mlp_output).register_forward_pre_hook(on_down_proj))
        handles.append(layer.register_forward_hook(on_layer, with_kwargs=True))
    norms = layout.all_norms(hf_model)

    def on_norm(module, args, output):
        sums['hidden'] += token_rows(output).abs().sum(dim=0).double().cpu()

    handles.extend(norm.register_forward_hook(on_norm) for norm in norms)
    tokens = 0
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad(), _all_ones_masks(hf_model):
            for batch in batches:
                input_ids = batch['input_ids']
                attention_mask = batch.get('attention_mask')
                current['keep'] = None if attention_mask is None else attention_mask.reshape(-1).bool()
                tokens += int(input_ids.numel() if attention_mask is None else attention_mask.sum())
                hf_model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
        hf_model.train(was_training)
    if tokens == 0:
        raise ValueError('no calibration tokens: the calibration batches are empty')
    return {key: (value / tokens).float() for key, value in sums.items()}
