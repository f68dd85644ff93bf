"""drp_mask_learner + drp_lagrangian: the Lagrangian math, argument checks, Composer integration
(param groups, LR schedule, logging, checkpoint resume) and short CPU pruning runs that reach
the target size."""

import pytest
import torch
from composer import Callback, Event, Trainer
from composer.loggers import InMemoryLogger
from composer.models import HuggingFaceModel
from composer.optim import ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from conftest import tiny_gqa_config, tiny_llama_config
from transformers import AutoModelForCausalLM

from drp_foundry.composer.lagrangian_updater import LagrangianUpdater, apply_lagrangian, lagrangian_for_step
from drp_foundry.composer.mask_learner import GROUP_KEY, MaskLearner, apply_mask_learner, find_mask_module
from drp_foundry.pruning.export import fold_and_slice
from drp_foundry.pruning.lagrangian import lagrangian_terms, ramped_target
from drp_foundry.pruning.mask_module import NoSizeTermsError

LLAMA_TARGET = dict(layers=2, hidden=32, heads=2, intermediate=64)
GQA_TARGET = dict(layers=2, hidden=48, heads=3, intermediate=80)


# --- the Lagrangian -------------------------------------------------------------------------

def test_penalty_value_and_gradient_directions():
    s = torch.tensor(0.7, requires_grad=True)
    lambda_1 = torch.tensor(0.3, requires_grad=True)
    lambda_2 = torch.tensor(2.0, requires_grad=True)
    terms = lagrangian_terms({'hidden': s}, {'hidden': 0.5}, {'hidden': lambda_1}, {'hidden': lambda_2})
    gap = 0.2
    assert terms['hidden'].item() == pytest.approx(0.3 * gap + 2.0 * gap ** 2)
    terms['hidden'].backward()
    assert s.grad.item() == pytest.approx(0.3 + 2 * 2.0 * gap)  # masks descend
    assert lambda_1.grad.item() == pytest.approx(-gap)  # lambdas ascend: a descent step raises them
    assert lambda_2.grad.item() == pytest.approx(-gap ** 2)


def test_target_ramp():
    assert ramped_target(1.0, 0.25, 0, 100) == 1.0
    assert ramped_target(1.0, 0.25, 50, 100) == pytest.approx(0.625)
    assert ramped_target(1.0, 0.25, 100, 100) == 0.25
    assert ramped_target(1.0, 0.25, 500, 100) == 0.25
    assert ramped_target(1.0, 0.25, 0, 0) == 0.25
    with pytest.raises(ValueError, match='warmup_steps'):
        ramped_target(1.0, 0.25, 0, -1)


def test_apply_lagrangian_adds_the_ramped_penalty():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    masks = apply_mask_learner(model, LLAMA_TARGET)
    with torch.no_grad():
        for value in masks.lambda_parameters():
            value.fill_(0.5)
    model.train()
    model(input_ids=torch.randint(0, model.config.vocab_size, (1, 8)))  # the training forward records the terms
    loss = torch.tensor(3.0)
    total = apply_lagrangian(model, loss, step=5, warmup_steps=10)
    expected, targets = masks.expected_sizes(), masks.target_sizes()
    assert expected['head'].shape == (masks.source.num_layers,)  # one constraint per layer
    manual = sum((0.5 * (expected[k] - (1 + (targets[k] - 1) * 0.5)) + 0.5 * (expected[k] - (1 + (targets[k] - 1) * 0.5))
                  ** 2).mean() for k in expected)
    assert total.item() == pytest.approx(3.0 + manual.item(), rel=1e-6)


