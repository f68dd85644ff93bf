"""Importance scores and importance-initialised masks (``drp_mask_learner`` ``init: importance``):
on a tiny model built with planted important layers, KV groups, FFN units and hidden channels,
the scores find them and the first deterministic masks keep exactly them."""

import pytest
import torch
from composer import Callback, Trainer
from composer.loggers import InMemoryLogger
from composer.models import HuggingFaceModel
from composer.optim import ConstantWithWarmupScheduler, DecoupledAdamW
from conftest import tiny_gqa_config
from transformers import AutoModelForCausalLM

from drp_foundry.composer.lagrangian_updater import LagrangianUpdater
from drp_foundry.composer.mask_learner import MaskLearner, find_mask_module
from drp_foundry.pruning import hard_concrete
from drp_foundry.pruning.importance import activation_importance
from drp_foundry.pruning.importance_masks import importance_log_alpha

TARGET = dict(layers=2, hidden=48, heads=3, intermediate=80)  # of 4 layers, 96 hidden, 2 KV groups, 160 units


def planted_model(seed=0):
    """A 4-layer Qwen2 GQA model whose important parts are known.

    Layers 1 and 3 write nothing to the residual stream (o_proj, down_proj zero); in every layer
    one KV group's values and half of the FFN units are scaled by 0.01; half of the hidden
    channels have RMSNorm weights 0.01 everywhere. Returns the model and the planted sets."""
    torch.manual_seed(seed)
    config = tiny_gqa_config()
    model = AutoModelForCausalLM.from_config(config, attn_implementation='sdpa')
    generator = torch.Generator().manual_seed(seed + 1)
    layers, groups, units = [0, 2], [], []
    hidden = sorted(torch.randperm(96, generator=generator)[:48].tolist())
    weak_hidden = torch.ones(96, dtype=torch.bool)
    weak_hidden[hidden] = False
    head_dim = config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            group = int(torch.randint(0, 2, (1,), generator=generator))
            groups.append(group)
            weak = 1 - group
            layer.self_attn.v_proj.weight[weak * head_dim:(weak + 1) * head_dim] *= 0.01
            layer.self_attn.v_proj.bias[weak * head_dim:(weak + 1) * head_dim] *= 0.01
            kept = sorted(torch.randperm(160, generator=generator)[:80].tolist())
            units.append(kept)
            weak_units = torch.ones(160, dtype=torch.bool)
            weak_units[kept] = False
            layer.mlp.up_proj.weight[weak_units] *= 0.01
            if index not in layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[weak_hidden] = 0.01
        model.model.norm.weight[weak_hidden] = 0.01
    return model, {'layer': layers, 'head': groups, 'intermediate': units, 'hidden': hidden}


