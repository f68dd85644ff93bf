"""Add the Lagrangian size penalty of paper eq. (1) to the training loss (registered as ``drp_lagrangian``).

At ``AFTER_LOSS`` of every microbatch: ``loss += sum_i mean_l [lambda1_i (s_il - t_i) + lambda2_i (s_il - t_i)^2]``
over the pruned granularities, with s_il the expected kept fraction of the current masks (per layer
for head and intermediate, ``drp_foundry.pruning.lagrangian``) and
t_i the target ramped linearly from 1 (the source) to the final target over the first
``warmup_steps`` batches (default 20% of ``max_duration``; Sheared LLaMA: 640 of 3,200; no ramp
when the masks start at the target, ``drp_mask_learner`` ``init: importance``). The
masks descend the penalty and the lambdas ascend it (gradient reversal, see
``drp_foundry.pruning.lagrangian``). Composer scales each microbatch loss by its share of the
batch, so the penalty counts once per optimizer step whatever the microbatching.

s_i and the lambdas are those read by the top model's pre-hook during this microbatch's
forward (``L0MaskModule.take_size_terms()``, a ``SizeTerms``), when FSDP has the root parameters
gathered; a penalty asked for without that forward raises ``NoSizeTermsError``.

Logged every batch: ``drp/ramped_target/<granularity>``, ``drp/lagrangian/<granularity>`` and
``drp/lagrangian/total`` (the last microbatch's values).

Needs ``drp_mask_learner`` (which attaches the masks) in the same run.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from drp_foundry.composer.mask_learner import find_mask_module
from drp_foundry.composer.run_length import max_duration_in_batches
from drp_foundry.pruning.lagrangian import lagrangian_terms, ramped_target
from drp_foundry.pruning.mask_module import L0MaskModule

__all__ = ['LagrangianUpdater', 'apply_lagrangian', 'lagrangian_for_step', 'DEFAULT_WARMUP_FRACTION']

DEFAULT_WARMUP_FRACTION = 0.2


def lagrangian_for_step(mask_module: L0MaskModule, step: int,
                        warmup_steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """(total penalty, penalty per granularity, ramped targets) at ``step``.

    Uses (and consumes) the size terms recorded in the latest training forward; raises
    ``NoSizeTermsError`` when none was recorded (reading the parameters here instead would see
    FSDP's local shards).
    """
    terms = mask_module.take_size_terms()
    final_targets = mask_module.target_sizes()
    starts = mask_module.ramp_start_sizes()  # 1.0 (the source); the target itself after importance init
    targets = {key: ramped_target(starts[key], final_targets[key], step, warmup_steps) for key in final_targets}
    penalties = lagrangian_terms(terms.expected, targets, terms.lambda_1, terms.lambda_2)
    total = torch.stack(list(penalties.values())).sum()
    return total, penalties, targets


def apply_lagrangian(model: torch.nn.Module, loss: torch.Tensor, step: int, warmup_steps: int) -> torch.Tensor:
    """``loss`` plus the Lagrangian penalty of the masks attached to ``model`` at ``step``.

    Functional form for any training loop: call it after the forward pass of the step,
    then backward the returned loss.
    """
    if warmup_steps < 0:
        raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}')
    total, _, _ = lagrangian_for_step(find_mask_module(model), step, warmup_steps)
    return loss + total.to(loss.dtype)


class LagrangianUpdater(Algorithm):
    """Add the ramped Lagrangian penalty to ``state.loss`` at every ``AFTER_LOSS``.

    Args:
        warmup_steps: batches over which the target ramps from the source size to the
            target (int, or a Composer time string in batches such as ``'640ba'``). None:
            ``warmup_fraction`` of ``max_duration``.
        warmup_fraction: fraction of ``max_duration`` used when ``warmup_steps`` is None (0.2).
    """

    def __init__(self, warmup_steps: Optional[Union[int, str]] = None, warmup_fraction: float = DEFAULT_WARMUP_FRACTION):
        if warmup_steps is not None:
            if isinstance(warmup_steps, str):
                parsed = Time.from_timestring(warmup_steps)
                if parsed.unit != TimeUnit.BATCH:
                    raise ValueError(f"drp_lagrangian.warmup_steps must count batches (e.g. '640ba'), got "
                                     f'{warmup_steps!r}')
                warmup_steps = parsed.value
            if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
                raise ValueError(f'drp_lagrangian.warmup_steps must be a non-negative integer, got {warmup_steps!r}')
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f'drp_lagrangian.warmup_fraction must lie in [0, 1], got {warmup_fraction}')
        self.warmup_steps = warmup_steps
        self.warmup_fraction = float(warmup_fraction)
        self._last_metrics: dict[str, float] = {}
        self._resolved_warmup: int | None = None

    def resolved_warmup_steps(self, state: State) -> int:
        """``warmup_steps``, or ``warmup_fraction`` of ``max_duration`` in batches."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        total = max_duration_in_batches(state, 'drp_lagrangian', alternative=" or set drp_lagrangian.warmup_steps "
                                        "(e.g. '640ba') to place the target ramp")
        return int(round(self.warmup_fraction * total))

    def state_dict(self) -> dict[str, Any]:
        # the ramp's length, so that a resumed run with another max_duration is refused (resume_checks.py)
        return {'warmup_steps': self._resolved_warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved_warmup = state.get('warmup_steps')

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            find_mask_module(state.model)  # fail before the first step when the masks are missing
            self._resolved_warmup = self.resolved_warmup_steps(state)
            saved = getattr(self, '_saved_warmup', None)
            if saved is not None and int(saved) != self._resolved_warmup:
                raise ValueError(f'drp_lagrangian.warmup_steps: this run ramps the target over {self._resolved_warmup} '
                                 f'batches, the checkpoint it resumes over {saved}; set warmup_steps: {saved}')
            return
        if event == Event.BATCH_END:
            if self._last_metrics:
                logger.log_metrics(self._last_metrics)
            return
        mask_module = find_mask_module(state.model)
        step = int(state.timestamp.batch)
        total, penalties, targets = lagrangian_for_step(mask_module, step, self.resolved_warmup_steps(state))
        state.loss = _add_to_loss(state.loss, total)
        metrics = {'drp/lagrangian/total': float(total.detach())}
        for key in penalties:
            metrics[f'drp/lagrangian/{key}'] = float(penalties[key].detach())
            metrics[f'drp/ramped_target/{key}'] = targets[key]
        self._last_metrics = metrics


def _add_to_loss(loss, penalty: torch.Tensor):
    """Add ``penalty`` to a Composer loss: a tensor, a dict (to 'total' if present) or a tuple."""
    if isinstance(loss, torch.Tensor):
        return loss + penalty.to(loss.dtype)
    if isinstance(loss, dict):
        loss = dict(loss)
        if 'total' in loss:
            loss['total'] = loss['total'] + penalty.to(loss['total'].dtype)
        else:
            loss['drp_lagrangian'] = penalty
        return loss
    if isinstance(loss, (tuple, list)):
        return type(loss)(list(loss) + [penalty])
    raise TypeError(f'drp_lagrangian cannot add its penalty to a loss of type {type(loss).__name__}')
