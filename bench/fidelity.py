"""Fidelity study: what each data-mixture policy buys the worst domain when pruning a real model.

For every policy (constant, sheared, dro, drpruning) and seed, the study runs the same chained
Foundry commands as the demo (``drp_foundry/demo.py``), with identical seed, steps, tokens,
learning rates and eval cadence; only ``variables.policy`` differs::

    composer -n 1 train.py PRUNE_YAML    ...      prune SmolLM2-135M to the demo target
    drp-export CKPT DIR          fold masks, slice -> HF directory
    composer -n 1 train.py CONTINUE_YAML ...      optional continued pretraining (same policy)
    evaluate_domains(model, eval data)             per-domain loss on held-out text

The reference losses of ``sheared`` and ``dro`` (and ``drpruning``'s values before its first
scaling-law fit) are target-size losses from a constant-policy pilot: the ``constant`` run of
the first seed goes first, and its final model's per-domain loss on the scheduler's steering
batches is the reference for every other policy (the same numbers for all). The scheduler
steers on the first ``steer_batches`` batches of each domain's eval split; the held-out score
uses the batches after them, which the scheduler never sees.
(An earlier version used the source model's losses as references and one steering batch that
was also scored; see docs/RESULTS.md for its numbers. This version has not been rerun: about
80 min on 2 CPU cores per seed.)
The scheduler's hyperparameters are the paper's defaults; the time-based ones are fractions
of the run (Lagrangian and LR warm-up, fit / ratio / history start) or the eval cadence.

Scales (every number can be overridden by its option):

- ``cpu`` (default; about 60 min for the four policies and one seed on 2 idle CPU cores,
  70-75 min when the cores are shared; each extra seed adds as much):
  {cpu}
- ``gpu`` (toward the paper: 3,200 steps x 32 x 4,096 tokens, update every 50, bf16):
  {gpu}
  Needs a corpus larger than the CI sample (``--corpus`` or ``--data-root``).

Resumable: each stage of each (policy, seed) leaves a JSON marker under
``WORK/runs/<policy>-s<seed>/``; a rerun skips finished stages, and an interrupted training
stage resumes from its last Composer checkpoint (``autoresume``). Settings that change
results are recorded in ``WORK/study.json``; a rerun with other settings is refused. Adding
policies or seeds to a finished study runs only the new ones.

Outputs in WORK: ``fidelity.json``, ``fidelity.csv``, ``fidelity.png``; the table also goes
to stdout. The last line is the wall time of this invocation.

    python bench/fidelity.py --work runs/fidelity
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from drp_foundry.demo.pipeline import DEMO_CORPUS, POLICIES, run_logged, scheduler_overrides, train_command
from drp_foundry.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


# --- the table: per-domain loss of each policy's model, summaries, seed spread, plot.
#
# ``bench/fidelity.py`` prunes one source model with each mixture policy and evaluates each
# result per domain; this module turns those measurements into the study's table. Pure
# Python (matplotlib for the PNG); no Composer or LLM-Foundry import.
#
# For one model with per-domain losses l_i and initial proportions p_R0,i the summary is:
#
# - ``mean_uniform`` = (1/k) sum_i l_i (every domain counts the same),
# - ``mean_weighted`` = sum_i p_R0,i l_i / sum_i p_R0,i (the training mixture's view),
# - ``worst_domain`` / ``worst_loss`` = argmax_i l_i / max_i l_i (the DRO objective's target),
# - ``spread`` = max_i l_i - min_i l_i (balance across domains).
#
# With several seeds of a (policy, stage), an extra row with ``seed = 'mean'`` holds the mean
# over seeds of every number and ``seed_range/<column>`` = max - min over seeds, so a difference
# between policies can be told from seed noise.

SUMMARY_COLUMNS = ('mean_uniform', 'mean_weighted', 'worst_loss', 'spread')
MEAN_SEED = 'mean'


def summarize_losses(losses: Mapping[str, float], proportions: Mapping[str, float]) -> dict[str, Any]:
    """Uniform and proportion-weighted mean, worst domain and its loss, spread (max - min)."""
    if not losses:
        raise ValueError('summarize_losses: no per-domain losses')
    missing = [d for d in losses if d not in proportions]
    if missing:
        raise ValueError(f'summarize_losses: no initial proportion for domains {missing}')
    bad = {d: v for d, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f'summarize_losses: non-finite losses {bad}')
    total_weight = sum(proportions[d] for d in losses)
    worst = max(losses, key=losses.get)
    return {
        'mean_uniform': sum(losses.values()) / len(losses),
        'mean_weighted': sum(proportions[d] * v for d, v in losses.items()) / total_weight,
        'worst_domain': worst,
        'worst_loss': losses[worst],
        'spread': max(losses.values()) - min(losses.values()),
    }


def result_row(policy: str, seed: int | str, stage: str, losses: Mapping[str, float],
               proportions: Mapping[str, float], final_mixture: Mapping[str, float] | None) -> dict[str, Any]:
    """One table row: ``loss/<domain>``, the summary columns and ``mixture/<domain>`` (final q)."""
    row: dict[str, Any] = {'policy': policy, 'seed': seed, 'stage': stage}
    row.update({f'loss/{d}': float(v) for d, v in losses.items()})
    row.update(summarize_losses(losses, proportions))
    mixture = final_mixture or {}
    row.update({f'mixture/{d}': (float(mixture[d]) if d in mixture else None) for d in losses})
    return row


def _numeric_columns(row: Mapping[str, Any]) -> list[str]:
    return [k for k, v in row.items() if k not in ('seed',) and isinstance(v, float)]


def seed_mean_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each (policy, stage) with two or more seeds: the mean row with ``seed_range/<column>``."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row['seed'] != MEAN_SEED:
            groups.setdefault((row['policy'], row['stage']), []).append(row)
    out = []
    for (policy, stage), members in groups.items():
        if len(members) < 2:
            continue
        mean: dict[str, Any] = {'policy': policy, 'seed': MEAN_SEED, 'stage': stage}
        for column in _numeric_columns(members[0]):
            values = [m[column] for m in members if m.get(column) is not None]
            if len(values) != len(members):
                mean[column] = None
                continue
            mean[column] = sum(values) / len(values)
            mean[f'seed_range/{column}'] = max(values) - min(values)
        worst_domains = sorted({m['worst_domain'] for m in members})
        mean['worst_domain'] = '/'.join(worst_domains)
        out.append(mean)
    return out


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Column order for the CSV: keys of the first row, then any key first seen later (seed ranges)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    columns = table_columns(rows)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval='')
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ('' if v is None else v) for k, v in row.items()})


def _cell(row: Mapping[str, Any], column: str, width: int) -> str:
    value = row.get(column)
    if value is None:
        return f'{"-":>{width}}'
    spread = row.get(f'seed_range/{column}')
    text = f'{value:.3f}' if spread is None else f'{value:.3f}±{spread / 2:.3f}'
    return f'{text:>{width}}'


def format_table(rows: Sequence[Mapping[str, Any]], domains: Sequence[str]) -> str:
    """Text table: one line per row, per-domain losses, summaries, then the final mixtures.

    A seed-mean row shows ``mean±half-range`` over seeds.
    """
    if not rows:
        return '(no results)'
    width = 13 if any(r['seed'] == MEAN_SEED for r in rows) else 8
    head = f'{"policy":>10} {"seed":>5} {"stage":>9}'
    loss_head = ' '.join(f'{d[:width]:>{width}}' for d in domains)
    summary_head = ' '.join(f'{c:>{width}}' for c in ('mean', 'weighted', 'worst', 'spread')) + f' {"worst dom":>13}'
    lines = ['per-domain eval loss (nats/token) and summaries',
             f'{head} {loss_head} {summary_head}']
    lines.append('-' * len(lines[-1]))
    for row in rows:
        losses = ' '.join(_cell(row, f'loss/{d}', width) for d in domains)
        summary = ' '.join(_cell(row, c, width) for c in SUMMARY_COLUMNS)
        lines.append(f'{row["policy"]:>10} {str(row["seed"]):>5} {row["stage"]:>9} {losses} {summary} '
                     f'{str(row.get("worst_domain", "")):>13}')
    mixture_rows = [r for r in rows if any(r.get(f'mixture/{d}') is not None for d in domains)]
    if mixture_rows:
        lines += ['', 'final mixture q (training proportions at the end of the run)',
                  f'{head} ' + ' '.join(f'{d[:8]:>8}' for d in domains)]
        lines.append('-' * len(lines[-1]))
        for row in mixture_rows:
            cells = ' '.join('       -' if row.get(f'mixture/{d}') is None else f'{row[f"mixture/{d}"]:8.3f}'
                             for d in domains)
            lines.append(f'{row["policy"]:>10} {str(row["seed"]):>5} {row["stage"]:>9} {cells}')
    return '\n'.join(lines)


def plot_fidelity(rows: Sequence[Mapping[str, Any]], trajectories: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
                  domains: Sequence[str], out_png: str | Path, stage: str,
                  baseline: Mapping[str, float] | None = None) -> None:
    """Left: per-domain loss by policy at ``stage`` (seed mean; error bars: seed range). Right: mixtures.

    ``trajectories`` maps a run label (e.g. ``drpruning seed 17``) to ``{domain: [[step, q], ...]}``;
    one small panel per run shows its mixture over training steps. ``baseline`` (e.g. the
    source model's losses) is drawn as black ticks.
    """
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib.figure import Figure

    chosen = [r for r in rows if r['stage'] == stage]
    policies = list(dict.fromkeys(r['policy'] for r in chosen))
    shown: dict[str, Mapping[str, Any]] = {}
    for policy in policies:
        members = [r for r in chosen if r['policy'] == policy]
        means = [r for r in members if r['seed'] == MEAN_SEED]
        shown[policy] = means[0] if means else members[0]

    runs = list(trajectories)
    columns = max(1, math.ceil(len(runs) / 2))
    figure = Figure(figsize=(7 + 3.6 * columns, 7))
    grid = figure.add_gridspec(2, 2 + columns, width_ratios=[1.2, 1.2] + [1] * columns)
    bars = figure.add_subplot(grid[:, :2])
    count = max(1, len(policies))
    width = 0.8 / count
    for j, policy in enumerate(policies):
        row = shown[policy]
        x = [i + (j - (count - 1) / 2) * width for i in range(len(domains))]
        heights = [row.get(f'loss/{d}') or 0.0 for d in domains]
        errors = [(row.get(f'seed_range/loss/{d}') or 0.0) / 2 for d in domains]
        bars.bar(x, heights, width=width, yerr=errors if any(errors) else None, label=policy, capsize=2)
    if baseline:
        bars.scatter(range(len(domains)), [baseline.get(d, math.nan) for d in domains], marker='_', s=300,
                     color='black', label='source', zorder=3)
    finite = [v for r in shown.values() for d in domains if (v := r.get(f'loss/{d}')) is not None]
    if baseline:
        finite += [v for v in baseline.values() if math.isfinite(v)]
    if finite:
        bars.set_ylim(min(finite) * 0.9, max(finite) * 1.05)
    bars.set_xticks(range(len(domains)))
    bars.set_xticklabels(domains, rotation=30, ha='right')
    bars.set_ylabel('eval loss (nats/token)')
    bars.set_title(f'per-domain loss of the {stage} models')
    bars.legend(fontsize='small')

    for k, run in enumerate(runs):
        ax = figure.add_subplot(grid[k % 2, 2 + k // 2])
        for domain in domains:
            points = trajectories[run].get(domain) or []
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=domain)
        ax.set_title(f'mixture q: {run}', fontsize='small')
        ax.set_xlabel('step')
        if k == 0:
            ax.legend(fontsize='x-small')
    figure.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(out_png), dpi=100)


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """Everything that changes a run's result (recorded in study.json; policies and seeds are not)."""

    prune_steps: int
    eval_every: int
    continue_steps: int
    continue_eval_every: int
    max_seq_len: int
    batch_size: int
    microbatch_size: int
    eval_batch_size: int
    precision: str
    eval_tokens: int
    steer_batches: int
    save_every: int
    prune_yaml: str
    continue_yaml: str
    source: str
    data_root: str
    eval_data: str
    eval_split: str
    prune_set: tuple[str, ...] = ()
    continue_set: tuple[str, ...] = ()

    def describe(self) -> str:
        tokens = self.batch_size * self.max_seq_len
        lines = [
            f'prune: {self.prune_steps} steps x {self.batch_size} x {self.max_seq_len} tokens '
            f'({tokens:,} tokens/step, {self.prune_steps * tokens:,} in all); eval + scheduler update every '
            f'{self.eval_every} steps and at the end ({math.ceil(self.prune_steps / self.eval_every)} updates); checkpoint every '
            f'{self.save_every} steps; precision {self.precision}',
            (f'continued pretraining: {self.continue_steps} steps, update every {self.continue_eval_every}'
             if self.continue_steps else 'continued pretraining: off (--continue-steps 0)'),
            f'scheduler steering: the first {self.steer_batches} batches of {self.eval_batch_size} x '
            f'{self.max_seq_len} tokens of each domain\'s eval split',
            f'held-out eval: {self.eval_tokens:,} tokens per domain requested '
            f'({eval_batches(self)} batches of {self.eval_batch_size} x {self.max_seq_len}) from '
            f'{self.eval_data} (split {self.eval_split}, after the steering batches)',
            f'recipes: {self.prune_yaml}, {self.continue_yaml}; source model {self.source}',
        ]
        if self.prune_set or self.continue_set:
            lines.append(f'extra overrides: prune {list(self.prune_set)}, continue {list(self.continue_set)}')
        return '\n'.join(lines)


# Scale presets: (prune steps, eval every, continue steps, continue eval every, seq len, batch, microbatch,
# eval batch, precision, eval tokens per domain, checkpoint every).
SCALES: dict[str, dict[str, Any]] = {
    # Measured here (2 CPU cores, SmolLM2-135M with masks, 4 x 128 tokens): 3.0 s per train step, 7.3 s per
    # in-run eval of the 7 domains, ~20 s to start a run, 7 s per export, 28 s per held-out eval of a pruned
    # model: about 14 min per policy, 58 min for four on an idle machine.
    # Signal: 4 steering batches (4,096 tokens) per domain and an update every 8 steps (was 1 batch every 4),
    # plus 80 steps of continued pretraining with the scheduler on.
    'cpu': dict(prune_steps=160, eval_every=8, continue_steps=80, continue_eval_every=8, max_seq_len=128,
                batch_size=4, microbatch_size=4, eval_batch_size=8, precision='fp32', eval_tokens=8192,
                steer_batches=4, save_every=40),
    'gpu': dict(prune_steps=3200, eval_every=50, continue_steps=4000, continue_eval_every=400, max_seq_len=4096,
                batch_size=32, microbatch_size=8, eval_batch_size=8, precision='amp_bf16', eval_tokens=262144,
                steer_batches=8, save_every=400),
}


def _scale_text(name: str) -> str:
    s = SCALES[name]
    return (f'{s["prune_steps"]} prune steps x {s["batch_size"]} x {s["max_seq_len"]} tokens, eval/update every '
            f'{s["eval_every"]}, continue {s["continue_steps"]} steps (update every {s["continue_eval_every"]}), '
            f'{s["eval_tokens"]:,} eval tokens/domain, {s["precision"]}')


__doc__ = __doc__.format(cpu=_scale_text('cpu'), gpu=_scale_text('gpu'))


def eval_batches(settings: StudySettings) -> int:
    """Batches per domain for the held-out eval: ceil(eval tokens / (eval batch x seq len))."""
    return max(1, math.ceil(settings.eval_tokens / (settings.eval_batch_size * settings.max_seq_len)))


# -- study folder: settings record and stage markers ---------------------------------------------------
def _write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def check_study_record(work: Path, settings: StudySettings) -> None:
    """Record the settings in WORK/study.json, or refuse when a previous study there used others."""
    record = work / 'study.json'
    current = dataclasses.asdict(settings)
    current = {k: list(v) if isinstance(v, tuple) else v for k, v in current.items()}
    if record.exists():
        previous = json.loads(record.read_text())
        changed = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
        if changed:
            details = ', '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in changed.items())
            raise SystemExit(f'{record}: this folder holds a study with other settings ({details}); rerun with '
                             'the same settings to continue it, or pass another --work to start a new study')
        return
    _write_json(record, current)


