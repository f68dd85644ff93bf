"""Importance-initialised masks start at the one-shot model (issue 26, Build 1): the step-0 export of
``init: importance`` equals ``drp-prune-oneshot``'s model on the same calibration batches."""

import pytest
import torch
from composer import Callback, Trainer
from composer.models import HuggingFaceModel
from composer.optim import ConstantWithWarmupScheduler, DecoupledAdamW
from conftest import perturbed_tiny_gqa_model, tiny_gqa_config

from drp_foundry.composer.lagrangian_updater import LagrangianUpdater
from drp_foundry.composer.mask_learner import MaskLearner, find_mask_module
from drp_foundry.data.token_rows import token_batches
from drp_foundry.oneshot import oneshot_prune
from drp_foundry.pruning import hard_concrete
from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.export import fold_and_slice
from drp_foundry.pruning.hf_injection import inject_masks
from drp_foundry.pruning.importance import activation_importance
from drp_foundry.pruning.mask_module import L0MaskModule

TARGET = dict(layers=3, hidden=64, heads=3, kv_heads=1, intermediate=96)  # of 4 / 96 / 6 (2 KV) / 160


source_model = perturbed_tiny_gqa_model


def sequences(count=8, length=20, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (length,), generator=generator) for _ in range(count)]


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize('granularities', [('layer', 'head', 'intermediate', 'hidden'), ('head', 'intermediate')])
def test_step0_export_of_importance_init_is_the_oneshot_model(granularities):
    target = dict(TARGET) if len(granularities) == 4 else dict(TARGET, layers=4, hidden=96)
    model = source_model()
    calibration = sequences()
    oneshot, oneshot_report, _ = oneshot_prune(model, target, calibration, batch_size=4)

    source = DecoderArchitecture.from_hf_config(model.config)
    masks = L0MaskModule(source, TargetArchitecture.from_config(target), granularities=granularities,
                         init='importance')
    inject_masks(model, masks)
    scores = activation_importance(model, token_batches(calibration, 4, torch.device('cpu')))  # masks at 1 while scored
    masks.init_from_importance(scores)
    deterministic = masks.deterministic('target')
    for key, mask in deterministic.items():  # exactly 0/1: nothing of the kept structures is scaled
        assert set(mask.unique().tolist()) <= {0.0, 1.0}, key
    exported, report = fold_and_slice(model, deterministic)
    assert [layer.source_index for layer in report.kept_layers] == \
        [layer.source_index for layer in oneshot_report.kept_layers]
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(logits(exported, tokens), logits(oneshot, tokens), rtol=0, atol=1e-5)
    # the masked model in eval mode (target counts) is the same model
    masks.eval_mode = 'target'
    torch.testing.assert_close(logits(model, tokens), logits(oneshot, tokens), rtol=0, atol=1e-5)


def test_importance_log_alpha_sits_at_the_clamps_in_importance_order():
    from drp_foundry.pruning.importance_masks import importance_log_alpha

    scores = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    log_alpha = importance_log_alpha(scores, [5, 5, 5])
    kept = hard_concrete.keep_top_k(scores, [5, 5, 5])
    assert (log_alpha[kept] > hard_concrete.LOG_ALPHA_MAX - 1e-3 - 1e-6).all()
    assert (log_alpha[~kept] < hard_concrete.LOG_ALPHA_MIN + 1e-3 + 1e-6).all()
    for row in range(3):  # the order inside each set is the importance order
        assert torch.equal(log_alpha[row].argsort(), scores[row].argsort())


def test_soft_values_of_the_older_default_scale_the_kept_structures():
    """The regression the hard values fix: soft values at the clamp still scale every kept structure by 0.996."""
    log_alpha = torch.full((4,), hard_concrete.LOG_ALPHA_MAX)
    soft = hard_concrete.deterministic_mask(log_alpha, 2)
    hard = hard_concrete.deterministic_mask(log_alpha, 2, values='hard')
    assert soft.max() < 0.997 and torch.equal(hard, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match='mask values must be one of'):
        hard_concrete.deterministic_mask(log_alpha, 2, values='binary')


class FirstMasks(Callback):
    def fit_start(self, state, logger):  # after the algorithms' FIT_START
        self.masks = {key: value.clone() for key, value in find_mask_module(state.model).deterministic('target').items()}


def test_mask_learner_importance_init_starts_at_the_oneshot_masks():
    model = source_model()
    rows = torch.randint(0, 512, (8, 20), generator=torch.Generator().manual_seed(5))
    loader = torch.utils.data.DataLoader([{'input_ids': r, 'labels': r} for r in rows], batch_size=4)
    calibration = [row for row in rows[:8]]  # the two batches the learner scores
    oneshot, oneshot_report, _ = oneshot_prune(source_model(), TARGET, calibration, batch_size=4)
    composer_model = HuggingFaceModel(model, use_logits=True)
    recorder = FirstMasks()
    trainer = Trainer(model=composer_model, optimizers=DecoupledAdamW(composer_model.parameters(), lr=1e-4),
                      train_dataloader=loader, max_duration='1ba', schedulers=ConstantWithWarmupScheduler(t_warmup='0ba'),
                      algorithms=[MaskLearner(TARGET, init='importance', calibration_batches=2, mask_lr=0.1),
                                  LagrangianUpdater(warmup_steps=0)],
                      callbacks=[recorder], progress_bar=False, log_to_console=False, device='cpu')
    trainer.fit()
    masks = find_mask_module(composer_model)
    assert masks.mask_values == 'hard' and masks.get_extra_state()['mask_values'] == 'hard'
    exported, report = fold_and_slice(source_model(), recorder.masks)  # the step-0 masks on the source weights
    assert report.kept_layers == oneshot_report.kept_layers and report.kept_hidden_dims == oneshot_report.kept_hidden_dims
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(logits(exported, tokens), logits(oneshot, tokens), rtol=0, atol=1e-5)


def test_constant_init_keeps_the_papers_soft_values_and_old_checkpoints_read_soft():
    source = DecoderArchitecture.from_hf_config(tiny_gqa_config())
    masks = L0MaskModule(source, TargetArchitecture.from_config(TARGET))
    assert masks.mask_values == 'soft'
    state = L0MaskModule(source, TargetArchitecture.from_config(TARGET), init='importance').get_extra_state()
    del state['mask_values']  # a checkpoint written before the key
    assert L0MaskModule.from_extra_state(state).mask_values == 'soft'
    with pytest.raises(ValueError, match='drp_mask_learner.mask_values'):
        MaskLearner(TARGET, mask_values='binary')
