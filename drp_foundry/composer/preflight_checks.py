"""Pre-flight checks that need only the config and the data, one function per concern.

Called by ``config_checks.check_train_config`` (the pre-flight of ``train.py``) after the
component checks; each raises ``ConfigError`` naming the key:

- ``check_component_types``: every value written for one of drp-foundry's components (and the
  policy's keys) has the type its constructor annotates (``mask_lr: fast`` is refused, not
  compared with a number mid-run);
- ``check_scheduler_can_act``: ``drp_dynamic_loading`` gets an eval inside the run (eval cadence
  in batches, shorter than ``max_duration``), reads a metric the evaluators compute, and runs
  on a ``drp_multidomain`` train loader whose domains each have an eval loader, in order with
  its ``domain_names`` (the checks that used to wait for Trainer INIT / FIT_START);
- ``check_shard_integrity``: the train and eval shards of a data_prep root are the ones its
  manifest recorded (``drp_foundry/data/shard_integrity.py``).
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig
from omegaconf import OmegaConf as om

__all__ = ['check_sections', 'check_component_types', 'check_scheduler_can_act', 'check_shard_integrity',
           'check_value_type', 'eval_metric_names']


def _error(message: str):
    from drp_foundry.composer.config_error import ConfigError

    return ConfigError(message)


# -- types ----------------------------------------------------------------------------------------

def _accepts(annotation: Any, value: Any) -> bool | None:
    """Whether ``value`` fits ``annotation``; None when the annotation is not one we can judge."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        verdicts = [_accepts(arg, value) for arg in typing.get_args(annotation)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if typing.get_origin(annotation) is typing.Literal:
        return value in typing.get_args(annotation)
    return None  # containers and classes: their own validation judges the contents


def _describe(annotation: Any) -> str:
    text = str(annotation).replace('typing.', '').replace('collections.abc.', '')
    return {"<class 'float'>": 'a number', "<class 'int'>": 'an integer', "<class 'bool'>": 'true or false',
            "<class 'str'>": 'a string'}.get(text, text)


