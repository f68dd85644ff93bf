"""Scheduler study: do the data-scheduling policies help where the paper says they matter? A CPU miniature.

Two presets (Composer Trainer, drp-foundry's own algorithms and callback, all on the embedded corpus):

``--preset multilingual`` (default; pre-registered in docs/RESULTS.md, "Scheduler study, multilingual
regime"): the paper's section 5.3 regime. Six "languages" of very different sizes from the embedded corpus
(EN = c4-rp + cc, QA = stackexchange, CODE = github, TEX = arxiv, BG = wiki, XG = the first 200k characters
of book through a Greek-letter cipher), a byte-level BPE (vocab 1024) trained on the natural mixture, a
1.1M-parameter source pretrained on the natural mixture, pruned to ~30% (192 steps, eval every 4), exported
and continued (480 steps, eval every 8) under each policy, p0 = size^0.3, the source's steer losses as the
references; premise gates G1/G2, M1 (worst language) and M2 (mean) in nats per character and per token,
paired differences with standard errors and 95% t intervals, and the pre-registered reading.

    python bench/scheduler_study.py --seeds 4 --jobs 2          # two single-thread processes
    python bench/scheduler_study.py --seeds 4 --report-only     # the table from the finished arms

``--preset near-uniform`` (the earlier study, kept for comparison): the 7 RedPajama domains with sizes
capped, references = a constant-policy pilot's own final losses (constant is optimal by construction).

    python bench/scheduler_study.py --preset near-uniform --work runs/scheduler_study

Each finished stage is cached in --work (JSON / .pt) and skipped on a rerun with the same settings; the
script writes its section of docs/RESULTS.md (not with --no-results).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from drp_foundry.demo.pipeline import DEMO_CORPUS
from drp_foundry.scheduling.reference_losses import pilot_reference_losses
from drp_foundry.scheduling.reference_ratio import temperature_smoothed_ratio

DOMAINS = ['arxiv', 'book', 'c4-rp', 'cc', 'github', 'stackexchange', 'wiki']
POLICIES = ['constant', 'sheared', 'dro', 'drpruning']
SECTION = 'scheduler_study'

SETTINGS = dict(
    vocab=1024, seq=64, batch=16, max_chars_per_domain=1_500_000,
    steer_tokens=1024, score_tokens=8192,
    model=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=3,
               num_key_value_heads=3),
    target=dict(layers=3, hidden=56, heads=2, intermediate=160),
    pretrain_steps=400, pretrain_lr=3e-3,
    prune_steps=128, prune_lr=1e-3, mask_lr=0.3, lambda_lr=0.1,
    continue_steps=96, continue_lr=1e-3,
    eval_every=8, ratio_exponent=0.3,
)


# --- data --------------------------------------------------------------------------------------

def read_docs(corpus: Path, domain: str, max_chars: int) -> list[str]:
    docs, total = [], 0
    for record in corpus_records(corpus, domain):
        text = record.get('text', '')
        if text:
            docs.append(text[:max_chars - total])
            total += len(docs[-1])
        if total >= max_chars:
            break
    return docs


def build_data(corpus: Path, work: Path, s: dict) -> dict:
    cache = work / 'data.pt'
    if cache.exists():
        return torch.load(cache)
    from transformers import AutoTokenizer

    from data_prep.tokenizer import train_bpe_tokenizer

    docs = {d: read_docs(corpus, d, s['max_chars_per_domain']) for d in DOMAINS}
    tok_dir = train_bpe_tokenizer((t for d in DOMAINS for t in docs[d]), s['vocab'], work / 'tokenizer')
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    splits = {}
    for d in DOMAINS:
        order = list(range(len(docs[d])))
        random.Random(f'order-{d}').shuffle(order)
        ids: list[int] = []
        for i in order:
            ids.extend(tokenizer(docs[d][i])['input_ids'] + [tokenizer.eos_token_id])
        seqs = torch.tensor(ids[:len(ids) // s['seq'] * s['seq']], dtype=torch.long).view(-1, s['seq'])
        n_score, n_steer = s['score_tokens'] // s['seq'], s['steer_tokens'] // s['seq']
        n_train = len(seqs) - n_score - n_steer
        if n_train < 8 * n_steer:
            raise ValueError(f'domain {d}: only {len(seqs)} sequences of {s["seq"]} tokens; too few for the splits')
        splits[d] = {'train': seqs[:n_train], 'steer': seqs[n_train:n_train + n_steer],
                     'score': seqs[n_train + n_steer:]}
    data = {'splits': splits, 'vocab': len(tokenizer), 'eos': tokenizer.eos_token_id}
    torch.save(data, cache)
    return data


class MixtureData(torch.utils.data.IterableDataset):
    """In-memory multi-domain stream honouring the scheduler contract (docs/DESIGN.md), lag 0.

    Batch b's domains are drawn i.i.d. from the mixture in force at b (seeded by (seed, b));
    each domain walks its own seeded permutation, reshuffled at each pass. ``new_stage`` starts
    the next training run (continued pretraining) where the last one stopped in every domain,
    with batch numbers (the scheduler's clock) from 0 again.
    """

    def __init__(self, train: dict[str, torch.Tensor], proportions, batch: int, seed: int):
        self.domain_names = list(train)
        self.train = [train[d] for d in self.domain_names]
        self.batch, self.seed = batch, seed
        self.segments = [(0, np.asarray(proportions, dtype=np.float64))]
        self.per_batch_counts: list[np.ndarray] = []
        self.earlier_counts = np.zeros(len(self.train))
        self.batch_offset = 0
        self.cursor = [0] * len(self.train)
        self.orders = [self._order(i, 0) for i in range(len(self.train))]

    def _order(self, domain: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, domain, epoch]).permutation(len(self.train[domain]))

    @property
    def proportions(self) -> np.ndarray:
        return self.segments[-1][1].copy()

    def set_proportions(self, p, at_batch: int) -> None:
        self.segments.append((int(at_batch), np.asarray(p, dtype=np.float64)))

    def samples_per_domain(self, at_batch: int) -> np.ndarray:
        counts = self.per_batch_counts[:at_batch]
        return np.sum(counts, axis=0) if counts else np.zeros(len(self.train))

    def new_stage(self, proportions) -> None:
        self.earlier_counts = self.earlier_counts + self.samples_per_domain(len(self.per_batch_counts))
        self.batch_offset += len(self.per_batch_counts)
        self.per_batch_counts = []
        self.segments = [(0, np.asarray(proportions, dtype=np.float64))]

    def repeats(self) -> np.ndarray:
        """Samples drawn per domain so far (all stages) / the domain's train sequences."""
        drawn = self.earlier_counts + self.samples_per_domain(len(self.per_batch_counts))
        return drawn / np.array([len(t) for t in self.train])

    def _next(self, domain: int) -> torch.Tensor:
        n = len(self.train[domain])
        position = self.cursor[domain]
        if position and position % n == 0:
            self.orders[domain] = self._order(domain, position // n)
        self.cursor[domain] += 1
        return self.train[domain][self.orders[domain][position % n]]

    def __iter__(self):
        while True:
            b = len(self.per_batch_counts)
            q = [q for start, q in self.segments if start <= b][-1]
            domains = np.random.default_rng([self.seed, 10_000 + self.batch_offset + b]).choice(
                len(q), size=self.batch, p=q / q.sum())
            self.per_batch_counts.append(np.bincount(domains, minlength=len(q)).astype(np.float64))
            for domain in domains:
                row = self._next(int(domain))
                yield {'input_ids': row, 'labels': row.clone()}


# --- training ----------------------------------------------------------------------------------

def composer_model(hf):
    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel
    return HuggingFaceModel(hf, use_logits=True, shift_labels=True, metrics=[LanguageCrossEntropy()],
                            eval_metrics=[LanguageCrossEntropy()])


def evaluators(splits, s):
    from composer.core import Evaluator
    loaders = []
    for d in splits:
        rows = [{'input_ids': r, 'labels': r.clone()} for r in splits[d]['steer']]
        loaders.append(Evaluator(label=d, dataloader=torch.utils.data.DataLoader(rows, batch_size=len(rows)),
                                 metric_names=['LanguageCrossEntropy']))
    return loaders


def train(hf, data, s, *, steps, lr, seed, proportions, policy=None, pruning=False, cosine=True, dataset=None,
          eval_every=None):
    """One Trainer run (on ``dataset``'s next stage when given); returns (trainer, dataset)."""
    from composer.optim import ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler, DecoupledAdamW
    from composer.trainer import Trainer

    from drp_foundry.composer.dynamic_loading import DynamicLoading
    from drp_foundry.composer.lagrangian_updater import LagrangianUpdater
    from drp_foundry.composer.mask_learner import MaskLearner

    splits = data['splits']
    if dataset is None:
        dataset = MixtureData({d: splits[d]['train'] for d in splits}, proportions, s['batch'], seed)
    else:
        dataset.new_stage(proportions)
    loader = torch.utils.data.DataLoader(dataset, batch_size=s['batch'])
    model = composer_model(hf)
    optimizer = DecoupledAdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = (CosineAnnealingWithWarmupScheduler(t_warmup='10ba', alpha_f=0.1) if cosine
                 else ConstantWithWarmupScheduler(t_warmup='10ba'))
    algorithms = ([MaskLearner(s['target'], mask_lr=s['mask_lr'], lambda_lr=s['lambda_lr']), LagrangianUpdater()]
                  if pruning else [])
    callbacks = [] if policy is None else [DynamicLoading(policy=policy, plot_folder=None, log_images=False)]
    trainer = Trainer(model=model, optimizers=optimizer, schedulers=scheduler, train_dataloader=loader,
                      eval_dataloader=evaluators(splits, s) if policy is not None else None,
                      eval_interval=f'{eval_every or s.get("eval_every", 1)}ba', max_duration=f'{steps}ba', algorithms=algorithms,
                      callbacks=callbacks, progress_bar=False, log_to_console=False, device='cpu', seed=seed,
                      precision='fp32')
    trainer.fit()
    return trainer, dataset


@torch.no_grad()
def sequence_losses(hf, seqs: torch.Tensor) -> np.ndarray:
    """Mean next-token loss of each sequence."""
    hf.eval()
    out = []
    for chunk in seqs.split(128):
        logits = hf(input_ids=chunk).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction='none')
        out.append(loss.mean(dim=1))
    return torch.cat(out).numpy()


def split_losses(hf, data, split: str) -> dict[str, float]:
    return {d: float(sequence_losses(hf, data['splits'][d][split]).mean()) for d in data['splits']}


def llama(data, s):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=data['vocab'], max_position_embeddings=s['seq'], tie_word_embeddings=False,
                         rms_norm_eps=1e-5, bos_token_id=data['eos'], eos_token_id=data['eos'], **s['model'])
    return LlamaForCausalLM(config)


