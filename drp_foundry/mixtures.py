"""Per-domain vectors and mixtures over domains: one check each, shared by data/, scheduling/ and composer/.

A *mixture* is a point of the probability simplex: one finite, non-negative share per
domain, summing to 1. Configs give them as a list in domain order or as a
``{domain: value}`` mapping; the functions here turn either into a float64 array in domain
order, or raise a ``ValueError`` that starts with the config key and says the fix.
Pure numpy: nothing here imports Composer or LLM-Foundry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ['SUM_TOLERANCE', 'per_domain', 'simplex', 'domain_mixture']

# A config's shares may be rounded (0.67 + 0.15 + ...); further from 1 than this is a typo, not rounding.
SUM_TOLERANCE = 1e-3


def per_domain(values: Sequence[float] | Mapping[str, float] | np.ndarray, domain_names: Sequence[str], key: str,
               what: str = 'values') -> np.ndarray:
    """``values`` as a finite float64 array in ``domain_names`` order.

    Accepted: a sequence with one entry per domain (in that order), or a mapping naming every
    domain exactly once. ``what`` names the entries in the messages (``proportions``, ``losses``).
    """
    names = [str(name) for name in domain_names]
    if isinstance(values, Mapping):
        unknown = sorted(str(name) for name in set(values) - set(names))
        missing = [name for name in names if name not in values]
        if unknown or missing:
            raise ValueError(f'{key}: the mapping must name exactly the domains {names}; unknown: {unknown}, '
                             f'missing: {missing}. Fix the domain names in `{key}`.')
        values = [values[name] for name in names]
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f'{key}: expected one number per domain {names}, got {values!r}.') from None
    if array.size != len(names):
        raise ValueError(f'{key}: got {array.size} {what} for {len(names)} domains {names}; give one entry per '
                         f'domain ({len(names)}), in the same order, or a {{domain: value}} mapping.')
    if not np.all(np.isfinite(array)):
        raise ValueError(f'{key}: {what} must be finite numbers, got {array.tolist()}.')
    return array


def simplex(values: Sequence[float] | np.ndarray, key: str, *, positive: bool = False,
            tol: float = SUM_TOLERANCE, what: str = 'proportions') -> np.ndarray:
    """Check a probability vector and return it renormalised to sum exactly 1.

    Refused, naming ``key``: not a non-empty 1-D vector, non-finite or negative entries
    (zeros too with ``positive``), all zeros, a sum further than ``tol`` from 1 (a typo is not
    silently renormalised; within ``tol`` it is rounding and is renormalised).
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f'{key}: {what} must be a non-empty list of numbers, got shape {array.shape}.')
    if not np.all(np.isfinite(array)):
        raise ValueError(f'{key}: {what} must be finite numbers, got {array.tolist()}.')
    if np.any(array < 0):
        raise ValueError(f'{key}: {what} must be >= 0, got {array.tolist()}.')
    if positive and np.any(array == 0):
        raise ValueError(f'{key}: {what} must be > 0 for every domain (every domain is sampled and the '
                         f'scheduler divides by its share), got {array.tolist()}; remove a domain from the list '
                         'to leave it out.')
    total = float(array.sum())
    if total <= 0:
        raise ValueError(f'{key}: {what} are all zero; at least one domain needs a positive share.')
    if abs(total - 1.0) > tol:
        raise ValueError(f'{key}: {what} sum to {total:.8g}, not 1. Give a mixture on the simplex, '
                         f'e.g. the normalised {np.round(array / total, 6).tolist()}.')
    return array / total


def domain_mixture(values: Sequence[float] | Mapping[str, float] | np.ndarray, domain_names: Sequence[str],
                   key: str, *, positive: bool = False, tol: float = SUM_TOLERANCE) -> np.ndarray:
    """A mixture over ``domain_names`` (list in domain order or mapping), checked and renormalised."""
    return simplex(per_domain(values, domain_names, key, what='proportions'), key, positive=positive, tol=tol)
