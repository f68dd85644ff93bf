"""Run the per-domain continuation benchmark inside a Composer / LLM-Foundry run.

Registered for LLM-Foundry YAMLs as ``drp_continuation_eval``::

    callbacks:
      drp_continuation_eval:
        items_path: /data/continuation_items.jsonl
        interval: eval            # after every evaluation (EVAL_AFTER_ALL), or e.g. 200ba
        batch_size: 16
        normalization: token_mean # or sum

Logs ``metrics/continuation/<domain>/accuracy`` for every domain and
``metrics/continuation/accuracy`` (micro) and ``metrics/continuation/macro_accuracy``
through Composer's logger. Scoring uses the model in eval mode (deterministic masks when
pruning) and restores the training mode afterwards. Every rank scores every item, so
FSDP's collective forward passes stay in step.
"""

from __future__ import annotations

from pathlib import Path

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler

from drp_foundry.composer.hf_model import unwrap_hf_model_and_tokenizer
from drp_foundry.eval.continuation_scorer import (
    NORMALIZATIONS,
    ContinuationItem,
    ContinuationReport,
    read_items,
    score_items,
)

METRIC_PREFIX = 'metrics/continuation'


def continuation_metrics(report: ContinuationReport) -> dict[str, float]:
    """Composer metric names -> values for one scoring pass."""
    metrics = {f'{METRIC_PREFIX}/{domain}/accuracy': acc for domain, acc in report.per_domain_accuracy().items()}
    metrics[f'{METRIC_PREFIX}/accuracy'] = report.accuracy()
    metrics[f'{METRIC_PREFIX}/macro_accuracy'] = report.macro_accuracy()
    return metrics


def apply_continuation_eval(model, tokenizer, items: list[ContinuationItem], logger: Logger | None = None,
                            batch_size: int = 16, normalization: str = 'token_mean') -> dict[str, float]:
    """Score ``items`` with an HF causal LM and log the per-domain accuracies (any loop)."""
    metrics = continuation_metrics(score_items(model, tokenizer, items, batch_size=batch_size,
                                               normalization=normalization))
    if logger is not None:
        logger.log_metrics(metrics)
    return metrics


def _limit_per_domain(items: list[ContinuationItem], limit: int | None) -> list[ContinuationItem]:
    if limit is None:
        return items
    kept, seen = [], {}
    for item in items:
        seen[item.domain] = seen.get(item.domain, 0) + 1
        if seen[item.domain] <= limit:
            kept.append(item)
    return kept


class ContinuationEval(Callback):
    """Score the continuation benchmark at ``interval`` and log per-domain accuracy.

    Args:
        items_path: items JSONL from ``drp-eval build``.
        interval: ``'eval'`` (after all eval loaders, ``Event.EVAL_AFTER_ALL``), an int N
            (every N batches) or a Composer time string such as ``'200ba'``.
        batch_size: sequences per forward pass.
        normalization: ``'token_mean'`` (mean log-prob per token) or ``'sum'``.
        max_items_per_domain: score only the first this-many items of each domain
            (cheaper in-run checks); None scores all.

    Example:
        >>> import json, tempfile
        >>> from drp_foundry import ContinuationEval
        >>> items = tempfile.NamedTemporaryFile('w', suffix='.jsonl', delete=False)
        >>> _ = items.write(json.dumps({'context': 'The cat sat on the', 'right': ' mat.', 'wrong': ' moon.',
        ...                             'domain': 'book'}) + chr(10))
        >>> items.close()
        >>> callback = ContinuationEval(items_path=items.name, interval='200ba')  # Trainer(..., callbacks=[callback])
        >>> [item.domain for item in callback.items]
        ['book']
    """

    def __init__(self, items_path: str, interval: str | int = 'eval', batch_size: int = 16,
                 normalization: str = 'token_mean', max_items_per_domain: int | None = None):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f'drp_continuation_eval.normalization={normalization!r} must be one of {NORMALIZATIONS}')
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'drp_continuation_eval.batch_size must be a positive int, got {batch_size!r}')
        if max_items_per_domain is not None and max_items_per_domain < 1:
            raise ValueError('drp_continuation_eval.max_items_per_domain must be >= 1 or null, '
                             f'got {max_items_per_domain}')
        if not Path(items_path).is_file():
            raise FileNotFoundError(f'drp_continuation_eval.items_path={items_path} does not exist; build it with '
                                    '`drp-eval build ...`')
        self.items = _limit_per_domain(read_items(items_path), max_items_per_domain)
        self.batch_size = batch_size
        self.normalization = normalization
        self.on_eval = interval == 'eval'
        if self.on_eval:
            self.is_due = None
        else:
            if isinstance(interval, int):
                if interval < 1:
                    raise ValueError(f'drp_continuation_eval.interval must be >= 1 batch, got {interval}')
                interval = f'{interval}ba'
            try:
                self.is_due = create_interval_scheduler(interval, include_end_of_training=False,
                                                        checkpoint_events=False)
            except (ValueError, TypeError) as error:
                raise ValueError(f"drp_continuation_eval.interval={interval!r}: use 'eval', a batch count, "
                                 "or a time string such as '200ba'") from error
        self.last_metrics: dict[str, float] = {}

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            if unwrap_hf_model_and_tokenizer(state.model)[1] is None:
                raise ValueError('drp_continuation_eval needs a Hugging Face model with a tokenizer '
                                 '(ComposerHFCausalLM / HuggingFaceModel(tokenizer=...)); the model has none')
            return
        due = (event == Event.EVAL_AFTER_ALL) if self.on_eval else (event != Event.EVAL_AFTER_ALL
                                                                    and self.is_due(state, event))
        if not due:
            return
        model, tokenizer = unwrap_hf_model_and_tokenizer(state.model)
        self.last_metrics = apply_continuation_eval(model, tokenizer, self.items, logger,
                                                    batch_size=self.batch_size, normalization=self.normalization)
