"""The pruning paths of the quality benches, as one functional training loop (no Trainer).

Shared by ``bench/quality_per_token.py`` (SmolLM2-135M) and ``bench/pruning_budget.py`` (a tiny
pretrained Llama over a range of budgets). Every path runs through the functional APIs the Composer
algorithms wrap (``apply_mask_learner``, ``init_masks_from_importance``, ``apply_lagrangian``,
``apply_projection``, ``apply_distillation``, ``oneshot_prune``, ``fold_and_slice``) and is trained the way
the recipes train:

- **one learning-rate schedule over the whole budget** (linear warm-up, then cosine to 10%), whatever the
  stages: a path that prunes for the first ``prune_steps`` and continues after the export follows the
  same multiplier curve as a path that trains its pruned model from step 0 (a fresh AdamW state at the
  export, whose parameters change shape);
- **gradient clipping of every trained parameter** (norm 1.0), masks and multipliers included, as
  Composer's ``gradient_clipping`` does in the recipes (they are parameters of the model);
- the constraint driven step by step as ``drp_lagrangian`` drives it in a Trainer (``MaskSchedule``):
  the paper's Lagrangian, or the projection (ours) with the temperature anneal over the last 40% and the
  export's masks trained, frozen, over the last 10% of the pruning stage.

Paths (``PATH_NAMES``): ``l0_constant`` (the paper: constant init, target ramped over 20% of the
pruning stage), ``l0_importance`` (masks start at the one-shot model: 0/1 at the log-alpha clamps, no
ramp), ``oneshot_fixed`` (the control: the one-shot masks held fixed while the masked source trains
for the pruning share; the pruning stage of ``l0_importance`` without mask learning), ``oneshot``
(one-shot activation-importance pruning, then the pruned model trains on every token), ``random``
(the target architecture from random init). Each may distil the frozen source in.

FLOPs (``training_flops``): per token, 2 x the weights of every linear layer (LM head included) plus
2 x layers x sequence x attention width (QK^T and AV, as Kaplan et al. count it) for a forward pass,
x3 for a training step (forward and backward); a distilled step adds the teacher's forward. The
masked source trains at the source's cost (masks do not remove compute before the export).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from drp_foundry.composer.distillation import apply_distillation
from drp_foundry.composer.lagrangian_updater import apply_lagrangian, apply_projection
from drp_foundry.composer.mask_learner import apply_mask_learner, find_mask_module, init_masks_from_importance
from drp_foundry.oneshot import oneshot_prune
from drp_foundry.pruning import hard_concrete
from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.export import fold_and_slice


def bench_module(name: str):
    """A sibling script of bench/ as a module, loaded by file path (bench/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name(f'{name}.py'))
        module = sys.modules[name] = importlib.util.module_from_spec(spec)  # before it runs: dataclasses look it up
        spec.loader.exec_module(module)
    return sys.modules[name]

PATH_NAMES = {
    'l0_constant': 'L0 masks from constant init (the paper)',
    'l0_importance': 'L0 masks from importance init (the one-shot model)',
    'oneshot_fixed': 'one-shot masks held fixed in the pruning share (control)',
    'oneshot': 'one-shot, then the pruned model trains',
    'random': 'random init, same architecture',
}
MASKED_PATHS = ('l0_constant', 'l0_importance', 'oneshot_fixed')
LAGRANGIAN_RAMP_FRACTION = 0.2  # of the pruning stage (Sheared LLaMA: 640 of 3,200)
ANNEAL_START_FRACTION = 0.6  # the demo's and the recipes' projection settings (docs/PRUNING.md)
HARDEN_FRACTION = 0.1


@dataclass
class PathSettings:
    """Everything a path's numbers depend on besides its data and its source."""
    steps: int  # the whole budget, in optimizer steps
    prune_fraction: float = 0.2  # share of the steps spent with masks (masked paths)
    lr: float = 3e-4
    warmup_fraction: float = 0.03  # of the whole budget
    mask_lr: float = 1.0
    lambda_lr: float = 1.0
    constraint: str = 'projection'  # of the learned-mask paths: 'projection' (ours) or 'lagrangian' (the paper)
    distill_alpha: float = 0.5  # 0: no distillation
    temperature: float = 1.0  # of the distillation
    clip: float = 1.0
    bf16: bool = True  # CPU bf16 autocast (fp32 weights); a tiny model runs faster in fp32

    @property
    def prune_steps(self) -> int:
        return int(round(self.prune_fraction * self.steps))


# --- data, schedule, evaluation ------------------------------------------------------------

