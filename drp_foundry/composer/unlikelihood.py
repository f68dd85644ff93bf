"""Token-level unlikelihood as a loss term (registered as ``drp_unlikelihood``; ours).

``loss += alpha * UL`` at every microbatch, with ``UL`` from ``drp_foundry.losses.unlikelihood``
(Welleck et al. 2019): probability on context tokens that are not due next is pushed down, against
the repetition loops of greedy decoding. Usable with or without ``drp_distillation`` and the
pruning algorithms (each adds its own term)::

    algorithms:
      drp_unlikelihood: {alpha: 1.0}

Logged every batch: ``drp/unlikelihood`` (last microbatch). Needs HF model outputs with logits
(``hf_causal_lm``).

``drp_sequence_unlikelihood`` (also ours, Welleck et al. 2019 section 5.2) works on the model's own
greedy output: on every ``every``-th batch, the first ``prefix_tokens`` tokens of each row are
continued greedily for ``continuation_tokens`` tokens (eval mode, no grad), and
``alpha * sequence_unlikelihood`` of prefix + continuation (a second forward, with grad, through
the Composer model) is added to the loss: tokens inside an n-gram the continuation already produced
are pushed down where the model produced them. Logged: ``drp/sequence_unlikelihood/term`` and
``drp/sequence_unlikelihood/loop_share``, the share of the batch's continuations that the demo's
repetition screen (``eval/repetition.py``) flags, a running loop rate of the model being trained::

    algorithms:
      drp_sequence_unlikelihood: {alpha: 1.0, every: 1, start: 0.5dur, prefix_tokens: 32, continuation_tokens: 32}

``start`` (a batch count or a fraction of the run, default 0) leaves the first part of the run to the
plain loss: the term is meant for the loops of a model that is already close to its final quality
(Welleck et al. fine-tune an MLE model with it), not for the degenerate output of the first steps.

Cost per applied batch: the greedy decode (``continuation_tokens`` cached forwards of the batch)
plus one forward and backward of ``batch x (prefix + continuation)`` tokens. Tested on one process
(CPU); under FSDP (v1) the decode bypasses the root wrapper, which is not tested.
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from drp_foundry.composer.hf_model import unwrap_hf_model
from drp_foundry.eval.loop_rate import greedy_continuations
from drp_foundry.eval.repetition import find_repetition_loop
from drp_foundry.losses.unlikelihood import sequence_unlikelihood, token_unlikelihood


def apply_unlikelihood(loss: torch.Tensor, logits: torch.Tensor, batch: dict, alpha: float) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """Functional form for any loop: (``loss + alpha * UL``, UL)."""
    term = token_unlikelihood(logits, batch['input_ids'], batch.get('labels'))
    return loss + alpha * term.to(loss.dtype), term


class Unlikelihood(Algorithm):
    """Add ``alpha`` times the token-level unlikelihood of the batch to the loss (``drp_unlikelihood``).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                      num_hidden_layers=2, num_attention_heads=4))
        >>> from drp_foundry import Unlikelihood, apply_unlikelihood
        >>> batch = {'input_ids': torch.randint(0, 64, (2, 8))}
        >>> out = model(**batch, labels=batch['input_ids'])
        >>> loss, term = apply_unlikelihood(out.loss, out.logits, batch, alpha=1.0)
        >>> bool(loss > out.loss)
        True
        >>> algorithm = Unlikelihood(alpha=1.0)  # Trainer(..., algorithms=[algorithm])
    """

    def __init__(self, alpha: float = 1.0):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f'drp_unlikelihood.alpha must be a number >= 0, got {alpha!r}')
        self.alpha = float(alpha)
        self._last: float | None = None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOSS:
            outputs = state.outputs
            logits = outputs.get('logits') if hasattr(outputs, 'get') else None
            if logits is None:
                raise RuntimeError('drp_unlikelihood needs the HF model outputs (logits) of a hf_causal_lm model')
            if not isinstance(state.loss, torch.Tensor):
                raise TypeError(f'drp_unlikelihood expects a tensor loss, got {type(state.loss).__name__}')
            state.loss, term = apply_unlikelihood(state.loss, logits, state.batch, self.alpha)
            self._last = float(term.detach())
        elif event == Event.BATCH_END and self._last is not None:
            logger.log_metrics({'drp/unlikelihood': self._last})


def apply_sequence_unlikelihood(loss: torch.Tensor, model: torch.nn.Module, input_ids: torch.Tensor, alpha: float,
                                prefix_tokens: int = 32, continuation_tokens: int = 32,
                                ngram: int = 3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Functional form: (``loss + alpha * seq-UL``, seq-UL, share of continuations that loop).

    ``model`` is a Composer HF model (called with a batch dict, possibly DDP-wrapped) or a bare HF
    causal LM; its greedy continuation of ``input_ids[:, :prefix_tokens]`` is what is penalised.
    """
    from transformers import PreTrainedModel

    prefixes = input_ids[:, :prefix_tokens]
    continuations = greedy_continuations(unwrap_hf_model(model), prefixes, continuation_tokens)
    loop_share = sum(find_repetition_loop(row) is not None for row in continuations) / len(continuations)
    ids = torch.cat([prefixes, torch.tensor(continuations, dtype=prefixes.dtype, device=prefixes.device)], dim=1)
    outputs = model(input_ids=ids) if isinstance(model, PreTrainedModel) else model({'input_ids': ids})
    logits = outputs['logits'] if isinstance(outputs, dict) else outputs.logits
    term = sequence_unlikelihood(logits, ids, prefix_tokens, ngram)
    return loss + alpha * term.to(loss.dtype), term, loop_share


