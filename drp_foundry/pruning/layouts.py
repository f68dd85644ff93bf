"""One description per decoder family: where its prunable weights live and how they are cut.

A ``DecoderLayout`` says, for one Hugging Face ``model_type``, everything the pruning code
needs to know about that family; the sizes (``architecture.py``), the expected-size formula
(``expected_size.py``), the mask hooks (``hf_injection.py``), the fold-and-slice export
(``export.py``) and the importance scores (``importance.py``) read it and hold no family
special case of their own:

- module paths (relative to the ``*ForCausalLM``, its base model or one decoder layer) of the
  embedding, the final norm, the LM head, the attention and MLP projections and every norm;
- how each projection is sliced: an input projection stacks named row blocks (``q``, ``k``,
  ``v``, ``gate``, ``up``; a fused projection such as Phi-3's ``qkv_proj`` lists several), the
  output projections (``o_proj``, ``down_proj``) are cut in their input columns;
- the norm's form ``(offset + w) * x_hat`` (offset 0: Llama; 1: Gemma) and its eps attribute;
- which norms sit where: the two pre-norms that read the residual stream and, for sandwich
  families (Gemma 2/3), the norms that normalise a branch's output before the residual add;
- per-head q/k norms (Qwen3, Gemma 3: over ``head_dim``, shared by all heads; copied as is);
- the embedding scale computed from the config (Gemma: sqrt(hidden_size), so slicing hidden
  changes it and export compensates, see ``export.py``);
- biases (read from the config), and config fix-ups at export (Qwen2/3 ``max_window_layers``);
- what the family cannot express: granularities refused at INIT with the reason, targets its
  config cannot hold (``check_target(config, source, target)``: Phi-3 with ``rope_scaling``), and a
  warning when layer pruning changes a layer-index pattern (Gemma 2's sliding/global layers).

Layouts are registered by ``model_type``: the built-in ones below, any registered with
``register_layout()``, and any a package declares under the entry-point group
``drp_foundry_layouts`` (``mytype = mypkg.layouts:MY_LAYOUT``; the object is a
``DecoderLayout``). A model whose type has no layout is refused at INIT with the list of known
ones (``get_layout``).

Pure Python: no Composer or LLM-Foundry import (torch only for the module lookups).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Mapping, Sequence

__all__ = ['ENTRY_POINT_GROUP', 'NormForm', 'Projection', 'DecoderLayout', 'register_layout', 'get_layout',
           'registered_layouts', 'BUILTIN_LAYOUTS', 'ROLE_SIZES']

ENTRY_POINT_GROUP = 'drp_foundry_layouts'

# What each named row block of an input projection holds, as the DecoderArchitecture field that sizes it
# (times head_dim for the attention roles): q = H * d_h rows, k = v = G * d_h rows, gate = up = F rows.
ROLE_SIZES = {'q': 'num_heads', 'k': 'num_kv_heads', 'v': 'num_kv_heads', 'gate': 'intermediate_size',
              'up': 'intermediate_size'}
ATTENTION_ROLES = ('q', 'k', 'v')
MLP_ROLES = ('gate', 'up')

# Our size names -> the HF config attribute that holds them (the same in every built-in family).
STANDARD_CONFIG_KEYS = {'layers': 'num_hidden_layers', 'hidden': 'hidden_size', 'heads': 'num_attention_heads',
                        'kv_heads': 'num_key_value_heads', 'intermediate': 'intermediate_size',
                        'head_dim': 'head_dim', 'vocab': 'vocab_size', 'tie': 'tie_word_embeddings'}


@dataclass(frozen=True)
class NormForm:
    """An RMSNorm ``y = x / sqrt(mean(x^2) + eps) * (offset + weight)``.

    ``offset`` 0.0 is Llama's ``w * x_hat`` (weight starts at 1); 1.0 is Gemma's
    ``(1 + w) * x_hat`` (weight starts at 0). ``eps_attr`` is the module attribute holding eps
    (``variance_epsilon`` in Llama-like code, ``eps`` in Gemma). ``upcast_output``: the family
    multiplies the weight in float32 and casts the product (Gemma) rather than casting x_hat to
    the input dtype first (Llama).
    """

    offset: float = 0.0
    eps_attr: str = 'variance_epsilon'
    upcast_output: bool = False

    def fold(self, weight: Any, scale: Any) -> Any:
        """The weight ``w'`` with ``offset + w' = (offset + w) * scale`` (a per-dim scale folded into the norm)."""
        return (self.offset + weight) * scale - self.offset


@dataclass(frozen=True)
class Projection:
    """A linear layer inside a decoder layer whose output rows stack the row blocks ``parts``, in order.

    ``Projection('self_attn.q_proj', ('q',))``; Phi-3's fused ``Projection('self_attn.qkv_proj', ('q', 'k', 'v'))``.
    """

    path: str
    parts: tuple[str, ...]


def _no_biases(config: Any) -> tuple[bool, bool, bool]:
    return False, False, False


def _llama_biases(config: Any) -> tuple[bool, bool, bool]:
    attention = bool(getattr(config, 'attention_bias', False))
    return attention, attention, bool(getattr(config, 'mlp_bias', False))


def _attention_flag_biases(config: Any) -> tuple[bool, bool, bool]:
    attention = bool(getattr(config, 'attention_bias', False))
    return attention, attention, False


def _qwen2_biases(config: Any) -> tuple[bool, bool, bool]:
    return True, False, False


def _phi3_rope_check(config: Any, arch: Any, target: Any) -> None:
    """Phi-3 checks a ``rope_scaling``'s factor lists against ``hidden_size // num_attention_heads`` (not head_dim)."""
    if getattr(config, 'rope_scaling', None) is None:
        return
    factor = getattr(config, 'partial_rotary_factor', 1.0)
    source_dims = int(config.hidden_size // config.num_attention_heads * factor)
    if int(target.hidden // target.heads * factor) != source_dims:
        raise ValueError(f'phi3 with rope_scaling ({config.rope_scaling.get("type")}): Phi3Config checks the rope '
                         f'factor lists against hidden_size // num_attention_heads (not head_dim), so the pruned '
                         f'config would not load unless target.hidden // target.heads == {arch.head_dim}; got '
                         f'{target.hidden} // {target.heads} = {target.hidden // target.heads}. Prune hidden and heads '
                         f'together, e.g. hidden = {arch.head_dim} * heads')


def _sqrt_hidden(config: Any) -> float:
    return math.sqrt(config.hidden_size)


def _keep_window_split(new_config: Any, source_config: Any, kept_layers: Sequence[int]) -> None:
    """Qwen2/Qwen3: layers from index ``max_window_layers`` on may use a sliding window; keep that split."""
    split = getattr(source_config, 'max_window_layers', None)
    if split is not None:
        new_config.max_window_layers = sum(1 for layer in kept_layers if layer < split)


@dataclass(frozen=True)
class DecoderLayout:
    """Where the prunable weights of one decoder family live and how each is cut (module doc).

    Paths: ``base_model`` relative to the ``*ForCausalLM``; ``layers``, ``embedding``,
    ``final_norm`` relative to the base model; ``lm_head`` relative to the ``*ForCausalLM``;
    everything else relative to one decoder layer.

    Mask placement (docs/DESIGN.md "Masks") follows from the norms: the layer and hidden masks
    multiply what a branch adds to the residual stream. Without a branch-output norm that is
    the output of ``attention_output`` / ``mlp_output``; with one (``attention_output_norm`` /
    ``mlp_output_norm``, Gemma's sandwich norms) it is that norm's output, and the projection
    output only gets the hidden 0/1 indicator, so the norm's statistics run over the kept dims.
    """

    model_type: str
    base_model: str = 'model'
    layers: str = 'layers'
    embedding: str = 'embed_tokens'
    final_norm: str = 'norm'
    lm_head: str = 'lm_head'
    attention_inputs: tuple[Projection, ...] = (Projection('self_attn.q_proj', ('q',)),
                                                Projection('self_attn.k_proj', ('k',)),
                                                Projection('self_attn.v_proj', ('v',)))
    attention_output: str = 'self_attn.o_proj'
    mlp_inputs: tuple[Projection, ...] = (Projection('mlp.gate_proj', ('gate',)), Projection('mlp.up_proj', ('up',)))
    mlp_output: str = 'mlp.down_proj'
    attention_norm: str = 'input_layernorm'
    mlp_norm: str = 'post_attention_layernorm'
    attention_output_norm: str | None = None
    mlp_output_norm: str | None = None
    head_norms: tuple[str, ...] = ()
    norm: NormForm = NormForm()
    embedding_scale: Callable[[Any], float] | None = None
    biases: Callable[[Any], tuple[bool, bool, bool]] = _no_biases
    config_keys: Mapping[str, str] = field(default_factory=lambda: dict(STANDARD_CONFIG_KEYS))
    fix_config: Callable[[Any, Any, Sequence[int]], None] | None = None
    layer_pruning_limit: str | None = None
    unsupported: Mapping[str, str] = field(default_factory=dict)
    check_target: Callable[[Any, Any, Any], None] | None = None

    def __post_init__(self):
        roles = [role for projection in self.attention_inputs for role in projection.parts]
        if sorted(roles) != sorted(ATTENTION_ROLES):
            raise ValueError(f'layout {self.model_type!r}: attention_inputs must hold the row blocks q, k, v once '
                             f'each, got {roles}')
        roles = [role for projection in self.mlp_inputs for role in projection.parts]
        if sorted(roles) != sorted(MLP_ROLES):
            raise ValueError(f'layout {self.model_type!r}: mlp_inputs must hold the row blocks gate, up once each, '
                             f'got {roles}')
        if (self.attention_output_norm is None) != (self.mlp_output_norm is None):
            raise ValueError(f'layout {self.model_type!r}: give both branch-output norms or neither')
        missing = sorted(set(STANDARD_CONFIG_KEYS) - set(self.config_keys))
        if missing:
            raise ValueError(f'layout {self.model_type!r}: config_keys lacks {missing}')

    # --- derived facts ----------------------------------------------------------------------
    @property
    def sandwich(self) -> bool:
        """Branch outputs pass a norm before the residual add (Gemma 2/3)."""
        return self.attention_output_norm is not None

    def stream_norms(self) -> tuple[str, ...]:
        """The per-layer norms that read the residual stream (their output * z_hidden)."""
        return (self.attention_norm, self.mlp_norm)

    def branch_output_norms(self) -> tuple[str, ...]:
        """The per-layer norms that normalise a branch output (their output * z_layer * z_hidden)."""
        return (self.attention_output_norm, self.mlp_output_norm) if self.sandwich else ()

    def layer_norms(self) -> tuple[str, ...]:
        return self.stream_norms() + self.branch_output_norms()

    def config_value(self, config: Any, key: str, default: Any = None) -> Any:
        return getattr(config, self.config_keys[key], default)

    # --- module lookups ---------------------------------------------------------------------
    def base(self, hf_model: Any) -> Any:
        return hf_model.get_submodule(self.base_model)

    def decoder_layers(self, hf_model: Any) -> Any:
        from torch import nn

        try:
            layers = self.base(hf_model).get_submodule(self.layers)
        except AttributeError as error:
            raise TypeError(f'{type(hf_model).__name__} has no {self.base_model}.{self.layers} (layout '
                            f'{self.model_type!r}); pass the HF *ForCausalLM itself (ComposerHFCausalLM.model)') \
                from error
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f'{type(hf_model).__name__}.{self.base_model}.{self.layers} is not a ModuleList')
        return layers

    def all_norms(self, hf_model: Any) -> list[Any]:
        """Every hidden-width norm module: the per-layer ones and the final norm."""
        norms = [layer.get_submodule(name) for layer in self.decoder_layers(hf_model) for name in self.layer_norms()]
        norms.append(self.base(hf_model).get_submodule(self.final_norm))
        return norms

    # --- state-dict keys (export) -----------------------------------------------------------
    def base_key(self, name: str) -> str:
        return f'{self.base_model}.{name}' if self.base_model else name

    def layer_key(self, index: int, name: str) -> str:
        return self.base_key(f'{self.layers}.{index}.{name}')

    # --- checks -----------------------------------------------------------------------------
    def check_granularities(self, granularities: Sequence[str], pruned: Sequence[str] = ()) -> None:
        """Refuse a pruned granularity this family cannot express; warn where layer pruning is only exact up to
        a limit. ``pruned``: the granularities whose target is below the source (a mask that keeps every entry
        only rescales, which every family can fold)."""
        refused = [key for key in pruned if key in self.unsupported]
        if refused:
            reasons = '; '.join(f'{key}: {self.unsupported[key]}' for key in refused)
            raise ValueError(f'{self.model_type} models cannot prune {refused} ({reasons}); keep the target of '
                             f'{refused} at the source size')
        if 'layer' in pruned and self.layer_pruning_limit:
            warnings.warn(f'{self.model_type}: {self.layer_pruning_limit}', stacklevel=3)

    def check_model(self, hf_model: Any, arch: Any) -> None:
        """Raise ``ValueError`` naming the path when ``hf_model`` does not match this layout (wrong or missing
        module, projection of the wrong shape, norm without the eps attribute)."""
        layers = self.decoder_layers(hf_model)
        if len(layers) != arch.num_layers:
            raise ValueError(f'{self.model_type}: {len(layers)} decoder layers, the config says {arch.num_layers}')
        base = self.base(hf_model)
        d = arch.hidden_size

        def module(owner, path, where):
            try:
                return owner.get_submodule(path)
            except AttributeError as error:
                raise ValueError(f'layout {self.model_type!r} names {where}{path}, which this '
                                 f'{type(hf_model).__name__} does not have; the layout does not describe this model'
                                 ) from error

        def expect(weight, shape, where):
            if tuple(weight.shape) != tuple(shape):
                raise ValueError(f'layout {self.model_type!r}: {where} has shape {tuple(weight.shape)}, the layout '
                                 f'implies {tuple(shape)}')

        expect(module(base, self.embedding, f'{self.base_model}.').weight, (arch.vocab_size, d),
               f'{self.base_model}.{self.embedding}')
        for index, layer in enumerate(layers):
            where = f'{self.base_model}.{self.layers}.{index}.'
            for projection in self.attention_inputs + self.mlp_inputs:
                rows = sum(self.role_rows(arch, role) for role in projection.parts)
                expect(module(layer, projection.path, where).weight, (rows, d), where + projection.path)
            expect(module(layer, self.attention_output, where).weight, (d, arch.num_heads * arch.head_dim),
                   where + self.attention_output)
            expect(module(layer, self.mlp_output, where).weight, (d, arch.intermediate_size),
                   where + self.mlp_output)
            for name in self.layer_norms():
                norm = module(layer, name, where)
                expect(norm.weight, (d,), where + name)
                if not hasattr(norm, self.norm.eps_attr):
                    raise ValueError(f'layout {self.model_type!r}: norm {where}{name} has no {self.norm.eps_attr!r} '
                                     f'attribute (the norm form says where eps lives)')
            for name in self.head_norms:
                expect(module(layer, name, where).weight, (arch.head_dim,), where + name)
        final = module(base, self.final_norm, f'{self.base_model}.')
        expect(final.weight, (d,), f'{self.base_model}.{self.final_norm}')

    @staticmethod
    def role_rows(arch: Any, role: str) -> int:
        """Rows of the row block ``role`` in the source architecture."""
        count = getattr(arch, ROLE_SIZES[role])
        return count * arch.head_dim if role in ATTENTION_ROLES else count


# --- the built-in families ------------------------------------------------------------------
_GEMMA_NORM = NormForm(offset=1.0, eps_attr='eps', upcast_output=True)
_GEMMA2_LAYER_LIMIT = ('Gemma 2 alternates sliding-window attention (even layer index) and global attention (odd) '
                       'by layer index; the exported model renumbers the kept layers, so a kept layer whose index '
                       'parity changes changes kind. Masked and exported models agree exactly on sequences up to '
                       'sliding_window tokens and may differ beyond it.')

BUILTIN_LAYOUTS: dict[str, DecoderLayout] = {
    layout.model_type: layout for layout in (
        DecoderLayout('llama', biases=_llama_biases),
        DecoderLayout('mistral'),
        DecoderLayout('qwen2', biases=_qwen2_biases, fix_config=_keep_window_split),
        DecoderLayout('qwen3', biases=_attention_flag_biases, head_norms=('self_attn.q_norm', 'self_attn.k_norm'),
                      fix_config=_keep_window_split),
        # Granite: Llama plus constant embedding / residual / attention multipliers and logits scaling
        DecoderLayout('granite', biases=_llama_biases),
        DecoderLayout('phi3', attention_inputs=(Projection('self_attn.qkv_proj', ('q', 'k', 'v')),),
                      mlp_inputs=(Projection('mlp.gate_up_proj', ('gate', 'up')),), check_target=_phi3_rope_check),
        DecoderLayout('gemma', norm=_GEMMA_NORM, embedding_scale=_sqrt_hidden, biases=_attention_flag_biases),
        DecoderLayout('gemma2', norm=_GEMMA_NORM, embedding_scale=_sqrt_hidden, biases=_attention_flag_biases,
                      mlp_norm='pre_feedforward_layernorm', attention_output_norm='post_attention_layernorm',
                      mlp_output_norm='post_feedforward_layernorm', layer_pruning_limit=_GEMMA2_LAYER_LIMIT),
        DecoderLayout('gemma3_text', norm=_GEMMA_NORM, embedding_scale=_sqrt_hidden, biases=_attention_flag_biases,
                      mlp_norm='pre_feedforward_layernorm', attention_output_norm='post_attention_layernorm',
                      mlp_output_norm='post_feedforward_layernorm',
                      head_norms=('self_attn.q_norm', 'self_attn.k_norm'),
                      unsupported={'layer': 'Gemma 3 picks sliding-window attention and its local RoPE base by '
                                            'layer index (every sliding_window_pattern-th layer is global), so '
                                            'dropping layers changes the positional encoding of the kept ones; '
                                            'a stock Gemma 3 config cannot express the pruned model'}),
    )
}

_REGISTERED: dict[str, DecoderLayout] = {}


def register_layout(layout: DecoderLayout, replace: bool = False) -> DecoderLayout:
    """Make ``layout`` known for its ``model_type`` (in this process). Returns it."""
    if not isinstance(layout, DecoderLayout):
        raise TypeError(f'register_layout takes a DecoderLayout, got {type(layout).__name__}')
    known = layout.model_type in _REGISTERED or layout.model_type in BUILTIN_LAYOUTS
    if known and not replace and registered_layouts().get(layout.model_type) != layout:
        raise ValueError(f'a layout for model_type {layout.model_type!r} is already registered; pass replace=True '
                         f'to override it')
    _REGISTERED[layout.model_type] = layout
    return layout


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def registered_layouts() -> dict[str, DecoderLayout | metadata.EntryPoint]:
    """model_type -> layout (built-in or ``register_layout``) or entry point (loaded on first use)."""
    found: dict[str, Any] = dict(BUILTIN_LAYOUTS)
    for entry_point in _entry_points():
        found[entry_point.name] = entry_point
    found.update(_REGISTERED)
    return found


def get_layout(model_type: str | None) -> DecoderLayout:
    """The layout of ``model_type``; ``ValueError`` naming the known families when there is none."""
    found = registered_layouts()
    layout = found.get(model_type)
    if layout is None:
        raise ValueError(f'structured pruning has no layout for HF model_type {model_type!r}; known families: '
                         f'{sorted(found)}. A new family is a DecoderLayout registered with '
                         f'drp_foundry.pruning.layouts.register_layout or under the entry-point group '
                         f'{ENTRY_POINT_GROUP!r} (docs/DESIGN.md, "Add a model family")')
    if not isinstance(layout, DecoderLayout):  # an entry point (stdlib's or importlib_metadata's class)
        loaded = layout.load()
        if not isinstance(loaded, DecoderLayout):
            raise ValueError(f'entry point {layout.name} = {layout.value} in {ENTRY_POINT_GROUP!r} is not a '
                             f'DecoderLayout ({type(loaded).__name__})')
        if loaded.model_type != model_type:
            loaded = dataclasses.replace(loaded, model_type=model_type)
        layout = loaded
    return layout