def pretrain(data, work, s, p0):
    cache = work / 'pretrained.pt'
    torch.manual_seed(0)
    hf = llama(data, s)
    if cache.exists():
        state = torch.load(cache)
        hf.load_state_dict(state['weights'])
        return hf, state['info']
    start = time.time()
    _, dataset = train(hf, data, s, steps=s['pretrain_steps'], lr=s['pretrain_lr'], seed=0, proportions=p0)
    info = {'seconds': time.time() - start, 'repeats': dataset.repeats().tolist(),
            'steer_losses': split_losses(hf, data, 'steer'), 'score_losses': split_losses(hf, data, 'score'),
            'params': sum(p.numel() for p in hf.parameters())}
    torch.save({'weights': hf.state_dict(), 'info': info}, cache)
    return hf, info


def run_arm(source_state, data, s, p0, policy_config: dict, seed: int) -> dict:
    from drp_foundry.composer.hf_model import unwrap_hf_model
    from drp_foundry.composer.mask_learner import find_mask_module
    from drp_foundry.pruning.export import fold_and_slice

    start = time.time()
    torch.manual_seed(seed)
    hf = llama(data, s)
    hf.load_state_dict(source_state)
    trainer, prune_data = train(hf, data, s, steps=s['prune_steps'], lr=s['prune_lr'], seed=seed, proportions=p0,
                                policy=policy_config, pruning=True, cosine=False)
    masks = find_mask_module(trainer.state.model)
    expected = float(masks.expected_num_parameters())
    target = float(masks.target_num_parameters())
    prune_q = _callback(trainer).policy.q.tolist()
    repeats_prune = prune_data.repeats().tolist()
    pruned, report = fold_and_slice(unwrap_hf_model(trainer.state.model), masks.deterministic('target'))
    trainer.close()
    trainer, cont_data = train(pruned, data, s, steps=s['continue_steps'], lr=s['continue_lr'], seed=seed,
                               proportions=p0, policy=policy_config, dataset=prune_data)
    callback = _callback(trainer)
    per_seq = {d: sequence_losses(pruned, data['splits'][d]['score']) for d in DOMAINS}
    result = {
        'policy': policy_config['name'], 'seed': seed, 'seconds': time.time() - start,
        'params_source': int(sum(p.numel() for p in hf.parameters())),
        'params_pruned': int(sum(p.numel() for p in pruned.parameters())),
        'expected_params_end_of_pruning': expected, 'target_params': target,
        'score': {d: float(v.mean()) for d, v in per_seq.items()},
        'score_se': {d: float(v.std(ddof=1) / math.sqrt(len(v))) for d, v in per_seq.items()},
        'steer': split_losses(pruned, data, 'steer'),
        'q_prune_end': prune_q, 'q_continue_end': callback.policy.q.tolist(),
        'repeats_prune': repeats_prune, 'repeats_total': cont_data.repeats().tolist(),
        'reference_losses_end': (None if getattr(callback.policy, 'reference_losses', None) is None
                                 else callback.policy.reference_losses.tolist()),
    }
    trainer.close()
    return result


def _callback(trainer):
    from drp_foundry.composer.dynamic_loading import DynamicLoading
    return next(c for c in trainer.state.callbacks if isinstance(c, DynamicLoading))


# --- report ------------------------------------------------------------------------------------

