"""The crossover study: from which training budget do learned masks beat one-shot pruning?

    python bench/pruning_budget.py --jobs 2                 # two single-thread processes
    python bench/pruning_budget.py --report-only            # the table and plot from the finished arms

A tiny Llama source (4 layers, hidden 128, 4 heads, FFN 384, untied, BPE vocabulary 1024: 1.1M
parameters) is pretrained on the seven domains of the embedded corpus (natural mixture, each domain
capped at 1.5M characters) until it is at least 1 nat/token below every domain's own unigram model on the
held-out split (the premise, checked and printed); the target is 4 layers, hidden 64, 2 heads, FFN 192
(31% of the source). For each total budget (optimizer steps of 16 x 64 tokens; ``--budgets``) and seed,
three paths (``bench/pruning_paths.py``: one learning-rate schedule over the budget, clipping as the
recipes, distillation of the source, alpha 0.5) share the same batches:

- ``oneshot``: activation-importance pruning on the first 64 training rows, then the pruned model trains
  on the whole budget;
- ``l0_importance``: learned masks from the one-shot model for the first 20% of the budget (mask lr 0.1),
  export, continued training on the rest;
- ``l0_constant``: learned masks from constant init (the paper; mask lr 1.0, target ramped over 20% of
  the pruning stage), export, continued training.

The learned-mask paths use the constraint the product picks at that length: the paper's Lagrangian
where the pruning stage has at least ``LAGRANGIAN_SETTLING_STEPS`` (310) steps after the ramp, the
projection (ours, with the anneal and hardening) below, where ``drp_lagrangian`` warns. Scored: the
held-out split (128 x 64 tokens per domain), uniform mean over domains of nats/token, of the final dense
model. Paired differences (same seed: same batches and calibration) learned - one-shot, with standard
errors and 95% t intervals, per budget in tokens per target parameter (pruning tokens / target
parameters; the paper: about 0.3). Each finished arm is stored in ``--work`` and skipped on a rerun.
Writes its section of docs/RESULTS.md and docs/pruning_budget.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from drp_foundry.demo.pipeline import DEMO_CORPUS
from drp_foundry.pruning.lagrangian import LAGRANGIAN_SETTLING_STEPS

# bench/ is not a package: its sibling pruning_paths.py (the loop every path trains with), loaded by file path
_spec = importlib.util.spec_from_file_location('pruning_paths', Path(__file__).resolve().with_name('pruning_paths.py'))
pruning_paths = sys.modules['pruning_paths'] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(pruning_paths)
PathSettings = pruning_paths.PathSettings
_study = pruning_paths.bench_module('scheduler_study')  # its corpus split, unigram baseline, claims, paired differences
_claim, build_data, paired = _study._claim, _study.build_data, _study.paired
unigram_cross_entropy, write_results_section = _study.unigram_cross_entropy, _study.write_results_section

REPO = Path(__file__).resolve().parents[1]
SECTION = 'pruning_budget'
PATHS = ('oneshot', 'l0_importance', 'l0_constant')
LEARNED = ('l0_importance', 'l0_constant')
SETTINGS = dict(vocab=1024, seq=64, batch=16, max_chars_per_domain=1_500_000, steer_tokens=1024, score_tokens=8192,
                model=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4),
                target=dict(layers=4, hidden=64, heads=2, intermediate=192),
                pretrain_steps=2000, pretrain_lr=3e-3, lr=1e-3, prune_fraction=0.2, distill_alpha=0.5,
                importance_mask_lr=0.1, constant_mask_lr=1.0, lambda_lr=1.0, premise_margin=1.0)
DEFAULT_BUDGETS = (40, 100, 250, 500, 1000)  # as pre-registered (docs/RESULTS.md)


# --- source ------------------------------------------------------------------------------------

def llama(data: dict, s: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=data['vocab'], max_position_embeddings=s['seq'], tie_word_embeddings=False,
                         rms_norm_eps=1e-5, bos_token_id=data['eos'], eos_token_id=data['eos'], **s['model'])
    return LlamaForCausalLM(config)


def natural_mixture(data: dict) -> list[float]:
    sizes = np.array([len(split['train']) for split in data['splits'].values()], dtype=np.float64)
    return (sizes / sizes.sum()).tolist()


def held_out(data: dict) -> dict[str, torch.Tensor]:
    return {d: split['score'] for d, split in data['splits'].items()}


def pretrain_source(data: dict, work: Path, s: dict, log=print) -> dict:
    """Pretrain the source once (cached in ``work``): its weights, held-out losses and the premise check."""
    cache = work / 'source.pt'
    if cache.exists():
        return torch.load(cache)
    torch.manual_seed(0)
    model = llama(data, s)
    train = {d: split['train'] for d, split in data['splits'].items()}
    batches = pruning_paths.training_batches(train, s['pretrain_steps'], s['batch'], 0, natural_mixture(data))
    settings = PathSettings(steps=s['pretrain_steps'], lr=s['pretrain_lr'], warmup_fraction=0.05, bf16=False)
    started = time.time()
    log(f'pretraining the source: {s["pretrain_steps"]} steps of {s["batch"]} x {s["seq"]} tokens')
    clock = pruning_paths.Clock('source', held_out(data), log)
    optimizer = pruning_paths.make_optimizer(model, settings.lr)
    pruning_paths.train_stage(clock, model, optimizer, batches, settings, stage='pretrain')
    losses = pruning_paths.evaluate(model, held_out(data))
    unigram = {d: unigram_cross_entropy(split['train'], split['score'], data['vocab'])
               for d, split in data['splits'].items()}
    gaps = {d: unigram[d] - losses[d] for d in losses}
    state = {'weights': model.state_dict(), 'losses': losses, 'unigram': unigram, 'gaps': gaps,
             'premise_met': bool(min(gaps.values()) >= s['premise_margin']),
             'params': int(sum(p.numel() for p in model.parameters())), 'seconds': round(time.time() - started, 1)}
    torch.save(state, cache)
    return state


# --- arms --------------------------------------------------------------------------------------

def constraint_for(prune_steps: int) -> str:
    """What the product picks: the Lagrangian when it has time to settle after its ramp, else the projection."""
    ramp = int(round(pruning_paths.LAGRANGIAN_RAMP_FRACTION * prune_steps))
    return 'lagrangian' if prune_steps - ramp >= LAGRANGIAN_SETTLING_STEPS else 'projection'


def arm_settings(path: str, budget: int, s: dict) -> PathSettings:
    prune_steps = int(round(s['prune_fraction'] * budget))
    mask_lr = s['importance_mask_lr'] if path == 'l0_importance' else s['constant_mask_lr']
    return PathSettings(steps=budget, prune_fraction=s['prune_fraction'], lr=s['lr'], mask_lr=mask_lr,
                        lambda_lr=s['lambda_lr'], constraint=constraint_for(prune_steps),
                        distill_alpha=s['distill_alpha'], bf16=False)


def run_arm(path: str, budget: int, seed: int, data: dict, source: dict, s: dict, log=print) -> dict:
    def load_source():
        model = llama(data, s)
        model.load_state_dict(source['weights'])
        return model

    train = {d: split['train'] for d, split in data['splits'].items()}
    batches = pruning_paths.training_batches(train, budget, s['batch'], 1000 + seed, natural_mixture(data))
    calibration = batches[:max(1, 64 // s['batch'])]  # the first 64 training rows
    settings = arm_settings(path, budget, s)
    result = pruning_paths.run_path(path, load_source, s['target'], batches, calibration, held_out(data), settings,
                                    lambda line: None, seed=seed)
    result.update(budget=budget, seed=seed, constraint=settings.constraint if path in LEARNED else None)
    result.pop('history')
    log(f'{path:>14} budget {budget:>5} seed {seed}: mean {result["mean"]:.4f} ({result["cpu_s"]:.0f} s CPU)')
    return result


def arm_file(work: Path, path: str, budget: int, seed: int) -> Path:
    return work / 'arms' / f'{path}_{budget}_{seed}.json'


def work_queue(work: Path, arms, data, source, s, log=print) -> None:
    """Run every arm neither finished nor claimed by another worker (claims: files made with O_EXCL)."""
    (work / 'arms').mkdir(parents=True, exist_ok=True)
    for path, budget, seed in arms:
        done = arm_file(work, path, budget, seed)
        if done.exists() or not _claim(done.with_suffix('.claim')):
            continue
        done.write_text(json.dumps(run_arm(path, budget, seed, data, source, s, log), indent=1))


# --- report ------------------------------------------------------------------------------------

def summarize(results: list[dict], budgets: list[int], seeds: list[int], target_params: int, s: dict) -> dict:
    """Per budget: each path's mean over seeds with its standard error, and learned - one-shot paired."""
    by = {(r['kind'] if 'kind' in r else r['key'], r['budget'], r['seed']): r for r in results}
    rows = []
    for budget in budgets:
        prune_tokens = int(round(s['prune_fraction'] * budget)) * s['batch'] * s['seq']
        row = {'budget': budget, 'tokens': budget * s['batch'] * s['seq'], 'prune_tokens': prune_tokens,
               'tokens_per_param': prune_tokens / target_params, 'paths': {}, 'diffs': {}}
        for path in PATHS:
            values = [by[(path, budget, seed)]['mean'] for seed in seeds if (path, budget, seed) in by]
            if values:
                arr = np.asarray(values)
                row['paths'][path] = {'n': len(values), 'mean': float(arr.mean()),
                                      'se': float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else math.nan,
                                      'flops': float(np.mean([by[(path, budget, seed)]['flops'] for seed in seeds
                                                              if (path, budget, seed) in by])),
                                      'constraint': next(by[(path, budget, seed)].get('constraint') for seed in seeds
                                                         if (path, budget, seed) in by)}
        for path in LEARNED:
            common = [seed for seed in seeds if (path, budget, seed) in by and ('oneshot', budget, seed) in by]
            if common:
                row['diffs'][path] = paired([by[(path, budget, seed)]['mean'] for seed in common],
                                            [by[('oneshot', budget, seed)]['mean'] for seed in common])
        rows.append(row)
    return {'rows': rows, 'crossover': {path: crossover(rows, path) for path in LEARNED}}