def stage_done(marker: Path) -> dict[str, Any] | None:
    return json.loads(marker.read_text()) if marker.exists() else None


def run_stage(title: str, marker: Path, work_fn) -> dict[str, Any]:
    """Run ``work_fn`` unless ``marker`` exists; record its result and wall time in ``marker``."""
    done = stage_done(marker)
    if done is not None:
        print(f'--- {title}: done earlier ({done.get("seconds", 0):.0f}s), skipped', flush=True)
        return done
    print(f'\n=== {title}', flush=True)
    started = time.time()
    result = work_fn() or {}
    result['seconds'] = round(time.time() - started, 1)
    _write_json(marker, result)
    print(f'    ({result["seconds"]:.0f}s)', flush=True)
    return result


def launch(cmd: list[str], log_path: Path) -> None:
    """Run one pipeline command (the demo's runner: streams progress, fails with the log's path) in the
    checkout, where the recipe paths (--prune-yaml, --continue-yaml) are relative to."""
    run_logged(cmd, log_path, cwd=REPO)


# -- measurements ----------------------------------------------------------------------------------------
def evaluate(model_dir: Path | str, data_root: Path | str, domains: list[str], settings: StudySettings, *,
             max_batches: int | None, split: str = 'eval') -> dict[str, float]:
    import multiprocessing

    from drp_foundry.composer.domain_eval_losses import evaluate_domains

    # A fresh process per evaluation: mosaicml-streaming keeps every shared-memory handle of a process
    # open until exit, and a study makes dozens of evaluations (7 datasets each); in one process they
    # exhaust the file-descriptor limit.
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        return pool.apply(evaluate_domains, (str(model_dir), str(data_root), domains),
                          dict(max_seq_len=settings.max_seq_len, split=split, batch_size=settings.eval_batch_size,
                               max_batches=max_batches))