def summarize(results: list[dict], seeds: list[int], pilot_score: dict[str, float] | None = None) -> dict:
    """Per policy: mean / worst-domain loss over seeds, paired differences to constant and dro (mean, SE),
    and (with ``pilot_score``) the worst excess over the pilot's per-domain score loss: the DRO objective."""
    by = {(r['policy'], r['seed']): r for r in results}
    pilot = pilot_score or {d: 0.0 for d in DOMAINS}

    def worst_excess(r):
        return max(r['score'][d] - pilot[d] for d in DOMAINS)
    table = {}
    for policy in POLICIES:
        rows = [by[(policy, seed)] for seed in seeds if (policy, seed) in by]
        if not rows:
            continue
        mean = np.array([np.mean([r['score'][d] for d in DOMAINS]) for r in rows])
        worst = np.array([max(r['score'][d] for d in DOMAINS) for r in rows])
        entry = {'n': len(rows), 'mean': mean.mean(), 'worst': worst.mean(),
                 'worst_excess': float(np.mean([worst_excess(r) for r in rows])),
                 'per_domain': {d: float(np.mean([r['score'][d] for r in rows])) for d in DOMAINS},
                 'worst_domain': max(DOMAINS, key=lambda d: np.mean([r['score'][d] for r in rows])),
                 'repeats': np.max([r['repeats_total'] for r in rows], axis=0).tolist(),
                 'q_continue_end': np.mean([r['q_continue_end'] for r in rows], axis=0).tolist(),
                 'q_prune_end': np.mean([r['q_prune_end'] for r in rows], axis=0).tolist(),
                 'reference_losses_end': (None if rows[0]['reference_losses_end'] is None else
                                          np.mean([r['reference_losses_end'] for r in rows], axis=0).tolist()),
                 'expected_ratio': float(np.mean([r['expected_params_end_of_pruning'] / r['target_params']
                                                  for r in rows]))}
        for base in ('constant', 'dro'):
            common = [seed for seed in seeds if (policy, seed) in by and (base, seed) in by]
            if base == policy or len(common) < 2:
                continue
            for key, fn in (('mean', lambda r: np.mean([r['score'][d] for d in DOMAINS])),
                            ('worst', lambda r: max(r['score'][d] for d in DOMAINS)),
                            ('worst_excess', worst_excess),
                            *[(f'domain/{d}', lambda r, d=d: r['score'][d]) for d in DOMAINS]):
                diff = np.array([fn(by[(policy, seed)]) - fn(by[(base, seed)]) for seed in common])
                entry[f'd_{key}_vs_{base}'] = (float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff))))
        table[policy] = entry
    return table


def write_results(table, pre, pilot_refs, results, seeds, s, command, wall, repo: Path) -> str:
    lines = [f'Command: `{command}`', '',
             f'Tiny Llama {pre["params"]:,} parameters ({s["model"]}), vocab {s["vocab"]}, {s["seq"]}-token '
             f'sequences, batch {s["batch"]}; pretrain {s["pretrain_steps"]} steps (shared); per arm: prune '
             f'{s["prune_steps"]} steps to {s["target"]} then continue {s["continue_steps"]} steps, scheduler '
             f'update every {s["eval_every"]} steps on the steer split ({s["steer_tokens"]} tokens/domain); '
             f'scored on a disjoint score split ({s["score_tokens"]} tokens/domain). Seeds {seeds}. '
             f'p_R0 = size^{s["ratio_exponent"]}. Policies at their defaults (raw eval loss, research-code clamps); '
             'reference losses = a constant-policy pilot at the target size (seed 1000, steer split). '
             f'Compute time of all stages {wall / 60:.1f} min on a shared, loaded 2-core machine (torch threads '
             '= 1; other jobs running beside it).', '',
             '| policy | n | mean loss | worst-domain loss | worst domain | Δmean vs constant | Δworst vs constant '
             '| Δmean vs dro | Δworst vs dro | worst excess | Δworst excess vs constant |',
             '|---|---|---|---|---|---|---|---|---|---|---|']

    def fmt(pair):
        return '—' if pair is None else f'{pair[0]:+.3f} ± {pair[1]:.3f}'
    for policy, e in table.items():
        lines.append(f'| {policy} | {e["n"]} | {e["mean"]:.3f} | {e["worst"]:.3f} | {e["worst_domain"]} | '
                     f'{fmt(e.get("d_mean_vs_constant"))} | {fmt(e.get("d_worst_vs_constant"))} | '
                     f'{fmt(e.get("d_mean_vs_dro"))} | {fmt(e.get("d_worst_vs_dro"))} | {e["worst_excess"]:.3f} | '
                     f'{fmt(e.get("d_worst_excess_vs_constant"))} |')
    lines += ['', 'Δ = policy − baseline, paired by seed, mean ± standard error over seeds (negative = better). '
              'Worst excess = max over domains of (score loss − the pilot\'s score loss): the quantity DRO '
              'minimises, with the pilot as the reference.', '',
              '| Δ vs constant, per domain | ' + ' | '.join(DOMAINS) + ' |', '|---|' + '---|' * len(DOMAINS)]
    for policy, e in table.items():
        if policy != 'constant' and 'd_mean_vs_constant' in e:
            lines.append(f'| {policy} | ' + ' | '.join(fmt(e[f'd_domain/{d}_vs_constant']) for d in DOMAINS) + ' |')
    lines += ['',
              '| policy | ' + ' | '.join(DOMAINS) + ' |', '|---|' + '---|' * len(DOMAINS)]
    for policy, e in table.items():
        lines.append(f'| {policy} loss | ' + ' | '.join(f'{e["per_domain"][d]:.3f}' for d in DOMAINS) + ' |')
    for policy, e in table.items():
        lines.append(f'| {policy} q end of pruning | ' + ' | '.join(f'{v:.3f}' for v in e['q_prune_end']) + ' |')
    for policy, e in table.items():
        lines.append(f'| {policy} final q | ' + ' | '.join(f'{v:.3f}' for v in e['q_continue_end']) + ' |')
    for policy, e in table.items():
        if e.get('reference_losses_end'):
            lines.append(f'| {policy} final reference loss | ' + ' | '.join(
                f'{v:.3f}' for v in e['reference_losses_end']) + ' |')
    for policy, e in table.items():
        lines.append(f'| {policy} repeats (max over seeds) | ' + ' | '.join(f'{v:.2f}' for v in e['repeats']) + ' |')
    lines.append('| pretraining repeats | ' + ' | '.join(f'{v:.2f}' for v in pre['repeats']) + ' |')
    lines.append('| pilot reference loss | ' + ' | '.join(f'{pilot_refs[d]:.3f}' for d in DOMAINS) + ' |')
    se = np.mean([[r['score_se'][d] for d in DOMAINS] for r in results], axis=0)
    lines.append('| eval-sampling SE of a loss | ' + ' | '.join(f'{v:.3f}' for v in se) + ' |')
    ratios = ', '.join(f'{p} {e["expected_ratio"]:.3f}' for p, e in table.items())
    lines += ['', f'Expected/target parameters at the end of pruning (mean over seeds): {ratios}; the export cuts '
              'to the target exactly. Repeats = samples drawn / train sequences of the domain (prune + continue).']
    body = '\n'.join(lines)
    write_results_section(repo / 'docs' / 'RESULTS.md', SECTION,
                          '## Scheduler study, near-uniform preset (bench/scheduler_study.py --preset near-uniform)\n\n'
                          'The near-uniform regime, where the references are a constant-policy pilot\'s own final '
                          'losses (so constant is optimal by construction): kept for comparison; the headline is the '
                          f'multilingual study below.\n\n{body}')
    return body


def write_results_section(path: Path, section: str, content: str) -> None:
    """Replace (or append) the ``<!-- BEGIN section -->`` ... ``<!-- END section -->`` block of ``path``."""
    text = path.read_text() if path.exists() else '# Results\n'
    begin, end = f'<!-- BEGIN {section} -->', f'<!-- END {section} -->'
    block = f'{begin}\n{content}\n{end}'
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + '\n\n' + block + '\n'
    path.write_text(text)


def stamp_settings(work: Path, settings: dict) -> None:
    """Write ``work/settings.json``; refuse a ``work`` folder that holds a study with other settings."""
    work.mkdir(parents=True, exist_ok=True)
    fingerprint = json.dumps(settings, sort_keys=True)
    stamp = work / 'settings.json'
    if stamp.exists() and stamp.read_text() != fingerprint:
        raise SystemExit(f'{work} holds a study with other settings; use another --work or delete it')
    stamp.write_text(fingerprint)