def crossover(rows: list[dict], path: str) -> dict | None:
    """The smallest budget from which ``path`` beats one-shot at every larger budget run (the paired 95%
    interval of learned - one-shot entirely below 0); None when no budget qualifies."""
    found = None
    for row in reversed(rows):
        diff = row['diffs'].get(path)
        if diff is None or not diff['n'] > 1 or not diff['hi'] < 0:
            break
        found = row
    return None if found is None else {'budget': found['budget'], 'tokens_per_param': found['tokens_per_param']}


def _pm(entry: dict) -> str:
    return f'{entry["mean"]:.4f} ± {entry["se"]:.4f}' if entry['n'] > 1 else f'{entry["mean"]:.4f} (n=1)'


def _diff(d: dict | None) -> str:
    if d is None:
        return '-'
    if d['n'] < 2:
        return f'{d["mean"]:+.4f} (n=1)'
    return f'{d["mean"]:+.4f} ± {d["se"]:.4f} [{d["lo"]:+.4f}, {d["hi"]:+.4f}]'


def plot(summary: dict, source_mean: float, out: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path, name in (('oneshot', 'one-shot + distillation'), ('l0_importance', 'L0 from importance + distillation'),
                       ('l0_constant', 'L0 from constant (paper) + distillation')):
        pts = [(row['tokens_per_param'], row['paths'][path]) for row in summary['rows'] if path in row['paths']]
        if pts:
            ax.errorbar([x for x, _ in pts], [e['mean'] for _, e in pts],
                        yerr=[0 if math.isnan(e['se']) else e['se'] for _, e in pts], marker='o', capsize=3, label=name)
    ax.axvline(0.3, color='grey', linestyle='--', linewidth=0.8, label="paper's ratio (~0.3)")
    ax.set_xscale('log')
    pruning_paths.finish_plot(fig, ax, out, title='Tiny Llama 1.1M -> 31%: learned masks vs one-shot by budget',
                              xlabel='pruning tokens per target parameter (pruning share 20% of the budget)',
                              ylabel='held-out loss, mean over 7 domains (nats/token)', source_mean=source_mean,
                              source_label='source (1.1M)')


def report(summary: dict, source: dict, s: dict, seeds: list[int], command: str, cpu_s: float,
           target_params: int) -> str:
    lines = ['### Results (`bench/pruning_budget.py`)', '',
             f'Command: `{command}`', '', '![held-out loss vs pruning tokens per target parameter](pruning_budget.png)', '',
             f'Source: Llama {source["params"]:,} parameters ({s["model"]}), pretrained {s["pretrain_steps"]} steps of '
             f'{s["batch"]} x {s["seq"]} tokens on the natural mixture of the seven domains; target {s["target"]} '
             f'({target_params:,} parameters, {target_params / source["params"]:.0%} of the source). Seeds {seeds} '
             f'(paired: the same batches and calibration rows for every path). Compute of all arms: '
             f'{cpu_s / 60:.1f} CPU-minutes (single-thread processes).', '',
             '**Premise** (the source at least 1 nat/token below each domain\'s own unigram model, held-out): gaps '
             + ', '.join(f'{d} {g:.2f}' for d, g in source['gaps'].items())
             + f' -> min {min(source["gaps"].values()):.2f}, **{"met" if source["premise_met"] else "NOT MET"}**. '
             f'Source held-out mean {np.mean(list(source["losses"].values())):.4f} nats/token.', '',
             '| budget (steps) | tokens | pruning tokens / target param | one-shot | L0 from importance | '
             'L0 from constant (paper) | importance - one-shot [95% CI] | constant - one-shot [95% CI] | '
             'constraint | TFLOPs one-shot / importance / constant |',
             '|---:|---:|---:|---|---|---|---|---|---|---|']
    for row in summary['rows']:
        p = row['paths']
        cells = [_pm(p[path]) if path in p else '-' for path in PATHS]
        constraint = next((p[path]['constraint'] for path in LEARNED if path in p), '-')
        flops = ' / '.join(f'{p[path]["flops"] / 1e12:.3g}' if path in p else '-' for path in PATHS)
        lines.append(f'| {row["budget"]} | {row["tokens"]:,} | {row["tokens_per_param"]:.3f} | ' + ' | '.join(cells)
                     + f' | {_diff(row["diffs"].get("l0_importance"))} | {_diff(row["diffs"].get("l0_constant"))} | '
                     f'{constraint} | {flops} |')
    lines.append('')
    lines.append('Held-out loss: mean over the seven domains, nats/token, mean ± standard error over seeds; '
                 'differences paired by seed (negative: the learned masks are better).')
    for path, name in (('l0_importance', 'L0 from importance'), ('l0_constant', 'L0 from constant')):
        found = summary['crossover'][path]
        largest = summary['rows'][-1]
        lines.append(f'- **{name}**: ' + (
            f'beats one-shot from {found["budget"]} steps ({found["tokens_per_param"]:.3f} pruning tokens per target '
            'parameter) at every larger budget run (95% interval below 0)' if found else
            f'no crossover found up to the largest budget run ({largest["budget"]} steps, '
            f'{largest["tokens_per_param"]:.3f} pruning tokens per target parameter)'))
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--corpus', default=str(DEMO_CORPUS))
    parser.add_argument('--work', default='runs/pruning_budget')
    parser.add_argument('--budgets', default=','.join(str(b) for b in DEFAULT_BUDGETS),
                        help='total budgets in optimizer steps of 16 x 64 tokens, comma-separated')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--jobs', type=int, default=2, help='processes running arms (each single-thread)')
    parser.add_argument('--pretrain-steps', type=int, default=SETTINGS['pretrain_steps'])
    parser.add_argument('--report-only', action='store_true')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--results', default=str(REPO / 'docs' / 'RESULTS.md'), help="empty: do not write it")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    s = dict(SETTINGS, pretrain_steps=args.pretrain_steps)
    budgets = sorted(int(b) for b in args.budgets.split(','))
    seeds = list(range(args.seeds))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = build_data(Path(args.corpus), work, s)
    source = pretrain_source(data, work, s)
    if not args.worker:
        print(f'source: {source["params"]:,} parameters, premise gaps (unigram - source, nats/token) '
              + ', '.join(f'{d} {g:.2f}' for d, g in source['gaps'].items())
              + f' -> {"met" if source["premise_met"] else "NOT MET"}', flush=True)
    if not source['premise_met'] and not args.report_only:
        print('premise not met: the source is too weak; pretrain longer (--pretrain-steps) before any arm runs')
        return 2
    # longest arms first, so the two processes finish together
    arms = [(path, budget, seed) for budget in reversed(budgets) for seed in seeds for path in PATHS]
    if not args.report_only:
        children = []
        if not args.worker:
            given = argv if argv is not None else sys.argv[1:]
            children = [subprocess.Popen([sys.executable, __file__, *given, '--worker']) for _ in range(args.jobs - 1)]
        work_queue(work, arms, data, source, s)
        for child in children:
            child.wait()
        if args.worker:
            return 0
    results = [json.loads(arm_file(work, *arm).read_text()) for arm in arms if arm_file(work, *arm).exists()]
    if not results:
        print('no arm has finished')
        return 1
    target_params = int(results[0]['params'])
    summary = summarize(results, budgets, seeds, target_params, s)
    command = 'python bench/pruning_budget.py' + ''.join(
        f' --{k.replace("_", "-")} {v}' for k, v in vars(args).items()
        if k in ('budgets', 'seeds', 'jobs', 'pretrain_steps', 'work') and v != parser.get_default(k))
    text = report(summary, source, s, seeds, command, sum(r['cpu_s'] for r in results), target_params)
    (work / 'summary.json').write_text(json.dumps(summary, indent=1))
    if args.results:
        plot(summary, float(np.mean(list(source['losses'].values()))), Path(args.results).parent / 'pruning_budget.png')
        write_results_section(Path(args.results), SECTION, text)
    print(text)
    print(f'wall {time.time() - started:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
