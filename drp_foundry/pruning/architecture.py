"""Sizes of a decoder (any family with a ``DecoderLayout``) and of the target a pruning run aims for.

``DecoderArchitecture`` holds what fixes the parameter count of a stock Hugging Face
decoder (L layers, hidden D, H query heads over G KV heads of dim d_h, FFN size F,
vocabulary V, biases, tied embeddings, norms per layer, per-head q/k norms), read from the
config through the family's layout (``pruning/layouts.py``); ``count_parameters()`` equals
``sum(p.numel() for p in model.parameters())`` of the HF model (a tied embedding once).

``TargetArchitecture`` is the pruning target (layers, hidden, heads, kv_heads,
intermediate). We prune whole KV groups (docs/DESIGN.md), so a target keeps the head
dimension and the query-per-KV ratio: ``heads * G == kv_heads * H``.

Pure python/torch: no Composer or LLM-Foundry import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from drp_foundry.pruning.layouts import get_layout

__all__ = ['DecoderArchitecture', 'TargetArchitecture', 'validate_target']


@dataclass(frozen=True)
class DecoderArchitecture:
    """The sizes of a stock HF decoder-only model.

    ``attention_bias``: q/k/v projections carry a bias (Qwen2 always; Llama when its
    ``attention_bias`` flag is set). ``o_proj_bias``: o_proj carries one (Llama's flag only).
    ``mlp_bias``: gate/up/down carry biases (Llama's ``mlp_bias`` flag). ``layer_norms``:
    hidden-width norms per layer (2; 4 with Gemma's sandwich norms). ``head_norms``: norms
    over ``head_dim`` per layer (Qwen3's and Gemma 3's q_norm and k_norm: 2).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    model_type: str = 'llama'
    layer_norms: int = 2
    head_norms: int = 0

    def __post_init__(self):
        for name in ('num_layers', 'hidden_size', 'num_heads', 'num_kv_heads', 'head_dim', 'intermediate_size',
                     'vocab_size'):
            if getattr(self, name) < 1:
                raise ValueError(f'DecoderArchitecture.{name} must be >= 1, got {getattr(self, name)}')
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})')

    @property
    def heads_per_group(self) -> int:
        """H / G: query heads sharing one KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> 'DecoderArchitecture':
        """Read a HF config through its family's layout (``pruning/layouts.py``); unknown families are refused."""
        model_type = getattr(config, 'model_type', None)
        try:
            layout = get_layout(model_type)
        except ValueError as error:
            raise ValueError(f'{error} (config {type(config).__name__})') from None
        value = layout.config_value
        hidden = value(config, 'hidden')
        num_heads = value(config, 'heads')
        missing = [layout.config_keys[key] for key in ('layers', 'hidden', 'heads', 'intermediate', 'vocab')
                   if value(config, key) is None]
        if missing:
            raise ValueError(f'{model_type} config {type(config).__name__} lacks {missing}; the {model_type} layout '
                             f'reads the sizes from these keys')
        num_kv_heads = value(config, 'kv_heads') or num_heads
        head_dim = value(config, 'head_dim') or hidden // num_heads
        attention_bias, o_proj_bias, mlp_bias = layout.biases(config)
        return cls(num_layers=value(config, 'layers'), hidden_size=hidden, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, head_dim=head_dim, intermediate_size=value(config, 'intermediate'),
                   vocab_size=value(config, 'vocab'), tie_word_embeddings=bool(value(config, 'tie', False)),
                   attention_bias=attention_bias, o_proj_bias=o_proj_bias, mlp_bias=mlp_bias, model_type=model_type,
                   layer_norms=len(layout.layer_norms()), head_norms=len(layout.head_norms))

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: its norms, attention, gated MLP."""
        d, q_width, kv_width, f = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        norms = self.layer_norms * d + self.head_norms * self.head_dim
        attention = d * q_width + 2 * d * kv_width + q_width * d
        if self.attention_bias:
            attention += q_width + 2 * kv_width
        if self.o_proj_bias:
            attention += d
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        return norms + attention + mlp

    def count_parameters(self) -> int:
        """Exact parameter count of the HF model (a tied LM head counted once)."""
        embeddings = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        final_norm = self.hidden_size
        return embeddings + lm_head + final_norm + self.num_layers * self.layer_parameters()

    def pruned(self, target: 'TargetArchitecture') -> 'DecoderArchitecture':
        """The architecture after pruning to ``target`` (same head_dim, vocabulary, biases)."""
        validate_target(self, target)
        return dataclasses.replace(self, num_layers=target.layers, hidden_size=target.hidden, num_heads=target.heads,
                                   num_kv_heads=target.kv_heads, intermediate_size=target.intermediate)

    def target(self) -> 'TargetArchitecture':
        """This architecture as a (no-op) pruning target."""
        return TargetArchitecture(layers=self.num_layers, hidden=self.hidden_size, heads=self.num_heads,
                                  kv_heads=self.num_kv_heads, intermediate=self.intermediate_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> 'DecoderArchitecture':
        """From ``to_dict`` (checkpoints' mask extra state). Records written before ``layer_norms`` /
        ``head_norms`` existed are Llama/Mistral/Qwen2 ones: 2 norms per layer, no head norms (the defaults)."""
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f'architecture record has unknown keys {unknown}: it was written by a newer '
                             f'drp-foundry; export or resume it with that version')
        return cls(**values)


@dataclass(frozen=True)
class TargetArchitecture:
    """Pruning target: layers, hidden, (query) heads, KV heads, FFN intermediate size.

    ``kv_heads`` may be left out (None): it is then derived from ``heads`` and the source's
    query-per-KV ratio by ``resolve``.
    """

    layers: int
    hidden: int
    heads: int
    intermediate: int
    kv_heads: int | None = None

    KEYS = ('layers', 'hidden', 'heads', 'kv_heads', 'intermediate')

    @classmethod
    def from_config(cls, values: Mapping[str, Any], key_prefix: str = 'target') -> 'TargetArchitecture':
        """Build from a config mapping, naming the offending key on error."""
        values = dict(values)
        unknown = sorted(set(values) - set(cls.KEYS))
        if unknown:
            raise ValueError(f'{key_prefix}: unknown keys {unknown}; allowed keys are {list(cls.KEYS)}')
        missing = [k for k in ('layers', 'hidden', 'heads', 'intermediate') if values.get(k) is None]
        if missing:
            raise ValueError(f'{key_prefix}: missing keys {missing}; give the target layers, hidden, heads, '
                             f'intermediate (and kv_heads for GQA models)')
        for k, v in values.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f'{key_prefix}.{k} must be an integer, got {v!r}')
        return cls(**values)

    def resolve(self, source: DecoderArchitecture, key_prefix: str = 'target') -> 'TargetArchitecture':
        """Fill ``kv_heads`` from the source ratio when absent, then validate against ``source``."""
        target = self
        if self.kv_heads is None:
            if self.heads % source.heads_per_group:
                raise ValueError(f'{key_prefix}.heads={self.heads} is not a multiple of the source query-per-KV ratio '
                                 f'{source.heads_per_group} ({source.num_heads} heads / {source.num_kv_heads} KV '
                                 f'heads); whole KV groups are pruned, so choose heads as a multiple of it')
            target = dataclasses.replace(self, kv_heads=self.heads // source.heads_per_group)
        validate_target(source, target, key_prefix)
        return target

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_target(source: DecoderArchitecture, target: TargetArchitecture, key_prefix: str = 'target') -> None:
    """Raise ``ValueError`` naming the key when ``target`` cannot be reached from ``source``."""
    if target.kv_heads is None:
        raise ValueError(f'{key_prefix}.kv_heads is unset; call TargetArchitecture.resolve(source) first')
    limits = {'layers': source.num_layers, 'hidden': source.hidden_size, 'heads': source.num_heads,
              'kv_heads': source.num_kv_heads, 'intermediate': source.intermediate_size}
    for key, limit in limits.items():
        value = getattr(target, key)
        if value < 1:
            raise ValueError(f'{key_prefix}.{key}={value} must be >= 1')
        if value > limit:
            raise ValueError(f'{key_prefix}.{key}={value} exceeds the source model ({limit}); pruning only removes '
                             f'structures, so set {key_prefix}.{key} <= {limit}')
    if target.heads * source.num_kv_heads != target.kv_heads * source.num_heads:
        raise ValueError(f'{key_prefix}.heads={target.heads} / {key_prefix}.kv_heads={target.kv_heads} breaks the '
                         f'source GQA ratio {source.num_heads}/{source.num_kv_heads}: whole KV groups are pruned, so '
                         f'heads must equal kv_heads * {source.heads_per_group}')