def score(model_dir: Path | str, domains: list[str], settings: StudySettings) -> dict[str, float]:
    """Held-out per-domain loss on the batches the scheduler never reads.

    On the training data's own eval split (the default), the scheduler steers on its first
    ``steer_batches`` batches: the score is the mean over the next ``eval_batches`` batches,
    (n_all L_all - n_steer L_steer) / n_score, exact because every batch is full (data_prep
    writes max_seq_len-token samples and the split holds steer + score batches). On another
    ``--eval-data`` / ``--eval-split`` the whole requested range is scored.
    """
    n_score = eval_batches(settings)
    if not (Path(settings.eval_data) == Path(settings.data_root) and settings.eval_split == 'eval'):
        return evaluate(model_dir, settings.eval_data, domains, settings, max_batches=n_score,
                        split=settings.eval_split)
    n_steer = settings.steer_batches
    full = evaluate(model_dir, settings.data_root, domains, settings, max_batches=n_steer + n_score)
    steer = evaluate(model_dir, settings.data_root, domains, settings, max_batches=n_steer)
    return {d: ((n_steer + n_score) * full[d] - n_steer * steer[d]) / n_score for d in domains}


def eval_tokens_per_domain(data_root: Path, domains: list[str], split: str, settings: StudySettings) -> dict[str, int]:
    """Tokens each domain's held-out eval actually scores (its split may hold fewer samples than asked)."""
    out = {}
    for domain in domains:
        index = Path(data_root) / domain / split / 'index.json'
        if not index.is_file():
            raise SystemExit(f'--eval-data: no {index}; point --eval-data at a data_prep output that has a '
                             f'{split!r} split for every domain {domains}')
        samples = sum(shard['samples'] for shard in json.loads(index.read_text())['shards'])
        steer = settings.steer_batches * settings.eval_batch_size if split == 'eval' else 0
        if split == 'eval' and samples < steer + eval_batches(settings) * settings.eval_batch_size:
            raise SystemExit(f'{index}: {samples} eval samples, fewer than the {steer} steering + '
                             f'{eval_batches(settings) * settings.eval_batch_size} scored ones; rebuild the data '
                             '(delete WORK/data) or lower --eval-tokens / --steer-batches')
        out[domain] = min(samples - steer, eval_batches(settings) * settings.eval_batch_size) * settings.max_seq_len
    return out


