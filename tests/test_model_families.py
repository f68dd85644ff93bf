"""Every supported decoder family, each from a tiny random config, pruned through its DecoderLayout:

- all-ones masks give the unmasked logits;
- masked model (eval, deterministic masks with soft values far from 1) and exported model agree within
  1e-4 (fp32) for each granularity alone and all together;
- the expected-size formula with 0/1 indicators equals the exported model's parameter count, and the
  unpruned count equals the HF model's sum of numel;
- the exported folders load with plain ``transformers`` in a fresh interpreter (one subprocess for all).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.expected_size import GRANULARITIES, expected_num_parameters
from drp_foundry.pruning.export import count_model_parameters, fold_and_slice
from drp_foundry.pruning.hf_injection import inject_masks
from drp_foundry.pruning.layouts import get_layout
from drp_foundry.pruning.mask_module import L0MaskModule

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
GEMMA = dict(head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config, config keys whose values must survive export unchanged)
FAMILIES = {
    'llama2': (lambda: LlamaConfig(**{**COMMON, 'num_key_value_heads': 4}, tie_word_embeddings=False), ()),
    'llama3': (lambda: LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=500000.0,
                                   rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                                 'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}),
               ('rope_scaling', 'rope_theta')),
    'mistral': (lambda: MistralConfig(**COMMON, sliding_window=None), ()),
    'qwen2': (lambda: Qwen2Config(**COMMON, tie_word_embeddings=True, use_sliding_window=False,
                                  max_window_layers=2), ()),
    'qwen3': (lambda: Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True, use_sliding_window=False,
                                  max_window_layers=2), ()),
    'granite': (lambda: GraniteConfig(**COMMON, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                      embedding_multiplier=12.0, residual_multiplier=0.22,
                                      attention_multiplier=0.0625, logits_scaling=8.0),
                ('embedding_multiplier', 'residual_multiplier', 'attention_multiplier', 'logits_scaling')),
    'phi3': (lambda: Phi3Config(**COMMON, original_max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, tie_word_embeddings=False), ()),
    'gemma': (lambda: GemmaConfig(**COMMON, **GEMMA), ()),
    'gemma2': (lambda: Gemma2Config(**COMMON, **GEMMA, sliding_window=32, query_pre_attn_scalar=16),
               ('final_logit_softcapping', 'attn_logit_softcapping', 'sliding_window')),
    'gemma3_text': (lambda: Gemma3TextConfig(**{**COMMON, 'num_hidden_layers': 4}, **GEMMA, sliding_window=32,
                                             sliding_window_pattern=2, query_pre_attn_scalar=16),
                    ('sliding_window_pattern', 'rope_local_base_freq')),
}
PRUNED = dict(layers=2, hidden=48, heads=2, intermediate=64)  # every family: whole KV groups, kv_heads derived
TARGET_FIELDS = {'layer': ('layers',), 'head': ('heads', 'kv_heads'), 'intermediate': ('intermediate',),
                 'hidden': ('hidden',)}
CASES = [(key,) for key in GRANULARITIES] + [GRANULARITIES]
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))  # < every sliding window


def target_for(source: DecoderArchitecture, granularities) -> TargetArchitecture:
    """The source sizes with the pruned sizes of ``granularities``; layers a family cannot drop stay."""
    values = source.target().to_dict()
    pruned = TargetArchitecture(**{**PRUNED, 'kv_heads': None}).resolve(source).to_dict()
    for key in granularities:
        if key in get_layout(source.model_type).unsupported:
            continue  # the mask is still learned and its soft values folded; nothing is dropped
        for field in TARGET_FIELDS[key]:
            values[field] = pruned[field]
    return TargetArchitecture(**values)


def phi3_longrope_config():
    """Phi-3 with LongRoPE scaling (Phi-3-mini-128k, Phi-3.5): factor lists of length head_dim / 2."""
    return Phi3Config(**COMMON, original_max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      rope_scaling={'type': 'longrope', 'short_factor': [1.0 + 0.1 * i for i in range(8)],
                                    'long_factor': [1.5 + 0.2 * i for i in range(8)]})


# Phi-3 with rope_scaling can only export hidden // heads == head_dim (16): layers, hidden, heads, FFN together
PHI3_LONGROPE_TARGET = TargetArchitecture(layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64)


def build(family: str, seed: int = 0, config=None):
    torch.manual_seed(seed)
    config = FAMILIES[family][0]() if config is None else config
    model = AutoModelForCausalLM.from_config(config, attn_implementation='eager')
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from init (norm gains at 0 or 1), so slicing errors show in the logits
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_((0.3 if 'norm' in name else 0.15) * noise + (0.5 if 'norm' in name else 0.0))
    return model.eval()


def masked(family: str, granularities, seed: int = 0, config=None, target=None):
    model = build(family, seed, config)
    source = DecoderArchitecture.from_hf_config(model.config)
    target = target_for(source, granularities) if target is None else target
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Gemma 2's layer-pattern warning (its own test below)
        mask_module = L0MaskModule(source, target, granularities=granularities,
                                   init_mean=0.0, init_std=2.0, eval_mode='target')
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # log-alphas spread over [-2, 2]: kept soft values far from 1, so folding is exercised
        for key in mask_module.granularities:
            log_alpha = mask_module.log_alpha(key)
            spread = torch.linspace(-2.0, 2.0, log_alpha.numel())
            log_alpha.copy_(spread[torch.randperm(log_alpha.numel(), generator=generator)].view_as(log_alpha))
    inject_masks(model, mask_module)
    return model.eval(), mask_module


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def export(model, masks):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return fold_and_slice(model, masks)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_all_ones_masks_give_unmasked_logits(family):
    plain = logits(build(family))
    model, mask_module = masked(family, GRANULARITIES)
    mask_module.fixed_masks = {key: torch.ones_like(value) for key, value in mask_module.deterministic().items()}
    assert torch.allclose(logits(model), plain, atol=1e-5, rtol=0)
    mask_module.fixed_masks = None
    assert (logits(model) - plain).abs().max() > 1e-2, 'the masks should change the logits'


@pytest.mark.parametrize('granularities', CASES, ids=lambda g: '+'.join(g))
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_exported_logits_equal_masked_model(family, granularities):
    model, mask_module = masked(family, granularities)
    masks = mask_module.deterministic('target')
    soft = torch.cat([mask[mask != 0] for mask in masks.values()])
    assert soft.min() < 0.9, 'soft mask values far from 1, so folding is exercised'
    pruned, report = export(model, masks)
    assert type(pruned) is type(model)
    if 'layer' in masks:  # the kept layers are the mask's non-zero entries, in order
        assert [layer.source_index for layer in report.kept_layers] == torch.nonzero(masks['layer']).flatten().tolist()
    assert torch.allclose(logits(pruned), logits(model), atol=1e-4, rtol=0), \
        (logits(pruned) - logits(model)).abs().max()
    source_config, new_config = model.config, pruned.config
    for key in FAMILIES[family][1]:
        assert getattr(new_config, key) == getattr(source_config, key), key


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_expected_size_formula_equals_exported_count(family):
    model, mask_module = masked(family, GRANULARITIES, seed=2)
    source = mask_module.source
    assert source.count_parameters() == count_model_parameters(model) == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith('drp_masks.'))  # tied weights once
    masks = mask_module.deterministic('target')
    pruned, report = export(model, masks)
    formula = expected_num_parameters(source, {key: (mask != 0).float() for key, mask in masks.items()})
    assert int(formula.item()) == count_model_parameters(pruned) == report.params_after \
        == source.pruned(mask_module.target).count_parameters()
    assert report.params_after < report.params_before


@pytest.mark.slow
def test_exports_load_with_plain_transformers_in_a_fresh_interpreter(tmp_path):
    expected = {}
    cases = {family: masked(family, GRANULARITIES, seed=3) for family in sorted(FAMILIES)}
    cases['phi3_longrope'] = masked('phi3', GRANULARITIES, seed=3, config=phi3_longrope_config(),
                                    target=PHI3_LONGROPE_TARGET)
    for name, (model, mask_module) in cases.items():
        pruned, _ = export(model, mask_module.deterministic('target'))
        assert torch.allclose(logits(pruned), logits(model), atol=1e-4, rtol=0), name
        pruned.save_pretrained(tmp_path / name, safe_serialization=True)
        expected[name] = logits(model).tolist()
    (tmp_path / 'expected.json').write_text(json.dumps({'tokens': TOKENS.tolist(), 'logits': expected}))
    script = '''
import json, sys
import torch
from transformers import AutoModelForCausalLM
root = sys.argv[1]
record = json.load(open(f"{root}/expected.json"))
tokens = torch.tensor(record["tokens"])
worst = {}
for family, values in record["logits"].items():
    model = AutoModelForCausalLM.from_pretrained(f"{root}/{family}", attn_implementation="eager").eval()
    with torch.no_grad():
        worst[family] = float((model(tokens).logits - torch.tensor(values)).abs().max())
assert "drp_foundry" not in sys.modules
print(json.dumps(worst))
'''
    result = subprocess.run([sys.executable, '-c', script, str(tmp_path)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    worst = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(worst) == sorted([*FAMILIES, 'phi3_longrope'])
    assert max(worst.values()) < 1e-4, worst


def test_phi3_rope_scaling_targets_its_config_cannot_hold_are_refused_at_init():
    model = build('phi3', config=phi3_longrope_config())
    source = DecoderArchitecture.from_hf_config(model.config)
    mask_module = L0MaskModule(source, target_for(source, GRANULARITIES))  # hidden 48 // heads 2 = 24 != 16
    with pytest.raises(ValueError, match=r'hidden // target.heads == 16'):
        inject_masks(model, mask_module)
    from drp_foundry.oneshot import oneshot_prune

    with pytest.raises(ValueError, match=r'hidden // target.heads == 16'):
        oneshot_prune(model, target_for(source, GRANULARITIES), list(TOKENS))
    masks = {'hidden': (torch.arange(64) < 48).float(), 'head': torch.tensor([[1.0, 0.0]] * 3)}
    with pytest.raises(ValueError, match='would not load'):  # export checks the config round trip as well
        fold_and_slice(model, masks)


def test_gemma_embedding_scale_is_compensated_at_export():
    """Gemma multiplies the embedding output by sqrt(hidden_size) of its config: slicing D -> D' would scale the
    residual stream by sqrt(D'/D). Export multiplies the embedding columns by c = sqrt(D/D'); the LM head is the
    same (tied) matrix, so the final norm's gain (1 + w) is divided by c."""
    model, mask_module = masked('gemma2', ('hidden',))
    keep = torch.zeros(64)
    keep[torch.arange(0, 64, 4)] = 1.0  # a 0/1 mask: 16 of 64 dims kept, no soft value to fold
    pruned, _ = export(model, {'hidden': keep})
    c = (64 / 16) ** 0.5
    kept = keep.nonzero().flatten()
    assert torch.allclose(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight[:, kept] * c, atol=1e-6)
    assert torch.allclose(1 + pruned.model.norm.weight, (1 + model.model.norm.weight[kept]) / c, atol=1e-6)
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()  # still tied
    mask_module.fixed_masks = {'hidden': keep}
    assert torch.allclose(logits(pruned), logits(model), atol=1e-4, rtol=0)


