"""Put an ``L0MaskModule`` into a stock HF decoder with hooks, where the family's layout says.

No model file is replaced: the masks enter the forward pass of the unmodified HF modules
(docs/DESIGN.md mask table) at the modules the family's ``DecoderLayout`` names
(``pruning/layouts.py``; Llama's names below) through

- a forward pre-hook on the top model (``*ForCausalLM``): draws the masks of this forward
  pass once (a sample in training, deterministic masks in eval), precomputes what the
  other hooks read and, in a training forward, records the size terms (``SizeTerms``);
- embedding (``embed_tokens``) forward hook: embedding output * z_hidden (a family that
  scales its embeddings, Gemma, multiplies after: the product commutes);
- attention output (``o_proj``) forward pre-hook: KV group g of layer l (its H/G query heads)
  * z_head[l, g]; forward hook: output * z_layer[l] * z_hidden, or, when a branch-output norm
  follows (Gemma's sandwich norms), output * [z_hidden != 0] only;
- MLP output (``down_proj``) forward pre-hook: FFN activation * z_intermediate[l]; forward hook
  as the attention output;
- every hidden-width norm: its ``forward`` is swapped for the masked norm
  ``y = x / sqrt(sum_d x_d^2 [z_d != 0] / #{z_d != 0} + eps) * (offset + w) * s`` (``masked_norm``)
  with ``s = z_hidden`` for the norms that read the residual stream (the pre-norms and the
  final norm) and ``s = z_layer[l] * z_hidden`` for branch-output norms (an RMSNorm would
  undo a scalar applied before it, so the layer mask goes after it).

Masks act on the inputs and outputs of ``o_proj`` and ``down_proj`` and never inside the
attention kernel, so eager, SDPA and flash attention all work. With activation
checkpointing (non-reentrant) a recomputed layer reads the same masks: they are drawn once
per forward of the top model, not per layer call. Reentrant checkpointing is not supported
(it does not propagate gradients to tensors a layer reads from outside its inputs) and is
refused at the first training forward when detected on the HF model.

FSDP: the mask parameters live in the submodule ``drp_masks`` of the HF model, so they are
sharded with the root unit and gathered before the top model's forward, where the pre-hook
reads them. Multiple optimizer param groups under FSDP need ``use_orig_params=True``.
FSDP2: ``shard_mask_module`` makes ``drp_masks`` its own ``fully_shard`` unit that gathers and
reduces in float32 whatever the model's mixed-precision policy; its forward never runs, so the
pre-hook gathers it (``unshard``) and, after a forward without gradients, frees it again; after
a training forward FSDP2's end-of-backward callback reduce-scatters its gradients and frees it.

Pure torch (+ transformers model classes): no Composer or LLM-Foundry import.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from drp_foundry.pruning.architecture import DecoderArchitecture
from drp_foundry.pruning.layouts import DecoderLayout, NormForm, get_layout
from drp_foundry.pruning.mask_module import L0MaskModule

__all__ = ['MASK_MODULE_NAME', 'ForwardMasks', 'inject_masks', 'remove_masks', 'get_mask_module', 'decoder_layers',
           'masked_rms_norm', 'masked_norm', 'layout_of', 'shard_mask_module']

MASK_MODULE_NAME = 'drp_masks'
_HANDLES_ATTR = '_drp_mask_hook_handles'
_CHECKED_ATTR = '_drp_checked_checkpointing'
_SWAPPED_ATTR = '_drp_swapped_norms'


@dataclass
class ForwardMasks:
    """What the hooks of one forward pass read (all optional: None = not pruned)."""

    head: torch.Tensor | None  # (L, G)
    intermediate: torch.Tensor | None  # (L, F)
    residual_scale: torch.Tensor | None  # (L, D) = z_layer[l] * z_hidden, on what a branch adds to the residual
    hidden: torch.Tensor | None  # (D,)
    hidden_count: torch.Tensor | None  # scalar: #{z_hidden != 0}
    hidden_indicator: torch.Tensor | None = None  # (D,): [z_hidden != 0], before a branch-output norm


def layout_of(hf_model: nn.Module) -> DecoderLayout:
    """The layout of the model's family (``ValueError`` naming the known families when there is none)."""
    return get_layout(getattr(getattr(hf_model, 'config', None), 'model_type', None))


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` (where its layout says: ``model.layers`` for Llama)."""
    config = getattr(hf_model, 'config', None)
    if config is None:
        raise TypeError(f'{type(hf_model).__name__} is not a HF *ForCausalLM (no config); pass the HF model itself '
                        f'(ComposerHFCausalLM.model)')
    return layout_of(hf_model).decoder_layers(hf_model)


def get_mask_module(hf_model: nn.Module) -> L0MaskModule | None:
    module = getattr(hf_model, MASK_MODULE_NAME, None)
    return module if isinstance(module, L0MaskModule) else None


def masked_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, hidden: torch.Tensor,
                    hidden_count: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm over the kept hidden dims, output * z_hidden (HF's dtype handling).

    ``y = x / sqrt(sum_d x_d^2 [z_d != 0] / #{z_d != 0} + eps) * weight * z``. The sum runs
    over all dims: every writer to the residual stream (embedding, o_proj, down_proj) is
    multiplied by z, so ``x_d`` is exactly 0 wherever ``z_d`` is, and this saves a product
    with the indicator. ``weight * z`` is formed first (a vector), so the masked norm costs
    the same activation work as HF's.
    """
    return masked_norm(x, weight, eps, hidden_count, hidden, NormForm())


def masked_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, count: torch.Tensor | int,
                scale: torch.Tensor | None, form: NormForm) -> torch.Tensor:
    """``x / sqrt(sum_d x_d^2 / count + eps) * (offset + w) * scale`` in the family's dtype handling.

    ``x`` must be exactly 0 at pruned dims (see ``masked_rms_norm``); ``count`` is the number of
    kept dims (the width when hidden is not pruned); ``scale`` None means 1.
    """
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).sum(-1, keepdim=True) / count
    normed = x32 * torch.rsqrt(variance + eps)
    if form.upcast_output:  # Gemma: (x_hat * (1 + w)) in float32, then cast
        gain = form.offset + weight.float()
        if scale is not None:
            gain = gain * scale.float()
        return (normed * gain).type_as(x)
    gain = weight + form.offset if form.offset else weight
    if scale is not None:
        gain = gain * scale.to(weight.dtype)
    return gain * normed.to(input_dtype)


def _norm_forward(mask_module: L0MaskModule, form: NormForm, layer_index: int | None):
    """Masked forward of a stream norm (``layer_index`` None: output * z_hidden) or of the branch-output norm
    of layer ``layer_index`` (output * z_layer[l] * z_hidden)."""
    eps_attr = form.eps_attr
    width = mask_module.source.hidden_size

    def forward(self, hidden_states):
        active: ForwardMasks = mask_module.forward_masks
        if active is None:
            return type(self).forward(self, hidden_states)
        if layer_index is None:
            scale = active.hidden
        else:
            scale = None if active.residual_scale is None else active.residual_scale[layer_index]
        if scale is None:
            return type(self).forward(self, hidden_states)
        count = active.hidden_count if active.hidden_count is not None else width
        return masked_norm(hidden_states, self.weight, getattr(self, eps_attr), count, scale, form)

    return forward


def _prepare_forward_masks(mask_module: L0MaskModule, masks: dict[str, torch.Tensor]) -> ForwardMasks:
    layer, hidden = masks.get('layer'), masks.get('hidden')
    residual_scale = None
    if layer is not None or hidden is not None:
        source = mask_module.source
        layer_col = layer[:, None] if layer is not None else torch.ones(source.num_layers, 1, device=hidden.device)
        hidden_row = hidden[None, :] if hidden is not None else torch.ones(1, source.hidden_size, device=layer.device)
        residual_scale = layer_col * hidden_row
    hidden_count = hidden_indicator = None
    if hidden is not None:
        hidden_count = (hidden != 0).sum().to(torch.float32).clamp_min(1.0)
        hidden_indicator = (hidden != 0).to(hidden.dtype)
    return ForwardMasks(head=masks.get('head'), intermediate=masks.get('intermediate'), residual_scale=residual_scale,
                        hidden=hidden, hidden_count=hidden_count, hidden_indicator=hidden_indicator)


def inject_masks(hf_model: nn.Module, mask_module: L0MaskModule) -> None:
    """Attach ``mask_module`` as ``hf_model.drp_masks`` and hook it into the forward pass (module doc).

    Raises ``ValueError`` when the model's family has no layout, the model does not match its
    layout, its config cannot hold the target (``DecoderLayout.check_target``), or the mask module
    was built for another architecture.
    """
    if get_mask_module(hf_model) is not None:
        raise ValueError(f'{type(hf_model).__name__} already carries masks ({MASK_MODULE_NAME}); remove_masks first')
    layout = layout_of(hf_model)
    arch = DecoderArchitecture.from_hf_config(hf_model.config)
    if arch != mask_module.source:
        raise ValueError(f'mask module was built for {mask_module.source}, but the model is {arch}')
    layout.check_model(hf_model, arch)
    if layout.check_target is not None:
        layout.check_target(hf_model.config, arch, mask_module.target)
    layers = layout.decoder_layers(hf_model)
    base = layout.base(hf_model)
    hf_model.add_module(MASK_MODULE_NAME, mask_module)
    mask_module.forward_masks = None
    handles = []

    def refresh_masks(module, args, kwargs):
        if module.training and not getattr(module, _CHECKED_ATTR, False):
            _refuse_reentrant_checkpointing(module)
            setattr(module, _CHECKED_ATTR, True)
        sharded = _is_fsdp2_unit(mask_module)
        if sharded:  # its own FSDP2 unit (shard_mask_module): gather the float32 masks and lambdas
            mask_module.unshard()
        mask_module.forward_masks = _prepare_forward_masks(mask_module, mask_module.masks_for_forward())
        if module.training and torch.is_grad_enabled():
            mask_module.record_size_terms()  # FSDP2 frees the gathered copy after the backward
        elif sharded:
            mask_module.reshard()  # no backward will: the masks above are computed tensors, not views

    handles.append(hf_model.register_forward_pre_hook(refresh_masks, with_kwargs=True))

    def scale_embeddings(module, args, output):
        hidden = mask_module.forward_masks.hidden
        return output if hidden is None else output * hidden.to(output.dtype)

    handles.append(base.get_submodule(layout.embedding).register_forward_hook(scale_embeddings))

    swapped = []
    for index, layer in enumerate(layers):
        handles.extend(_hook_layer(layer, index, mask_module, layout))
        for name in layout.stream_norms():
            swapped.append((layer.get_submodule(name), None, index))
        for name in layout.branch_output_norms():
            swapped.append((layer.get_submodule(name), index, index))
    swapped.append((base.get_submodule(layout.final_norm), None, None))
    for norm, layer_index, _ in swapped:
        norm.forward = types.MethodType(_norm_forward(mask_module, layout.norm, layer_index), norm)
    setattr(hf_model, _HANDLES_ATTR, handles)
    setattr(hf_model, _SWAPPED_ATTR, [norm for norm, _, _ in swapped])


def _is_fsdp2_unit(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_mask_module(mask_module: L0MaskModule, mesh=None) -> None:
    """FSDP2: ``fully_shard`` the (injected) mask module as its own unit, gathered and reduced in float32.

    Call it before FSDP2 shards the model that holds it (``fully_shard`` then leaves its parameters
    alone) and before an optimizer takes its parameters (they become DTensors).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fully_shard(mask_module, mesh=mesh, reshard_after_forward=True,
                mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))


def _hook_layer(layer: nn.Module, index: int, mask_module: L0MaskModule, layout: DecoderLayout) -> list:
    group_count = mask_module.source.num_kv_heads

    def mask_head_groups(module, args):
        head = mask_module.forward_masks.head
        if head is None:
            return None
        (x,) = args
        grouped = x.view(*x.shape[:-1], group_count, x.shape[-1] // group_count)
        return (grouped * head[index].to(x.dtype)[:, None]).view(x.shape)

    def mask_intermediate(module, args):
        intermediate = mask_module.forward_masks.intermediate
        if intermediate is None:
            return None
        (x,) = args
        return (x * intermediate[index].to(x.dtype),)

    def scale_residual_branch(module, args, output):
        scale = mask_module.forward_masks.residual_scale
        return output if scale is None else output * scale[index].to(output.dtype)

    def zero_pruned_dims(module, args, output):  # a branch-output norm follows: exact zeros, soft value after it
        indicator = mask_module.forward_masks.hidden_indicator
        return output if indicator is None else output * indicator.to(output.dtype)

    branch_output = zero_pruned_dims if layout.sandwich else scale_residual_branch
    attention_output, mlp_output = layer.get_submodule(layout.attention_output), layer.get_submodule(layout.mlp_output)
    return [
        attention_output.register_forward_pre_hook(mask_head_groups),
        attention_output.register_forward_hook(branch_output),
        mlp_output.register_forward_pre_hook(mask_intermediate),
        mlp_output.register_forward_hook(branch_output),
    ]


def _refuse_reentrant_checkpointing(hf_model: nn.Module) -> None:
    """Raise if HF gradient checkpointing or a torch checkpoint wrapper runs in reentrant mode."""
    for module in hf_model.modules():
        func = getattr(module, '_gradient_checkpointing_func', None)
        hf_reentrant = func is not None and getattr(module, 'gradient_checkpointing', False) and \
            (getattr(func, 'keywords', None) or {}).get('use_reentrant', True)
        impl = getattr(module, 'checkpoint_impl', None)
        wrapper_reentrant = impl is not None and getattr(impl, 'name', '') == 'REENTRANT'
        if hf_reentrant or wrapper_reentrant:
            raise ValueError('L0 masks need non-reentrant activation checkpointing (reentrant checkpointing drops the '
                             'gradients of the masks a layer reads): set fsdp_config.activation_checkpointing_reentrant: '
                             'false, or call gradient_checkpointing_enable(gradient_checkpointing_kwargs='
                             "{'use_reentrant': False})")


def remove_masks(hf_model: nn.Module) -> L0MaskModule:
    """Undo ``inject_masks``: drop the hooks and norm swaps; return the detached mask module."""
    mask_module = get_mask_module(hf_model)
    if mask_module is None:
        raise ValueError(f'{type(hf_model).__name__} carries no {MASK_MODULE_NAME}')
    for handle in getattr(hf_model, _HANDLES_ATTR, []):
        handle.remove()
    delattr(hf_model, _HANDLES_ATTR)
    for norm in getattr(hf_model, _SWAPPED_ATTR, []):
        norm.__dict__.pop('forward', None)
    hf_model.__dict__.pop(_SWAPPED_ATTR, None)
    del hf_model._modules[MASK_MODULE_NAME]
    mask_module.forward_masks = None
    hf_model.__dict__.pop(_CHECKED_ATTR, None)
    return mask_module
