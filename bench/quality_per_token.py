"""Quality per token: SmolLM2-135M -> the demo's 50.3M target by five paths at one token budget.

    python bench/quality_per_token.py [--corpus drp_foundry/demo/corpus] [--tokens 204800] [--paths abcde]

A finished path is stored in WORK/paths/KEY.json with the settings that made it; a rerun with the
same settings reuses it (``--no-reuse`` reruns), so paths can run in separate processes (one per
core: ``--paths bc`` beside ``--paths dae``) and the table always shows every stored path.

Paths (every one sees the same training batches in the same order, from the same per-domain
MDS splits as the demo, drawn with the paper's RedPajama proportions, constant mixture):

  (a) paper L0 pruning (constant init, per-layer Lagrangian, ramp over 20% of the stage) on
      ``--prune-fraction`` of the tokens, export, continued pretraining on the rest;
  (b) (a) with logit distillation from the frozen source model in both stages;
  (c) (b) with importance-initialised masks (masks start at the activation top-k, no ramp);
  (d) one-shot activation-importance pruning (calibration: the first 64 training sequences),
      then continued pretraining with distillation on all the tokens;
  (e) the same 50.3M architecture from random init, plain LM training on the same tokens.

Training runs through the functional APIs the Composer algorithms wrap (``apply_mask_learner``,
``apply_lagrangian``, ``init_masks_from_importance``, ``apply_distillation``, ``oneshot_prune``,
``fold_and_slice``), in one process, CPU, bf16 autocast (fp32 weights), AdamW (0.9, 0.95), no
weight decay, gradient clipping 1.0, linear warm-up then cosine to 10% in every stage. Each path
is scored on the demo's per-domain eval split (16 x 128 tokens per domain) with the exported /
trained dense model, fp32, at a few points along the way (the plot) and at the end (the table).

Writes ``--work``/quality_per_token.json (every eval), quality_per_token.png (mean eval loss vs
tokens; beside docs/RESULTS.md, or in ``--work`` with ``--results ''``) and
its section of docs/RESULTS.md. The last line printed is the summary figure (the best path's
final mean eval loss).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from drp_foundry.composer.distillation import apply_distillation, load_teacher
from drp_foundry.composer.lagrangian_updater import apply_lagrangian
from drp_foundry.composer.mask_learner import apply_mask_learner, init_masks_from_importance
from drp_foundry.demo.pipeline import DEMO_CORPUS
from drp_foundry.oneshot import oneshot_prune
from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.export import fold_and_slice

REPO = Path(__file__).resolve().parents[1]

DOMAINS = ['arxiv', 'book', 'c4-rp', 'cc', 'github', 'stackexchange', 'wiki']
PROPORTIONS = [0.025, 0.045, 0.15, 0.67, 0.045, 0.02, 0.045]  # the paper's RedPajama ratios (the demo's)
TARGET = dict(layers=20, hidden=384, heads=6, kv_heads=2, intermediate=1024)  # 50,347,392 parameters
PATHS = {
    'a': 'L0 prune (paper) + continue',
    'b': '(a) + distillation',
    'c': '(b) + importance init',
    'd': 'one-shot + continue w/ distillation',
    'e': 'random init, same arch',
}
SECTION = 'quality_per_token'
DEMO_TOKENS = 200 * 4 * 128  # the default `make demo`: 200 continued-pretraining steps, batch 4, 128 tokens
ISSUE_DEMO_TOKENS = (60 + 40) * 4 * 128  # the demo when issue 14 set the budget: 60 pruning + 40 continued steps


# --- data ----------------------------------------------------------------------------------

def load_split(data_root: Path, domain: str, split: str) -> torch.Tensor:
    from streaming import LocalDataset

    dataset = LocalDataset(str(data_root / domain), split=split)
    rows = [np.asarray(dataset[i]['tokens'], dtype=np.int64) for i in range(len(dataset))]
    return torch.from_numpy(np.stack(rows))


def training_batches(train: dict[str, torch.Tensor], steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Every path's batches: a seeded domain draw per sample, each domain's samples in a seeded cycle."""
    rng = np.random.default_rng(seed)
    draws = rng.choice(len(DOMAINS), size=steps * batch_size, p=np.asarray(PROPORTIONS) / sum(PROPORTIONS))
    orders = {d: rng.permutation(len(train[d])) for d in DOMAINS}
    used = {d: 0 for d in DOMAINS}
    rows = []
    for index in draws:
        domain = DOMAINS[index]
        order = orders[domain]
        rows.append(train[domain][order[used[domain] % len(order)]])
        used[domain] += 1
        if used[domain] % len(order) == 0:
            orders[domain] = rng.permutation(len(order))
    return [torch.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


# --- evaluation ----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, eval_sets: dict[str, torch.Tensor], bf16: bool = False) -> dict[str, float]:
    """Mean next-token loss per domain (nats/token) over its eval samples; the model in eval mode."""
    was_training = model.training
    model.eval()
    losses = {}
    for domain, rows in eval_sets.items():
        total, count = 0.0, 0
        for start in range(0, len(rows), 8):
            batch = rows[start:start + 8]
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=batch).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     batch[:, 1:].reshape(-1), reduction='sum')
            total += float(loss)
            count += batch[:, 1:].numel()
        losses[domain] = total / count
    model.train(was_training)
    return losses


