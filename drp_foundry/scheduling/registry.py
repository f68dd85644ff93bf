"""Policy registry: mixture policies found by name, through entry points.

A policy is a ``MixturePolicy`` subclass with a ``name``; its ``__init__`` keyword arguments
(after ``domain_names`` and ``reference_ratio``) are its config keys. It is configured as

    policy: {name: drpruning, rho: 0.1, reference_losses: {arxiv: 2.1, ...}}

and registered in a package's ``setup.py`` under the entry-point group
``drp_foundry_policies`` (``mypolicy = mypkg.my_policy:MyPolicy``), the way LLM-Foundry finds
callbacks and algorithms. The four built-in policies are registered the same way (and are
also known without installed metadata). ``total_steps`` is set by the caller (the callback,
from ``max_duration``) and is not a config key. A key set to null takes the policy's default
(so a recipe can keep ``reference_losses: ${variables.reference_losses}`` and switch to
``constant`` with ``variables.reference_losses=null``).

Pure Python (importlib.metadata); no Composer import.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from drp_foundry.scheduling.policies import BUILTIN_POLICIES, MixturePolicy

__all__ = ['ENTRY_POINT_GROUP', 'registered_policies', 'get_policy_class', 'policy_config_keys',
           'check_policy_config', 'build_policy']

ENTRY_POINT_GROUP = 'drp_foundry_policies'
_NOT_CONFIG = ('self', 'domain_names', 'reference_ratio', 'total_steps')


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def registered_policies() -> dict[str, type[MixturePolicy] | metadata.EntryPoint]:
    """Name -> class (built-in) or entry point (loaded on first use)."""
    found: dict[str, Any] = dict(BUILTIN_POLICIES)
    for entry_point in _entry_points():
        if entry_point.name in BUILTIN_POLICIES and entry_point.value.endswith(
                f':{BUILTIN_POLICIES[entry_point.name].__name__}'):
            continue
        found[entry_point.name] = entry_point
    return found


def get_policy_class(name: str) -> type[MixturePolicy]:
    registry = registered_policies()
    if name not in registry:
        raise ValueError(f'unknown policy {name!r}; registered policies: {sorted(registry)} (a new policy is a '
                         f'MixturePolicy subclass registered under the entry-point group {ENTRY_POINT_GROUP!r})')
    cls = registry[name]
    if isinstance(cls, metadata.EntryPoint):
        cls = cls.load()
    if not (isinstance(cls, type) and issubclass(cls, MixturePolicy)):
        raise ValueError(f'policy {name!r} ({cls!r}) is not a MixturePolicy subclass')
    return cls


def policy_config_keys(cls: type[MixturePolicy]) -> set[str]:
    """The keyword arguments of the class and its bases (their ``**kwargs`` pass upward)."""
    keys: set[str] = set()
    for klass in cls.__mro__:
        if '__init__' in vars(klass) and klass is not object:
            keys |= {p.name for p in inspect.signature(klass.__init__).parameters.values()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return keys - set(_NOT_CONFIG)


def _split(config: Mapping[str, Any], where: str) -> tuple[type[MixturePolicy], dict[str, Any]]:
    if isinstance(config, str) or not isinstance(config, Mapping):
        raise ValueError(f'{where} must be a mapping with the policy name and its keys, e.g. '
                         f'`policy: {{name: {config if isinstance(config, str) else "drpruning"}, ...}}`; got {config!r}')
    if 'name' not in config:
        raise ValueError(f'{where} needs `name` (one of {sorted(registered_policies())})')
    kwargs = {key: value for key, value in config.items() if key != 'name' and value is not None}  # null = default
    try:
        cls = get_policy_class(str(config['name']))
    except ValueError as error:
        raise ValueError(f'{where}.name: {error}') from error
    accepted = policy_config_keys(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f'{where}: {unknown} are not keys of policy {cls.name!r} (its keys: {sorted(accepted)})')
    return cls, kwargs


def build_policy(config: Mapping[str, Any], domain_names: Sequence[str], reference_ratio: Sequence[float],
                 total_steps: int | None = None, where: str = 'policy') -> MixturePolicy:
    """The policy ``config`` names, for these domains; errors name ``where`` and the key."""
    cls, kwargs = _split(config, where)
    try:
        return cls(list(domain_names), reference_ratio, total_steps=total_steps, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f'{where} ({cls.name}): {error}') from error


def check_policy_config(config: Mapping[str, Any], domain_names: Sequence[str] | None = None,
                        where: str = 'policy') -> None:
    """Validate a policy config before the domains are known (names, keys and values).

    Without ``domain_names`` the policy is built on stand-in domains: the keys of a
    ``reference_losses`` mapping, or as many as its list has, with a uniform ratio. The
    domain-dependent checks run again when the callback meets the dataset.
    """
    _split(config, where)
    if domain_names is None:
        losses = config.get('reference_losses')
        if isinstance(losses, Mapping):
            domain_names = list(losses)
        elif isinstance(losses, Sequence) and not isinstance(losses, str) and len(losses) > 0:
            domain_names = [f'domain{i}' for i in range(len(losses))]
        else:
            domain_names = ['domain0', 'domain1']
    ratio = [1.0 / len(domain_names)] * len(domain_names)
    build_policy(config, domain_names, ratio, total_steps=None, where=where)
