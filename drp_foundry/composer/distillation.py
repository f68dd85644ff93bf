"""Logit distillation from the frozen source model (registered as ``drp_distillation``; ours).

``loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * LM loss`` at every microbatch
(``drp_foundry.losses.distillation``), usable in the pruning run (the student is the masked
source model) and in continued pretraining (the student is the exported model). The teacher is
a Hugging Face directory, normally the source model that is pruned:

    algorithms:
      drp_distillation: {teacher: models/smollm2-135m, alpha: 0.5, temperature: 1.0}

- The teacher is loaded once (``Event.INIT``, under a forked RNG so the run's random stream is
  unchanged), frozen (``requires_grad=False``), kept in eval mode (no dropout), moved to the
  student's device and dtype at ``FIT_START`` and run under ``torch.no_grad`` inside the same
  precision context as the student's forward (``amp_bf16`` -> bf16 autocast for both). It is
  not a submodule of the Composer model: it is not trained, not checkpointed, not in the
  optimizer, and ``model.train()`` does not reach it.
- At ``AFTER_LOSS`` the LM part of ``state.loss`` (``state.outputs['loss']``, the HF loss) is
  reweighted to ``1 - alpha`` and ``alpha * KL`` is added; other additive terms (the Lagrangian
  penalty of ``drp_lagrangian``) are left as they are, whatever the algorithm order.
  ``alpha: 0`` gives bitwise the plain run (the KL is still computed and logged).
- Logged every batch: ``drp/distillation/kl`` and ``drp/distillation/lm_loss`` (last microbatch).
- Sharding: when ``torch.distributed`` runs with more than one rank and the run has an
  ``fsdp_config``, the teacher is sharded like the student, so each rank holds 1/N of its
  weights and gathers one decoder layer at a time; every rank runs the teacher forward on its
  own microbatch in lockstep, as FSDP needs. FSDP2 (env ``FSDP_VERSION=2``): ``fully_shard``
  per decoder layer and at the root, on the student's device mesh (2 CPU ranks in
  tests/test_sharded_training.py: each rank holds half the teacher, the losses equal the
  1-rank run's). FSDP (v1): its own ``FullyShardedDataParallel`` (FULL_SHARD, one unit per
  decoder layer); not run here, FSDP v1 needs CUDA. Under DDP the teacher is whole on every rank.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from composer.core import Algorithm, Event, State, get_precision_context
from composer.loggers import Logger

from drp_foundry.composer.hf_model import unwrap_hf_model
from drp_foundry.losses.distillation import combine_losses, distillation_kl

log = logging.getLogger(__name__)

__all__ = ['Distillation', 'load_teacher', 'apply_distillation']


def load_teacher(path: str | Path, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> torch.nn.Module:
    """A frozen HF causal LM in eval mode (loaded without touching the global RNG)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        teacher = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype or torch.float32)
    teacher.requires_grad_(False)
    teacher.eval()
    if device is not None:
        teacher.to(device)
    return teacher


def apply_distillation(loss: torch.Tensor, lm_loss: torch.Tensor, student_logits: torch.Tensor,
                       teacher: torch.nn.Module, batch: dict[str, Any], alpha: float,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form for any loop: (new loss, KL). Runs the teacher on ``batch`` without grad."""
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch['input_ids'], attention_mask=batch.get('attention_mask')).logits
    kl = distillation_kl(student_logits, teacher_logits, batch.get('labels'), temperature)
    return combine_losses(loss, lm_loss, kl, alpha), kl


def _decoder_layers(teacher: torch.nn.Module) -> list[torch.nn.Module]:
    from drp_foundry.pruning.layouts import get_layout

    return list(get_layout(getattr(teacher.config, 'model_type', None)).decoder_layers(teacher))


def _shard_teacher(teacher: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap the teacher in FSDP (FULL_SHARD, one unit per decoder layer). Untested multi-rank path (CUDA only)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layer_types = {type(layer) for layer in _decoder_layers(teacher)}
    return FullyShardedDataParallel(teacher, auto_wrap_policy=ModuleWrapPolicy(layer_types),
                                    sharding_strategy=ShardingStrategy.FULL_SHARD,
                                    device_id=device if device.type == 'cuda' else None, use_orig_params=True)


def _shard_teacher_fsdp2(teacher: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the rest, on the student's device mesh. Each rank
    keeps 1/N of the teacher; its forward gathers one layer at a time and frees it after (tested on 2 CPU
    ranks in tests/test_sharded_training.py)."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(teacher):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    return teacher


def _student_mesh(model: torch.nn.Module) -> Any:
    """The device mesh of the student's FSDP2 (DTensor) parameters, or None if it has none."""
    from torch.distributed.tensor import DTensor

    return next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)


