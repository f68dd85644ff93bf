"""The Lagrangian size constraint of paper eq. (1) and its target ramp (spec section 3).

For every pruned granularity i (layer, head, intermediate, hidden) with expected kept
fraction s_i and (ramped) target fraction t_i:

    penalty_i = mean_l [ lambda1_i * (s_il - t_i) + lambda2_i * (s_il - t_i)^2 ]

where s_il is the expected kept fraction of the mask in layer l for the per-layer masks
(head: KV groups, intermediate: FFN units; ``expected_size.expected_fractions``) and the
mean runs over layers, as in Sheared LLaMA's ``lagrangian_regularization`` (one pair of
multipliers per granularity, shared by the layers). The layer and hidden masks have one s_i.
Constraining every layer pushes every layer to the target count, which is what export keeps;
an aggregate constraint over all layers lets layers end uneven while export cuts them equal.

The total loss is LM loss + sum_i penalty_i. Masks (through s_i) descend it, the
multipliers lambda ascend it. Ascent is done inside the graph by ``reverse_gradient``:
the lambdas enter the penalty through an identity whose backward negates the gradient,
so one optimizer with positive learning rates for every group performs descent on the
masks and ascent on the lambdas (no negative lr, no parameter hooks, works unchanged
under FSDP ``use_orig_params`` where hooks on original parameters do not fire).

The target fraction moves linearly from the source (1.0) to the final target over the
warm-up steps and stays there (Sheared LLaMA: 640 of 3,200 steps).

Pure torch: no Composer or LLM-Foundry import.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ['reverse_gradient', 'ramped_target', 'lagrangian_penalty', 'lagrangian_terms', 'LAGRANGIAN_SETTLING_STEPS',
           'short_run_message']

# Post-ramp steps the Lagrangian needs before the masks stay on target (ours, measured; see short_run_message).
LAGRANGIAN_SETTLING_STEPS = 310


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -grad_output


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged; gradients flowing back into ``x`` are negated (gradient ascent)."""
    return _ReverseGradient.apply(x)


def ramped_target(source_fraction: float, target_fraction: float, step: int, warmup_steps: int) -> float:
    """t(step): linear from ``source_fraction`` at step 0 to ``target_fraction`` at ``warmup_steps``."""
    if warmup_steps < 0:
        raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}')
    if warmup_steps == 0 or step >= warmup_steps:
        return float(target_fraction)
    progress = max(step, 0) / warmup_steps
    return float(source_fraction + (target_fraction - source_fraction) * progress)


def lagrangian_penalty(expected: torch.Tensor, target: float | torch.Tensor, lambda_1: torch.Tensor,
                       lambda_2: torch.Tensor) -> torch.Tensor:
    """mean of lambda1 * (s - t) + lambda2 * (s - t)^2 over the entries of ``expected`` (one per layer
    for per-layer masks, a scalar otherwise) for one granularity (the lambdas as given)."""
    gap = expected - target
    return (lambda_1 * gap + lambda_2 * gap * gap).mean()


def lagrangian_terms(expected: Mapping[str, torch.Tensor], targets: Mapping[str, float],
                     lambdas_1: Mapping[str, torch.Tensor], lambdas_2: Mapping[str, torch.Tensor],
                     ascend_lambdas: bool = True) -> dict[str, torch.Tensor]:
    """penalty_i for every granularity in ``expected``; lambdas ascend when ``ascend_lambdas``."""
    terms = {}
    for key, s in expected.items():
        lambda_1, lambda_2 = lambdas_1[key], lambdas_2[key]
        if ascend_lambdas:
            lambda_1, lambda_2 = reverse_gradient(lambda_1), reverse_gradient(lambda_2)
        terms[key] = lagrangian_penalty(s, targets[key], lambda_1, lambda_2)
    return terms


def short_run_message(total_steps: int, warmup_steps: int, settling_steps: int = LAGRANGIAN_SETTLING_STEPS
                      ) -> str | None:
    """Why a Lagrangian run of ``total_steps`` with a ``warmup_steps`` ramp is too short to settle, or None.

    The multipliers move by about lr x (schedule multiplier) per step whatever their gradient, so the
    loop masks <-> lambdas swings with a period of tens of steps and needs a number of steps, not a
    fraction of the run, to settle. ``LAGRANGIAN_SETTLING_STEPS`` is measured by
    ``bench/lagrangian_settling.py`` on SmolLM2-135M's masks at the demo's target (30 -> 20 layers,
    hidden 576 -> 384, 3 -> 2 KV groups, FFN 1536 -> 1024), the paper's constant init, AdamW at the
    paper's lr 1.0 for masks and multipliers, constant, a 40-step ramp (docs/RESULTS.md, "Lagrangian
    settling"): the post-ramp step from which the expected size stays within 2% of the target and
    every row within 5 points of its target fraction. The constraint alone (``--no-lm``, no LM
    gradient; deterministic, 3 seeds alike) settles 308 steps after the ramp: the multipliers'
    swings shrink to about 1% of the size only then. The LM gradient of the source model pulls the
    masks open against the constraint, which can only lengthen that. Below the threshold, export
    likely cuts a model other than the one the run trained.
    """
    post_ramp = total_steps - warmup_steps
    if post_ramp >= settling_steps:
        return None
    return (f'drp_lagrangian: this run has {post_ramp} steps after its {warmup_steps}-step target ramp, but the '
            f'Lagrangian needs about {settling_steps} to bring the masks onto the target (measured, '
            'bench/lagrangian_settling.py); the run would likely end off target and export would cut a model other '
            'than the trained one. Use drp_lagrangian constraint: projection (ours: on target after every step at '
            f'any length), or run at least {warmup_steps + settling_steps} steps')
