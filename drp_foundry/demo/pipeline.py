"""The CPU demo: prune SmolLM2-135M to 50.3M parameters, continue pretraining with the DRPruning scheduler.

Each stage is the command a user runs on GPUs, chained::

    1. drp-prepare-data     corpus -> per-domain MDS shards (SmolLM2 tokenizer)
    2. eval source          per-domain loss of SmolLM2-135M
    3. prune, by one of two paths (``--path``):
       l0:      composer -m drp_foundry.commands.train RECIPE smollm2_prune.yaml   L0 masks + Lagrangian + scheduler
                (masks importance-initialised; the source distilled in with ``--distill-alpha``)
       oneshot: drp-prune-oneshot SOURCE OUT --target ... --calibration DATA   (activation importance)
    4. drp-export CHECKPOINT OUT_DIR      (l0) fold masks, slice, HF directory
    5. composer -m drp_foundry.commands.train RECIPE smollm2_continue.yaml   continued pretraining, same scheduler,
       the source model distilled in (drp_distillation) only with ``--distill-alpha A`` (default 0: within the
       demo's 12 minutes, 120 plain steps scored as well as 70 distilled ones; docs/RESULTS.md, "Demo budget"),
       bf16 autocast where the CPU has bf16 instructions (``--precision auto``, the default; ``fp32`` / ``bf16`` force one)
    6. eval pruned and continued models; table, plots, three greedy samples printed with
       generation-time repetition control (``no_repeat_ngram_size=3``, plain transformers ``generate``)

Opt-in extras (ours, off by default; docs/DEMO.md): the token- and sequence-level unlikelihood terms
(``--unlikelihood-alpha``, ``--sequence-unlikelihood-alpha``) and the held-out greedy loop rate of the
source and continued models (``--loop-rate``).

    drp-demo [--corpus DIR] [--policy drpruning] [--path l0]   # default corpus: the embedded sample
    drp-demo --check     # resolve every file and config the demo needs, print them, exit

Everything it reads ships in the package (the corpus ``drp_foundry/demo/corpus``, the recipes
``drp_foundry/demo/recipes``; ``yamls/demo/smollm2_*.yaml`` in a checkout link to them), and the
stages run the installed commands (``drp_foundry.commands.data_prep``, ``.train``, ``.oneshot``, ``.export``),
so an installed wheel runs it from any folder. The source model is ``models/smollm2-135m`` under the
current folder unless ``--source`` says otherwise (``python -m drp_foundry.commands.smollm2 --out ...``
makes it).

Which path is the default and why: see ``DEFAULT_PATH`` below and docs/RESULTS.md
(``bench/quality_per_token.py`` measures every path at one token budget).

Reference losses (``sheared``, ``dro``, and ``drpruning`` before its first fit) are meant for
the target size: ``--reference-losses FILE`` ({domain: loss}); without it the demo uses the
continued-model losses of an earlier ``--policy constant`` run in the same ``--work`` (a
constant-policy pilot at the target size), and only failing that the source model's losses
(a stand-in that overstates every excess; it says so).

Rerunning continues where it stopped (data_prep is idempotent, the training runs autoresume);
``--fresh`` starts over. Everything lands under ``--work`` (default ``runs/demo``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from drp_foundry.demo.progress import StepTimer, format_duration, parse_batch_line

DEMO = Path(__file__).resolve().parent  # drp_foundry/demo/, in a checkout or an installed wheel
POLICIES = ('constant', 'sheared', 'dro', 'drpruning')  # the built-in policies (scheduling/registry.py)
DEFAULT_SOURCE = Path('models') / 'smollm2-135m'  # relative to the current folder (make setup writes it there)
# The default corpus and the recipes, shipped as package data (corpus provenance and licenses in its README.md).
DEMO_CORPUS = DEMO / 'corpus'
RECIPES = DEMO / 'recipes'
PRUNE_RECIPE = RECIPES / 'smollm2_prune.yaml'
CONTINUE_RECIPE = RECIPES / 'smollm2_continue.yaml'
# modules the stages run (python -m ...): installed with the package
STAGE_MODULES = ('drp_foundry.commands.data_prep', 'drp_foundry.commands.train', 'drp_foundry.commands.oneshot',
                 'drp_foundry.commands.export', 'composer.cli.launcher')
TARGET = {'layers': 20, 'hidden': 384, 'heads': 6, 'kv_heads': 2, 'intermediate': 1024}  # smollm2_prune.yaml's
PATHS = ('oneshot', 'l0')
# The demo's default path: the one that gives the lowest eval loss in its CPU time budget. One-shot
# importance pruning, then continued pretraining with the scheduler: at a CPU budget of
# about 10^5 tokens a training step of the masked 135M model costs about 2.7x a step of the 50M export
# (12-16 s vs 4.5-5 s for 4 x 128 tokens, one thread), so every pruning step is paid in continued
# steps, while the importance top-k is already a usable start. bench/quality_per_token.py compares the
# paths at one token budget with distillation; bench/demo_path.py at the demo's own cost (l0 with 40
# continued steps): one-shot lower on every seed, by 0.48 +- 0.04 nats/token (docs/RESULTS.md, "Demo path").
DEFAULT_PATH = 'oneshot'


_DEMO_STARTED = time.time()


def _stage(title: str) -> float:
    print(f'\n=== {title} ({format_duration(time.time() - _DEMO_STARTED)} into the demo)', flush=True)
    return time.time()


def run_logged(cmd: list[str], log_path: Path, cwd: Path | None = None) -> None:
    """Run a stage's command (in ``cwd``, default the current folder), streaming its output to the console and
    to ``log_path``; Composer's ``[batch=N/M]`` lines are shown as the step, the rate and the stage's ETA.

    A SIGTERM to the demo is passed on to the stage (Composer's launcher stops its ranks), so stopping
    the demo leaves no training process behind; rerunning the demo resumes from the last checkpoint.
    """
    print('$ ' + ' '.join(cmd), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timer = StepTimer()
    stopped_by: list[int] = []
    with open(log_path, 'a') as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def pass_on(signum, frame):
            stopped_by.append(signum)
            proc.send_signal(signum)

        in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal needs it
        previous = signal.signal(signal.SIGTERM, pass_on) if in_main_thread else None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if (batch := parse_batch_line(line)) is not None:
                    timer.update(*batch)
                    print(f'  {timer.describe()}', flush=True)
                elif _worth_showing(line):
                    print('  ' + line.rstrip(), flush=True)
            try:
                proc.wait(timeout=60 if stopped_by else None)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
        if stopped_by:
            raise SystemExit(f'stopped by {signal.Signals(stopped_by[0]).name} during: {" ".join(cmd)}\n'
                             f'rerun the demo to resume (training stages resume from their last checkpoint)')
        if proc.returncode != 0:
            raise SystemExit(f'stage failed (exit {proc.returncode}): {" ".join(cmd)}\nfull log: {log_path}')


def _worth_showing(line: str) -> bool:
    keys = ('drp/domain_eval_loss/', 'drp/mixture/', 'drp/expected_num_parameters', 'wrote ', ' train / ',
            'Error', 'error:', 'parameters ')
    return any(k in line for k in keys)


def train_command(yaml: str | Path, overrides: dict[str, object]) -> list[str]:
    """``composer -n 1 -m drp_foundry.commands.train YAML key=value ...`` (the launcher users run on GPU nodes)."""
    args = [f'{k}={v}' for k, v in overrides.items()]
    return [sys.executable, '-m', 'composer.cli.launcher', '-n', '1', '-m', 'drp_foundry.commands.train', str(yaml), *args]


def stage_eval_every(steps: int, eval_every: int) -> int:
    """The stage's eval cadence: ``--eval-every``, unless it leaves no eval inside the stage (the scheduler
    updates the mixture only at an eval, and the pre-flight check refuses such a run), then a quarter of it."""
    return eval_every if eval_every < steps else max(1, steps // 4)


def run_overrides(work: Path, run: str, steps: int, save_every: int, eval_every: int) -> dict[str, object]:
    """A training stage's name, length, eval cadence (``stage_eval_every``), checkpoint interval (Composer also
    saves the last step) and output folders under ``work``: ``work/<run>/`` holds its checkpoints,
    ``metrics.jsonl`` and plots."""
    return {'variables.run_name': run, 'variables.steps': steps, 'save_interval': f'{save_every}ba',
            'variables.eval_every': stage_eval_every(steps, eval_every),
            'save_folder': work / run / 'checkpoints',
            'loggers.drp_jsonl.path': work / '{run_name}' / 'metrics.jsonl',
            'callbacks.drp_dynamic_loading.plot_folder': work / '{run_name}' / 'plots'}


def finished(checkpoints: Path, steps: int) -> bool:
    """A training stage is done when its final checkpoint exists (Composer refuses to resume past the end)."""
    return (checkpoints / f'ep0-ba{steps}-rank0.pt').exists()


def l0_constraint_overrides(constraint: str, mask_init: str) -> dict[str, object]:
    """The l0 path's constraint (``--constraint``): ``projection`` (ours, the default: every mask row on its
    ramped target after every step, the temperature annealed over the last 40% and the last 10% trained
    with the export's masks, so the run ends exactly on target in every layer; mask lr 0.1 with importance
    init, which holds the one-shot start) or ``lagrangian`` (the paper's recipe, unchanged)."""
    if constraint == 'lagrangian':
        return {}
    overrides: dict[str, object] = {'algorithms.drp_lagrangian.constraint': 'projection',
                                    'algorithms.drp_lagrangian.anneal_start_fraction': 0.6,
                                    'algorithms.drp_lagrangian.harden_fraction': 0.1}
    if mask_init == 'importance':
        overrides['algorithms.drp_mask_learner.mask_lr'] = 0.1
    return overrides


def fidelity_lines(report: dict) -> list[str]:
    """What the l0 path's export says about the trained masks (``pruning_report.json`` ``fidelity``)."""
    fidelity = report.get('fidelity')
    if not fidelity:
        return []
    lines = [f'  expected size {fidelity["expected_num_parameters"]:,.0f} vs target '
             f'{fidelity["target_num_parameters"]:,} ({fidelity["relative_size_gap"]:+.2%}); undecided mask entries '
             f'{fidelity["undecided_share"]["total"]:.1%}; hardened: {fidelity["hardened"]}']
    for key, row in fidelity['kept_rows'].items():
        counts = sorted(set(row['expected']))
        lines.append(f'  {key}: target {row["target"]}, expected kept per kept layer '
                     f'{counts[0]:g}..{counts[-1]:g}' if len(row['expected']) > 1 else
                     f'  {key}: target {row["target"]}, expected {row["expected"][0]:g}')
    if fidelity.get('masked_loss') is not None:
        lines.append(f'  eval loss: masked model as trained {fidelity["masked_loss"]:.4f}, exported '
                     f'{fidelity["exported_loss"]:.4f}')
    lines += [f'  warning: {w}' for w in fidelity.get('warnings') or []]
    return lines


def scheduler_overrides(policy: str, reference_losses: dict[str, float] | None) -> dict[str, object]:
    """YAML overrides for the scheduler: the policy name and its reference losses (null for
    ``constant``, which takes none; a null key takes the policy's default)."""
    if policy == 'constant' or reference_losses is None:
        return {'variables.policy': policy, 'variables.reference_losses': 'null'}
    return {'variables.policy': policy,
            **{f'variables.reference_losses.{d}': round(v, 4) for d, v in reference_losses.items()}}


def target_reference_losses(work: Path, given: str | None, source_losses: dict[str, float],
                            path: str | None = None) -> tuple[dict[str, float], str]:
    """The reference losses for the scheduler and where they came from (see the module docstring)."""
    if given:
        return {d: float(v) for d, v in json.loads(Path(given).read_text()).items()}, given
    for pilot in ([work / f'loss_continued_{path}_constant.json'] if path else []) + \
            [work / 'loss_continued_constant.json']:
        if pilot.exists():
            return json.loads(pilot.read_text()), f'{pilot} (constant-policy pilot at the target size)'
    return source_losses, 'the source model (a stand-in: run --policy constant first for target-size references)'


def distillation_overrides(source: Path, alpha: float, temperature: float = 1.0) -> dict[str, object]:
    """YAML overrides that add ``drp_distillation`` (the source model as teacher); none when alpha is 0."""
    if alpha <= 0:
        return {}
    return {'algorithms.drp_distillation.teacher': source, 'algorithms.drp_distillation.alpha': alpha,
            'algorithms.drp_distillation.temperature': temperature}


def target_argument(target: dict[str, int] = TARGET) -> str:
    return ','.join(f'{key}={value}' for key, value in target.items())


def _eval(model_dir: Path, data_root: Path, max_seq_len: int, out_json: Path) -> dict[str, float]:
    if out_json.exists():
        return json.loads(out_json.read_text())
    from drp_foundry.composer.domain_eval_losses import evaluate_domains

    losses = evaluate_domains(model_dir, data_root, max_seq_len=max_seq_len, batch_size=8)
    out_json.write_text(json.dumps(losses, indent=2))
    return losses


def _loop_rate(model_dir: Path, data_root: Path, out_json: Path) -> dict:
    """The held-out greedy loop rate of a model folder (``eval/loop_rate.py``), cached in ``out_json``."""
    if out_json.exists():
        return json.loads(out_json.read_text())
    from drp_foundry.eval.loop_rate import heldout_prefixes, loop_rate_of_directory

    summary = loop_rate_of_directory(model_dir, heldout_prefixes(data_root))[0].summary()
    out_json.write_text(json.dumps(summary, indent=2))
    return summary


def _final_mixture(metrics_path: Path, domains: list[str]) -> dict[str, float]:
    from drp_foundry.composer.jsonl_metrics_logger import read_metrics

    series = read_metrics(metrics_path)
    return {d: series[f'drp/mixture/{d}'][-1][1] for d in domains if f'drp/mixture/{d}' in series}


def format_table(rows: dict[str, dict[str, float]], mixtures: dict[str, dict[str, float]]) -> str:
    """Per-domain eval loss of each model, plus mean/worst rows and the mixtures used."""
    domains = list(next(iter(rows.values())))
    names = list(rows)
    header = f'{"domain":>14} ' + ' '.join(f'{n:>10}' for n in names) + ' ' + ' '.join(
        f'{"q " + m:>14}' for m in mixtures)
    lines = [header, '-' * len(header)]
    for d in domains:
        cells = ' '.join(f'{rows[n][d]:10.3f}' for n in names)
        mix = ' '.join(f'{mixtures[m].get(d, float("nan")):14.3f}' for m in mixtures)
        lines.append(f'{d:>14} {cells} {mix}')
    lines.append(f'{"mean":>14} ' + ' '.join(f'{sum(rows[n].values()) / len(domains):10.3f}' for n in names))
    lines.append(f'{"worst":>14} ' + ' '.join(f'{max(rows[n].values()):10.3f}' for n in names))
    return '\n'.join(lines)


def plot_demo(prune_metrics: Path | None, continue_metrics: Path, domains: list[str], out_png: Path) -> None:
    """Mixture over time, per-domain eval loss, expected size against target (one PNG)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from drp_foundry.composer.jsonl_metrics_logger import read_metrics

    prune = read_metrics(prune_metrics) if prune_metrics is not None and prune_metrics.exists() else {}
    cont = read_metrics(continue_metrics)
    offset = max((s for s, _ in prune.get('drp/expected_num_parameters', [(0, 0)])), default=0)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.get_cmap('tab10')
    for i, d in enumerate(domains):
        for ax, key in ((axes[0], f'drp/mixture/{d}'), (axes[1], f'drp/domain_eval_loss/{d}')):
            labelled = False  # the domain's name on its first line (the pruning run's, or the continued one's)
            for series, shift, style in ((prune, 0, '-'), (cont, offset, '--')):
                if key in series:
                    steps, values = zip(*series[key])
                    ax.plot([s + shift for s in steps], values, style, color=colors(i % 10),
                            label=None if labelled else d)
                    labelled = True
    axes[0].set_title('mixture q (solid: pruning, dashed: continued)')
    axes[1].set_title('per-domain eval loss')
    for key, label in (('drp/expected_num_parameters', 'expected'), ('drp/target_num_parameters', 'target')):
        if key in prune:
            steps, values = zip(*prune[key])
            axes[2].plot(steps, [v / 1e6 for v in values], label=label)
    axes[2].set_title('parameters (M) while pruning')
    if 'drp/expected_num_parameters' not in prune:
        axes[2].text(0.5, 0.5, 'no pruning run\n(one-shot path)', ha='center', va='center',
                     transform=axes[2].transAxes)
    for ax in axes:
        ax.set_xlabel('step')
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# Generation-time repetition control for the printed samples, as users print samples: HF ``generate``
# never repeats a 3-gram. (The model's own greedy loop rate, without it, is ``--loop-rate``.)
NO_REPEAT_NGRAM = 3


def generate_samples(model_dir: Path, prompts: Sequence[str], tokens: int = 24) -> list[dict]:
    """Greedy continuations with plain transformers (no drp_foundry code in the loop), ``no_repeat_ngram_size``
    set to ``NO_REPEAT_NGRAM``. One ``{'prompt', 'text'}`` per prompt: ``text`` is prompt + continuation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    samples = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors='pt')
        with torch.no_grad():
            out = model.generate(input_ids=enc['input_ids'], attention_mask=enc['attention_mask'],
                                 max_new_tokens=tokens, do_sample=False, no_repeat_ngram_size=NO_REPEAT_NGRAM,
                                 pad_token_id=tok.pad_token_id)
        samples.append({'prompt': prompt, 'text': tok.decode(out[0], skip_special_tokens=True)})
    return samples


