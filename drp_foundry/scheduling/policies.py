"""Domain-mixture policies: how the training mixture q changes after each evaluation.

Four policies, one interface (``MixturePolicy``). Each policy is one class whose
``__init__`` keyword arguments are its config keys (``policy: {name: dro, rho: 0.1}``);
``drp_foundry.scheduling.registry`` finds the classes by name (entry-point group
``drp_foundry_policies``), so a new policy is one subclass in one file plus one entry point.

- ``constant``: q = p_R0 always.
- ``sheared`` (Sheared LLaMA, Xia et al. 2024, Alg. 1): q <- softmax(log q_prev + Delta),
  then q <- (1 - c) q + c / n with c = 1e-4, Delta = loss - fixed reference loss, clipped
  at zero as in the Sheared LLaMA paper (the research code does not clip: a key).
- ``dro``: chi-square DRO (paper eq. 2-3, 5) on the excess losses g = loss - l_R,
  fixed reference losses l_R and fixed reference ratio p_R.
- ``drpruning``: ``dro`` plus the dynamic reference loss (paper §3.2, eq. 4: per-domain
  scaling-law fit from ``fit_start_fraction`` of training, "adopt the minimum") and the
  dynamic reference ratio (§3.3, eq. 6, from ``ratio_start_fraction``).

Loss signal: the research code's eval mode (DRPruning ``use_eval``, Sheared LLaMA) feeds the
raw per-domain eval loss of each evaluation to the update; that is the default here. The
research code's other mode (an EMA of per-domain *train* losses, weight 0.1 per training
step) is not implemented. ``eval_loss_ema`` < 1 (ours, not the paper's) smooths the eval
losses across updates instead: l <- (1 - w) l + w * new eval loss.

Reference losses (``reference_losses``) are the losses a model of the *target* size is
expected to reach (Sheared LLaMA: a scaling-law prediction at the target size), not the
source model's losses; ``drp_foundry.scheduling.reference_losses`` derives them from a
constant-policy pilot at the target size or from a per-domain fit over source sizes.

``update(step, eval_losses, samples_per_domain, expected_params)`` returns the new q (a
float64 array on the simplex) and leaves a ``last_diagnostics`` dict (losses, reference
losses, excess, q, p_R, fits, ``warnings``). Degenerate inputs never crash and never give
a NaN mixture: a non-finite eval loss leaves that domain's EMA and history untouched (and
keeps the previous q until every domain has had a finite loss); a single domain gets
q = [1]; all-negative excess losses still give the DRO optimum (the problem is invariant to
shifting g); too few history points skip the fit. Each case adds a line to ``warnings`` and
is logged through ``logging``. ``state_dict``/``load_state_dict`` hold everything an update
depends on, so a resumed run makes the same updates.

Pure numpy/scipy; no Composer import.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from drp_foundry.mixtures import domain_mixture, per_domain, simplex
from drp_foundry.scheduling.chi_square_dro import robust_mixture
from drp_foundry.scheduling.reference_ratio import update_reference_ratio
from drp_foundry.scheduling.scaling_law_fit import MIN_POINTS, fit_scaling_laws

log = logging.getLogger(__name__)

__all__ = ['MixturePolicy', 'ConstantPolicy', 'ShearedPolicy', 'DROPolicy', 'DRPruningPolicy', 'BUILTIN_POLICIES']


def _as_ratio(values: Sequence[float] | Mapping[str, float], domain_names: Sequence[str], key: str) -> np.ndarray:
    """p_R: every domain sampled (> 0), summing to 1 (rounding renormalised)."""
    return domain_mixture(values, domain_names, f'`{key}`', positive=True)


def _as_losses(values: Sequence[float] | Mapping[str, float], domain_names: Sequence[str], key: str) -> np.ndarray:
    losses = per_domain(values, domain_names, f'`{key}`', what='losses')
    bad = {name: float(value) for name, value in zip(domain_names, losses) if not (np.isfinite(value) and value >= 0)}
    if bad:  # a cross-entropy is finite and >= 0; a negative l_R pins its domain at the cap under dro
        raise ValueError(f'`{key}` must be finite cross-entropies >= 0 (nats per token); got {bad}')
    return losses


def _check_fraction(value: float, key: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'`{key}` is a fraction of the total training steps and must be in [0, 1], got {value}')
    return float(value)


class MixturePolicy(abc.ABC):
    """Common state and bookkeeping; subclasses implement ``_mixture``.

    Args:
        domain_names: the domains, in the dataset's order.
        reference_ratio: p_R0, the initial (reference) mixture; also q before any update.
        total_steps: training length in batches (needed by fraction-based timing keys;
            the callback sets it from ``max_duration``).
        eval_loss_ema: weight of the newest eval loss in an EMA across updates (ours);
            1.0 (default) uses the raw eval loss, as the research code does in eval mode.
        update_interval: minimum number of steps between two updates; evaluations in
            between leave q, the loss EMA and the history unchanged.
    """

    name = 'base'

    def __init__(self, domain_names: Sequence[str], reference_ratio: Sequence[float], total_steps: int | None = None,
                 eval_loss_ema: float = 1.0, update_interval: int = 1):
        if len(domain_names) == 0 or len(set(domain_names)) != len(domain_names):
            raise ValueError(f'`domain_names` must be non-empty and unique, got {list(domain_names)}')
        self.domain_names = list(domain_names)
        self.num_domains = len(self.domain_names)
        self.p_ref_initial = _as_ratio(reference_ratio, self.domain_names, 'reference_ratio')
        if not 0.0 < eval_loss_ema <= 1.0:
            raise ValueError(f'`eval_loss_ema` must be in (0, 1] (1 = raw eval loss), got {eval_loss_ema}')
        if update_interval < 1:
            raise ValueError(f'`update_interval` must be >= 1 step, got {update_interval}')
        if total_steps is not None and total_steps < 1:
            raise ValueError(f'`total_steps` must be >= 1, got {total_steps}')
        self.total_steps = total_steps
        self.eval_loss_ema = float(eval_loss_ema)
        self.update_interval = int(update_interval)
        self.p_ref = self.p_ref_initial.copy()
        self.q = self.p_ref_initial.copy()
        self.ema_losses = np.full(self.num_domains, np.nan)
        self.last_update_step = -1
        self.num_updates = 0
        self.last_diagnostics: dict[str, Any] = {}

    # -- the interface -------------------------------------------------------------------
    def update(self, step: int, eval_losses: Sequence[float], samples_per_domain: Sequence[float] | None = None,
               expected_params: float | None = None) -> np.ndarray:
        """Take the eval losses at ``step``; return the mixture for the following steps."""
        losses = np.asarray(eval_losses, dtype=np.float64)
        if losses.shape != (self.num_domains,):
            raise ValueError(f'expected {self.num_domains} eval losses (domains {self.domain_names}), got {losses.shape}')
        if samples_per_domain is not None:
            samples_per_domain = np.asarray(samples_per_domain, dtype=np.float64)
            if samples_per_domain.shape != (self.num_domains,):
                raise ValueError(f'expected {self.num_domains} sample counts, got shape {samples_per_domain.shape}')
        warnings: list[str] = []
        diagnostics: dict[str, Any] = {'step': int(step), 'policy': self.name, 'eval_losses': losses.tolist(),
                                       'updated': False, 'warnings': warnings}
        if self.last_update_step >= 0 and step - self.last_update_step < self.update_interval:
            diagnostics['skipped'] = (f'step {step} is less than update_interval={self.update_interval} steps after '
                                      f'the last update (step {self.last_update_step})')
            return self._finish(diagnostics, self.q)

        finite = np.isfinite(losses)
        if not finite.all():
            bad = [name for name, ok in zip(self.domain_names, finite) if not ok]
            warnings.append(f'non-finite eval loss for {bad}: their EMA and history are left unchanged')
        first = finite & np.isnan(self.ema_losses)
        self.ema_losses[first] = losses[first]
        again = finite & ~first
        self.ema_losses[again] = (1.0 - self.eval_loss_ema) * self.ema_losses[again] + self.eval_loss_ema * losses[again]
        self.last_update_step = int(step)
        self.num_updates += 1

        q = self._mixture(step, losses, finite, samples_per_domain, expected_params, diagnostics)
        if self.num_domains == 1:
            warnings.append('a single domain: the mixture is [1.0]')
            q = np.ones(1)
        try:
            q = self.q if q is None else simplex(q, f'policy {self.name!r} mixture', tol=1e-6)
            diagnostics['updated'] = q is not self.q
        except ValueError as invalid:
            warnings.append(f'{invalid}; keeping the previous one')
            q = self.q
        self.q = np.asarray(q, dtype=np.float64)
        return self._finish(diagnostics, self.q)

    def _finish(self, diagnostics: dict[str, Any], q: np.ndarray) -> np.ndarray:
        diagnostics.update(q=q.tolist(), p_ref=self.p_ref.tolist(), ema_losses=self.ema_losses.tolist())
        for message in diagnostics['warnings']:
            log.warning('%s policy, step %d: %s', self.name, diagnostics['step'], message)
        self.last_diagnostics = diagnostics
        return q.copy()

    @abc.abstractmethod
    def _mixture(self, step, losses, finite, samples_per_domain, expected_params, diagnostics) -> np.ndarray | None:
        """The new q (None keeps the previous one); may append to ``diagnostics['warnings']``."""

    def _have_all_losses(self, diagnostics: dict[str, Any]) -> bool:
        if np.isnan(self.ema_losses).any():
            missing = [n for n, v in zip(self.domain_names, self.ema_losses) if np.isnan(v)]
            diagnostics['warnings'].append(f'no finite eval loss yet for {missing}: keeping the previous mixture')
            return False
        return True

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (safe for ``torch.save`` and ``weights_only`` loading)."""
        return {
            'policy': self.name,
            'domain_names': list(self.domain_names),
            'p_ref_initial': self.p_ref_initial.tolist(),
            'p_ref': self.p_ref.tolist(),
            'q': self.q.tolist(),
            'ema_losses': [None if math.isnan(v) else v for v in self.ema_losses.tolist()],
            'last_update_step': self.last_update_step,
            'num_updates': self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get('policy') != self.name:
            raise ValueError(f'checkpoint holds the state of policy {state.get("policy")!r}, but `policy` is '
                             f'{self.name!r}; use the same policy to resume')
        if list(state['domain_names']) != self.domain_names:
            raise ValueError(f'checkpoint domains {state["domain_names"]} differ from the configured domains '
                             f'{self.domain_names}; resume with the same `domain_names` in the same order')
        if not np.allclose(state['p_ref_initial'], self.p_ref_initial, rtol=0, atol=1e-9):
            raise ValueError(f'checkpoint reference_ratio {state["p_ref_initial"]} differs from the configured '
                             f'`reference_ratio` {self.p_ref_initial.tolist()}; resume with the same ratios')
        self.p_ref_initial = np.asarray(state['p_ref_initial'], dtype=np.float64)
        self.p_ref = np.asarray(state['p_ref'], dtype=np.float64)
        self.q = np.asarray(state['q'], dtype=np.float64)
        self.ema_losses = np.array([np.nan if v is None else v for v in state['ema_losses']], dtype=np.float64)
        self.last_update_step = int(state['last_update_step'])
        self.num_updates = int(state['num_updates'])


class ConstantPolicy(MixturePolicy):
    """q = p_R0 at every update (the static-mixture baseline).

    Example:
        >>> from drp_foundry import ConstantPolicy
        >>> policy = ConstantPolicy(['wiki', 'github'], reference_ratio=[0.7, 0.3])
        >>> policy.update(step=50, eval_losses=[2.0, 3.0]).round(2).tolist()  # q never moves
        [0.7, 0.3]
    """

    name = 'constant'

    def _mixture(self, step, losses, finite, samples_per_domain, expected_params, diagnostics):
        return self.p_ref_initial.copy()


class ShearedPolicy(MixturePolicy):
    """Sheared LLaMA's exponentiated-gradient rule with fixed reference losses.

    Delta_i = loss_i - l_R,i (clipped at 0 when ``clip_excess_at_zero``, as in Sheared
    LLaMA's Alg. 1; the research code does not clip), q <- softmax(log q_prev + Delta),
    q <- (1 - c) q + c / n with ``smoothing`` c = 1e-4, on the raw eval loss (as in Sheared LLaMA).

    Example:
        >>> from drp_foundry import ShearedPolicy
        >>> policy = ShearedPolicy(['wiki', 'github'], reference_ratio=[0.5, 0.5], reference_losses=[2.0, 2.0])
        >>> q = policy.update(step=50, eval_losses=[2.1, 2.9])  # github is further above its reference
        >>> bool(q[1] > q[0]) and round(float(q.sum()), 6) == 1.0
        True
    """

    name = 'sheared'

    def __init__(self, domain_names, reference_ratio, reference_losses: Sequence[float] | Mapping[str, float] | None = None,
                 smoothing: float = 1e-4, clip_excess_at_zero: bool = True, **kwargs):
        super().__init__(domain_names, reference_ratio, **kwargs)
        if reference_losses is None:
            raise ValueError('the `sheared` policy needs `reference_losses` ({domain: loss of a target-size model})')
        self.reference_losses = _as_losses(reference_losses, self.domain_names, 'reference_losses')
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f'`smoothing` must be in [0, 1], got {smoothing}')
        self.smoothing = float(smoothing)
        self.clip_excess_at_zero = bool(clip_excess_at_zero)

    def _mixture(self, step, losses, finite, samples_per_domain, expected_params, diagnostics):
        if not self._have_all_losses(diagnostics):
            return None
        excess = self.ema_losses - self.reference_losses
        diagnostics.update(reference_losses=self.reference_losses.tolist(), excess_losses=excess.tolist())
        if self.clip_excess_at_zero:
            if np.all(excess <= 0):
                diagnostics['warnings'].append('every loss is at or below its reference loss: q only gets smoothed')
            excess = np.maximum(excess, 0.0)
        logits = np.log(self.q) + excess
        weights = np.exp(logits - logits.max())
        q = weights / weights.sum()
        return (1.0 - self.smoothing) * q + self.smoothing / self.num_domains


