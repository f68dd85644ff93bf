"""The demo's figure for both of its paths: with a pruning run (L0) and without one (one-shot)."""

import json
import warnings

import pytest

from drp_foundry.demo.pipeline import plot_demo

DOMAINS = ['arxiv', 'wiki']


def _write(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def _run_metrics(path, steps, with_size=False):
    records = []
    for step in steps:
        record = {'step': step}
        for i, d in enumerate(DOMAINS):
            record[f'drp/mixture/{d}'] = 0.5
            record[f'drp/domain_eval_loss/{d}'] = 3.0 + i - 0.01 * step
        if with_size:
            record['drp/expected_num_parameters'] = 1e6 - step
            record['drp/target_num_parameters'] = 5e5
        records.append(record)
    return _write(path, records)


@pytest.mark.parametrize('with_pruning_run', [True, False])
def test_plot_demo_labels_every_domain_without_warnings(tmp_path, with_pruning_run, monkeypatch):
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, 'close', lambda fig=None: figures.append(fig))
    prune = _run_metrics(tmp_path / 'prune.jsonl', [0, 10, 20], with_size=True) if with_pruning_run else None
    cont = _run_metrics(tmp_path / 'continue.jsonl', [0, 10])
    out = tmp_path / 'demo.png'
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # e.g. matplotlib's "No artists with labels found"
        plot_demo(prune, cont, DOMAINS, out)
    assert out.stat().st_size > 0
    (fig,) = figures
    mixture_ax, loss_ax, size_ax = fig.axes
    for ax in (mixture_ax, loss_ax):
        assert ax.get_legend_handles_labels()[1] == DOMAINS  # each domain named once, whichever run has it
    size_labels = size_ax.get_legend_handles_labels()[1]
    if with_pruning_run:
        assert size_labels == ['expected', 'target']
    else:
        assert size_labels == [] and 'one-shot' in size_ax.texts[0].get_text()