def format_summary(rows: dict[str, dict[str, float]], params: dict[str, int], wall_s: float) -> str:
    """The demo's last lines: one row per model (parameters, mean and worst per-domain eval loss), the wall time."""
    lines = [f'{"model":<10} {"parameters":>12} {"mean loss":>10} {"worst":>8}']
    for name, losses in rows.items():
        lines.append(f'{name:<10} {params[name] / 1e6:11.1f}M {sum(losses.values()) / len(losses):10.3f} '
                     f'{max(losses.values()):8.3f}')
    lines.append(f'wall time: {format_duration(wall_s)}')
    return '\n'.join(lines)


# three fixed prompts for the printed samples
SAMPLE_PROMPTS = ('The history of the city', 'In mathematics, a function', 'The best way to learn')


def check_resources(corpus: Path, source: Path, work: Path, max_seq_len: int) -> list[str]:
    """Resolve every file, recipe and module the demo's stages use, without writing anything.

    Returns one line per resource (what, where); raises ``SystemExit`` naming the first one missing.
    """
    import importlib.util

    from omegaconf import OmegaConf

    from drp_foundry.composer.config_checks import ConfigError, load_train_config

    lines = []
    listed = subprocess.run([sys.executable, '-m', 'drp_foundry.commands.data_prep', '--corpus', str(corpus), '--list'],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise SystemExit(f'--corpus {corpus}: {listed.stderr.strip()}')
    lines.append(f'corpus     {corpus} ({listed.stdout.strip()})')
    lines.append(f'source     {source} (config.json)')
    overrides = {'variables.data_root': work / 'data', 'variables.max_seq_len': max_seq_len,
                 'variables.source_model': source, 'variables.model_dir': work / 'models' / 'pruned'}
    for recipe in (PRUNE_RECIPE, CONTINUE_RECIPE):
        try:
            cfg = load_train_config(recipe, [f'{k}={v}' for k, v in overrides.items()])
            resolved = OmegaConf.to_container(cfg, resolve=True)
        except (ConfigError, ValueError) as err:
            raise SystemExit(f'recipe {recipe}: {err}') from None
        lines.append(f'recipe     {recipe} (train_loader {resolved["train_loader"]["name"]}, '
                     f'model {resolved["model"]["pretrained_model_name_or_path"]})')
    for module in STAGE_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise SystemExit(f'module {module} is not importable; reinstall drp-foundry (pip install drp-foundry)')
        lines.append(f'module     {module} ({spec.origin})')
    return lines


def resolve_precision(choice: str) -> str:
    """``--precision``: ``auto`` is bf16 where the CPU has bf16 matrix instructions, else fp32 (emulated bf16, on an
    AVX2-only CPU, is many times slower than fp32: ``drp_foundry/composer/cpu_autocast.py``)."""
    if choice != 'auto':
        return choice
    from drp_foundry.composer.cpu_autocast import native_cpu_bf16

    return 'bf16' if native_cpu_bf16() else 'fp32'


def run_demo(args) -> int:
    """The six stages, for the options ``drp-demo`` parsed (an ``argparse.Namespace``; drp_foundry/commands/demo.py)."""
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

    if args.corpus is None:
        args.corpus = str(DEMO_CORPUS)
    work = Path(args.work).resolve()
    source = Path(args.source).resolve()
    if not (source / 'config.json').is_file():
        raise SystemExit(f'--source {source}: no HF model there; run `make setup` or `python -m '
                         'drp_foundry.commands.smollm2 --out models/smollm2-135m` (it converts SmolLM2-135M), or '
                         'pass --source DIR')
    if args.check:
        for line in check_resources(Path(args.corpus).resolve(), source, work, args.max_seq_len):
            print(line)
        print('demo check: every resource resolved')
        return 0
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    data_root = work / 'data'
    logs = work / 'logs'
    started = time.time()

    t = _stage('1/6 data_prep: corpus -> per-domain MDS (SmolLM2 tokenizer)')
    run_logged([sys.executable, '-m', 'drp_foundry.commands.data_prep', '--corpus', str(args.corpus), '--out',
                str(data_root), '--tokenizer', str(source), '--max-seq-len', str(args.max_seq_len),
                '--min-eval-samples', '8', '--max-eval-samples', '16', '--overwrite'], logs / 'data_prep.log')
    from drp_foundry.data.manifest import read_manifest

    domains = list(read_manifest(data_root)['domains'])
    print(f'  {len(domains)} domains: {", ".join(domains)} ({time.time() - t:.0f}s)')

    t = _stage('2/6 per-domain loss of the source model')
    source_losses = _eval(source, data_root, args.max_seq_len, work / 'loss_source.json')
    print('  ' + ', '.join(f'{d} {v:.3f}' for d, v in source_losses.items()) + f' ({time.time() - t:.0f}s)')

    references, origin = target_reference_losses(work, args.reference_losses, source_losses, args.path)
    if args.policy != 'constant':
        print(f'  reference losses from {origin}')
    common = {'variables.data_root': data_root, 'variables.max_seq_len': args.max_seq_len,
              'variables.global_seed': args.seed,
              **scheduler_overrides(args.policy, references)}
    prune_run = f'demo-prune-{args.policy}'
    pruned_dir = work / 'models' / f'pruned-{args.path}-{args.policy}'
    extras = distillation_overrides(source, args.distill_alpha)  # the training stages' added algorithms
    if args.precision == 'auto':
        args.precision = resolve_precision(args.precision)
        print(f'  precision: {args.precision} (--precision auto: this CPU '
              f'{"has" if args.precision == "bf16" else "has no"} bf16 matrix instructions)')
    if args.precision == 'bf16':  # Composer does not autocast on CPU; drp_cpu_autocast does
        extras['algorithms.drp_cpu_autocast.dtype'] = 'bfloat16'
    if args.unlikelihood_alpha > 0:
        extras['algorithms.drp_unlikelihood.alpha'] = args.unlikelihood_alpha
    if args.sequence_unlikelihood_alpha > 0:
        extras['algorithms.drp_sequence_unlikelihood.alpha'] = args.sequence_unlikelihood_alpha
        extras['algorithms.drp_sequence_unlikelihood.every'] = args.sequence_unlikelihood_every
        extras['algorithms.drp_sequence_unlikelihood.start'] = args.sequence_unlikelihood_start
    if args.path == 'oneshot':
        t = _stage('3/6 prune: one-shot activation importance (drp-prune-oneshot)')
        if (pruned_dir / 'pruning_report.json').exists():
            print('  already done')
        else:
            run_logged([sys.executable, '-m', 'drp_foundry.commands.oneshot', str(source), str(pruned_dir), '--target',
                        target_argument(), '--calibration', str(data_root), '--num-sequences', '64', '--seq-len',
                        str(args.max_seq_len), '--overwrite'], logs / 'prune.log')
        print(f'  ({time.time() - t:.0f}s)')
        _stage('4/6 export: not needed (the one-shot tool wrote the HF directory)')
    else:
        t = _stage(f'3/6 prune ({args.prune_steps} steps, policy {args.policy}, masks {args.mask_init})')
        if finished(work / prune_run / 'checkpoints', args.prune_steps):
            print('  already done')
        else:
            run_logged(train_command(PRUNE_RECIPE, {
                **common, **run_overrides(work, prune_run, args.prune_steps, args.save_every, args.eval_every), 'variables.source_model': source,
                'algorithms.drp_mask_learner.init': args.mask_init,
                **l0_constraint_overrides(args.constraint, args.mask_init), **extras}), logs / 'prune.log')
        print(f'  ({time.time() - t:.0f}s)')

        t = _stage('4/6 export: fold masks, slice, write a HF directory')
        run_logged([sys.executable, '-m', 'drp_foundry.commands.export',
                    str(work / prune_run / 'checkpoints' / 'latest-rank0.pt'), str(pruned_dir), '--overwrite',
                    '--source', str(source), '--eval-data', str(work / 'data'),
                    '--eval-seq-len', str(args.max_seq_len)], logs / 'export.log')
        for line in fidelity_lines(json.loads((pruned_dir / 'pruning_report.json').read_text())):
            print(line)
        print(f'  ({time.time() - t:.0f}s)')

    continue_run = f'demo-continue-{args.path}-{args.policy}'
    t = _stage(f'5/6 continued pretraining ({args.continue_steps} steps, policy {args.policy})')
    if finished(work / continue_run / 'checkpoints', args.continue_steps):
        print('  already done')
    else:
        run_logged(train_command(CONTINUE_RECIPE, {
            **common, **run_overrides(work, continue_run, args.continue_steps, args.save_every, args.eval_every), 'variables.model_dir': pruned_dir,
            'optimizer.lr': args.continue_lr, **extras,
            'callbacks.hf_checkpointer.save_folder': work / continue_run / 'hf'}), logs / 'continue.log')
    continued_dir = work / continue_run / 'hf' / 'huggingface' / 'final'  # hf_checkpointer's layout
    from drp_foundry.hf_tied_weights import store_tied_output_embedding

    store_tied_output_embedding(continued_dir)  # hf_checkpointer leaves a tied lm_head out, as save_pretrained does
    print(f'  ({time.time() - t:.0f}s)')

    t = _stage('6/6 evaluate, tabulate, plot')
    rows = {'source': source_losses,
            'pruned': _eval(pruned_dir, data_root, args.max_seq_len, work / f'loss_pruned_{args.path}_{args.policy}.json'),
            'continued': _eval(continued_dir, data_root, args.max_seq_len,
                               work / f'loss_continued_{args.path}_{args.policy}.json')}
    prune_metrics = work / prune_run / 'metrics.jsonl' if args.path == 'l0' else None
    mixtures = {'continue': _final_mixture(work / continue_run / 'metrics.jsonl', domains)}
    if prune_metrics is not None:
        mixtures = {'prune': _final_mixture(prune_metrics, domains), **mixtures}
    table = format_table(rows, mixtures)
    from drp_foundry.model_card import add_domain_losses

    add_domain_losses(pruned_dir, rows, note=(
        f'Measured by the CPU demo (`drp-demo`, policy {args.policy}): eval loss in nats/token on '
        f'{args.max_seq_len}-token held-out samples of the demo corpus. `continued` is this model after '
        f'{args.continue_steps} steps of continued pretraining (not the weights in this folder).'))
    plot_demo(prune_metrics, work / continue_run / 'metrics.jsonl', domains,
              work / f'demo_{args.policy}.png')
    report = json.loads((pruned_dir / 'pruning_report.json').read_text())
    samples = generate_samples(continued_dir, SAMPLE_PROMPTS)
    loop_rates = None
    if args.loop_rate:
        loop_rates = {'source': _loop_rate(source, data_root, work / 'loop_rate_source.json'),
                      'continued': _loop_rate(continued_dir, data_root,
                                              work / f'loop_rate_continued_{args.path}_{args.policy}.json')}
    summary = {'policy': args.policy, 'path': args.path, 'seed': args.seed, 'distill_alpha': args.distill_alpha,
               'constraint': args.constraint if args.path == 'l0' else None, 'export_fidelity': report.get('fidelity'),
               'unlikelihood_alpha': args.unlikelihood_alpha,
               'sequence_unlikelihood_alpha': args.sequence_unlikelihood_alpha,
               'train_tokens': (args.prune_steps * (args.path == 'l0') + args.continue_steps) * 4 * args.max_seq_len,
               'losses': rows, 'final_mixtures': mixtures,
               'params_source': report['params_before'], 'params_pruned': report['params_after'],
               'samples': samples, 'loop_rates': loop_rates, 'wall_time_s': round(time.time() - started, 1)}
    (work / f'demo_{args.policy}.json').write_text(json.dumps(summary, indent=2))
    print(f'\nPer-domain eval loss (nats/token, {args.max_seq_len}-token samples) and the final mixtures q:')
    print(table)
    print(f'\nparameters: source {report["params_before"]:,} -> pruned {report["params_after"]:,}')
    print(f'greedy samples from the continued model (24 new tokens each, no_repeat_ngram_size={NO_REPEAT_NGRAM}):')
    for sample in samples:
        print(f'  {sample["text"]!r}')
    if loop_rates is not None:
        print(f'greedy loop rate without repetition control ({loop_rates["source"]["prefixes"]} held-out prefixes of '
              f'16 tokens, 24 new tokens; the screen also flags real repetition, e.g. in code): source '
              f'{loop_rates["source"]["loops"]} ({loop_rates["source"]["overall"]:.0%}), continued '
              f'{loop_rates["continued"]["loops"]} ({loop_rates["continued"]["overall"]:.0%})')
    print(f'plots: {work / f"demo_{args.policy}.png"}; report: {work / f"demo_{args.policy}.json"}; '
          f'model card: {pruned_dir / "README.md"}')
    print()
    print(format_summary(rows, {'source': report['params_before'], 'pruned': report['params_after'],
                                'continued': report['params_after']}, time.time() - started))
    return 0

