"""Importance scores -> keep sets and log-alphas (ours): what ``drp-prune-oneshot`` keeps and where the L0
masks start under ``drp_mask_learner`` ``init: importance``. The scores themselves come from
``pruning/importance.py``; this module sits below the mask module, which uses it.

``importance_log_alpha`` turns scores and keep counts into log-alpha values: the ``k`` most
important entries of each mask (per layer for head / intermediate) start at the log-alpha maximum
(ln 100) and the rest at the minimum (ln 0.01), so the deterministic target masks keep exactly the
importance top-k. With the module's ``mask_values: hard`` (the default for ``init: importance``)
those masks are exactly 0/1 and the step-0 export is ``drp-prune-oneshot``'s model; with ``soft``
values every kept structure would be scaled by the soft score (0.996 at the maximum). At the clamps
the expected kept count is not ``k`` but ``k * 0.998 + (n - k) * 0.047`` (a pruned entry still has
``P(z != 0) = 0.047``), so ``expected`` eval masks keep slightly more than ``k`` until a constraint
moves the counts (``drp_lagrangian`` ``constraint: projection`` puts them on the target before the
first step). ``pruned_keep_prob`` gives the older placement instead: pruned entries at that keep
probability and the kept ones where the expected count is ``k``.

Pure torch.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from drp_foundry.pruning import hard_concrete

__all__ = ['importance_log_alpha', 'importance_masks', 'DEFAULT_PRUNED_KEEP_PROB']

DEFAULT_PRUNED_KEEP_PROB = 0.05  # the older placement's P(z != 0) of an entry outside the top-k (importance_log_alpha)


def importance_masks(scores: Mapping[str, torch.Tensor], keep: Mapping[str, int | list[int]]) -> dict[str, torch.Tensor]:
    """0/1 masks keeping the ``keep`` highest scores (per row for 2-D scores); keys of ``keep`` only."""
    return {key: hard_concrete.keep_top_k(scores[key], count).float() for key, count in keep.items()}


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def importance_log_alpha(scores: torch.Tensor, keep: int | list[int], pruned_keep_prob: float | None = None
                         ) -> torch.Tensor:
    """Log-alpha of one mask: top-``keep`` entries (per row for 2-D) high, the others low.

    ``pruned_keep_prob=None`` (default): the kept entries at the log-alpha maximum, the others at the
    minimum (module doc). Otherwise the others get ``P(z != 0) = pruned_keep_prob`` and the kept ones
    ``p_hi`` with ``k * p_hi + (n - k) * pruned_keep_prob = k``, so the expected count is the keep
    count (``p_hi`` is clamped to [0.5, 0.999] when that is impossible, e.g. keeping 1 of 40).
    Within each set the importance order is kept by a spread of at most 1e-3; values lie inside
    the log-alpha clamp range.
    """
    n = scores.shape[-1] if scores.dim() == 2 else scores.numel()
    ranks = scores.argsort(dim=-1).argsort(dim=-1).float() / max(n, 1) if scores.dim() == 2 else \
        scores.reshape(-1).argsort().argsort().float().view(scores.shape) / max(n, 1)
    if pruned_keep_prob is None:
        kept = hard_concrete.keep_top_k(scores, keep)
        high = hard_concrete.LOG_ALPHA_MAX - 1e-3 * (1.0 - ranks)
        low = hard_concrete.LOG_ALPHA_MIN + 1e-3 * ranks
        return torch.where(kept, high, low).float()
    if not 0.0 < pruned_keep_prob < 0.5:
        raise ValueError(f'pruned_keep_prob must lie in (0, 0.5), got {pruned_keep_prob}')
    kept = hard_concrete.keep_top_k(scores, keep)
    counts = kept.sum(dim=-1, keepdim=True).float() if scores.dim() == 2 else kept.sum().float()
    p_hi = (1.0 - (n - counts) / counts.clamp_min(1.0) * pruned_keep_prob).clamp(0.5, 0.999)
    # P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))  <=>  log_alpha = logit(P) + beta * log(-l / r)
    shift = hard_concrete.TEMPERATURE * math.log(-hard_concrete.LIMIT_LEFT / hard_concrete.LIMIT_RIGHT)
    high = torch.log(p_hi) - torch.log1p(-p_hi) + shift
    low = _logit(pruned_keep_prob) + shift
    values = torch.where(kept, high.expand_as(kept) if scores.dim() == 2 else high, torch.full_like(scores, low))
    # within the kept / pruned sets keep the importance order (tiny spread), so ties stay stable
    values = values + 1e-3 * ranks
    return values.clamp(hard_concrete.LOG_ALPHA_MIN, hard_concrete.LOG_ALPHA_MAX).float()
