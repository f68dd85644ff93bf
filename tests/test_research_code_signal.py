"""The scheduler's signal against worked examples of the research code's formulas (DRPruning
``callbacks/DRO_loading_callback_hf.py``, eval mode), the policy registry, and target-size
reference losses."""

from __future__ import annotations

import json
from importlib import metadata

import numpy as np
import pytest

from drp_foundry.commands.reference_losses import main as reference_main
from drp_foundry.scheduling.chi_square_dro import chi_square_divergence, robust_mixture
from drp_foundry.scheduling.policies import ConstantPolicy, MixturePolicy
from drp_foundry.scheduling.reference_losses import (
    losses_from_metrics_jsonl,
    pilot_reference_losses,
    size_law_reference_losses,
)
from drp_foundry.scheduling.reference_ratio import update_reference_ratio
from drp_foundry.scheduling.registry import (
    ENTRY_POINT_GROUP,
    build_policy,
    check_policy_config,
    get_policy_class,
    registered_policies,
)


# --- the research code's formulas, written out for small cases ------------------------------------
def research_dro_step(losses, reference, p, rho=0.1, min_prob=0.2):
    """update_mw in eval mode: g = eval loss - reference; q(eta) = p relu(g - eta), normalised; q/p
    floored at min_prob and renormalised; bisection on eta for chi2 = rho; then q >= min p."""
    g = np.asarray(losses) - np.asarray(reference)

    def q_of(eta):
        pp = p * np.maximum(g - eta, 0)
        ratio = np.maximum(pp / pp.sum() / p, min_prob)
        return ratio * p / (ratio * p).sum()

    low, high = -(1.0 / (np.sqrt(2 * rho + 1) - 1)) * g.max(), g.max()
    for _ in range(200):
        eta = 0.5 * (low + high)
        if 0.5 * (((q_of(eta) / p - 1) ** 2) * p).sum() - rho > 0:
            high = eta
        else:
            low = eta
    q = np.maximum(q_of(eta), p.min())
    return q / q.sum()


def research_ratio_step(p_train, q, p0, alpha=0.1, times=2):
    """Dynamic proportion: EMA toward q, clamp to [p0/2, 2 p0], renormalise, clamp to [min p0, max p0],
    renormalise."""
    x = np.clip(p_train * (1 - alpha) + q * alpha, p0 / times, p0 * times)
    x = np.clip(x / x.sum(), p0.min(), p0.max())
    return x / x.sum()


def test_dro_step_matches_the_research_code_on_random_cases():
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(60):
        n = int(rng.integers(3, 8))
        p = rng.dirichlet(np.ones(n))
        losses, reference = rng.uniform(2, 4, n), rng.uniform(1, 2, n)  # positive excess, as the bracket needs
        with np.errstate(invalid='ignore', divide='ignore'):
            research = research_dro_step(losses, reference, p)
        if not np.all(np.isfinite(research)):
            continue  # the ball is slack: the research code's bisection fails and it keeps q
        np.testing.assert_allclose(robust_mixture(losses - reference, p, 0.1, 0.2, True), research, atol=1e-8)
        compared += 1
    assert compared >= 40
    # hand-checked: p = (1/2, 1/2), g = (1, 0), rho = 1/8 -> (3/4, 1/4) on the ball; floor at min p = 1/2
    # -> (0.75, 0.5) / 1.25
    np.testing.assert_allclose(robust_mixture(np.array([1.0, 0.0]), np.array([0.5, 0.5]), 0.125), [0.6, 0.4])


def test_ratio_floor_inside_the_constraint_is_the_default_and_ours_stays_an_option():
    p = np.array([0.4, 0.4, 0.2])
    g = np.array([0.0, 2.0, 2.5])  # rho = 0.5 drives domain 0 below 0.2 p_0: the ratio floor binds
    research = robust_mixture(g, p, 0.5, 0.2, floor_at_min_reference=False)
    floored_after = robust_mixture(g, p, 0.5, 0.2, floor_at_min_reference=False, floors_in_constraint=False)
    # both floor domain 0 (clamp q/p at 0.2, renormalise: 0.08 / 1.08)
    assert research[0] == pytest.approx(0.08 / 1.08) and floored_after[0] == pytest.approx(0.08 / 1.08)
    assert chi_square_divergence(research, p) == pytest.approx(0.5, abs=1e-9)  # the floored q is on the ball
    assert chi_square_divergence(floored_after, p) < 0.5 - 0.1  # flooring afterwards pulls it inside
    assert research[2] > floored_after[2] + 0.05


