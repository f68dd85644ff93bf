"""The reference ratio p_R: its dynamic update (DRPruning paper §3.3, eq. 6) and initial values.

Eq. 6 moves p_R toward the mixture the DRO step just chose,

    p_R <- delta * q + (1 - delta) * p_R,          delta = 0.1,

and keeps it within a factor ``n`` of the initial ratio p_R0: p_R0 / n <= p_R <= n * p_R0.
The research code then also clamps p_R to [min p_R0, max p_R0] (``clamp_to_initial_range``,
on by default), so no domain's reference weight leaves the range of the initial weights.
The paper writes the factor as n; the research code hard-codes 2. Our default is
``max_factor = 2.0`` (the value behind the published results); it is a config key.
Instead of "clamp, then renormalise" (which can push entries back out of the box) the
clamp and the renormalisation are solved together: p = clip(c * x, lo, hi) with the
scalar c chosen so that p sums to one (always feasible since sum lo <= 1 <= sum hi).

``temperature_smoothed_ratio`` gives the multilingual initial ratio p_i ∝ size_i^0.3
(Conneau et al., 2020).

Pure numpy; no Composer import.
"""

from __future__ import annotations

import numpy as np

__all__ = ['update_reference_ratio', 'project_to_box_simplex', 'temperature_smoothed_ratio']


def project_to_box_simplex(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, iterations: int = 100) -> np.ndarray:
    """clip(c * x, lower, upper) with c > 0 such that the result sums to one.

    Requires x >= 0 (not all zero) and sum(lower) <= 1 <= sum(upper). The sum is non-decreasing in c, so
    c is found by bisection on log c (exact to float precision after ~100 halvings).
    """
    x = np.asarray(x, dtype=np.float64)
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    if lower.sum() > 1.0 + 1e-12 or upper.sum() < 1.0 - 1e-12:
        raise ValueError(f'box [{lower.tolist()}, {upper.tolist()}] does not contain a point of the simplex')
    if np.any(x < 0) or not np.all(np.isfinite(x)) or not np.any(x > 0):
        raise ValueError(f'x must be finite, >= 0 and not all zero, got {x.tolist()}')
    if np.any(lower <= 0):
        raise ValueError(f'lower bounds must be > 0, got {lower.tolist()}')
    log_lo = float(np.log(lower.min() / x.max())) - 1.0
    log_hi = float(np.log(upper.max() / x[x > 0].min())) + 1.0
    for _ in range(iterations):
        mid = 0.5 * (log_lo + log_hi)
        if np.clip(np.exp(mid) * x, lower, upper).sum() < 1.0:
            log_lo = mid
        else:
            log_hi = mid
    projected = np.clip(np.exp(0.5 * (log_lo + log_hi)) * x, lower, upper)
    return projected / projected.sum()  # removes the last ~1e-16 of bisection error


def update_reference_ratio(p_ref: np.ndarray, q: np.ndarray, p_ref_initial: np.ndarray, delta: float = 0.1,
                           max_factor: float = 2.0, clamp_to_initial_range: bool = True) -> np.ndarray:
    """Paper eq. 6: p_R <- delta q + (1 - delta) p_R, kept in [p_R0 / n, n p_R0], summing to one.

    With ``clamp_to_initial_range`` (research code) the box is also intersected with
    [min p_R0, max p_R0]; clamp and renormalisation are solved together (the research code
    clamps and renormalises twice in a row, which agrees whenever its result is in the box).
    """
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f'delta must be in [0, 1], got {delta}')
    if not max_factor >= 1.0:
        raise ValueError(f'max_factor (the paper\'s n) must be >= 1, got {max_factor}')
    p_ref_initial = np.asarray(p_ref_initial, dtype=np.float64)
    mixed = delta * np.asarray(q, dtype=np.float64) + (1.0 - delta) * np.asarray(p_ref, dtype=np.float64)
    lower, upper = p_ref_initial / max_factor, p_ref_initial * max_factor
    if clamp_to_initial_range:
        lower = np.maximum(lower, p_ref_initial.min())
        upper = np.minimum(upper, p_ref_initial.max())
    return project_to_box_simplex(mixed, lower, upper)


def temperature_smoothed_ratio(sizes: np.ndarray, exponent: float = 0.3) -> np.ndarray:
    """p_i ∝ size_i^exponent: the multilingual reference ratio (exponent 0.3 in the paper)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes <= 0) or not np.all(np.isfinite(sizes)):
        raise ValueError(f'sizes must be a non-empty list of positive numbers, got {sizes.tolist()}')
    if not exponent > 0:
        raise ValueError(f'exponent must be > 0, got {exponent}')
    weights = (sizes / sizes.max())**exponent
    return weights / weights.sum()