def study_parser(preset: str, description: str, *, work: str, seeds: int) -> argparse.ArgumentParser:
    """The options both presets take (corpus, work folder, seeds, policies, scale, results, report only)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--preset', choices=[preset], default=preset)
    parser.add_argument('--corpus', type=Path, default=DEMO_CORPUS)
    parser.add_argument('--work', type=Path, default=Path(work))
    parser.add_argument('--seeds', type=int, default=seeds)
    parser.add_argument('--policies', nargs='+', choices=POLICIES, default=POLICIES)
    parser.add_argument('--scale', type=float, default=1.0, help='multiply the training step counts (timing trials)')
    parser.add_argument('--no-results', action='store_true', help='do not write docs/RESULTS.md')
    parser.add_argument('--report-only', action='store_true',
                        help='summarise the arms already finished in --work (none is trained); the table says '
                             'how many seeds each policy has')
    return parser


def main_near_uniform(argv=None) -> int:
    parser = study_parser('near-uniform', 'the near-uniform preset (constant is the pilot)',
                          work='runs/scheduler_study', seeds=5)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = json.loads(json.dumps(SETTINGS))
    for key in ('pretrain_steps', 'prune_steps', 'continue_steps'):
        s[key] = max(s['eval_every'], int(round(s[key] * args.scale / s['eval_every'])) * s['eval_every'])
    stamp_settings(args.work, s)
    import logging
    logging.getLogger('drp_foundry').setLevel(logging.ERROR)
    start = time.time()
    data = build_data(args.corpus, args.work, s)
    sizes = np.array([len(data['splits'][d]['train']) for d in DOMAINS], dtype=np.float64)
    p0 = temperature_smoothed_ratio(sizes, s['ratio_exponent'])
    print('train sequences', dict(zip(DOMAINS, sizes.astype(int).tolist())), 'p_R0', np.round(p0, 3).tolist(),
          flush=True)
    if args.report_only and not (args.work / 'pretrained.pt').exists():
        raise SystemExit(f'--report-only: no finished study stages in {args.work}')
    hf, pre = pretrain(data, args.work, s, p0)
    print(f'pretrained: {pre["seconds"]:.0f} s, score {pre["score_losses"]}', flush=True)
    source_state = {k: v.clone() for k, v in hf.state_dict().items()}

    def arm(policy_config, seed):
        path = args.work / f'arm_{policy_config["name"]}_{seed}.json'
        if path.exists():
            return json.loads(path.read_text())
        if args.report_only:
            return None
        result = run_arm(source_state, data, s, p0, policy_config, seed)
        path.write_text(json.dumps(result, indent=1))
        print(f'{result["policy"]:>10} seed {seed}: mean {np.mean(list(result["score"].values())):.3f} worst '
              f'{max(result["score"].values()):.3f} ({result["seconds"]:.0f} s, {(time.time() - start) / 60:.1f} '
              'min so far)', flush=True)
        return result

    pilot = arm({'name': 'constant'}, 1000)
    if pilot is None:
        raise SystemExit(f'--report-only: no finished pilot in {args.work}')
    refs = pilot_reference_losses([pilot['steer']])
    seeds = list(range(args.seeds))
    results = []
    for seed in seeds:
        for policy in args.policies:
            config = {'name': policy} if policy == 'constant' else {'name': policy, 'reference_losses': refs}
            result = arm(config, seed)
            if result is not None:
                results.append(result)
    wall = pre['seconds'] + pilot['seconds'] + sum(r['seconds'] for r in results)  # cached stages count too
    table = summarize(results, seeds, pilot['score'])
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != '--report-only']
    if '--preset' not in given:
        given = ['--preset', 'near-uniform'] + given
    command = 'python bench/scheduler_study.py ' + ' '.join(given)
    if not args.no_results:
        body = write_results(table, pre, refs, results, seeds, s, command.strip(), wall,
                             Path(__file__).resolve().parents[1])
        print(body)
    (args.work / 'summary.json').write_text(json.dumps(table, indent=1, default=float))
    dp = table.get('drpruning', {})
    print(f'scheduler study: drpruning worst-domain delta vs constant {dp.get("d_worst_vs_constant")}, vs dro '
          f'{dp.get("d_worst_vs_dro")} (mean, SE over {len(seeds)} seeds); stages {wall / 60:.1f} min, this run '
          f'{(time.time() - start) / 60:.1f} min')
    return 0



# =============================================================================================
# The multilingual preset (default): the paper's section 5.3 regime, pre-registered in
# docs/RESULTS.md ("Scheduler study, multilingual regime: pre-registration").
# =============================================================================================

LANGS = ['EN', 'QA', 'CODE', 'TEX', 'BG', 'XG']
LOW_RESOURCE = ['BG', 'XG', 'TEX']
LANG_SOURCES = {'EN': ['c4-rp', 'cc'], 'QA': ['stackexchange'], 'CODE': ['github'], 'TEX': ['arxiv'],
                'BG': ['wiki'], 'XG': ['book']}
XG_CHARS = 200_000
ML_SECTION = 'scheduler_study_multilingual'
PAIRS = [('drpruning', 'constant'), ('drpruning', 'sheared'), ('drpruning', 'dro'), ('dro', 'constant')]
ARM_ORDER = ['drpruning', 'dro', 'sheared', 'constant']  # longest first, so the two workers finish together

ML_SETTINGS = dict(
    vocab=1024, seq=64, batch=16, steer_tokens=2048, score_tokens=8192,
    model=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4),
    target=dict(layers=4, hidden=64, heads=2, intermediate=192),
    pretrain_steps=2000, pretrain_lr=3e-3,
    prune_steps=192, prune_eval_every=4, prune_lr=1e-3, mask_lr=0.3, lambda_lr=0.1,
    continue_steps=480, continue_eval_every=8, continue_lr=1e-3,
    ratio_exponent=0.3, g1_margin=1.0, g2_spread=0.10, g2_ratio=1.5, m2_tolerance=0.005,
)

# the cipher language XG: a-z -> 26 lower-case Greek letters (alpha..omega with final sigma, and digamma),
# A-Z -> 26 capitals (Alpha..Omega without the unassigned U+03A2, Digamma, Koppa); nothing else changes
_LATIN = 'abcdefghijklmnopqrstuvwxyz' + 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
_GREEK = (''.join(chr(c) for c in range(0x3B1, 0x3CA)) + '\u03dd'
          + ''.join(chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2) + '\u03dc\u03d8')
CIPHER = str.maketrans(dict(zip(_LATIN, _GREEK)))


def greek_cipher(text: str) -> str:
    """Map the Latin letters to Greek ones (a bijection a-z/A-Z -> 52 Greek letters); all else unchanged."""
    return text.translate(CIPHER)


def corpus_records(corpus: Path, domain: str):
    """The JSON objects of the domain's file(s) in ``corpus`` (``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst``, as
    data_prep reads them; the embedded corpus is ``.jsonl.zst``)."""
    from data_prep.build_domain_mds import find_domain_files, open_text
    from drp_foundry.fileio import iter_jsonl

    for path in find_domain_files(corpus, [domain])[domain]:
        with open_text(path) as f:
            for _, record in iter_jsonl(f, path):
                yield record


def build_languages(corpus: Path = DEMO_CORPUS, xg_chars: int = XG_CHARS) -> dict[str, list[str]]:
    """The six "languages", uncapped: EN = c4-rp + cc, QA = stackexchange, CODE = github, TEX = arxiv,
    BG = wiki (Bulgarian), XG = the first ``xg_chars`` characters of book (documents in file order,
    joined by a newline) through the Greek cipher, as one document."""
    langs = {}
    for lang in LANGS:
        docs = [r['text'] for source in LANG_SOURCES[lang] for r in corpus_records(corpus, source) if r.get('text')]
        if lang == 'XG':
            docs = [greek_cipher('\n'.join(docs)[:xg_chars])]
        langs[lang] = docs
    return langs


def tokenize_and_split(langs: dict[str, list[str]], tokenizer, seq: int, steer_tokens: int, score_tokens: int,
                       order_seed: str = 'order') -> dict:
    """Per language: documents in a seeded order, each followed by EOS, one token stream cut into ``seq``-token
    windows; the last ``score_tokens // seq`` windows are the score split, the ``steer_tokens // seq`` before
    them the steer split, the rest the train split (three disjoint blocks of windows). Also the number of
    characters each score window's predicted tokens (positions 1..seq-1) decode to, for nats per character."""
    splits, chars_per_token = {}, {}
    for lang, docs in langs.items():
        order = list(range(len(docs)))
        random.Random(f'{order_seed}-{lang}').shuffle(order)
        ids: list[int] = []
        for i in order:
            ids.extend(tokenizer(docs[i])['input_ids'] + [tokenizer.eos_token_id])
        windows = torch.tensor(ids[:len(ids) // seq * seq], dtype=torch.long).view(-1, seq)
        n_score, n_steer = score_tokens // seq, steer_tokens // seq
        n_train = len(windows) - n_score - n_steer
        if n_train < 4 * (n_score + n_steer):
            raise ValueError(f'language {lang}: only {len(windows)} windows of {seq} tokens; too few for the splits')
        score = windows[n_train + n_steer:]
        chars = torch.tensor([len(tokenizer.decode(w[1:].tolist(), skip_special_tokens=True)) for w in score])
        splits[lang] = {'train': windows[:n_train], 'steer': windows[n_train:n_train + n_steer], 'score': score,
                        'score_chars': chars}
        text_chars = sum(len(d) for d in docs)
        chars_per_token[lang] = text_chars / max(1, len(ids) - len(docs))
    return {'splits': splits, 'chars_per_token': chars_per_token,
            'chars': {lang: sum(len(d) for d in docs) for lang, docs in langs.items()}}


def build_ml_data(corpus: Path, work: Path, s: dict) -> dict:
    cache = work / 'data.pt'
    if cache.exists():
        return torch.load(cache)
    from transformers import AutoTokenizer

    from data_prep.tokenizer import train_bpe_tokenizer

    langs = build_languages(corpus)
    # the natural mixture: every document of every language once, in proportion to its size
    tok_dir = train_bpe_tokenizer((t for lang in LANGS for t in langs[lang]), s['vocab'], work / 'tokenizer')
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = tokenize_and_split(langs, tokenizer, s['seq'], s['steer_tokens'], s['score_tokens'])
    data.update(vocab=len(tokenizer), eos=tokenizer.eos_token_id)
    torch.save(data, cache)
    return data


def natural_mixture(data: dict) -> np.ndarray:
    sizes = np.array([len(data['splits'][d]['train']) for d in LANGS], dtype=np.float64)
    return sizes / sizes.sum()


# --- scoring and the premise gates -------------------------------------------------------------

@torch.no_grad()
def score_split(hf, data, split: str = 'score') -> dict:
    """Per language: mean NLL per predicted token and summed NLL / decoded characters (nats per character)."""
    hf.eval()
    tok, char = {}, {}
    for d in LANGS:
        seqs = data['splits'][d][split]
        total = []
        for chunk in seqs.split(128):
            logits = hf(input_ids=chunk).logits[:, :-1].float()
            total.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:],
                                                           reduction='none').sum(dim=1))
        nll = torch.cat(total)
        tok[d] = float(nll.sum() / (seqs.shape[0] * (seqs.shape[1] - 1)))
        if split == 'score':
            char[d] = float(nll.sum() / data['splits'][d]['score_chars'].sum())
    return {'tok': tok, 'char': char}