# --- training ------------------------------------------------------------------------------

def lr_multiplier(step: int, steps: int, warmup: int, alpha_f: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                  eps=1e-8, weight_decay=0.0)
    for group in optimizer.param_groups:
        group['initial_lr'] = lr
    return optimizer


class Run:
    """One path: its clock, its token count and its eval history."""

    def __init__(self, key: str, eval_sets, log, plot_samples: int = 8):
        self.key, self.eval_sets, self.log, self.plot_samples = key, eval_sets, log, plot_samples
        self.tokens = 0
        self.started = time.time()
        self.cpu_started = time.process_time()  # CPU seconds of this process: unlike wall time, not inflated by load
        self.history: list[dict] = []

    def record(self, model, stage: str, final: bool = False):
        """Eval along the way: the first ``plot_samples`` eval samples per domain, bf16; final: all, fp32."""
        sets = self.eval_sets if final else {d: rows[:self.plot_samples] for d, rows in self.eval_sets.items()}
        losses = evaluate(model, sets, bf16=not final)
        mean = sum(losses.values()) / len(losses)
        self.history.append({'tokens': self.tokens, 'stage': stage, 'mean': mean, 'worst': max(losses.values()),
                             'losses': losses, 'wall_s': round(time.time() - self.started, 1)})
        self.log(f'  ({self.key}) {stage:>16} tokens {self.tokens:>7,}  mean {mean:.3f}  worst {max(losses.values()):.3f}'
                 f'  [{time.time() - self.started:.0f}s]')
        return losses


def train_stage(run: Run, model, optimizer, batches, *, warmup_fraction: float, teacher=None, alpha: float = 0.5,
                temperature: float = 1.0, lagrangian_warmup: int | None = None, eval_every: int = 0,
                stage: str = 'train'):
    steps = len(batches)
    warmup = max(1, int(round(warmup_fraction * steps)))
    model.train()
    for step, batch in enumerate(batches):
        multiplier = lr_multiplier(step, steps, warmup)
        for group in optimizer.param_groups:
            group['lr'] = group['initial_lr'] * multiplier
        with torch.autocast('cpu', dtype=torch.bfloat16):
            outputs = model(input_ids=batch, labels=batch)
            loss = outputs.loss
            if teacher is not None:
                loss, _ = apply_distillation(loss, outputs.loss, outputs.logits, teacher, {'input_ids': batch,
                                             'labels': batch}, alpha, temperature)
        if lagrangian_warmup is not None:
            loss = apply_lagrangian(model, loss, step, lagrangian_warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g['params']
                                        if g.get('drp_group') is None], 1.0)
        optimizer.step()
        run.tokens += batch.numel()
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            run.record(model, f'{stage} {step + 1}')