class SequenceUnlikelihood(Algorithm):
    """Add ``alpha`` times the sequence-level unlikelihood of the model's own greedy continuations of the batch's
    prefixes to the loss, on every ``every``-th batch (``drp_sequence_unlikelihood``).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                      num_hidden_layers=2, num_attention_heads=4))
        >>> from drp_foundry import SequenceUnlikelihood, apply_sequence_unlikelihood
        >>> input_ids = torch.randint(0, 64, (2, 12))
        >>> loss, term, loop_share = apply_sequence_unlikelihood(torch.tensor(0.0), model, input_ids, alpha=1.0,
        ...                                                      prefix_tokens=4, continuation_tokens=8)
        >>> 0.0 <= loop_share <= 1.0
        True
        >>> algorithm = SequenceUnlikelihood(alpha=1.0, every=2, start='0.5dur')  # Trainer(..., algorithms=[algorithm])
    """

    def __init__(self, alpha: float = 1.0, every: int = 2, prefix_tokens: int = 32, continuation_tokens: int = 32,
                 ngram: int = 3, start: str | int = 0):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f'drp_sequence_unlikelihood.alpha must be a number >= 0, got {alpha!r}')
        for key, value, low in (('every', every, 1), ('prefix_tokens', prefix_tokens, 1),
                                ('continuation_tokens', continuation_tokens, ngram + 1), ('ngram', ngram, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f'drp_sequence_unlikelihood.{key} must be an integer >= {low}, got {value!r}')
        self.alpha, self.every, self.ngram = float(alpha), every, ngram
        self.prefix_tokens, self.continuation_tokens = prefix_tokens, continuation_tokens
        self.start = _parse_start(start)
        self._last: dict[str, float] = {}

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOSS and int(state.timestamp.batch) % self.every == 0 and self._started(state):
            input_ids = state.batch['input_ids']
            if input_ids.shape[1] < self.prefix_tokens:
                raise ValueError(f'drp_sequence_unlikelihood.prefix_tokens {self.prefix_tokens} is longer than the '
                                 f'batch rows ({input_ids.shape[1]} tokens); lower it')
            if not isinstance(state.loss, torch.Tensor):
                raise TypeError(f'drp_sequence_unlikelihood expects a tensor loss, got {type(state.loss).__name__}')
            state.loss, term, loop_share = apply_sequence_unlikelihood(
                state.loss, state.model, input_ids, self.alpha, self.prefix_tokens, self.continuation_tokens,
                self.ngram)
            self._last = {'drp/sequence_unlikelihood/term': float(term.detach()),
                          'drp/sequence_unlikelihood/loop_share': loop_share}
        elif event == Event.BATCH_END and self._last:
            logger.log_metrics(self._last)
            self._last = {}

    def _started(self, state: State) -> bool:
        if self.start.unit == TimeUnit.DURATION:
            elapsed = state.get_elapsed_duration()
            return elapsed is not None and float(elapsed) >= self.start.value
        return int(state.timestamp.batch) >= self.start.value


def _parse_start(start: str | int) -> Time:
    """``start``: a batch count (``100``, ``'100ba'``) or a fraction of the run (``'0.5dur'``)."""
    try:
        parsed = Time(start, TimeUnit.BATCH) if isinstance(start, int) and not isinstance(start, bool) \
            else Time.from_timestring(str(start))
    except (ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.unit not in (TimeUnit.BATCH, TimeUnit.DURATION) or parsed.value < 0 or \
            (parsed.unit == TimeUnit.DURATION and parsed.value >= 1):
        raise ValueError(f'drp_sequence_unlikelihood.start must be a batch count (100, "100ba") or a fraction of the '
                         f'run below 1 ("0.5dur"), got {start!r}')
    return parsed