class DROPolicy(MixturePolicy):
    """Chi-square DRO around a fixed p_R with fixed reference losses (paper eq. 2-3, 5).

    Args:
        reference_losses: l_R per domain (for ``drpruning``: the values before the first
            fit; may be None there).
        rho: radius of the chi-square ball (paper: 0.1).
        min_ratio: floor on q_i / p_R,i (research code 0.2).
        floor_at_min_reference: also floor q_i at min_j p_R,j (research code: on).
        floors_in_constraint: the ratio floor inside the chi-square constraint, as the
            research code does (default); False (ours, earlier default) floors after solving.

    All excess losses negative (every domain below its reference): ours solves the same
    problem exactly, max_q sum q_i g_i over the chi-square ball, which is invariant to
    shifting every g_i by one constant, so q follows the differences of the excesses (and a
    warning says so). The research code instead rescales its reference losses by 0.9, 0.8, ...
    until some excess is positive, which changes the differences (each g_i shifts by a
    multiple of its own l_R,i) and so can give another q. We keep the exact solve; the
    warning names the case so it can be checked.

    Example:
        >>> from drp_foundry import DROPolicy
        >>> policy = DROPolicy(['wiki', 'github', 'arxiv'], reference_ratio=[0.4, 0.4, 0.2],
        ...                    reference_losses=[2.0, 2.0, 2.0], rho=0.1)
        >>> q = policy.update(step=50, eval_losses=[2.1, 2.6, 2.2])  # the worst-case mixture in the chi-square ball
        >>> int(q.argmax()), round(float(q.sum()), 6)
        (1, 1.0)
    """

    name = 'dro'

    def __init__(self, domain_names, reference_ratio, reference_losses: Sequence[float] | Mapping[str, float] | None = None,
                 rho: float = 0.1, min_ratio: float = 0.2, floor_at_min_reference: bool = True,
                 floors_in_constraint: bool = True, **kwargs):
        super().__init__(domain_names, reference_ratio, **kwargs)
        self.reference_losses = (None if reference_losses is None else _as_losses(
            reference_losses, self.domain_names, 'reference_losses'))
        if self.reference_losses is None and self.name == 'dro':
            raise ValueError('the `dro` policy needs `reference_losses` ({domain: loss of a target-size model})')
        if not rho > 0:
            raise ValueError(f'`rho` must be > 0, got {rho}')
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f'`min_ratio` must be in [0, 1], got {min_ratio}')
        self.rho = float(rho)
        self.min_ratio = float(min_ratio)
        self.floor_at_min_reference = bool(floor_at_min_reference)
        self.floors_in_constraint = bool(floors_in_constraint)

    def _mixture(self, step, losses, finite, samples_per_domain, expected_params, diagnostics):
        if not self._have_all_losses(diagnostics):
            return None
        return self._dro_mixture(diagnostics)

    def _dro_mixture(self, diagnostics: dict[str, Any]) -> np.ndarray:
        excess = self.ema_losses - self.reference_losses
        diagnostics.update(reference_losses=self.reference_losses.tolist(), excess_losses=excess.tolist())
        if np.all(excess < 0):
            diagnostics['warnings'].append('every excess loss is negative (reference losses above the current '
                                           'losses); the DRO mixture follows their differences')
        return robust_mixture(excess, self.p_ref, self.rho, self.min_ratio, self.floor_at_min_reference,
                              self.floors_in_constraint)


