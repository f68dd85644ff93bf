"""A decoder family from outside the package (tests/toy_decoder.py: its own module names, config keys and a
fused [k | v] projection) registered through an entry point of a test distribution, or through
``register_layout``, then pruned (masks injected, a few steps of the functional API) and exported."""

from __future__ import annotations

import textwrap

import pytest
import torch
import toy_decoder
from toy_decoder import ToyConfig, ToyForCausalLM

from drp_foundry.composer.lagrangian_updater import apply_lagrangian
from drp_foundry.composer.mask_learner import apply_mask_learner
from drp_foundry.pruning import layouts
from drp_foundry.pruning.architecture import DecoderArchitecture
from drp_foundry.pruning.expected_size import expected_num_parameters
from drp_foundry.pruning.export import count_model_parameters, fold_and_slice
from drp_foundry.pruning.importance import activation_importance

TARGET = {'layers': 2, 'hidden': 24, 'heads': 2, 'intermediate': 32}


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(layouts, '_REGISTERED', {})


def prune_and_export(steps: int = 4):
    torch.manual_seed(0)
    model = ToyForCausalLM(ToyConfig()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    masks = apply_mask_learner(model, TARGET, optimizer, mask_lr=0.1, lambda_lr=0.05, init_mean=0.0, init_std=2.0,
                               eval_mask_mode='target')
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        batch = torch.randint(0, 128, (4, 10), generator=generator)
        loss = apply_lagrangian(model, model(batch, labels=batch).loss, step, warmup_steps=2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert masks.log_alpha('hidden').grad is not None and masks.log_alpha('head').grad.abs().sum() > 0
    model.eval()
    tokens = torch.randint(0, 128, (2, 10), generator=generator)
    deterministic = masks.deterministic('target')
    pruned, report = fold_and_slice(model, deterministic)
    with torch.no_grad():
        masked_logits, pruned_logits = model(tokens).logits, pruned(tokens).logits
    assert torch.allclose(pruned_logits, masked_logits, atol=1e-4, rtol=0), (pruned_logits - masked_logits).abs().max()
    config = pruned.config
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.d_ff) == (2, 24, 2, 1, 32)
    assert count_model_parameters(pruned) == report.params_after == masks.target_num_parameters() == int(
        expected_num_parameters(masks.source, {k: (v != 0).float() for k, v in deterministic.items()}))
    assert masks.source.count_parameters() == sum(p.numel() for n, p in model.named_parameters()
                                                  if not n.startswith('drp_masks.'))
    scores = activation_importance(model, [{'input_ids': tokens}])  # importance finds the family's modules too
    assert scores['head'].shape == (3, 2) and scores['hidden'].shape == (32,)
    return pruned


def test_unregistered_family_is_refused_at_init(fresh_registry):
    model = ToyForCausalLM(ToyConfig())
    with pytest.raises(ValueError, match="no layout for HF model_type 'drp_toy'"):
        apply_mask_learner(model, TARGET)


def test_family_registered_through_an_entry_point(fresh_registry, tmp_path, monkeypatch):
    dist_info = tmp_path / 'drp_toy_family-0.1.dist-info'
    dist_info.mkdir()
    (dist_info / 'METADATA').write_text('Metadata-Version: 2.1\nName: drp-toy-family\nVersion: 0.1\n')
    (dist_info / 'entry_points.txt').write_text(textwrap.dedent(f'''\
        [{layouts.ENTRY_POINT_GROUP}]
        drp_toy = toy_decoder:TOY_LAYOUT
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert layouts.get_layout('drp_toy') is toy_decoder.TOY_LAYOUT
    prune_and_export()


def test_family_registered_with_register_layout(fresh_registry):
    layouts.register_layout(toy_decoder.TOY_LAYOUT)
    assert DecoderArchitecture.from_hf_config(ToyConfig()).num_kv_heads == 2
    with pytest.raises(ValueError, match='already registered'):
        layouts.register_layout(layouts.BUILTIN_LAYOUTS['llama'].__class__('drp_toy'))
    prune_and_export()


def test_a_layout_that_does_not_match_the_model_is_refused(fresh_registry):
    import dataclasses

    layouts.register_layout(dataclasses.replace(toy_decoder.TOY_LAYOUT, attention_output='attn.w_out'))
    with pytest.raises(ValueError, match='attn.w_out'):
        apply_mask_learner(ToyForCausalLM(ToyConfig()), TARGET)
