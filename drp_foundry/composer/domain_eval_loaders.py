"""One eval loader per domain from one YAML entry: ``eval_loader: {name: drp_domain_evals}``.

The data scheduler reads each domain's held-out loss as
``metrics/eval/<domain>/LanguageCrossEntropy``, so a run needs one eval loader per domain,
labelled with the domain's name. Instead of one hand-written block per domain, a YAML says::

    eval_loader:
      name: drp_domain_evals     # data_root, domains, max_seq_len: the drp_multidomain train loader's
      # split: eval              # <data_root>/<domain>/<split>/
      # num_workers: 2           # any other key goes to every generated loader (`dataset:` is merged)

and this module replaces the entry, before LLM-Foundry reads the config, by the list a user
would have written: for every domain a ``drp_text`` loader labelled with the domain, reading
``<data_root>/<domain>/<split>/`` in order, without dropping the tail. ``drp_text`` is LLM-Foundry's
stock ``text`` loader (same keys, same batches), built under the node-wide lock on streaming's
shared-memory allocation (``drp_foundry/data/shm_lock.py``): two jobs that start on one machine at
once do not collide there. The entry may also be one item of an ``eval_loaders`` list beside other loaders. With a train loader other than
``drp_multidomain`` (LLM-Foundry's ``text``, say), give ``data_root``, ``domains`` and
``max_seq_len`` in the entry.

How it reaches a stock LLM-Foundry ``train.py``: LLM-Foundry's train entry
(``llmfoundry.command_utils.train.train``, which its ``scripts/train/train.py`` and ours both
call) applies every function registered in its ``config_transforms`` registry to the YAML
before it builds anything (``transforms='all'``). drp-foundry registers
``expand_domain_eval_loaders`` there through the ``llmfoundry_config_transforms`` entry point,
so the expanded list goes through LLM-Foundry's own ``build_eval_loaders``, appears in the
logged config and resumes like a hand-written one. Why not a callback that adds evaluators
once the Trainer exists: it would bypass LLM-Foundry's evaluator building and Composer's
evaluator setup (intervals, metrics, checkpointed eval state), and Composer would warn that
``eval_interval`` has no eval loader. Why not a dataloader: LLM-Foundry makes exactly one
evaluator per ``eval_loaders`` entry.

The name is also registered as a dataloader that only raises, so a train script that skips
config transforms fails with this explanation instead of "not registered".
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from drp_foundry.data.multidomain_config import check_domain_names

NAME = 'drp_domain_evals'
TEXT_LOADER = 'drp_text'  # the loader each domain gets: LLM-Foundry's `text`, built under the shm lock
# Keys the entry itself takes; every other key is copied into each generated loader.
ENTRY_KEYS = ('name', 'data_root', 'remote_root', 'domains', 'split', 'max_seq_len', 'dataset')
# Defaults of each generated loader (an eval split is small and read once per eval). Pinned host memory only
# helps a copy to an accelerator; without one torch warns that it ignores it, so it follows the machine.
LOADER_DEFAULTS: dict[str, Any] = {'drop_last': False, 'num_workers': 0, 'prefetch_factor': None,
                                   'persistent_workers': False}


def loader_defaults() -> dict[str, Any]:
    import torch

    return {**LOADER_DEFAULTS, 'pin_memory': torch.cuda.is_available()}


class DomainEvalsError(ValueError):
    """A ``drp_domain_evals`` entry that cannot be expanded; the message names the key and the fix."""


def _train_dataset(cfg: dict[str, Any]) -> dict[str, Any]:
    loader = cfg.get('train_loader') or {}
    if loader.get('name') == 'drp_multidomain' and isinstance(loader.get('dataset'), dict):
        return loader['dataset']
    return {}


def domain_eval_loaders(entry: dict[str, Any], cfg: dict[str, Any], where: str = 'eval_loader',
                        check_folders: bool = True) -> list[dict[str, Any]]:
    """The ``drp_text`` eval loader configs one ``drp_domain_evals`` entry stands for (in domain order)."""
    train = _train_dataset(cfg)
    if 'label' in entry:
        raise DomainEvalsError(f'{where}.label: not used by {NAME}; each generated loader is labelled with its '
                               'domain (the scheduler finds the losses by domain name). Remove the key')
    data_root = entry.get('data_root', train.get('data_root'))
    domains = entry.get('domains', train.get('domains'))
    max_seq_len = entry.get('max_seq_len', train.get('max_seq_len', cfg.get('max_seq_len')))
    remote_root = entry.get('remote_root', train.get('remote_root'))
    split = entry.get('split', 'eval')
    source = '' if train else ' (the train loader is not drp_multidomain, so there is no default)'
    if not data_root:
        raise DomainEvalsError(f'{where}.data_root: required{source}; the folder holding <domain>/{split}/')
    try:  # the train loader's own rule (and message) when the domains come from it
        domains = check_domain_names(domains, f'{where}.domains' if 'domains' in entry or not train
                                     else 'train_loader.dataset.domains')
    except ValueError as err:
        raise DomainEvalsError(f'{err}{source}') from None
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise DomainEvalsError(f'{where}.max_seq_len: a positive integer is required{source}, got {max_seq_len!r}')
    extra_dataset = entry.get('dataset') or {}
    if not isinstance(extra_dataset, dict):
        raise DomainEvalsError(f'{where}.dataset: expected a mapping of keys for every domain\'s text dataset')
    loader_keys = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}

    loaders = []
    for domain in domains:
        local = os.path.join(str(data_root), domain)
        if check_folders and not remote_root and not os.path.isfile(os.path.join(local, split, 'index.json')):
            raise DomainEvalsError(f'{where}: no MDS eval split for domain {domain!r} at {os.path.join(local, split)} '
                                   '(index.json missing); build it with `drp-prepare-data`, or '
                                   f'fix {where}.data_root / split')
        dataset = {'local': local, 'split': split, 'shuffle': False, 'max_seq_len': max_seq_len}
        if remote_root:
            dataset['remote'] = os.path.join(str(remote_root), domain)
        dataset.update(copy.deepcopy(extra_dataset))
        loaders.append({'label': domain, 'name': TEXT_LOADER, **loader_defaults(), **copy.deepcopy(loader_keys),
                        'dataset': dataset})
    return loaders


def uses_domain_evals(cfg: Mapping[str, Any]) -> bool:
    """Whether a config (plain dict or OmegaConf) has a ``drp_domain_evals`` eval loader entry."""
    single = cfg.get('eval_loader')
    several = cfg.get('eval_loaders')
    entries = ([single] if isinstance(single, Mapping) else list(single or [])) + list(several or [])
    return any(isinstance(e, Mapping) and e.get('name') == NAME for e in entries)


def expand_domain_eval_loaders(cfg: dict[str, Any], check_folders: bool = True) -> dict[str, Any]:
    """LLM-Foundry config transform: every ``drp_domain_evals`` entry becomes one ``drp_text`` loader per domain.

    Takes and returns the plain (resolved) config dict; a config without such an entry comes back unchanged.
    """
    if not uses_domain_evals(cfg):
        return cfg
    register_text_loader()
    cfg = dict(cfg)
    single = cfg.get('eval_loader')
    if isinstance(single, dict):
        if cfg.get('eval_loaders'):
            raise DomainEvalsError('eval_loader and eval_loaders are both set; keep one (put the '
                                   f'{NAME} entry into the eval_loaders list)')
        entries, wheres = [single], ['eval_loader']
    else:
        entries = list(single or cfg.get('eval_loaders') or [])
        key = 'eval_loader' if single else 'eval_loaders'
        wheres = [f'{key}[{i}]' for i in range(len(entries))]
    expanded: list[dict[str, Any]] = []
    for entry, where in zip(entries, wheres):
        if isinstance(entry, dict) and entry.get('name') == NAME:
            expanded.extend(domain_eval_loaders(entry, cfg, where, check_folders))
        else:
            expanded.append(entry)
    labels = [e.get('label') for e in expanded if isinstance(e, dict)]
    twice = sorted({label for label in labels if label is not None and labels.count(label) > 1})
    if twice:
        raise DomainEvalsError(f'eval loaders labelled {twice} appear twice: once from {NAME} and once written '
                               'by hand (or two entries cover the same domain); remove one')
    cfg.pop('eval_loader', None)
    cfg['eval_loaders'] = expanded
    return cfg


def register_text_loader() -> None:
    """Make sure ``drp_text`` resolves: an install whose metadata predates the entry point (``pip install -e .``
    not rerun since) gets it registered here, in the process that expands the entry."""
    try:
        from llmfoundry import registry
    except ImportError:  # no LLM-Foundry: nothing will build the loaders here
        return
    if TEXT_LOADER not in registry.dataloaders:  # (loads only that entry point; get_all() would load them all)
        registry.dataloaders.register(TEXT_LOADER, func=build_drp_text_dataloader)


def refuse_unexpanded(*args: Any, **kwargs: Any):
    """Registered as the dataloader ``drp_domain_evals``: reached only when config transforms did not run."""
    del args, kwargs
    raise DomainEvalsError(f'eval loader {NAME!r} reached the dataloader builder unexpanded. It is a config entry '
                           'that LLM-Foundry\'s train entry replaces (config transform '
                           f'{NAME!r}, applied with transforms="all") by one text loader per domain; check that '
                           'drp-foundry is installed (pip install -e .) and that your train script calls '
                           'llmfoundry.command_utils.train.train or applies config transforms')


def build_drp_text_dataloader(tokenizer: Any, device_batch_size: int | float, dataset: dict[str, Any],
                              drop_last: bool, num_workers: int, pin_memory: bool = True, prefetch_factor: int = 2,
                              persistent_workers: bool = True, timeout: int = 0):
    """Registered as the dataloader ``drp_text``: LLM-Foundry's ``text`` loader, built under the streaming shm lock.

    The signature is ``llmfoundry.data.text_data.build_text_dataloader``'s (the pre-flight checks the keys
    against it). Every rank builds it (LLM-Foundry builds every eval loader on every rank), so the lock's
    collective entry and exit line up; the StreamingDataset, and with it its shared-memory prefix, is made
    here in the main process, not in DataLoader workers.
    """
    from llmfoundry.data.text_data import build_text_dataloader

    from drp_foundry.data.shm_lock import node_shm_lock

    with node_shm_lock():
        return build_text_dataloader(tokenizer=tokenizer, device_batch_size=device_batch_size, dataset=dataset,
                                     drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                                     prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                                     timeout=timeout)
