"""Milliseconds per ``drpruning`` scheduler update for 8 domains with 64 history points each.

One update = append the new point to each domain's history, fit the scaling law of every
domain (grid of initialisations, best three refit and averaged), adopt the minimum
reference loss, solve the chi-square DRO mixture with its floors and move the reference
ratio. The histories are pre-filled with 64 noisy points per domain following
loss = A T^-beta (P^-alpha) + E, so every timed update runs the full fit. Two settings:
continued pretraining (P constant: 18 initialisations per domain) and pruning (P varies:
alpha fitted, 36 initialisations). Median over ``--updates`` updates after one warm-up, as
wall-clock and as process CPU time (the latter is the better figure on a shared machine).
The last line is the pruning figure (the heavier one); goal <= 50 ms.

    python bench/dro_update.py --updates 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from drp_foundry.scheduling.registry import build_policy

NUM_DOMAINS = 8
NUM_POINTS = 64


def make_policy(pruning: bool, rng: np.random.Generator):
    names = [f'domain{i}' for i in range(NUM_DOMAINS)]
    ratio = rng.dirichlet(np.full(NUM_DOMAINS, 5.0))
    laws = [(np.exp(rng.uniform(8.0, 12.0)), rng.uniform(0.05, 0.2), rng.uniform(0.3, 0.6), rng.uniform(1.5, 3.0))
            for _ in range(NUM_DOMAINS)]
    total_steps = 4 * NUM_POINTS + 100
    policy = build_policy({'name': 'drpruning', 'reference_losses': [law[3] + 0.2 for law in laws],
                           'target_params': 1.3e9 if pruning else None, 'max_history_points': NUM_POINTS,
                           'history_start_fraction': 0.0, 'fit_start_fraction': 0.0, 'ratio_start_fraction': 0.0},
                          names, ratio, total_steps=total_steps)

    def observe(step: int):
        samples = 2048.0 * step * ratio
        params = 7e9 * (1.3 / 7) ** min(step / (0.5 * total_steps), 1.0) if pruning else 1.3e9
        params *= np.exp(rng.normal(0.0, 0.02)) if pruning else 1.0
        losses = np.array([a * params**-alpha * t**-beta + e for (a, alpha, beta, e), t in zip(laws, samples)])
        return losses + rng.normal(0.0, 0.005, NUM_DOMAINS), samples, params

    for step in range(1, NUM_POINTS + 1):  # pre-fill the histories without fitting
        losses, samples, params = observe(step)
        for i in range(NUM_DOMAINS):
            policy._append_history(i, float(samples[i]), float(params), float(losses[i]))
    return policy, observe


def time_updates(pruning: bool, updates: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    policy, observe = make_policy(pruning, rng)
    timings, cpu_timings = [], []
    for k in range(updates + 1):
        step = NUM_POINTS + 1 + k
        losses, samples, params = observe(step)
        start, cpu_start = time.perf_counter(), time.process_time()
        q = policy.update(step, losses, samples, params)
        elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        assert all(len(h) == NUM_POINTS for h in policy.history) and all(f is not None for f in policy.fits)
        assert np.all(np.isfinite(q))
        if k > 0:  # the first update is a warm-up
            timings.append(elapsed * 1e3)
            cpu_timings.append(cpu_elapsed * 1e3)
    return statistics.median(timings), statistics.median(cpu_timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--updates', type=int, default=20)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    wall, cpu = time_updates(pruning=False, updates=args.updates, seed=args.seed)
    print(f'continued pretraining (P constant): {wall:.1f} ms wall, {cpu:.1f} ms CPU per update '
          f'({NUM_DOMAINS} domains x {NUM_POINTS} points)')
    wall, cpu = time_updates(pruning=True, updates=args.updates, seed=args.seed)
    print(f'dro_update_ms={wall:.1f} (wall; {cpu:.1f} ms CPU) pruning: P varies, {NUM_DOMAINS} domains x '
          f'{NUM_POINTS} points; goal <= 50')


if __name__ == '__main__':
    main()
