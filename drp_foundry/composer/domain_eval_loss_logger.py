"""Callback that logs per-domain eval loss, its mean, worst domain and spread after each eval."""

from __future__ import annotations

import logging
from typing import Sequence

from composer.core import Callback, State
from composer.loggers import Logger

from drp_foundry.composer.domain_eval_losses import (
    DEFAULT_LOSS_METRIC,
    domain_of_label,
    read_domain_eval_losses,
    summarize_losses,
)

log = logging.getLogger(__name__)


class DomainEvalLossLogger(Callback):
    """Log ``drp/domain_eval_loss/<domain>`` plus ``mean``, ``worst`` and ``spread`` at EVAL_AFTER_ALL.

    Composer fires EVAL_END once per eval loader and EVAL_AFTER_ALL once after all of them,
    so the summary sees every domain of the same evaluation.

    Args:
        domains: domain labels to report; ``None`` takes every eval loader that has the
            metric. Listed domains are checked against the eval loaders at FIT_START.
        metric_name: the per-loader metric holding the loss (LLM-Foundry: LanguageCrossEntropy).

    Example:
        >>> from drp_foundry import DomainEvalLossLogger
        >>> callback = DomainEvalLossLogger(domains=['wiki', 'github'])  # Trainer(..., callbacks=[callback])
        >>> callback.domains
        ['wiki', 'github']
        >>> DomainEvalLossLogger(domains=[])
        Traceback (most recent call last):
        ...
        ValueError: drp_domain_eval_loss.domains must be a non-empty list of eval loader labels
    """

    def __init__(self, domains: Sequence[str] | None = None, metric_name: str = DEFAULT_LOSS_METRIC):
        if domains is not None and (isinstance(domains, str) or len(domains) == 0):
            raise ValueError('drp_domain_eval_loss.domains must be a non-empty list of eval loader labels')
        self.domains = list(domains) if domains is not None else None
        self.metric_name = metric_name
        self.history: list[dict] = []

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.domains is None:
            return
        labels = {domain_of_label(evaluator.label) for evaluator in state.evaluators}
        missing = [d for d in self.domains if d not in labels]
        if missing:
            raise ValueError(f'drp_domain_eval_loss.domains lists {missing}, which no eval loader has as its '
                             f'label; eval loader labels: {sorted(labels)}')

    def eval_after_all(self, state: State, logger: Logger) -> None:
        losses = read_domain_eval_losses(state, self.domains, self.metric_name)
        if not losses:
            return
        summary = summarize_losses(losses)
        metrics = {f'drp/domain_eval_loss/{d}': v for d, v in losses.items()}
        metrics.update({'drp/domain_eval_loss/mean': summary['mean'],
                        'drp/domain_eval_loss/worst': summary['worst'],
                        'drp/domain_eval_loss/spread': summary['spread']})
        logger.log_metrics(metrics)
        step = int(state.timestamp.batch)
        self.history.append({'batch': step, 'losses': losses})
        per_domain = ' | '.join(f'{d} {v:.3f}' for d, v in losses.items())
        log.info('[drp] eval loss per domain @ %dba: %s | mean %.3f, worst %s %.3f', step, per_domain,
                 summary['mean'], summary['worst_domain'], summary['worst'])

    def state_dict(self) -> dict:
        return {'history': self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get('history', []))
