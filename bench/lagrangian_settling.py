"""How many steps after the target ramp the paper's Lagrangian needs to bring the masks onto the target.

The measurement behind ``drp_foundry.pruning.lagrangian.LAGRANGIAN_SETTLING_STEPS`` (the short-run
warning of ``drp_lagrangian``). The project's own functions on the real model: SmolLM2-135M
(``$HOME/.cache/drp-foundry/models/smollm2-135m``, or ``--model``) with an ``L0MaskModule`` at the
demo's target (30 -> 20 layers, hidden 576 -> 384, 9 -> 6 heads (3 -> 2 KV groups), FFN 1536 -> 1024),
the paper's constant init, the Lagrangian of ``lagrangian_for_step`` with its linear ramp, AdamW
(betas 0.9 / 0.95, no weight decay) on the log-alphas and multipliers at the paper's learning rate
1.0 for both, constant (no schedule), the LM loss on sequences of the embedded corpus
(``drp_foundry/demo/corpus``, round-robin over its seven domains). The model's weights are frozen:
the masks see the LM gradient of the source model, so the run measures the constraint's own
settling at the cost of a forward and backward per step; a run that also trains the weights
moves the masks' LM gradient as it goes, which can only add to it.

Settled: from that step to the end of the run, the expected parameter count stays within
``--tolerance`` (default 2%, ``pruning/fidelity.py``'s size tolerance) of the target and every
row's expected kept fraction (each layer's KV groups and FFN units, the layer and hidden masks)
within 5 percentage points of its target fraction. Printed per seed: the post-ramp step at which
the run settled (or that it did not within the run), and the largest size gap in the last quarter.

    python bench/lagrangian_settling.py --ramp 40 --steps 340 --seeds 0 1
    python bench/lagrangian_settling.py --ramp 40 --steps 440 --seeds 0 1 2 --no-lm   # the constraint alone
    python bench/lagrangian_settling.py --table runs/settling_lm.json runs/settling_nolm.json   # the table
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from drp_foundry.composer.lagrangian_updater import lagrangian_for_step
from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.hf_injection import inject_masks
from drp_foundry.pruning.mask_module import L0MaskModule

CORPUS = Path(__file__).resolve().parents[1] / 'drp_foundry' / 'demo' / 'corpus'
TARGET = TargetArchitecture(layers=20, hidden=384, heads=6, kv_heads=2, intermediate=1024)
ROW_TOLERANCE = 0.05


def corpus_rows(tokenizer, seq_len: int, count: int) -> list[torch.Tensor]:
    import zstandard

    per_domain = []
    for path in sorted(CORPUS.glob('*.jsonl.zst')):
        with open(path, 'rb') as handle:
            text = zstandard.ZstdDecompressor().stream_reader(handle).read().decode('utf-8')
        ids: list[int] = []
        for line in io.StringIO(text):
            ids.extend(tokenizer(json.loads(line)['text'])['input_ids'])
            if len(ids) >= seq_len * (count // 7 + 2):
                break
        per_domain.append([torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids) - seq_len, seq_len)])
    rows = [row for group in zip(*per_domain) for row in group]
    return rows[:count]


def settled_at(gaps: list[float], row_gaps: list[float], ramp: int, tolerance: float) -> int | None:
    """The post-ramp step from which every later step is within both tolerances (None: never)."""
    settled = None
    for step in range(len(gaps) - 1, ramp - 1, -1):
        if abs(gaps[step]) <= tolerance and row_gaps[step] <= ROW_TOLERANCE:
            settled = step - ramp
        else:
            break
    return settled


def run(model_dir: Path, seed: int, ramp: int, steps: int, batch: int, seq_len: int, lr: float,
        lm_loss: bool = True) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    source = DecoderArchitecture.from_hf_config(model.config)
    masks = L0MaskModule(source, TARGET, init='constant')
    masks.noise_seed = seed
    inject_masks(model, masks)
    optimizer = torch.optim.AdamW([{'params': masks.mask_parameters(), 'lr': lr},
                                   {'params': masks.lambda_parameters(), 'lr': lr}],
                                  betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    rows = corpus_rows(tokenizer, seq_len, 700) if lm_loss else []
    generator = torch.Generator().manual_seed(seed)
    target_parameters = masks.target_num_parameters()
    gaps, row_gaps = [], []
    model.train()
    for step in range(steps):
        if lm_loss:
            picks = torch.randint(0, len(rows), (batch,), generator=generator)
            input_ids = torch.stack([rows[int(i)] for i in picks])
            loss = model(input_ids=input_ids, labels=input_ids).loss
        else:  # the constraint alone: the size terms as a training forward records them, no LM gradient
            masks.clamp_()  # as sample() does before every training forward
            masks.record_size_terms()
            loss = torch.zeros(())
        total, _, _ = lagrangian_for_step(masks, step, ramp)
        (loss + total).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            terms = masks.size_terms(detach=True)
            gaps.append((float(terms.num_parameters) - target_parameters) / target_parameters)
            finals = masks.target_sizes()
            row_gaps.append(max(float((value - finals[key]).abs().max()) for key, value in terms.expected.items()))
        if (step + 1) % 50 == 0:
            print(f'  seed {seed} step {step + 1}: size gap {gaps[-1]:+.3f}, worst row gap {row_gaps[-1]:.3f}', flush=True)
    return {'gaps': gaps, 'row_gaps': row_gaps}


def table(json_paths: list[Path], tolerance: float = 0.02) -> str:
    """The docs/RESULTS.md table of one or more ``--json`` outputs (one row per run and seed)."""
    lines = ['| LM loss | ramp | post-ramp steps run | seed | settled (post-ramp step) | size gap at ramp end | '
             'worst size gap, last quarter | worst row gap, last quarter |', '|---|---:|---:|---:|---:|---:|---:|---:|']
    for path in json_paths:
        record = json.loads(Path(path).read_text())
        args = record['args']
        ramp, steps = int(args['ramp']), int(args['steps'])
        for seed, result in record['results'].items():
            at = settled_at(result['gaps'], result['row_gaps'], ramp, float(args.get('tolerance', tolerance)))
            quarter = (steps - ramp) // 4
            lines.append(f'| {"no" if args.get("no_lm") == "True" else "yes"} | {ramp} | {steps - ramp} | {seed} | '
                         f'{at if at is not None else "not within the run"} | {result["gaps"][ramp - 1]:+.3f} | '
                         f'{max(result["gaps"][-quarter:], key=abs):+.3f} | {max(result["row_gaps"][-quarter:]):.3f} |')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', type=Path, default=Path(os.environ.get('HOME', '~')) / '.cache' / 'drp-foundry' /
                        'models' / 'smollm2-135m')
    parser.add_argument('--ramp', type=int, default=40)
    parser.add_argument('--steps', type=int, default=440)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--seq-len', type=int, default=64)
    parser.add_argument('--lr', type=float, default=1.0, help='mask and lambda learning rate (paper: 1.0)')
    parser.add_argument('--tolerance', type=float, default=0.02)
    parser.add_argument('--json', type=Path, default=None, help='write the per-step gaps here')
    parser.add_argument('--no-lm', action='store_true', help='the constraint alone, without the LM loss (no forward)')
    parser.add_argument('--table', type=Path, nargs='+', default=None,
                        help='print the docs/RESULTS.md table of these --json outputs and exit')
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(1)
    results, settled = {}, []
    for seed in args.seeds:
        start = time.perf_counter()
        result = run(args.model, seed, args.ramp, args.steps, args.batch, args.seq_len, args.lr, lm_loss=not args.no_lm)
        at = settled_at(result['gaps'], result['row_gaps'], args.ramp, args.tolerance)
        tail = result['gaps'][-(args.steps - args.ramp) // 4:]
        print(f'seed {seed}: settled {at if at is not None else "never"} steps after the ramp '
              f'({args.steps - args.ramp} post-ramp steps run); size gap at the ramp end '
              f'{result["gaps"][args.ramp - 1]:+.3f}, worst in the last quarter {max(tail, key=abs):+.3f}; '
              f'{time.perf_counter() - start:.0f} s', flush=True)
        results[seed] = {**result, 'settled_after_ramp': at}
        settled.append(math.inf if at is None else at)
    finite = [s for s in settled if s != math.inf]
    mean = statistics.mean(finite) if finite else math.inf
    print(f'settled after the ramp: {settled}; mean of the settled seeds {mean:.0f}; seeds that never settled '
          f'{len(settled) - len(finite)} of {len(settled)}')
    if args.json is not None:
        args.json.write_text(json.dumps({'args': {k: str(v) for k, v in vars(args).items()}, 'results': results}))


if __name__ == '__main__':
    main()
