"""Hold every mask row's expected kept count at its target by shifting its log-alphas (ours, issue 26).

The paper's Lagrangian (``lagrangian.py``) reaches the target size only when the run is long
enough for the multipliers to settle (Sheared LLaMA: 2,560 steps after a 640-step ramp); a short
run stops inside their first swing and export then cuts a model other than the trained one.
The projection needs no settling: after every optimizer step, each row r of a mask (every
layer's row of the head and intermediate masks; the whole layer and hidden masks) gets one
shift c_r,

    log_alpha'_rj = clamp(log_alpha_rj + c_r, ln 0.01, ln 100)   with   sum_j P(z_rj != 0 | log_alpha'_rj) = k_r,

k_r the row's (ramped) target count. The left side is continuous and non-decreasing in c_r, so
c_r is found by bisection on [ln 0.01 - ln 100, ln 100 - ln 0.01] (every entry at the minimum at
one end, at the maximum at the other), a fixed number of halvings (``ITERATIONS``: the interval
shrinks below 1e-13, far under float32 resolution). The order of the entries in a row (the
deterministic masks) is unchanged except where the clamp ties entries. A target outside the
attainable range ``[n * P_min, n * P_max]`` (e.g. the source size at the start of a ramp:
``P_max = 0.998`` at temperature 2/3) is met as closely as possible (every entry at a clamp).

Sharded rows: ``sum_over_shards`` is applied to the per-row partial counts of each halving (an
all-reduce over the ranks holding pieces of the row: FSDP2 splits a 1-D mask across ranks, while
the rows of a 2-D mask sharded by layer are whole on one rank and need none). Every rank runs
the same halvings on the same reduced counts, so all ranks shift by the same c.

Pure torch: no Composer or LLM-Foundry import.
"""

from __future__ import annotations

from typing import Callable

import torch

from drp_foundry.pruning import hard_concrete

__all__ = ['ITERATIONS', 'attainable_count_range', 'expected_counts', 'project_log_alpha']

ITERATIONS = 48  # halvings of the shift interval (width 9.2 -> 3e-14)
_SPAN = hard_concrete.LOG_ALPHA_MAX - hard_concrete.LOG_ALPHA_MIN


def _rows(log_alpha: torch.Tensor) -> torch.Tensor:
    if log_alpha.dim() == 1:
        return log_alpha.reshape(1, -1)
    if log_alpha.dim() == 2:
        return log_alpha
    raise ValueError(f'a mask is 1-D or 2-D, got shape {tuple(log_alpha.shape)}')


def expected_counts(log_alpha: torch.Tensor, temperature: float = hard_concrete.TEMPERATURE) -> torch.Tensor:
    """sum_j P(z_rj != 0) per row (one value for a 1-D mask), float64, of the clamped log-alphas."""
    rows = _rows(log_alpha.detach().double()).clamp(hard_concrete.LOG_ALPHA_MIN, hard_concrete.LOG_ALPHA_MAX)
    return hard_concrete.prob_nonzero(rows, temperature).double().sum(dim=1)


def attainable_count_range(row_length: int, temperature: float = hard_concrete.TEMPERATURE) -> tuple[float, float]:
    """(lowest, highest) expected count of a row of ``row_length`` entries: all at ln 0.01, all at ln 100."""
    ends = hard_concrete.prob_nonzero(torch.tensor([hard_concrete.LOG_ALPHA_MIN, hard_concrete.LOG_ALPHA_MAX],
                                                   dtype=torch.float64), temperature).double()
    return float(ends[0]) * row_length, float(ends[1]) * row_length


def project_log_alpha(log_alpha: torch.Tensor, target_count: float | torch.Tensor,
                      temperature: float = hard_concrete.TEMPERATURE,
                      sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      row_length: int | None = None) -> torch.Tensor:
    """The shifted, clamped log-alphas (a new tensor, the dtype of ``log_alpha``) whose rows expect ``target_count``.

    ``log_alpha``: a 1-D mask (one row) or a 2-D mask (one row per layer). ``target_count``: one
    count for every row, or one per row. ``sum_over_shards``: for a row split over ranks, a
    function that sums a tensor of per-row partial counts over them (in place or not) and returns
    it; ``row_length``: the row's full length then (default: the local length).
    """
    rows = _rows(log_alpha.detach().double())
    targets = torch.as_tensor(target_count, dtype=torch.float64, device=rows.device).reshape(-1)
    if targets.numel() == 1:
        targets = targets.expand(rows.shape[0])
    if targets.numel() != rows.shape[0]:
        raise ValueError(f'{targets.numel()} target counts given for {rows.shape[0]} mask rows')
    low_count, high_count = attainable_count_range(rows.shape[1] if row_length is None else row_length, temperature)
    targets = targets.clamp(low_count, high_count)

    def counts(shift: torch.Tensor) -> torch.Tensor:
        shifted = (rows + shift[:, None]).clamp(hard_concrete.LOG_ALPHA_MIN, hard_concrete.LOG_ALPHA_MAX)
        partial = hard_concrete.prob_nonzero(shifted, temperature).double().sum(dim=1)
        return partial if sum_over_shards is None else sum_over_shards(partial)

    low = torch.full_like(targets, -_SPAN)
    high = torch.full_like(targets, _SPAN)
    for _ in range(ITERATIONS):  # a fixed count: ranks that share a row run the same collectives
        middle = (low + high) / 2
        below = counts(middle) < targets
        low = torch.where(below, middle, low)
        high = torch.where(below, high, middle)
    shift = (low + high) / 2
    projected = (rows + shift[:, None]).clamp(hard_concrete.LOG_ALPHA_MIN, hard_concrete.LOG_ALPHA_MAX)
    return projected.reshape(log_alpha.shape).to(log_alpha.dtype)