def unigram_cross_entropy(train: torch.Tensor, score: torch.Tensor, vocab: int, alpha: float = 0.5) -> float:
    """Cross-entropy (nats/token) on the predicted tokens of ``score`` of the add-``alpha`` unigram model of
    ``train``: a language's own unigram baseline."""
    counts = torch.bincount(train.reshape(-1), minlength=vocab).double() + alpha
    logp = torch.log(counts / counts.sum())
    return float(-logp[score[:, 1:].reshape(-1)].mean())


def gate_g1(source_tok: dict[str, float], unigram_tok: dict[str, float], margin: float = 1.0) -> dict:
    """G1: the source is at least ``margin`` nats/token below each language's own unigram cross-entropy."""
    gaps = {d: unigram_tok[d] - source_tok[d] for d in source_tok}
    return {'gaps': gaps, 'min_gap': min(gaps.values()), 'passed': bool(min(gaps.values()) >= margin)}


def gate_g2(source_char: dict[str, float], pruned_char: dict[str, float], spread: float = 0.10,
            ratio: float = 1.5) -> dict:
    """G2: the degradation after pruning (nats/char, pruned - source) is uneven: max - min >= ``spread`` and
    max / min >= ``ratio`` (a degradation <= 0 somewhere while another is > 0 counts as an infinite ratio)."""
    deg = {d: pruned_char[d] - source_char[d] for d in source_char}
    hi, lo = max(deg.values()), min(deg.values())
    r = hi / lo if lo > 0 else (math.inf if hi > 0 else 0.0)
    return {'degradation': deg, 'spread': hi - lo, 'ratio': r, 'passed': bool(hi - lo >= spread and r >= ratio)}


# --- the arms ----------------------------------------------------------------------------------

def ml_policy_config(policy: str, references: dict[str, float]) -> dict:
    """The pre-registered policy settings: constant none; sheared without the clip of the excess (the code
    behind ReSheared) and dro with the source's steer losses as fixed references; drpruning from the same
    values, then its own fits, all defaults."""
    if policy == 'constant':
        return {'name': 'constant'}
    config = {'name': policy, 'reference_losses': dict(references)}
    if policy == 'sheared':
        config['clip_excess_at_zero'] = False
    return config


def continue_start(policy: str, prune_q_end, p0) -> np.ndarray:
    """The mixture continued pretraining starts from: sheared's end-of-pruning mixture (as the research script
    does), p0 for the others."""
    return np.asarray(prune_q_end if policy == 'sheared' else p0, dtype=np.float64)


