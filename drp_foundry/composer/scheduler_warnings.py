"""Pre-flight warnings for ``drp_dynamic_loading`` settings that run, but not as the paper means them.

``scheduler_setup_warnings(cfg)`` reads a resolved training config (``max_duration``,
``eval_interval``, ``callbacks.drp_dynamic_loading`` and the ``drp_multidomain`` train loader's
domains and proportions) and returns the warnings of ``drp_foundry.scheduling.setup_warnings``;
``warn_scheduler_setup`` logs them (``drp-train`` calls it through the config check, before
training starts). Nothing here changes the run. Cases where the scheduler cannot act at all are
errors elsewhere (``drp_foundry.composer.config_checks``).
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig
from omegaconf import OmegaConf as om

from drp_foundry.scheduling.scaling_law_fit import MIN_POINTS
from drp_foundry.scheduling.setup_warnings import (
    fit_timing_warning,
    ratio_box_warning,
    reference_loss_warning,
)

log = logging.getLogger(__name__)

__all__ = ['scheduler_setup_warnings', 'warn_scheduler_setup']

_WHERE = 'callbacks.drp_dynamic_loading.policy'


def _in_batches(value: Any) -> int | None:
    """A Composer duration in batches (an int is batches); None for other units or unparsable values."""
    if isinstance(value, int):
        return value
    text = str(value).strip() if value is not None else ''
    if text.endswith('ba') and text[:-2].isdigit():
        return int(text[:-2])
    return None


def scheduler_setup_warnings(cfg: DictConfig | dict) -> list[str]:
    raw = om.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    callbacks = raw.get('callbacks') or {}
    if 'drp_dynamic_loading' not in callbacks:
        return []
    kwargs = callbacks.get('drp_dynamic_loading') or {}
    policy = kwargs.get('policy') or {'name': 'drpruning'}
    if not isinstance(policy, dict):
        return []  # the old spelling: the callback refuses it with the new one
    name = str(policy.get('name', 'drpruning'))
    total, interval = _in_batches(raw.get('max_duration')), _in_batches(raw.get('eval_interval', 1))
    timing = {key: policy.get(key, default) for key, default in (
        ('fit_start_fraction', 0.2), ('history_start_fraction', 0.02), ('min_fit_points', MIN_POINTS))}
    warnings = []
    if name == 'drpruning' and total and interval:
        warnings.append(fit_timing_warning(total, interval, where=_WHERE, **timing))
    dataset = ((raw.get('train_loader') or {}).get('dataset') or {})
    domains = [str(d) for d in dataset.get('domains') or []]
    ratio = kwargs.get('reference_ratio') or dataset.get('proportions')
    if isinstance(ratio, dict):
        ratio = [ratio.get(d) for d in domains]
    if name == 'drpruning' and domains and ratio and len(ratio) == len(domains) and all(
            isinstance(v, (int, float)) and v > 0 for v in ratio):
        warnings.append(ratio_box_warning(domains, ratio, float(policy.get('max_ratio_factor', 2.0)),
                                          bool(policy.get('clamp_ratio_to_initial_range', True)), where=_WHERE))
    warnings.append(reference_loss_warning(name, policy.get('reference_losses'), total, interval, where=_WHERE,
                                           **timing))
    return [w for w in warnings if w]


def warn_scheduler_setup(cfg: DictConfig | dict) -> list[str]:
    """Log each warning of ``scheduler_setup_warnings``; return them."""
    warnings = scheduler_setup_warnings(cfg)
    for message in warnings:
        log.warning(message)
    return warnings
