"""The fidelity study's table math (bench/fidelity.py).

The bench's end-to-end plumbing (prune two policies on a tiny model, export, continue, evaluate, rerun) is a study
script's, not the product's; the chain it drives (train.py -> export -> continued pretraining -> held-out eval) is
what the first-hour demo test and the kill/resume tests run, so it is not run again here (it took 4.6 minutes).
"""

from __future__ import annotations

import csv

import pytest
from conftest import load_bench

DOMAINS = ['arxiv', 'book', 'c4-rp', 'cc', 'github', 'stackexchange', 'wiki']  # the demo recipe's domains


def _load_bench():
    return load_bench('fidelity', 'fidelity_bench')


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
