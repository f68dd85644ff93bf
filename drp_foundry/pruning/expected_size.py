"""Expected remaining size of a decoder under L0 masks (spec section 3; paper eq. 1's s).

Inputs are the keep probabilities ``P(z != 0)`` of each mask (``prob_nonzero`` of the
hard-concrete), keyed as in docs/DESIGN.md: ``layer (L,)``, ``head (L, G)`` (whole KV
groups), ``intermediate (L, F)``, ``hidden (D,)``. A missing key means "not pruned"
(all ones). Masks are independent, so the expectation of every product of indicators is
the product of the probabilities, and the formula below is the exact expected parameter
count; fed 0/1 indicators of deterministic masks it is the exact parameter count of the
sliced model.

With  p_l = P(layer l kept),  g_l = sum_g P(head group g of layer l kept),
f_l = sum_j P(FFN unit j of layer l kept),  h = sum_d P(hidden dim d kept),
r = H / G query heads per group, d_h the head dim:

    per layer l:  p_l * [ n_norm * h + n_head_norm * d_h        (its norms: 2, or 4 with sandwich
                                                                 norms; per-head q/k norms: 0 or 2)
                        + g_l * d_h * (r + 2) * h               (q, k, v projections)
                        + g_l * d_h * r * h                     (o_proj)
                        + qkv_bias * g_l * d_h * (r + 2) + o_bias * h
                        + 3 * f_l * h + mlp_bias * (2 f_l + h) ]
    plus  V * h (embeddings) + V * h (LM head, if untied) + h (final norm).

The size constraint of the Lagrangian does not use this count: like Sheared LLaMA's L0
module (``calculate_expected_score_sparsity``), it constrains every mask separately and, for
the per-layer masks (head, intermediate), every layer separately (``expected_fractions`` /
``target_fractions``; the penalties are averaged over layers in ``pruning/lagrangian.py``).
Only this parameter count couples the masks (a head of a dropped layer counts nothing); the
data scheduler and the logs read it.

Pure torch: no Composer or LLM-Foundry import.
"""

from __future__ import annotations

from typing import Mapping

import torch

from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture

__all__ = ['GRANULARITIES', 'GRANULARITY_FIELDS', 'mask_shapes', 'expected_num_parameters', 'expected_fractions',
           'target_fractions', 'pruned_granularities', 'target_keep_counts']

GRANULARITIES = ('layer', 'head', 'intermediate', 'hidden')
# granularity -> (the TargetArchitecture field it prunes, the DecoderArchitecture field it is cut from,
# per layer: one row per decoder layer, keep counts per row)
GRANULARITY_FIELDS = {'layer': ('layers', 'num_layers', False), 'head': ('kv_heads', 'num_kv_heads', True),
                      'intermediate': ('intermediate', 'intermediate_size', True),
                      'hidden': ('hidden', 'hidden_size', False)}


def mask_shapes(arch: DecoderArchitecture) -> dict[str, tuple[int, ...]]:
    """Shape of every mask for ``arch`` (docs/DESIGN.md table)."""
    return {key: ((arch.num_layers,) if per_layer else ()) + (getattr(arch, source_field),)
            for key, (_, source_field, per_layer) in GRANULARITY_FIELDS.items()}


def pruned_granularities(arch: DecoderArchitecture, target: TargetArchitecture) -> list[str]:
    """The granularities whose target is below the source size."""
    return [key for key, (target_field, source_field, _) in GRANULARITY_FIELDS.items()
            if getattr(target, target_field) < getattr(arch, source_field)]


def target_keep_counts(arch: DecoderArchitecture, target: TargetArchitecture) -> dict[str, int | list[int]]:
    """Entries every mask keeps at ``target``: an int, or one per layer for the per-layer masks."""
    return {key: [getattr(target, target_field)] * arch.num_layers if per_layer else getattr(target, target_field)
            for key, (target_field, _, per_layer) in GRANULARITY_FIELDS.items()}


def _full_probs(arch: DecoderArchitecture, probs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    shapes = mask_shapes(arch)
    reference = next(iter(probs.values()), None)
    device = reference.device if reference is not None else None
    out = {}
    for key, shape in shapes.items():
        if key in probs and probs[key] is not None:
            value = probs[key]
            if tuple(value.shape) != shape:
                raise ValueError(f'mask {key!r} has shape {tuple(value.shape)}, expected {shape} for this model')
            out[key] = value.float()
        else:
            out[key] = torch.ones(shape, device=device)
    unknown = sorted(set(probs) - set(shapes))
    if unknown:
        raise ValueError(f'unknown mask keys {unknown}; known keys are {list(shapes)}')
    return out


def expected_num_parameters(arch: DecoderArchitecture, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Expected parameter count (a differentiable scalar tensor) of ``arch`` under the masks."""
    p = _full_probs(arch, probs)
    h = p['hidden'].sum()
    groups_kept = p['head'].sum(dim=1)  # g_l, shape (L,)
    ffn_kept = p['intermediate'].sum(dim=1)  # f_l, shape (L,)
    r, d_h = arch.heads_per_group, arch.head_dim
    per_layer = arch.layer_norms * h + arch.head_norms * d_h + groups_kept * d_h * (2 * r + 2) * h + 3 * ffn_kept * h
    if arch.attention_bias:
        per_layer = per_layer + groups_kept * d_h * (r + 2)
    if arch.o_proj_bias:
        per_layer = per_layer + h
    if arch.mlp_bias:
        per_layer = per_layer + 2 * ffn_kept + h
    layers = (p['layer'] * per_layer).sum()
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return layers + embeddings + h


def expected_fractions(arch: DecoderArchitecture, probs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expected kept fraction of every mask given in ``probs``, per layer (the Lagrangian's s).

    As in Sheared LLaMA's L0 module, each granularity's constraint is on its own mask, row by
    row, with no coupling to the layer mask: ``layer``: sum_l p_l / L (a scalar);
    ``head``: sum_g P(head_lg) / G for every layer l (shape (L,)); ``intermediate``:
    sum_j P(ffn_lj) / F per layer (shape (L,)); ``hidden``: sum_d P(hidden_d) / D (a scalar).
    The coupling between masks lives only in ``expected_num_parameters``.
    """
    p = _full_probs(arch, probs)
    fractions = {
        'layer': p['layer'].mean(),
        'head': p['head'].mean(dim=1),
        'intermediate': p['intermediate'].mean(dim=1),
        'hidden': p['hidden'].mean(),
    }
    return {key: fractions[key] for key in GRANULARITIES if key in probs}


def target_fractions(arch: DecoderArchitecture, target: TargetArchitecture) -> dict[str, float]:
    """The kept fraction t_i of every mask (every row of a per-layer mask) once ``target`` is reached."""
    return {key: getattr(target, target_field) / getattr(arch, source_field)
            for key, (target_field, source_field, _) in GRANULARITY_FIELDS.items()}
