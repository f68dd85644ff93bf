"""Read the per-domain eval losses that Composer computed for eval loaders labelled by domain."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from composer.core import State

from drp_foundry.composer.domain_eval_loaders import build_drp_text_dataloader, domain_eval_loaders

DEFAULT_LOSS_METRIC = 'LanguageCrossEntropy'
EVAL_LABEL_PREFIX = 'eval/'  # LLM-Foundry names the evaluator of `label: wiki` "eval/wiki"


def domain_of_label(label: str) -> str:
    """``eval/wiki`` -> ``wiki``; labels without LLM-Foundry's prefix are returned unchanged."""
    return label[len(EVAL_LABEL_PREFIX):] if label.startswith(EVAL_LABEL_PREFIX) else label


def read_domain_eval_losses(state: State, domains: Sequence[str] | None = None,
                            metric_name: str = DEFAULT_LOSS_METRIC, missing: str = 'raise') -> dict[str, float]:
    """Per-domain eval loss from ``state.eval_metrics[<label>][metric_name]``.

    LLM-Foundry registers the eval loader ``label: wiki`` as evaluator ``eval/wiki``; the
    returned keys are the domain names (prefix removed).

    Composer computes and reduces each eval loader's metrics across ranks at EVAL_END, so
    every rank reads the same values. ``domains=None`` returns every label that has the
    metric. A listed domain without a labelled eval loader (or whose loader has not run yet)
    raises a ``KeyError`` that names it, or reads as NaN with ``missing='nan'``.
    """
    if missing not in ('raise', 'nan'):
        raise ValueError(f"missing must be 'raise' or 'nan', got {missing!r}")
    available = {domain_of_label(label): metrics[metric_name] for label, metrics in state.eval_metrics.items()
                 if metric_name in metrics}
    wanted = list(available) if domains is None else list(domains)
    absent = [d for d in wanted if d not in available]
    if absent and missing == 'raise':
        raise KeyError(f'no eval loader labelled {absent} with metric {metric_name}; add eval_loaders entries '
                       f'with `label: <domain>` (labels present: {sorted(available)})')
    losses = {}
    for domain in wanted:
        if domain not in available:
            losses[domain] = float('nan')
            continue
        value = available[domain].compute()
        losses[domain] = float(value.item() if hasattr(value, 'item') else value)
    return losses


def summarize_losses(losses: dict[str, float]) -> dict[str, float | str]:
    """Mean, worst domain and spread (max - min) of finite per-domain losses."""
    finite = {d: v for d, v in losses.items() if math.isfinite(v)}
    if not finite:
        return {'mean': float('nan'), 'worst_domain': '', 'worst': float('nan'), 'spread': float('nan')}
    worst = max(finite, key=finite.get)
    values = list(finite.values())
    return {'mean': sum(values) / len(values), 'worst_domain': worst, 'worst': finite[worst],
            'spread': max(values) - min(values)}


def evaluate_domains(model_dir: str | Path, data_root: str | Path, domains: Sequence[str] | None = None, *,
                     max_seq_len: int, split: str = 'eval', batch_size: int = 4,
                     max_batches: int | None = None) -> dict[str, float]:
    """Per-domain eval loss of ``model_dir``; ``max_batches`` caps the batches per domain.

    Tokens per domain = (number of eval samples, capped at ``max_batches * batch_size``) x
    ``max_seq_len``.
    """
    import torch
    from composer import Trainer
    from composer.core import Evaluator
    from llmfoundry.utils.builders import build_composer_model, build_tokenizer

    from drp_foundry.composer.harmless_warnings import filter_harmless_warnings
    from drp_foundry.eval.domain_loss import domains_in

    filter_harmless_warnings()

    domains = list(domains) if domains is not None else domains_in(data_root, split)
    tokenizer = build_tokenizer(str(model_dir), {'model_max_length': max_seq_len})
    model = build_composer_model(name='hf_causal_lm', tokenizer=tokenizer,
                                 cfg={'pretrained_model_name_or_path': str(model_dir), 'pretrained': True,
                                      'trust_remote_code': False})
    evaluators = []
    entry = {'name': 'drp_domain_evals', 'data_root': str(data_root), 'domains': domains, 'split': split,
             'max_seq_len': int(max_seq_len)}
    for cfg in domain_eval_loaders(entry, {}, where='evaluate_domains'):
        label = cfg.pop('label')
        del cfg['name']  # drp_text, whose builder is called directly (no registry lookup)
        spec = build_drp_text_dataloader(tokenizer=tokenizer, device_batch_size=batch_size, **cfg)  # under the shm lock
        evaluators.append(Evaluator(label=f'eval/{label}', dataloader=spec, metric_names=['LanguageCrossEntropy'],
                                    subset_num_batches=max_batches or -1))
    # an eval-only Trainer: an optimizer that never steps, so Composer does not make (and warn about) its default
    trainer = Trainer(model=model, eval_dataloader=evaluators, device='gpu' if torch.cuda.is_available() else 'cpu',
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.0), progress_bar=False,
                      log_to_console=False, loggers=[])
    trainer.eval()
    losses = read_domain_eval_losses(trainer.state, domains)
    trainer.close()
    return losses
