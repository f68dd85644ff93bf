"""End to end on CPU: data_prep -> `python train.py yamls/demo/tiny_llama.yaml` -> per-domain eval -> resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_trimmed_corpus

from data_prep.build_domain_mds import PrepSettings, build_domain_mds

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ['arxiv', 'book', 'c4-rp', 'cc', 'github', 'stackexchange', 'wiki']


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory, sample_dir):
    corpus = write_trimmed_corpus(sample_dir, tmp_path_factory.mktemp('corpus'), DOMAINS, 12, 3000)
    out = tmp_path_factory.mktemp('mds')
    build_domain_mds(corpus, out, train_tokenizer_vocab=2048,
                     settings=PrepSettings(max_seq_len=64, max_train_samples=64, max_eval_samples=8), overwrite=True)
    return out


def _train(data_root: Path, run_dir: Path, max_duration: str) -> str:
    args = [sys.executable, str(REPO / 'train.py'), str(REPO / 'yamls/demo/tiny_llama.yaml'),
            f'variables.data_root={data_root}', 'variables.max_seq_len=64', f'max_duration={max_duration}',
            'eval_interval=3ba', 'save_interval=3ba', 'global_train_batch_size=4', 'device_train_microbatch_size=4',
            'device_eval_batch_size=4', f'save_folder={run_dir}', 'console_log_interval=1ba']
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


@pytest.mark.slow
def test_tiny_run_evaluates_each_domain_checkpoints_and_resumes(demo_data, tmp_path):
    run_dir = tmp_path / 'ckpt'
    first = _train(demo_data, run_dir, '6ba')
    for d in DOMAINS:
        assert f'metrics/eval/{d}/LanguageCrossEntropy' in first
        assert f'drp/domain_eval_loss/{d}' in first
    assert 'drp/domain_eval_loss/worst' in first
    assert (run_dir / 'ep0-ba6-rank0.pt').exists()

    second = _train(demo_data, run_dir, '8ba')  # autoresume continues from batch 6
    assert '[batch=7/8]' in second and '[batch=1/8]' not in second
    state = torch.load(run_dir / 'ep0-ba8-rank0.pt', weights_only=False)['state']
    assert state['timestamp']['Timestamp']['batch'] == 8
    # the callback's state came back from the first run's checkpoint and went on
    batches = [h['batch'] for h in state['callbacks']['DomainEvalLossLogger']['history']]
    assert batches[:2] == [3, 6] and all(b <= 8 for b in batches)
    assert set(state['callbacks']['DomainEvalLossLogger']['history'][0]['losses']) == set(DOMAINS)
