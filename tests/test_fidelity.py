"""The fidelity study: table math, and the whole plumbing of bench/fidelity.py on a tiny random model.

The integration test prunes a 4-layer random Llama (saved with the offline tiny tokenizer as
the "source model") with two policies for a handful of steps through the real chain
(composer train.py -> export -> continued pretraining -> held-out eval), then checks the
JSON / CSV / PNG and that a rerun redoes nothing but what is missing.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, read_texts, tiny_llama_config

DOMAINS = ['arxiv', 'book', 'c4-rp', 'cc', 'github', 'stackexchange', 'wiki']  # the demo recipe's domains


def _load_bench():
    spec = importlib.util.spec_from_file_location('fidelity_bench', REPO_ROOT / 'bench' / 'fidelity.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


_bench = _load_bench()
format_table, result_row, seed_mean_rows = _bench.format_table, _bench.result_row, _bench.seed_mean_rows
summarize_losses, write_csv = _bench.summarize_losses, _bench.write_csv


# -- the table -----------------------------------------------------------------------------------------
def test_summary_uniform_weighted_worst_spread():
    losses = {'a': 2.0, 'b': 4.0, 'c': 3.0}
    summary = summarize_losses(losses, {'a': 0.5, 'b': 0.25, 'c': 0.25})
    assert summary['mean_uniform'] == pytest.approx(3.0)
    assert summary['mean_weighted'] == pytest.approx(0.5 * 2 + 0.25 * 4 + 0.25 * 3)
    assert summary['worst_domain'] == 'b' and summary['worst_loss'] == 4.0
    assert summary['spread'] == pytest.approx(2.0)


def test_summary_rejects_missing_proportion_and_nan():
    with pytest.raises(ValueError, match=r"\['c'\]"):
        summarize_losses({'a': 1.0, 'c': 2.0}, {'a': 1.0})
    with pytest.raises(ValueError, match='non-finite'):
        summarize_losses({'a': float('nan')}, {'a': 1.0})


def test_seed_mean_rows_mean_and_range_only_for_multi_seed_groups(tmp_path):
    p = {'a': 0.5, 'b': 0.5}
    rows = [result_row('dro', 1, 'pruned', {'a': 2.0, 'b': 3.0}, p, {'a': 0.4, 'b': 0.6}),
            result_row('dro', 2, 'pruned', {'a': 2.4, 'b': 2.0}, p, {'a': 0.5, 'b': 0.5}),
            result_row('constant', 1, 'pruned', {'a': 2.0, 'b': 2.0}, p, {'a': 0.5, 'b': 0.5})]
    means = seed_mean_rows(rows)
    assert [(m['policy'], m['seed']) for m in means] == [('dro', 'mean')]
    mean = means[0]
    assert mean['loss/a'] == pytest.approx(2.2) and mean['seed_range/loss/a'] == pytest.approx(0.4)
    assert mean['worst_loss'] == pytest.approx(2.7) and mean['seed_range/worst_loss'] == pytest.approx(0.6)
    assert mean['mixture/a'] == pytest.approx(0.45)
    assert mean['worst_domain'] == 'a/b'  # seed 1: b is worst, seed 2: a
    text = format_table(rows + means, ['a', 'b'])
    assert '2.200±0.200' in text and 'final mixture q' in text
    write_csv(rows + means, tmp_path / 't.csv')
    with open(tmp_path / 't.csv') as f:
        read = list(csv.DictReader(f))
    assert len(read) == 4 and 'seed_range/loss/a' in read[0] and read[0]['seed_range/loss/a'] == ''
    assert float(read[3]['seed_range/loss/a']) == pytest.approx(0.4)


# -- the study's plumbing --------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_source(tmp_path_factory, tiny_tokenizer_dir, sample_dir):
    """A random 4-layer Llama + the tiny tokenizer in one HF directory, and a small 7-domain corpus."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = tmp_path_factory.mktemp('fidelity')
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                               bos_token_id=tokenizer.bos_token_id))
    model.save_pretrained(root / 'source')
    tokenizer.save_pretrained(root / 'source')
    corpus = root / 'corpus'
    corpus.mkdir()
    for domain in DOMAINS:
        texts = read_texts(sample_dir / f'{domain}.jsonl', limit=12)
        with open(corpus / f'{domain}.jsonl', 'w') as f:
            for text in texts:
                f.write(json.dumps({'text': text[:2500]}) + '\n')
    return root


def _argv(root: Path, **changes) -> list[str]:
    options = {'--corpus': root / 'corpus', '--source': root / 'source', '--work': root / 'study',
               '--prune-steps': 3, '--eval-every': 2, '--continue-steps': 2, '--continue-eval-every': 1,
               '--max-seq-len': 32, '--batch-size': 2, '--microbatch-size': 2, '--eval-batch-size': 2,
               '--eval-tokens': 128, '--steer-batches': 1, '--save-every': 2}
    options.update(changes)
    argv = [str(x) for key, value in options.items() for x in (key, value)]
    loader = ['train_loader.num_workers=0', 'train_loader.prefetch_factor=null',
              'train_loader.persistent_workers=false']
    target = ['algorithms.drp_mask_learner.target.layers=2', 'algorithms.drp_mask_learner.target.hidden=32',
              'algorithms.drp_mask_learner.target.heads=2', 'algorithms.drp_mask_learner.target.kv_heads=2',
              'algorithms.drp_mask_learner.target.intermediate=64']
    return argv + ['--policies', 'constant', 'drpruning', '--prune-set', *loader, *target,
                   '--continue-set', *loader]