def test_dro_policy_default_uses_the_raw_eval_loss_like_the_research_code():
    p = np.array([0.5, 0.3, 0.2])
    reference = np.array([1.0, 1.0, 1.0])
    default = build_policy({'name': 'dro', 'reference_losses': reference.tolist()}, ['a', 'b', 'c'], p)
    smoothed = build_policy({'name': 'dro', 'reference_losses': reference.tolist(), 'eval_loss_ema': 0.1},
                            ['a', 'b', 'c'], p)
    first, second = [3.0, 2.0, 2.5], [2.0, 3.5, 2.0]
    for policy in (default, smoothed):
        policy.update(1, first)
    q_default, q_smoothed = default.update(2, second), smoothed.update(2, second)
    np.testing.assert_allclose(q_default, research_dro_step(second, reference, p), atol=1e-8)
    ema = 0.9 * np.array(first) + 0.1 * np.array(second)
    np.testing.assert_allclose(q_smoothed, research_dro_step(ema, reference, p), atol=1e-8)
    assert np.argmax(q_default / p) == 1 and np.argmax(q_smoothed / p) == 0  # the raw signal reacts at once


def test_reference_ratio_clamp_to_the_initial_range():
    p0 = np.array([0.4, 0.35, 0.25])
    q = np.array([0.0, 0.0, 1.0])
    ours, research = p0.copy(), p0.copy()
    for step in range(2):  # inside every bound: the same numbers as the research code
        ours, research = update_reference_ratio(ours, q, p0), research_ratio_step(research, q, p0)
        np.testing.assert_allclose(ours, research, atol=1e-12)
    np.testing.assert_allclose(ours, [0.324, 0.2835, 0.3925], atol=1e-12)
    for step in range(10):
        ours, research = update_reference_ratio(ours, q, p0), research_ratio_step(research, q, p0)
    # the bound max p0 = 0.4 binds: ours holds it exactly (clamp and renormalisation solved together);
    # the research code's last renormalisation lets it drift above (0.4435 after 12 steps)
    np.testing.assert_allclose(ours, [0.32, 0.28, 0.4], atol=1e-9)
    assert research[2] > 0.44
    # without the range clamp only the factor-2 box holds: domain c goes past max p0
    free = p0.copy()
    for step in range(12):
        free = update_reference_ratio(free, q, p0, clamp_to_initial_range=False)
    assert free[2] > 0.45 and free[2] <= 0.5 + 1e-12


def test_drpruning_policy_clamps_its_reference_ratio():
    p0 = [0.4, 0.35, 0.25]
    policy = build_policy({'name': 'drpruning', 'reference_losses': [1.0, 1.0, 1.0], 'ratio_start_fraction': 0.0,
                           'fit_start_fraction': 1.0}, ['a', 'b', 'c'], p0, total_steps=1000)
    for step in range(1, 40):
        policy.update(step, [1.0, 1.0, 5.0])
    assert policy.p_ref.max() <= 0.4 + 1e-9 and policy.p_ref.min() >= 0.25 - 1e-9
    loose = build_policy({'name': 'drpruning', 'reference_losses': [1.0, 1.0, 1.0], 'ratio_start_fraction': 0.0,
                          'fit_start_fraction': 1.0, 'clamp_ratio_to_initial_range': False}, ['a', 'b', 'c'], p0,
                         total_steps=1000)
    for step in range(1, 40):
        loose.update(step, [1.0, 1.0, 5.0])
    assert loose.p_ref[2] > 0.4 + 1e-3


# --- registry ------------------------------------------------------------------------------------
class HalfwayPolicy(MixturePolicy):
    """A policy in one class: q moves ``weight`` of the way to uniform at each update."""

    name = 'halfway'

    def __init__(self, domain_names, reference_ratio, weight: float = 0.5, **kwargs):
        super().__init__(domain_names, reference_ratio, **kwargs)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f'`weight` must be in [0, 1], got {weight}')
        self.weight = weight

    def _mixture(self, step, losses, finite, samples_per_domain, expected_params, diagnostics):
        return (1 - self.weight) * self.q + self.weight / self.num_domains


def test_builtin_policies_are_registered_by_entry_point():
    names = {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert names['drpruning'] == 'drp_foundry.scheduling.policies:DRPruningPolicy'
    assert set(names) >= {'constant', 'sheared', 'dro', 'drpruning'}
    assert get_policy_class('constant') is ConstantPolicy


def test_a_new_policy_is_one_class_and_one_entry_point(monkeypatch):
    import sys
    module = sys.modules[__name__]
    monkeypatch.setattr(module, 'HalfwayPolicy', HalfwayPolicy, raising=False)
    from drp_foundry.scheduling import registry
    installed = registry._entry_points()
    monkeypatch.setattr(registry, '_entry_points', lambda: installed + [
        metadata.EntryPoint('halfway', f'{__name__}:HalfwayPolicy', ENTRY_POINT_GROUP)])
    assert 'halfway' in registered_policies()
    policy = build_policy({'name': 'halfway', 'weight': 0.5}, ['a', 'b'], [0.8, 0.2])
    np.testing.assert_allclose(policy.update(1, [1.0, 1.0]), [0.65, 0.35])
    with pytest.raises(ValueError, match=r"\['rho'\] are not keys of policy 'halfway'"):
        check_policy_config({'name': 'halfway', 'rho': 0.1})
    with pytest.raises(ValueError, match='weight'):
        check_policy_config({'name': 'halfway', 'weight': 2.0})

    from drp_foundry.composer.dynamic_loading import DynamicLoading
    callback = DynamicLoading(policy={'name': 'halfway', 'weight': 0.25}, domain_names=['a', 'b'],
                              reference_ratio=[0.5, 0.5], plot_folder=None)
    assert isinstance(callback.policy, HalfwayPolicy) and callback.policy.weight == 0.25


def test_policy_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r'policy.name: unknown policy .doremi.'):
        check_policy_config({'name': 'doremi'})
    with pytest.raises(ValueError, match='mapping'):
        check_policy_config('drpruning')
    with pytest.raises(ValueError, match='eval_loss_ema'):
        check_policy_config({'name': 'dro', 'reference_losses': [1.0, 2.0], 'eval_loss_ema': 0.0})
    with pytest.raises(ValueError, match='missing'):
        build_policy({'name': 'dro', 'reference_losses': {'a': 1.0}}, ['a', 'b'], [0.5, 0.5])
    policy = build_policy({'name': 'dro', 'reference_losses': {'b': 2.0, 'a': 1.0}}, ['a', 'b'], [0.5, 0.5])
    np.testing.assert_array_equal(policy.reference_losses, [1.0, 2.0])  # a mapping is put in dataset order


