"""A tiny GQA pruning run through the real ``train.py``, killed with SIGKILL and resumed.

Used by tests/test_kill_resume.py; also runnable by hand::

    python tests/resume_harness.py WORKDIR [--ranks 2] [--kill-after 5]

One run = masks + Lagrangian + ``drp_multidomain`` (1 worker) + the drpruning policy on
three domains of the shared sample, eval and checkpoint every 2 batches, 12 batches.
Lagrangian warm-up: batches 1-8; the policy's first scaling-law fit: the eval of batch 6
(3 history points from batch 2 on, fits from 25% of the run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from drp_foundry.run_lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ['arxiv', 'github', 'wiki']
STEPS = 12
WARMUP = 8
FIRST_FIT = 6
# metrics that measure time, not the run
CLOCK_METRICS = ('wall_clock', 'throughput', 'time/train', 'time/val', 'time/total', 'time/remaining_estimate')


def build_data(shared_sample: Path, work: Path) -> Path:
    from data_prep.build_domain_mds import PrepSettings, build_domain_mds

    corpus = work / 'corpus'
    corpus.mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        lines = []
        with open(shared_sample / f'{domain}.jsonl') as f:
            for line in f:
                lines.append(json.dumps({'text': json.loads(line)['text'][:2500]}))
                if len(lines) == 10:
                    break
        (corpus / f'{domain}.jsonl').write_text('\n'.join(lines) + '\n')
    out = work / 'data'
    build_domain_mds(corpus, out, train_tokenizer_vocab=2048,
                     settings=PrepSettings(max_seq_len=32, max_train_samples=80, max_eval_samples=4))
    return out


def write_config(path: Path, data_root: Path, run_dir: Path) -> Path:
    # drp_text: Foundry's text loader built under the streaming shm lock (the 2-rank run of this harness shares
    # the machine with other test workers' jobs)
    loaders = [{'label': d, 'name': 'drp_text', 'drop_last': False, 'num_workers': 0, 'prefetch_factor': None,
                'persistent_workers': False,
                'dataset': {'local': str(data_root / d), 'split': 'eval', 'shuffle': False, 'max_seq_len': 32}}
               for d in DOMAINS]
    cfg = {
        'run_name': 'killres', 'seed': 23, 'max_seq_len': 32,
        'model': {'name': 'hf_causal_lm', 'pretrained_model_name_or_path': str(REPO / 'yamls/demo/models/tiny-gqa'),
                  'pretrained': False, 'trust_remote_code': False, 'attn_implementation': 'eager'},
        'tokenizer': {'name': str(data_root / 'tokenizer'), 'kwargs': {'model_max_length': 32}},
        'train_loader': {'name': 'drp_multidomain', 'drop_last': True, 'num_workers': 1, 'prefetch_factor': 2,
                         'persistent_workers': True,
                         'dataset': {'data_root': str(data_root), 'split': 'train', 'domains': DOMAINS,
                                     'proportions': [0.3, 0.3, 0.4], 'max_seq_len': 32, 'shuffle_seed': 5}},
        'eval_loaders': loaders,
        'optimizer': {'name': 'decoupled_adamw', 'lr': 1.0e-3, 'betas': [0.9, 0.95], 'eps': 1.0e-8,
                      'weight_decay': 0.0},
        'scheduler': {'name': 'cosine_with_warmup', 't_warmup': '2ba', 'alpha_f': 0.1},
        'algorithms': {
            'drp_mask_learner': {'target': {'layers': 3, 'hidden': 64, 'heads': 3, 'kv_heads': 1,
                                            'intermediate': 128},
                                 'mask_lr': 0.1, 'lambda_lr': 0.05},
            'drp_lagrangian': {'warmup_steps': WARMUP},
            'gradient_clipping': {'clipping_type': 'norm', 'clipping_threshold': 1.0}},
        'callbacks': {'drp_dynamic_loading': {'policy': {'name': 'drpruning',
                                                         'reference_losses': {d: 6.0 for d in DOMAINS},
                                                         'fit_start_fraction': 0.25, 'ratio_start_fraction': 0.5,
                                                         'history_start_fraction': 0.1, 'min_fit_points': 3},
                                              'plot_folder': str(run_dir / 'plots')},
                      'lr_monitor': {}},
        'loggers': {'drp_jsonl': {'path': str(run_dir / 'metrics.jsonl')}},
        'max_duration': f'{STEPS}ba', 'eval_interval': '2ba', 'eval_first': False,
        'global_train_batch_size': 4, 'device_train_microbatch_size': 2, 'device_eval_batch_size': 4,
        'precision': 'fp32', 'progress_bar': False, 'log_to_console': True, 'console_log_interval': '1ba',
        'save_folder': str(run_dir / 'checkpoints'), 'save_interval': '2ba', 'save_num_checkpoints_to_keep': -1,
        'save_overwrite': False, 'autoresume': True, 'dist_timeout': 120,
    }
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def command(config: Path, ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, str(REPO / 'train.py'), str(config)]
    launcher = Path(sys.executable).with_name('composer')
    return [str(launcher), '-n', str(ranks), '--master_port', str(29500 + os.getpid() % 2000),
            str(REPO / 'train.py'), str(config)]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false',
               HF_HUB_OFFLINE='1', PYTHONHASHSEED='0')
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    return env


def last_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    step = 0
    for line in metrics.read_text().splitlines():
        try:
            step = max(step, int(json.loads(line).get('step') or 0))
        except ValueError:  # a line cut by the kill
            pass
    return step


def run(config: Path, run_dir: Path, ranks: int = 1, kill_after: int | None = None,
        timeout: float = 600) -> tuple[int, str, float]:
    """Run train.py; with ``kill_after=N`` SIGKILL the whole process group once the checkpoint of
    batch N is on disk and a later batch has been logged. Returns (returncode, log, seconds)."""
    log_path = run_dir.parent / f'{run_dir.name}-{"kill" if kill_after else "run"}-{time.time_ns()}.log'
    start = time.perf_counter()
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(command(config, ranks), stdout=log, stderr=subprocess.STDOUT, cwd=run_dir.parent,
                                env=_env(), start_new_session=True)
        try:
            while proc.poll() is None:
                if time.perf_counter() - start > timeout:
                    raise TimeoutError(f'train.py ran past {timeout} s; log: {log_path}')
                if kill_after is not None and (run_dir / 'checkpoints' / f'ep0-ba{kill_after}-rank0.pt').exists() \
                        and last_step(run_dir / 'metrics.jsonl') > kill_after:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, log_path.read_text(), time.perf_counter() - start


def read_logged(metrics: Path) -> list[dict]:
    """Every logged record, without clock metrics."""
    records = []
    for line in metrics.read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items()
                  if not k.startswith(CLOCK_METRICS) and not k.endswith('_seconds')}
        if len(record) > 1:
            records.append(record)
    return records


def export(run_dir: Path, out: Path) -> Path:
    """drp-export's function on the run's latest checkpoint, in this process (the command line is tested with
    the bad-input rows; a fresh interpreter here would cost a torch and transformers import per export)."""
    from drp_foundry.export import export_checkpoint

    export_checkpoint(run_dir / 'checkpoints' / 'latest-rank0.pt', out)
    return out


def last_values(records: list[dict]) -> dict[tuple[int, str], object]:
    """(step, metric) -> the last value logged (how read_metrics reads a file that holds repeats)."""
    return {(r['step'], k): v for r in records for k, v in r.items() if k != 'step'}


def first_value_difference(a: list[dict], b: list[dict]) -> str | None:
    x, y = last_values(a), last_values(b)
    diffs = sorted(key for key in set(x) | set(y) if x.get(key) != y.get(key))
    if not diffs:
        return None
    return f'{len(diffs)} values differ, first: ' + ', '.join(f'{k}: {x.get(k)} vs {y.get(k)}' for k in diffs[:3])


def first_difference(a: list[dict], b: list[dict]) -> str | None:
    """None when the two logs are equal record by record, else where they first differ."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            return f'record {i} (step {x.get("step")}): {[(k, x.get(k), y.get(k)) for k in keys[:4]]}'
    if len(a) != len(b):
        return f'{len(a)} records vs {len(b)}'
    return None