def read_mixture_trajectory(metrics_path: Path, domains: list[str], offset: int = 0) -> dict[str, list[list[float]]]:
    """``{domain: [[step + offset, q], ...]}`` from a run's metrics.jsonl (drp/mixture/<domain>)."""
    from drp_foundry.composer.jsonl_metrics_logger import read_metrics

    series = read_metrics(metrics_path)
    return {d: [[step + offset, float(v)] for step, v in series.get(f'drp/mixture/{d}', [])] for d in domains}


def read_run_timing(metrics_path: Path) -> dict[str, float]:
    """Seconds spent training and evaluating, from Composer's speed monitor (``time/train``, ``time/val``)."""
    from drp_foundry.composer.jsonl_metrics_logger import read_metrics

    series = read_metrics(metrics_path)
    return {f'{key.split("/")[-1]}_seconds': round(float(series[key][-1][1]), 1)
            for key in ('time/train', 'time/val') if key in series}


def read_final_size(metrics_path: Path) -> dict[str, float]:
    """Expected parameter count P of the masks at the last step, and the target, when the run logged them."""
    from drp_foundry.composer.jsonl_metrics_logger import read_metrics

    series = read_metrics(metrics_path)
    return {name: float(series[key][-1][1]) for name, key in (
        ('final_expected_params', 'drp/expected_num_parameters'), ('target_params', 'drp/target_num_parameters'))
        if key in series}


