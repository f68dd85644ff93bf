"""drp_cpu_autocast: the training forward, the loss and the teacher forward run in bf16 on CPU;
backward, weights, masks and evaluation stay float32; the run tracks the fp32 run."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from composer.optim import ConstantWithWarmupScheduler, DecoupledAdamW
from conftest import tiny_gqa_config
from transformers import AutoModelForCausalLM

from drp_foundry.composer.cpu_autocast import CpuAutocast
from drp_foundry.composer.distillation import Distillation
from drp_foundry.composer.lagrangian_updater import LagrangianUpdater
from drp_foundry.composer.mask_learner import MaskLearner, find_mask_module

TARGET = dict(layers=2, hidden=48, heads=3, intermediate=80)


def _record_dtypes(module: torch.nn.Module, seen: list) -> None:
    module.register_forward_hook(lambda mod, args, out: seen.append((torch.is_grad_enabled(), mod.training,
                                                                     out.dtype)))


def _trainer(tmp_path, autocast: bool, steps: int = 4, **kwargs):
    config = tiny_gqa_config()
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / 'teacher')
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation='sdpa')
    model = HuggingFaceModel(hf_model, use_logits=True)
    data = torch.randint(0, config.vocab_size, (32, 17), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{'input_ids': row, 'labels': row} for row in data], batch_size=4)
    algorithms = [MaskLearner(TARGET, mask_lr=0.1, lambda_lr=0.05), LagrangianUpdater(),
                  Distillation(str(tmp_path / 'teacher'), alpha=0.5)]
    if autocast:
        algorithms.append(CpuAutocast())
    return Trainer(model=model, optimizers=DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
                   train_dataloader=loader, eval_dataloader=loader, eval_interval=f'{steps}ba',
                   eval_subset_num_batches=1, max_duration=f'{steps}ba', algorithms=algorithms,
                   schedulers=ConstantWithWarmupScheduler(t_warmup='0ba'), progress_bar=False, log_to_console=False,
                   device='cpu', seed=0, device_train_microbatch_size=2, **kwargs)


def _fit_recording(trainer):
    student, teacher = [], []
    _record_dtypes(trainer.state.model.model.model.layers[0].mlp.down_proj, student)
    _record_dtypes(trainer.state.algorithms[2].teacher.model.layers[0].mlp.down_proj, teacher)
    losses = []
    original = trainer.state.model.loss

    def loss(outputs, batch):
        value = original(outputs, batch)
        losses.append(float(value))
        return value

    trainer.state.model.loss = loss
    trainer.fit()
    return student, teacher, losses


def test_training_forward_and_teacher_run_in_bf16_eval_and_weights_stay_fp32(tmp_path):
    trainer = _trainer(tmp_path, autocast=True)
    student, teacher, _ = _fit_recording(trainer)
    train_dtypes = {dtype for grad, training, dtype in student if grad and training}
    eval_dtypes = {dtype for grad, training, dtype in student if not training}
    assert train_dtypes == {torch.bfloat16}
    assert eval_dtypes == {torch.float32}, 'evaluation must stay fp32'
    assert {dtype for _, _, dtype in teacher} == {torch.bfloat16}  # the teacher forward (AFTER_LOSS) too
    assert all(p.dtype == torch.float32 for p in trainer.state.model.parameters())
    masks = find_mask_module(trainer.state.model)
    assert all(p.dtype == torch.float32 for p in masks.parameters())
    assert not torch.is_autocast_enabled('cpu')  # closed before each backward and at the end


def test_without_it_everything_is_fp32(tmp_path):
    student, teacher, _ = _fit_recording(_trainer(tmp_path, autocast=False))
    assert {dtype for *_, dtype in student + teacher} == {torch.float32}


def test_losses_track_the_fp32_run(tmp_path):
    _, _, fp32 = _fit_recording(_trainer(tmp_path / 'a', autocast=False))
    _, _, bf16 = _fit_recording(_trainer(tmp_path / 'b', autocast=True))
    assert len(fp32) == len(bf16) == 8  # 4 batches of 2 microbatches
    assert bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match=r"drp_cpu_autocast.dtype must be one of \['bfloat16'\]"):
        CpuAutocast(dtype='float16')


@pytest.mark.parametrize('native', [False, True])
def test_a_cpu_that_emulates_bf16_gets_a_warning_naming_the_fix(tmp_path, monkeypatch, native):
    from drp_foundry.composer import cpu_autocast

    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False, raising=False)
    assert cpu_autocast.native_cpu_bf16() is native
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _trainer(tmp_path, autocast=True, steps=1)
    slow = [w for w in caught if issubclass(w.category, cpu_autocast.SlowCpuBf16Warning)]
    if native:
        assert not slow
    else:
        assert len(slow) == 1 and 'remove drp_cpu_autocast' in str(slow[0].message)


@pytest.mark.parametrize('native', [False, True])
def test_the_demos_auto_precision_is_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch, native):
    from drp_foundry.demo.pipeline import resolve_precision

    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: native, raising=False)
    assert resolve_precision('auto') == ('bf16' if native else 'fp32')
    assert resolve_precision('bf16') == 'bf16' and resolve_precision('fp32') == 'fp32'  # a user's choice wins
