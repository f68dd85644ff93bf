"""Target-size reference losses l_R for the ``sheared``, ``dro`` and ``drpruning`` policies.

The reference loss of a domain is the loss a model of the *target* size is expected to
reach on it (Sheared LLaMA fits per-domain scaling laws over the source family and predicts
the target size; DRPruning starts from those and refits them during training). The source
model's own losses are not references: against them the excess is the pruning degradation
itself (several nats), and an exponentiated-gradient update collapses onto one domain.

Two ways to obtain them:

- ``pilot_reference_losses``: a short constant-policy pilot at the target size (prune with
  ``policy: {name: constant}``, optionally continue a little), then average its per-domain
  eval losses over the last few evaluations.
- ``size_law_reference_losses``: when per-domain losses of several source sizes are known
  (a model family), fit l(N) = E + A N^-alpha per domain and predict at the target N.

``drp-reference-losses pilot runs/<pilot>/metrics.jsonl`` prints
the mapping to paste into ``policy.reference_losses``.

Pure numpy/scipy; no Composer import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from drp_foundry.fileio import read_jsonl

_SUMMARY_KEYS = ('mean', 'worst', 'spread')  # logged beside the domains by drp_domain_eval_loss

__all__ = ['pilot_reference_losses', 'size_law_reference_losses', 'losses_from_metrics_jsonl']


def pilot_reference_losses(evaluations: Sequence[Mapping[str, float]], last: int | None = None) -> dict[str, float]:
    """Per-domain mean over the last ``last`` evaluations (all when None) of a pilot run.

    ``evaluations`` are {domain: loss} mappings in time order; every one must name the same
    domains with finite losses.
    """
    if not evaluations:
        raise ValueError('the pilot has no evaluations; run it with eval loaders for every domain')
    used = list(evaluations)[-last:] if last else list(evaluations)
    domains = list(used[0])
    for evaluation in used:
        if sorted(evaluation) != sorted(domains):
            raise ValueError(f'pilot evaluations name different domains: {sorted(evaluation)} vs {sorted(domains)}')
        bad = [d for d, v in evaluation.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f'non-finite pilot losses for {bad}')
    return {d: float(np.mean([e[d] for e in used])) for d in domains}


def _fit_one(sizes: np.ndarray, losses: np.ndarray) -> tuple[float, float, float]:
    """(E, A, alpha) of l(N) = E + A N^-alpha, least squares over alpha in a fine grid."""
    x = sizes / sizes.max()
    best = None
    for alpha in np.linspace(0.01, 2.0, 400):
        basis = np.stack([np.ones_like(x), x**-alpha], axis=1)
        (e, a), *_ = np.linalg.lstsq(basis, losses, rcond=None)
        if a < 0 or e < 0:
            continue
        err = float(np.sum((basis @ np.array([e, a]) - losses) ** 2))
        if best is None or err < best[0]:
            best = (err, e, a, alpha)
    if best is None:
        raise ValueError(f'losses {losses.tolist()} do not decrease with size {sizes.tolist()}; no l(N) fit')
    _, e, a, alpha = best
    return float(e), float(a * sizes.max() ** alpha), float(alpha)


def size_law_reference_losses(sizes: Sequence[float], losses: Mapping[str, Sequence[float]],
                              target_size: float) -> dict[str, float]:
    """Fit l(N) = E + A N^-alpha per domain over ``sizes`` (>= 3) and predict at ``target_size``.

    ``losses[domain][k]`` is the loss of the model with ``sizes[k]`` parameters.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) < 3 or len(set(sizes.tolist())) < 3 or np.any(sizes <= 0):
        raise ValueError(f'need at least 3 distinct positive model sizes, got {sizes.tolist()}')
    if not target_size > 0:
        raise ValueError(f'target_size must be > 0, got {target_size}')
    out = {}
    for domain, values in losses.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != sizes.shape or not np.all(np.isfinite(values)):
            raise ValueError(f'domain {domain}: need one finite loss per size ({len(sizes)}), got {values.tolist()}')
        e, a, alpha = _fit_one(sizes, values)
        out[domain] = e + a * float(target_size) ** -alpha
    return out


def losses_from_metrics_jsonl(path: str, prefix: str = 'drp/domain_eval_loss/') -> list[dict[str, float]]:
    """Per-domain eval losses of each evaluation logged by ``drp_jsonl`` (records with ``prefix`` keys)."""
    evaluations = []
    for _, record in read_jsonl(path):
        metrics = record.get('metrics', record)
        found = {k[len(prefix):]: float(v) for k, v in metrics.items()
                 if k.startswith(prefix) and k[len(prefix):] not in _SUMMARY_KEYS}
        if found:
            evaluations.append(found)
    if not evaluations:
        raise ValueError(f'{path}: no `{prefix}<domain>` metrics; log them with the drp_domain_eval_loss callback')
    return evaluations