def batches(count=2, vocab=512, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [{'input_ids': torch.randint(0, vocab, (4, 24), generator=generator),
             'attention_mask': torch.ones(4, 24, dtype=torch.long)} for _ in range(count)]


def kept_sets(masks):
    return {'layer': torch.nonzero(masks['layer']).flatten().tolist(),
            'head': [int(torch.nonzero(row)[0]) for row in masks['head']],
            'intermediate': [torch.nonzero(row).flatten().tolist() for row in masks['intermediate']],
            'hidden': torch.nonzero(masks['hidden']).flatten().tolist()}


def test_scores_find_the_planted_units():
    model, planted = planted_model()
    scores = activation_importance(model, batches())
    assert scores['layer'][[1, 3]].abs().max() < 1e-6 < scores['layer'][[0, 2]].min()
    top = {'layer': hard_concrete.keep_top_k(scores['layer'], 2),
           'head': hard_concrete.keep_top_k(scores['head'], [1] * 4),
           'intermediate': hard_concrete.keep_top_k(scores['intermediate'], [80] * 4),
           'hidden': hard_concrete.keep_top_k(scores['hidden'], 48)}
    assert kept_sets(top) == planted
    assert model.training  # the mode is given back


def test_padding_positions_are_not_scored():
    model, _ = planted_model()
    [batch] = batches(count=1)
    padded = {'input_ids': torch.cat([batch['input_ids'], torch.zeros(4, 8, dtype=torch.long)], dim=1),
              'attention_mask': torch.cat([batch['attention_mask'], torch.zeros(4, 8, dtype=torch.long)], dim=1)}
    plain, with_padding = activation_importance(model, [batch]), activation_importance(model, [padded])
    for key in plain:  # right padding: the real tokens' activations are unchanged, padding is left out
        torch.testing.assert_close(plain[key], with_padding[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('shape,keep', [((40,), 20), ((3, 12), [8, 8, 8]), ((5,), 1)])
def test_log_alpha_from_scores_expects_the_keep_count(shape, keep):
    """The older placement (``pruned_keep_prob``): the expected count is the keep count."""
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    log_alpha = importance_log_alpha(scores, keep, pruned_keep_prob=0.05)
    assert torch.equal(hard_concrete.keep_top_k(log_alpha, keep), hard_concrete.keep_top_k(scores, keep))
    assert log_alpha.min() >= hard_concrete.LOG_ALPHA_MIN and log_alpha.max() <= hard_concrete.LOG_ALPHA_MAX
    expected = hard_concrete.prob_nonzero(log_alpha).sum(dim=-1)
    wanted = torch.as_tensor(keep, dtype=torch.float32)
    assert torch.allclose(expected, wanted, atol=0.05), (expected, wanted)
    assert torch.equal(expected.round(), wanted)  # so 'expected' eval masks keep the count from the start


class MaskRecorder(Callback):
    def fit_start(self, state, logger):  # runs after the algorithms' FIT_START
        masks = find_mask_module(state.model)
        self.expected, self.target = masks.deterministic('expected'), masks.deterministic('target')


def test_mask_learner_importance_init_keeps_the_planted_units():
    model, planted = planted_model()
    composer_model = HuggingFaceModel(model, use_logits=True)
    optimizer = DecoupledAdamW(composer_model.parameters(), lr=1e-4, weight_decay=0.0)
    rows = torch.randint(0, 512, (16, 24), generator=torch.Generator().manual_seed(5))
    loader = torch.utils.data.DataLoader([{'input_ids': r, 'labels': r} for r in rows], batch_size=4)
    recorder, logger = MaskRecorder(), InMemoryLogger()
    trainer = Trainer(model=composer_model, optimizers=optimizer, train_dataloader=loader, max_duration='2ba',
                      schedulers=ConstantWithWarmupScheduler(t_warmup='0ba'),
                      algorithms=[MaskLearner(TARGET, init='importance', calibration_batches=2),
                                  LagrangianUpdater(warmup_steps=2)],
                      callbacks=[recorder], loggers=[logger], progress_bar=False, log_to_console=False, device='cpu')
    trainer.fit()
    assert kept_sets(recorder.target) == planted
    # at the clamps a pruned entry keeps P(z != 0) = 0.047, so 'expected' eval masks keep a few more entries
    # (the top-k and the next ones) until a constraint moves the counts
    for key in ('layer', 'hidden'):
        assert set(planted[key]) <= set(kept_sets(recorder.expected)[key])
    masks = find_mask_module(composer_model)
    assert masks.get_extra_state()['init'] == 'importance'
    ramp = logger.data['drp/ramped_target/intermediate']
    assert ramp[0][1] == pytest.approx(0.5)  # no ramp from the source: the masks start at the target


def test_mask_learner_init_argument_is_checked():
    with pytest.raises(ValueError, match=r'drp_mask_learner\.init must be one of'):
        MaskLearner(TARGET, init='magnitude')
    with pytest.raises(ValueError, match=r'drp_mask_learner\.calibration_batches'):
        MaskLearner(TARGET, init='importance', calibration_batches=0)


# --- one-shot pruning (drp-prune-oneshot) ---------------------------------------------------

def test_oneshot_cli_keeps_the_planted_units_and_writes_a_loadable_model(tmp_path, tiny_tokenizer_dir, capsys):
    import json

    from transformers import AutoTokenizer

    from drp_foundry.commands.oneshot import main

    model, planted = planted_model()
    model.save_pretrained(tmp_path / 'source')
    AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)).save_pretrained(tmp_path / 'source')
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    words = 'the river city of old stone bridges carries trade and songs through every season'.split()
    for domain, shift in (('a', 0), ('b', 3)):
        lines = [json.dumps({'text': ' '.join(words[(i + shift) % len(words):] + words[:(i + shift) % len(words)])})
                 for i in range(30)]
        (corpus / f'{domain}.jsonl').write_text('\n'.join(lines) + '\n')
    target = 'layers=2,hidden=48,heads=3,kv_heads=1,intermediate=80'
    assert main([str(tmp_path / 'source'), str(tmp_path / 'out'), '--target', target, '--calibration', str(corpus),
                 '--num-sequences', '8', '--seq-len', '16']) == 0
    report = json.loads((tmp_path / 'out' / 'pruning_report.json').read_text())
    assert [layer['source_index'] for layer in report['kept_layers']] == planted['layer']
    for layer in report['kept_layers']:
        assert layer['kv_groups'] == [planted['head'][layer['source_index']]]
        assert layer['intermediate_dims'] == planted['intermediate'][layer['source_index']]
    assert report['kept_hidden_dims'] == planted['hidden']
    assert report['calibration_sequences'] == 8
    card = (tmp_path / 'out' / 'README.md').read_text()  # the model card, as drp-export writes one
    assert f"{report['params_after']:,}" in card and str(tmp_path / 'source') in card
    pruned = AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out'))
    assert sum(p.numel() for p in pruned.parameters()) == report['params_after'] < report['params_before']
    assert main([str(tmp_path / 'source'), str(tmp_path / 'out'), '--target', target, '--calibration',
                 str(corpus)]) == 2  # a non-empty output needs --overwrite
    assert main([str(tmp_path / 'source'), str(tmp_path / 'out2'), '--target', 'layers=2,hidden=48',
                 '--calibration', str(corpus)]) == 2
    assert 'missing keys' in capsys.readouterr().err
    assert not (tmp_path / 'out2').exists()


def test_calibration_sequences_from_data_prep_output_round_robin(tmp_path):
    import numpy as np
    from streaming import MDSWriter

    from drp_foundry.data.token_rows import CalibrationDataError, calibration_sequences
    from drp_foundry.oneshot import OneShotError, parse_target

    for domain, (value, count) in {'a': (1, 5), 'b': (2, 2)}.items():
        with MDSWriter(out=str(tmp_path / domain / 'train'), columns={'tokens': 'ndarray:int32'}) as writer:
            for _ in range(count):
                writer.write({'tokens': np.full(12, value, dtype=np.int32)})
    rows = calibration_sequences(tmp_path, num_sequences=5, seq_len=8)
    assert [int(row[0]) for row in rows] == [1, 2, 1, 2, 1]  # domains alternate until one runs out
    assert all(row.numel() == 8 and row.dtype == torch.int64 for row in rows)
    with pytest.raises(CalibrationDataError, match='--calibration .*does not exist'):
        calibration_sequences(tmp_path / 'missing', 4, 8)
    assert parse_target('layers=2, hidden=48,heads=3,intermediate=80').kv_heads is None
    with pytest.raises(OneShotError, match='layers=N'):
        parse_target('layers=two')
