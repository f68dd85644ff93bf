"""bench/cpu_autocast_step.py runs (tiny random models) and prints the ratio on its last line."""


import pytest
from conftest import load_bench


def _bench():
    """The bench script as a module (in this process: it imports nothing the test session lacks)."""
    return load_bench('cpu_autocast_step')


def test_the_bench_runs_on_random_models_and_ends_with_the_ratio(capsys):
    ratio = _bench().main(['--random', '--steps', '1', '--batch', '1', '--seq', '8', '--threads', '1'])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f'fp32 / bf16 step time: {ratio:.2f}' and ratio > 0


def test_it_asks_for_models_or_random(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench().main([])
    assert exit_info.value.code == 2 and 'give --student and --teacher, or --random' in capsys.readouterr().err