def test_qwen_window_split_follows_the_kept_layers():
    model, mask_module = masked('qwen3', ('layer',))
    layer = torch.tensor([0.0, 0.7, 0.9])  # drop layer 0, below max_window_layers=2
    pruned, _ = export(model, {'layer': layer})
    assert pruned.config.max_window_layers == 1  # layer 1 (< 2) stays below the split, layer 2 above it


def test_gemma2_layer_pruning_warns_of_the_layer_pattern_and_gemma3_refuses_it():
    model = build('gemma2')
    source = DecoderArchitecture.from_hf_config(model.config)
    with pytest.warns(UserWarning, match='sliding_window'):
        L0MaskModule(source, target_for(source, ('layer',)), granularities=('layer',))
    model = build('gemma3_text')
    source = DecoderArchitecture.from_hf_config(model.config)
    target = TargetArchitecture(**{**source.target().to_dict(), 'layers': 2})
    with pytest.raises(ValueError, match='layer index'):
        L0MaskModule(source, target, granularities=('layer',))
    with pytest.raises(ValueError, match='layer index'):
        fold_and_slice(model, {'layer': torch.tensor([1.0, 1.0, 0.0, 0.0])})


def test_unknown_family_is_refused_with_the_known_ones():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="'gpt2'.*known families.*drp_foundry_layouts"):
        DecoderArchitecture.from_hf_config(GPT2Config())


