"""Architecture sizes, target validation, and the expected-size formula against real HF models."""

import pytest
import torch
from conftest import tiny_gqa_config, tiny_llama_config
from transformers import (  # imported here: a first import inside torch.device('meta') breaks torch._dynamo
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,  # noqa: F401
    MistralConfig,
    MistralForCausalLM,  # noqa: F401
    Qwen2ForCausalLM,  # noqa: F401
)

from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture, validate_target
from drp_foundry.pruning.expected_size import expected_fractions, expected_num_parameters, target_fractions
from drp_foundry.pruning.mask_module import L0MaskModule


def hf_parameter_count(config) -> int:
    """Parameters of the real HF model, built on the meta device (no memory, any size)."""
    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def pruned_config(config, arch: DecoderArchitecture, target: TargetArchitecture):
    """A stock HF config of the pruned model, built by hand (head_dim kept explicitly)."""
    values = config.to_dict()
    values.update(num_hidden_layers=target.layers, hidden_size=target.hidden, num_attention_heads=target.heads,
                  num_key_value_heads=target.kv_heads, intermediate_size=target.intermediate, head_dim=arch.head_dim)
    return type(config).from_dict(values)


SOURCE_CONFIGS = {
    'llama': tiny_llama_config(),
    'qwen2_gqa_tied': tiny_gqa_config(),
    'llama_biases_gqa': tiny_llama_config(attention_bias=True, mlp_bias=True, num_key_value_heads=2),
    'llama_tied_head_dim': tiny_llama_config(tie_word_embeddings=True, head_dim=24),
    'mistral_gqa': MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64),
}


@pytest.mark.parametrize('name', sorted(SOURCE_CONFIGS))
def test_count_parameters_equals_hf_model(name):
    config = SOURCE_CONFIGS[name]
    arch = DecoderArchitecture.from_hf_config(config)
    assert arch.count_parameters() == hf_parameter_count(config)


def test_flags_read_from_configs():
    qwen = DecoderArchitecture.from_hf_config(tiny_gqa_config())
    assert (qwen.attention_bias, qwen.o_proj_bias, qwen.mlp_bias, qwen.tie_word_embeddings) == (True, False, False, True)
    assert (qwen.num_heads, qwen.num_kv_heads, qwen.head_dim, qwen.heads_per_group) == (6, 2, 16, 3)
    llama = DecoderArchitecture.from_hf_config(SOURCE_CONFIGS['llama_biases_gqa'])
    assert (llama.attention_bias, llama.o_proj_bias, llama.mlp_bias) == (True, True, True)


def test_unsupported_family_is_named():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="'gpt2'"):
        DecoderArchitecture.from_hf_config(GPT2Config())


def test_llama2_7b_to_sheared_1_3b_counts():
    source_config = LlamaConfig()  # the defaults are Llama-2-7B's sizes
    source = DecoderArchitecture.from_hf_config(source_config)
    assert source.count_parameters() == 6_738_415_616 == hf_parameter_count(source_config)
    target = TargetArchitecture.from_config({'layers': 24, 'hidden': 2048, 'heads': 16, 'intermediate': 5504})
    target = target.resolve(source)
    assert target.kv_heads == 16
    pruned = source.pruned(target)
    # hand count: untied embeddings + LM head, final norm, 24 x (4 attention mats, 3 MLP mats, 2 norms)
    hand = 2 * 32000 * 2048 + 2048 + 24 * (4 * 2048 * 2048 + 3 * 2048 * 5504 + 2 * 2048)
    assert pruned.count_parameters() == hand == hf_parameter_count(pruned_config(source_config, source, target))


TARGETS = {
    'llama': [dict(layers=2, hidden=32, heads=2, kv_heads=2, intermediate=64),
              dict(layers=3, hidden=48, heads=1, kv_heads=1, intermediate=100),
              dict(layers=4, hidden=64, heads=4, kv_heads=4, intermediate=128)],
    'qwen2_gqa_tied': [dict(layers=2, hidden=48, heads=3, kv_heads=1, intermediate=80),
                       dict(layers=3, hidden=96, heads=6, kv_heads=2, intermediate=17)],
    'llama_biases_gqa': [dict(layers=1, hidden=40, heads=2, kv_heads=1, intermediate=33),
                         dict(layers=3, hidden=64, heads=4, kv_heads=2, intermediate=128)],
    'llama_tied_head_dim': [dict(layers=2, hidden=50, heads=3, kv_heads=3, intermediate=64)],
    'mistral_gqa': [dict(layers=2, hidden=40, heads=4, kv_heads=1, intermediate=50)],
}


