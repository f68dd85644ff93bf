"""The demo's l0 path uses the projection (issue 26, Build 6): its overrides make a valid pruning recipe whose
constraint ends on target, and the export's figures are printed per mask."""

from __future__ import annotations

from omegaconf import OmegaConf as om

from drp_foundry.composer.config_checks import load_train_config
from drp_foundry.composer.lagrangian_updater import LagrangianUpdater
from drp_foundry.demo.pipeline import PRUNE_RECIPE, fidelity_lines, l0_constraint_overrides


def test_l0_overrides_build_the_projection_with_anneal_and_hardening():
    overrides = l0_constraint_overrides('projection', 'importance')
    cfg = load_train_config(PRUNE_RECIPE, [f'{k}={v}' for k, v in overrides.items()])
    algorithms = om.to_container(cfg.algorithms, resolve=True)
    updater = LagrangianUpdater(**algorithms['drp_lagrangian'])
    assert updater.constraint == 'projection' and updater.anneal_start_fraction == 0.6
    assert updater.harden_fraction == 0.1 and updater.short_run_message(20) is None
    assert algorithms['drp_mask_learner']['mask_lr'] == 0.1
    assert 'algorithms.drp_mask_learner.mask_lr' not in l0_constraint_overrides('projection', 'constant')
    assert l0_constraint_overrides('lagrangian', 'importance') == {}  # the paper's recipe, unchanged
    paper = LagrangianUpdater(**om.to_container(load_train_config(PRUNE_RECIPE).algorithms, resolve=True)['drp_lagrangian'])
    assert paper.short_run_message(20) is not None  # the demo's 20 Lagrangian steps would warn


def test_fidelity_lines():
    report = {'fidelity': {'expected_num_parameters': 50347392.0, 'target_num_parameters': 50347392,
                           'relative_size_gap': 0.0, 'undecided_share': {'total': 0.0}, 'hardened': True,
                           'kept_rows': {'head': {'target': 2, 'expected': [2.0, 2.0]},
                                         'layer': {'target': 20, 'expected': [20.0]}},
                           'warnings': []}}
    lines = fidelity_lines(report)
    assert 'expected size 50,347,392 vs target 50,347,392 (+0.00%)' in lines[0]
    assert lines[1] == '  head: target 2, expected kept per kept layer 2..2'
    assert lines[2] == '  layer: target 20, expected 20'
    assert not any('eval loss' in line for line in lines)  # export ran without --eval-data
    report['fidelity'].update(masked_loss=7.11201, exported_loss=7.11204)
    assert fidelity_lines(report)[3] == '  eval loss: masked model as trained 7.1120, exported 7.1120'
    assert fidelity_lines({}) == []


def test_every_stage_of_the_demo_passes_the_scheduler_cadence_check(tmp_path):
    """The stages' settings as the demo builds them, through the pre-flight check train.py runs: at the demo's
    defaults (20 pruning steps with --eval-every 20 used to be refused) and at short test lengths."""
    from drp_foundry.commands.demo import build_parser
    from drp_foundry.composer.domain_eval_loaders import expand_domain_eval_loaders
    from drp_foundry.composer.preflight_checks import check_scheduler_can_act
    from drp_foundry.demo.pipeline import CONTINUE_RECIPE, run_overrides, stage_eval_every

    defaults = build_parser().parse_args([])
    cases = [(PRUNE_RECIPE, defaults.prune_steps, defaults.eval_every), (CONTINUE_RECIPE, defaults.continue_steps,
             defaults.eval_every), (CONTINUE_RECIPE, 6, 3), (PRUNE_RECIPE, 8, 20), (CONTINUE_RECIPE, 2, 20)]
    for recipe, steps, eval_every in cases:
        overrides = run_overrides(tmp_path, 'run', steps, defaults.save_every, eval_every)
        cfg = load_train_config(recipe, [f'{k}={v}' for k, v in overrides.items()])
        expanded = expand_domain_eval_loaders(om.to_container(cfg, resolve=True), check_folders=False)
        check_scheduler_can_act(om.create(expanded))
    assert stage_eval_every(120, 20) == 20 and stage_eval_every(6, 3) == 3  # a cadence that fits is kept
    assert stage_eval_every(20, 20) == 5 and stage_eval_every(2, 20) == 1
