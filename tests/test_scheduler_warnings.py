"""Pre-flight warnings for data-scheduler settings that run, but not as the paper means them.

Each fires on a config built to trigger it, names the key and the fix, and stays silent on the
paper's recipes (yamls/prune_1.3b.yaml, yamls/continue_1.3b.yaml).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from drp_foundry.composer.config_checks import load_train_config
from drp_foundry.composer.scheduler_warnings import scheduler_setup_warnings, warn_scheduler_setup
from drp_foundry.scheduling.policies import DRPruningPolicy
from drp_foundry.scheduling.reference_ratio import update_reference_ratio
from drp_foundry.scheduling.setup_warnings import (
    first_fit_step,
    fit_timing_warning,
    ratio_box,
    ratio_box_warning,
    reference_loss_warning,
    source_reference_warning,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = ['prune_1.3b.yaml', 'continue_1.3b.yaml']
NEAR_UNIFORM = [0.146, 0.164, 0.164, 0.086, 0.163, 0.165, 0.113]  # the earlier study's p0
RP_DOMAINS = ['arxiv', 'book', 'c4-rp', 'cc', 'github', 'stackexchange', 'wiki']


def _observed_first_fit(total_steps, eval_interval):
    """The step at which a real DRPruningPolicy first changes a reference loss (history of decreasing losses)."""
    policy = DRPruningPolicy(['a', 'b'], [0.5, 0.5], reference_losses=[9.0, 9.0], total_steps=total_steps)
    samples = np.zeros(2)
    for step in range(eval_interval, total_steps + 1, eval_interval):
        samples += eval_interval * 8
        losses = [3.0 + 2.0 * (step / total_steps + 0.05) ** -0.3, 2.0 + 3.0 * (step / total_steps + 0.05) ** -0.3]
        policy.update(step, losses, samples, expected_params=1e6)
        if not np.allclose(policy.reference_losses, 9.0):
            return step
    return None


@pytest.mark.parametrize('total,interval', [(96, 8), (128, 8), (192, 4), (480, 8), (3200, 50), (400, 40)])
def test_first_fit_step_matches_the_policy(total, interval):
    predicted, _ = first_fit_step(total, interval)
    assert predicted == _observed_first_fit(total, interval)


def test_fit_timing_warning_fires_when_the_point_minimum_decides():
    # the earlier study: 96 continued steps, an eval every 8 -> the first fit at step 88, not at step 24
    assert first_fit_step(96, 8) == (88, 24)
    message = fit_timing_warning(96, 8)
    for part in ('min_fit_points=11', 'step 88', '92%', 'not at step 24', 'eval_interval <=', 'max_duration 96ba'):
        assert part in message, part
    message = fit_timing_warning(50, 10)  # 5 evaluations: never
    assert 'never' in message
    assert fit_timing_warning(192, 4) is None and fit_timing_warning(480, 8) is None
    # the suggested interval does let the fraction decide
    best = int(fit_timing_warning(96, 8).split('eval_interval <= ')[1].split('ba')[0])
    assert fit_timing_warning(96, best) is None and fit_timing_warning(96, best + 1) is not None
    assert first_fit_step(192, 4) == (44, 40)  # one evaluation late: not worth a warning


def test_ratio_box_warning_names_the_pinned_domains_and_the_box():
    lower, upper = ratio_box(NEAR_UNIFORM)
    message = ratio_box_warning(RP_DOMAINS, NEAR_UNIFORM)
    p0 = np.asarray(NEAR_UNIFORM) / sum(NEAR_UNIFORM)
    pinned = [d for d, u, p in zip(RP_DOMAINS, upper, p0) if u < 1.1 * p]
    assert set(pinned) >= {'stackexchange', 'book', 'c4-rp', 'github'} and 'cc' not in pinned
    assert str(pinned) in message and 'clamp_ratio_to_initial_range: false' in message
    assert f'[{lower[5]:.3f}, {upper[5]:.3f}]' in message
    # the box is the one eq. 6 really keeps p_R in: pushing toward stackexchange cannot grow it past the box
    q = np.full(7, 0.01)
    q[5] = 0.94
    p = p0.copy()
    for _ in range(200):
        p = update_reference_ratio(p, q, p0)
    assert p[5] <= upper[5] + 1e-12 and p[5] < 1.1 * p0[5]
    assert ratio_box_warning(RP_DOMAINS, NEAR_UNIFORM, clamp_ratio_to_initial_range=False) is None
    # the largest domain alone is pinned by design: no warning
    assert ratio_box_warning(['cc', 'c4-rp', 'github', 'book', 'wiki', 'arxiv', 'stackexchange'],
                             [0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02]) is None


def test_reference_loss_warnings():
    message = reference_loss_warning('drpruning', None, 3200, 50)
    assert 'reference_losses' in message and 'step 650' in message and 'source model' in message
    assert reference_loss_warning('drpruning', {'a': 2.0}, 3200, 50) is None
    assert reference_loss_warning('dro', None) is None  # dro / sheared refuse to start without them
    names = ['a', 'b', 'c']
    source_like = source_reference_warning('dro', names, [2.0, 3.0, 1.5], [2.01, 2.98, 1.6], 1e6, 3e5)
    assert 'source model' in source_like and '30%' in source_like and 'reference_losses' in source_like
    assert source_reference_warning('sheared', names, [2.0, 3.0, 1.5], [2.01, 2.98, 1.6], 1e6, 3e5)
    # target-size references lie above the (still source-like) model's first losses: silent
    assert source_reference_warning('dro', names, [2.4, 3.5, 1.9], [2.01, 2.98, 1.6], 1e6, 3e5) is None
    assert source_reference_warning('dro', names, [2.0, 3.0, 1.5], [2.01, 2.98, 1.6], 1e6, 8e5) is None
    assert source_reference_warning('drpruning', names, [2.0, 3.0, 1.5], [2.01, 2.98, 1.6], 1e6, 3e5) is None


@pytest.mark.parametrize('recipe', RECIPES)
def test_silent_on_the_paper_recipes(recipe, caplog):
    cfg = load_train_config(REPO / 'yamls' / recipe)
    with caplog.at_level(logging.WARNING):
        assert warn_scheduler_setup(cfg) == []
    assert not caplog.records


@pytest.mark.parametrize('recipe', RECIPES)
def test_each_warning_fires_on_a_config_built_to_trigger_it(recipe, caplog):
    steps = {'prune_1.3b.yaml': 3200, 'continue_1.3b.yaml': 48000}[recipe]
    cfg = load_train_config(REPO / 'yamls' / recipe, [f'variables.eval_every={steps // 8}'])
    [message] = scheduler_setup_warnings(cfg)
    assert 'callbacks.drp_dynamic_loading.policy' in message and 'min_fit_points' in message

    cfg = load_train_config(REPO / 'yamls' / recipe, ['variables.reference_losses=null'])
    [message] = scheduler_setup_warnings(cfg)
    assert 'callbacks.drp_dynamic_loading.policy.reference_losses' in message

    cfg = load_train_config(REPO / 'yamls' / recipe)
    cfg.train_loader.dataset.domains = RP_DOMAINS
    cfg.train_loader.dataset.proportions = [v / sum(NEAR_UNIFORM) for v in NEAR_UNIFORM]
    with caplog.at_level(logging.WARNING):
        [message] = warn_scheduler_setup(cfg)
    assert 'stackexchange' in message and 'clamp_ratio_to_initial_range' in message
    assert any('reference-ratio box' in r.getMessage() for r in caplog.records)

    cfg = load_train_config(REPO / 'yamls' / recipe, ['variables.policy=constant', 'variables.reference_losses=null',
                                                      f'variables.eval_every={steps // 4}'])
    assert scheduler_setup_warnings(cfg) == []  # constant: nothing to warn about