@pytest.fixture(scope='module')
def finished_study(tiny_source):
    bench = _load_bench()
    assert bench.main(_argv(tiny_source)) == 0
    return tiny_source / 'study'


@pytest.mark.slow
def test_study_writes_json_csv_png_with_every_row_and_column(finished_study):
    payload = json.loads((finished_study / 'fidelity.json').read_text())
    rows = payload['rows']
    keys = [(r['policy'], str(r['seed']), r['stage']) for r in rows]
    assert keys == [('source', '-', 'source'), ('constant', '17', 'pruned'), ('constant', '17', 'continued'),
                    ('drpruning', '17', 'pruned'), ('drpruning', '17', 'continued')]
    initial = payload['initial_proportions']
    assert list(initial) == DOMAINS
    for row in rows:
        losses = {d: row[f'loss/{d}'] for d in DOMAINS}
        assert all(math.isfinite(v) and v > 0 for v in losses.values())
        assert row['mean_uniform'] == pytest.approx(sum(losses.values()) / len(DOMAINS))
        assert row['mean_weighted'] == pytest.approx(sum(initial[d] * losses[d] for d in DOMAINS))
        assert row['worst_loss'] == max(losses.values()) and losses[row['worst_domain']] == row['worst_loss']
        assert row['spread'] == pytest.approx(max(losses.values()) - min(losses.values()))
    for row in rows[1:]:  # every policy run logged a final mixture on the simplex
        assert sum(row[f'mixture/{d}'] for d in DOMAINS) == pytest.approx(1.0, abs=1e-6)
    for row in rows[1:3]:  # the constant policy never leaves p_R0
        assert [row[f'mixture/{d}'] for d in DOMAINS] == pytest.approx([initial[d] for d in DOMAINS])
    # the pruned and the continued model are different models
    assert rows[3]['loss/wiki'] != rows[4]['loss/wiki']
    assert set(payload['reference_losses']) == set(DOMAINS)
    assert 'constant-policy pilot' in payload['notes'][0]  # target-size references, not the source model's
    assert payload['eval_tokens_per_domain'] == {d: 128 for d in DOMAINS}  # 2 batches x 2 x 32 tokens
    trajectory = payload['trajectories']['drpruning s17']['wiki']
    steps = [point[0] for point in trajectory]
    assert steps == [0, 2, 3, 4, 5]  # p_R0; prune updates at 2, 3; continued ones at 1, 2 shifted by 3 prune steps
    assert trajectory[0][1] == initial['wiki']
    assert all(r['export']['params_after'] < r['export']['params_before'] for r in payload['runs'])
    assert all(r['prune']['train_seconds'] > 0 and r['continue']['train_seconds'] > 0 for r in payload['runs'])
    assert all(r['prune']['final_expected_params'] > r['export']['params_after'] * 0.5 for r in payload['runs'])
    assert all(r['prune']['target_params'] == r['export']['params_after'] for r in payload['runs'])

    with open(finished_study / 'fidelity.csv') as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    expected = {'policy', 'seed', 'stage', 'mean_uniform', 'mean_weighted', 'worst_domain', 'worst_loss', 'spread'}
    expected |= {f'loss/{d}' for d in DOMAINS} | {f'mixture/{d}' for d in DOMAINS}
    assert expected <= set(csv_rows[0])
    assert float(csv_rows[4]['loss/wiki']) == pytest.approx(rows[4]['loss/wiki'])

    png = (finished_study / 'fidelity.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_redoes_only_missing_ones(finished_study, tiny_source, monkeypatch, capsys):
    bench = _load_bench()

    def no_launch(cmd, log_path):
        raise AssertionError(f'a finished stage was rerun: {cmd}')

    evaluated = []

    def count_eval(model_dir, *args, **kwargs):
        evaluated.append(str(model_dir))
        return {d: 1.0 for d in DOMAINS}

    monkeypatch.setattr(bench, 'launch', no_launch)
    monkeypatch.setattr(bench, 'evaluate', count_eval)
    before = (finished_study / 'fidelity.json').read_text()
    assert bench.main(_argv(tiny_source)) == 0
    assert evaluated == []
    assert 'skipped' in capsys.readouterr().out
    assert json.loads((finished_study / 'fidelity.json').read_text())['rows'] == json.loads(before)['rows']

    marker = finished_study / 'runs' / 'drpruning-s17' / 'eval-continued.done.json'
    marker.unlink()
    assert bench.main(_argv(tiny_source)) == 0
    # the score reads the steering + scored batches, then the steering ones, of that one model
    assert evaluated == [str(finished_study / 'runs' / 'drpruning-s17' / 'continue' / 'hf' / 'huggingface' / 'final')] * 2
    rows = json.loads((finished_study / 'fidelity.json').read_text())['rows']
    assert rows[4]['loss/wiki'] == 1.0 and rows[3]['loss/wiki'] != 1.0


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(finished_study, tiny_source):
    bench = _load_bench()
    with pytest.raises(SystemExit, match=r'prune_steps: 3 -> 4'):
        bench.main(_argv(tiny_source, **{'--prune-steps': 4}))