def check_value_type(where: str, fn: Callable, kwargs: dict[str, Any]) -> None:
    """Refuse a value whose type does not fit the annotation of ``fn``'s parameter of that name."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that names something not importable here: judge none
        return
    for key, value in kwargs.items():
        if value is None or key not in hints:
            continue
        if _accepts(hints[key], value) is False:
            raise _error(f'{where}.{key}: {value!r} is {type(value).__name__}, but it must be '
                         f'{_describe(hints[key])}; write it as such (YAML: 0.1, 3, true, a quoted string)')


def check_component_types(cfg: DictConfig) -> None:
    from llmfoundry import registry

    for section, reg in (('algorithms', registry.algorithms), ('callbacks', registry.callbacks),
                         ('loggers', registry.loggers)):
        block = cfg.get(section) or {}
        for name, kwargs in block.items():
            try:
                component = reg.get(name)
            except Exception:
                continue
            if not (getattr(component, '__module__', '') or '').startswith('drp_foundry.'):
                continue
            kwargs = {} if kwargs is None else om.to_container(kwargs, resolve=True)
            if isinstance(kwargs, dict):
                check_value_type(f'{section}.{name}', component, kwargs)
    policy = ((cfg.get('callbacks') or {}).get('drp_dynamic_loading') or {}).get('policy')
    if isinstance(policy, DictConfig) and policy.get('name'):
        from drp_foundry.scheduling.registry import get_policy_class

        try:
            cls = get_policy_class(str(policy['name']))
        except ValueError:
            return
        kwargs = {k: v for k, v in om.to_container(policy, resolve=True).items() if k != 'name'}
        for klass in cls.__mro__:  # each key against the most derived class that declares it
            if '__init__' in vars(klass) and klass is not object:
                declared = {k: v for k, v in kwargs.items() if k in inspect.signature(klass.__init__).parameters}
                check_value_type('callbacks.drp_dynamic_loading.policy', klass, declared)
                kwargs = {k: v for k, v in kwargs.items() if k not in declared}


# -- the data scheduler can act -------------------------------------------------------------------

def eval_metric_names(cfg: DictConfig) -> list[str] | None:
    """The metrics every evaluator of an LLM-Foundry causal LM computes (its defaults + additional_eval_metrics)."""
    model = cfg.get('model') or {}
    if model.get('name') not in ('hf_causal_lm', 'mpt_causal_lm', 'drp_hf_causal_lm'):
        return None
    try:
        from llmfoundry.models.hf.hf_causal_lm import DEFAULT_CAUSAL_LM_EVAL_METRICS as names
    except ImportError:
        try:
            from llmfoundry.models.utils import DEFAULT_CAUSAL_LM_EVAL_METRICS as names
        except ImportError:
            return None
    extra = list(model.get('additional_eval_metrics') or [])
    from llmfoundry import registry

    known = []
    for name in list(names) + extra:
        try:
            cls = registry.metrics.get(name)
            known.append(getattr(cls, '__name__', name))
        except Exception:
            known.append(name)
    return known


def check_scheduler_can_act(cfg: DictConfig) -> None:
    callbacks = cfg.get('callbacks') or {}
    if 'drp_dynamic_loading' not in callbacks:
        return
    from drp_foundry.composer.config_error import batches_of as _batches

    settings = callbacks.get('drp_dynamic_loading') or {}
    loader = cfg.get('train_loader') or {}
    if loader.get('name') != 'drp_multidomain':
        raise _error(f"callbacks.drp_dynamic_loading needs train_loader.name: drp_multidomain (got "
                     f"{loader.get('name')!r}): only that loader can change its domain mixture during training")
    domains = [str(d) for d in ((loader.get('dataset') or {}).get('domains') or [])]
    names = settings.get('domain_names')
    if names is not None and [str(n) for n in names] != domains:
        raise _error(f'callbacks.drp_dynamic_loading.domain_names {list(names)} differ from '
                     f'train_loader.dataset.domains {domains}; list the same domains in the same order (or omit it)')
    run, _ = _batches(cfg.get('max_duration'), 'max_duration')
    interval = cfg.get('eval_interval', 1)  # LLM-Foundry's default
    if isinstance(interval, int) and not isinstance(interval, bool):  # Composer: an integer counts epochs, 0 = none
        given = 'eval_interval' in cfg
        raise _error(f'eval_interval: {interval if given else "not set (LLM-Foundry default 1)"}: '
                     f'{"0 disables evaluation" if interval == 0 else "Composer reads an integer as epochs"}, and '
                     'drp_dynamic_loading updates the mixture only at an eval; give it in batches, e.g. 100ba')
    every, unit = _batches(interval, 'eval_interval')
    if unit == 'ep' or unit == 'dur':
        raise _error(f'eval_interval: {interval} is not in batches, and the drp_multidomain stream has no epochs '
                     '(or the scheduler would update only at the end); give it in batches, e.g. 100ba')
    if every is None:
        raise _error(f'eval_interval: {interval} cannot be placed in batches; drp_dynamic_loading updates the mixture '
                     'at each eval, give eval_interval in batches, e.g. 100ba')
    if run is not None and every >= run:
        raise _error(f'eval_interval: {interval} ({every} batches) leaves no eval inside the run (max_duration '
                     f'{run} batches): drp_dynamic_loading would update the mixture only after the last batch and '
                     f'never change it; set eval_interval below {run} batches (e.g. {max(1, run // 10)}ba)')
    eval_loaders = cfg.get('eval_loaders') or ([cfg.get('eval_loader')] if cfg.get('eval_loader') else [])
    labels = [str(ev.get('label')) for ev in eval_loaders if ev is not None]
    missing = [d for d in domains if d not in labels and f'eval/{d}' not in labels]
    if missing:
        raise _error(f'eval_loaders: no eval loader labelled {missing} (labels: {labels}); drp_dynamic_loading '
                     'reads each domain\'s loss from the eval loader of that label: add one per domain with '
                     '`label: <domain>` (or use drp_domain_evals)')
    metric = settings.get('loss_metric', 'LanguageCrossEntropy')
    known = eval_metric_names(cfg)
    if known is not None and str(metric) not in known:
        import difflib

        close = difflib.get_close_matches(str(metric), known, n=1)
        raise _error(f'callbacks.drp_dynamic_loading.loss_metric: no evaluator computes {metric!r}'
                     f'{" (did you mean " + repr(close[0]) + "?)" if close else ""}; the eval metrics of this model '
                     f'are {known}')


# -- shards are what data_prep wrote --------------------------------------------------------------

def check_shard_integrity(cfg: DictConfig) -> None:
    from drp_foundry.data.shard_integrity import ShardIntegrityError, check_split

    raw = om.to_container(cfg, resolve=True)
    dataset = ((raw.get('train_loader') or {}).get('dataset') or {})
    checked: set[tuple[str, str, str]] = set()
    targets: list[tuple[str, Path, str, str]] = []
    if (raw.get('train_loader') or {}).get('name') == 'drp_multidomain' and dataset.get('data_root') \
            and not dataset.get('remote_root'):
        streams = dataset.get('streams') or {}
        for domain in dataset.get('domains') or []:
            if (streams.get(domain) or {}).get('remote') or (streams.get(domain) or {}).get('local'):
                continue
            targets.append(('train_loader.dataset.data_root', Path(str(dataset['data_root'])), str(domain),
                            str(dataset.get('split', 'train'))))
    eval_loaders = raw.get('eval_loaders') or ([raw['eval_loader']] if raw.get('eval_loader') else [])
    for i, ev in enumerate(eval_loaders):
        ds = (ev or {}).get('dataset') or {}
        if ds.get('local') and not ds.get('remote') and ds.get('split'):
            local = Path(str(ds['local']))
            targets.append((f'eval_loaders[{i}].dataset.local', local.parent, local.name, str(ds['split'])))
    for where, root, domain, split in targets:
        if (str(root), domain, split) in checked:
            continue
        checked.add((str(root), domain, split))
        try:
            check_split(root, domain, split)
        except ShardIntegrityError as err:
            raise _error(f'{where}: {err}') from None


def check_sections(cfg: DictConfig) -> None:
    """The checks after the components' own (``check_component_types`` runs before them)."""
    check_scheduler_can_act(cfg)
    check_shard_integrity(cfg)
