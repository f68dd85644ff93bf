"""A small decoder family that lives outside drp_foundry, with its own module names, config keys and a fused
K/V projection, plus the ``DecoderLayout`` that describes it (tests/test_outside_family.py registers it).

``drp_toy``: pre-norm blocks ``ln1 -> attn (wq, wkv = [k | v], wo) -> + ; ln2 -> ffn (w1 gate, w3 up, w2 down)
-> +``, causal GQA softmax attention without position encoding, an RMSNorm ``w * x_hat`` whose eps is in
``epsilon``, untied output head ``out``. Config keys: ``n_layers``, ``d_model``, ``n_heads``, ``n_kv_heads``,
``d_ff``, ``head_dim`` (None: d_model / n_heads).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from drp_foundry.pruning.layouts import DecoderLayout, NormForm, Projection


class ToyConfig(PretrainedConfig):
    model_type = 'drp_toy'

    def __init__(self, vocab_size=128, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, head_dim=None,
                 epsilon=1e-5, **kwargs):
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.n_kv_heads, self.d_ff, self.head_dim, self.epsilon = n_kv_heads, d_ff, head_dim, epsilon
        kwargs.setdefault('tie_word_embeddings', False)
        super().__init__(**kwargs)


class ToyNorm(nn.Module):
    def __init__(self, width, epsilon):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.epsilon = epsilon

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon))


class ToyAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim or config.d_model // config.n_heads
        self.wq = nn.Linear(config.d_model, self.heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(config.d_model, 2 * self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.heads * self.head_dim, config.d_model, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class ToyFFN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w3 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class ToyBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln1, self.ln2 = ToyNorm(config.d_model, config.epsilon), ToyNorm(config.d_model, config.epsilon)
        self.attn, self.ffn = ToyAttention(config), ToyFFN(config)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.attn(self.ln1(hidden_states))
        return hidden_states + self.ffn(self.ln2(hidden_states))


class ToyModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(ToyBlock(config) for _ in range(config.n_layers))
        self.ln_f = ToyNorm(config.d_model, config.epsilon)

    def forward(self, input_ids):
        hidden_states = self.wte(input_ids)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class ToyForCausalLM(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = 'transformer'

    def __init__(self, config):
        super().__init__(config)
        self.transformer = ToyModel(config)
        self.out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.05)

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.out

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        logits = self.out(self.transformer(input_ids))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


AutoConfig.register('drp_toy', ToyConfig, exist_ok=True)
AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)

TOY_LAYOUT = DecoderLayout(
    'drp_toy', base_model='transformer', layers='blocks', embedding='wte', final_norm='ln_f', lm_head='out',
    attention_inputs=(Projection('attn.wq', ('q',)), Projection('attn.wkv', ('k', 'v'))),
    attention_output='attn.wo',
    mlp_inputs=(Projection('ffn.w1', ('gate',)), Projection('ffn.w3', ('up',))), mlp_output='ffn.w2',
    attention_norm='ln1', mlp_norm='ln2', norm=NormForm(offset=0.0, eps_attr='epsilon'),
    config_keys={'layers': 'n_layers', 'hidden': 'd_model', 'heads': 'n_heads', 'kv_heads': 'n_kv_heads',
                 'intermediate': 'd_ff', 'head_dim': 'head_dim', 'vocab': 'vocab_size', 'tie': 'tie_word_embeddings'})
