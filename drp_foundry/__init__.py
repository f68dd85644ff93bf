"""drp-foundry: DRPruning for MosaicML Composer and LLM-Foundry.

The public face, as Composer's: the registered components (``drp_foundry.MaskLearner``, ...) and the
functional ``apply_*`` forms usable in any training loop. They are imported on first use, so
``import drp_foundry.pruning`` (pure torch) never pulls Composer in.

Subpackages follow the paper's data flow:

- ``pruning``    hard-concrete masks, size formulas, Lagrangian, HF mask injection, export
- ``losses``     loss terms that are not pruning (ours): distillation, unlikelihood
- ``scheduling`` the distributionally robust data scheduler (pure numpy/scipy)
- ``data``       multi-domain streaming dataset with a rewritable mixture
- ``eval``       continuation benchmark and evaluation glue
- ``composer``   thin Composer/LLM-Foundry glue: algorithms, callbacks, registration
- ``commands``   the command lines; ``demo`` what only the CPU demo uses

``pruning``, ``losses`` and ``scheduling`` never import Composer or LLM-Foundry.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = '0.1.0'

# public name -> the module that defines it
_PUBLIC = {
    # algorithms (registered in llmfoundry_algorithms) and their functional forms
    'MaskLearner': 'drp_foundry.composer.mask_learner',
    'apply_mask_learner': 'drp_foundry.composer.mask_learner',
    'LagrangianUpdater': 'drp_foundry.composer.lagrangian_updater',
    'apply_lagrangian': 'drp_foundry.composer.lagrangian_updater',
    'Distillation': 'drp_foundry.composer.distillation',
    'apply_distillation': 'drp_foundry.composer.distillation',
    'CpuAutocast': 'drp_foundry.composer.cpu_autocast',
    'Unlikelihood': 'drp_foundry.composer.unlikelihood',
    'apply_unlikelihood': 'drp_foundry.composer.unlikelihood',
    'SequenceUnlikelihood': 'drp_foundry.composer.unlikelihood',
    'apply_sequence_unlikelihood': 'drp_foundry.composer.unlikelihood',
    # callbacks (llmfoundry_callbacks)
    'DynamicLoading': 'drp_foundry.composer.dynamic_loading',
    'apply_dynamic_loading': 'drp_foundry.composer.dynamic_loading',
    'DomainEvalLossLogger': 'drp_foundry.composer.domain_eval_loss_logger',
    'ContinuationEval': 'drp_foundry.composer.continuation_eval_callback',
    'apply_continuation_eval': 'drp_foundry.composer.continuation_eval_callback',
    'Fsdp2GlooAverage': 'drp_foundry.composer.fsdp2_gloo',
    # logger (llmfoundry_loggers), dataloader (llmfoundry_dataloaders) and its dataset
    'JSONLMetricsLogger': 'drp_foundry.composer.jsonl_metrics_logger',
    'build_multidomain_dataloader': 'drp_foundry.composer.multidomain_dataloader',
    'MultiDomainStreamingDataset': 'drp_foundry.data.multidomain_dataset',
    # mixture policies (drp_foundry_policies)
    'MixturePolicy': 'drp_foundry.scheduling.policies',
    'ConstantPolicy': 'drp_foundry.scheduling.policies',
    'ShearedPolicy': 'drp_foundry.scheduling.policies',
    'DROPolicy': 'drp_foundry.scheduling.policies',
    'DRPruningPolicy': 'drp_foundry.scheduling.policies',
    # after pruning
    'export_checkpoint': 'drp_foundry.export',
    'oneshot_prune': 'drp_foundry.oneshot',
}

__all__ = sorted(_PUBLIC) + ['__version__']


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