# --- argument checks ------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs,message', [
    (dict(target={'layers': 2, 'hidden': 32, 'heads': 2}), r'drp_mask_learner\.target: missing keys \[.intermediate.\]'),
    (dict(target={**LLAMA_TARGET, 'ffn': 3}), r"unknown keys \['ffn'\]"),
    (dict(target=LLAMA_TARGET, lambda_lr=-1.0), r'drp_mask_learner\.lambda_lr must be > 0'),
    (dict(target=LLAMA_TARGET, granularities=['heads']), r'drp_mask_learner\.granularities'),
    (dict(target=LLAMA_TARGET, eval_mask_mode='sampled'), r'drp_mask_learner\.eval_mask_mode'),
])
def test_mask_learner_arguments_fail_early(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskLearner(**kwargs)


@pytest.mark.parametrize('kwargs,message', [
    (dict(warmup_steps='2ep'), r"drp_lagrangian\.warmup_steps must count batches"),
    (dict(warmup_steps=-3), r'drp_lagrangian\.warmup_steps must be a non-negative integer'),
    (dict(warmup_fraction=1.5), r'drp_lagrangian\.warmup_fraction'),
])
def test_lagrangian_updater_arguments_fail_early(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LagrangianUpdater(**kwargs)
    assert LagrangianUpdater(warmup_steps='64ba').warmup_steps == 64


# --- Composer integration -------------------------------------------------------------------

def make_trainer(model_config, target, steps, *, seed=0, mask_lr=0.1, lambda_lr=0.05, scheduler=None, loggers=(),
                 callbacks=(), microbatch=None, follows=True, **trainer_kwargs):
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(model_config, attn_implementation='sdpa')
    model = HuggingFaceModel(hf_model, use_logits=True)
    optimizer = DecoupledAdamW(model.parameters(), lr=1e-4, weight_decay=0.0)  # built before the Trainer, like Foundry
    data = torch.randint(0, model_config.vocab_size, (4096, 17), generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader([{'input_ids': row, 'labels': row} for row in data], batch_size=4)
    return Trainer(model=model, optimizers=optimizer, train_dataloader=loader, max_duration=f'{steps}ba',
                   schedulers=scheduler or ConstantWithWarmupScheduler(t_warmup='10ba'),
                   algorithms=[MaskLearner(target, mask_lr=mask_lr, lambda_lr=lambda_lr,
                                           mask_lr_follows_schedule=follows), LagrangianUpdater()],
                   loggers=list(loggers), callbacks=list(callbacks), progress_bar=False, log_to_console=False,
                   device='cpu', seed=seed, device_train_microbatch_size=microbatch, **trainer_kwargs)


def test_bad_target_fails_at_trainer_init_before_training():
    with pytest.raises(ValueError, match=r'drp_mask_learner\.target\.hidden=80 exceeds the source model \(64\)'):
        make_trainer(tiny_llama_config(), {**LLAMA_TARGET, 'hidden': 80}, steps=2)
    with pytest.raises(ValueError, match=r'drp_mask_learner\.target\.heads=4 is not a multiple'):
        make_trainer(tiny_gqa_config(), {**GQA_TARGET, 'heads': 4}, steps=2)


def test_fsdp_without_orig_params_fails_at_init():
    """(FSDP2 is supported: tests/test_sharded_training.py.)"""
    from types import SimpleNamespace

    from composer.utils.parallelism import FSDPConfig

    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    state = SimpleNamespace(fsdp_config=FSDPConfig(use_orig_params=False), model=model, optimizers=())
    with pytest.raises(ValueError, match='use_orig_params: true'):
        MaskLearner(LLAMA_TARGET).apply(Event.INIT, state, logger=None)


class GroupLrRecorder(Callback):
    def __init__(self):
        self.lrs = []

    def before_forward(self, state, logger):
        self.lrs.append([group['lr'] for group in state.optimizers[0].param_groups])


@pytest.mark.parametrize('follows', [True, False])
def test_mask_groups_with_the_lr_schedule_and_microbatches(follows):
    recorder, logger = GroupLrRecorder(), InMemoryLogger()
    trainer = make_trainer(tiny_llama_config(), LLAMA_TARGET, steps=6, mask_lr=0.2, lambda_lr=0.3,
                           scheduler=CosineAnnealingWithWarmupScheduler(t_warmup='4ba', alpha_f=0.1),
                           callbacks=[recorder], loggers=[logger], microbatch=2, follows=follows)
    optimizer = trainer.state.optimizers[0]
    groups = optimizer.param_groups
    assert [g.get(GROUP_KEY) for g in groups] == [None, 'masks', 'lambdas']
    assert [g['weight_decay'] for g in groups[1:]] == [0.0, 0.0]
    assert trainer.state.schedulers[0].base_lrs == [1e-4, 0.2, 0.3]  # compiled after INIT: our groups included
    masks = find_mask_module(trainer.state.model)
    assert {id(p) for p in groups[1]['params']} == {id(p) for p in masks.mask_parameters()}
    assert all(id(p) not in {id(q) for q in masks.parameters()} for p in groups[0]['params'])
    trainer.fit()
    for model_lr, mask_lr, lambda_lr in recorder.lrs[1:]:
        multiplier = model_lr / 1e-4
        if follows:
            assert mask_lr == pytest.approx(0.2 * multiplier) and lambda_lr == pytest.approx(0.3 * multiplier)
        else:
            assert (mask_lr, lambda_lr) == (0.2, 0.3)
    assert len({round(lrs[0], 12) for lrs in recorder.lrs}) > 2  # the schedule did move
    for key in ('drp/expected_size/hidden', 'drp/target_size/layer', 'drp/lambda_1/head', 'drp/lambda_2/intermediate',
                'drp/expected_num_parameters', 'drp/lagrangian/total', 'drp/ramped_target/hidden'):
        assert len(logger.data[key]) == 6, key  # every batch
    ramp = [value for _, value in logger.data['drp/ramped_target/hidden']]
    assert ramp[0] == 1.0 and ramp[-1] == 0.5  # warm-up: 20% of 6 batches -> 1 batch
    assert any(value != 0 for _, value in logger.data['drp/lambda_1/hidden'])


def test_masks_lambdas_and_optimizer_state_resume_from_a_checkpoint(tmp_path):
    first = make_trainer(tiny_gqa_config(), GQA_TARGET, steps=4, save_folder=str(tmp_path), save_interval='4ba',
                         save_filename='ep{epoch}-ba{batch}.pt')
    first.fit()
    saved = find_mask_module(first.state.model)
    saved_optimizer = first.state.optimizers[0].state_dict()
    checkpoint = tmp_path / 'ep0-ba4.pt'
    assert checkpoint.exists()

    second = make_trainer(tiny_gqa_config(), GQA_TARGET, steps=6, seed=1, load_path=str(checkpoint))
    restored = find_mask_module(second.state.model)
    assert int(second.state.timestamp.batch) == 4
    for a, b in zip(saved.parameters(), restored.parameters()):
        assert torch.equal(a, b)
    assert any(value.item() != 0 for value in restored.lambda_parameters())
    restored_optimizer = second.state.optimizers[0].state_dict()
    assert len(restored_optimizer['param_groups']) == len(saved_optimizer['param_groups']) == 3
    for index, group in enumerate(saved_optimizer['param_groups'][1:], start=1):
        for param_id in group['params']:
            torch.testing.assert_close(restored_optimizer['state'][param_id]['exp_avg'],
                                       saved_optimizer['state'][param_id]['exp_avg'])
    second.fit()
    assert int(second.state.timestamp.batch) == 6

    with pytest.raises(ValueError, match='target='):  # resuming with another target is refused
        make_trainer(tiny_gqa_config(), {**GQA_TARGET, 'layers': 3}, steps=6, load_path=str(checkpoint))


def test_llm_foundry_hf_causal_lm_with_registered_algorithms(tmp_path, tiny_tokenizer):
    """The YAML path: Foundry's ComposerHFCausalLM, optimizer and scheduler builders, algorithms by name."""
    from llmfoundry.models.hf.hf_causal_lm import ComposerHFCausalLM
    from llmfoundry.utils.builders import build_algorithm, build_optimizer, build_scheduler

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_gqa_config()).save_pretrained(tmp_path / 'source')
    model = ComposerHFCausalLM(tiny_tokenizer, pretrained_model_name_or_path=str(tmp_path / 'source'),
                               pretrained=True, use_train_metrics=False)
    optimizer = build_optimizer(model, 'decoupled_adamw', {'lr': 1e-4, 'weight_decay': 0.0})
    algorithms = [build_algorithm('drp_mask_learner', {'target': GQA_TARGET, 'mask_lr': 1.0, 'lambda_lr': 1.0}),
                  build_algorithm('drp_lagrangian', {'warmup_steps': '2ba'})]
    rows = torch.randint(0, 512, (16, 17), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{'input_ids': r, 'labels': r, 'attention_mask': torch.ones_like(r)}
                                          for r in rows], batch_size=4)
    logger = InMemoryLogger()
    trainer = Trainer(model=model, optimizers=optimizer, train_dataloader=loader, max_duration='4ba',
                      schedulers=build_scheduler('cosine_with_warmup', {'t_warmup': '2ba', 'alpha_f': 0.1}),
                      algorithms=algorithms, loggers=[logger], device='cpu', progress_bar=False, log_to_console=False)
    assert trainer.state.schedulers[0].base_lrs == [1e-4, 1.0, 1.0]
    trainer.fit()
    masks = find_mask_module(model)
    assert masks is model.model.drp_masks and 'model.drp_masks.log_alpha_head' in model.state_dict()
    assert len(logger.data['drp/lagrangian/total']) == 4
    assert masks.log_alpha('hidden').mean().item() < 4.5  # the masks moved (they start at ln 100 = 4.605)


# --- short CPU pruning runs -----------------------------------------------------------------

def assert_reached_target(curve, masks, label):
    print(f'\n{label}: step, expected params / target params, expected fractions')
    for row in curve:
        print(row)
    final = curve[-1]
    assert curve[0][1] > 3.0  # started at the source size
    assert abs(final[1] - 1.0) < 0.02, final
    targets = masks.target_sizes()
    for key, value in final[2].items():
        assert abs(value - targets[key]) < 0.02, (key, value, targets[key])


def test_composer_pruning_run_reaches_the_target_llama():
    """Trainer + drp_mask_learner + drp_lagrangian, 300 batches, ramp over the default 20% (60 batches)."""
    logger = InMemoryLogger()
    trainer = make_trainer(tiny_llama_config(), LLAMA_TARGET, steps=300, loggers=[logger])
    trainer.fit()
    masks = find_mask_module(trainer.state.model)
    target_params = masks.target_num_parameters()
    data = logger.data
    curve = []
    for index in list(range(0, 300, 30)) + [299]:
        fractions = {key: round(data[f'drp/expected_size/{key}'][index][1], 4) for key in masks.granularities}
        curve.append((index, round(data['drp/expected_num_parameters'][index][1] / target_params, 4), fractions))
    assert_reached_target(curve, masks, 'tiny Llama (Composer Trainer)')


def test_functional_pruning_run_reaches_the_target_in_every_layer_gqa():
    """apply_mask_learner + apply_lagrangian in a plain loop (no Trainer) on the Qwen2 GQA model.

    The per-layer Lagrangian (Sheared LLaMA's) ends with the target counts of KV groups and FFN
    units in every layer of the eval-mode (deterministic, ``eval_mask_mode: expected``) masks, so
    the masked model in eval mode and the exported model have the same loss. (With the former
    aggregate constraint this run ended with [1, 0, 1, 1] groups and [92, 61, 75, 46] units.)
    """
    torch.manual_seed(0)
    config = tiny_gqa_config()
    model = AutoModelForCausalLM.from_config(config, attn_implementation='sdpa').train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    masks = apply_mask_learner(model, GQA_TARGET, optimizer, mask_lr=0.1, lambda_lr=0.05)
    steps, warmup = 300, 60
    target_params = masks.target_num_parameters()
    generator = torch.Generator().manual_seed(0)
    curve = []
    for step in range(steps):
        batch = torch.randint(0, config.vocab_size, (4, 17), generator=generator)
        loss = model(input_ids=batch, labels=batch).loss
        loss = apply_lagrangian(model, loss, step, warmup)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 30 == 0 or step == steps - 1:
            terms = masks.last_size_terms
            curve.append((step, round(terms.num_parameters.item() / target_params, 4),
                          {key: round(value.mean().item(), 4) for key, value in terms.expected.items()}))
    assert_reached_target(curve, masks, 'tiny Qwen2 GQA (functional API)')
    for key, value in masks.last_size_terms.expected.items():  # every layer, not just the mean
        assert (value - masks.target_sizes()[key]).abs().max() < 0.02, (key, value)
    counts = masks.keep_counts('expected')
    assert counts['layer'] == GQA_TARGET['layers'] and counts['hidden'] == GQA_TARGET['hidden']
    assert counts['head'].tolist() == [1] * config.num_hidden_layers  # 3 query heads = 1 of 2 KV groups
    assert counts['intermediate'].tolist() == [GQA_TARGET['intermediate']] * config.num_hidden_layers
    model.eval()
    batch = torch.randint(0, config.vocab_size, (8, 17), generator=generator)
    with torch.no_grad():
        masked_loss = model(input_ids=batch, labels=batch).loss.item()  # deterministic 'expected' masks
        exported, report = fold_and_slice(model, masks.deterministic('target'))
        exported_loss = exported(input_ids=batch, labels=batch).loss.item()
    assert report.params_after == masks.target_num_parameters()
    assert abs(masked_loss - exported_loss) < 1e-4, (masked_loss, exported_loss)
    model.train()
    # and the pending terms were consumed each step (no stale graph kept across steps): asking again without a
    # training forward raises instead of reading the (possibly FSDP-sharded) local parameters
    assert not masks.has_pending_size_terms
    with pytest.raises(NoSizeTermsError, match='training forward'):
        lagrangian_for_step(masks, steps, warmup)
    model(input_ids=batch, labels=batch)
    total, _, _ = lagrangian_for_step(masks, steps, warmup)
    assert torch.isfinite(total)