def kill_and_resume(work: Path, data: Path, kill_points: Sequence[int], ranks: int = 1) -> dict:
    """One run killed (SIGKILL) after the checkpoint of each batch in ``kill_points`` in turn, each time
    rerun with autoresume, then finished. Returns the run folder, where each kill landed and the timings."""
    run_dir = work / f'killed-n{ranks}'
    run_dir.mkdir(parents=True)
    cfg = write_config(work / f'{run_dir.name}.yaml', data, run_dir)
    result: dict = {'run_dir': run_dir, 'killed_at_step': [], 'seconds': [], 'logs': [], 'lock_left': []}
    for kill_after in kill_points:
        rc, log, seconds = run(cfg, run_dir, ranks, kill_after=kill_after)
        assert rc == -signal.SIGKILL, f'the run was not killed (rc={rc}):\n{log[-3000:]}'
        assert not (run_dir / 'checkpoints' / f'ep0-ba{STEPS}-rank0.pt').exists(), 'killed after the end'
        result['killed_at_step'].append(last_step(run_dir / 'metrics.jsonl'))
        result['lock_left'].append((run_dir / 'checkpoints' / LOCK_NAME).exists())
        result['seconds'].append(seconds)
        result['logs'].append(log)
    rc, log, seconds = run(cfg, run_dir, ranks)
    assert rc == 0, log[-4000:]
    result['seconds'].append(seconds)
    result['logs'].append(log)
    return result


def uninterrupted(work: Path, data: Path, ranks: int = 1) -> dict:
    run_dir = work / f'full-n{ranks}'
    run_dir.mkdir(parents=True)
    cfg = write_config(work / f'{run_dir.name}.yaml', data, run_dir)
    rc, log, seconds = run(cfg, run_dir, ranks)
    assert rc == 0, log[-4000:]
    return {'run_dir': run_dir, 'seconds': seconds, 'log': log}


def files_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


if __name__ == '__main__':
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument('work', type=Path)
    parser.add_argument('--ranks', type=int, default=1)
    parser.add_argument('--kill-after', type=int, nargs='+', default=[4, 10])
    parser.add_argument('--sample', type=Path, default=None,
                        help='folder of <domain>.jsonl (default: the embedded corpus, decompressed under WORK)')
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    from conftest import decompress_embedded_corpus

    data = build_data(args.sample or decompress_embedded_corpus(args.work / 'sample'), args.work)
    full = uninterrupted(args.work, data, args.ranks)
    print(f'uninterrupted: {full["seconds"]:.1f} s')
    reference = read_logged(full['run_dir'] / 'metrics.jsonl')
    res = kill_and_resume(args.work, data, args.kill_after, args.ranks)
    logged = read_logged(res['run_dir'] / 'metrics.jsonl')
    diff, values = first_difference(reference, logged), first_value_difference(reference, logged)
    print(f'killed after ba{args.kill_after} (at steps {res["killed_at_step"]}), runs {res["seconds"]} s: '
          f'file {"equal" if diff is None else "DIFFERS at " + diff}; '
          f'values {"equal" if values is None else "DIFFER: " + values}')