# --- target-size reference losses ----------------------------------------------------------------
def test_pilot_reference_losses_average_the_last_evaluations():
    evaluations = [{'a': 5.0, 'b': 6.0}, {'a': 4.0, 'b': 5.0}, {'a': 3.0, 'b': 4.5}]
    assert pilot_reference_losses(evaluations, last=2) == {'a': 3.5, 'b': 4.75}
    assert pilot_reference_losses(evaluations) == {'a': 4.0, 'b': 5.166666666666667}
    with pytest.raises(ValueError, match='different domains'):
        pilot_reference_losses([{'a': 1.0}, {'b': 1.0}])
    with pytest.raises(ValueError, match='non-finite'):
        pilot_reference_losses([{'a': float('nan')}])


def test_size_law_fit_recovers_the_target_size_loss():
    sizes = [1.4e8, 4.1e8, 1.0e9, 2.8e9]
    law = {'web': (1.8, 400.0, 0.3), 'code': (0.9, 900.0, 0.35)}  # (E, A, alpha)
    losses = {d: [e + a * n ** -alpha for n in sizes] for d, (e, a, alpha) in law.items()}
    predicted = size_law_reference_losses(sizes, losses, 1.3e9)
    for domain, (e, a, alpha) in law.items():
        assert predicted[domain] == pytest.approx(e + a * 1.3e9 ** -alpha, abs=5e-3)
    with pytest.raises(ValueError, match='3 distinct'):
        size_law_reference_losses(sizes[:2], {'web': [2.0, 1.9]}, 1e9)


def test_reference_losses_cli_reads_a_pilot_metrics_file(tmp_path, capsys):
    path = tmp_path / 'metrics.jsonl'
    rows = [{'step': 10, 'drp/domain_eval_loss/a': 4.0, 'drp/domain_eval_loss/b': 5.0,
             'drp/domain_eval_loss/mean': 4.5, 'drp/domain_eval_loss/worst': 5.0,
             'drp/domain_eval_loss/spread': 1.0},
            {'step': 11, 'trainer/lr': 0.1},
            {'step': 20, 'drp/domain_eval_loss/a': 3.0, 'drp/domain_eval_loss/b': 4.0,
             'drp/domain_eval_loss/mean': 3.5, 'drp/domain_eval_loss/worst': 4.0,
             'drp/domain_eval_loss/spread': 1.0}]
    path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
    assert losses_from_metrics_jsonl(str(path)) == [{'a': 4.0, 'b': 5.0}, {'a': 3.0, 'b': 4.0}]
    assert reference_main(['pilot', str(path), '--last', '2']) == 0
    assert json.loads(capsys.readouterr().out) == {'a': 3.5, 'b': 4.5}


def test_demo_takes_target_size_references_from_a_file_then_a_constant_pilot(tmp_path):
    from drp_foundry.demo.pipeline import scheduler_overrides, target_reference_losses

    source = {'a': 2.0, 'b': 3.0}
    refs, origin = target_reference_losses(tmp_path, None, source)
    assert refs == source and 'stand-in' in origin
    (tmp_path / 'loss_continued_constant.json').write_text(json.dumps({'a': 5.0, 'b': 6.0}))
    refs, origin = target_reference_losses(tmp_path, None, source)
    assert refs == {'a': 5.0, 'b': 6.0} and 'constant-policy pilot' in origin
    given = tmp_path / 'refs.json'
    given.write_text(json.dumps({'a': 4.0, 'b': 4.5}))
    assert target_reference_losses(tmp_path, str(given), source)[0] == {'a': 4.0, 'b': 4.5}
    assert scheduler_overrides('constant', refs) == {'variables.policy': 'constant', 'variables.reference_losses': 'null'}
    assert scheduler_overrides('dro', {'a': 4.12345}) == {'variables.policy': 'dro',
                                                          'variables.reference_losses.a': 4.1235}
