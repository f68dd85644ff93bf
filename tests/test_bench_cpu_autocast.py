"""bench/cpu_autocast_step.py runs (tiny random models) and prints the ratio on its last line."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_bench_runs_on_random_models_and_ends_with_the_ratio():
    result = subprocess.run([sys.executable, str(REPO / 'bench' / 'cpu_autocast_step.py'), '--random', '--steps', '1',
                             '--seq', '16', '--threads', '1'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith('fp32 / bf16 step time: ') and float(last.split(': ')[1]) > 0


def test_it_asks_for_models_or_random():
    result = subprocess.run([sys.executable, str(REPO / 'bench' / 'cpu_autocast_step.py')], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and 'give --student and --teacher, or --random' in result.stderr
