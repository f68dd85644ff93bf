"""Learn hard-concrete L0 masks on a stock HF decoder inside Composer (paper section 2.1).

``apply_mask_learner`` puts an ``L0MaskModule`` into the HF model (``hf_model.drp_masks``,
hooks from ``drp_foundry.pruning.hf_injection``) and adds two param groups to the
optimizer: the log-alphas (``lr=mask_lr``) and the Lagrange multipliers
(``lr=lambda_lr``), both with ``weight_decay=0``. The multipliers ascend the Lagrangian
through a gradient-reversal inside the penalty (``pruning/lagrangian.py``), so both groups
use a positive lr with any optimizer; no negative lr and no parameter hooks.

Ordering in Composer 0.32 ``Trainer.__init__`` (checked in composer/trainer/trainer.py):

1. LLM-Foundry builds the optimizer from the model *before* the Trainer (the masks do not
   exist yet; a ``param_groups``/``param_str_match`` entry cannot name them).
2. ``Event.INIT`` runs -> ``MaskLearner`` injects the masks, validates the target against the
   source model and adds the two groups. A target that cannot be reached fails here,
   before any training step.
3. The Composer schedulers are compiled (``LambdaLR`` reads ``initial_lr`` of every group
   present now, ours included): the mask and lambda learning rates follow the same
   multiplier as the model's (warm-up, cosine decay), as in the research code. With
   ``mask_lr_follows_schedule=False`` the two groups are reset to their base lr at every
   ``BATCH_START`` instead. A PyTorch ``LRScheduler`` object built before the Trainer never
   sees our groups; they then stay at their base lr.
4. FSDP wraps the model (the masks are in the root unit; several param groups need
   ``use_orig_params: true``, checked at INIT) and rebuilds the param groups by name.
   FSDP2 (Composer's ``FSDP2Config``: ``fsdp_config`` with env ``FSDP_VERSION=2``; the one
   sharding that also runs on CPU with gloo) works as well: ``fully_shard`` registers its
   unshard pre-hook with ``prepend=True``, so it runs before our top-model pre-hook whatever
   the registration order, and the pre-hook reads full log-alphas. What FSDP2 changes: an
   in-place clamp inside the forward touches only the gathered copy, so under FSDP2 the
   sharded log-alphas are clamped at ``BATCH_START`` (element-wise, so clamping the shards
   is clamping the whole); importance init writes the shards of the computed log-alphas.
   Under FSDP2 the mask module is also its own ``fully_shard`` unit with a float32 policy
   (``shard_mask_module``), sharded at INIT before Composer shards the model: the masks and
   lambdas stay float32 in the forward and in the gradient reduction whatever
   ``fsdp_config.mixed_precision`` casts the weights to.
   With Foundry's ``init_device: mixed`` the HF model is on the meta device on ranks > 0;
   the masks are then created on the CPU (FSDP moves them, ``sync_module_states``
   broadcasts rank 0's values).
5. The checkpoint is loaded: the masks and lambdas are model parameters
   (``model.drp_masks.*``) and the optimizer state has the same groups as when it was saved,
   so a resumed run continues exactly. The mask noise does not use the global RNG (Composer
   re-seeds it at start and restores it only at an epoch start): it is counter-based, seeded
   at INIT from ``rank_zero_seed`` and the rank, with the draw counter in the masks' extra
   state, so a resumed run draws the noise of the uninterrupted one. ``mask_noise: shared``
   (ours) draws rank 0's noise on every rank: one mask sample per microbatch index for the
   whole global batch, so the run does not depend on how the batch is split over ranks.

Every batch (``BATCH_END``) the algorithm logs through Composer's logger the expected kept
fraction ``drp/expected_size/<granularity>`` (for head and intermediate: the mean over layers
of the per-layer fractions the Lagrangian constrains, with ``drp/expected_size_min/`` and
``drp/expected_size_max/`` beside it) and final target ``drp/target_size/<granularity>``,
``drp/expected_num_parameters`` and ``drp/target_num_parameters`` and the multipliers
``drp/lambda_1/<granularity>``, ``drp/lambda_2/<granularity>``. The Lagrangian term itself is
logged by ``LagrangianUpdater``.

At ``FIT_END`` (ours, issue 26) it says whether export will cut the model the run trained
(``drp_foundry.pruning.fidelity.mask_fidelity``): it logs ``drp/fidelity/relative_size_gap``,
``drp/fidelity/worst_row_gap`` and ``drp/fidelity/undecided_share`` and warns, naming the figures,
when one is past its tolerance.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist, ensure_tuple
from transformers import PreTrainedModel

from drp_foundry.composer.hf_model import unwrap_hf_model
from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.expected_size import GRANULARITIES
from drp_foundry.pruning.hf_injection import get_mask_module, inject_masks, shard_mask_module
from drp_foundry.pruning.mask_module import EVAL_MODES, INIT_MODES, MASK_VALUES, L0MaskModule

log = logging.getLogger(__name__)

__all__ = ['MaskLearner', 'apply_mask_learner', 'find_hf_model', 'find_mask_module', 'add_mask_param_groups',
           'reshape_scalar_lambda_state',
           'init_masks_from_importance', 'mask_metrics']

GROUP_KEY = 'drp_group'  # marks our param groups: 'masks' or 'lambdas'
MASK_NOISE_MODES = ('per_rank', 'shared')


def is_fsdp2(state: State) -> bool:
    """Whether the run shards with FSDP2 (Composer's ``FSDP2Config``), not FSDP (v1)."""
    from composer.utils.parallelism import FSDP2Config

    return isinstance(state.fsdp_config, FSDP2Config)


def find_hf_model(model: torch.nn.Module) -> PreTrainedModel:
    """The HF ``*ForCausalLM`` itself, or the one inside a Composer HF wrapper (``.model``)."""
    inner = unwrap_hf_model(model)
    if isinstance(inner, PreTrainedModel):
        return inner
    raise TypeError(f'{type(model).__name__} is neither a HF PreTrainedModel nor a Composer HF wrapper with one as '
                    f'.model; drp_mask_learner needs model.name: hf_causal_lm (Llama, Mistral or Qwen2)')


def find_mask_module(model: torch.nn.Module) -> L0MaskModule:
    """The ``L0MaskModule`` attached by ``apply_mask_learner``."""
    mask_module = get_mask_module(find_hf_model(model))
    if mask_module is None:
        raise RuntimeError('the model carries no L0 masks: add the drp_mask_learner algorithm (or call '
                           'apply_mask_learner) before drp_lagrangian')
    return mask_module


def add_mask_param_groups(optimizer: torch.optim.Optimizer, mask_module: L0MaskModule, mask_lr: float,
                          lambda_lr: float) -> None:
    """Add the log-alphas and lambdas as two param groups (weight decay 0); move them out of other groups."""
    ours = {id(p) for p in mask_module.parameters()}
    for group in optimizer.param_groups:
        if group.get(GROUP_KEY) is not None:
            raise ValueError('the optimizer already holds drp_foundry mask param groups; apply the mask learner once')
        group['params'] = [p for p in group['params'] if id(p) not in ours]
    for name, params, lr in (('masks', mask_module.mask_parameters(), mask_lr),
                             ('lambdas', mask_module.lambda_parameters(), lambda_lr)):
        optimizer.add_param_group({'params': params, 'lr': lr, 'initial_lr': lr, 'weight_decay': 0.0,
                                   GROUP_KEY: name})


def reshape_scalar_lambda_state(optimizer: torch.optim.Optimizer) -> int:
    """Give the optimizer state of the lambda group the (1,) shape of its parameters; returns how many tensors changed.

    Checkpoints written while the lambdas were scalars hold scalar moments (e.g. Adam's ``exp_avg``) that an
    update of a (1,) parameter cannot write into; ``step`` counters stay scalars.
    """
    changed = 0
    for group in optimizer.param_groups:
        if group.get(GROUP_KEY) != 'lambdas':
            continue
        for param in group['params']:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if key != 'step' and isinstance(value, torch.Tensor) and value.dim() == 0 and param.dim() == 1:
                    state[key] = value.reshape(1)
                    changed += 1
    return changed


def apply_mask_learner(model: torch.nn.Module, target: Union[TargetArchitecture, Mapping[str, Any]],
                       optimizers: Optional[Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]]] = None,
                       mask_lr: float = 1.0, lambda_lr: float = 1.0, granularities: Iterable[str] = GRANULARITIES,
                       init_mean: float = 5.0, init_std: float = 0.01,
                       eval_mask_mode: str = 'expected', key_prefix: str = 'target',
                       init: str = 'constant', mask_values: Optional[str] = None) -> L0MaskModule:
    """Attach L0 masks to ``model`` (HF model or Composer HF wrapper) and register them with ``optimizers``.

    ``target``: a ``TargetArchitecture`` or a mapping with keys layers, hidden, heads,
    intermediate (and kv_heads; derived from the GQA ratio when left out). Raises
    ``ValueError`` naming the key (``<key_prefix>.<key>``) when the target cannot be reached
    from the model. ``init='importance'`` marks the masks as importance-initialised (the
    Lagrangian then does not ramp); call ``init_masks_from_importance`` before training.
    ``mask_values``: ``'soft'`` / ``'hard'`` deterministic values (``pruning/mask_module.py``; None:
    hard for importance init, soft otherwise).
    Returns the mask module (also reachable as ``hf_model.drp_masks``).
    """
    hf_model = find_hf_model(model)
    source = DecoderArchitecture.from_hf_config(hf_model.config)
    if isinstance(target, Mapping):
        target = TargetArchitecture.from_config(target, key_prefix=key_prefix)
    target = target.resolve(source, key_prefix=key_prefix)
    mask_module = L0MaskModule(source, target, granularities=granularities, init_mean=init_mean, init_std=init_std,
                               eval_mode=eval_mask_mode, init=init, mask_values=mask_values)
    device = next(hf_model.parameters()).device
    if device.type != 'meta':  # a meta model (FSDP 'mixed' init on ranks > 0) gets real CPU masks that FSDP moves
        mask_module.to(device=device)
    inject_masks(hf_model, mask_module)
    for optimizer in ensure_tuple(optimizers):
        add_mask_param_groups(optimizer, mask_module, mask_lr, lambda_lr)
    log.info('L0 masks %s attached: %d -> %d parameters (%s)', list(mask_module.granularities),
             source.count_parameters(), mask_module.target_num_parameters(), target)
    return mask_module


