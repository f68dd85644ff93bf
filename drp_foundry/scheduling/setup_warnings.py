"""Before training: settings under which the data scheduler runs, but not as the paper means it.

Nothing here changes what a policy does (the research code's behaviour stays); each function
returns the warning text (naming the config key and the fix) or None, and the pre-flight
check (``drp_foundry.composer.scheduler_warnings``) logs it before training starts.

- ``first_fit_step``: when ``drpruning``'s first scaling-law fit happens. The policy fits from
  ``fit_start_fraction`` of the run, but only with at least ``min_fit_points`` history points
  (the research code's "more than 10"), one point per evaluation from
  ``history_start_fraction``. With few evaluations per run the point minimum, not the
  fraction, decides, and until then drpruning is ``dro`` on the configured reference losses.
- ``ratio_box``: the box eq. 6 keeps p_R in, [p0 / n, n p0], intersected (research code,
  ``clamp_ratio_to_initial_range``) with [min p0, max p0]. The largest domain can never grow
  under that clamp (its upper bound is its own p0) and the smallest never shrink; that is
  the research code's design. When the initial ratio is nearly uniform, several domains
  are pinned like that, and p_R cannot move toward them at all.
- ``reference_loss_warning``: ``drpruning`` without ``reference_losses`` samples p_R until
  every domain has been fitted; ``dro`` / ``sheared`` with the *source* model's losses while
  the target is much smaller steer by the pruning degradation itself.

Pure numpy; no Composer import.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ['first_fit_step', 'fit_timing_warning', 'ratio_box', 'ratio_box_warning', 'reference_loss_warning',
           'source_reference_warning', 'MIN_ROOM']

MIN_ROOM = 1.1  # a domain whose p_R may grow by less than 10% over its p0 has "no room to grow"


def _update_steps(total_steps: int, eval_interval: int) -> range:
    return range(eval_interval, total_steps + 1, eval_interval)


def first_fit_step(total_steps: int, eval_interval: int, fit_start_fraction: float = 0.2,
                   history_start_fraction: float = 0.02, min_fit_points: int = 11) -> tuple[int | None, int | None]:
    """(the step of drpruning's first fit, the step the fraction alone would give), None when never.

    Mirrors ``DRPruningPolicy``: an update at every ``eval_interval`` batches (no eval at step 0); a history
    point at each update with step >= ``history_start_fraction`` * S; a fit at each update with step >=
    ``fit_start_fraction`` * S and at least ``min_fit_points`` points.
    """
    if total_steps < 1 or eval_interval < 1:
        raise ValueError(f'total_steps ({total_steps}) and eval_interval ({eval_interval}) must be >= 1')
    points, by_fraction = 0, None
    for step in _update_steps(total_steps, eval_interval):
        fraction = step / total_steps
        if fraction >= history_start_fraction:
            points += 1
        if fraction >= fit_start_fraction:
            by_fraction = step if by_fraction is None else by_fraction
            if points >= min_fit_points:
                return step, by_fraction
    return None, by_fraction


def _points_decide(fit: int | None, by_fraction: int | None, total_steps: int, eval_interval: int) -> bool:
    """The point minimum delays the first fit by more than one evaluation and 5% of the run (or forever)."""
    if fit is None:
        return True
    return fit - by_fraction > max(eval_interval, 0.05 * total_steps)


def _largest_interval(total_steps: int, fit_start_fraction: float, history_start_fraction: float,
                      min_fit_points: int) -> int | None:
    """The largest eval interval at which the fraction, not the point minimum, decides the first fit."""
    for interval in range(max(1, total_steps // min_fit_points), 0, -1):
        fit, by_fraction = first_fit_step(total_steps, interval, fit_start_fraction, history_start_fraction,
                                          min_fit_points)
        if not _points_decide(fit, by_fraction, total_steps, interval):
            return interval
    return None


def fit_timing_warning(total_steps: int, eval_interval: int, fit_start_fraction: float = 0.2,
                       history_start_fraction: float = 0.02, min_fit_points: int = 11,
                       where: str = 'callbacks.drp_dynamic_loading.policy') -> str | None:
    """The warning when the point minimum, not ``fit_start_fraction``, decides when drpruning starts fitting
    (it delays the first fit by more than one evaluation and more than 5% of the run)."""
    fit, by_fraction = first_fit_step(total_steps, eval_interval, fit_start_fraction, history_start_fraction,
                                      min_fit_points)
    if not _points_decide(fit, by_fraction, total_steps, eval_interval):
        return None
    best = _largest_interval(total_steps, fit_start_fraction, history_start_fraction, min_fit_points)
    fix = (f'evaluate more often (eval_interval <= {best}ba for this max_duration)' if best else
           'run longer or evaluate more often') + f', or lower {where}.min_fit_points (research code: 11)'
    when = ('never: the run has fewer evaluations than that' if fit is None else
            f'at step {fit} ({fit / total_steps:.0%} of the run), not at step {by_fraction} '
            f'(fit_start_fraction={fit_start_fraction:g})')
    return (f'{where}: with eval_interval {eval_interval}ba and max_duration {total_steps}ba the first scaling-law '
            f'fit needs min_fit_points={min_fit_points} history points (one per eval from '
            f'history_start_fraction={history_start_fraction:g}), so drpruning fits its reference losses {when}; '
            f'until then it is dro on the configured reference_losses. Fix: {fix}.')


def ratio_box(reference_ratio: Sequence[float], max_ratio_factor: float = 2.0,
              clamp_ratio_to_initial_range: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper): the box eq. 6 keeps p_R in (``update_reference_ratio``'s, before the renormalisation)."""
    p0 = np.asarray(reference_ratio, dtype=np.float64)
    p0 = p0 / p0.sum()
    lower, upper = p0 / max_ratio_factor, p0 * max_ratio_factor
    if clamp_ratio_to_initial_range:
        lower, upper = np.maximum(lower, p0.min()), np.minimum(upper, p0.max())
    return lower, upper


def ratio_box_warning(domain_names: Sequence[str], reference_ratio: Sequence[float], max_ratio_factor: float = 2.0,
                      clamp_ratio_to_initial_range: bool = True, min_room: float = MIN_ROOM,
                      where: str = 'callbacks.drp_dynamic_loading.policy') -> str | None:
    """The warning when the box leaves a domain other than the largest less than ``min_room`` - 1 to grow.

    (The largest domain is pinned under the research clamp by design; alone it does not warn.)
    """
    p0 = np.asarray(reference_ratio, dtype=np.float64)
    p0 = p0 / p0.sum()
    lower, upper = ratio_box(p0, max_ratio_factor, clamp_ratio_to_initial_range)
    pinned = [i for i in range(len(p0)) if upper[i] < min_room * p0[i]]
    if len(pinned) < 2:
        return None
    box = ', '.join(f'{domain_names[i]} [{lower[i]:.3f}, {upper[i]:.3f}] (p0 {p0[i]:.3f})' for i in pinned)
    return (f'{where}: the reference-ratio box [max(p0/{max_ratio_factor:g}, min p0), min({max_ratio_factor:g} p0, '
            f'max p0)] leaves {[domain_names[i] for i in pinned]} less than {min_room - 1:.0%} room to grow: {box}. '
            'The initial ratio is nearly uniform, so the dynamic reference ratio (eq. 6) cannot move toward these '
            f'domains. Fix: set {where}.clamp_ratio_to_initial_range: false (ours: the box [p0/n, n p0] of the '
            'paper) or start from a less uniform reference_ratio (the paper\'s multilingual rule: size^0.3).')


def reference_loss_warning(policy_name: str, reference_losses, total_steps: int | None = None,
                           eval_interval: int | None = None, fit_start_fraction: float = 0.2,
                           history_start_fraction: float = 0.02, min_fit_points: int = 11,
                           where: str = 'callbacks.drp_dynamic_loading.policy') -> str | None:
    """The warning when ``drpruning`` has no ``reference_losses`` (``dro`` and ``sheared`` refuse to start)."""
    if policy_name != 'drpruning' or reference_losses is not None:
        return None
    until = 'its first fit'
    if total_steps and eval_interval:
        fit, _ = first_fit_step(total_steps, eval_interval, fit_start_fraction, history_start_fraction,
                                min_fit_points)
        until = 'the end of the run (it never fits)' if fit is None else f'its first fit at step {fit}'
    return (f'{where}.reference_losses: not given, so drpruning samples the reference ratio p_R (no DRO) until '
            f'{until}. The paper starts from target-size references: Sheared LLaMA\'s scaling-law predictions '
            '(yamls/prune_1.3b.yaml), or in its multilingual runs the source model\'s validation losses, which the '
            f'fits then correct. Fix: pass {where}.reference_losses: {{domain: loss}} (python -m '
            'drp_foundry.scheduling.reference_losses pilot|fit prints them).')


def source_reference_warning(policy_name: str, domain_names: Sequence[str], reference_losses: Sequence[float],
                             eval_losses: Sequence[float], model_params: float, target_params: float | None,
                             max_target_fraction: float = 0.5, tolerance: float = 0.05,
                             where: str = 'callbacks.drp_dynamic_loading.policy') -> str | None:
    """At the first update of a pruning run: ``dro`` / ``sheared`` references that look like the source's own losses.

    The model is then still about the source, so target-size references lie clearly *above* its eval losses
    (the target is worse). References within ``tolerance`` nats of (or above) none of them, i.e. every eval loss at
    or above its reference less ``tolerance``, while the target is at most ``max_target_fraction`` of the model,
    mean the excess the policy steers by will be the pruning degradation itself.
    """
    if policy_name not in ('dro', 'sheared') or target_params is None or not model_params:
        return None
    if target_params > max_target_fraction * model_params:
        return None
    refs, losses = np.asarray(reference_losses, dtype=np.float64), np.asarray(eval_losses, dtype=np.float64)
    if not (np.all(np.isfinite(refs)) and np.all(np.isfinite(losses))) or not np.all(losses - refs >= -tolerance):
        return None
    return (f'{where}.reference_losses: at the first evaluation every domain\'s loss is at or above its reference '
            f'loss (excess {dict(zip(domain_names, np.round(losses - refs, 3).tolist()))}) although the target is '
            f'{target_params / model_params:.0%} of the model: these look like the source model\'s losses, so '
            f'{policy_name} steers by the pruning degradation itself and never reaches its references. The paper '
            'passes target-size references to fixed-reference policies (Sheared LLaMA: scaling-law predictions); '
            'only drpruning, which refits them, starts from the source\'s (multilingual runs). Fix: pass target-size '
            'reference_losses (drp-reference-losses pilot|fit), or use drpruning.')
