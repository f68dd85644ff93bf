"""bench/quality_per_token.py: a path's stored result is reused only under the same settings, and
the table shows every stored path (the CPU column where it was recorded)."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import load_bench


@pytest.fixture(scope='module')
def bench():
    return load_bench('quality_per_token')


def _args(bench, **overrides):
    values = {key: 0 for key in bench.SETTING_KEYS}
    values.update(corpus='corpus', source='source', tokens=1024, seed=17)
    values.update(overrides)
    return argparse.Namespace(**values)


def _result(bench, key, mean, cpu_s=None):
    final = {d: mean for d in bench.DOMAINS}
    result = {'key': key, 'name': bench.PATHS[key], 'final': final, 'mean': mean, 'worst': mean, 'tokens': 1024,
              'wall_s': 10.0, 'load_average': [1.0, 1.5]}
    if cpu_s is not None:
        result['cpu_s'] = cpu_s
    return result


def test_a_stored_path_is_reused_only_under_the_same_settings(bench, tmp_path):
    settings = bench.path_settings(_args(bench))
    (tmp_path / 'd.json').write_text(json.dumps({'settings': settings, 'result': _result(bench, 'd', 4.5)}))
    assert bench.stored_result(tmp_path, 'd', settings)['mean'] == 4.5
    assert bench.stored_result(tmp_path, 'a', settings) is None  # never run
    other = bench.path_settings(_args(bench, tokens=2048))
    assert bench.stored_result(tmp_path, 'd', other) is None  # another budget: rerun, not reused


def test_table_lists_each_path_with_its_tokens_flops_and_cpu_time_where_recorded(bench):
    source = {d: 3.0 for d in bench.DOMAINS}
    recorded = dict(_result(bench, 'd2', 4.5, cpu_s=1234.0), flops=2.5e15, prune_tokens=256)
    table = bench.table([_result(bench, 'b', 6.4), recorded], source).splitlines()
    header = [cell.strip() for cell in table[0].strip('|').split('|')]
    assert header[-6:] == ['tokens', 'of which pruning', 'training PFLOPs', 'wall (s)', 'CPU (s)', 'load']
    rows = {line.split('|')[1].strip().split(' ')[0]: [c.strip() for c in line.strip('|').split('|')]
            for line in table[3:]}
    assert rows['(b)'][-4:] == ['not recorded', '10', 'not recorded', '1.0 / 1.5']  # stored before FLOPs were
    assert rows["(d')"][-6:] == ['1,024', '256', '2.50', '10', '1234', '1.0 / 1.5']
    assert rows["(d')"][len(bench.DOMAINS) + 1] == '**4.500**'
    assert all(len(line.split('|')) == len(table[0].split('|')) for line in table)