def test_gemma2_layer_pattern_limit_beyond_the_window():
    """The stated limit, measured: with a window shorter than the sequence, keeping layers whose index parity
    is unchanged (drop the last) stays exact; dropping layer 0 flips the kind of the kept layers."""
    config = FAMILIES['gemma2'][0]()
    config.sliding_window = 4  # sequences of 12 tokens reach beyond it
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation='eager').eval()
    errors = {}
    for name, layer in (('parity kept', [1.0, 1.0, 0.0]), ('parity changed', [0.0, 1.0, 1.0])):
        pruned, _ = export(model, {'layer': torch.tensor(layer)})
        with torch.no_grad():
            masked_free = model.model.layers  # the reference: the source model with those layers skipped
            kept = torch.nn.ModuleList(masked_free[i] for i, z in enumerate(layer) if z)
            model.model.layers = kept
            try:
                reference = logits(model)
            finally:
                model.model.layers = masked_free
        errors[name] = float((logits(pruned) - reference).abs().max())
    assert errors['parity kept'] < 1e-4 and errors['parity changed'] > 1e-3, errors


def test_oneshot_prunes_every_family():
    """Importance scoring finds each family's modules through its layout; the one-shot model has the target size."""
    from drp_foundry.oneshot import oneshot_prune

    for family in sorted(FAMILIES):
        model = build(family)
        source = DecoderArchitecture.from_hf_config(model.config)
        target = target_for(source, GRANULARITIES)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            pruned, report, scores = oneshot_prune(model, target, list(TOKENS))
        assert report.params_after == source.pruned(target).count_parameters(), family
        assert scores['hidden'].shape == (source.hidden_size,) and bool((scores['head'] > 0).all()), family