def training_batches(train: dict[str, torch.Tensor], steps: int, batch_size: int, seed: int,
                     proportions) -> list[torch.Tensor]:
    """Every path's batches: a seeded domain draw per sample (``proportions`` over ``train``'s domains, in
    order), each domain's rows in a seeded cycle, reshuffled at each pass."""
    import numpy as np

    domains = list(train)
    weights = np.asarray(proportions, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.choice(len(domains), size=steps * batch_size, p=weights / weights.sum())
    orders = {d: rng.permutation(len(train[d])) for d in domains}
    used = {d: 0 for d in domains}
    rows = []
    for index in draws:
        domain = domains[index]
        order = orders[domain]
        rows.append(train[domain][order[used[domain] % len(order)]])
        used[domain] += 1
        if used[domain] % len(order) == 0:
            orders[domain] = rng.permutation(len(order))
    return [torch.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


# --------------------------------------------------------

def lr_multiplier(step: int, steps: int, warmup: int, alpha_f: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to ``alpha_f`` at ``steps`` (one curve per budget)."""
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


@torch.no_grad()
def evaluate(model, eval_sets: dict[str, torch.Tensor], bf16: bool = False, batch: int = 8) -> dict[str, float]:
    """Mean next-token loss per domain (nats/token) over its eval rows; the model in eval mode."""
    was_training = model.training
    model.eval()
    losses = {}
    for domain, rows in eval_sets.items():
        total, count = 0.0, 0
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=chunk).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     chunk[:, 1:].reshape(-1), reduction='sum')
            total += float(loss)
            count += chunk[:, 1:].numel()
        losses[domain] = total / count
    model.train(was_training)
    return losses


def finish_plot(fig, ax, out, *, title: str, xlabel: str, ylabel: str, source_mean: float, source_label: str) -> None:
    """The benches' plots: the source's loss as a dotted line, labels, legend, saved to ``out`` and closed."""
    import matplotlib.pyplot as plt

    ax.axhline(source_mean, color='grey', linestyle=':', label=source_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def forward_flops_per_token(model, seq_len: int) -> float:
    """2 x the weights of every linear layer + 2 x layers x sequence x attention width (module doc)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    head_dim = getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads
    attention = 2 * config.num_hidden_layers * seq_len * config.num_attention_heads * head_dim
    return 2.0 * linear + attention


# --- the constraint, step by step ----------------------------------------------------------

class MaskSchedule:
    """What ``drp_lagrangian`` does in a Trainer, for a plain loop of ``steps`` pruning steps.

    ``constraint='lagrangian'``: the paper's penalty, target ramped over ``warmup`` steps.
    ``constraint='projection'`` (ours): every row on its ramped target after every step, the temperature
    annealed from ``ANNEAL_START_FRACTION`` and the export's masks trained, frozen, over the last
    ``HARDEN_FRACTION``. ``constraint='fixed'``: the masks as they are (the deterministic target masks
    in every forward, nothing learned: the one-shot control).
    """

    def __init__(self, model, constraint: str, steps: int, warmup: int):
        self.mask_module = find_mask_module(model)
        self.model, self.constraint, self.steps, self.warmup = model, constraint, steps, warmup
        self.harden_step = steps - int(round(HARDEN_FRACTION * steps)) if constraint == 'projection' else steps + 1
        self.anneal_step = int(round(ANNEAL_START_FRACTION * steps))
        self.frozen: Optional[list[torch.Tensor]] = None
        if constraint == 'fixed':
            self.mask_module.hardened = True
        elif constraint == 'projection':
            apply_projection(model, 0, warmup)  # after importance init, before the first forward
        elif constraint != 'lagrangian':
            raise ValueError(f'constraint must be lagrangian, projection or fixed, got {constraint!r}')

    def temperature(self, step: int) -> float:
        if self.constraint != 'projection':
            return hard_concrete.TEMPERATURE
        return hard_concrete.annealed_temperature(step, self.anneal_step, self.harden_step, 0.1)

    def before_step(self, step: int) -> None:
        if self.constraint == 'fixed':
            return
        self.mask_module.temperature = self.temperature(step)
        if step >= self.harden_step and self.frozen is None:
            self.mask_module.hardened = True
            self.mask_module.harden_()
            apply_projection(self.model, step, self.warmup)
            self.frozen = [p.detach().clone() for p in self.mask_module.mask_parameters()]

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if self.constraint == 'lagrangian':
            return apply_lagrangian(self.model, loss, step, self.warmup)
        self.mask_module.take_size_terms()  # no multipliers: nothing to add
        return loss

    def after_step(self, step: int) -> None:
        if self.frozen is not None:  # undo the optimizer step on the frozen masks
            with torch.no_grad():
                for param, frozen in zip(self.mask_module.mask_parameters(), self.frozen):
                    param.copy_(frozen)
        elif self.constraint == 'projection':
            self.mask_module.temperature = self.temperature(step + 1)
            apply_projection(self.model, step + 1, self.warmup)


# --- one path ------------------------------------------------------------------------------

class Clock:
    """A path's step, token and FLOP counts, wall and CPU time, and eval history."""

    def __init__(self, key: str, eval_sets, log: Callable[[str], None], plot_samples: int = 8, bf16: bool = False):
        self.key, self.eval_sets, self.log, self.plot_samples, self.bf16 = key, eval_sets, log, plot_samples, bf16
        self.step = self.tokens = 0
        self.flops = 0.0
        self.started, self.cpu_started = time.time(), time.process_time()
        self.history: list[dict] = []

    def record(self, model, stage: str, final: bool = False) -> dict[str, float]:
        """Eval along the way: the first ``plot_samples`` rows per domain (bf16 when training is); final: all
        rows, fp32."""
        sets = self.eval_sets if final else {d: rows[:self.plot_samples] for d, rows in self.eval_sets.items()}
        losses = evaluate(model, sets, bf16=self.bf16 and not final)
        mean = sum(losses.values()) / len(losses)
        self.history.append({'step': self.step, 'tokens': self.tokens, 'flops': self.flops, 'stage': stage,
                             'mean': mean, 'worst': max(losses.values()), 'losses': losses,
                             'wall_s': round(time.time() - self.started, 1)})
        self.log(f'  ({self.key}) {stage:>16} tokens {self.tokens:>8,}  mean {mean:.3f}  worst {max(losses.values()):.3f}'
                 f'  [{time.time() - self.started:.0f}s]')
        return losses


def train_stage(clock: Clock, model, optimizer, batches, settings: PathSettings, *, teacher=None,
                teacher_flops: float = 0.0, schedule: Optional[MaskSchedule] = None, eval_every: int = 0,
                stage: str = 'train') -> None:
    """Train on ``batches`` from ``clock.step`` on, on the budget's one learning-rate curve."""
    warmup = max(1, int(round(settings.warmup_fraction * settings.steps)))
    step_flops = 3 * forward_flops_per_token(model, batches[0].shape[1]) + teacher_flops
    params = [p for group in optimizer.param_groups for p in group['params']]
    model.train()
    for local, batch in enumerate(batches):
        multiplier = lr_multiplier(clock.step, settings.steps, warmup)
        for group in optimizer.param_groups:
            group['lr'] = group['initial_lr'] * multiplier
        if schedule is not None:
            schedule.before_step(local)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=settings.bf16):
            outputs = model(input_ids=batch, labels=batch)
            loss = outputs.loss
            if teacher is not None:
                loss, _ = apply_distillation(loss, outputs.loss, outputs.logits, teacher,
                                             {'input_ids': batch, 'labels': batch}, settings.distill_alpha,
                                             settings.temperature)
        if schedule is not None:
            loss = schedule.loss(loss, local)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.clip)
        optimizer.step()
        if schedule is not None:
            schedule.after_step(local)
        clock.step += 1
        clock.tokens += batch.numel()
        clock.flops += step_flops * batch.numel()
        if eval_every and (local + 1) % eval_every == 0 and local + 1 < len(batches):
            clock.record(model, f'{stage} {local + 1}')


def kept_layer_counts(mask_module) -> dict[str, object]:
    """Eval-mode (expected) counts of the kept layers only (a pruned layer's rows do not matter)."""
    counts = mask_module.keep_counts('expected')
    kept = mask_module.deterministic('target')['layer'] > 0 if 'layer' in mask_module.granularities else None
    out: dict[str, object] = {}
    for key, value in counts.items():
        if torch.is_tensor(value) and value.dim() == 1:
            rows = value if kept is None else value[kept[:len(value)]]
            out[key] = sorted(set(int(v) for v in rows.tolist()))
        else:
            out[key] = int(value)
    return out


def target_architecture(source_config, target: dict) -> object:
    """The HF config of the target architecture of ``source_config`` (for the random-init path)."""
    import copy

    config = copy.deepcopy(source_config)
    pruned = DecoderArchitecture.from_hf_config(config).pruned(TargetArchitecture(**target))
    for name, value in (('num_hidden_layers', pruned.num_layers), ('hidden_size', pruned.hidden_size),
                        ('num_attention_heads', pruned.num_heads), ('num_key_value_heads', pruned.num_kv_heads),
                        ('intermediate_size', pruned.intermediate_size), ('head_dim', pruned.head_dim)):
        setattr(config, name, value)
    return config


def run_path(key: str, load_source: Callable[[], torch.nn.Module], target: dict, batches: list[torch.Tensor],
             calibration: list[torch.Tensor], eval_sets, settings: PathSettings, log: Callable[[str], None],
             *, seed: int, evals: int = 0, plot_samples: int = 8) -> dict:
    """Train path ``key`` (``PATH_NAMES``) on ``batches`` (the whole budget) and score it on ``eval_sets``."""
    if key not in PATH_NAMES:
        raise ValueError(f'unknown path {key!r}; one of {sorted(PATH_NAMES)}')
    if len(batches) != settings.steps:
        raise ValueError(f'{len(batches)} batches for a budget of {settings.steps} steps')
    torch.manual_seed(seed)
    clock = Clock(key, eval_sets, log, plot_samples, bf16=settings.bf16)
    seq_len = batches[0].shape[1]
    teacher = None
    teacher_flops = 0.0
    if settings.distill_alpha > 0 and key != 'random':
        teacher = load_source()
        teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        teacher_flops = forward_flops_per_token(teacher, seq_len)
    prune_steps = settings.prune_steps if key in MASKED_PATHS else 0
    rest = batches[prune_steps:]
    eval_every = max(1, len(rest) // evals) if evals else 0
    report: dict = {}

    if key in MASKED_PATHS:
        model = load_source()
        optimizer = make_optimizer(model, settings.lr)
        init = 'constant' if key == 'l0_constant' else 'importance'
        masks = apply_mask_learner(model, target, None if key == 'oneshot_fixed' else optimizer,
                                   mask_lr=settings.mask_lr, lambda_lr=settings.lambda_lr, init=init)
        if init == 'importance':
            init_masks_from_importance(model, [{'input_ids': b} for b in calibration])
        constraint = 'fixed' if key == 'oneshot_fixed' else settings.constraint
        warmup = int(round(LAGRANGIAN_RAMP_FRACTION * prune_steps)) if init == 'constant' else 0
        schedule = MaskSchedule(model, constraint, prune_steps, warmup)
        if init == 'importance':  # the one-shot model: masks 0/1 at the clamps, scored with the export's counts
            masks.eval_mode, eval_mode = 'target', masks.eval_mode
            clock.record(model, 'step 0 (masked)')
            masks.eval_mode = eval_mode
        train_stage(clock, model, optimizer, batches[:prune_steps], settings, teacher=teacher,
                    teacher_flops=teacher_flops, schedule=schedule, stage='prune')
        model.eval()
        report['expected_params_at_export'] = float(masks.size_terms(detach=True).num_parameters)
        report['target_params'] = float(masks.target_num_parameters())
        report['kept_layer_counts'] = kept_layer_counts(masks)
        report['masked_eval'] = evaluate(model, eval_sets)
        pruned, _ = fold_and_slice(model, masks.deterministic('target'))
        del model, optimizer
        model = pruned.float()
        exported = clock.record(model, 'exported', final=True)
        report['exported_eval'] = exported
        log(f'  ({key}) end of pruning: expected {report["expected_params_at_export"] / 1e6:.3f}M of '
            f'{report["target_params"] / 1e6:.3f}M target; kept-layer counts {report["kept_layer_counts"]}')
    elif key == 'oneshot':
        source = load_source()
        model, _, _ = oneshot_prune(source, target, [row for batch in calibration for row in batch])
        del source
        clock.record(model, 'one-shot')
    else:
        source = load_source()
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(target_architecture(source.config, target), torch_dtype=torch.float32)
        del source
        clock.record(model, 'random init')
    model.train()
    optimizer = make_optimizer(model, settings.lr)
    train_stage(clock, model, optimizer, rest, settings, teacher=teacher, teacher_flops=teacher_flops,
                eval_every=eval_every, stage='continue')
    final = clock.record(model, 'final', final=True)
    return {'key': key, 'name': PATH_NAMES[key], 'steps': clock.step, 'tokens': clock.tokens,
            'prune_tokens': prune_steps * batches[0].numel(), 'flops': clock.flops, 'final': final,
            'mean': sum(final.values()) / len(final), 'worst': max(final.values()),
            'params': sum(p.numel() for p in model.parameters()), 'wall_s': round(time.time() - clock.started, 1),
            'cpu_s': round(time.process_time() - clock.cpu_started, 1), 'history': clock.history, **report}