class DRPruningPolicy(DROPolicy):
    """DRO with the dynamic reference loss (§3.2, eq. 4) and dynamic reference ratio (§3.3, eq. 6).

    At each update (step s of S = ``total_steps``):
      1. from ``history_start_fraction`` of training, append (T_i, P, loss_i) to domain i's
         history (at most ``max_history_points``; beyond that the interior point closest in
         log T to its predecessor is dropped, so the history stays spread over log T);
      2. from ``fit_start_fraction``, fit eq. 4 per domain with at least ``min_fit_points``
         points, predict the loss at T_i * S / s and P = ``target_params`` (or the current P),
         and set l_R,i to the prediction at the first fit of that domain (the configured
         ``reference_losses`` are placeholders), to min(l_R,i, prediction) afterwards;
      3. q = DRO(EMA(loss) - l_R, p_R) with the floors; without ``reference_losses``, q = p_R
         until every domain has been fitted;
      4. from ``ratio_start_fraction``, p_R <- eq. 6 with ``ratio_delta`` and ``max_ratio_factor``,
         then (``clamp_ratio_to_initial_range``, research code) within [min p_R0, max p_R0].

    Defaults: fits from 20%, ratio from 40% (paper); the research code uses 10% / 20%
    and starts the history at 2% (our default for ``history_start_fraction``).

    Example:
        >>> from drp_foundry import DRPruningPolicy
        >>> policy = DRPruningPolicy(['wiki', 'github'], reference_ratio=[0.5, 0.5], reference_losses=[2.0, 2.0],
        ...                          total_steps=1000)
        >>> q = policy.update(step=50, eval_losses=[2.1, 2.6])  # before its first scaling-law fit: DRO on the references
        >>> bool(q[1] > q[0])
        True
    """

    name = 'drpruning'

    def __init__(self, domain_names, reference_ratio, reference_losses: Sequence[float] | Mapping[str, float] | None = None,
                 fit_start_fraction: float = 0.2, ratio_start_fraction: float = 0.4,
                 history_start_fraction: float = 0.02, ratio_delta: float = 0.1, max_ratio_factor: float = 2.0,
                 target_params: float | None = None, max_history_points: int = 64, min_fit_points: int = MIN_POINTS,
                 huber_delta: float = 1e-3, num_best_fits: int = 3, clamp_ratio_to_initial_range: bool = True,
                 **kwargs):
        super().__init__(domain_names, reference_ratio, reference_losses, **kwargs)
        self.fit_start_fraction = _check_fraction(fit_start_fraction, 'fit_start_fraction')
        self.ratio_start_fraction = _check_fraction(ratio_start_fraction, 'ratio_start_fraction')
        self.history_start_fraction = _check_fraction(history_start_fraction, 'history_start_fraction')
        if not 0.0 <= ratio_delta <= 1.0:
            raise ValueError(f'`ratio_delta` must be in [0, 1], got {ratio_delta}')
        if not max_ratio_factor >= 1.0:
            raise ValueError(f'`max_ratio_factor` (the paper\'s n) must be >= 1, got {max_ratio_factor}')
        if target_params is not None and not target_params > 0:
            raise ValueError(f'`target_params` must be > 0, got {target_params}')
        if min_fit_points < 3 or max_history_points < min_fit_points:
            raise ValueError(f'need 3 <= `min_fit_points` ({min_fit_points}) <= `max_history_points` '
                             f'({max_history_points})')
        self.ratio_delta = float(ratio_delta)
        self.max_ratio_factor = float(max_ratio_factor)
        self.target_params = target_params
        self.max_history_points = int(max_history_points)
        self.min_fit_points = int(min_fit_points)
        self.huber_delta = float(huber_delta)
        self.num_best_fits = int(num_best_fits)
        self.clamp_ratio_to_initial_range = bool(clamp_ratio_to_initial_range)
        self.history: list[list[list[float]]] = [[] for _ in self.domain_names]  # per domain: [T, P, loss]
        self.fitted = [False] * self.num_domains
        self.fits: list[dict[str, float] | None] = [None] * self.num_domains
        if self.reference_losses is None:
            self.reference_losses = np.full(self.num_domains, np.nan)

    def _mixture(self, step, losses, finite, samples_per_domain, expected_params, diagnostics):
        warnings = diagnostics['warnings']
        if self.total_steps is None:
            raise ValueError('the `drpruning` policy needs `total_steps` (set by the callback from max_duration)')
        fraction = step / self.total_steps
        params = 1.0 if expected_params is None or not math.isfinite(expected_params) else float(expected_params)
        if expected_params is not None and not math.isfinite(expected_params):
            warnings.append(f'non-finite expected parameter count {expected_params}; using a constant P')

        if fraction >= self.history_start_fraction:
            if samples_per_domain is None:
                warnings.append('no samples_per_domain: the reference-loss history is not extended')
            else:
                for i in np.flatnonzero(finite & (samples_per_domain > 0)):
                    self._append_history(i, float(samples_per_domain[i]), params, float(losses[i]))

        if fraction >= self.fit_start_fraction and step > 0:
            self._refit_reference_losses(step, params, diagnostics)

        if np.isnan(self.reference_losses).any():
            waiting = [n for n, r in zip(self.domain_names, self.reference_losses) if np.isnan(r)]
            warnings.append(f'no reference loss yet for {waiting} (no `reference_losses`, not fitted yet): q = p_R')
            q = self.p_ref.copy()
        elif not self._have_all_losses(diagnostics):
            q = None
        else:
            q = self._dro_mixture(diagnostics)
        if q is not None and fraction >= self.ratio_start_fraction:
            self.p_ref = update_reference_ratio(self.p_ref, q, self.p_ref_initial, self.ratio_delta,
                                                self.max_ratio_factor, self.clamp_ratio_to_initial_range)
        diagnostics['reference_losses'] = self.reference_losses.tolist()
        diagnostics['fits'] = list(self.fits)
        return q

    def _append_history(self, domain: int, samples: float, params: float, loss: float) -> None:
        history = self.history[domain]
        history.append([samples, params, loss])
        if len(history) > self.max_history_points:
            log_t = np.log([point[0] for point in history])
            gaps = np.diff(log_t)[:-1]  # gap of each interior point (1 .. n-2) to its predecessor
            del history[1 + int(np.argmin(gaps))]

    def _refit_reference_losses(self, step: int, params: float, diagnostics: dict[str, Any]) -> None:
        ready = [i for i in range(self.num_domains) if len(self.history[i]) >= self.min_fit_points]
        if len(ready) < self.num_domains:
            short = {self.domain_names[i]: len(self.history[i]) for i in range(self.num_domains) if i not in ready}
            diagnostics['warnings'].append(f'fewer than min_fit_points={self.min_fit_points} history points for '
                                           f'{short}: their reference losses are not refitted')
        if not ready:
            return
        scale = self.total_steps / step
        start = time.perf_counter()
        fits = fit_scaling_laws(
            data_consumed=[[p[0] for p in self.history[i]] for i in ready],
            num_params=[[p[1] for p in self.history[i]] for i in ready],
            losses=[[p[2] for p in self.history[i]] for i in ready],
            final_data_consumed=np.array([self.history[i][-1][0] * scale for i in ready]),
            final_num_params=self.target_params if self.target_params is not None else params,
            huber_delta=self.huber_delta, num_best=self.num_best_fits, min_points=self.min_fit_points)
        diagnostics['fit_seconds'] = time.perf_counter() - start
        for i, fit in zip(ready, fits):
            if fit is None:
                diagnostics['warnings'].append(f'scaling-law fit failed for {self.domain_names[i]}; '
                                               'reference loss unchanged')
                continue
            self.fits[i] = fit.to_dict()
            if self.fitted[i]:
                self.reference_losses[i] = min(self.reference_losses[i], fit.prediction)
            else:
                self.reference_losses[i] = fit.prediction
                self.fitted[i] = True

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(history=[[list(p) for p in h] for h in self.history],
                     reference_losses=[None if math.isnan(v) else v for v in self.reference_losses.tolist()],
                     fitted=list(self.fitted), fits=[None if f is None else dict(f) for f in self.fits])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = [[list(p) for p in h] for h in state['history']]
        self.reference_losses = np.array([np.nan if v is None else v for v in state['reference_losses']],
                                         dtype=np.float64)
        self.fitted = list(state['fitted'])
        self.fits = [None if f is None else dict(f) for f in state['fits']]


BUILTIN_POLICIES: dict[str, type[MixturePolicy]] = {
    cls.name: cls for cls in (ConstantPolicy, ShearedPolicy, DROPolicy, DRPruningPolicy)}
