"""The JSON-lines metrics logger writes what Composer logs and reads it back by step."""

from __future__ import annotations

import json

import torch

from drp_foundry.composer.jsonl_metrics_logger import JSONLMetricsLogger, read_metrics


class _State:
    run_name = 'run-a'


def test_writes_filters_and_reads_back(tmp_path):
    logger = JSONLMetricsLogger(path=str(tmp_path / '{run_name}' / 'm.jsonl'), prefixes=['drp/'])
    logger.init(_State(), None)
    logger.fit_start(_State(), None)
    logger.log_metrics({'drp/q/wiki': torch.tensor(0.25), 'loss/train/total': 3.0}, step=1)
    logger.log_metrics({'drp/q/wiki': 0.5, 'drp/vec': torch.tensor([1.0, 2.0])}, step=2)
    logger.log_metrics({'drp/q/wiki': 0.75}, step=2)  # a resumed run logs step 2 again
    assert logger.path == tmp_path / 'run-a' / 'm.jsonl'
    series = read_metrics(logger.path)
    assert series['drp/q/wiki'] == [(1, 0.25), (2, 0.75)]
    assert series['drp/vec'] == [(2, [1.0, 2.0])]
    assert 'loss/train/total' not in series


def test_nan_is_kept_as_text(tmp_path):
    logger = JSONLMetricsLogger(path=str(tmp_path / 'm.jsonl'))
    logger.init(_State(), None)
    logger.log_metrics({'x': float('nan')}, step=0)
    logger.fit_start(_State(), None)
    assert read_metrics(tmp_path / 'm.jsonl')['x'] == [(0, 'nan')]


def _lines(path):
    return path.read_text().splitlines()


def test_a_fresh_run_moves_the_old_file_aside(tmp_path, caplog):
    path = tmp_path / 'm.jsonl'
    path.write_text('{"step": 7, "old": 1}\n')
    logger = JSONLMetricsLogger(path=str(path))
    logger.init(_State(), None)
    logger.log_metrics({'x': 1.0}, step=0)  # held until the run is known to be fresh
    assert _lines(path) == ['{"step": 7, "old": 1}']
    logger.fit_start(_State(), None)
    assert _lines(path) == ['{"step": 0, "x": 1.0}']
    assert _lines(tmp_path / 'm.1.jsonl') == ['{"step": 7, "old": 1}']
    assert 'moved it to' in caplog.text and 'm.1.jsonl' in caplog.text
    second = JSONLMetricsLogger(path=str(path))
    second.init(_State(), None)
    second.fit_start(_State(), None)
    assert (tmp_path / 'm.2.jsonl').exists() and not path.exists()


def test_a_resumed_run_drops_the_steps_after_its_checkpoint(tmp_path):
    path = tmp_path / 'm.jsonl'
    first = JSONLMetricsLogger(path=str(path))
    first.init(_State(), None)
    first.fit_start(_State(), None)
    for step in range(3):
        first.log_metrics({'loss': float(step)}, step=step)
    checkpoint = first.state_dict()
    for step in range(3, 5):  # logged, then the run is killed before the next checkpoint
        first.log_metrics({'loss': float(step)}, step=step)
    with open(path, 'a') as f:
        f.write('{"step": 5, "lo')  # a line cut by the kill
    resumed = JSONLMetricsLogger(path=str(path))
    resumed.init(_State(), None)
    resumed.log_metrics({'loss': 30.0}, step=3)
    resumed.load_state_dict(checkpoint)
    resumed.fit_start(_State(), None)  # already settled: nothing moved aside
    resumed.log_metrics({'loss': 40.0}, step=4)
    assert [json.loads(line) for line in _lines(path)] == [
        {'step': 0, 'loss': 0.0}, {'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 2.0},
        {'step': 3, 'loss': 30.0}, {'step': 4, 'loss': 40.0}]
    assert not (tmp_path / 'm.1.jsonl').exists()


def test_a_checkpoint_of_another_file_is_a_fresh_start(tmp_path):
    path = tmp_path / 'm.jsonl'
    path.write_text('{"step": 0, "old": 1}\n')
    logger = JSONLMetricsLogger(path=str(path))
    logger.init(_State(), None)
    logger.load_state_dict({'path': str(tmp_path / 'other.jsonl'), 'bytes': 5})
    logger.fit_start(_State(), None)
    assert (tmp_path / 'm.1.jsonl').exists()


def test_a_run_refused_after_its_checkpoint_load_leaves_the_file_as_it_was(tmp_path):
    # Composer loads the checkpoint in Trainer init and refuses a finished run in fit(), before FIT_START
    path = tmp_path / 'm.jsonl'
    path.write_text('{"step": 0, "loss": 1}\n{"step": 1, "loss": 2}\n{"step": 2, "loss": 3}\n')
    before = path.read_bytes()
    logger = JSONLMetricsLogger(path=str(path))
    logger.init(_State(), None)
    logger.log_metrics({'n_params': 5.0}, step=0)
    logger.load_state_dict({'path': str(path), 'bytes': len(before) - 20})
    logger.close(_State(), None)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['m.jsonl']
