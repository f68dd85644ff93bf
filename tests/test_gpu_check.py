"""bench/gpu_check.sh: the prepared GPU check runs on CPU with a tiny model (smoke test)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'bench' / 'gpu_check.sh'


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES='')
    return subprocess.run(['bash', str(SCRIPT), *args], cwd='/', env=env, capture_output=True, text=True,
                          timeout=600)


def test_help_works_without_a_gpu():
    result = _run('--help')
    assert result.returncode == 0, result.stderr
    assert '--tiny' in result.stdout and 'goal <= 1.10' in result.stdout


@pytest.mark.slow
def test_tiny_smoke_run_reports_ratio_memory_and_exact_export():
    result = _run('--tiny')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    match = re.fullmatch(r'masked/plain step time ratio: ([0-9.]+) \(goal <= 1\.10\)', lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) > 0
    export_line = next(line for line in lines if 'export (fp32)' in line)
    max_diff = float(re.search(r'max \|masked - exported\| logit ([0-9.e+-]+)', export_line).group(1))
    assert max_diff < 1e-4, export_line
    assert 'argmax agreement 1.0000' in export_line
    exported, target = re.search(r'exported parameters ([0-9,]+) \(target ([0-9,]+)\)', export_line).groups()
    assert exported == target


def test_bad_arguments_are_refused():
    result = _run('--preset', 'tiny', '--steps', '0')
    assert result.returncode != 0
    assert '--steps must be >= 1' in result.stderr
