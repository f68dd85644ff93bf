"""Scheduler study: can the data-scheduling policies be told apart? A CPU miniature of the paper.

Pipeline (all in one process, Composer Trainer, drp-foundry's own algorithms and callback):

  0. data       the 7 domains of the shared RedPajama sample, a byte-level BPE (vocab 1024)
                trained on it; each domain's token stream (documents in a seeded order) is cut
                into 64-token sequences and split in three contiguous blocks: train, steer
                (the scheduler's eval loaders) and score (read only by the final scoring,
                never by the scheduler).
  1. pretrain   one tiny Llama, constant mixture p_R0, shared by every arm.
  2. pilot      one constant-policy run of the whole arm below (its own seed, not scored):
                its final per-domain *steer* losses are the target-size reference losses of
                `sheared`, `dro` and `drpruning` (before its first fit).
  3. arms       for each seed and policy (constant, sheared, dro, drpruning): prune to ~40%
                of the parameters (drp_mask_learner + drp_lagrangian, the scheduler active),
                fold and slice the masks (export), continue pretraining (scheduler active),
                score on the score split.

p_R0 is the temperature-smoothed size ratio (size^0.3, the paper's multilingual rule): the
shared sample is small and very uneven (cc is ~6% of the tokens but 67% of RedPajama's
mixture), so RedPajama's own ratio would repeat cc dozens of times.

Reported per policy: mean and worst-domain score loss (mean over seeds), and paired
differences (same seed: same pretrained model, same mask init, same first batches) to
constant and to dro with their standard errors over seeds; the eval-sampling noise of a
domain's loss (standard error over its score sequences) for scale; and how often each
domain's train data was repeated. Writes its section of docs/RESULTS.md.

    python bench/scheduler_study.py --work runs/scheduler_study

Each finished stage is cached in --work (JSON / .pt) and skipped on a rerun with the same
settings. The last line prints the headline figures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.build_domain_mds import find_domain_files, read_documents
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
    for text in read_documents(find_domain_files(corpus, [domain])[domain]):
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
    for d in DOMAINS:
        rows = [{'input_ids': r, 'labels': r.clone()} for r in splits[d]['steer']]
        loaders.append(Evaluator(label=d, dataloader=torch.utils.data.DataLoader(rows, batch_size=len(rows)),
                                 metric_names=['LanguageCrossEntropy']))
    return loaders


def train(hf, data, s, *, steps, lr, seed, proportions, policy=None, pruning=False, cosine=True, dataset=None):
    """One Trainer run (on ``dataset``'s next stage when given); returns (trainer, dataset)."""
    from composer.optim import ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler, DecoupledAdamW
    from composer.trainer import Trainer

    from drp_foundry.composer.dynamic_loading import DynamicLoading
    from drp_foundry.composer.lagrangian_updater import LagrangianUpdater
    from drp_foundry.composer.mask_learner import MaskLearner

    splits = data['splits']
    if dataset is None:
        dataset = MixtureData({d: splits[d]['train'] for d in DOMAINS}, proportions, s['batch'], seed)
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
                      eval_interval=f'{s["eval_every"]}ba', max_duration=f'{steps}ba', algorithms=algorithms,
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
    return {d: float(sequence_losses(hf, data['splits'][d][split]).mean()) for d in DOMAINS}


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
    path = repo / 'docs' / 'RESULTS.md'
    text = path.read_text() if path.exists() else '# Results\n'
    begin, end = f'<!-- BEGIN {SECTION} -->', f'<!-- END {SECTION} -->'
    block = f'{begin}\n## Scheduler study (bench/scheduler_study.py)\n\n{body}\n{end}'
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + '\n\n' + block + '\n'
    path.write_text(text)
    return body


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--corpus', type=Path, default=DEMO_CORPUS)
    parser.add_argument('--work', type=Path, default=Path('runs/scheduler_study'))
    parser.add_argument('--seeds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--policies', nargs='+', choices=POLICIES, default=POLICIES)
    parser.add_argument('--scale', type=float, default=1.0, help='multiply every step count (timing trials)')
    parser.add_argument('--no-results', action='store_true', help='do not write docs/RESULTS.md')
    parser.add_argument('--report-only', action='store_true',
                        help='summarise the arms already finished in --work (none is trained); the table says '
                             'how many seeds each policy has')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = json.loads(json.dumps(SETTINGS))
    for key in ('pretrain_steps', 'prune_steps', 'continue_steps'):
        s[key] = max(s['eval_every'], int(round(s[key] * args.scale / s['eval_every'])) * s['eval_every'])
    args.work.mkdir(parents=True, exist_ok=True)
    fingerprint = json.dumps(s, sort_keys=True)
    stamp = args.work / 'settings.json'
    if stamp.exists() and stamp.read_text() != fingerprint:
        raise SystemExit(f'{args.work} holds a study with other settings; use another --work or delete it')
    stamp.write_text(fingerprint)
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


if __name__ == '__main__':
    raise SystemExit(main())
