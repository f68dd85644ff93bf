"""The exported model folder carries a model card (README.md) with the facts of the run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_gqa_config

from drp_foundry.model_card import add_domain_losses, render_model_card

TARGET = {'layers': 3, 'hidden': 64, 'heads': 3, 'kv_heads': 1, 'intermediate': 96}
DOMAINS = ['code', 'prose']


@pytest.fixture(scope='module')
def pruning_checkpoint(tmp_path_factory, tiny_tokenizer):
    """Three Trainer steps of Foundry's hf_causal_lm (tiny tied Qwen2) with the mask learner, plus the state
    of a data scheduler whose mixture moved, as the drp_dynamic_loading callback checkpoints it."""
    from composer import Trainer
    from llmfoundry.models.hf import ComposerHFCausalLM

    from drp_foundry.composer.mask_learner import MaskLearner
    from drp_foundry.scheduling.registry import build_policy

    root = tmp_path_factory.mktemp('card_run')
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_gqa_config(vocab_size=len(tiny_tokenizer))).save_pretrained(root / 'source')
    model = ComposerHFCausalLM(tokenizer=tiny_tokenizer, pretrained_model_name_or_path=str(root / 'source'),
                               pretrained=True)
    tokens = torch.randint(0, len(tiny_tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {'input_ids': tokens, 'attention_mask': torch.ones_like(tokens), 'labels': tokens}
    trainer = Trainer(model=model, train_dataloader=[batch] * 3, max_duration='3ba', device='cpu', device_train_microbatch_size=4,
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), run_name='card-run',
                      algorithms=[MaskLearner(target=TARGET, init_mean=0.0, init_std=2.0)],
                      save_folder=str(root / 'checkpoints'), save_interval='3ba', progress_bar=False,
                      log_to_console=False)
    trainer.fit()
    path = root / 'checkpoints' / 'ep0-ba3-rank0.pt'
    checkpoint = torch.load(path, weights_only=False)
    policy = build_policy({'name': 'constant'}, DOMAINS, [0.7, 0.3])
    policy.q = policy.q[::-1].copy()
    policy.num_updates, policy.last_update_step = 2, 3
    checkpoint['state']['callbacks']['DynamicLoading'] = {'policy_state': policy.state_dict(), 'trajectory': []}
    torch.save(checkpoint, path)
    return {'path': path, 'source': str(root / 'source')}


def test_export_writes_the_card_with_the_run_facts(pruning_checkpoint, tmp_path):
    from drp_foundry.export import export_checkpoint

    out = tmp_path / 'pruned-tiny'
    report = export_checkpoint(pruning_checkpoint['path'], out, source=pruning_checkpoint['source'])
    card = (out / 'README.md').read_text()
    facts = json.loads((out / 'model_card.json').read_text())

    assert card.startswith('---\nlibrary_name: transformers\n')
    assert '# pruned-tiny' in card
    assert f'source model: `{pruning_checkpoint["source"]}` (qwen2, {report.params_before:,} parameters)' in card
    assert '| layers | 4 | 3 |' in card and '| hidden size | 96 | 64 |' in card
    assert '| attention heads | 6 | 3 |' in card and '| KV heads | 2 | 1 |' in card and '| FFN size | 160 | 96 |' in card
    assert f'| parameters | {report.params_before:,}' in card and f'{report.params_after:,}' in card
    assert '- pruning run: 3 steps, 12 samples, 192 tokens seen' in card  # 3 batches of 4 x 16 tokens
    assert 'run `card-run`' in card
    assert 'masks learned: layer, head, intermediate, hidden' in card
    assert f'kept layers (source indices): {[k.source_index for k in report.kept_layers]}' in card
    assert 'policy `constant` (`drp_dynamic_loading`), 2 mixture updates, the last at step 3' in card
    assert re.search(r'\| code \| 0\.700 \| 0\.700 \| 0\.300 \|', card)  # p_R0, p_R, the moved q
    assert 'Not measured at export' in card
    assert facts['params_after'] == report.params_after and facts['trained']['token'] == 192


def test_the_demo_table_goes_into_the_card(pruning_checkpoint, tmp_path):
    from drp_foundry.commands.export import main

    out = tmp_path / 'pruned'
    assert main([str(pruning_checkpoint['path']), str(out)]) == 0  # the command line, without --source
    assert 'source model: not recorded in the checkpoint (`drp-export --source NAME` names it)' in (
        out / 'README.md').read_text()
    add_domain_losses(out, {'source': {'code': 2.0, 'prose': 3.0}, 'pruned': {'code': 2.5, 'prose': 4.5}},
                      note='Eval loss (nats/token) on the held-out splits.')
    card = (out / 'README.md').read_text()
    assert 'Not measured at export' not in card
    assert 'Eval loss (nats/token) on the held-out splits.' in card
    assert '| domain | source | pruned |' in card
    assert '| prose | 3.000 | 4.500 |' in card
    assert '| **mean** | 2.500 | 3.500 |' in card and '| **worst** | 3.000 | 4.500 |' in card
    # the facts survive: a second table replaces the first, the rest of the card is unchanged
    add_domain_losses(out, {'pruned': {'code': 1.0, 'prose': 1.0}})
    again = (out / 'README.md').read_text()
    assert '| prose | 1.000 |' in again and '4.500' not in again and '# pruned' in again


def test_the_card_of_a_run_without_a_scheduler_says_so():
    facts = {'source': 's', 'model_type': 'llama', 'checkpoint': 'c.pt', 'run_name': None, 'trained': {},
             'dtype': 'bfloat16', 'source_sizes': {'num_hidden_layers': 4}, 'pruned_sizes': {'num_hidden_layers': 2},
             'params_before': 2_000_000_000, 'params_after': 1_000_000_000, 'kept_layers': [0, 3],
             'target': {'layers': 2}, 'granularities': ['layer'], 'algorithms': [], 'scheduler': None,
             'domain_losses': None}
    card = render_model_card(facts, name='m')
    assert 'no `drp_dynamic_loading` callback' in card
    assert '| parameters | 2,000,000,000 (2.00B) | 1,000,000,000 (1.00B); 50.0% of the source |' in card
    assert 'weights saved as bfloat16' in card and 'pruning run:' not in card


def test_a_table_for_a_folder_not_written_by_the_export_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match='model_card.json not found'):
        add_domain_losses(tmp_path, {'m': {'a': 1.0}})
