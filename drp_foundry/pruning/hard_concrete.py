"""The hard-concrete distribution of the L0 masks (spec section 2; Louizos et al. 2018).

Every mask entry z has a learnable ``log_alpha``. In training z is drawn from a stretched
and clipped concrete distribution:

    u ~ U(eps, 1 - eps),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = clamp(s * (r - l) + l, 0, 1)

with temperature ``beta = 2/3`` and stretch limits ``l = -0.1``, ``r = 1.1``; exact zeros and
ones have non-zero probability. The expected L0 norm is the sum of
``P(z != 0) = 1 - sigmoid(beta * log(-l / r) - log_alpha)``.

At eval and export the mask is deterministic: the ``k`` highest entries are kept and the rest
are set to exactly 0. ``k`` is either one number for the whole mask (layer and hidden masks:
global top-k) or one number per row of a 2-D mask (head and intermediate masks: top-k in every
layer). A kept entry carries a value (``MASK_VALUES``): ``'soft'`` (the paper, Sheared LLaMA's
``deterministic_z``) the soft score ``sigmoid(log_alpha / beta * 0.8)``, which export folds into
the weights; ``'hard'`` (ours) exactly 1, so the deterministic masks are 0/1 and the exported
model is the kept structures unscaled, as a one-shot pruned model is (even at the log-alpha
maximum ln 100 the soft score is 0.996, and it is 0.92 at log-alpha 2).

``beta`` is a module constant; ``temperature`` arguments let a caller anneal it (ours,
``drp_lagrangian.anneal_start_fraction``): a lower temperature makes samples closer to 0/1.

Pure torch: no Composer or LLM-Foundry import.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    'LIMIT_LEFT',
    'LIMIT_RIGHT',
    'TEMPERATURE',
    'EPSILON',
    'DETERMINISTIC_SCALE',
    'MASK_VALUES',
    'LOG_ALPHA_MIN',
    'LOG_ALPHA_MAX',
    'annealed_temperature',
    'init_log_alpha',
    'clamp_log_alpha_',
    'sample_hard_concrete',
    'prob_nonzero',
    'prob_one',
    'soft_score',
    'keep_top_k',
    'deterministic_mask',
]

LIMIT_LEFT = -0.1  # l: the left end of the stretched interval
LIMIT_RIGHT = 1.1  # r: the right end of the stretched interval
TEMPERATURE = 2.0 / 3.0  # beta
EPSILON = 1e-6  # u is drawn from U(eps, 1 - eps)
DETERMINISTIC_SCALE = 0.8  # the soft score is sigmoid(log_alpha / beta * 0.8)
LOG_ALPHA_MIN = math.log(0.01)
LOG_ALPHA_MAX = math.log(100.0)
MASK_VALUES = ('soft', 'hard')  # what a kept entry of a deterministic mask holds (module doc)


def annealed_temperature(step: int, start_step: int, end_step: int, final: float,
                         initial: float = TEMPERATURE) -> float:
    """beta at ``step``: ``initial`` up to ``start_step``, linear to ``final`` at ``end_step``, ``final`` after (ours)."""
    if end_step <= start_step:  # no anneal interval: a step change at end_step
        return float(final if step >= end_step else initial)
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return float(initial + (final - initial) * progress)


def init_log_alpha(log_alpha: torch.Tensor, mean: float = 5.0, std: float = 0.01) -> torch.Tensor:
    """Fill ``log_alpha`` in place with N(mean, std^2): masks start almost surely open."""
    with torch.no_grad():
        return log_alpha.normal_(mean, std)


def clamp_log_alpha_(log_alpha: torch.Tensor) -> torch.Tensor:
    """Clamp ``log_alpha`` in place to [ln 0.01, ln 100] (done before every use in training).

    In place so that a parameter that overshoots is brought back into range and keeps
    receiving gradients (an out-of-place clamp would zero its gradient for good).
    """
    with torch.no_grad():
        return log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def sample_hard_concrete(log_alpha: torch.Tensor, generator: torch.Generator | None = None,
                         temperature: float = TEMPERATURE) -> torch.Tensor:
    """One differentiable sample z in [0, 1] of the shape of ``log_alpha``."""
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=torch.float32)
    u = u * (1.0 - 2.0 * EPSILON) + EPSILON
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.float()) / temperature)
    return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """P(z != 0) = 1 - CDF(0) = 1 - sigmoid(beta * log(-l / r) - log_alpha); differentiable."""
    return 1.0 - torch.sigmoid(temperature * math.log(-LIMIT_LEFT / LIMIT_RIGHT) - log_alpha.float())


def prob_one(log_alpha: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """P(z = 1) = 1 - CDF(1) = sigmoid(log_alpha - beta * log((1 - l) / (r - 1)))."""
    return torch.sigmoid(log_alpha.float() - temperature * math.log((1.0 - LIMIT_LEFT) / (LIMIT_RIGHT - 1.0)))


def soft_score(log_alpha: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The deterministic soft value sigmoid(log_alpha / beta * 0.8) of every entry."""
    return torch.sigmoid(log_alpha.float() / temperature * DETERMINISTIC_SCALE)


def keep_top_k(scores: torch.Tensor, keep: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Boolean tensor marking exactly ``keep`` highest scores (ties broken by lower index).

    ``keep`` is an int (global over all entries of ``scores``) or, for a 2-D ``scores``, one
    count per row.
    """
    if isinstance(keep, int):
        flat = scores.reshape(-1)
        if not 0 <= keep <= flat.numel():
            raise ValueError(f'cannot keep {keep} of {flat.numel()} mask entries')
        order = torch.argsort(flat, descending=True, stable=True)
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[order[:keep]] = True
        return kept.view(scores.shape)
    if scores.dim() != 2:
        raise ValueError(f'per-row keep counts need a 2-D mask, got shape {tuple(scores.shape)}')
    keep_per_row = torch.as_tensor(keep, dtype=torch.long, device=scores.device).reshape(-1)
    if keep_per_row.numel() != scores.shape[0]:
        raise ValueError(f'{keep_per_row.numel()} keep counts given for {scores.shape[0]} rows')
    if (keep_per_row < 0).any() or (keep_per_row > scores.shape[1]).any():
        raise ValueError(f'keep counts must lie in [0, {scores.shape[1]}], got {keep_per_row.tolist()}')
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    rank.scatter_(1, order, positions)
    return rank < keep_per_row[:, None]


def deterministic_mask(log_alpha: torch.Tensor, keep: int | Sequence[int] | torch.Tensor, values: str = 'soft',
                       temperature: float = TEMPERATURE) -> torch.Tensor:
    """The eval/export mask: on the ``keep`` top entries the soft score (``values='soft'``) or 1
    (``'hard'``), exactly 0 elsewhere."""
    if values not in MASK_VALUES:
        raise ValueError(f'mask values must be one of {MASK_VALUES}, got {values!r}')
    log_alpha = log_alpha.detach().float()
    kept = keep_top_k(log_alpha, keep)  # the soft score's order (it is monotone), without its float32 ties at 1
    scores = soft_score(log_alpha, temperature)
    if values == 'hard':
        return kept.float()
    return torch.where(kept, scores, torch.zeros_like(scores))
