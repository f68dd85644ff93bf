"""Token-level unlikelihood as a loss term (registered as ``drp_unlikelihood``; ours).

``loss += alpha * UL`` at every microbatch, with ``UL`` from ``drp_foundry.pruning.unlikelihood``
(Welleck et al. 2019): probability on context tokens that are not due next is pushed down, against
the repetition loops of greedy decoding. Usable with or without ``drp_distillation`` and the
pruning algorithms (each adds its own term)::

    algorithms:
      drp_unlikelihood: {alpha: 1.0}

Logged every batch: ``drp/unlikelihood`` (last microbatch). Needs HF model outputs with logits
(``hf_causal_lm``).
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from drp_foundry.pruning.unlikelihood import token_unlikelihood


def apply_unlikelihood(loss: torch.Tensor, logits: torch.Tensor, batch: dict, alpha: float) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """Functional form for any loop: (``loss + alpha * UL``, UL)."""
    term = token_unlikelihood(logits, batch['input_ids'], batch.get('labels'))
    return loss + alpha * term.to(loss.dtype), term


class Unlikelihood(Algorithm):
    """Add ``alpha`` times the token-level unlikelihood of the batch to the loss (``drp_unlikelihood``)."""

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