def init_masks_from_importance(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Score the model on ``batches`` (``pruning/importance.py``) and set the masks' log-alphas from the scores.

    Under ``torch.distributed`` the scores are averaged over ranks first, so every rank sets the
    same masks. Returns the scores.
    """
    from drp_foundry.pruning.importance import activation_importance

    hf_model = find_hf_model(model)
    mask_module = find_mask_module(model)
    scores = activation_importance(hf_model, batches)
    if dist.get_world_size() > 1:
        device = mask_module.log_alpha(mask_module.granularities[0]).device
        for key in scores:
            value = scores[key].to(device)
            dist.all_reduce(value, reduce_operation='SUM')
            scores[key] = value.cpu() / dist.get_world_size()
    mask_module.init_from_importance(scores)
    return scores


def mask_metrics(mask_module: L0MaskModule) -> dict[str, float]:
    """Sizes and multipliers to log (plain floats)."""
    snapshot = mask_module.last_size_terms  # of the latest training forward (NoSizeTermsError before the first)
    metrics = {'drp/expected_num_parameters': float(snapshot.num_parameters),
               'drp/target_num_parameters': float(mask_module.target_num_parameters())}
    targets = mask_module.target_sizes()
    for key in mask_module.granularities:
        expected = snapshot.expected[key]  # one value per layer for head / intermediate
        metrics[f'drp/expected_size/{key}'] = float(expected.mean())
        if expected.dim() == 1:
            metrics[f'drp/expected_size_min/{key}'] = float(expected.min())
            metrics[f'drp/expected_size_max/{key}'] = float(expected.max())
        metrics[f'drp/target_size/{key}'] = targets[key]
        metrics[f'drp/lambda_1/{key}'] = float(snapshot.lambda_1[key])
        metrics[f'drp/lambda_2/{key}'] = float(snapshot.lambda_2[key])
    return metrics


def refuse_non_finite_parameters(model: torch.nn.Module) -> None:
    """After a checkpoint load: NaN or infinite weights, log-alphas or λ stop the run, named (the pre-flight
    checks a local checkpoint file before; this covers sharded and remote ones). Each rank checks its shards."""
    bad = []
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, 'to_local') else param
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
            if len(bad) == 5:
                break
    if bad:
        raise ValueError(f'drp_mask_learner: the loaded checkpoint (load_path / autoresume) holds non-finite values '
                         f'(NaN or inf) in {bad}; the file is damaged or the run diverged: resume from an earlier '
                         'checkpoint (load_path, autoresume: false)')


def end_of_pruning_fidelity(mask_module: L0MaskModule, logger: Optional[Logger] = None):
    """Log the ``FidelityReport`` of the masks and warn past a tolerance; returns the report (every rank of a
    sharded run must call it: an FSDP2-sharded mask is gathered)."""
    from drp_foundry.pruning.fidelity import mask_fidelity

    report = mask_fidelity(mask_module)
    if logger is not None:
        logger.log_metrics({'drp/fidelity/relative_size_gap': report.relative_size_gap,
                            'drp/fidelity/worst_row_gap': report.worst_row_gap,
                            'drp/fidelity/undecided_share': report.undecided_share['total']})
    problems = report.warnings()
    if problems and dist.get_global_rank() == 0:
        log.warning('end of pruning: export will cut a model other than the trained one: %s. A longer run, or '
                    'drp_lagrangian constraint: projection (with harden_fraction), ends on the exported model',
                    '; '.join(problems))
    else:
        log.info('end of pruning: %s', report.summary())
    return report


class MaskLearner(Algorithm):
    """Learn L0 masks toward a target architecture (registered as ``drp_mask_learner``).

    Args:
        target: ``{layers, hidden, heads, intermediate, kv_heads?}`` of the pruned model.
        mask_lr, lambda_lr: learning rates of the log-alpha and lambda groups (paper: 1.0).
        granularities: masks to learn (default all four).
        init_mean, init_std: log-alpha initialisation N(5, 0.01^2).
        eval_mask_mode: deterministic masks in eval during pruning, 'expected' or 'target'
            (see ``drp_foundry.pruning.mask_module``).
        mask_lr_follows_schedule: the mask/lambda groups take the LR scheduler's multiplier
            like the model (default, research code); False keeps them at their base lr.
        init: ``constant`` (default, the paper: log-alphas N(init_mean, init_std^2)) or
            ``importance`` (ours): at ``FIT_START`` of a fresh run, score layers / KV groups / FFN
            units / hidden channels on the first ``calibration_batches`` batches of the train
            loader (the batches the run then trains on; the masks at 1) and set the log-alphas of
            the importance top-k at the target to the log-alpha maximum and the others to the
            minimum: with ``mask_values: hard`` (its default) the step-0 export is exactly
            ``drp-prune-oneshot``'s model on the same batches. The Lagrangian target then starts
            at the target (no ramp). Ours and measured: mask_lr 0.1 holds these masks far longer
            than the paper's 1.0 (issue 26).
        mask_values: what a kept entry of the eval/export masks holds: ``soft`` (the paper:
            its soft score sigmoid(0.8 log_alpha / beta), folded into the weights) or ``hard``
            (ours: 1, masks 0/1). Default: ``hard`` with ``init: importance``, ``soft`` otherwise.
        calibration_batches: batches scored for ``init: importance`` (default 4).
        mask_noise: ``per_rank`` (default: every rank draws its own hard-concrete noise, as
            each rank of the research code does) or ``shared`` (ours: every rank draws rank 0's
            noise, so a run gives the same masks and losses whatever its rank count, for the
            same global and microbatch split; used by the multi-rank tests).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                      num_hidden_layers=2, num_attention_heads=4))
        >>> from drp_foundry import MaskLearner, apply_mask_learner
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> masks = apply_mask_learner(model, target={'layers': 1, 'hidden': 16, 'heads': 2, 'intermediate': 32},
        ...                            optimizers=optimizer)  # log-alphas and lambdas join the optimizer
        >>> sorted(masks.granularities)
        ['head', 'hidden', 'intermediate', 'layer']
        >>> # in a Trainer or a Foundry YAML (algorithms: drp_mask_learner: {target: {...}}):
        >>> algorithm = MaskLearner(target={'layers': 1, 'hidden': 16, 'heads': 2, 'intermediate': 32})
    """

    def __init__(self, target: Mapping[str, Any], mask_lr: float = 1.0, lambda_lr: float = 1.0,
                 granularities: Sequence[str] = GRANULARITIES, init_mean: float = 5.0, init_std: float = 0.01,
                 eval_mask_mode: str = 'expected', mask_lr_follows_schedule: bool = True, init: str = 'constant',
                 calibration_batches: int = 4, mask_noise: str = 'per_rank', mask_values: Optional[str] = None):
        if isinstance(target, TargetArchitecture):
            target = target.to_dict()
        if not isinstance(target, Mapping):
            raise ValueError(f'drp_mask_learner.target must be a mapping of layers/hidden/heads/kv_heads/intermediate, '
                             f'got {target!r}')
        self.target = TargetArchitecture.from_config(target, key_prefix='drp_mask_learner.target')
        for name, value in (('mask_lr', mask_lr), ('lambda_lr', lambda_lr)):
            if not value > 0:
                raise ValueError(f'drp_mask_learner.{name} must be > 0 (lambdas ascend by gradient reversal, not by a '
                                 f'negative lr), got {value}')
        granularities = tuple(granularities)
        if not granularities or set(granularities) - set(GRANULARITIES):
            raise ValueError(f'drp_mask_learner.granularities must be a non-empty subset of {list(GRANULARITIES)}, '
                             f'got {list(granularities)}')
        if eval_mask_mode not in EVAL_MODES:
            raise ValueError(f'drp_mask_learner.eval_mask_mode must be one of {EVAL_MODES}, got {eval_mask_mode!r}')
        if not init_std >= 0:
            raise ValueError(f'drp_mask_learner.init_std must be >= 0, got {init_std}')
        self.mask_lr, self.lambda_lr = float(mask_lr), float(lambda_lr)
        self.granularities = granularities
        self.init_mean, self.init_std = float(init_mean), float(init_std)
        self.eval_mask_mode = eval_mask_mode
        self.mask_lr_follows_schedule = bool(mask_lr_follows_schedule)
        if init not in INIT_MODES:
            raise ValueError(f'drp_mask_learner.init must be one of {INIT_MODES}, got {init!r}')
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f'drp_mask_learner.calibration_batches must be a positive integer, got '
                             f'{calibration_batches!r}')
        self.init = init
        self.calibration_batches = calibration_batches
        if mask_noise not in MASK_NOISE_MODES:
            raise ValueError(f'drp_mask_learner.mask_noise must be one of {MASK_NOISE_MODES}, got {mask_noise!r}')
        self.mask_noise = mask_noise
        if mask_values is not None and mask_values not in MASK_VALUES:
            raise ValueError(f'drp_mask_learner.mask_values must be one of {MASK_VALUES} (or left out), got '
                             f'{mask_values!r}')
        self.mask_values = mask_values
        self._fsdp2 = False

    def match(self, event: Event, state: State) -> bool:
        if event == Event.BATCH_START:
            return not self.mask_lr_follows_schedule or self._fsdp2
        if event == Event.FIT_START:
            return self.init == 'importance'
        return event in (Event.INIT, Event.AFTER_LOAD, Event.BATCH_END, Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            fsdp_config = state.fsdp_config
            self._fsdp2 = is_fsdp2(state)
            if fsdp_config is not None and not getattr(fsdp_config, 'use_orig_params', True):
                raise ValueError('drp_mask_learner adds optimizer param groups, which FSDP supports only with '
                                 'fsdp_config.use_orig_params: true')
            mask_module = apply_mask_learner(
                state.model, self.target, optimizers=None if self._fsdp2 else state.optimizers, mask_lr=self.mask_lr,
                lambda_lr=self.lambda_lr, granularities=self.granularities, init_mean=self.init_mean,
                init_std=self.init_std, eval_mask_mode=self.eval_mask_mode, key_prefix='drp_mask_learner.target',
                init=self.init, mask_values=self.mask_values)
            if self._fsdp2:  # masks and lambdas: their own float32 unit, sharded before the optimizer takes them
                shard_mask_module(mask_module, mesh=getattr(fsdp_config, 'device_mesh', None))
                for optimizer in ensure_tuple(state.optimizers):
                    add_mask_param_groups(optimizer, mask_module, self.mask_lr, self.lambda_lr)
            # noise seeded by the run, drawn per rank; a checkpoint load restores seed and counter
            mask_module.noise_seed = int(state.rank_zero_seed)
            mask_module.noise_rank = 0 if self.mask_noise == 'shared' else dist.get_global_rank()
        elif event == Event.AFTER_LOAD:
            for optimizer in ensure_tuple(state.optimizers):
                reshape_scalar_lambda_state(optimizer)
            refuse_non_finite_parameters(state.model)
        elif event == Event.FIT_START:
            if int(state.timestamp.batch) > 0:  # resumed: the checkpoint's masks are the trained ones
                return
            self._init_from_importance(state, logger)
        elif event == Event.BATCH_START:
            if self._fsdp2:  # the forward's in-place clamp reaches only FSDP2's gathered copy: clamp the shards
                find_mask_module(state.model).clamp_()
            if self.mask_lr_follows_schedule:
                return
            for optimizer in ensure_tuple(state.optimizers):
                for group in optimizer.param_groups:
                    if group.get(GROUP_KEY) is not None:
                        group['lr'] = group['initial_lr']
        elif event == Event.BATCH_END:
            logger.log_metrics(mask_metrics(find_mask_module(state.model)))
        elif event == Event.FIT_END:
            end_of_pruning_fidelity(find_mask_module(state.model), logger)

    def _init_from_importance(self, state: State, logger: Logger) -> None:
        if state.dataloader is None:
            raise ValueError('drp_mask_learner.init: importance needs a train dataloader to take calibration batches from')
        batches = []
        for batch in itertools.islice(state.dataloader, self.calibration_batches):
            batch = state.device.batch_to_device(batch)
            batches.append({key: batch[key] for key in ('input_ids', 'attention_mask') if key in batch})
        if not batches:
            raise ValueError('drp_mask_learner.init: importance found no batch in the train dataloader')
        context = contextlib.nullcontext()
        if state.fsdp_config is not None and not is_fsdp2(state) and dist.get_world_size() > 1:
            # FSDP (v1), untested (CUDA only); FSDP2 needs nothing: the scores come from forwards and the masks
            # write their shards (L0MaskModule.init_from_importance)
            from torch.distributed.fsdp import FullyShardedDataParallel
            context = FullyShardedDataParallel.summon_full_params(state.model, writeback=True)
        with context:
            init_masks_from_importance(state.model, batches)
        masks = find_mask_module(state.model)
        kept = {key: int((mask != 0).sum()) for key, mask in masks.deterministic('target').items()}
        log.info('drp_mask_learner: masks initialised from activation importance on %d batches; kept %s',
                 len(batches), kept)
