"""bench/demo_path.py: the check that an l0 run ended on target, and the pre-registered reading."""

import json

import pytest
from conftest import load_bench
from transformers import LlamaConfig

from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.fidelity import mask_fidelity
from drp_foundry.pruning.mask_module import L0MaskModule


@pytest.fixture(scope='module')
def bench():
    return load_bench('demo_path')


def _report_of(tmp_path, fidelity: dict):
    path = tmp_path / 'pruning_report.json'
    path.write_text(json.dumps({'fidelity': {**fidelity, 'warnings': []}}))
    return path


def _fresh_masks() -> L0MaskModule:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    target = TargetArchitecture(layers=2, hidden=48, heads=2, kv_heads=1, intermediate=64)
    return L0MaskModule(DecoderArchitecture.from_hf_config(config), target)


def test_masks_that_never_trained_are_not_on_target(bench, tmp_path):
    fidelity = mask_fidelity(_fresh_masks(), masked_loss=5.0, exported_loss=5.0).to_dict()
    checked = bench.l0_on_target(_report_of(tmp_path, fidelity))
    assert checked['found'] and not checked['on_target']
    assert checked['worst_row'] > 0 or checked['undecided_pct'] > 0


def test_on_target_needs_every_row_decided_and_the_losses_equal(bench, tmp_path):
    exact = {**mask_fidelity(_fresh_masks()).to_dict(), 'worst_row_gap': 0.0,
             'undecided_share': {'total': 0.0}, 'masked_loss': 7.02293, 'exported_loss': 7.022929}
    assert bench.l0_on_target(_report_of(tmp_path, exact))['on_target']
    assert not bench.l0_on_target(_report_of(tmp_path, {**exact, 'exported_loss': 7.0231}))['on_target']
    assert not bench.l0_on_target(_report_of(tmp_path, {**exact, 'worst_row_gap': 0.01}))['on_target']
    assert not bench.l0_on_target(_report_of(tmp_path, {**exact, 'masked_loss': None}))['found']
    assert not bench.l0_on_target(tmp_path / 'missing.json')['on_target']


def _results(bench, l0_minus_oneshot: list[float], cpu_l0: float = 1000.0) -> dict:
    results = {}
    for seed, diff in zip(bench.SEEDS, l0_minus_oneshot):
        oneshot = {'arxiv': 5.0, 'wiki': 4.0}
        results[('oneshot', seed)] = {'losses': {'continued': oneshot}, 'cpu_s': 1000.0}
        results[('l0', seed)] = {'losses': {'continued': {d: v + diff for d, v in oneshot.items()}}, 'cpu_s': cpu_l0}
    return results


def _checks(bench, on_target=True):
    return {seed: {'found': True, 'on_target': on_target, 'expected': 10, 'target': 10, 'worst_row': 0.0,
                   'undecided_pct': 0.0, 'masked': 7.0, 'exported': 7.0} for seed in bench.SEEDS}


@pytest.mark.parametrize('diffs, cpu_l0, on_target, verdict', [
    ([-0.1, -0.2, -0.05], 1000.0, True, "default becomes `--path l0`"),
    ([-0.1, +0.2, -0.05], 1000.0, True, 'the seeds disagree'),
    ([+0.1, +0.2, +0.05], 1000.0, True, 'every seed favours `oneshot`'),
    ([-0.1, -0.2, -0.05], 1300.0, True, 'a premise failed'),    # l0 cost 1.3x: not equal cost
    ([-0.1, -0.2, -0.05], 1000.0, False, 'a premise failed'),   # an l0 run off target
])
def test_the_reading_is_the_preregistered_rule(bench, diffs, cpu_l0, on_target, verdict):
    text = bench.report(_results(bench, diffs, cpu_l0), _checks(bench, on_target), 'cmd')
    reading = [line for line in text.splitlines() if line.startswith('- **Reading**')]
    assert len(reading) == 1 and verdict in reading[0]
    diff_line = next(line for line in text.splitlines() if line.startswith('- l0 - oneshot, mean'))
    assert f'{sum(diffs) / 3:+.3f} ±' in diff_line
