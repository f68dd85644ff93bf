"""Quality per token: SmolLM2-135M -> the demo's 50.3M target by several paths at one token budget.

    python bench/quality_per_token.py [--corpus drp_foundry/demo/corpus] [--tokens 102400] [--paths c,d,d2]

A finished path is stored in WORK/paths/KEY.json with the settings that made it; a rerun with the
same settings reuses it (``--no-reuse`` reruns), so paths can run in separate processes (one per
core: ``--paths c`` beside ``--paths d2,d``) and the table always shows every stored path.

Paths (every one sees the same training batches in the same order, from the same per-domain
MDS splits as the demo, drawn with the paper's RedPajama proportions, constant mixture; the
training loop, its one learning-rate schedule over the budget, its clipping and its FLOP count are
``bench/pruning_paths.py``'s):

  (a) the paper: L0 masks from constant init, the Lagrangian (target ramped over 20% of the pruning
      stage) on ``--prune-fraction`` of the tokens, export, continued pretraining on the rest;
  (b) (a) with logit distillation from the frozen source model in both stages;
  (c) L0 masks from importance init (the one-shot model: 0/1 masks at the log-alpha clamps), the
      projection constraint (ours; what the product picks below the Lagrangian's settling length)
      with the anneal and hardening, mask lr ``--importance-mask-lr``, distillation in both stages;
  (d) one-shot activation-importance pruning (calibration: the first 64 training sequences), then
      continued pretraining with distillation on all the tokens;
  (d2) the control of (c), shown as (d'): the one-shot masks held fixed while the masked source trains
      for the pruning share (the same stages, schedule and FLOPs as (c), without mask learning);
  (e) the same 50.3M architecture from random init, plain LM training on the same tokens.

Each path is scored on the demo's per-domain eval split (16 x 128 tokens per domain) with the
exported / trained dense model, fp32, at a few points along the way (the plot) and at the end (the
table).

Writes ``--work``/quality_per_token.json (every eval), quality_per_token.png (mean eval loss vs
tokens; beside docs/RESULTS.md, or in ``--work`` with ``--results ''``) and
its section of docs/RESULTS.md. The last line printed is the summary figure (the best path's
final mean eval loss).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from drp_foundry.demo.pipeline import DEMO_CORPUS

# bench/ is not a package: its sibling pruning_paths.py (the loop every path trains with), loaded by file path
_spec = importlib.util.spec_from_file_location('pruning_paths', Path(__file__).resolve().with_name('pruning_paths.py'))
pruning_paths = sys.modules['pruning_paths'] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(pruning_paths)
PathSettings = pruning_paths.PathSettings

REPO = Path(__file__).resolve().parents[1]

DOMAINS = ['arxiv', 'book', 'c4-rp', 'cc', 'github', 'stackexchange', 'wiki']
PROPORTIONS = [0.025, 0.045, 0.15, 0.67, 0.045, 0.02, 0.045]  # the paper's RedPajama ratios (the demo's)
TARGET = dict(layers=20, hidden=384, heads=6, kv_heads=2, intermediate=1024)  # 50,347,392 parameters
PATHS = {
    'a': 'L0 prune (paper, Lagrangian) + continue',
    'b': '(a) + distillation',
    'c': 'L0 from importance init, projection + distillation',
    'd': 'one-shot + continue w/ distillation',
    'd2': 'one-shot masks fixed in the pruning share + distillation (control of c)',
    'e': 'random init, same arch',
}
PATH_KINDS = {  # key: (pruning_paths path, settings that differ from the shared ones)
    'a': ('l0_constant', dict(constraint='lagrangian', distill_alpha=0.0)),
    'b': ('l0_constant', dict(constraint='lagrangian')),
    'c': ('l0_importance', dict(constraint='projection')),
    'd': ('oneshot', {}),
    'd2': ('oneshot_fixed', {}),
    'e': ('random', dict(distill_alpha=0.0, warmup_fraction=0.1)),
}
SECTION = 'quality_per_token'
DEMO_TOKENS = 200 * 4 * 128  # the default `make demo`: 200 continued-pretraining steps, batch 4, 128 tokens


# --- data ----------------------------------------------------------------------------------

def load_split(data_root: Path, domain: str, split: str) -> torch.Tensor:
    from streaming import LocalDataset

    dataset = LocalDataset(str(data_root / domain), split=split)
    rows = [np.asarray(dataset[i]['tokens'], dtype=np.int64) for i in range(len(dataset))]
    return torch.from_numpy(np.stack(rows))


# --- paths -------------------------------------------------------------------------------

def path_config(key: str, args) -> tuple[str, PathSettings]:
    """(the path of ``pruning_paths`` that key runs, its settings) under ``args``."""
    kind, overrides = PATH_KINDS[key]
    values = dict(steps=args.tokens // (args.batch_size * args.seq_len), prune_fraction=args.prune_fraction,
                  lr=args.lr, mask_lr=args.mask_lr, lambda_lr=args.lambda_lr, distill_alpha=args.alpha,
                  temperature=args.temperature, bf16=args.precision == 'bf16')
    values.update(overrides)
    if key == 'c':
        values['mask_lr'] = args.importance_mask_lr
    if key == 'e':
        values['lr'] = args.random_lr
    return kind, PathSettings(**values)


# Everything that changes a path's numbers; a stored result is reused only under the same values.
SETTING_KEYS = ('corpus', 'source', 'tokens', 'batch_size', 'seq_len', 'prune_fraction', 'lr', 'random_lr', 'mask_lr',
                'importance_mask_lr', 'lambda_lr', 'alpha', 'temperature', 'evals', 'plot_eval_samples', 'seed',
                'precision')
BENCH_VERSION = 2  # 2: one schedule over the budget, every parameter clipped, hard importance init, projection


def path_settings(args) -> dict:
    values = {key: getattr(args, key) for key in SETTING_KEYS}
    values['corpus'] = str(Path(values['corpus']).resolve())
    values['source'] = str(Path(values['source']).resolve())
    values['bench_version'] = BENCH_VERSION
    return values


def stored_result(store: Path, key: str, settings: dict) -> dict | None:
    """The finished result of path ``key`` under ``settings``, or None (absent or other settings)."""
    path = store / f'{key}.json'
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record['result'] if record.get('settings') == settings else None


def run_path(key: str, args, source_dir: Path, batches, calibration, eval_sets, log) -> dict:
    from transformers import AutoModelForCausalLM

    kind, settings = path_config(key, args)

    def load_source():
        return AutoModelForCausalLM.from_pretrained(str(source_dir), torch_dtype=torch.float32)

    result = pruning_paths.run_path(kind, load_source, TARGET, batches, calibration, eval_sets, settings, log,
                                    seed=args.seed, evals=args.evals, plot_samples=args.plot_eval_samples)
    result.update(key=key, name=PATHS[key], kind=kind)
    return result


# --- report --------------------------------------------------------------------------------

def label(key: str) -> str:
    return "(d')" if key == 'd2' else f'({key})'


def table(results: list[dict], source: dict[str, float]) -> str:
    head = ('| path | ' + ' | '.join(DOMAINS) + ' | mean | worst | tokens | of which pruning | training PFLOPs | '
            'wall (s) | CPU (s) | load |')
    lines = [head, '|' + '---|' * (len(DOMAINS) + 9)]
    lines.append('| source SmolLM2-135M (134.5M) | ' + ' | '.join(f'{source[d]:.3f}' for d in DOMAINS)
                 + f' | {sum(source.values()) / len(source):.3f} | {max(source.values()):.3f} | - | - | - | - | - | - |')
    for r in results:
        name = r['name'].removeprefix("(d') ")
        flops = f'{r["flops"] / 1e15:.2f}' if 'flops' in r else 'not recorded'
        lines.append(f'| {label(r["key"])} {name} | ' + ' | '.join(f'{r["final"][d]:.3f}' for d in DOMAINS)
                     + f' | **{r["mean"]:.3f}** | {r["worst"]:.3f} | {r["tokens"]:,} | {r.get("prune_tokens", 0):,} | '
                     + f'{flops} | {r["wall_s"]:.0f} | '
                     + (f'{r["cpu_s"]:.0f}' if 'cpu_s' in r else 'not recorded') + ' | '
                     + ' / '.join(f'{x:.1f}' for x in r.get('load_average', [])) + ' |')
    return '\n'.join(lines)


def fidelity_notes(results: list[dict]) -> list[str]:
    """Per masked path: expected vs target size at export, eval-mode counts of the kept layers, masked vs exported."""
    notes = []
    for r in results:
        if 'expected_params_at_export' not in r:
            continue
        masked = sum(r['masked_eval'].values()) / len(r['masked_eval'])
        if r.get('kind', PATH_KINDS[r['key']][0]) == 'oneshot_fixed':  # never projected: its eval-mode counts say nothing
            notes.append(f'- {label(r["key"])}: the masks held fixed (the export\'s 0/1 masks in every training forward), so '
                         f'the exported model is the one trained; mean eval loss at export {sum(r["exported_eval"].values()) / len(r["exported_eval"]):.3f}')
            continue
        exported = sum(r['exported_eval'].values()) / len(r['exported_eval'])
        notes.append(f'- {label(r["key"])} at export: expected size {r["expected_params_at_export"] / 1e6:.3f}M against '
                     f'the {r["target_params"] / 1e6:.3f}M target; eval-mode counts of the kept layers '
                     f'{r["kept_layer_counts"]}; mean eval loss masked (as trained) {masked:.3f}, exported {exported:.3f}')
    return notes


def plot(results: list[dict], source_mean: float, out: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs = [h['tokens'] for h in r['history']]
        ax.plot(xs, [h['mean'] for h in r['history']], marker='o', label=f'{label(r["key"])} {r["name"]}')
    pruning_paths.finish_plot(fig, ax, out, title='SmolLM2-135M -> 50.3M: quality per token', xlabel='training tokens',
                              ylabel='mean per-domain eval loss (nats/token)', source_mean=source_mean,
                              source_label='source 135M')


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
                         if k in ('tokens', 'threads', 'prune_fraction', 'lr') and v != parser.get_default(k))
               + f' --paths {",".join(r["key"] for r in results)}')  # the stored paths it shows (reused)
    body = ['## Quality per token (`bench/quality_per_token.py`)', '',
            f'`{command}` (every eval: `{args.work}/{out_json.name}`).', '',
            f'![mean eval loss vs training tokens, every path]({png.name})', '',
            f'SmolLM2-135M -> 20 layers / hidden 384 / 6q-2kv heads / FFN 1024 (50,347,392 parameters). '
            f'Every path: {tokens:,} training tokens ({steps} steps x {args.batch_size} x {args.seq_len}; '
            f'{tokens / DEMO_TOKENS:g}x the {DEMO_TOKENS:,} of `make demo`: 200 continued steps x 4 x 128), the same '
            f'batches in the same order (paper RedPajama proportions, constant mixture, no data scheduler), one '
            f'learning-rate schedule over the whole budget for every path (warm-up 3%, cosine to 10%; (e): warm-up '
            f'10%), every trained parameter clipped to norm 1.0 (masks and multipliers too, as the recipes\' '
            f'`gradient_clipping`), training precision {args.precision} on CPU, torch threads {args.threads}, model lr {args.lr} '
            f'((e): {args.random_lr}), mask/lambda lr {args.mask_lr}/{args.lambda_lr} ((c): mask lr '
            f'{args.importance_mask_lr}), distillation alpha {args.alpha}, T {args.temperature}; the masked paths prune '
            f'on {args.prune_fraction:.0%} of the tokens. Training FLOPs: `bench/pruning_paths.py` (3 x forward of '
            f'the trained model, the masked source during pruning, plus the teacher\'s forward when distilled). '
            f'Eval: per-domain held-out split of the demo (16 x {args.seq_len} tokens per domain), fp32, '
            f'nats/token, of the exported dense model (plot points: the first {args.plot_eval_samples} samples per '
            f'domain, bf16). One seed ({args.seed}). Wall time per path on a '
            f'{os.cpu_count()}-core CPU machine; "load" is the 1-minute load average at the start / end of the '
            f'path (above {args.threads} means other work shared the cores); "CPU" is the CPU time of the path\'s '
            f'process, the cost figure that load does not inflate.', '',
            table(results, source_losses), '']
    body.extend(fidelity_notes(results))
    missing = [f'{label(key)} {PATHS[key]}' for key in PATHS if key not in {r['key'] for r in results}]
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
    parser.add_argument('--tokens', type=int, default=DEMO_TOKENS,
                        help="training tokens per path (default: the 102,400 of `make demo`'s continued pretraining)")
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--seq-len', type=int, default=128)
    parser.add_argument('--prune-fraction', type=float, default=0.2, help='share of the tokens spent with masks (a, b, c, d2)')
    parser.add_argument('--lr', type=float, default=3e-4, help='model lr of the pruned / pruning paths')
    parser.add_argument('--random-lr', type=float, default=1e-3, help='lr of path (e), from random init')
    parser.add_argument('--mask-lr', type=float, default=1.0)
    parser.add_argument('--importance-mask-lr', type=float, default=0.1,
                        help="mask lr of (c) (the demo's with importance init: it holds the one-shot start)")
    parser.add_argument('--lambda-lr', type=float, default=1.0)
    parser.add_argument('--alpha', type=float, default=0.5)
    parser.add_argument('--temperature', type=float, default=1.0)
    parser.add_argument('--evals', type=int, default=3, help='evals along continued pretraining (plot points)')
    parser.add_argument('--plot-eval-samples', type=int, default=8,
                        help='eval samples per domain for the evals along the way (bf16); the final eval uses all')
    parser.add_argument('--paths', default=','.join(PATHS),
                        help='comma-separated paths to run; the table shows every path with a stored result')
    parser.add_argument('--no-reuse', dest='reuse', action='store_false',
                        help='rerun paths that have a stored result (WORK/paths/KEY.json) with the same settings')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--precision', choices=('auto', 'fp32', 'bf16'), default='auto',
                        help='training precision: bf16 autocast or fp32; auto: bf16 where the CPU has bf16 '
                             'matrix instructions (the demo\'s rule)')
    parser.add_argument('--seed', type=int, default=17)
    parser.add_argument('--results', default=str(REPO / 'docs' / 'RESULTS.md'), help='empty: do not write it')
    args = parser.parse_args(argv)
    from drp_foundry.demo.pipeline import resolve_precision

    args.precision = resolve_precision(args.precision)
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

    data_root = work / f'data_{args.seq_len}'
    if not all((data_root / d / 'eval' / 'index.json').exists() for d in DOMAINS):  # a second process reuses it
        build_domain_mds(args.corpus, data_root, tokenizer=args.source, overwrite=True,
                         settings=PrepSettings(max_seq_len=args.seq_len, min_eval_samples=8, max_eval_samples=16))
    train = {d: load_split(data_root, d, 'train') for d in DOMAINS}
    eval_sets = {d: load_split(data_root, d, 'eval') for d in DOMAINS}
    steps = args.tokens // (args.batch_size * args.seq_len)
    batches = pruning_paths.training_batches(train, steps, args.batch_size, args.seed, PROPORTIONS)
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
        source_losses = pruning_paths.evaluate(source_model, eval_sets)
        del source_model
        source_json.write_text(json.dumps(source_losses))
    log(f'source mean {sum(source_losses.values()) / len(source_losses):.3f}')

    out_json = work / 'quality_per_token.json'
    # the plot sits beside the results page it belongs to (committed with it), else in WORK
    png = (Path(args.results).resolve().parent if args.results else work) / 'quality_per_token.png'
    store = work / 'paths'
    store.mkdir(exist_ok=True)
    settings = path_settings(args)
    keys = [key.strip() for key in args.paths.split(',') if key.strip()]
    unknown = [key for key in keys if key not in PATHS]
    if unknown:
        parser.error(f'--paths: unknown {unknown}; choose from {",".join(PATHS)}')
    for key in keys:
        if args.reuse and stored_result(store, key, settings) is not None:
            log(f'path {label(key)} {PATHS[key]}: reusing {store / (key + ".json")} (same settings)')
            continue
        log(f'path {label(key)} {PATHS[key]}')
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
    log(f'best path {label(best["key"])} {best["name"]}: mean eval loss {best["mean"]:.3f} nats at {best["tokens"]:,} tokens')
    return 0


if __name__ == '__main__':
    sys.exit(main())