# Everything that changes a path's numbers; a stored result is reused only under the same values.
SETTING_KEYS = ('corpus', 'source', 'tokens', 'batch_size', 'seq_len', 'prune_fraction', 'lr', 'random_lr', 'mask_lr',
                'lambda_lr', 'alpha', 'temperature', 'evals', 'plot_eval_samples', 'seed')


def path_settings(args) -> dict:
    values = {key: getattr(args, key) for key in SETTING_KEYS}
    values['corpus'] = str(Path(values['corpus']).resolve())
    values['source'] = str(Path(values['source']).resolve())
    return values


def stored_result(store: Path, key: str, settings: dict) -> dict | None:
    """The finished result of path ``key`` under ``settings``, or None (absent or other settings)."""
    path = store / f'{key}.json'
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record['result'] if record.get('settings') == settings else None


def run_path(key: str, args, source_dir: Path, batches, calibration, eval_sets, log) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    run = Run(key, eval_sets, log, args.plot_eval_samples)
    distil = key in ('b', 'c', 'd')
    teacher = load_teacher(source_dir) if distil else None
    prune_steps = int(round(args.prune_fraction * len(batches))) if key in ('a', 'b', 'c') else 0
    cpt_batches = batches[prune_steps:]
    eval_every = max(1, len(cpt_batches) // args.evals) if args.evals else 0

    if key in ('a', 'b', 'c'):
        model = AutoModelForCausalLM.from_pretrained(str(source_dir), torch_dtype=torch.float32)
        optimizer = make_optimizer(model, args.lr)
        masks = apply_mask_learner(model, TARGET, optimizer, mask_lr=args.mask_lr, lambda_lr=args.lambda_lr,
                                   init='importance' if key == 'c' else 'constant')
        if key == 'c':
            init_masks_from_importance(model, [{'input_ids': b} for b in calibration])
            run.record(model, 'importance init')
        train_stage(run, model, optimizer, batches[:prune_steps], warmup_fraction=0.1, teacher=teacher,
                    alpha=args.alpha, temperature=args.temperature,
                    lagrangian_warmup=int(round(0.2 * prune_steps)), stage='prune')
        expected = float(masks.size_terms(detach=True).num_parameters)
        counts = masks.keep_counts('expected')
        uneven = {k: v.tolist() for k, v in counts.items() if torch.is_tensor(v) and len(set(v.tolist())) > 1}
        log(f'  ({key}) end of pruning: expected size {expected / 1e6:.1f}M, eval-mode counts '
            f'{ {k: (v if isinstance(v, int) else sorted(set(v.tolist()))) for k, v in counts.items()} }')
        model.eval()
        pruned, _ = fold_and_slice(model, masks.deterministic('target'))
        del model, optimizer
        model = pruned.float()
        run.record(model, 'exported')
        run.history[-1]['expected_params_at_export'] = expected
        run.history[-1]['uneven_layers'] = uneven
    elif key == 'd':
        source = AutoModelForCausalLM.from_pretrained(str(source_dir), torch_dtype=torch.float32)
        model, _, _ = oneshot_prune(source, TARGET, [row for batch in calibration for row in batch])
        del source
        run.record(model, 'one-shot')
    else:
        config = AutoConfig.from_pretrained(str(source_dir))
        arch = DecoderArchitecture.from_hf_config(config)
        pruned_arch = arch.pruned(TargetArchitecture(**TARGET))
        for name, value in (('num_hidden_layers', pruned_arch.num_layers), ('hidden_size', pruned_arch.hidden_size),
                            ('num_attention_heads', pruned_arch.num_heads),
                            ('num_key_value_heads', pruned_arch.num_kv_heads),
                            ('intermediate_size', pruned_arch.intermediate_size), ('head_dim', pruned_arch.head_dim)):
            setattr(config, name, value)
        model = AutoModelForCausalLM.from_config(config, attn_implementation='sdpa', torch_dtype=torch.float32)
        run.record(model, 'random init')
    model.train()
    optimizer = make_optimizer(model, args.random_lr if key == 'e' else args.lr)
    train_stage(run, model, optimizer, cpt_batches, warmup_fraction=0.03 if key != 'e' else 0.1, teacher=teacher,
                alpha=args.alpha, temperature=args.temperature, eval_every=eval_every, stage='continue')
    final = run.record(model, 'final', final=True)
    params = sum(p.numel() for p in model.parameters())
    return {'key': key, 'name': PATHS[key], 'tokens': run.tokens, 'prune_tokens': prune_steps * batches[0].numel(),
            'final': final, 'mean': sum(final.values()) / len(final), 'worst': max(final.values()),
            'wall_s': round(time.time() - run.started, 1), 'cpu_s': round(time.process_time() - run.cpu_started, 1),
            'params': params, 'history': run.history}


# --- report --------------------------------------------------------------------------------

def table(results: list[dict], source: dict[str, float]) -> str:
    head = '| path | ' + ' | '.join(DOMAINS) + ' | mean | worst | tokens | wall (s) | CPU (s) | load |'
    lines = [head, '|' + '---|' * (len(DOMAINS) + 7)]
    lines.append('| source SmolLM2-135M (134.5M) | ' + ' | '.join(f'{source[d]:.3f}' for d in DOMAINS)
                 + f' | {sum(source.values()) / len(source):.3f} | {max(source.values()):.3f} | - | - | - | - |')
    for r in results:
        lines.append(f'| ({r["key"]}) {r["name"]} | ' + ' | '.join(f'{r["final"][d]:.3f}' for d in DOMAINS)
                     + f' | **{r["mean"]:.3f}** | {r["worst"]:.3f} | {r["tokens"]:,} | {r["wall_s"]:.0f} | '
                     + (f'{r["cpu_s"]:.0f}' if 'cpu_s' in r else 'not recorded') + ' | '
                     + ' / '.join(f'{x:.1f}' for x in r.get('load_average', [])) + ' |')
    return '\n'.join(lines)


def plot(results: list[dict], source_mean: float, out: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs = [h['tokens'] for h in r['history']]
        ax.plot(xs, [h['mean'] for h in r['history']], marker='o', label=f'({r["key"]}) {r["name"]}')
    ax.axhline(source_mean, color='grey', linestyle=':', label='source 135M')
    ax.set_xlabel('training tokens')
    ax.set_ylabel('mean per-domain eval loss (nats/token)')
    ax.set_title('SmolLM2-135M -> 50.3M: quality per token')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_section(path: Path, body: str) -> None:
    begin, end = f'<!-- BEGIN {SECTION} -->', f'<!-- END {SECTION} -->'
    text = path.read_text() if path.exists() else '# Measured results\n\nEach section is written by the script named in it.\n'
    block = f'{begin}\n{body.rstrip()}\n{end}'
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + '\n\n' + block + '\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def report(args, parser, results, source_losses, png, out_json, tokens, steps, started) -> None:
    """Plot, and write the table into docs/RESULTS.md (finished paths; unfinished ones are named)."""
    plot(results, sum(source_losses.values()) / len(source_losses), png)
    # the paths missing from WORK/paths are run by this command; finished ones are reused
    command = (f'python bench/quality_per_token.py --corpus {args.corpus}'
               + ''.join(f' --{k.replace("_", "-")} {v}' for k, v in vars(args).items()
                         if k in ('tokens', 'threads', 'prune_fraction', 'lr') and v != parser.get_default(k)))
    body = ['## Quality per token (`bench/quality_per_token.py`)', '',
            f'`{command}` (every eval: `{args.work}/{out_json.name}`).', '',
            f'![mean eval loss vs training tokens, every path]({png.name})', '',
            f'SmolLM2-135M -> 20 layers / hidden 384 / 6q-2kv heads / FFN 1024 (50,347,392 parameters). '
            f'Every path: {tokens:,} training tokens ({steps} steps x {args.batch_size} x {args.seq_len}; '
            f'{tokens / DEMO_TOKENS:.0f}x the {DEMO_TOKENS:,} of `make demo`: 200 continued steps x 4 x 128; '
            f'{tokens / ISSUE_DEMO_TOKENS:.0f}x the {ISSUE_DEMO_TOKENS:,} of the demo when this study was set up), the same batches in the same order (paper RedPajama proportions, constant mixture, '
            f'no data scheduler), bf16 autocast on CPU, torch threads {args.threads}, model lr {args.lr} '
            f'((e): {args.random_lr}), mask/lambda lr {args.mask_lr}/{args.lambda_lr}, distillation alpha '
            f'{args.alpha}, T {args.temperature}; (a)-(c) prune on {args.prune_fraction:.0%} of the tokens. '
            f'Eval: per-domain held-out split of the demo (16 x {args.seq_len} tokens per domain), fp32, '
            f'nats/token, of the exported dense model (plot points: the first {args.plot_eval_samples} samples per '
            f'domain, bf16). One seed ({args.seed}). Wall time per path on a '
            f'{os.cpu_count()}-core CPU machine; "load" is the 1-minute load average at the start / end of the '
            f'path (above {args.threads} means other work shared the cores); "CPU" is the CPU time of the path\'s '
            f'process (recorded since this column was added), the cost figure that load does not inflate.', '',
            table(results, source_losses), '']
    for r in results:
        exported = [h for h in r['history'] if h['stage'] == 'exported']
        if exported and 'expected_params_at_export' in exported[0]:
            body.append(f'- ({r["key"]}) at export: expected size {exported[0]["expected_params_at_export"] / 1e6:.1f}M; '
                        f'layers with a count other than the target in eval mode: '
                        f'{exported[0]["uneven_layers"] or "none"}')
    missing = [f'({key}) {PATHS[key]}' for key in PATHS if key not in {r['key'] for r in results}]
    if missing:
        body.append(f'- **not finished** when this section was written: {", ".join(missing)}')
    body.append(f'- cost: the paths took {sum(r["wall_s"] for r in results):.0f} s of wall time in all (the '
                f'wall column); a rerun reuses every stored path whose settings match, `--no-reuse` trains them again')
    if args.results:
        write_section(Path(args.results), '\n'.join(body))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--corpus', default=str(DEMO_CORPUS), help='folder of <domain>.jsonl[.zst] files (default: the embedded demo corpus)')
    parser.add_argument('--source', default=str(REPO / 'models' / 'smollm2-135m'))
    parser.add_argument('--work', default='runs/qpt')
    parser.add_argument('--tokens', type=int, default=204_800, help='training tokens per path (default: 4x the 51,200 of the demo when issue 14 was '
                             'filed; 2x the 102,400 of the demo now)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--seq-len', type=int, default=128)
    parser.add_argument('--prune-fraction', type=float, default=0.2, help='share of the tokens spent pruning (a-c)')
    parser.add_argument('--lr', type=float, default=3e-4, help='model lr of the pruned / pruning paths')
    parser.add_argument('--random-lr', type=float, default=1e-3, help='lr of path (e), from random init')
    parser.add_argument('--mask-lr', type=float, default=1.0)
    parser.add_argument('--lambda-lr', type=float, default=1.0)
    parser.add_argument('--alpha', type=float, default=0.5)
    parser.add_argument('--temperature', type=float, default=1.0)
    parser.add_argument('--evals', type=int, default=3, help='evals along continued pretraining (plot points)')
    parser.add_argument('--plot-eval-samples', type=int, default=8,
                        help='eval samples per domain for the evals along the way (bf16); the final eval uses all')
    parser.add_argument('--paths', default='abcde', help='paths to run; the table shows every path with a stored result')
    parser.add_argument('--no-reuse', dest='reuse', action='store_false',
                        help='rerun paths that have a stored result (WORK/paths/KEY.json) with the same settings')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--seed', type=int, default=17)
    parser.add_argument('--results', default=str(REPO / 'docs' / 'RESULTS.md'), help='empty: do not write it')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    started = time.time()
    from data_prep.build_domain_mds import PrepSettings, build_domain_mds

    data_root = work / 'data'
    build_domain_mds(args.corpus, data_root, tokenizer=args.source, overwrite=True,
                     settings=PrepSettings(max_seq_len=args.seq_len, min_eval_samples=8, max_eval_samples=16))
    train = {d: load_split(data_root, d, 'train') for d in DOMAINS}
    eval_sets = {d: load_split(data_root, d, 'eval') for d in DOMAINS}
    steps = args.tokens // (args.batch_size * args.seq_len)
    batches = training_batches(train, steps, args.batch_size, args.seed)
    calibration = batches[:max(1, 64 // args.batch_size)]  # the first 64 training sequences
    tokens = steps * args.batch_size * args.seq_len
    log(f'{steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} training tokens per path; '
        f'eval {sum(len(v) for v in eval_sets.values())} x {args.seq_len} tokens; threads {args.threads}')

    from transformers import AutoModelForCausalLM

    source_json = work / f'source_losses_{args.seq_len}.json'
    if source_json.exists():  # the source model does not change between reruns on the same data
        source_losses = json.loads(source_json.read_text())
    else:
        source_model = AutoModelForCausalLM.from_pretrained(args.source, torch_dtype=torch.float32)
        source_losses = evaluate(source_model, eval_sets)
        del source_model
        source_json.write_text(json.dumps(source_losses))
    log(f'source mean {sum(source_losses.values()) / len(source_losses):.3f}')

    out_json = work / 'quality_per_token.json'
    # the plot sits beside the results page it belongs to (committed with it), else in WORK
    png = (Path(args.results).resolve().parent if args.results else work) / 'quality_per_token.png'
    store = work / 'paths'
    store.mkdir(exist_ok=True)
    settings = path_settings(args)
    for key in args.paths:
        if args.reuse and stored_result(store, key, settings) is not None:
            log(f'path ({key}) {PATHS[key]}: reusing {store / (key + ".json")} (same settings)')
            continue
        log(f'path ({key}) {PATHS[key]}')
        load_before = os.getloadavg()[0]
        result = run_path(key, args, Path(args.source), batches, calibration, eval_sets, log)
        result['load_average'] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        (store / f'{key}.json').write_text(json.dumps({'settings': settings, 'result': result}, indent=2))
        log(f'  ({key}) final mean {result["mean"]:.3f} worst {result["worst"]:.3f} ({result["wall_s"]:.0f}s)')
        results = [stored_result(store, k, settings) for k in PATHS]
        results = [r for r in results if r is not None]
        out_json.write_text(json.dumps({'args': vars(args), 'source': source_losses, 'results': results}, indent=2))
        report(args, parser, results, source_losses, png, out_json, tokens, steps, started)

    results = [r for r in (stored_result(store, k, settings) for k in PATHS) if r is not None]
    if not results:
        log('no path has a result yet')
        return 1
    out_json.write_text(json.dumps({'args': vars(args), 'source': source_losses, 'results': results}, indent=2))
    report(args, parser, results, source_losses, png, out_json, tokens, steps, started)
    best = min(results, key=lambda r: r['mean'])
    log(table(results, source_losses))
    log(f'best path ({best["key"]}) {best["name"]}: mean eval loss {best["mean"]:.3f} nats at {best["tokens"]:,} tokens')
    return 0


if __name__ == '__main__':
    sys.exit(main())
