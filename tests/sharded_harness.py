"""Two CPU ranks (gloo) of a tiny GQA Llama pruning run, with DDP or FSDP2 (issue 16).

Used by tests/test_sharded_training.py; also runnable by hand::

    python tests/sharded_harness.py WORKDIR [--mode ddp|fsdp2|both]

One run = masks + Lagrangian (warm-up batches 1-4) + distillation from a random teacher +
``drp_multidomain`` (1 worker) + the drpruning policy on three domains of the shared sample (data and YAML as
tests/resume_harness.py builds them), eval (= scheduler update) and checkpoint every 2 batches,
8 batches of 4 sequences, gradient clipping at a norm below every batch's. ``mask_noise: shared``: every rank draws rank 0's mask noise, so a
2-rank run with one microbatch of 2 per rank sees the masks a 1-rank run with one microbatch
of 4 sees, and their losses differ only by floating-point summation order.
FSDP2 is Composer's: ``fsdp_config`` plus env ``FSDP_VERSION=2``, sharded checkpoints, activation
checkpointing of the decoder layers.
The runs go through tests/rank_probe_train.py, which logs per-rank values to
``<run>/probe/rank<r>.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import resume_harness

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
WARMUP = 4
UPDATES = (2, 4, 6, 8)  # batches at which the scheduler updates (evals)
RESUME_FROM = 4
CLIP_AT = 0.5  # the gradient-clipping threshold: below every batch's gradient norm
FIRST_FIT = 6  # the drpruning policy's first scaling-law fit (history from batch 2, 3 points)
STREAMING_RACE = 'shared memory registered does not match local leader'
TARGET = {'layers': 2, 'hidden': 48, 'heads': 2, 'kv_heads': 1, 'intermediate': 64}


def write_tiny_llama(folder: Path) -> Path:
    """A random GQA Llama with weights (the distillation teacher; the student starts from its config):
    3 layers, hidden 64, 4 query / 2 KV heads, FFN 128, the data's 2048 vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                         tie_word_embeddings=False, vocab_size=2048, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(11)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_config(path: Path, data_root: Path, model_dir: Path, run_dir: Path, mode: str, ranks: int,
                 load_path: Path | None = None) -> Path:
    """The resume harness's YAML, changed to this module's run (``mode``: ``ddp`` or ``fsdp2``)."""
    resume_harness.write_config(path, data_root, run_dir)
    cfg = json.loads(path.read_text())
    cfg['run_name'] = f'sharded-{mode}'
    cfg['model']['pretrained_model_name_or_path'] = str(model_dir)
    learner = cfg['algorithms']['drp_mask_learner']
    learner.update(target=TARGET, mask_noise='shared')
    cfg['algorithms']['drp_lagrangian']['warmup_steps'] = WARMUP
    # the random model's own weights as teacher: sharded like the student under FSDP2, whole under DDP
    cfg['algorithms']['drp_distillation'] = {'teacher': str(model_dir), 'alpha': 0.5}
    # gradient clipping below every batch's gradient norm (0.8-1.1 here), so every update is clipped: under FSDP2 on
    # gloo the gradients must then be averaged over ranks, not summed (drp_fsdp2_gloo_average, added by drp-train)
    cfg['algorithms']['gradient_clipping'] = {'clipping_type': 'norm', 'clipping_threshold': CLIP_AT}
    cfg['callbacks']['drp_test_rank_probe'] = {'folder': str(run_dir / 'probe')}  # after drp_dynamic_loading
    cfg.update(max_duration=f'{STEPS}ba', device_train_microbatch_size=4 // ranks, autoresume=False)
    if mode == 'fsdp2':
        # FSDP2 applies activation checkpointing non-reentrant (the masks' hooks need that); the config check
        # asks for no v1 activation_checkpointing_reentrant key under FSDP_VERSION=2
        cfg['fsdp_config'] = {'state_dict_type': 'sharded', 'reshard_after_forward': True,
                              'activation_checkpointing': True}
    if load_path is not None:
        cfg['load_path'] = str(load_path)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def checkpoint_path(run_dir: Path, mode: str, batch: int) -> Path:
    folder = run_dir / 'checkpoints'
    return folder / f'ep0-ba{batch}' if mode == 'fsdp2' else folder / f'ep0-ba{batch}-rank0.pt'


def run(config: Path, run_dir: Path, mode: str, ranks: int, timeout: float = 600) -> dict:
    """Run the probe train script; returns the log and the wall time, raises with the log's tail on failure."""
    script = str(REPO / 'tests' / 'rank_probe_train.py')
    if ranks == 1:
        cmd = [sys.executable, script, str(config)]
    else:
        launcher = Path(sys.executable).with_name('composer')
        cmd = [str(launcher), '-n', str(ranks), '--master_port', str(29500 + (os.getpid() + len(str(run_dir))) % 2000),
               script, str(config)]
    env = resume_harness._env()
    if mode == 'fsdp2':
        env['FSDP_VERSION'] = '2'
    for attempt in range(3):
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        log = proc.stdout + proc.stderr
        (run_dir.parent / f'{run_dir.name}.log').write_text(log)
        # mosaicml-streaming picks its shared-memory prefix racily: another job on the machine starting a dataset
        # at the same moment makes the loader build fail before training; that is not this run's fault
        if proc.returncode == 0 or STREAMING_RACE not in log:
            break
    if proc.returncode != 0:
        raise RuntimeError(f'{mode} run with {ranks} rank(s) failed (rc={proc.returncode}):\n{log[-6000:]}')
    return {'run_dir': run_dir, 'seconds': seconds, 'log': log}


def train(work: Path, data: Path, model_dir: Path, name: str, mode: str, ranks: int,
          load_path: Path | None = None) -> dict:
    run_dir = work / name
    cfg = write_config(work / f'{name}.yaml', data, model_dir, run_dir, mode, ranks, load_path)
    return run(cfg, run_dir, mode, ranks)


def probe_records(run_dir: Path, rank: int) -> dict[int, dict]:
    """step -> the last record rank ``rank`` wrote at that step."""
    records = {}
    for line in (run_dir / 'probe' / f'rank{rank}.jsonl').read_text().splitlines():
        record = json.loads(line)
        records[record['step']] = record
    return records


def grad_norms(run_dir: Path, rank: int) -> dict[int, float]:
    """step (0-based batch) -> the full gradient's norm before clipping, as rank ``rank`` measured it."""
    lines = (run_dir / 'probe' / f'grad_norm_rank{rank}.jsonl').read_text().splitlines()
    return {record['step']: record['grad_norm'] for record in map(json.loads, lines)}


def losses(run_dir: Path) -> dict[int, float]:
    """step -> ``loss/train/total`` (Composer averages it over ranks)."""
    values = resume_harness.last_values(resume_harness.read_logged(run_dir / 'metrics.jsonl'))
    return {step: value for (step, key), value in values.items() if key == 'loss/train/total'}


if __name__ == '__main__':
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument('work', type=Path)
    parser.add_argument('--mode', choices=['ddp', 'fsdp2', 'both'], default='both')
    parser.add_argument('--sample', type=Path, default=None,
                        help='folder of <domain>.jsonl (default: the embedded corpus, decompressed under WORK)')
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    from conftest import decompress_embedded_corpus

    data = resume_harness.build_data(args.sample or decompress_embedded_corpus(args.work / 'sample'), args.work)
    model_dir = write_tiny_llama(args.work / 'tiny-llama')
    single = train(args.work, data, model_dir, 'single', 'ddp', 1)
    print(f'1 rank: {single["seconds"]:.1f} s, losses {losses(single["run_dir"])}')
    for mode in (['ddp', 'fsdp2'] if args.mode == 'both' else [args.mode]):
        full = train(args.work, data, model_dir, f'{mode}-full', mode, 2)
        print(f'{mode} 2 ranks: {full["seconds"]:.1f} s, losses {losses(full["run_dir"])}')
