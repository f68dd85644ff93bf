"""bench/scheduler_study.py: its in-memory mixture stream (the scheduler contract) and the paired statistics."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location('scheduler_study', REPO / 'bench' / 'scheduler_study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(sizes):
    return {name: torch.arange(n * 4).view(n, 4) + 1000 * i for i, (name, n) in enumerate(sizes.items())}


def test_mixture_stream_follows_set_proportions_counts_and_continues_across_stages():
    study = _study()
    data = study.MixtureData(_train({'a': 50, 'b': 30}), [0.5, 0.5], batch=10, seed=3)
    stream = iter(data)
    take = lambda n: [next(stream) for _ in range(n)]  # noqa: E731
    take(20)  # batches 0, 1
    data.set_proportions([1.0, 0.0], at_batch=2)
    batch2 = take(10)
    assert all(int(row['input_ids'][0]) < 1000 for row in batch2)  # only domain a from batch 2 on
    np.testing.assert_array_equal(data.samples_per_domain(3), np.sum(data.per_batch_counts[:3], axis=0))
    assert data.samples_per_domain(3)[0] >= 10 and data.samples_per_domain(0).sum() == 0
    seen_a = [int(row["input_ids"][0]) for row in batch2]
    assert len(set(seen_a)) == len(seen_a)  # no repeat inside a pass

    before = data.repeats().copy()
    data.new_stage([0.5, 0.5])  # next training run: batch clock back to 0, domains continue where they were
    assert data.samples_per_domain(0).sum() == 0 and data.proportions.tolist() == [0.5, 0.5]
    np.testing.assert_allclose(data.repeats(), before)
    rows = take(50)
    np.testing.assert_allclose(data.repeats() * [50, 30], before * [50, 30] + data.samples_per_domain(5))
    first_a = [int(r['input_ids'][0]) for r in rows if int(r['input_ids'][0]) < 1000]
    drawn_before = int(round(before[0] * 50))
    if drawn_before + len(first_a) <= 50:  # still in the first pass over domain a: nothing seen twice
        assert not set(first_a) & {int(data.train[0][i][0]) for i in data.orders[0][:drawn_before]}


def test_paired_differences_and_their_standard_error():
    study = _study()
    domains = study.DOMAINS

    def result(policy, seed, worst, rest=1.0):
        score = {d: rest for d in domains}
        score[domains[seed % len(domains)]] = worst
        return {'policy': policy, 'seed': seed, 'score': score, 'repeats_total': [0.1] * len(domains),
                'q_continue_end': [1 / len(domains)] * len(domains), 'q_prune_end': [1 / len(domains)] * len(domains),
                'reference_losses_end': None, 'expected_params_end_of_pruning': 1.0, 'target_params': 1.0}

    constant_worst = [3.0, 3.2, 2.9]
    dro_worst = [2.8, 3.1, 2.9]
    results = [result('constant', s, w) for s, w in enumerate(constant_worst)]
    results += [result('dro', s, w) for s, w in enumerate(dro_worst)]
    table = study.summarize(results, [0, 1, 2])
    diff = np.array(dro_worst) - np.array(constant_worst)  # -0.2, -0.1, 0
    mean, se = table['dro']['d_worst_vs_constant']
    assert mean == pytest.approx(diff.mean())
    assert se == pytest.approx(diff.std(ddof=1) / math.sqrt(3))
    assert table['dro']['worst'] == pytest.approx(np.mean(dro_worst))
    assert 'd_worst_vs_dro' not in table['dro'] and table['constant']['n'] == 3