def run_ml_arm(source_state, data, s, p0, policy: str, seed: int, references: dict[str, float]) -> dict:
    from drp_foundry.composer.hf_model import unwrap_hf_model
    from drp_foundry.composer.mask_learner import find_mask_module
    from drp_foundry.pruning.export import fold_and_slice

    start = time.time()
    # constant reads no loss: no callback and no eval loaders (they would only cost time); q stays p0
    config = None if policy == 'constant' else ml_policy_config(policy, references)
    torch.manual_seed(seed)
    hf = llama(data, s)
    hf.load_state_dict(source_state)
    trainer, stream = train(hf, data, s, steps=s['prune_steps'], lr=s['prune_lr'], seed=seed, proportions=p0,
                            policy=config, pruning=True, cosine=False, eval_every=s['prune_eval_every'])
    masks = find_mask_module(trainer.state.model)
    expected, target = float(masks.expected_num_parameters()), float(masks.target_num_parameters())
    prune_cb = _callback(trainer) if config is not None else None
    prune = {'q_end': (prune_cb.policy.q if prune_cb else p0).tolist(),
             'p_ref_end': (prune_cb.policy.p_ref if prune_cb else p0).tolist(),
             'first_fit_step': _first_fit_step(prune_cb) if prune_cb else None,
             'samples': stream.samples_per_domain(len(stream.per_batch_counts)).tolist()}
    pruned, _ = fold_and_slice(unwrap_hf_model(trainer.state.model), masks.deterministic('target'))
    trainer.close()
    after_pruning = score_split(pruned, data)
    cont_p0 = continue_start(policy, prune['q_end'], p0)
    trainer, stream = train(pruned, data, s, steps=s['continue_steps'], lr=s['continue_lr'], seed=seed,
                            proportions=cont_p0, policy=config, dataset=stream,
                            eval_every=s['continue_eval_every'])
    callback = _callback(trainer) if config is not None else None
    final = score_split(pruned, data)
    cont_samples = stream.samples_per_domain(len(stream.per_batch_counts))
    result = {
        'policy': policy, 'seed': seed, 'seconds': time.time() - start,
        'params_pruned': int(sum(p.numel() for p in pruned.parameters())),
        'expected_params_end_of_pruning': expected, 'target_params': target,
        'after_pruning': after_pruning, 'final': final, 'prune': prune,
        'continue': {'q_end': (callback.policy.q if callback else p0).tolist(),
                     'p_ref_end': (callback.policy.p_ref if callback else p0).tolist(),
                     'first_fit_step': _first_fit_step(callback) if callback else None,
                     'samples': cont_samples.tolist(), 'p_start': np.asarray(cont_p0).tolist(),
                     'reference_losses_end': (None if getattr(getattr(callback, 'policy', None), 'reference_losses',
                                                              None) is None
                                              else callback.policy.reference_losses.tolist())},
        'token_shares': ((np.asarray(prune['samples']) + cont_samples)
                         / (np.sum(prune['samples']) + cont_samples.sum())).tolist(),
    }
    trainer.close()
    return result


def _first_fit_step(callback):
    """The first update at which a reference loss changed from its configured value (drpruning's first fit)."""
    points = [p for p in callback.trajectory if p.get('reference_losses') is not None]
    if not points:
        return None
    first = np.asarray(points[0]['reference_losses'], dtype=np.float64)
    for p in points:
        if not np.allclose(np.asarray(p['reference_losses'], dtype=np.float64), first, equal_nan=True):
            return int(p['step'])
    return None


# --- statistics and the fixed reading ----------------------------------------------------------

