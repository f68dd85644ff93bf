"""drp_distillation: the KL term, alpha = 0 equals the plain run bitwise, the teacher stays frozen,
and distillation pulls the student toward the teacher (pruning and continued pretraining)."""

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.models import HuggingFaceModel
from composer.optim import ConstantWithWarmupScheduler, DecoupledAdamW
from conftest import tiny_gqa_config, tiny_llama_config
from transformers import AutoModelForCausalLM

from drp_foundry.composer.distillation import Distillation
from drp_foundry.composer.lagrangian_updater import LagrangianUpdater
from drp_foundry.composer.mask_learner import MaskLearner
from drp_foundry.losses.distillation import combine_losses, distillation_kl

GQA_TARGET = dict(layers=2, hidden=48, heads=3, intermediate=80)


def test_kl_is_zero_for_equal_logits_and_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=generator)
    assert distillation_kl(student, student.clone()).item() == 0.0
    teacher = torch.randn(2, 5, 11, generator=generator)
    labels = torch.tensor([[1, 2, 3, -100, 4], [5, 6, -100, -100, -100]])
    temperature = 2.0
    value = distillation_kl(student, teacher, labels, temperature)
    p = torch.softmax(teacher / temperature, -1)
    kl = (p * (torch.log_softmax(teacher / temperature, -1) - torch.log_softmax(student / temperature, -1))).sum(-1)
    keep = [(0, 0), (0, 1), (0, 3), (1, 0)]  # position i counts when labels[i + 1] != -100
    manual = sum(kl[b, i] for b, i in keep) / len(keep) * temperature ** 2
    assert value.item() == pytest.approx(manual.item(), rel=1e-6)
    assert value.item() > 0
    with pytest.raises(ValueError, match='vocabulary'):
        distillation_kl(student, teacher[..., :10])


def test_combine_losses_reweights_only_the_lm_part():
    lm = torch.tensor(2.0, requires_grad=True)
    penalty = torch.tensor(0.5, requires_grad=True)
    kl = torch.tensor(3.0, requires_grad=True)
    total = combine_losses(lm + penalty, lm, kl, alpha=0.25)
    assert total.item() == pytest.approx(0.75 * 2.0 + 0.5 + 0.25 * 3.0)
    total.backward()
    assert (lm.grad.item(), penalty.grad.item(), kl.grad.item()) == (0.75, 1.0, 0.25)


@pytest.mark.parametrize('kwargs,message', [
    (dict(teacher='/no/such/model'), r'drp_distillation\.teacher=.*config\.json'),
    (dict(alpha=1.5), r'drp_distillation\.alpha must lie in \[0, 1\]'),
    (dict(temperature=0), r'drp_distillation\.temperature must be > 0'),
])
def test_arguments_fail_early(kwargs, message, tmp_path):
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        Distillation(**{'teacher': str(tmp_path), **kwargs})


def _run(config, teacher_dir, steps, *, distillation=None, prune=False, seed=0, logger=None, rows=256, lr=1e-3):
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation='sdpa')
    model = HuggingFaceModel(hf_model, use_logits=True)
    optimizer = DecoupledAdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = torch.randint(0, config.vocab_size, (rows, 17), generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader([{'input_ids': row, 'labels': row} for row in data], batch_size=4)
    algorithms = [MaskLearner(GQA_TARGET, mask_lr=0.1, lambda_lr=0.05), LagrangianUpdater()] if prune else []
    if distillation is not None:
        algorithms.append(Distillation(str(teacher_dir), **distillation))
    trainer = Trainer(model=model, optimizers=optimizer, train_dataloader=loader, max_duration=f'{steps}ba',
                      schedulers=ConstantWithWarmupScheduler(t_warmup='0ba'), algorithms=algorithms,
                      loggers=[logger] if logger else [], progress_bar=False, log_to_console=False, device='cpu',
                      seed=seed, device_train_microbatch_size=2)
    trainer.fit()
    return model, trainer


@pytest.mark.parametrize('prune', [False, True], ids=['continued-pretraining', 'pruning'])
def test_alpha_zero_equals_the_plain_run_bitwise(tmp_path, prune):
    config = tiny_gqa_config()
    torch.manual_seed(123)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / 'teacher')  # another model
    plain, _ = _run(config, tmp_path / 'teacher', steps=5, prune=prune)
    logger = InMemoryLogger()
    distilled, trainer = _run(config, tmp_path / 'teacher', steps=5, prune=prune, logger=logger,
                              distillation={'alpha': 0.0, 'temperature': 2.0})
    assert [value for _, value in logger.data['drp/distillation/kl']][-1] > 0  # the KL was computed
    plain_state, distilled_state = plain.state_dict(), distilled.state_dict()
    assert plain_state.keys() == distilled_state.keys()
    for key in plain_state:
        if isinstance(plain_state[key], torch.Tensor):  # the masks' extra state is a dict
            assert torch.equal(plain_state[key], distilled_state[key]), key
    teacher = trainer.state.algorithms[-1].teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any('teacher' in key for key in distilled_state)  # not part of the model / checkpoint


def test_kl_is_zero_when_the_student_is_the_teacher(tmp_path):
    config = tiny_llama_config()
    torch.manual_seed(0)  # _run seeds 0 before building the student: the same weights as this teacher
    AutoModelForCausalLM.from_config(config, attn_implementation='sdpa').save_pretrained(tmp_path / 'teacher')
    logger = InMemoryLogger()
    # the first batch's KL is computed before any optimizer step, with the student equal to the teacher
    _run(config, tmp_path / 'teacher', steps=1, logger=logger, distillation={'alpha': 1.0})
    assert logger.data['drp/distillation/kl'][0][1] == pytest.approx(0.0, abs=1e-6)


def test_distillation_pulls_the_student_toward_the_teacher(tmp_path):
    """On 8 repeated sequences, alpha = 1 drives the KL down; plain LM training (alpha = 0) does not."""
    config = tiny_llama_config()
    torch.manual_seed(0)  # the student's initial weights (_run seeds 0), with a sharper LM head
    teacher = AutoModelForCausalLM.from_config(config, attn_implementation='sdpa')
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    teacher.save_pretrained(tmp_path / 'teacher')
    curves = {}
    for alpha in (1.0, 0.0):
        logger = InMemoryLogger()
        _run(config, tmp_path / 'teacher', steps=40, logger=logger, distillation={'alpha': alpha}, rows=8, lr=3e-3)
        curves[alpha] = [value for _, value in logger.data['drp/distillation/kl']]
    assert curves[1.0][0] == curves[0.0][0]  # the same start
    assert curves[1.0][-1] < 0.5 * curves[1.0][0], curves[1.0]
    assert curves[0.0][-1] > curves[0.0][0], curves[0.0]
