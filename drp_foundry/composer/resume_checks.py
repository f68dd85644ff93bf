"""Pre-flight checks of the checkpoint a run will resume from, before any model is built.

Which checkpoint: with ``autoresume`` the ``latest-rank0.pt`` of a local ``save_folder``
(what Composer's autoresume picks), else a local ``load_path``. Remote checkpoints and sharded
(folder) ones are left to Composer. The checks:

- it can be read (``torch.load``, memory-mapped); if not, the message names the file and the
  earlier checkpoints of the folder to resume from instead;
- every floating tensor of the model (weights, masks' log-alphas, the λ of the Lagrangian) is
  finite: a damaged file otherwise loads and trains on NaN;
- there is something left to train (``max_duration`` beyond the checkpoint's batch): Composer
  refuses that too, but only after building the model;
- the run continues the same run: data domains and shuffle seed, the scheduler's policy, its
  loss metric and initial mixture, the pruning target and the Lagrangian's target ramp are the
  checkpoint's, or the difference is refused naming the key to set back.

``non_finite_tensors`` (``drp_foundry/checkpoint_checks.py``) is shared with ``drp-export``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from omegaconf import OmegaConf as om

from drp_foundry.checkpoint_checks import non_finite_tensors

__all__ = ['resume_checkpoint_path', 'load_checkpoint_for_checks', 'check_resume_checkpoint']


def _error(message: str):
    from drp_foundry.composer.config_error import ConfigError

    return ConfigError(message)


def resume_checkpoint_path(cfg: DictConfig) -> Path | None:
    """The local monolithic checkpoint this config resumes from, or None."""
    save_folder = cfg.get('save_folder')
    if cfg.get('autoresume') and save_folder and '://' not in str(save_folder):
        latest = Path(str(save_folder).format(run_name=cfg.get('run_name', ''))) / 'latest-rank0.pt'
        if latest.exists() or latest.is_symlink():
            return latest
    load_path = cfg.get('load_path')
    if load_path and '://' not in str(load_path) and Path(str(load_path)).is_file():
        return Path(str(load_path))
    return None


def _earlier_checkpoints(path: Path) -> list[str]:
    target = path.resolve() if path.exists() else path
    return sorted(p.name for p in path.parent.glob('*.pt') if p.is_file() and not p.is_symlink()
                  and p.resolve() != target)


def load_checkpoint_for_checks(path: Path, key: str) -> dict[str, Any]:
    """``torch.load`` memory-mapped (tensors are read only when checked); unreadable -> the file and what else exists."""
    if path.is_symlink() and not path.exists():
        others = _earlier_checkpoints(path)
        raise _error(f'{key}: {path} points to {path.readlink()}, which does not exist; checkpoints in '
                     f'{path.parent}: {others or "none"}. Set load_path to one of them (and autoresume: false), '
                     'or remove the broken link')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
    except Exception as error:  # torch raises several types for damaged files
        others = _earlier_checkpoints(path)
        real = path.resolve()
        raise _error(f'{key}: cannot read checkpoint {path}{" (" + real.name + ")" if real != path else ""} '
                     f'({type(error).__name__}: {str(error)[:200]}); earlier checkpoints in {path.parent}: '
                     f'{others or "none"}. Set load_path to one of them and autoresume: false, or remove the '
                     'damaged file') from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state'), dict):
        raise _error(f'{key}: {path} is not a Composer checkpoint (no ["state"])')
    return checkpoint


def _batch_of(timestamp: Any) -> int | None:
    if not isinstance(timestamp, dict):
        return None
    timestamp = timestamp.get('Timestamp', timestamp)  # Composer nests it under the class name
    if not isinstance(timestamp, dict):
        return None
    value = timestamp.get('batch')
    if hasattr(value, 'value'):
        value = value.value
    if isinstance(value, dict):
        value = value.get('value')
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _algorithm_state(state: dict[str, Any], name: str) -> dict[str, Any] | None:
    algorithms = state.get('algorithms')
    items = algorithms.items() if isinstance(algorithms, dict) else (algorithms or [])
    for entry in items:
        if isinstance(entry, (tuple, list)) and len(entry) == 2 and str(entry[0]).endswith(name):
            return entry[1] if isinstance(entry[1], dict) else None
    return None


def _callback_state(state: dict[str, Any], name: str) -> dict[str, Any] | None:
    callbacks = state.get('callbacks') or {}
    for key, value in (callbacks.items() if isinstance(callbacks, dict) else []):
        if str(key).endswith(name) and isinstance(value, dict):
            return value
    return None


def _check_same_run(cfg: DictConfig, state: dict[str, Any], path: Path) -> None:
    from drp_foundry.composer.config_error import batches_of as _batches

    raw = om.to_container(cfg, resolve=True)
    dataset = ((raw.get('train_loader') or {}).get('dataset') or {})
    saved = ((state.get('dataset_state') or {}).get('train')) or {}
    fix = f'set it back to resume {path}, or start a new run in another save_folder'
    if isinstance(saved, dict) and saved.get('domain_names') is not None and dataset.get('domains') is not None:
        if list(saved['domain_names']) != [str(d) for d in dataset['domains']]:
            raise _error(f'train_loader.dataset.domains: {dataset["domains"]}, but the checkpoint {path} trained on '
                         f'{saved["domain_names"]}; {fix}')
        if 'shuffle_seed' in dataset and int(saved.get('shuffle_seed', dataset['shuffle_seed'])) != \
                int(dataset['shuffle_seed']):
            raise _error(f'train_loader.dataset.shuffle_seed: {dataset["shuffle_seed"]}, but the checkpoint {path} '
                         f'used {saved["shuffle_seed"]}; {fix}')
    model_state = state.get('model') or {}
    extra = next((v for k, v in model_state.items() if k.endswith('drp_masks._extra_state')), None)
    learner = ((raw.get('algorithms') or {}).get('drp_mask_learner') or {})
    if isinstance(extra, dict) and learner.get('target') is not None and isinstance(extra.get('target'), dict):
        from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture

        try:
            source = DecoderArchitecture.from_dict(extra['source'])
            wanted = TargetArchitecture.from_config(learner['target']).resolve(source).to_dict()
            had = TargetArchitecture(**extra['target']).to_dict()
        except (ValueError, TypeError, KeyError):
            wanted = had = None
        if wanted != had:
            raise _error(f'algorithms.drp_mask_learner.target: {learner["target"]}, but the masks of {path} were '
                         f'trained toward {extra["target"]}; {fix}')
    lagrangian = _algorithm_state(state, 'LagrangianUpdater')
    lagrangian_cfg = (raw.get('algorithms') or {}).get('drp_lagrangian')
    if lagrangian and lagrangian.get('warmup_steps') is not None and lagrangian_cfg is not None:
        from drp_foundry.composer.lagrangian_updater import DEFAULT_WARMUP_FRACTION

        steps, _ = _batches((lagrangian_cfg or {}).get('warmup_steps'), 'algorithms.drp_lagrangian.warmup_steps')
        total, _ = _batches(raw.get('max_duration'), 'max_duration')
        if steps is None and total is not None:
            steps = int(round(float((lagrangian_cfg or {}).get('warmup_fraction', DEFAULT_WARMUP_FRACTION)) * total))
        if steps is not None and steps != int(lagrangian['warmup_steps']):
            raise _error(f'algorithms.drp_lagrangian.warmup_steps: the target ramp of this config lasts {steps} '
                         f'batches, but {path} ramped over {lagrangian["warmup_steps"]} (a changed max_duration moves '
                         f'a warmup_fraction ramp); set warmup_steps: {lagrangian["warmup_steps"]} to resume, or '
                         'start a new run in another save_folder')
    loading = _callback_state(state, 'DynamicLoading')
    loading_cfg = (raw.get('callbacks') or {}).get('drp_dynamic_loading')
    if loading and 'json' in loading and loading_cfg is not None:
        record = json.loads(loading['json'])
        policy_cfg = dict((loading_cfg or {}).get('policy') or {'name': 'drpruning'})
        if record.get('policy_config') is not None and record['policy_config'] != policy_cfg:
            old, new = record['policy_config'], policy_cfg
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise _error(f'callbacks.drp_dynamic_loading.policy: {", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)} '
                         f'differs from the schedule {path} was trained with; {fix}')
        metric = (loading_cfg or {}).get('loss_metric', 'LanguageCrossEntropy')
        if record.get('loss_metric') is not None and record['loss_metric'] != metric:
            raise _error(f'callbacks.drp_dynamic_loading.loss_metric: {metric!r}, but {path} scheduled on '
                         f'{record["loss_metric"]!r}; {fix}')
        initial = (record.get('policy_state') or {}).get('p_ref_initial')
        proportions = dataset.get('proportions')
        if isinstance(proportions, dict):
            proportions = [proportions.get(d) for d in dataset.get('domains') or []]
        if initial is not None and proportions is not None and len(initial) == len(proportions):
            total = sum(float(p) for p in proportions)
            if any(abs(float(p) / total - float(q)) > 1e-6 for p, q in zip(proportions, initial)):
                raise _error(f'train_loader.dataset.proportions: {proportions}, but {path} started from the mixture '
                             f'{initial}; {fix}')


def check_resume_checkpoint(cfg: DictConfig) -> None:
    """Readable, finite, something left to train, and the same run (see module doc)."""
    path = resume_checkpoint_path(cfg)
    if path is None:
        return
    key = 'save_folder (autoresume)' if path.name == 'latest-rank0.pt' else 'load_path'
    checkpoint = load_checkpoint_for_checks(path, key)
    state = checkpoint['state']
    model_state = state.get('model')
    if isinstance(model_state, dict):
        bad = non_finite_tensors(model_state)
        if bad:
            real = path.resolve()
            raise _error(f'{key}: checkpoint {path}{" (" + real.name + ")" if real != path else ""} holds non-finite '
                         f'values (NaN or inf) in {bad}; the file is damaged '
                         f'or the run diverged. Resume from an earlier one ({_earlier_checkpoints(path) or "none"}: '
                         'load_path, autoresume: false)')
    if cfg.get('load_weights_only') or key == 'load_path' and cfg.get('reset_time'):
        return
    from drp_foundry.composer.config_error import batches_of as _batches

    done = _batch_of(state.get('timestamp'))
    total, _ = _batches(cfg.get('max_duration'), 'max_duration')
    if done is not None and total is not None and done >= total:
        raise _error(f'max_duration: {cfg.get("max_duration")}, but {path} was saved at batch {done}: nothing is left '
                     'to train and the run would be refused after building the model. Raise max_duration to train '
                     'longer, or give a new save_folder for a new run')
    _check_same_run(cfg, state, path)