class Distillation(Algorithm):
    """Distil a frozen teacher's logits into the trained model (``drp_distillation``).

    Args:
        teacher: Hugging Face directory of the teacher (the source model of the pruning run).
        alpha: weight of the KL term; the LM loss gets ``1 - alpha``. 0 = plain training.
        temperature: softmax temperature T of both distributions (the KL is multiplied by T^2).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                      num_hidden_layers=2, num_attention_heads=4))
        >>> from drp_foundry import Distillation, apply_distillation
        >>> teacher = LlamaForCausalLM(model.config).eval()
        >>> batch = {'input_ids': torch.randint(0, 64, (2, 8))}
        >>> batch['labels'] = batch['input_ids']
        >>> out = model(**batch)
        >>> loss, kl = apply_distillation(out.loss, out.loss, out.logits, teacher, batch, alpha=0.5)
        >>> bool(kl > 0)
        True
        >>> # in a Trainer or a Foundry YAML (algorithms: drp_distillation: {teacher: DIR}):
        >>> # Trainer(..., algorithms=[Distillation(teacher='models/smollm2-135m', alpha=0.5)])
    """

    def __init__(self, teacher: str, alpha: float = 0.5, temperature: float = 1.0):
        if not isinstance(teacher, (str, Path)) or not (Path(teacher) / 'config.json').is_file():
            raise ValueError(f'drp_distillation.teacher={teacher!r} is not a Hugging Face model directory (no '
                             f'config.json); point it to the source model, e.g. models/smollm2-135m')
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f'drp_distillation.alpha must lie in [0, 1], got {alpha!r}')
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f'drp_distillation.temperature must be > 0, got {temperature!r}')
        self.teacher_path = str(teacher)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.teacher: torch.nn.Module | None = None
        self._last_metrics: dict[str, float] = {}

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.teacher = load_teacher(self.teacher_path)
            student = unwrap_hf_model(state.model)
            student_vocab = getattr(getattr(student, 'config', None), 'vocab_size', None)
            if student_vocab is not None and student_vocab != self.teacher.config.vocab_size:
                raise ValueError(f'drp_distillation.teacher {self.teacher_path} has vocab_size '
                                 f'{self.teacher.config.vocab_size} but the trained model has {student_vocab}; the '
                                 f'teacher must share the tokenizer (use the source model of the pruning run)')
            log.info('drp_distillation: teacher %s (alpha %.3g, T %.3g)', self.teacher_path, self.alpha,
                     self.temperature)
        elif event == Event.FIT_START:
            self._place_teacher(state)
        elif event == Event.AFTER_LOSS:
            self._distil(state)
        elif event == Event.BATCH_END and self._last_metrics:
            logger.log_metrics(self._last_metrics)

    def _place_teacher(self, state: State) -> None:
        assert self.teacher is not None
        if isinstance(self.teacher, (torch.distributed.fsdp.FullyShardedDataParallel,
                                     torch.distributed.fsdp.FSDPModule)):
            return
        reference = next(state.model.parameters())
        device = reference.device if reference.device.type != 'meta' else state.device._device
        self.teacher.to(device=device, dtype=reference.dtype)
        from composer.utils.parallelism import FSDP2Config

        # sharded like the student: FSDP2 on the student's mesh (tested on CPU ranks); FSDP v1 (untested, CUDA only)
        if state.fsdp_config is not None and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            if isinstance(state.fsdp_config, FSDP2Config):
                mesh = _student_mesh(state.model)
                if mesh is None:
                    raise RuntimeError('drp_distillation: the run uses FSDP2 but the model has no sharded (DTensor) '
                                       'parameter at FIT_START; cannot shard the teacher on its mesh')
                self.teacher = _shard_teacher_fsdp2(self.teacher, mesh)
            else:
                self.teacher = _shard_teacher(self.teacher, device)
        self.teacher.eval()

    def _distil(self, state: State) -> None:
        outputs = state.outputs
        lm_loss = outputs.get('loss') if isinstance(outputs, dict) or hasattr(outputs, 'get') else None
        logits = outputs.get('logits') if lm_loss is not None else None
        if lm_loss is None or logits is None:
            raise RuntimeError('drp_distillation needs the HF model outputs (loss and logits) of a hf_causal_lm model')
        if not isinstance(state.loss, torch.Tensor):
            raise TypeError(f'drp_distillation expects a tensor loss, got {type(state.loss).__name__}')
        assert self.teacher is not None
        self.teacher.eval()
        with get_precision_context(state.precision, state.precision_config):
            state.loss, kl = apply_distillation(state.loss, lm_loss, logits, self.teacher, state.batch, self.alpha,
                                                self.temperature)
        if isinstance(self.teacher, torch.distributed.fsdp.FSDPModule):
            # FSDP2 keeps the root unit (embeddings, final norm, head) gathered after a forward, for a backward
            # that never comes here; free it so the teacher's share stays 1/N between batches
            self.teacher.reshard()
        self._last_metrics = {'drp/distillation/kl': float(kl.detach()),
                              'drp/distillation/lm_loss': float(lm_loss.detach())}
