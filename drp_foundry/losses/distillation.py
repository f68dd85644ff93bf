"""Logit distillation from a frozen teacher (ours, not in the DRPruning paper).

Minitron (NVIDIA) and others recover much of a pruned model's quality per token by training
it to match the logits of the model it was pruned from. The loss of one batch is

    loss = alpha * T^2 * KL( softmax(z_teacher / T) || softmax(z_student / T) ) + (1 - alpha) * LM loss

with the KL summed over the vocabulary and averaged over the predicted positions (those
whose label is not ``ignore_index``, after the causal shift). ``T^2`` keeps the gradient
scale of the soft term independent of the temperature (Hinton et al. 2015).

Pure torch: no Composer or LLM-Foundry import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['IGNORE_INDEX', 'distillation_kl', 'combine_losses']

IGNORE_INDEX = -100


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                    temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """T^2 * mean over predicted positions of KL(teacher || student) at temperature ``T``.

    ``*_logits``: ``(batch, seq, vocab)`` of a causal LM (position i predicts token i + 1).
    ``labels``: ``(batch, seq)`` as given to the HF model (unshifted); positions whose next label
    is ``ignore_index`` are left out, and the last position (it predicts nothing) always is.
    Without labels every position but the last counts. Computed in float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f'student logits {tuple(student_logits.shape)} and teacher logits '
                         f'{tuple(teacher_logits.shape)} differ: distillation needs the same tokenizer and vocabulary')
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    student = student_logits[:, :-1].float() / temperature
    teacher = teacher_logits[:, :-1].float() / temperature
    log_q = F.log_softmax(student, dim=-1)
    log_p = F.log_softmax(teacher, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (batch, seq - 1)
    if labels is not None:
        keep = (labels[:, 1:] != ignore_index).to(per_position.dtype)
    else:
        keep = torch.ones_like(per_position)
    count = keep.sum().clamp_min(1.0)
    return (per_position * keep).sum() / count * (temperature ** 2)


def combine_losses(total_loss: torch.Tensor, lm_loss: torch.Tensor, kl: torch.Tensor, alpha: float) -> torch.Tensor:
    """``total_loss - alpha * lm_loss + alpha * kl``.

    ``total_loss`` is the training loss as it stands (the LM loss, plus whatever other
    algorithms added, e.g. the Lagrangian penalty); only its LM part is reweighted to
    ``1 - alpha``, so the result does not depend on the order in which additive terms were
    put in. With ``alpha == 0`` the value and every gradient are bitwise those of ``total_loss``.
    """
    return total_loss - alpha * lm_loss.to(total_loss.dtype) + alpha * kl.to(total_loss.dtype)
