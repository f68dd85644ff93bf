"""``L0MaskModule``: the log-alpha masks and Lagrange multipliers of one pruned model.

One hard-concrete mask per enabled granularity (docs/DESIGN.md): ``layer (L,)``,
``head (L, G)`` (whole KV groups), ``intermediate (L, F)``, ``hidden (D,)``, with one
pair of multipliers (lambda1, lambda2, shape (1,), start at 0) per granularity. Parameters are plain
attributes, so their state-dict names are ``log_alpha_<key>``, ``lambda_1_<key>`` and
``lambda_2_<key>`` (under ``model.drp_masks.`` in a Composer checkpoint). The extra state
records the source and target architectures and the granularities: a checkpoint is
self-describing for export (``L0MaskModule.from_extra_state``).

Masks used in a forward pass (``masks_for_forward``):
- training: one fresh ``sample()``; its noise comes from the module's own generator, seeded
  per draw from (``noise_seed``, ``noise_rank``, ``noise_draws``), never from the global RNG.
  ``noise_seed`` and the draw counter are in the extra state (the checkpoint), the rank is
  set by the caller: a resumed run draws exactly the noise of the uninterrupted one, on
  every rank (ranks draw equally often, so rank 0's saved counter is every rank's);
- eval: ``deterministic(eval_mode)``, cached while the log-alphas are unchanged;
- ``fixed_masks`` (when set) override both, e.g. all ones in tests.

``mask_values`` (config key ``drp_mask_learner.mask_values``) is what a kept entry of a
deterministic mask holds (``hard_concrete.MASK_VALUES``): ``'soft'`` (the paper: its soft score,
folded into the weights at export) or ``'hard'`` (ours: exactly 1, masks 0/1). The default is
``'hard'`` for ``init: importance`` (so the step-0 export is the one-shot model) and ``'soft'``
for ``init: constant``; checkpoints written before the key read ``'soft'``.

``temperature`` (beta, 2/3 unless annealed by ``drp_lagrangian``, ours) is the one every sample,
keep probability and soft score of the module uses; ``hardened`` (ours, set by
``drp_lagrangian.harden_fraction``) makes the training forward use the deterministic target
masks instead of a sample, so those steps train the model export cuts. Both are in the extra
state.

``eval_mode`` (config key ``eval_mask_mode``) picks the deterministic counts used while
pruning: ``'expected'`` (default) keeps round(expected count) entries - per layer for head
and intermediate masks - so eval losses describe the model of the current expected size
P that the data scheduler records; ``'target'`` keeps exactly the target counts, the model
export will produce. Export always calls ``deterministic('target')``.

Pure torch: no Composer or LLM-Foundry import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from drp_foundry.pruning import hard_concrete
from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture, validate_target
from drp_foundry.pruning.expected_size import (
    GRANULARITIES,
    GRANULARITY_FIELDS,
    expected_fractions,
    expected_num_parameters,
    mask_shapes,
    pruned_granularities,
    target_fractions,
    target_keep_counts,
)
from drp_foundry.pruning.importance_masks import importance_log_alpha
from drp_foundry.pruning.layouts import get_layout

__all__ = ['EVAL_MODES', 'INIT_MODES', 'MASK_VALUES', 'EXTRA_STATE_FORMAT', 'L0MaskModule', 'SizeTerms', 'NoSizeTermsError']

EVAL_MODES = ('expected', 'target')
INIT_MODES = ('constant', 'importance')
MASK_VALUES = hard_concrete.MASK_VALUES
EXTRA_STATE_FORMAT = 'drp_foundry.l0_masks/1'

# Which target field each granularity prunes (a target below the source needs that mask).
_TARGET_FIELD = {key: fields[0] for key, fields in GRANULARITY_FIELDS.items()}
_SOURCE_FIELD = {key: fields[1] for key, fields in GRANULARITY_FIELDS.items()}


def _assign_(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for a plain parameter or an FSDP2-sharded one (a DTensor: its shard of ``value``,
    which must be the same on every rank)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
    param.copy_(value)


def noise_key(seed: int, rank: int, draw: int) -> int:
    """The generator seed of one mask sample: a hash of (run seed, rank, draw number), 63 bits."""
    digest = hashlib.blake2b(f'{seed}:{rank}:{draw}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & ((1 << 63) - 1)


class NoSizeTermsError(RuntimeError):
    """Size terms were read before a training forward recorded them."""


@dataclasses.dataclass(frozen=True)
class SizeTerms:
    """What the mask module hands to the Lagrangian, the logs and the data scheduler, from one read of its
    parameters in a training forward (while FSDP has them gathered).

    ``expected``: the expected kept fraction s_i per enabled granularity (per layer for head and
    intermediate: shape (L,)); ``num_parameters``: the expected parameter count of the HF model
    (``expected_size.expected_num_parameters``); ``lambda_1`` / ``lambda_2``: the multipliers per
    granularity. Tensors carry the autograd graph unless ``detached()``.
    """

    expected: Mapping[str, torch.Tensor]
    num_parameters: torch.Tensor
    lambda_1: Mapping[str, torch.Tensor]
    lambda_2: Mapping[str, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (lists and floats), for the checkpoint's extra state."""
        return {'expected': {key: value.detach().cpu().tolist() for key, value in self.expected.items()},
                'num_parameters': float(self.num_parameters),
                'lambda_1': {key: float(value) for key, value in self.lambda_1.items()},
                'lambda_2': {key: float(value) for key, value in self.lambda_2.items()}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> 'SizeTerms':
        def tensor(value):
            return torch.tensor(value, dtype=torch.float32)

        return cls(expected={key: tensor(value) for key, value in values['expected'].items()},
                   num_parameters=tensor(values['num_parameters']),
                   lambda_1={key: tensor(value) for key, value in values['lambda_1'].items()},
                   lambda_2={key: tensor(value) for key, value in values['lambda_2'].items()})

    def detached(self) -> 'SizeTerms':
        """Copies without graph (copies: the lambdas are views of parameters, whose gathered storage FSDP2 frees
        after the forward)."""
        return SizeTerms(expected={key: value.detach().clone() for key, value in self.expected.items()},
                         num_parameters=self.num_parameters.detach().clone(),
                         lambda_1={key: value.detach().clone() for key, value in self.lambda_1.items()},
                         lambda_2={key: value.detach().clone() for key, value in self.lambda_2.items()})


_NOTHING_RECORDED = ('no size terms were recorded: they are taken in a training forward of the model carrying the '
                     'masks (model.train(), gradients enabled), where FSDP has the mask parameters gathered; run '
                     'the forward pass of this step before {what}')


class L0MaskModule(nn.Module):
    """Hard-concrete masks and Lagrange multipliers for pruning ``source`` down to ``target``.

    Args:
        source: the architecture of the model being pruned.
        target: the architecture to reach (``kv_heads`` may be None: derived from the GQA ratio).
        granularities: the masks to learn, a subset of ``('layer', 'head', 'intermediate', 'hidden')``.
            A granularity the target shrinks must be enabled.
        init_mean, init_std: log-alpha initialisation N(init_mean, init_std^2).
        eval_mode: deterministic counts in eval mode, ``'expected'`` or ``'target'`` (see module doc).
        init: ``'constant'`` (the paper: every log-alpha N(init_mean, init_std^2), masks open, the
            Lagrangian target ramps from the source size) or ``'importance'`` (ours: log-alphas set
            from activation importance by ``init_from_importance`` before training, masks start at
            the target, so the target does not ramp; see ``pruning/importance.py``).
        mask_values: ``'soft'`` or ``'hard'`` (module doc); None: ``'hard'`` for ``init='importance'``,
            ``'soft'`` otherwise.
    """

    def __init__(self, source: DecoderArchitecture, target: TargetArchitecture,
                 granularities: Iterable[str] = GRANULARITIES, init_mean: float = 5.0, init_std: float = 0.01,
                 eval_mode: str = 'expected', init: str = 'constant', mask_values: str | None = None):
        super().__init__()
        if init not in INIT_MODES:
            raise ValueError(f'mask init must be one of {INIT_MODES}, got {init!r}')
        if mask_values is None:
            mask_values = 'hard' if init == 'importance' else 'soft'
        if mask_values not in MASK_VALUES:
            raise ValueError(f'mask_values must be one of {MASK_VALUES}, got {mask_values!r}')
        self.init = init
        self.mask_values = mask_values
        self.temperature = hard_concrete.TEMPERATURE
        self.hardened = False
        granularities = tuple(granularities)
        unknown = sorted(set(granularities) - set(GRANULARITIES))
        if unknown or not granularities:
            raise ValueError(f'granularities must be a non-empty subset of {list(GRANULARITIES)}, got '
                             f'{list(granularities)}')
        if eval_mode not in EVAL_MODES:
            raise ValueError(f'eval_mask_mode must be one of {EVAL_MODES}, got {eval_mode!r}')
        target = target.resolve(source) if target.kv_heads is None else target
        validate_target(source, target)
        pruned = pruned_granularities(source, target)
        get_layout(source.model_type).check_granularities(granularities, pruned)
        for key in GRANULARITIES:
            if key not in granularities and key in pruned:
                raise ValueError(f'target.{_TARGET_FIELD[key]}={getattr(target, _TARGET_FIELD[key])} prunes '
                                 f'{key!r} but that granularity is switched off; add {key!r} to granularities or '
                                 f'set target.{_TARGET_FIELD[key]}={getattr(source, _SOURCE_FIELD[key])}')
        self.source = source
        self.target = target
        self.granularities = tuple(key for key in GRANULARITIES if key in granularities)
        self.eval_mode = eval_mode
        self.init_mean, self.init_std = float(init_mean), float(init_std)
        shapes = mask_shapes(source)
        for key in self.granularities:
            self.register_parameter(f'log_alpha_{key}', nn.Parameter(torch.empty(shapes[key])))
            # shape (1,), not (): FSDP2 shards no scalar parameter (lambdas() hands out scalars)
            self.register_parameter(f'lambda_1_{key}', nn.Parameter(torch.zeros(1)))
            self.register_parameter(f'lambda_2_{key}', nn.Parameter(torch.zeros(1)))
        self.fixed_masks: dict[str, torch.Tensor] | None = None
        self.current_masks: dict[str, torch.Tensor] | None = None
        self.forward_masks: Any = None  # what the hooks of hf_injection read, set once per forward pass
        # size_terms() taken in the latest training forward, while FSDP has the parameters gathered:
        self._pending_size_terms: SizeTerms | None = None  # with graph, consumed by the Lagrangian
        self._last_size_terms: SizeTerms | None = None  # detached, for logging and the scheduler
        self._deterministic_cache: tuple[Any, dict[str, torch.Tensor]] | None = None
        # mask noise (see module doc): seeded from the global RNG unless the caller sets noise_seed
        self.noise_seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
        self.noise_rank = 0
        self.noise_draws = 0
        self._noise_generators: dict[torch.device, torch.Generator] = {}
        self.reset_parameters()

    # --- parameters -------------------------------------------------------------------------
    def log_alpha(self, key: str) -> torch.Tensor:
        return getattr(self, f'log_alpha_{key}')

    def lambda_1(self, key: str) -> torch.Tensor:
        return getattr(self, f'lambda_1_{key}')

    def lambda_2(self, key: str) -> torch.Tensor:
        return getattr(self, f'lambda_2_{key}')

    def mask_parameters(self) -> list[nn.Parameter]:
        """The log-alphas (descend with the model)."""
        return [self.log_alpha(key) for key in self.granularities]

    def lambda_parameters(self) -> list[nn.Parameter]:
        """lambda1 and lambda2 of every granularity (ascend, see pruning/lagrangian.py)."""
        return [p for key in self.granularities for p in (self.lambda_1(key), self.lambda_2(key))]

    def clamp_(self) -> None:
        """Clamp every log-alpha in place to [ln 0.01, ln 100]."""
        for log_alpha in self.mask_parameters():
            hard_concrete.clamp_log_alpha_(log_alpha)

    # --- masks ------------------------------------------------------------------------------
    def noise_generator(self, device: torch.device) -> torch.Generator:
        """The generator of the next draw on ``device``, seeded by ``noise_key`` (counter-based)."""
        device = torch.device(device)
        generator = self._noise_generators.get(device)
        if generator is None:
            generator = self._noise_generators[device] = torch.Generator(device=device)
        return generator.manual_seed(noise_key(self.noise_seed, self.noise_rank, self.noise_draws))

    def sample(self) -> dict[str, torch.Tensor]:
        """One differentiable hard-concrete sample of every mask (training); advances the draw counter."""
        self.clamp_()
        generator = self.noise_generator(self.log_alpha(self.granularities[0]).device)
        masks = {key: hard_concrete.sample_hard_concrete(self.log_alpha(key), generator=generator,
                                                         temperature=self.temperature)
                 for key in self.granularities}
        self.noise_draws += 1
        return masks

    def prob_nonzero(self) -> dict[str, torch.Tensor]:
        """P(z != 0) of every mask entry (differentiable)."""
        return {key: hard_concrete.prob_nonzero(self.log_alpha(key).clamp(hard_concrete.LOG_ALPHA_MIN,
                                                                          hard_concrete.LOG_ALPHA_MAX), self.temperature)
                for key in self.granularities}

    def keep_counts(self, mode: str) -> dict[str, int | torch.Tensor]:
        """Entries each deterministic mask keeps: an int (layer, hidden) or one per layer (head, intermediate)."""
        if mode == 'target':
            counts = target_keep_counts(self.source, self.target)
            return {key: counts[key] for key in self.granularities}
        if mode != 'expected':
            raise ValueError(f'deterministic mask mode must be one of {EVAL_MODES}, got {mode!r}')
        with torch.no_grad():
            probs = self.prob_nonzero()
            counts = {}
            for key, p in probs.items():
                if p.dim() == 2:
                    counts[key] = p.sum(dim=1).round().long()
                else:
                    counts[key] = int(p.sum().round().item())
            if 'hidden' in counts:  # at least one hidden dim, or every RMSNorm would divide by zero
                counts['hidden'] = max(counts['hidden'], 1)
        return counts

    def deterministic(self, mode: str | None = None) -> dict[str, torch.Tensor]:
        """Eval/export masks: soft scores on the kept entries, exact zeros elsewhere (no gradient).

        ``mode``: ``'target'`` (exact target counts; export) or ``'expected'``; None uses
        ``eval_mode``. Cached while the log-alphas keep their values (compared by value: FSDP2
        gathers into the same tensor without bumping its version counter).
        """
        mode = self.eval_mode if mode is None else mode
        values = [p.detach() for p in self.mask_parameters()]
        cached = self._deterministic_cache
        mode_key = (mode, self.mask_values, self.temperature)
        if cached is not None and cached[0][0] == mode_key and len(cached[0][1]) == len(values) and all(
                a.device == b.device and a.shape == b.shape and torch.equal(a, b) for a, b in zip(cached[0][1], values)):
            return cached[1]
        cache_key = (mode_key, [value.clone() for value in values])
        counts = self.keep_counts(mode)
        with torch.no_grad():
            masks = {key: hard_concrete.deterministic_mask(
                self.log_alpha(key).clamp(hard_concrete.LOG_ALPHA_MIN, hard_concrete.LOG_ALPHA_MAX), counts[key],
                values=self.mask_values, temperature=self.temperature)
                for key in self.granularities}
        self._deterministic_cache = (cache_key, masks)
        return masks

    def masks_for_forward(self) -> dict[str, torch.Tensor]:
        """The masks of the next forward pass: fixed, else a sample (training; the deterministic target masks
        once ``hardened``), else deterministic."""
        if self.fixed_masks is not None:
            masks = self.fixed_masks
        elif self.training and self.hardened:
            masks = self.deterministic('target')
        elif self.training:
            masks = self.sample()
        else:
            masks = self.deterministic()
        self.current_masks = masks
        return masks

    # --- sizes ------------------------------------------------------------------------------
    def expected_sizes(self) -> dict[str, torch.Tensor]:
        """Expected kept fraction s_i per enabled granularity, per layer for head / intermediate (differentiable)."""
        return expected_fractions(self.source, self.prob_nonzero())

    def target_sizes(self) -> dict[str, float]:
        """Final target fraction t_i per enabled granularity (the same for every layer)."""
        fractions = target_fractions(self.source, self.target)
        return {key: fractions[key] for key in self.granularities}

    def expected_num_parameters(self) -> torch.Tensor:
        """Expected remaining parameters of the HF model (differentiable scalar)."""
        return expected_num_parameters(self.source, self.prob_nonzero())

    def ramp_start_sizes(self) -> dict[str, float]:
        """Where the Lagrangian's target ramp starts: the source (1.0), or the target for importance init."""
        if self.init == 'importance':
            return self.target_sizes()
        return {key: 1.0 for key in self.granularities}

    def init_from_importance(self, scores: Mapping[str, torch.Tensor],
                             pruned_keep_prob: float | None = None) -> None:
        """Set every log-alpha from importance ``scores`` (``pruning/importance_masks.py``): the target
        top-k of each mask (per layer for head / intermediate) starts kept (at the log-alpha maximum),
        the rest pruned (at the minimum); ``pruned_keep_prob`` gives the older placement instead."""
        counts = self.keep_counts('target')
        with torch.no_grad():
            for key in self.granularities:
                value = importance_log_alpha(scores[key].to(self.log_alpha(key).device), counts[key],
                                                        pruned_keep_prob)
                _assign_(self.log_alpha(key), value)
        self._deterministic_cache = None

    def project_(self, fractions: Mapping[str, float]) -> None:
        """Shift the log-alphas in place so every row expects ``fractions[key]`` of its entries
        (``pruning/projection.py``; per layer for head / intermediate) at the current temperature.

        Plain tensors or FSDP2-sharded ones (DTensors sharded on dim 0): a 2-D mask's rows are whole on
        their rank and are projected there; a 1-D mask split over ranks sums its partial counts over
        them at every halving (every rank of the mesh must call this, as FSDP2 training does).
        """
        import torch.distributed as tdist
        from torch.distributed.tensor import DTensor, Replicate, Shard

        from drp_foundry.pruning.projection import project_log_alpha

        with torch.no_grad():
            for key in self.granularities:
                param = self.log_alpha(key)
                row_length = int(param.shape[-1])  # the global shape, also of a DTensor
                count = float(fractions[key]) * row_length
                if not isinstance(param, DTensor):
                    param.copy_(project_log_alpha(param, count, self.temperature))
                    continue
                local = param.to_local()
                placements = tuple(param.placements)
                if any(not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0)
                       for p in placements):
                    raise ValueError(f'log_alpha_{key} is sharded as {placements}; the projection needs the '
                                     'rows whole (Shard(0), as FSDP2 shards) or the mask replicated')
                reduce = None
                sharded_dims = [index for index, p in enumerate(placements) if isinstance(p, Shard)]
                if len(sharded_dims) > 1:
                    raise ValueError(f'log_alpha_{key} is sharded over {len(sharded_dims)} mesh dimensions; the '
                                     'projection supports one (FSDP2 on a 1-D mesh)')
                if param.dim() == 1 and sharded_dims:
                    group = param.device_mesh.get_group(sharded_dims[0])

                    def reduce(partial, group=group):
                        tdist.all_reduce(partial, group=group)
                        return partial
                local.copy_(project_log_alpha(local, count, self.temperature, sum_over_shards=reduce,
                                              row_length=row_length if param.dim() == 1 else None))
        self._deterministic_cache = None

    def harden_(self) -> None:
        """Decide every mask in place: the target top-k of each (per layer for head / intermediate) to the
        log-alpha maximum, the rest to the minimum (ours; ``drp_lagrangian.harden_fraction``). The
        deterministic target masks are unchanged; the keep probabilities become those of decided gates.
        An FSDP2-sharded mask is gathered (every rank must call this) and each rank writes its shard."""
        from torch.distributed.tensor import DTensor

        counts = self.keep_counts('target')
        with torch.no_grad():
            for key in self.granularities:
                param = self.log_alpha(key)
                full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
                kept = hard_concrete.keep_top_k(full.float(), counts[key])
                value = torch.where(kept, torch.full_like(full, hard_concrete.LOG_ALPHA_MAX),
                                    torch.full_like(full, hard_concrete.LOG_ALPHA_MIN))
                _assign_(param, value)
        self._deterministic_cache = None

    def target_num_parameters(self) -> int:
        return self.source.pruned(self.target).count_parameters()

    def lambdas(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The multipliers as scalars (views of the (1,)-shaped parameters: gradients reach them)."""
        return ({key: self.lambda_1(key).reshape(()) for key in self.granularities},
                {key: self.lambda_2(key).reshape(()) for key in self.granularities})

    def size_terms(self, detach: bool = False) -> SizeTerms:
        """The ``SizeTerms`` of the current parameters, read now (``detach``: without graph).

        Under FSDP only the training forward sees the gathered parameters: training code reads
        ``take_size_terms`` / ``last_size_terms`` (recorded there) instead.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            probs = self.prob_nonzero()
            expected = expected_fractions(self.source, probs)
            num_parameters = expected_num_parameters(self.source, probs)
        lambda_1, lambda_2 = self.lambdas()
        terms = SizeTerms(expected=expected, num_parameters=num_parameters, lambda_1=lambda_1, lambda_2=lambda_2)
        return terms.detached() if detach else terms

    def record_size_terms(self) -> None:
        """Take ``size_terms`` now (called in each training forward by the top-model pre-hook)."""
        terms = self.size_terms()
        self._pending_size_terms = terms
        self._last_size_terms = terms.detached()

    def take_size_terms(self) -> SizeTerms:
        """The terms recorded in the latest training forward, with graph; consumed (the Lagrangian, once per
        forward). Raises ``NoSizeTermsError`` when no training forward recorded any since the last take."""
        terms, self._pending_size_terms = self._pending_size_terms, None
        if terms is None:
            raise NoSizeTermsError(_NOTHING_RECORDED.format(what='adding the Lagrangian penalty'))
        return terms

    @property
    def has_pending_size_terms(self) -> bool:
        return self._pending_size_terms is not None

    @property
    def last_size_terms(self) -> SizeTerms:
        """The detached terms of the latest training forward (logs, data scheduler); ``NoSizeTermsError`` before
        the first one."""
        if self._last_size_terms is None:
            raise NoSizeTermsError(_NOTHING_RECORDED.format(what='reading the expected size'))
        return self._last_size_terms

    # --- checkpoint -------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {'format': EXTRA_STATE_FORMAT, 'source': self.source.to_dict(), 'target': self.target.to_dict(),
                'granularities': list(self.granularities), 'eval_mode': self.eval_mode, 'init': self.init,
                'noise': {'seed': self.noise_seed, 'draws': self.noise_draws},
                'mask_values': self.mask_values, 'temperature': float(self.temperature), 'hardened': bool(self.hardened),
                # so that a run resumed after its last step (an eval at FIT_END, no training forward) still has them;
                # a JSON string, so that the record has the same structure before the first forward as after it
                # (a sharded checkpoint (DCP) is loaded into the structure of the fresh model's state)
                'last_size_terms': json.dumps(None if self._last_size_terms is None else self._last_size_terms.to_dict())}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in self.granularities:  # checkpoints written before the lambdas became (1,) hold scalars
            for name in (f'{prefix}lambda_1_{key}', f'{prefix}lambda_2_{key}'):
                value = state_dict.get(name)
                if isinstance(value, torch.Tensor) and value.dim() == 0:
                    state_dict[name] = value.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get('format') != EXTRA_STATE_FORMAT:
            raise ValueError(f'drp_masks extra state is not a {EXTRA_STATE_FORMAT} record: {state!r}')
        saved = {'source': DecoderArchitecture.from_dict(state['source']),
                 'target': TargetArchitecture(**state['target']), 'granularities': tuple(state['granularities'])}
        current = {'source': self.source, 'target': self.target, 'granularities': self.granularities}
        for name in saved:
            if saved[name] != current[name]:
                raise ValueError(f'checkpoint masks were trained with {name}={saved[name]} but this run has '
                                 f'{name}={current[name]}; use the same model and pruning target to resume')
        noise = state.get('noise')  # absent in checkpoints written before the counter-based noise
        if noise is not None:
            self.noise_seed, self.noise_draws = int(noise['seed']), int(noise['draws'])
        self.init = state.get('init', 'constant')  # where the target ramp started is the checkpoint's
        self.mask_values = state.get('mask_values', 'soft')  # absent before the key: the soft scores were used
        self.temperature = float(state.get('temperature', hard_concrete.TEMPERATURE))
        self.hardened = bool(state.get('hardened', False))
        self._deterministic_cache = None
        last = state.get('last_size_terms')  # absent before SizeTerms; a mapping in checkpoints before the JSON string
        if isinstance(last, (str, bytes)):
            last = json.loads(last)
        if last is not None:
            self._last_size_terms = SizeTerms.from_dict(last)

    @classmethod
    def from_extra_state(cls, state: Mapping[str, Any], **kwargs: Any) -> 'L0MaskModule':
        """An (untrained) module with the architectures of a checkpoint's extra state; load its state dict next."""
        if not isinstance(state, Mapping) or state.get('format') != EXTRA_STATE_FORMAT:
            raise ValueError(f'not a {EXTRA_STATE_FORMAT} record: {state!r}')
        kwargs.setdefault('eval_mode', state.get('eval_mode', 'expected'))
        kwargs.setdefault('init', state.get('init', 'constant'))
        kwargs.setdefault('mask_values', state.get('mask_values', 'soft'))
        return cls(DecoderArchitecture.from_dict(state['source']), TargetArchitecture(**state['target']),
                   granularities=state['granularities'], **kwargs)

    def reset_parameters(self) -> None:
        """Fresh log-alphas N(init_mean, init_std^2) and zero lambdas (also FSDP meta-device init)."""
        for log_alpha in self.mask_parameters():
            hard_concrete.init_log_alpha(log_alpha, self.init_mean, self.init_std)
        with torch.no_grad():
            for value in self.lambda_parameters():
                value.zero_()
        self._deterministic_cache = None

    def extra_repr(self) -> str:
        return (f'granularities={self.granularities}, target={self.target}, eval_mode={self.eval_mode!r}, '
                f'init={self.init!r}, mask_values={self.mask_values!r}')