def test_architecture_records_of_older_checkpoints_load():
    """Mask extra state written before layer_norms / head_norms existed (Llama/Mistral/Qwen2 only) loads with
    their defaults; a record with keys this version does not know is refused with a message."""
    source = DecoderArchitecture.from_hf_config(FAMILIES['qwen2'][0]())
    old = {key: value for key, value in source.to_dict().items() if key not in ('layer_norms', 'head_norms')}
    assert DecoderArchitecture.from_dict(old) == source
    qwen3 = DecoderArchitecture.from_hf_config(FAMILIES['qwen3'][0]())
    assert DecoderArchitecture.from_dict(qwen3.to_dict()) == qwen3 and qwen3.head_norms == 2
    with pytest.raises(ValueError, match='newer drp-foundry'):
        DecoderArchitecture.from_dict({**old, 'expert_count': 8})


@pytest.mark.parametrize('family', ['phi3', 'gemma2'])
def test_composer_pruning_run_on_new_families(family):
    """MaskLearner + LagrangianUpdater in a Composer Trainer (INIT injects through the layout), a few steps, then
    the export of the trained masks equals the masked model in eval."""
    from test_pruning_algorithms import make_trainer

    from drp_foundry.composer.mask_learner import find_mask_module

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        trainer = make_trainer(FAMILIES[family][0](), dict(PRUNED), steps=3)
        trainer.fit()
    hf_model = trainer.state.model.model.eval()
    masks = find_mask_module(hf_model)
    assert masks.last_size_terms.num_parameters < masks.source.count_parameters()
    masks.eval_mode = 'target'
    pruned, report = export(hf_model, masks.deterministic('target'))
    assert torch.allclose(logits(pruned), logits(hf_model), atol=1e-4, rtol=0)
    assert report.params_after == masks.target_num_parameters()


def test_gemma3_layer_target_is_refused_at_trainer_init():
    from test_pruning_algorithms import make_trainer

    with pytest.raises(ValueError, match=r"cannot prune \['layer'\].*layer index"):
        make_trainer(FAMILIES['gemma3_text'][0](), dict(PRUNED), steps=2)


def test_size_terms_are_typed_recorded_in_training_forwards_and_kept_in_checkpoints():
    from drp_foundry.pruning.mask_module import NoSizeTermsError, SizeTerms

    model, mask_module = masked('qwen3', GRANULARITIES)
    with pytest.raises(NoSizeTermsError, match='training forward'):
        mask_module.last_size_terms
    logits(model)  # eval forward: records nothing
    with pytest.raises(NoSizeTermsError):
        mask_module.take_size_terms()
    model.train()
    model(TOKENS)
    terms = mask_module.take_size_terms()
    assert isinstance(terms, SizeTerms) and terms.num_parameters.requires_grad
    assert torch.allclose(terms.num_parameters, mask_module.expected_num_parameters())
    assert set(terms.expected) == set(GRANULARITIES) and terms.expected['head'].shape == (3,)
    with pytest.raises(NoSizeTermsError):  # consumed: one penalty per forward
        mask_module.take_size_terms()
    state = {key: value for key, value in model.state_dict().items() if key.startswith('drp_masks.')}
    rebuilt = L0MaskModule.from_extra_state(state['drp_masks._extra_state'])
    rebuilt.load_state_dict({key[len('drp_masks.'):]: value for key, value in state.items()})
    restored, recorded = rebuilt.last_size_terms, mask_module.last_size_terms  # a resume before any new step
    assert float(restored.num_parameters) == float(recorded.num_parameters)
    assert all(torch.equal(restored.expected[key], recorded.expected[key]) for key in GRANULARITIES)