@pytest.mark.parametrize('name,target_index', [(n, i) for n in sorted(TARGETS) for i in range(len(TARGETS[n]))])
def test_expected_size_at_deterministic_masks_equals_pruned_hf_model(name, target_index):
    config = SOURCE_CONFIGS[name]
    source = DecoderArchitecture.from_hf_config(config)
    target = TargetArchitecture(**TARGETS[name][target_index])
    masks = L0MaskModule(source, target)
    generator = torch.Generator().manual_seed(target_index)
    with torch.no_grad():  # random scores so that kept entries differ between layers
        for log_alpha in masks.mask_parameters():
            log_alpha.copy_(torch.randn(log_alpha.shape, generator=generator) * 2)
    deterministic = masks.deterministic('target')
    indicators = {key: (mask != 0).float() for key, mask in deterministic.items()}
    real = hf_parameter_count(pruned_config(config, source, target))
    assert expected_num_parameters(source, indicators).item() == pytest.approx(real, abs=0.5)
    assert source.pruned(target).count_parameters() == real
    fractions = expected_fractions(source, indicators)
    for key, value in target_fractions(source, target).items():
        assert torch.allclose(fractions[key], torch.full_like(fractions[key], value), atol=1e-6), key  # every layer


def test_expected_size_is_exact_expectation_and_differentiable():
    source = DecoderArchitecture.from_hf_config(tiny_gqa_config())
    masks = L0MaskModule(source, TargetArchitecture(layers=2, hidden=48, heads=3, intermediate=80))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for log_alpha in masks.mask_parameters():
            log_alpha.copy_(torch.randn(log_alpha.shape, generator=generator))
    probs = masks.prob_nonzero()
    # Monte-Carlo over independent Bernoulli keep indicators equals the closed form, within
    # four standard errors of the Monte-Carlo mean
    draws = torch.tensor([expected_num_parameters(source, {k: (torch.rand(p.shape, generator=generator) < p).float()
                                                           for k, p in probs.items()}).item() for _ in range(3000)],
                         dtype=torch.float64)
    closed = masks.expected_num_parameters()
    standard_error = draws.std().item() / len(draws) ** 0.5
    assert abs(draws.mean().item() - closed.item()) < 4 * standard_error
    closed.backward()
    for log_alpha in masks.mask_parameters():
        assert log_alpha.grad is not None and log_alpha.grad.abs().sum() > 0


def test_missing_granularity_counts_as_unpruned():
    source = DecoderArchitecture.from_hf_config(tiny_llama_config())
    assert expected_num_parameters(source, {}).item() == source.count_parameters()
    with pytest.raises(ValueError, match='shape'):
        expected_num_parameters(source, {'hidden': torch.ones(3)})


@pytest.mark.parametrize('values,message', [
    (dict(layers=5, hidden=32, heads=2, kv_heads=2, intermediate=64), r'target\.layers=5 exceeds'),
    (dict(layers=2, hidden=65, heads=2, kv_heads=2, intermediate=64), r'target\.hidden=65 exceeds'),
    (dict(layers=2, hidden=32, heads=2, kv_heads=2, intermediate=0), r'target\.intermediate=0 must be >= 1'),
    (dict(layers=2, hidden=32, heads=5, kv_heads=5, intermediate=64), r'target\.heads=5 exceeds'),
])
def test_bad_llama_targets_name_the_key(values, message):
    source = DecoderArchitecture.from_hf_config(tiny_llama_config())
    with pytest.raises(ValueError, match=message):
        validate_target(source, TargetArchitecture(**values))


def test_gqa_ratio_is_enforced():
    source = DecoderArchitecture.from_hf_config(tiny_gqa_config())  # 6 heads over 2 KV heads
    with pytest.raises(ValueError, match=r'target\.heads=4 / target\.kv_heads=1 breaks'):
        validate_target(source, TargetArchitecture(layers=2, hidden=48, heads=4, kv_heads=1, intermediate=80))
    with pytest.raises(ValueError, match=r'target\.heads=4 is not a multiple'):
        TargetArchitecture(layers=2, hidden=48, heads=4, intermediate=80).resolve(source)
    assert TargetArchitecture(layers=2, hidden=48, heads=3, intermediate=80).resolve(source).kv_heads == 1


def test_target_config_keys_are_checked():
    with pytest.raises(ValueError, match=r"unknown keys \['layer'\]"):
        TargetArchitecture.from_config({'layer': 2, 'hidden': 3, 'heads': 1, 'intermediate': 4})
    with pytest.raises(ValueError, match=r"missing keys \['intermediate'\]"):
        TargetArchitecture.from_config({'layers': 2, 'hidden': 3, 'heads': 1})
    with pytest.raises(ValueError, match=r'target\.hidden must be an integer'):
        TargetArchitecture.from_config({'layers': 2, 'hidden': 0.5, 'heads': 1, 'intermediate': 4})


def test_disabled_granularity_cannot_be_pruned():
    source = DecoderArchitecture.from_hf_config(tiny_llama_config())
    target = TargetArchitecture(layers=2, hidden=64, heads=4, kv_heads=4, intermediate=128)
    with pytest.raises(ValueError, match=r"prunes 'layer'.*switched off"):
        L0MaskModule(source, target, granularities=('hidden', 'head'))
    masks = L0MaskModule(source, target, granularities=('layer',))
    assert masks.granularities == ('layer',)
    assert set(masks.target_sizes()) == {'layer'}