def arm_metrics(result: dict) -> dict[str, float]:
    """M1 (worst language) and M2 (uniform mean) in nats/char and nats/token, the low-resource mean (nats/char)
    and each language's nats/char, of the final continued model on the score split."""
    char, tok = result['final']['char'], result['final']['tok']
    out = {'M1_char': max(char.values()), 'M2_char': float(np.mean(list(char.values()))),
           'M1_tok': max(tok.values()), 'M2_tok': float(np.mean(list(tok.values()))),
           'low_char': float(np.mean([char[d] for d in LOW_RESOURCE]))}
    out.update({f'char/{d}': char[d] for d in char})
    return out


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired differences a - b: mean, standard error and the 95% t interval."""
    from scipy import stats
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(diff)
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.975, n - 1) * se) if n > 1 else math.nan
    return {'n': n, 'mean': mean, 'se': se, 'lo': mean - half, 'hi': mean + half}


def ml_summary(results: list[dict], seeds: list[int]) -> dict:
    by = {(r['policy'], r['seed']): r for r in results}
    table = {'policies': {}, 'pairs': {}}
    for policy in POLICIES:
        rows = [by[(policy, s)] for s in seeds if (policy, s) in by]
        if rows:
            metrics = [arm_metrics(r) for r in rows]
            table['policies'][policy] = {
                'n': len(rows), **{k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]},
                'token_shares': np.mean([r['token_shares'] for r in rows], axis=0).tolist(),
                'q_prune_end': np.mean([r['prune']['q_end'] for r in rows], axis=0).tolist(),
                'q_end': np.mean([r['continue']['q_end'] for r in rows], axis=0).tolist(),
                'p_ref_end': np.mean([r['continue']['p_ref_end'] for r in rows], axis=0).tolist(),
                'first_fit_prune': [r['prune']['first_fit_step'] for r in rows],
                'first_fit_continue': [r['continue']['first_fit_step'] for r in rows],
                'reference_losses_end': (None if rows[0]['continue']['reference_losses_end'] is None else
                                         np.mean([r['continue']['reference_losses_end'] for r in rows],
                                                 axis=0).tolist()),
                'expected_ratio': float(np.mean([r['expected_params_end_of_pruning'] / r['target_params']
                                                 for r in rows])),
                'seconds': float(np.mean([r['seconds'] for r in rows]))}
    for a, b in PAIRS:
        common = [s for s in seeds if (a, s) in by and (b, s) in by]
        if len(common) < 2:
            continue
        ma, mb = [arm_metrics(by[(a, s)]) for s in common], [arm_metrics(by[(b, s)]) for s in common]
        table['pairs'][f'{a}-{b}'] = {k: paired([m[k] for m in ma], [m[k] for m in mb]) for k in ma[0]}
    return table


def reading(table: dict, gates: dict, tolerance: float = 0.005) -> dict:
    """The pre-registered reading (nats/char). drpruning earns its keep iff its M1 interval against constant lies
    below 0, its M2 interval's upper end is <= ``tolerance``, and its mean paired difference to sheared is < 0 on
    M1 and on M2; the dynamic reference loss and ratio earn theirs iff, in addition, its mean paired M1
    difference to dro is < 0. Failed gates: premise not met (no verdict on the policies)."""
    if not (gates.get('G1', {}).get('passed') and gates.get('G2', {}).get('passed')):
        return {'verdict': 'premise not met', 'earns_keep': None, 'dynamic_earns': None}
    pairs = table['pairs']
    needed = ('drpruning-constant', 'drpruning-sheared', 'drpruning-dro')
    if any(p not in pairs for p in needed):
        return {'verdict': 'incomplete (some paired differences are missing)', 'earns_keep': None,
                'dynamic_earns': None}
    c, sh, dro = (pairs[p] for p in needed)
    checks = {'M1 vs constant: interval below 0': c['M1_char']['hi'] < 0,
              f'M2 vs constant: upper end <= +{tolerance}': c['M2_char']['hi'] <= tolerance,
              'M1 vs sheared: mean < 0': sh['M1_char']['mean'] < 0,
              'M2 vs sheared: mean < 0': sh['M2_char']['mean'] < 0}
    earns = all(checks.values())
    dynamic = earns and dro['M1_char']['mean'] < 0
    checks['M1 vs dro: mean < 0'] = dro['M1_char']['mean'] < 0
    verdict = ('drpruning earns its keep' + (' and so do its dynamic reference loss and ratio' if dynamic else
                                              ', but its dynamic reference loss and ratio do not (no gain over dro)')
               if earns else 'honest negative in this regime: drpruning does not earn its keep')
    return {'verdict': verdict, 'earns_keep': earns, 'dynamic_earns': dynamic, 'checks': checks}


# --- the source, the queue of arms, the report -------------------------------------------------

def ml_source(data, work: Path, s: dict) -> tuple[dict, dict]:
    """Pretrain the source once on the natural mixture (cached): weights, steer/score losses, unigram baselines."""
    cache = work / 'source.pt'
    if cache.exists():
        state = torch.load(cache)
        return state['weights'], state['info']
    torch.manual_seed(0)
    hf = llama(data, s)
    start = time.time()
    _, stream = train(hf, data, s, steps=s['pretrain_steps'], lr=s['pretrain_lr'], seed=0,
                      proportions=natural_mixture(data))
    info = {'seconds': time.time() - start, 'params': int(sum(p.numel() for p in hf.parameters())),
            'repeats': stream.repeats().tolist(), 'steer': score_split(hf, data, 'steer')['tok'],
            'score': score_split(hf, data),
            'unigram_tok': {d: unigram_cross_entropy(data['splits'][d]['train'], data['splits'][d]['score'],
                                                     data['vocab']) for d in LANGS}}
    torch.save({'weights': hf.state_dict(), 'info': info}, cache)
    return hf.state_dict(), info


def _claim(path: Path) -> bool:
    import os
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def work_queue(work: Path, source_state, data, s, p0, references, arms, log=print) -> None:
    """Run every arm not yet finished nor claimed by another worker (claims are files made with O_EXCL)."""
    for policy, seed in arms:
        done = work / f'arm_{policy}_{seed}.json'
        if done.exists() or not _claim(work / f'arm_{policy}_{seed}.claim'):
            continue
        result = run_ml_arm(source_state, data, s, p0, policy, seed, references)
        done.write_text(json.dumps(result, indent=1))
        m = arm_metrics(result)
        log(f'{policy:>10} seed {seed}: M1 {m["M1_char"]:.4f} M2 {m["M2_char"]:.4f} nats/char '
            f'({result["seconds"]:.0f} s)')


def ml_arms(seeds: list[int], policies: list[str]) -> list[tuple[str, int]]:
    """constant of the first seed first (gate G2 reads it), then seed by seed, longest arm first."""
    arms = [('constant', seeds[0])] if 'constant' in policies else []
    arms += [(p, seed) for seed in seeds for p in ARM_ORDER if p in policies and (p, seed) not in arms]
    return arms


def _fmt(pair: dict) -> str:
    return f'{pair["mean"]:+.4f} ± {pair["se"]:.4f} [{pair["lo"]:+.4f}, {pair["hi"]:+.4f}]'


def write_ml_results(table, gates, verdict, info, p0, pnat, references, data, s, seeds, command, wall,
                     repo: Path, section: str = ML_SECTION,
                     heading: str = 'Results (bench/scheduler_study.py, multilingual preset)') -> str:
    pol = table['policies']
    lines = [f'Command: `{command}`', '',
             f'Source: Llama {info["params"]:,} parameters ({s["model"]}), pretrained {s["pretrain_steps"]} steps of '
             f'{s["batch"]} x {s["seq"]} tokens on the natural mixture; target {s["target"]}; per arm: prune '
             f'{s["prune_steps"]} steps (eval every {s["prune_eval_every"]}), export, continue {s["continue_steps"]} '
             f'steps (eval every {s["continue_eval_every"]}). Seeds {seeds} (paired). Compute time of all stages '
             f'{wall / 60:.1f} min (two single-thread processes on a shared 2-core machine).', '',
             '| language | characters | chars/token | natural mixture | p0 = size^0.3 | source steer loss (reference) '
             '| source score nats/token | unigram nats/token |',
             '|---|---|---|---|---|---|---|---|']
    for i, d in enumerate(LANGS):
        lines.append(f'| {d} | {data["chars"][d]:,} | {data["chars_per_token"][d]:.2f} | {pnat[i]:.3f} | '
                     f'{p0[i]:.3f} | {references[d]:.3f} | {info["score"]["tok"][d]:.3f} | '
                     f'{info["unigram_tok"][d]:.3f} |')
    g1, g2 = gates['G1'], gates.get('G2')
    lines += ['', '**Premise gates.** G1 (source >= 1 nat/token below each language\'s unigram cross-entropy): '
              + ', '.join(f'{d} {v:.2f}' for d, v in g1['gaps'].items())
              + f' -> min {g1["min_gap"]:.2f}, **{"passed" if g1["passed"] else "FAILED"}**. ']
    if g2 is not None:
        lines[-1] += ('G2 (degradation after pruning, nats/char, pruned - source, constant seed '
                      f'{seeds[0]}): ' + ', '.join(f'{d} {v:+.3f}' for d, v in g2['degradation'].items())
                      + f' -> max - min {g2["spread"]:.3f} (>= {s["g2_spread"]}), max / min {g2["ratio"]:.2f} '
                      f'(>= {s["g2_ratio"]}), **{"passed" if g2["passed"] else "FAILED"}**.')
    lines += ['', f'**Verdict (the pre-registered reading): {verdict["verdict"]}.**']
    if verdict['verdict'] == 'premise not met':
        lines.append('By the pre-registered rule a failed gate means the premise is not met: the policy rows below '
                     'are diagnostics of this run, not a comparison of the policies and not a negative result.')
    if verdict.get('checks'):
        lines.append('Checks: ' + '; '.join(f'{k}: {"yes" if v else "no"}' for k, v in verdict['checks'].items())
                     + '.')
    lines += ['', '| policy | n | M1 nats/char | M2 nats/char | M1 nats/token | M2 nats/token | low-resource '
              'mean (BG, XG, TEX) nats/char | ' + ' | '.join(f'{d} nats/char' for d in LANGS) + ' |',
              '|---|---|---|---|---|---|---|' + '---|' * len(LANGS)]
    for p, e in pol.items():
        lines.append(f'| {p} | {e["n"]} | {e["M1_char"]:.4f} | {e["M2_char"]:.4f} | {e["M1_tok"]:.4f} | '
                     f'{e["M2_tok"]:.4f} | {e["low_char"]:.4f} | '
                     + ' | '.join(f'{e[f"char/{d}"]:.4f}' for d in LANGS) + ' |')
    lines += ['', 'Paired differences (same seed), mean ± standard error [95% t interval], negative = the first '
              'policy is better:', '',
              '| difference | M1 nats/char | M2 nats/char | M1 nats/token | M2 nats/token | low-resource nats/char |',
              '|---|---|---|---|---|---|']
    for key, e in table['pairs'].items():
        lines.append(f'| {key.replace("-", " − ")} | ' + ' | '.join(_fmt(e[k]) for k in (
            'M1_char', 'M2_char', 'M1_tok', 'M2_tok', 'low_char')) + ' |')
    lines += ['', '| per-language difference, nats/char | ' + ' | '.join(LANGS) + ' |',
              '|---|' + '---|' * len(LANGS)]
    for key, e in table['pairs'].items():
        lines.append(f'| {key.replace("-", " − ")} | ' + ' | '.join(
            f'{e[f"char/{d}"]["mean"]:+.4f} ± {e[f"char/{d}"]["se"]:.4f}' for d in LANGS) + ' |')
    lines += ['', '| mixture (mean over seeds) | ' + ' | '.join(LANGS) + ' |', '|---|' + '---|' * len(LANGS)]
    for p, e in pol.items():
        lines.append(f'| {p} token shares used (prune + continue) | '
                     + ' | '.join(f'{v:.3f}' for v in e['token_shares']) + ' |')
    for p, e in pol.items():
        if p != 'constant':
            lines.append(f'| {p} q end of pruning | ' + ' | '.join(f'{v:.3f}' for v in e['q_prune_end']) + ' |')
            lines.append(f'| {p} final q | ' + ' | '.join(f'{v:.3f}' for v in e['q_end']) + ' |')
    dp = pol.get('drpruning')
    if dp is not None and dp.get('reference_losses_end'):
        src = [references[d] for d in LANGS]
        lines += ['', 'Table-7-style rows (drpruning, end of continued pretraining, mean over seeds):', '',
                  '| | ' + ' | '.join(LANGS) + ' |', '|---|' + '---|' * len(LANGS),
                  '| source loss (initial reference), nats/token | ' + ' | '.join(f'{v:.3f}' for v in src) + ' |',
                  '| final reference loss | ' + ' | '.join(f'{v:.3f}' for v in dp['reference_losses_end']) + ' |',
                  '| Δ reference | ' + ' | '.join(f'{a - b:+.3f}' for a, b in zip(dp['reference_losses_end'], src))
                  + ' |',
                  '| p0 | ' + ' | '.join(f'{v:.3f}' for v in p0) + ' |',
                  '| final p_R | ' + ' | '.join(f'{v:.3f}' for v in dp['p_ref_end']) + ' |',
                  '| Δ p_R | ' + ' | '.join(f'{a - b:+.3f}' for a, b in zip(dp['p_ref_end'], p0)) + ' |', '',
                  f'drpruning\'s first fit (step): pruning {dp["first_fit_prune"]} of {s["prune_steps"]}, continued '
                  f'{dp["first_fit_continue"]} of {s["continue_steps"]}.']
    ratios = ', '.join(f'{p} {e["expected_ratio"]:.3f}' for p, e in pol.items())
    lines += ['', f'Expected/target parameters at the end of pruning: {ratios} (the export cuts to the target '
              'exactly). Arm time (mean): ' + ', '.join(f'{p} {e["seconds"]:.0f} s' for p, e in pol.items()) + '.']
    body = '\n'.join(lines)
    write_results_section(repo / 'docs' / 'RESULTS.md', section, f'### {heading}\n\n{body}')
    return body


def main_multilingual(argv=None) -> int:
    import os
    import subprocess
    parser = study_parser('multilingual', 'the multilingual preset (pre-registered)', work='runs/scheduler_study_ml',
                          seeds=4)
    parser.add_argument('--jobs', type=int, default=2, help='processes running arms (each single-thread)')
    parser.add_argument('--pretrain-steps', type=int, default=ML_SETTINGS['pretrain_steps'],
                        help='the source\'s pretraining length (pre-registered: 2000; 4000 if G1 fails at 2000)')
    parser.add_argument('--pretrain-scale', type=float, default=None, help='multiply the pretraining steps '
                        '(timing trials; default --scale)')
    parser.add_argument('--source-config', type=json.loads, default=None,
                        help='JSON keys of the source\'s LlamaConfig to change (an exploratory study; the '
                             'pre-registered source is ML_SETTINGS["model"]), e.g. \'{"hidden_size": 256}\'')
    parser.add_argument('--source-only', action='store_true', help='build the data and the source, print gate G1, '
                        'stop (G1 is decided on the source alone, before any arm)')
    parser.add_argument('--section', default=ML_SECTION, help='the docs/RESULTS.md section written')
    parser.add_argument('--heading', default=None, help='the section\'s heading (default: from the settings)')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.source_config or {}) - set(ML_SETTINGS['model'])
    if unknown:  # refused before anything changes (threads, log levels, files)
        raise SystemExit(f'--source-config: {sorted(unknown)} are not source settings; '
                         f'change any of {sorted(ML_SETTINGS["model"])}')
    torch.set_num_threads(1)
    import logging
    logging.getLogger('drp_foundry').setLevel(logging.ERROR)
    s = json.loads(json.dumps(ML_SETTINGS))
    pre_scale = args.scale if args.pretrain_scale is None else args.pretrain_scale
    s['pretrain_steps'] = max(10, int(round(args.pretrain_steps * pre_scale)))
    if args.source_config:
        s['model'].update(args.source_config)
    for key, every in (('prune_steps', 'prune_eval_every'), ('continue_steps', 'continue_eval_every')):
        s[key] = max(s[every], int(round(s[key] * args.scale / s[every])) * s[every])
    stamp_settings(args.work, s)
    start = time.time()
    log_file = args.work / ('worker.log' if args.worker else 'main.log')

    def log(message):
        line = f'[{time.strftime("%H:%M:%S")}] {message}'
        print(line, flush=True)
        with open(log_file, 'a') as f:
            f.write(line + '\n')
    data = build_ml_data(args.corpus, args.work, s)
    p0 = temperature_smoothed_ratio(np.array([len(data['splits'][d]['train']) for d in LANGS], np.float64),
                                    s['ratio_exponent'])
    pnat = natural_mixture(data)
    if args.report_only and not (args.work / 'source.pt').exists():
        raise SystemExit(f'--report-only: no source in {args.work}')
    source_state, info = ml_source(data, args.work, s)
    references = dict(info['steer'])
    gates = {'G1': gate_g1(info['score']['tok'], info['unigram_tok'], s['g1_margin'])}
    seeds = list(range(args.seeds))
    arms = ml_arms(seeds, args.policies)
    if not args.worker:
        log(f'languages {LANGS}; natural {np.round(pnat, 3).tolist()}; p0 {np.round(p0, 3).tolist()}; '
            f'chars/token {({d: round(v, 2) for d, v in data["chars_per_token"].items()})}')
        log(f'source: {info["params"]:,} parameters, {info["seconds"]:.0f} s; G1 gaps '
            f'{({d: round(v, 3) for d, v in gates["G1"]["gaps"].items()})} passed={gates["G1"]["passed"]}')
    if args.source_only:
        return 0
    children = []
    if not args.report_only:
        if not args.worker:
            for claim in args.work.glob('arm_*.claim'):  # claims left by an interrupted run
                if not claim.with_suffix('.json').exists():
                    claim.unlink()
            given = argv if argv is not None else sys.argv[1:]
            for _ in range(args.jobs - 1):
                children.append(subprocess.Popen([sys.executable, __file__, *given, '--worker'],
                                                 env=dict(os.environ)))
        work_queue(args.work, source_state, data, s, p0, references, arms, log)
        if args.worker:
            return 0
        for child in children:
            child.wait()
    results = [json.loads((args.work / f'arm_{p}_{seed}.json').read_text()) for p, seed in arms
               if (args.work / f'arm_{p}_{seed}.json').exists()]
    first_constant = args.work / f'arm_constant_{seeds[0]}.json'
    if first_constant.exists():
        pruned = json.loads(first_constant.read_text())['after_pruning']['char']
        gates['G2'] = gate_g2(info['score']['char'], pruned, s['g2_spread'], s['g2_ratio'])
    table = ml_summary(results, seeds)
    verdict = reading(table, gates, s['m2_tolerance'])
    wall = info['seconds'] + sum(r['seconds'] for r in results)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ('--report-only', '--worker')]
    command = shlex.join(['python', 'bench/scheduler_study.py', *given])
    (args.work / 'summary.json').write_text(json.dumps({'table': table, 'gates': gates, 'verdict': verdict},
                                                       indent=1, default=float))
    if not args.no_results:
        print(write_ml_results(table, gates, verdict, info, p0, pnat, references, data, s, seeds, command, wall,
                               Path(__file__).resolve().parents[1], args.section, args.heading or (
                                   'Results (bench/scheduler_study.py, multilingual preset)'
                                   if s['model'] == ML_SETTINGS['model']
                                   and args.pretrain_steps == ML_SETTINGS['pretrain_steps'] else
                                   f'The gates with a stronger source ({s["model"]}, pretrained '
                                   f'{s["pretrain_steps"]} steps)')))
    log(f'scheduler study (multilingual): {len(results)} arms, G1 {gates["G1"]["passed"]}, G2 '
        f'{gates.get("G2", {}).get("passed")}; verdict: {verdict["verdict"]}; this run '
        f'{(time.time() - start) / 60:.1f} min')
    return 0


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    preset = 'multilingual'
    if '--preset' in args:
        preset = args[args.index('--preset') + 1]
    if preset == 'near-uniform':
        return main_near_uniform(argv)
    if preset != 'multilingual':
        raise SystemExit(f'--preset {preset}: use multilingual (default) or near-uniform')
    return main_multilingual(argv)


if __name__ == '__main__':
    raise SystemExit(main())
