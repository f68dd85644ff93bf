"""The four mixture policies on hand-computed cases, their timing, clamps, degenerate inputs and state."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from drp_foundry.scheduling.policies import DRPruningPolicy
from drp_foundry.scheduling.registry import build_policy as registry_build
from drp_foundry.scheduling.scaling_law_fit import scaling_law

NAMES = ['a', 'b']


def build_policy(name, domain_names, reference_ratio, total_steps=None, **keys):
    """A policy from its config mapping, the way the callback builds it."""
    return registry_build({'name': name, **keys}, domain_names, reference_ratio, total_steps=total_steps)


def test_constant_policy_ignores_losses():
    policy = build_policy('constant', ['a', 'b', 'c'], [0.5, 0.3, 0.2])
    for step, losses in enumerate([[3.0, 1.0, 9.0], [1.0, 5.0, 2.0]], start=1):
        np.testing.assert_array_equal(policy.update(step, losses), [0.5, 0.3, 0.2])
    assert policy.last_diagnostics['updated'] and policy.last_diagnostics['warnings'] == []


def test_sheared_policy_hand_computed_two_updates():
    policy = build_policy('sheared', NAMES, [0.5, 0.5], reference_losses=[2.0, 2.0])
    q1 = policy.update(1, [3.0, 2.0])  # Delta = (1, 0)
    e = math.e
    expected1 = (1 - 1e-4) * np.array([e / (e + 1), 1 / (e + 1)]) + 1e-4 / 2
    np.testing.assert_allclose(q1, expected1, rtol=1e-12)
    q2 = policy.update(2, [2.5, 3.0])  # Delta = (0.5, 1), from q_prev
    logits = np.log(expected1) + np.array([0.5, 1.0])
    expected2 = (1 - 1e-4) * np.exp(logits) / np.exp(logits).sum() + 1e-4 / 2
    np.testing.assert_allclose(q2, expected2, rtol=1e-12)


def test_sheared_clipping_of_negative_excess():
    clipped = build_policy('sheared', NAMES, [0.5, 0.5], reference_losses=[2.0, 2.0])
    unclipped = build_policy('sheared', NAMES, [0.5, 0.5], reference_losses=[2.0, 2.0], clip_excess_at_zero=False)
    q_clipped = clipped.update(1, [1.0, 2.5])  # Delta = (-1, 0.5) -> (0, 0.5)
    q_unclipped = unclipped.update(1, [1.0, 2.5])
    w = np.exp([0.0, 0.5])
    np.testing.assert_allclose(q_clipped, (1 - 1e-4) * w / w.sum() + 0.5e-4, rtol=1e-12)
    w = np.exp([-1.0, 0.5])
    np.testing.assert_allclose(q_unclipped, (1 - 1e-4) * w / w.sum() + 0.5e-4, rtol=1e-12)
    # every loss under its reference: only the smoothing moves q
    np.testing.assert_allclose(clipped.update(2, [1.0, 1.0]), (1 - 1e-4) * q_clipped + 0.5e-4, rtol=1e-12)
    assert 'at or below' in clipped.last_diagnostics['warnings'][0]


def test_dro_policy_hand_computed_with_floors_and_ema():
    # p = (1/2, 1/2), g = (1, 0), rho = 1/8: q = (3/4, 1/4) (see test_chi_square_dro); the
    # floor q >= min p = 1/2 then gives (0.75, 0.5) / 1.25 = (0.6, 0.4).
    policy = build_policy('dro', NAMES, [0.5, 0.5], reference_losses=[0.0, 0.0], rho=0.125)
    np.testing.assert_allclose(policy.update(1, [1.0, 0.0]), [0.6, 0.4], atol=1e-12)
    no_floor = build_policy('dro', NAMES, [0.5, 0.5], reference_losses=[0.0, 0.0], rho=0.125,
                            floor_at_min_reference=False, eval_loss_ema=0.1)
    np.testing.assert_allclose(no_floor.update(1, [1.0, 0.0]), [0.75, 0.25], atol=1e-12)
    # eval_loss_ema 0.1 (ours): losses (0, 1) next give EMA (0.9, 0.1); g has mean 0.5, p-variance 0.16, so
    # mean - eta = sqrt(0.16 / 0.25) = 0.8, eta = -0.3: q ∝ (1.2, 0.4) = (0.75, 0.25)
    np.testing.assert_allclose(no_floor.update(2, [0.0, 1.0]), [0.75, 0.25], atol=1e-12)
    np.testing.assert_allclose(no_floor.ema_losses, [0.9, 0.1])
    # the reference ratio stays fixed in `dro`
    np.testing.assert_array_equal(no_floor.p_ref, [0.5, 0.5])


def test_dro_all_negative_excess_is_defined_and_warned():
    policy = build_policy('dro', NAMES, [0.5, 0.5], reference_losses=[5.0, 5.0], rho=0.125,
                          floor_at_min_reference=False)
    q = policy.update(1, [1.0, 0.0])
    np.testing.assert_allclose(q, [0.75, 0.25], atol=1e-12)  # same as with g shifted up by 5
    assert any('negative' in w for w in policy.last_diagnostics['warnings'])


@pytest.mark.parametrize('name,extra', [('constant', {}), ('sheared', {'reference_losses': [1.0]}),
                                        ('dro', {'reference_losses': [1.0]}),
                                        ('drpruning', {'reference_losses': [1.0], 'total_steps': 10})])
def test_single_domain_gives_one(name, extra):
    policy = build_policy(name, ['only'], [1.0], **extra)
    for step in range(1, 4):
        np.testing.assert_array_equal(policy.update(step, [2.0 + step], [100.0 * step], 1e6), [1.0])


@pytest.mark.parametrize('bad_loss', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_loss_keeps_previous_mixture_then_recovers(bad_loss):
    policy = build_policy('dro', ['a', 'b', 'c'], [0.5, 0.3, 0.2], reference_losses=[1.0, 1.0, 1.0])
    q0 = policy.update(1, [bad_loss, 2.0, 3.0])  # no finite loss yet for 'a'
    np.testing.assert_array_equal(q0, [0.5, 0.3, 0.2])
    assert not policy.last_diagnostics['updated']
    assert any("['a']" in w for w in policy.last_diagnostics['warnings'])
    q1 = policy.update(2, [2.0, 2.0, 3.0])
    ema_before = policy.ema_losses.copy()
    q2 = policy.update(3, [bad_loss, 2.0, 3.0])  # 'a' keeps its EMA; the update goes on
    assert policy.ema_losses[0] == ema_before[0]
    assert np.all(np.isfinite(q2)) and q2.sum() == pytest.approx(1.0)
    assert np.all(np.isfinite(q1))


def test_update_interval_and_repeated_step_are_skipped():
    policy = build_policy('sheared', NAMES, [0.5, 0.5], reference_losses=[2.0, 2.0], update_interval=10)
    q1 = policy.update(10, [3.0, 2.0])
    np.testing.assert_array_equal(policy.update(15, [9.0, 2.0]), q1)
    assert 'update_interval' in policy.last_diagnostics['skipped']
    np.testing.assert_array_equal(policy.update(10, [9.0, 2.0]), q1)  # e.g. a resumed run re-evaluating
    assert not np.array_equal(policy.update(20, [9.0, 2.0]), q1)


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match='unknown policy'):
        build_policy('doremi', NAMES, [0.5, 0.5])
    with pytest.raises(ValueError, match='reference_ratio'):
        build_policy('constant', NAMES, [0.5, 0.6])
    with pytest.raises(ValueError, match='reference_ratio'):
        build_policy('constant', NAMES, [1.0])
    with pytest.raises(ValueError, match='reference_losses'):
        build_policy('dro', NAMES, [0.5, 0.5], reference_losses=None)
    with pytest.raises(ValueError, match='rho'):
        build_policy('dro', NAMES, [0.5, 0.5], reference_losses=[1.0, 1.0], rho=-1.0)
    with pytest.raises(ValueError, match='fit_start_fraction'):
        build_policy('drpruning', NAMES, [0.5, 0.5], fit_start_fraction=20)
    with pytest.raises(ValueError, match='not keys of policy'):
        build_policy('constant', NAMES, [0.5, 0.5], rho=0.1)


# -- drpruning ----------------------------------------------------------------------------------
LAWS = [(40.0, 0.45, 2.0), (60.0, 0.35, 1.5), (30.0, 0.5, 2.5)]  # (A, beta, E) per domain
P0 = np.array([0.5, 0.3, 0.2])


def law_losses(samples: np.ndarray) -> np.ndarray:
    return np.array([scaling_law(t, 1.0, a, 0.0, b, e) for t, (a, b, e) in zip(samples, LAWS)])


def run_drpruning(policy: DRPruningPolicy, steps, samples_so_far: np.ndarray):
    """Drive the policy like the callback: T_i grows with the mixture in force."""
    trace = []
    for step in steps:
        samples_so_far = samples_so_far + 500.0 * policy.q * (step - (trace[-1][0] if trace else 0))
        q = policy.update(step, law_losses(samples_so_far), samples_so_far, 1e8)
        trace.append((step, q.copy(), policy.reference_losses.copy(), policy.p_ref.copy(),
                      copy.deepcopy(policy.last_diagnostics)))
    return trace, samples_so_far


def test_drpruning_timing_reference_losses_and_ratio():
    policy = build_policy('drpruning', ['a', 'b', 'c'], P0, reference_losses=[2.2, 1.7, 2.7], total_steps=100)
    trace, _ = run_drpruning(policy, range(2, 101, 2), np.zeros(3))
    by_step = {step: (q, refs, p_ref, diag) for step, q, refs, p_ref, diag in trace}
    # before 20% of training the configured reference losses are used
    np.testing.assert_array_equal(by_step[18][1], [2.2, 1.7, 2.7])
    assert by_step[18][3]['fits'] == [None, None, None]
    # from 20% (step 20: 10 history points from step 2 < 11) ... first fit at step 22
    assert any('fewer than min_fit_points' in w for w in by_step[20][3]['warnings'])
    assert by_step[22][3]['fits'][0] is not None
    refs = np.array([by_step[s][1] for s in range(22, 101, 2)])
    assert np.all(np.diff(refs, axis=0) <= 0)  # adopt the minimum: never increases
    for i, (a, b, e) in enumerate(LAWS):
        assert e < refs[-1, i] <= law_losses(np.full(3, 1.0))[i]  # above E, below any loss seen
        fit = by_step[100][3]['fits'][i]
        assert fit['irreducible'] == pytest.approx(e, rel=0.02) and fit['rmse'] < 1e-3
    # the reference ratio is fixed until 40% of training, then moves but stays in [p0 / 2, 2 p0]
    for step in range(2, 40, 2):
        np.testing.assert_array_equal(by_step[step][2], P0)
    assert not np.allclose(by_step[40][2], P0)
    p_refs = np.array([by_step[s][2] for s in range(40, 101, 2)])
    assert np.all(p_refs >= P0 / 2 - 1e-12) and np.all(p_refs <= 2 * P0 + 1e-12)
    np.testing.assert_allclose(p_refs.sum(axis=1), 1.0)
    # q gives the largest excess loss the largest boost over p_R
    q, _, p_ref_before, diag = by_step[60][0], None, by_step[58][2], by_step[60][3]
    assert np.argmax(q / p_ref_before) == np.argmax(diag['excess_losses'])


def test_drpruning_without_reference_losses_waits_for_fits():
    policy = build_policy('drpruning', ['a', 'b', 'c'], P0, total_steps=100, fit_start_fraction=0.3)
    trace, _ = run_drpruning(policy, range(2, 41, 2), np.zeros(3))
    for step, q, refs, p_ref, diag in trace:
        if step < 30:
            np.testing.assert_array_equal(q, P0)
            assert any('no reference loss yet' in w for w in diag['warnings'])
        else:
            assert np.all(np.isfinite(refs))
    assert not np.allclose(trace[-1][1], P0)


def test_drpruning_history_is_capped_and_spread():
    policy = build_policy('drpruning', ['a', 'b', 'c'], P0, reference_losses=[2.2, 1.7, 2.7], total_steps=200,
                          max_history_points=16, fit_start_fraction=1.0, history_start_fraction=0.0)
    run_drpruning(policy, range(1, 101), np.zeros(3))
    for history in policy.history:
        assert len(history) == 16
        t = np.array([point[0] for point in history])
        assert np.all(np.diff(t) > 0)
        assert t[0] == pytest.approx(500.0 * P0[policy.history.index(history)])  # the first point is kept


def test_drpruning_needs_total_steps():
    policy = build_policy('drpruning', NAMES, [0.5, 0.5])
    with pytest.raises(ValueError, match='total_steps'):
        policy.update(1, [1.0, 1.0], [10.0, 10.0], 1e6)


@pytest.mark.parametrize('name,extra', [
    ('sheared', {'reference_losses': [2.2, 1.7, 2.7]}),
    ('dro', {'reference_losses': [2.2, 1.7, 2.7]}),
    ('drpruning', {'reference_losses': [2.2, 1.7, 2.7], 'total_steps': 60}),
])
def test_state_round_trip_gives_identical_updates(name, extra):
    uninterrupted = build_policy(name, ['a', 'b', 'c'], P0, **extra)
    trace_full, _ = run_drpruning(uninterrupted, range(2, 61, 2), np.zeros(3))

    first = build_policy(name, ['a', 'b', 'c'], P0, **extra)
    trace_a, samples = run_drpruning(first, range(2, 31, 2), np.zeros(3))
    resumed = build_policy(name, ['a', 'b', 'c'], P0, **extra)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    trace_b, _ = run_drpruning_from(resumed, range(32, 61, 2), samples, last_step=30)
    for (step, q, *_), (step2, q2, *_) in zip(trace_full, trace_a + trace_b):
        assert step == step2
        np.testing.assert_array_equal(q, q2)


def run_drpruning_from(policy, steps, samples, last_step):
    trace = [(last_step, None, None, None, None)]
    for step in steps:
        samples = samples + 500.0 * policy.q * (step - trace[-1][0])
        q = policy.update(step, law_losses(samples), samples, 1e8)
        trace.append((step, q.copy(), None, None, None))
    return trace[1:], samples


def test_state_of_another_policy_or_domains_is_refused():
    dro = build_policy('dro', NAMES, [0.5, 0.5], reference_losses=[1.0, 1.0])
    with pytest.raises(ValueError, match='policy'):
        build_policy('sheared', NAMES, [0.5, 0.5], reference_losses=[1.0, 1.0]).load_state_dict(dro.state_dict())
    with pytest.raises(ValueError, match='domain'):
        build_policy('dro', ['b', 'a'], [0.5, 0.5], reference_losses=[1.0, 1.0]).load_state_dict(dro.state_dict())
