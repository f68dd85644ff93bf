"""Masks in a stock HF model: identity at all-ones, the contract's semantics, eval/train modes,
activation checkpointing, and state-dict round trips."""

import copy

import pytest
import torch
from conftest import tiny_gqa_config, tiny_llama_config
from transformers import AutoModelForCausalLM

from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.hf_injection import inject_masks, remove_masks
from drp_foundry.pruning.mask_module import L0MaskModule

CONFIGS = {'llama': tiny_llama_config, 'gqa': tiny_gqa_config}


def build(name, attn='sdpa', seed=0, **overrides):
    torch.manual_seed(seed)
    config = CONFIGS[name](**overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def small_target(arch: DecoderArchitecture) -> TargetArchitecture:
    return TargetArchitecture(layers=arch.num_layers - 1, hidden=arch.hidden_size // 2, heads=arch.heads_per_group,
                              kv_heads=1, intermediate=arch.intermediate_size // 2)


def attach(model, seed=0, spread=1.0):
    arch = DecoderArchitecture.from_hf_config(model.config)
    masks = L0MaskModule(arch, small_target(arch))
    masks.noise_seed = seed  # the mask noise has its own counter-based generator
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for log_alpha in masks.mask_parameters():
            log_alpha.copy_(torch.randn(log_alpha.shape, generator=generator) * spread)
    inject_masks(model, masks)
    return masks


def tokens(seed=0, batch=2, length=12):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def ones_like_masks(masks: L0MaskModule):
    return {key: torch.ones_like(masks.log_alpha(key)) for key in masks.granularities}


@pytest.mark.parametrize('name', ['llama', 'gqa'])
@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
def test_all_ones_masks_reproduce_the_unmasked_logits(name, attn):
    model = build(name, attn).eval()
    x = tokens()
    with torch.no_grad():
        reference = model(x).logits
    masks = attach(model)
    masks.fixed_masks = ones_like_masks(masks)
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            logits = model(x).logits
        assert (logits - reference).abs().max().item() < 1e-5
    remove_masks(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, reference)


def test_saturated_log_alphas_give_all_ones_in_training_most_of_the_time():
    model = build('llama').train()
    masks = attach(model)
    with torch.no_grad():
        for log_alpha in masks.mask_parameters():
            log_alpha.fill_(100.0)  # clamped to ln 100 before sampling
    drawn = masks.masks_for_forward()
    assert all(log_alpha.max().item() == pytest.approx(4.60517) for log_alpha in masks.mask_parameters())
    # P(z > 0.9) = 0.97 per entry at ln 100; averaged over 200 draws (3 standard errors above 0.95 for 3 layers)
    for key in drawn:
        share = torch.stack([(masks.masks_for_forward()[key] > 0.9).float().mean() for _ in range(200)]).mean()
        assert share > 0.95, key


def slice_by_indicator_masks(model, indicators):
    """A smaller stock HF model keeping the entries whose 0/1 mask is 1 (what export does for hard masks)."""
    arch = DecoderArchitecture.from_hf_config(model.config)
    r, d_h = arch.heads_per_group, arch.head_dim
    layers = indicators['layer'].nonzero().flatten().tolist()
    hidden = indicators['hidden'].nonzero().flatten()
    groups = [indicators['head'][index].nonzero().flatten() for index in layers]
    ffn = [indicators['intermediate'][index].nonzero().flatten() for index in layers]
    values = model.config.to_dict()
    values.update(num_hidden_layers=len(layers), hidden_size=len(hidden), num_key_value_heads=len(groups[0]),
                  num_attention_heads=len(groups[0]) * r, intermediate_size=len(ffn[0]), head_dim=d_h)
    small = AutoModelForCausalLM.from_config(type(model.config).from_dict(values),
                                             attn_implementation=model.config._attn_implementation)
    big, state = model.state_dict(), {}
    state['model.embed_tokens.weight'] = big['model.embed_tokens.weight'][:, hidden]
    state['model.norm.weight'] = big['model.norm.weight'][hidden]
    if not arch.tie_word_embeddings:
        state['lm_head.weight'] = big['lm_head.weight'][:, hidden]
    for new, old in enumerate(layers):
        src, dst = f'model.layers.{old}.', f'model.layers.{new}.'
        q_rows = torch.cat([torch.arange(g * r * d_h, (g + 1) * r * d_h) for g in groups[new].tolist()])
        kv_rows = torch.cat([torch.arange(g * d_h, (g + 1) * d_h) for g in groups[new].tolist()])
        for proj, rows in (('q_proj', q_rows), ('k_proj', kv_rows), ('v_proj', kv_rows)):
            state[f'{dst}self_attn.{proj}.weight'] = big[f'{src}self_attn.{proj}.weight'][rows][:, hidden]
            if f'{src}self_attn.{proj}.bias' in big:
                state[f'{dst}self_attn.{proj}.bias'] = big[f'{src}self_attn.{proj}.bias'][rows]
        state[f'{dst}self_attn.o_proj.weight'] = big[f'{src}self_attn.o_proj.weight'][hidden][:, q_rows]
        for proj in ('gate_proj', 'up_proj'):
            state[f'{dst}mlp.{proj}.weight'] = big[f'{src}mlp.{proj}.weight'][ffn[new]][:, hidden]
        state[f'{dst}mlp.down_proj.weight'] = big[f'{src}mlp.down_proj.weight'][hidden][:, ffn[new]]
        for norm in ('input_layernorm', 'post_attention_layernorm'):
            state[f'{dst}{norm}.weight'] = big[f'{src}{norm}.weight'][hidden]
    result = small.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {'lm_head.weight'}  # tied: shared with embed
    return small.eval()


@pytest.mark.parametrize('name', ['llama', 'gqa'])
def test_hard_masks_equal_the_sliced_smaller_model(name):
    """0/1 masks on all four granularities == a real HF model with those entries cut out."""
    model = build(name).eval()
    masks = attach(model, seed=3)
    indicators = {key: (z != 0).float() for key, z in masks.deterministic('target').items()}
    masks.fixed_masks = indicators
    x = tokens(1)
    with torch.no_grad():
        masked = model(x).logits
        sliced = slice_by_indicator_masks(model, indicators)(x).logits
    assert sliced.shape == masked.shape
    assert (masked - sliced).abs().max().item() < 1e-5


def test_soft_masks_multiply_where_the_contract_says():
    """Strictly positive soft masks == folding them into o_proj/down_proj/embedding/norm weights."""
    model = build('llama', attention_bias=True, mlp_bias=True).eval()
    folded = copy.deepcopy(model)
    masks = attach(model, seed=5)
    generator = torch.Generator().manual_seed(7)
    soft = {key: torch.rand(masks.log_alpha(key).shape, generator=generator) * 0.9 + 0.1
            for key in masks.granularities}
    masks.fixed_masks = soft
    arch = masks.source
    width = arch.heads_per_group * arch.head_dim
    with torch.no_grad():
        z_hidden = soft['hidden']
        folded.model.embed_tokens.weight.mul_(z_hidden)
        folded.model.norm.weight.mul_(z_hidden)
        for index, layer in enumerate(folded.model.layers):
            scale = soft['layer'][index] * z_hidden
            o_proj, down = layer.self_attn.o_proj, layer.mlp.down_proj
            o_proj.weight.mul_(soft['head'][index].repeat_interleave(width)[None, :]).mul_(scale[:, None])
            o_proj.bias.mul_(scale)
            down.weight.mul_(soft['intermediate'][index][None, :]).mul_(scale[:, None])
            down.bias.mul_(scale)
            layer.input_layernorm.weight.mul_(z_hidden)
            layer.post_attention_layernorm.weight.mul_(z_hidden)
        x = tokens(2)
        assert (model(x).logits - folded(x).logits).abs().max().item() < 1e-5


def test_masked_rms_norm_uses_kept_dims_only():
    from drp_foundry.pruning.hf_injection import masked_rms_norm

    x = torch.randn(3, 8)
    z = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.25])
    kept = (z != 0).float()
    x = x * kept  # dims with z = 0 are zero in the residual stream
    weight = torch.randn(8)
    y = masked_rms_norm(x, weight, 1e-6, z, kept.sum())
    idx = kept.bool()
    rms = (x[:, idx].pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(y[:, idx], x[:, idx] / rms * weight[idx] * z[idx])
    assert (y[:, ~idx] == 0).all()


def test_eval_uses_cached_deterministic_masks_and_training_samples_every_forward():
    model = build('gqa')
    masks = attach(model, seed=1)
    x = tokens(3)
    model.eval()
    with torch.no_grad():
        first = model(x).logits
        cached = masks.current_masks
        second = model(x).logits
    assert masks.current_masks is cached  # same dict: served from the cache
    assert torch.equal(first, second)
    expected_counts = masks.keep_counts('expected')
    assert int((cached['hidden'] != 0).sum()) == expected_counts['hidden']
    assert (cached['head'] != 0).sum(dim=1).tolist() == expected_counts['head'].tolist()
    with torch.no_grad():
        masks.log_alpha('hidden').add_(0.5)  # an optimizer step changes the version counter
        model(x)
    assert masks.current_masks is not cached
    masks.eval_mode = 'target'
    with torch.no_grad():
        model(x)
    assert int((masks.current_masks['hidden'] != 0).sum()) == masks.target.hidden
    model.train()
    model(x)
    sample_one = masks.current_masks['intermediate'].detach().clone()
    model(x)
    assert not torch.equal(sample_one, masks.current_masks['intermediate'])


@pytest.mark.parametrize('name', ['llama', 'gqa'])
def test_non_reentrant_checkpointing_gives_the_same_mask_gradients(name):
    plain = build(name).train()
    checkpointed = copy.deepcopy(plain)
    grads = []
    for model, use_checkpointing in ((plain, False), (checkpointed, True)):
        masks = attach(model, seed=2)
        if use_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        torch.manual_seed(11)
        x = tokens(4)
        model(input_ids=x, labels=x).loss.backward()
        grads.append({key: masks.log_alpha(key).grad.clone() for key in masks.granularities})
    for key in grads[0]:
        assert grads[0][key].abs().sum() > 0
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_is_refused():
    model = build('llama').train()
    attach(model)
    model.gradient_checkpointing_enable()  # HF default: reentrant
    with pytest.raises(ValueError, match='non-reentrant'):
        model(tokens())


def test_masks_and_lambdas_round_trip_through_the_model_state_dict():
    model = build('gqa')
    masks = attach(model, seed=4)
    with torch.no_grad():
        for i, value in enumerate(masks.lambda_parameters()):
            value.fill_(0.25 * (i + 1))
    state = model.state_dict()
    assert 'drp_masks.log_alpha_head' in state and 'drp_masks.lambda_2_hidden' in state
    assert state['drp_masks._extra_state']['target']['kv_heads'] == 1

    restored_model = build('gqa', seed=9)
    restored = attach(restored_model, seed=8)
    restored_model.load_state_dict(state)
    for key in masks.granularities:
        assert torch.equal(restored.log_alpha(key), masks.log_alpha(key))
        assert torch.equal(restored.lambda_1(key), masks.lambda_1(key))
        assert torch.equal(restored.lambda_2(key), masks.lambda_2(key))

    rebuilt = L0MaskModule.from_extra_state(state['drp_masks._extra_state'])
    rebuilt.load_state_dict({k.removeprefix('drp_masks.'): v for k, v in state.items() if k.startswith('drp_masks.')})
    assert rebuilt.source == masks.source and rebuilt.target == masks.target
    assert torch.equal(rebuilt.deterministic('target')['head'], masks.deterministic('target')['head'])

    other = L0MaskModule(masks.source, TargetArchitecture(layers=1, hidden=8, heads=3, kv_heads=1, intermediate=8))
    with pytest.raises(ValueError, match='target='):
        other.load_state_dict({k.removeprefix('drp_masks.'): v for k, v in state.items()
                               if k.startswith('drp_masks.')})


def test_injection_errors():
    model = build('llama')
    masks = attach(model)
    with pytest.raises(ValueError, match='already carries masks'):
        inject_masks(model, masks)
    other = build('gqa')
    with pytest.raises(ValueError, match='built for'):
        inject_masks(other, remove_masks(model))
