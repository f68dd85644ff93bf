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

Ours, opt-in (the paper's recipes keep the Lagrangian):

- ``constraint: projection``: no multipliers. After every optimizer step (``BATCH_END``, and once
  more before the first forward of a fit, after importance init) each mask row's log-alphas are
  shifted so that its expected kept count is the ramped target (``pruning/projection.py``): per
  layer for head and intermediate, the whole mask for layer and hidden. The size is on target
  after every step at any run length. The penalty is still formed, times 0, so every mask and
  multiplier keeps a (zero) gradient (FSDP2 reduces the same set of gradients on every step).
- ``anneal_start_fraction: f`` (off by default): the hard-concrete temperature beta falls
  linearly from 2/3 at fraction ``f`` of ``max_duration`` to ``final_temperature`` (default 0.1)
  where hardening starts (or at the end): samples get closer to 0/1 (at beta 0.1 and the
  log-alpha clamps a gate disagrees with its exported value about 1% of the time, against up to
  5% at 2/3).
- ``harden_fraction: h`` (default 0): the last fraction ``h`` of the steps train with the
  deterministic target masks (the ones export cuts, 0/1 with ``mask_values: hard``) and the
  log-alphas frozen (restored after each step), so those steps train the exported model itself.
  At the first hardened step the masks are decided (``L0MaskModule.harden_``: the target top-k
  to the log-alpha maximum, the rest to the minimum), projected onto the target once more, then
  frozen; the share of undecided entries just before is logged
  (``drp/undecided_share_before_hardening``, ``pruning/fidelity.py``). At temperature 0.1 a
  decided row keeps every entry decided (its gate disagrees with the exported value at most 5%
  of the time) when the row keeps between 29% and 86% of its entries. (At the clamps a kept gate
  is nonzero with probability 0.9922, a pruned one 0.0126; a row keeping k of n expects more
  than k when k/n < 0.62, and the projection lowers the kept gates to P(z != 0) =
  1 - 0.0126 (n - k) / k, still 1 at least 95% of the time while k/n >= 0.29; above 0.62 it
  raises the pruned gates to 0.0078 k / (n - k), below 5% while k/n <= 0.86.)

When the Trainer is built (``AFTER_LOAD``: Composer sets ``max_duration`` only after ``Event.INIT``)
a Lagrangian run too short to settle (fewer than ``LAGRANGIAN_SETTLING_STEPS`` steps after the ramp,
measured: ``pruning/lagrangian.py``) gets a ``ShortLagrangianRunWarning`` that names
``constraint: projection``.

Logged every batch besides the above: ``drp/temperature`` and ``drp/hardened``.

Needs ``drp_mask_learner`` (which attaches the masks) in the same run.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional, Union

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from drp_foundry.composer.mask_learner import find_mask_module
from drp_foundry.composer.run_length import max_duration_in_batches
from drp_foundry.pruning import hard_concrete
from drp_foundry.pruning.lagrangian import lagrangian_terms, ramped_target, short_run_message
from drp_foundry.pruning.mask_module import L0MaskModule

__all__ = ['LagrangianUpdater', 'ShortLagrangianRunWarning', 'apply_lagrangian', 'apply_projection', 'lagrangian_for_step', 'ramped_targets',
           'CONSTRAINTS', 'DEFAULT_WARMUP_FRACTION']

log = logging.getLogger(__name__)

DEFAULT_WARMUP_FRACTION = 0.2
CONSTRAINTS = ('lagrangian', 'projection')
DEFAULT_FINAL_TEMPERATURE = 0.1


class ShortLagrangianRunWarning(UserWarning):
    """A Lagrangian pruning run too short for the multipliers to settle (``short_run_message``)."""


def ramped_targets(mask_module: L0MaskModule, step: int, warmup_steps: int) -> dict[str, float]:
    """The ramped target fraction t_i(step) of every granularity of ``mask_module``."""
    final_targets = mask_module.target_sizes()
    starts = mask_module.ramp_start_sizes()  # 1.0 (the source); the target itself after importance init
    return {key: ramped_target(starts[key], final_targets[key], step, warmup_steps) for key in final_targets}


def apply_projection(model: torch.nn.Module, step: int, warmup_steps: int) -> dict[str, float]:
    """Shift the masks of ``model`` so every row expects the ramped target of ``step`` (``constraint:
    projection``; call it after each optimizer step with the next step's index). Returns the targets."""
    mask_module = find_mask_module(model)
    targets = ramped_targets(mask_module, step, warmup_steps)
    mask_module.project_(targets)
    return targets


def lagrangian_for_step(mask_module: L0MaskModule, step: int,
                        warmup_steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """(total penalty, penalty per granularity, ramped targets) at ``step``.

    Uses (and consumes) the size terms recorded in the latest training forward; raises
    ``NoSizeTermsError`` when none was recorded (reading the parameters here instead would see
    FSDP's local shards).
    """
    terms = mask_module.take_size_terms()
    targets = ramped_targets(mask_module, step, warmup_steps)
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
        constraint: ``lagrangian`` (default, the paper) or ``projection`` (ours; module doc).
        anneal_start_fraction: where the temperature anneal starts, as a fraction of
            ``max_duration`` (None: no anneal; ours, module doc).
        final_temperature: beta at the end of the anneal (default 0.1).
        harden_fraction: the last fraction of the run trained with the export's masks, frozen (0: none).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                      num_hidden_layers=2, num_attention_heads=4))
        >>> from drp_foundry import LagrangianUpdater, apply_lagrangian, apply_mask_learner
        >>> _ = apply_mask_learner(model, target={'layers': 1, 'hidden': 16, 'heads': 2, 'intermediate': 32})
        >>> batch = torch.randint(0, 64, (2, 8))
        >>> lm_loss = model(batch, labels=batch).loss
        >>> loss = apply_lagrangian(model, lm_loss, step=10, warmup_steps=100)  # + lambda1 (s - t) + lambda2 (s - t)^2
        >>> loss.backward()
        >>> algorithm = LagrangianUpdater(warmup_steps='640ba')  # Trainer(..., algorithms=[MaskLearner(...), algorithm])
        >>> projected = LagrangianUpdater(constraint='projection', anneal_start_fraction=0.6, harden_fraction=0.1)  # ours
    """

    def __init__(self, warmup_steps: Optional[Union[int, str]] = None, warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
                 constraint: str = 'lagrangian', anneal_start_fraction: Optional[float] = None,
                 final_temperature: float = DEFAULT_FINAL_TEMPERATURE, harden_fraction: float = 0.0):
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
        if constraint not in CONSTRAINTS:
            raise ValueError(f'drp_lagrangian.constraint must be one of {CONSTRAINTS}, got {constraint!r}')
        self.constraint = constraint
        if anneal_start_fraction is not None and not 0.0 <= anneal_start_fraction < 1.0:
            raise ValueError(f'drp_lagrangian.anneal_start_fraction must lie in [0, 1) (or be left out: no anneal), '
                             f'got {anneal_start_fraction}')
        if not 0.0 < final_temperature <= hard_concrete.TEMPERATURE:
            raise ValueError(f'drp_lagrangian.final_temperature must lie in (0, {hard_concrete.TEMPERATURE:.4f}] '
                             f'(the paper\'s 2/3), got {final_temperature}')
        if not 0.0 <= harden_fraction < 1.0:
            raise ValueError(f'drp_lagrangian.harden_fraction must lie in [0, 1), got {harden_fraction}')
        if anneal_start_fraction is not None and anneal_start_fraction + harden_fraction > 1.0:
            raise ValueError(f'drp_lagrangian.anneal_start_fraction ({anneal_start_fraction}) + harden_fraction '
                             f'({harden_fraction}) exceed 1: the anneal must start before hardening does')
        self.anneal_start_fraction = None if anneal_start_fraction is None else float(anneal_start_fraction)
        self.final_temperature = float(final_temperature)
        self.harden_fraction = float(harden_fraction)
        self._last_metrics: dict[str, float] = {}
        self._resolved_warmup: int | None = None
        self._project_before_first_forward = False
        self._frozen: Optional[list[torch.Tensor]] = None
        self._undecided_before_hardening: Optional[float] = None

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
    @property
    def _scheduled(self) -> bool:
        return self.anneal_start_fraction is not None or self.harden_fraction > 0

    def schedule_steps(self, state: State) -> tuple[int, int]:
        """(step where the anneal starts, step where hardening starts), in batches; both ``max_duration``
        when unused."""
        if not self._scheduled:
            return (2 ** 62, 2 ** 62)
        total = max_duration_in_batches(state, 'drp_lagrangian.anneal_start_fraction / harden_fraction')
        harden = total - int(round(self.harden_fraction * total))
        anneal = harden if self.anneal_start_fraction is None else int(round(self.anneal_start_fraction * total))
        return min(anneal, harden), harden

    def temperature_at(self, state: State, step: int) -> float:
        if self.anneal_start_fraction is None:
            return hard_concrete.TEMPERATURE
        anneal, harden = self.schedule_steps(state)
        return hard_concrete.annealed_temperature(step, anneal, harden, self.final_temperature)

    def _set_schedule(self, state: State, mask_module: L0MaskModule, step: int) -> None:
        """Temperature and hardening of ``step``; the log-alphas are frozen from the first hardened step on."""
        mask_module.temperature = self.temperature_at(state, step)
        hardened = self.harden_fraction > 0 and step >= self.schedule_steps(state)[1]
        mask_module.hardened = hardened
        if hardened and self._frozen is None:  # the first hardened step of this fit: decide, put on target, freeze
            from drp_foundry.pruning.fidelity import undecided_share

            self._undecided_before_hardening = undecided_share(mask_module)['total']
            mask_module.harden_()
            if self.constraint == 'projection':
                apply_projection(state.model, step, self.resolved_warmup_steps(state))
            self._frozen = [p.detach().clone() for p in mask_module.mask_parameters()]

    def short_run_message(self, total_steps: int) -> Optional[str]:
        """The warning at Trainer construction for a run of ``total_steps`` batches (None: long enough, or not the Lagrangian)."""
        if self.constraint != 'lagrangian':
            return None
        warmup = self.warmup_steps if self.warmup_steps is not None else int(round(self.warmup_fraction * total_steps))
        return short_run_message(total_steps, warmup)

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.AFTER_LOAD, Event.FIT_START, Event.BATCH_START, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOAD:  # in Trainer.__init__, before any step; max_duration is set by now
            try:
                total = max_duration_in_batches(state, 'drp_lagrangian')
            except ValueError:  # FIT_START raises with the fix when the ramp needs the length
                return
            message = self.short_run_message(total)
            if message is not None:
                log.warning(message)
                warnings.warn(message, ShortLagrangianRunWarning, stacklevel=2)
            return
        if event == Event.FIT_START:
            find_mask_module(state.model)  # fail before the first step when the masks are missing
            self._resolved_warmup = self.resolved_warmup_steps(state)
            saved = getattr(self, '_saved_warmup', None)
            if saved is not None and int(saved) != self._resolved_warmup:
                raise ValueError(f'drp_lagrangian.warmup_steps: this run ramps the target over {self._resolved_warmup} '
                                 f'batches, the checkpoint it resumes over {saved}; set warmup_steps: {saved}')
            self.resolved_warmup_steps(state)
            self.schedule_steps(state)
            self._frozen = None
            self._project_before_first_forward = self.constraint == 'projection'
            return
        mask_module = find_mask_module(state.model)
        step = int(state.timestamp.batch)  # at BATCH_END: the next step's index (Composer counts the batch first)
        if event == Event.BATCH_START:
            self._set_schedule(state, mask_module, step)
            if self._project_before_first_forward and not mask_module.hardened:
                apply_projection(state.model, step, self.resolved_warmup_steps(state))  # after importance init
            self._project_before_first_forward = False
            return
        if event == Event.BATCH_END:
            if mask_module.hardened and self._frozen is not None:  # undo the optimizer step on the frozen masks
                with torch.no_grad():
                    for param, frozen in zip(mask_module.mask_parameters(), self._frozen):
                        param.copy_(frozen)
            elif self.constraint == 'projection':
                mask_module.temperature = self.temperature_at(state, step)
                apply_projection(state.model, step, self.resolved_warmup_steps(state))
            if self._last_metrics:
                logger.log_metrics(self._last_metrics)
            return
        total, penalties, targets = lagrangian_for_step(mask_module, step, self.resolved_warmup_steps(state))
        if self.constraint == 'projection':  # no multipliers: a zero penalty keeps every gradient in place
            total = total * 0.0
        state.loss = _add_to_loss(state.loss, total)
        metrics = {'drp/lagrangian/total': float(total.detach()), 'drp/temperature': mask_module.temperature,
                   'drp/hardened': float(mask_module.hardened)}
        if self._undecided_before_hardening is not None:
            metrics['drp/undecided_share_before_hardening'] = self._undecided_before_hardening
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