def training_domains(yaml_path: str, overrides: list[str]) -> tuple[list[str], list[float]]:
    """The recipe's train domains and initial proportions p_R0 (after the overrides)."""
    from drp_foundry.composer.config_checks import load_train_config

    cfg = load_train_config(yaml_path, overrides)
    dataset = cfg['train_loader']['dataset']
    return list(dataset['domains']), [float(p) for p in dataset['proportions']]


# -- one (policy, seed) ----------------------------------------------------------------------------------
def _overrides(settings: StudySettings, policy: str, seed: int, run_dir: Path, run_name: str, steps: int,
               eval_every: int, reference_losses: dict[str, float] | None) -> dict[str, object]:
    save_every = max(eval_every, settings.save_every // eval_every * eval_every)
    overrides: dict[str, object] = {
        'variables.data_root': settings.data_root, 'variables.max_seq_len': settings.max_seq_len,
        'variables.global_seed': seed, 'variables.run_name': run_name,
        'variables.steps': steps, 'variables.eval_every': eval_every,
        'global_train_batch_size': settings.batch_size, 'device_train_microbatch_size': settings.microbatch_size,
        'device_eval_batch_size': settings.eval_batch_size, 'precision': settings.precision,
        'save_folder': run_dir / 'checkpoints', 'save_interval': f'{save_every}ba',
        'loggers.drp_jsonl.path': run_dir / 'metrics.jsonl',
        'callbacks.drp_dynamic_loading.plot_folder': run_dir / 'plots',
        'callbacks.speed_monitor.window_size': max(1, min(10, eval_every)),
        'callbacks.speed_monitor.time_unit': 'seconds',
        'eval_subset_num_batches': settings.steer_batches,
    }
    overrides.update(scheduler_overrides(policy, reference_losses))
    return overrides


def _with_sets(overrides: dict[str, object], sets: tuple[str, ...]) -> dict[str, object]:
    merged = dict(overrides)
    for item in sets:
        key, _, value = item.partition('=')
        merged[key] = value
    return merged


def run_policy(work: Path, settings: StudySettings, policy: str, seed: int, domains: list[str],
               reference_losses: dict[str, float] | None, keep_checkpoints: bool) -> dict[str, Any]:
    """Prune, export, (continue), evaluate one policy with one seed; every stage is skipped when done."""
    base = work / 'runs' / f'{policy}-s{seed}'
    prune_dir, continue_dir, pruned_model = base / 'prune', base / 'continue', base / 'pruned-model'
    label = f'{policy} seed {seed}'

    def prune() -> dict[str, Any]:
        overrides = _overrides(settings, policy, seed, prune_dir, f'fidelity-prune-{policy}-s{seed}',
                               settings.prune_steps, settings.eval_every, reference_losses)
        overrides['variables.source_model'] = settings.source
        launch(train_command(settings.prune_yaml, _with_sets(overrides, settings.prune_set)), base / 'prune.log')
        checkpoint = prune_dir / 'checkpoints' / 'latest-rank0.pt'
        if not checkpoint.exists():
            raise SystemExit(f'{label}: the pruning run finished but left no {checkpoint}; see {base / "prune.log"}')
        return {'checkpoint': str(checkpoint.resolve()), **read_run_timing(prune_dir / 'metrics.jsonl'),
                **read_final_size(prune_dir / 'metrics.jsonl')}

    prune_result = run_stage(f'{label}: prune ({settings.prune_steps} steps)', base / 'prune.done.json', prune)

    def export() -> dict[str, Any]:
        launch([sys.executable, '-m', 'drp_foundry.commands.export', prune_result['checkpoint'], str(pruned_model),
                '--overwrite'], base / 'export.log')
        report = json.loads((pruned_model / 'pruning_report.json').read_text())
        return {'model_dir': str(pruned_model), 'params_before': report['params_before'],
                'params_after': report['params_after']}

    export_result = run_stage(f'{label}: export', base / 'export.done.json', export)
    if not keep_checkpoints:  # after the marker: the export is the artefact, the checkpoint (with Adam) is large
        shutil.rmtree(prune_dir / 'checkpoints', ignore_errors=True)

    continue_result = None
    if settings.continue_steps > 0:
        def continue_pretraining() -> dict[str, Any]:
            overrides = _overrides(settings, policy, seed, continue_dir, f'fidelity-continue-{policy}-s{seed}',
                                   settings.continue_steps, settings.continue_eval_every, reference_losses)
            overrides['variables.model_dir'] = pruned_model
            overrides['callbacks.hf_checkpointer.save_folder'] = continue_dir / 'hf'
            launch(train_command(settings.continue_yaml, _with_sets(overrides, settings.continue_set)),
                   base / 'continue.log')
            # Foundry's hf_checkpointer writes SAVE_FOLDER/huggingface/<huggingface_folder_name>
            candidates = [continue_dir / 'hf' / 'huggingface' / 'final', continue_dir / 'hf' / 'final']
            found = [c for c in candidates if (c / 'config.json').exists()]
            if not found:
                raise SystemExit(f'{label}: continued pretraining left no HF model at {candidates[0]}; '
                                 f'see {base / "continue.log"}')
            model_dir = found[0]
            return {'model_dir': str(model_dir), **read_run_timing(continue_dir / 'metrics.jsonl')}

        continue_result = run_stage(f'{label}: continued pretraining ({settings.continue_steps} steps)',
                                    base / 'continue.done.json', continue_pretraining)
        if not keep_checkpoints:
            shutil.rmtree(continue_dir / 'checkpoints', ignore_errors=True)

    models = {'pruned': export_result['model_dir']}
    if continue_result is not None:
        models['continued'] = continue_result['model_dir']
    evaluations = {}
    for stage, model_dir in models.items():
        evaluations[stage] = run_stage(
            f'{label}: held-out eval of the {stage} model', base / f'eval-{stage}.done.json',
            lambda model_dir=model_dir: {'losses': score(model_dir, domains, settings)})
    trajectories = {'pruned': read_mixture_trajectory(prune_dir / 'metrics.jsonl', domains)}
    if continue_result is not None:
        trajectories['continued'] = read_mixture_trajectory(continue_dir / 'metrics.jsonl', domains,
                                                            offset=settings.prune_steps)
    return {'policy': policy, 'seed': seed, 'prune': prune_result, 'export': export_result,
            'continue': continue_result, 'evaluations': evaluations, 'trajectories': trajectories}


# -- the study -------------------------------------------------------------------------------------------
def _final(trajectory: dict[str, list[list[float]]]) -> dict[str, float]:
    return {d: points[-1][1] for d, points in trajectory.items() if points}


def _timing_line(result: dict[str, Any], settings: StudySettings) -> str:
    """``policy seed: prune Ns (train Ns = N s/step, in-run evals Ns), export Ns, ...`` for the output."""
    prune = result['prune']
    parts = [f'prune {prune["seconds"]:.0f}s']
    if 'train_seconds' in prune:
        parts[-1] += (f' (train {prune["train_seconds"]:.0f}s = {prune["train_seconds"] / settings.prune_steps:.2f} '
                      f's/step, in-run evals {prune.get("val_seconds", 0):.0f}s)')
    if 'final_expected_params' in prune:
        parts.append(f'expected size at the end {prune["final_expected_params"] / 1e6:.1f}M '
                     f'(exported {result["export"]["params_after"] / 1e6:.1f}M)')
    parts.append(f'export {result["export"]["seconds"]:.0f}s')
    if result['continue'] is not None:
        parts.append(f'continue {result["continue"]["seconds"]:.0f}s')
    parts += [f'eval {stage} {e["seconds"]:.0f}s' for stage, e in result['evaluations'].items()]
    return f'  {result["policy"]} s{result["seed"]}: ' + ', '.join(parts)


def _commit() -> str:
    try:
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + (' (with uncommitted changes)' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def build_settings(args: argparse.Namespace) -> StudySettings:
    preset = dict(SCALES[args.scale])
    for key in preset:
        value = getattr(args, key, None)
        if value is not None:
            preset[key] = value
    for key in ('prune_steps', 'eval_every', 'continue_eval_every', 'max_seq_len', 'batch_size', 'microbatch_size',
                'eval_batch_size', 'eval_tokens', 'steer_batches', 'save_every'):
        if preset[key] < 1:
            raise SystemExit(f'--{key.replace("_", "-")} must be >= 1, got {preset[key]}')
    if preset['continue_steps'] < 0:
        raise SystemExit(f'--continue-steps must be >= 0, got {preset["continue_steps"]}')
    if preset['eval_every'] > preset['prune_steps']:
        raise SystemExit(f'--eval-every {preset["eval_every"]} exceeds --prune-steps {preset["prune_steps"]}: '
                         'the scheduler would never update')
    for item in list(args.prune_set or []) + list(args.continue_set or []):
        if '=' not in item:
            raise SystemExit(f'--prune-set / --continue-set take KEY=VALUE, got {item!r}')
    work = Path(args.work).resolve()
    source = Path(args.source).resolve()
    if not (source / 'config.json').is_file():
        raise SystemExit(f'--source {source}: no HF model there; run `make setup` (it converts SmolLM2-135M)')
    data_root = Path(args.data_root).resolve() if args.data_root else work / 'data'
    eval_data = Path(args.eval_data).resolve() if args.eval_data else data_root
    for key, path in (('--prune-yaml', args.prune_yaml), ('--continue-yaml', args.continue_yaml)):
        if not (REPO / path).is_file() and not Path(path).is_file():
            raise SystemExit(f'{key} {path}: no such recipe')
    return StudySettings(**preset, prune_yaml=args.prune_yaml, continue_yaml=args.continue_yaml, source=str(source),
                         data_root=str(data_root), eval_data=str(eval_data), eval_split=args.eval_split,
                         prune_set=tuple(args.prune_set or ()), continue_set=tuple(args.continue_set or ()))


def prepare_data(args: argparse.Namespace, settings: StudySettings, domains: list[str]) -> None:
    """data_prep into WORK/data (idempotent) unless --data-root names an existing one."""
    if args.data_root:
        missing = [d for d in domains if not (Path(settings.data_root) / d / 'train' / 'index.json').is_file()]
        if missing:
            raise SystemExit(f'--data-root {settings.data_root}: no train split for domains {missing}')
        return
    if not args.corpus:
        raise SystemExit('pass --corpus DIR (<domain>.jsonl files) or --data-root DIR (a data_prep output)')
    from data_prep.build_domain_mds import PrepSettings, build_domain_mds

    eval_samples = (settings.steer_batches + eval_batches(settings)) * settings.eval_batch_size
    build_domain_mds(args.corpus, settings.data_root, domains=domains, tokenizer=settings.source,
                     settings=PrepSettings(max_seq_len=settings.max_seq_len, min_eval_samples=eval_samples,
                                           max_eval_samples=eval_samples))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--corpus', default=str(DEMO_CORPUS),
                        help='folder of <domain>.jsonl[.zst] files, tokenised into WORK/data (default: the embedded demo corpus)')
    parser.add_argument('--data-root', help='an existing data_prep output to train on instead of --corpus')
    parser.add_argument('--eval-data', help='data_prep output holding the held-out split (default: the training '
                        'data root, i.e. the data_prep eval split under WORK/data)')
    parser.add_argument('--eval-split', default='eval', help='split of --eval-data to score (default: eval)')
    parser.add_argument('--source', default=str(REPO / 'models' / 'smollm2-135m'), help='HF source model directory')
    parser.add_argument('--work', default='runs/fidelity', help='study folder (runs, markers, table)')
    parser.add_argument('--policies', nargs='+', choices=POLICIES, default=list(POLICIES))
    parser.add_argument('--seeds', nargs='+', type=int, default=[17], help='training seeds (default: 17)')
    parser.add_argument('--scale', choices=sorted(SCALES), default='cpu', help='preset sizes (see above)')
    parser.add_argument('--prune-steps', type=int)
    parser.add_argument('--eval-every', type=int, help='steps between evals = scheduler updates while pruning')
    parser.add_argument('--continue-steps', type=int, help='continued pretraining steps (0: skip)')
    parser.add_argument('--continue-eval-every', type=int)
    parser.add_argument('--max-seq-len', type=int)
    parser.add_argument('--batch-size', type=int, help='global train batch (sequences)')
    parser.add_argument('--microbatch-size', type=int)
    parser.add_argument('--eval-batch-size', type=int, help='also the size of the scheduler\'s eval batch')
    parser.add_argument('--precision', choices=['fp32', 'amp_bf16', 'amp_fp16'])
    parser.add_argument('--eval-tokens', type=int, help='held-out tokens scored per domain')
    parser.add_argument('--steer-batches', type=int, help='eval batches per domain the scheduler reads at each update')
    parser.add_argument('--save-every', type=int, help='checkpoint interval in steps (rounded to the eval cadence)')
    parser.add_argument('--prune-yaml', default='yamls/demo/smollm2_prune.yaml')
    parser.add_argument('--continue-yaml', default='yamls/demo/smollm2_continue.yaml')
    parser.add_argument('--prune-set', nargs='*', metavar='KEY=VALUE', help='extra overrides for the pruning runs')
    parser.add_argument('--continue-set', nargs='*', metavar='KEY=VALUE', help='extra overrides for the continued runs')
    parser.add_argument('--keep-checkpoints', action='store_true',
                        help='keep Composer checkpoints after a stage finished (default: delete; they are large)')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    settings = build_settings(args)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check_study_record(work, settings)
    domains, proportions = training_domains(settings.prune_yaml, list(settings.prune_set))
    initial = dict(zip(domains, proportions))
    commit = _commit()
    header = '\n'.join([f'fidelity study in {work} (commit {commit})', f'scale {args.scale}:', settings.describe(),
                        f'policies {args.policies}, seeds {args.seeds}'])
    print(header, flush=True)

    run_stage('data_prep', work / 'data.done.json', lambda: prepare_data(args, settings, domains) or {})
    tokens = eval_tokens_per_domain(Path(settings.eval_data), domains, settings.eval_split, settings)
    pilot = run_policy(work, settings, 'constant', args.seeds[0], domains, None, args.keep_checkpoints)
    pilot_model = (pilot['continue'] or pilot['export'])['model_dir']
    reference = run_stage(
        'reference losses: the constant-policy pilot at the target size, on the steering batches',
        work / 'reference-pilot.done.json',
        lambda: {'losses': evaluate(pilot_model, settings.data_root, domains, settings,
                                    max_batches=settings.steer_batches)})['losses']
    source_eval = run_stage(
        'held-out eval of the source model', work / 'source-eval.done.json',
        lambda: {'losses': score(settings.source, domains, settings)})['losses']

    results = [run_policy(work, settings, policy, seed, domains, None if policy == 'constant' else reference,
                          args.keep_checkpoints)
               for seed in args.seeds for policy in args.policies]

    rows: list[dict[str, Any]] = [result_row('source', '-', 'source', source_eval, initial, None)]
    trajectories: dict[str, dict[str, list[list[float]]]] = {}
    for result in results:
        for stage, evaluation in result['evaluations'].items():
            rows.append(result_row(result['policy'], result['seed'], stage, evaluation['losses'], initial,
                                   _final(result['trajectories'][stage])))
        combined = {d: [[0, initial[d]]] + [p for traj in result['trajectories'].values() for p in traj[d]]
                    for d in domains}  # q starts at p_R0
        trajectories[f'{result["policy"]} s{result["seed"]}'] = combined
    rows += seed_mean_rows(rows[1:])
    final_stage = 'continued' if settings.continue_steps > 0 else 'pruned'

    notes = [
        'reference losses (sheared, dro; drpruning before its first fit): the constant-policy pilot (seed '
        f'{args.seeds[0]}) at the target size on the steering batches ({settings.steer_batches} x '
        f'{settings.eval_batch_size} x {settings.max_seq_len} tokens per domain), the same for every policy: '
        + ', '.join(f'{d} {v:.3f}' for d, v in reference.items()),
        'held-out tokens scored per domain: ' + ', '.join(f'{d} {n:,}' for d, n in tokens.items()),
        'initial proportions p_R0 (weights of the weighted mean): ' +
        ', '.join(f'{d} {p:.3f}' for d, p in initial.items()),
        'with several seeds, seed "mean" rows show mean±half the range over seeds',
    ]
    if Path(settings.eval_data) == Path(settings.data_root) and settings.eval_split == 'eval':
        notes.append(f'the score uses the eval split after the scheduler\'s first {settings.steer_batches} batches '
                     'per domain (never seen by the scheduler); no training sample is in it')
    timings = [_timing_line(result, settings) for result in results]
    table = format_table(rows, domains)
    payload = {'header': header, 'notes': notes, 'timings': timings, 'settings': dataclasses.asdict(settings), 'commit': commit,
               'scale': args.scale, 'domains': domains, 'initial_proportions': initial,
               'reference_losses': reference, 'eval_tokens_per_domain': tokens, 'rows': rows,
               'trajectories': trajectories,
               'runs': [{k: v for k, v in r.items() if k != 'trajectories'} for r in results]}
    _write_json(work / 'fidelity.json', payload)
    write_csv(rows, work / 'fidelity.csv')
    plot_fidelity(rows, trajectories, domains, work / 'fidelity.png', stage=final_stage, baseline=source_eval)
    print('\n' + header)
    print('\n'.join(notes))
    print('\nwall time per stage:\n' + '\n'.join(timings))
    print('\n' + table)
    print(f'\nwrote {work / "fidelity.json"}, {work / "fidelity.csv"}, {work / "fidelity.png"}')
    print(f'fidelity_wall_time_s={time.time() - started:.0f}')
    return 0


if __name__ == '__main__':
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    sys.exit(main())
