"""The INIT warning of a Lagrangian run too short to settle (issue 26, Build 2): it fires below the measured
threshold (``LAGRANGIAN_SETTLING_STEPS`` post-ramp steps, bench/lagrangian_settling.py), names
``constraint: projection``, and is silent on the paper's recipe (yamls/prune_1.3b.yaml: 2,560 post-ramp steps)."""

from __future__ import annotations

import warnings

import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from conftest import REPO_ROOT, load_bench, tiny_gqa_config
from omegaconf import OmegaConf as om
from transformers import AutoModelForCausalLM

from drp_foundry.composer.lagrangian_updater import LagrangianUpdater, ShortLagrangianRunWarning
from drp_foundry.composer.mask_learner import MaskLearner
from drp_foundry.pruning.lagrangian import LAGRANGIAN_SETTLING_STEPS, short_run_message

TARGET = dict(layers=3, hidden=64, heads=3, kv_heads=1, intermediate=96)


def build_trainer(max_duration, **lagrangian):
    torch.manual_seed(0)
    model = HuggingFaceModel(AutoModelForCausalLM.from_config(tiny_gqa_config()), use_logits=True)
    rows = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{'input_ids': r, 'labels': r} for r in rows], batch_size=4)
    return Trainer(model=model, optimizers=torch.optim.AdamW(model.parameters(), lr=1e-4), train_dataloader=loader,
                   max_duration=max_duration, algorithms=[MaskLearner(TARGET), LagrangianUpdater(**lagrangian)],
                   progress_bar=False, log_to_console=False, device='cpu')


def test_threshold_boundary():
    assert short_run_message(640 + LAGRANGIAN_SETTLING_STEPS, 640) is None
    message = short_run_message(640 + LAGRANGIAN_SETTLING_STEPS - 1, 640)
    assert message is not None and 'constraint: projection' in message
    assert f'{LAGRANGIAN_SETTLING_STEPS - 1} steps after its 640-step target ramp' in message


def _short_run_warnings(*args, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        build_trainer(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, ShortLagrangianRunWarning)]


def test_a_short_lagrangian_run_warns_at_init():
    messages = _short_run_warnings('40ba', warmup_steps=8)  # the quality bench's shape: 32 post-ramp steps
    assert len(messages) == 1 and 'constraint: projection' in messages[0]


def test_the_projection_and_long_runs_do_not_warn():
    assert _short_run_warnings('40ba', warmup_steps=8, constraint='projection') == []
    assert _short_run_warnings(f'{LAGRANGIAN_SETTLING_STEPS + 10}ba', warmup_steps=10) == []


def test_silent_on_the_papers_recipe():
    recipe = om.load(REPO_ROOT / 'yamls' / 'prune_1.3b.yaml')
    steps = int(recipe.variables.steps)
    max_duration = om.to_container(recipe, resolve=True)['max_duration']
    assert max_duration == f'{steps}ba'
    updater = LagrangianUpdater(**om.to_container(recipe.algorithms.drp_lagrangian, resolve=True))
    assert updater.short_run_message(steps) is None
    # the same recipe cut to 800 steps (160 after its 640-step ramp) would warn
    assert updater.short_run_message(800) is not None


def test_the_bench_settling_criterion():
    bench = load_bench('lagrangian_settling')
    gaps = [0.5, 0.3, 0.1, 0.01, -0.03, 0.01, 0.0, 0.005]
    rows = [0.0] * len(gaps)
    assert bench.settled_at(gaps, rows, ramp=2, tolerance=0.02) == 3  # from index 5 on: 3 steps after the ramp
    assert bench.settled_at(gaps, [0.0] * 7 + [0.2], ramp=2, tolerance=0.02) is None  # a row off at the end
