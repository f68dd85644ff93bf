"""Fold deterministic L0 masks into the weights of a HF decoder and slice it to a dense, smaller model.

Spec §1 step 2 ("export"): keep the components whose deterministic mask ``z`` is non-zero,
multiply each kept ``z`` into the weight that produces (or consumes) the masked quantity, and
cut every tensor to the kept rows/columns. Which tensors those are comes from the family's
``DecoderLayout`` (``pruning/layouts.py``; Llama's module names below). The result is a stock
model of the same family with the pruned sizes in its config; its logits equal those of the
masked source model in eval mode (``docs/DESIGN.md``, "Masks"):

- ``layer`` ``z^L_l``: multiplies what layer ``l`` adds to the residual -> folded into the
  output rows (and bias) of ``o_proj`` and ``down_proj``; layers with ``z^L_l = 0`` are dropped
  and the kept ones renumbered.
- ``head`` ``z^H_{l,g}``: multiplies the outputs of the ``H/G`` query heads of KV group ``g``
  before ``o_proj`` -> folded into the matching input columns of ``o_proj``; pruned groups lose
  their K/V head and their query heads (rows of ``q/k/v_proj`` and their biases).
- ``intermediate`` ``z^F_{l,j}``: multiplies ``act(gate(x)) * up(x)`` -> folded into the input
  columns of ``down_proj``; rows of ``gate/up_proj`` sliced.
- ``hidden`` ``z^D_d``: multiplies the embedding output, every ``o_proj``/``down_proj`` output and
  every RMSNorm output -> folded into the embedding columns, the output rows of ``o_proj`` /
  ``down_proj`` and the weights of the decoder-layer norms. The masked RMSNorm averages over the
  kept dims only, which is what an RMSNorm of the sliced width computes.

The final norm's ``z^D`` is folded on the LM-head side instead: into the kept columns of an
untied LM head; with tied embeddings the shared matrix already carries ``z^D`` from the
embedding fold, so nothing more is multiplied (folding it into the final norm as well would
apply it twice).

What the layout adds:

- fused projections (Phi-3's ``qkv_proj`` = [q | k | v], ``gate_up_proj`` = [gate | up]): each
  named row block is cut with its own kept rows, the blocks stay in order;
- norm form ``(offset + w) * x_hat`` (Gemma: offset 1): a scale ``s`` is folded as
  ``w' = (offset + w) * s - offset``;
- sandwich norms (Gemma 2/3): the branch-output norm carries ``z^L_l * z^D`` (folded into it),
  the projection before it only gets the 0/1 indicator (its rows are sliced, not scaled);
- per-head q/k norms (Qwen3, Gemma 3) act over ``head_dim`` and are shared by all heads: copied;
- embedding scale computed from the config (Gemma: ``sqrt(hidden_size)``): the exported model
  multiplies its embeddings by ``sqrt(D')`` instead of ``sqrt(D)``, so the embedding columns also
  get ``c = sqrt(D) / sqrt(D')``. With tied embeddings the LM head is the same matrix, so the
  logits would grow by ``c``; the final norm gets ``1 / c`` to undo it (the logits are linear in
  the final norm's gain, and the final norm's output feeds nothing else);
- config fix-ups (``fix_config``: Qwen2/Qwen3 ``max_window_layers`` counts the kept layers below
  the split).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from drp_foundry.pruning.architecture import DecoderArchitecture
from drp_foundry.pruning.expected_size import GRANULARITIES, mask_shapes
from drp_foundry.pruning.layouts import STANDARD_CONFIG_KEYS, get_layout

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MASK_MODULE_PREFIX = 'drp_masks.'


@dataclasses.dataclass
class KeptLayer:
    """What survives of one source decoder layer."""

    source_index: int
    kv_groups: list[int]
    query_heads: list[int]
    intermediate_dims: list[int]


@dataclasses.dataclass
class PruningReport:
    """What the export kept, and the parameter counts before and after."""

    model_type: str
    source_sizes: dict[str, int]
    pruned_sizes: dict[str, int]
    kept_layers: list[KeptLayer]
    kept_hidden_dims: list[int]
    params_before: int
    params_after: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        sizes = ', '.join(f'{key} {self.source_sizes[key]} -> {self.pruned_sizes[key]}' for key in self.pruned_sizes)
        return (f'{self.model_type}: {sizes}; kept layers {[layer.source_index for layer in self.kept_layers]}; '
                f'parameters {self.params_before:,} -> {self.params_after:,} '
                f'({self.params_after / self.params_before:.3f})')


def count_model_parameters(hf_model: torch.nn.Module) -> int:
    """Parameters of the HF model itself (tied weights once), without an attached mask module."""
    seen: set[int] = set()
    total = 0
    for name, parameter in hf_model.named_parameters(remove_duplicate=False):
        if name.startswith(MASK_MODULE_PREFIX) or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total


def _hf_sizes(arch: DecoderArchitecture) -> dict[str, int]:
    """The HF config fields that pruning changes (plus the head dim it keeps)."""
    return {
        'num_hidden_layers': arch.num_layers,
        'hidden_size': arch.hidden_size,
        'num_attention_heads': arch.num_heads,
        'num_key_value_heads': arch.num_kv_heads,
        'intermediate_size': arch.intermediate_size,
        'head_dim': arch.head_dim,
    }


def _checked_masks(masks: Mapping[str, Tensor], arch: DecoderArchitecture) -> dict[str, Tensor]:
    """Every granularity as a float32 CPU tensor of its contract shape; absent keys become ones."""
    unknown = sorted(set(masks) - set(GRANULARITIES))
    if unknown:
        raise ValueError(f'unknown mask keys {unknown}; expected a subset of {list(GRANULARITIES)} (docs/DESIGN.md)')
    checked = {}
    for key, shape in mask_shapes(arch).items():
        if key not in masks or masks[key] is None:
            checked[key] = torch.ones(shape)
            continue
        mask = masks[key].detach().to(device='cpu', dtype=torch.float32)
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask '{key}' has shape {tuple(mask.shape)} but the model needs {shape} "
                             f'(L={arch.num_layers}, G={arch.num_kv_heads}, F={arch.intermediate_size}, '
                             f'D={arch.hidden_size}); the masks were learned for a different model')
        if not torch.isfinite(mask).all() or (mask < 0).any():
            raise ValueError(f"mask '{key}' holds negative or non-finite values; pass deterministic masks "
                             '(zeros for pruned entries, soft values in (0, 1] for kept ones)')
        checked[key] = mask
    return checked


def _uniform_count(name: str, mask_rows: Tensor, kept_layers: list[int]) -> int:
    counts = {layer: int((mask_rows[layer] != 0).sum()) for layer in kept_layers}
    distinct = sorted(set(counts.values()))
    if len(distinct) != 1:
        raise ValueError(f"mask '{name}' keeps a different number of entries in different kept layers "
                         f'({counts}); a HF config needs the same count in every layer, so compute the '
                         'deterministic masks with one per-layer target (docs/DESIGN.md)')
    if distinct[0] == 0:
        raise ValueError(f"mask '{name}' prunes every entry of the kept layers {kept_layers}; a HF decoder layer "
                         'needs at least one, so raise the target or prune those layers with the layer mask')
    return distinct[0]


def _rows(weight: Tensor, index: Tensor, scale: Tensor | None = None) -> Tensor:
    sliced = weight.index_select(0, index).float()
    if scale is not None:
        sliced = sliced * scale.reshape((-1,) + (1,) * (sliced.dim() - 1))
    return sliced


def _columns(weight: Tensor, index: Tensor, scale: Tensor | None = None) -> Tensor:
    sliced = weight.index_select(1, index).float()
    if scale is not None:
        sliced = sliced * scale.reshape(1, -1)
    return sliced


def _per_head_rows(kept_heads: Tensor, head_dim: int) -> Tensor:
    """Row indices of a projection whose output is ``heads x head_dim`` for the kept heads."""
    return (kept_heads.reshape(-1, 1) * head_dim + torch.arange(head_dim).reshape(1, -1)).reshape(-1)


def _source_state(hf_model: torch.nn.Module) -> dict[str, Tensor]:
    return {name: tensor for name, tensor in hf_model.state_dict().items()
            if not name.startswith(MASK_MODULE_PREFIX)}


def fold_and_slice(hf_model: PreTrainedModel, masks: Mapping[str, Tensor]) -> tuple[PreTrainedModel, PruningReport]:
    """Return ``(pruned_model, report)``: a new stock HF model with the masks folded in and sliced out.

    ``hf_model`` is a ``*ForCausalLM`` of a family with a layout (an attached ``drp_masks`` module and
    injected hooks are ignored; only its weights are read). ``masks`` maps a subset of
    ``layer (L,)``, ``head (L, G)``, ``intermediate (L, F)``, ``hidden (D,)`` to deterministic masks:
    zeros are pruned, non-zero values are folded into the weights. Heads and intermediate dims
    must keep the same count in every kept layer. The source model is not modified.
    """
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    config = hf_model.config
    layout = get_layout(config.model_type)
    arch = DecoderArchitecture.from_hf_config(config)
    mask = _checked_masks(masks, arch)
    head_dim = arch.head_dim
    queries_per_group = arch.heads_per_group
    norm = layout.norm

    kept_layer_index = torch.nonzero(mask['layer'] != 0).flatten()
    kept_layers = kept_layer_index.tolist()
    if not kept_layers:
        raise ValueError("mask 'layer' prunes every layer; keep at least one")
    layout.check_granularities(list(masks), ['layer'] if len(kept_layers) < arch.num_layers else [])
    num_kv_groups = _uniform_count('head', mask['head'], kept_layers)
    num_intermediate = _uniform_count('intermediate', mask['intermediate'], kept_layers)
    kept_hidden = torch.nonzero(mask['hidden'] != 0).flatten()
    if kept_hidden.numel() == 0:
        raise ValueError("mask 'hidden' prunes every hidden dimension; keep at least one")
    hidden_scale = mask['hidden'][kept_hidden]
    tied = arch.tie_word_embeddings

    pruned_sizes = {
        'layers': len(kept_layers),
        'hidden': int(kept_hidden.numel()),
        'heads': num_kv_groups * queries_per_group,
        'kv_heads': num_kv_groups,
        'intermediate': num_intermediate,
        'head_dim': head_dim,
    }
    new_config = copy.deepcopy(config)
    for key, value in pruned_sizes.items():
        setattr(new_config, layout.config_keys[key], value)
    if layout.fix_config is not None:
        layout.fix_config(new_config, config, kept_layers)
    try:  # the saved folder must load: a config class may validate values against the new sizes
        type(new_config).from_dict(new_config.to_dict())
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f'the pruned {config.model_type} config would not load ({error}); these sizes cannot be '
                         f'exported for this family') from error
    # the exported model scales its embeddings for its own width: compensate (module doc)
    embed_factor = 1.0
    if layout.embedding_scale is not None:
        embed_factor = layout.embedding_scale(config) / layout.embedding_scale(new_config)

    source = _source_state(hf_model)
    pruned: dict[str, Tensor] = {}
    embedding_key = layout.base_key(f'{layout.embedding}.weight')
    final_norm_key = layout.base_key(f'{layout.final_norm}.weight')
    lm_head_key = f'{layout.lm_head}.weight'
    pruned[embedding_key] = _columns(source[embedding_key], kept_hidden, hidden_scale * embed_factor)
    final_norm = _rows(source[final_norm_key], kept_hidden)
    if tied and embed_factor != 1.0:
        final_norm = norm.fold(final_norm, 1.0 / embed_factor)
    pruned[final_norm_key] = final_norm
    if tied:
        pruned[lm_head_key] = pruned[embedding_key]
    else:
        pruned[lm_head_key] = _columns(source[lm_head_key], kept_hidden, hidden_scale)

    report_layers = []
    for new_index, layer in enumerate(kept_layers):
        def src(name: str, layer: int = layer) -> str:
            return layout.layer_key(layer, name)

        def dst(name: str) -> str:
            return layout.layer_key(new_index, name)

        kept_groups = torch.nonzero(mask['head'][layer] != 0).flatten()
        kept_queries = (kept_groups.reshape(-1, 1) * queries_per_group
                        + torch.arange(queries_per_group).reshape(1, -1)).reshape(-1)
        kept_ffn = torch.nonzero(mask['intermediate'][layer] != 0).flatten()
        query_rows = _per_head_rows(kept_queries, head_dim)
        kv_rows = _per_head_rows(kept_groups, head_dim)
        role_rows = {'q': query_rows, 'k': kv_rows, 'v': kv_rows, 'gate': kept_ffn, 'up': kept_ffn}
        # What the layer adds to the residual is scaled by z^L_l and, per kept hidden dim, by z^D_d: on the
        # output projections, or on the branch-output norms when the family has them (sandwich norms).
        residual_scale = hidden_scale * mask['layer'][layer]
        output_row_scale = None if layout.sandwich else residual_scale
        # Each query head's output carries the head mask of its KV group.
        query_column_scale = mask['head'][layer][kept_groups].repeat_interleave(queries_per_group * head_dim)

        for name in layout.stream_norms():
            pruned[dst(f'{name}.weight')] = norm.fold(_rows(source[src(f'{name}.weight')], kept_hidden), hidden_scale)
        for name in layout.branch_output_norms():
            pruned[dst(f'{name}.weight')] = norm.fold(_rows(source[src(f'{name}.weight')], kept_hidden),
                                                      residual_scale)
        for projection in layout.attention_inputs + layout.mlp_inputs:
            blocks, offset = [], 0
            for role in projection.parts:  # a fused projection: each row block with its own kept rows
                blocks.append(role_rows[role] + offset)
                offset += layout.role_rows(arch, role)
            rows = torch.cat(blocks)
            key = src(f'{projection.path}.')
            pruned[dst(f'{projection.path}.weight')] = _columns(_rows(source[key + 'weight'], rows), kept_hidden)
            if key + 'bias' in source:
                pruned[dst(f'{projection.path}.bias')] = _rows(source[key + 'bias'], rows)
        for name, columns, column_scale in ((layout.attention_output, query_rows, query_column_scale),
                                            (layout.mlp_output, kept_ffn, mask['intermediate'][layer][kept_ffn])):
            key = src(f'{name}.')
            pruned[dst(f'{name}.weight')] = _columns(_rows(source[key + 'weight'], kept_hidden, output_row_scale),
                                                     columns, column_scale)
            if key + 'bias' in source:
                pruned[dst(f'{name}.bias')] = _rows(source[key + 'bias'], kept_hidden, output_row_scale)
        for name in layout.head_norms:  # over head_dim, shared by all heads: untouched by any mask
            pruned[dst(f'{name}.weight')] = source[src(f'{name}.weight')].float()

        report_layers.append(KeptLayer(source_index=layer, kv_groups=kept_groups.tolist(),
                                       query_heads=kept_queries.tolist(), intermediate_dims=kept_ffn.tolist()))

    dtype = source[embedding_key].dtype
    with no_init_weights():
        pruned_model = AutoModelForCausalLM.from_config(new_config, torch_dtype=dtype)
    expected_keys = set(pruned_model.state_dict())
    if set(pruned) != expected_keys:
        raise RuntimeError(f'sliced weights do not match the {type(pruned_model).__name__} layout: '
                           f'missing {sorted(expected_keys - set(pruned))[:5]}, '
                           f'unexpected {sorted(set(pruned) - expected_keys)[:5]}; the {config.model_type} '
                           f'DecoderLayout does not describe every weight of this model')
    pruned_model.load_state_dict({key: value.to(dtype) for key, value in pruned.items()}, strict=True)
    if tied:
        pruned_model.tie_weights()
    pruned_model.eval()

    report = PruningReport(
        model_type=config.model_type,
        source_sizes=_hf_sizes(arch),
        pruned_sizes={STANDARD_CONFIG_KEYS[key]: value for key, value in pruned_sizes.items()},
        kept_layers=report_layers,
        kept_hidden_dims=kept_hidden.tolist(),
        params_before=count_model_parameters(hf_model),
        params_after=count_model_parameters(pruned_model),
    )
    return pruned_model, report
