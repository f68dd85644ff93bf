"""The ``drp_multidomain`` dataset section: every rule, in one function.

``validate_multidomain_config`` is called by the pre-flight check
(``composer/config_checks.py``, before any model is built) and by the dataloader builder
(``composer/multidomain_dataloader.py``), so both refuse the same configs with the same
message; ``MultiDomainStreamingDataset`` checks its own arguments with the helpers below.
It returns the normalised settings (``MultiDomainSettings``) or raises a ``ValueError`` that
starts with the key (``train_loader.dataset.proportions: ...``) and says the fix.

Pure Python + numpy (no Composer, LLM-Foundry or streaming import): the only file access is
reading each local domain's ``index.json`` (``check_folders``).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drp_foundry.mixtures import domain_mixture

__all__ = ['DATASET_KEYS', 'STREAM_KEYS', 'STREAMING_KEYS', 'SHUFFLE_ALGOS', 'TOKEN_ENCODING_TYPES',
           'MultiDomainSettings', 'validate_multidomain_config', 'check_domain_names', 'check_update_lag',
           'check_choice', 'check_int', 'indexed_samples']

SHUFFLE_ALGOS = ('auto', 'full', 'shard_block')
TOKEN_ENCODING_TYPES = ('int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64')
# passed through to streaming.StreamingDataset
STREAMING_KEYS = ('download_retry', 'download_timeout', 'validate_hash', 'keep_zip', 'cache_limit')
STREAM_KEYS = ('local', 'remote', 'split')
DATASET_KEYS = ('domains', 'proportions', 'max_seq_len', 'data_root', 'split', 'remote_root', 'streams',
                'shuffle_seed', 'update_lag_batches', 'token_encoding_type', 'eos_token_id',
                'bos_token_id', 'max_mixture_segments', 'shuffle_algo', 'shuffle_block_shards',
                'prefetch', 'num_canonical_nodes',
                'require_manifest',  # read by the pre-flight check only: false accepts shards not built by data_prep
                ) + STREAMING_KEYS
_BUILD_HINT = '`drp-prepare-data --corpus ... --out ...`'


@dataclass(frozen=True)
class MultiDomainSettings:
    """A checked ``drp_multidomain`` dataset section, defaults filled in, proportions in domain order."""

    domains: list[str]
    proportions: np.ndarray
    max_seq_len: int
    streams: list[dict[str, Any]]  # per domain: {'local', 'remote', 'split'} (remote may be None)
    shuffle_seed: int = 17
    update_lag_batches: int | str = 'auto'
    token_encoding_type: str = 'int64'
    max_mixture_segments: int = 4096
    shuffle_algo: str = 'auto'
    shuffle_block_shards: int = 8
    prefetch: bool = True
    num_canonical_nodes: int | None = None  # ours: node shares of shard_block; None = nodes (or the checkpoint's)
    require_manifest: bool = True
    streaming_kwargs: dict[str, Any] = field(default_factory=dict)
    collator_kwargs: dict[str, int] = field(default_factory=dict)  # eos_token_id / bos_token_id


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f' Did you mean {" or ".join(repr(c) for c in close)}?' if close else ''


def check_int(value: Any, key: str, minimum: int | None = None) -> int:
    """An integer (bools refused), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) or int(value) != value:
        raise ValueError(f'{key}: expected an integer, got {value!r}.')
    if minimum is not None and int(value) < minimum:
        raise ValueError(f'{key}: must be >= {minimum}, got {value!r}.')
    return int(value)


def check_choice(value: Any, key: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f'{key}: must be one of {list(choices)}, got {value!r}.')
    return str(value)


def _check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{key}: expected true or false, got {value!r}.')
    return value


def check_domain_names(domains: Any, key: str) -> list[str]:
    """A non-empty list of unique domain names."""
    if isinstance(domains, (str, bytes)) or not isinstance(domains, Sequence) or len(domains) == 0:
        raise ValueError(f'{key}: a non-empty list of domain names is required (the folders under '
                         f'data_root), got {domains!r}.')
    names = [str(name) for name in domains]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f'{key}: domain names must be unique; {repeated} appear more than once.')
    return names


def check_update_lag(value: Any, key: str, num_workers: int, prefetch_factor: int | None) -> int | str:
    """``'auto'`` (or None), or an integer >= the batches a DataLoader can have in flight."""
    if value is None or value == 'auto':
        return 'auto'
    bound = int(num_workers) * int(prefetch_factor or 2) if int(num_workers) > 0 else 0
    lag = check_int(value, key)
    if lag < bound:
        raise ValueError(f'{key}: update_lag_batches={value} is below the batches that can be in flight '
                         f'(num_workers * prefetch_factor = {bound}); set it to "auto" or an integer >= {bound}.')
    return lag


def indexed_samples(folder: str) -> int | None:
    """Samples listed in ``folder/index.json`` (an MDS index); None when there is no index."""
    path = os.path.join(folder, 'index.json')
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            index = json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f'{path}: not a readable MDS index ({err}); rebuild the folder with {_BUILD_HINT}') from None
    return int(sum(shard.get('samples', 0) for shard in index.get('shards', [])))


def _streams(dataset: Mapping[str, Any], domains: list[str], where: str) -> list[dict[str, Any]]:
    overrides = dataset.get('streams') or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f'{where}.streams: expected a mapping {{domain: {{local, remote, split}}}}, '
                         f'got {overrides!r}.')
    unknown = sorted(str(name) for name in set(overrides) - set(domains))
    if unknown:
        raise ValueError(f'{where}.streams names unknown domains {unknown}; the domains are {domains}.')
    data_root, remote_root = dataset.get('data_root'), dataset.get('remote_root')
    split = dataset.get('split', 'train')
    streams = []
    for domain in domains:
        stream = dict(overrides.get(domain) or {})
        bad = sorted(set(stream) - set(STREAM_KEYS))
        if bad:
            raise ValueError(f'{where}.streams.{domain}: unknown keys {bad}; allowed {list(STREAM_KEYS)}.')
        if stream.get('local') is None:
            if data_root is None:
                raise ValueError(f'{where}: domain {domain!r} has no location: set {where}.data_root '
                                 f'or {where}.streams.{domain}.local.')
            stream['local'] = os.path.join(str(data_root), domain)
            if remote_root is not None and stream.get('remote') is None:
                stream['remote'] = os.path.join(str(remote_root), domain)
        stream.setdefault('remote', None)
        stream.setdefault('split', split)
        streams.append({'local': str(stream['local']), 'remote': None if stream['remote'] is None else
                        str(stream['remote']), 'split': None if stream['split'] is None else str(stream['split'])})
    return streams


def _check_folders(streams: list[dict[str, Any]], domains: list[str], where: str) -> None:
    empty = []
    for domain, stream in zip(domains, streams):
        if stream['remote']:
            continue  # the index comes from the remote
        folder = os.path.join(stream['local'], stream['split'] or '')
        count = indexed_samples(folder)
        if count is None:
            raise ValueError(f'{where}: domain {domain!r} has no MDS dataset at {folder} (missing index.json); '
                             f'build it with {_BUILD_HINT}, fix data_root / split / streams.{domain}.local, '
                             'or give a remote.')
        if count == 0:
            empty.append(domain)
    if empty:
        raise ValueError(f'{where}: domains {empty} have no samples in their MDS index; remove them from '
                         '`domains` or rebuild their shards.')


def validate_multidomain_config(dataset: Mapping[str, Any], *, where: str = 'train_loader.dataset',
                                device_batch_size: int | float | None = None, num_workers: int = 0,
                                prefetch_factor: int | None = 2, drop_last: bool = True,
                                check_folders: bool = True) -> MultiDomainSettings:
    """Check a ``drp_multidomain`` ``dataset`` section (and the loader keys it depends on).

    ``where`` prefixes every key in the messages. ``device_batch_size`` is checked when given
    (the builder knows it, the pre-flight does not). ``check_folders`` reads the ``index.json``
    of every domain that has no remote: missing or empty domains are refused.
    """
    if not isinstance(dataset, Mapping):
        raise ValueError(f'{where}: expected a mapping of drp_multidomain keys, got {type(dataset).__name__}.')
    for key in dataset:
        if key not in DATASET_KEYS:
            raise ValueError(f'{where}.{key}: unknown key for drp_multidomain.{_did_you_mean(str(key), DATASET_KEYS)} '
                             f'Accepted keys: {list(DATASET_KEYS)}')
    for key in ('domains', 'proportions', 'max_seq_len'):
        if dataset.get(key) is None:
            raise ValueError(f'{where}.{key} is required.')
    domains = check_domain_names(dataset['domains'], f'{where}.domains')
    # a zero share is allowed here (a domain evaluated but not trained on); drp_dynamic_loading refuses it,
    # and the pre-flight check builds that callback with these proportions
    proportions = domain_mixture(dataset['proportions'], domains, f'{where}.proportions')
    max_seq_len = check_int(dataset['max_seq_len'], f'{where}.max_seq_len', minimum=1)
    loader = where.rsplit('.', 1)[0]  # train_loader
    if not drop_last:
        raise ValueError(f'{loader}.drop_last must be true: a global batch is a fixed block of samples.')
    check_int(num_workers, f'{loader}.num_workers', minimum=0)
    if device_batch_size is not None:
        check_int(device_batch_size, 'device batch size (global_train_batch_size / world size)', minimum=1)
    streams = _streams(dataset, domains, where)
    settings = MultiDomainSettings(
        domains=domains,
        proportions=proportions,
        max_seq_len=max_seq_len,
        streams=streams,
        shuffle_seed=check_int(dataset.get('shuffle_seed', 17), f'{where}.shuffle_seed'),
        update_lag_batches=check_update_lag(dataset.get('update_lag_batches', 'auto'), f'{where}.update_lag_batches',
                                            num_workers, prefetch_factor),
        token_encoding_type=check_choice(dataset.get('token_encoding_type', 'int64'), f'{where}.token_encoding_type',
                                         TOKEN_ENCODING_TYPES),
        max_mixture_segments=check_int(dataset.get('max_mixture_segments', 4096), f'{where}.max_mixture_segments',
                                       minimum=1),
        shuffle_algo=check_choice(dataset.get('shuffle_algo', 'auto'), f'{where}.shuffle_algo', SHUFFLE_ALGOS),
        shuffle_block_shards=check_int(dataset.get('shuffle_block_shards', 8), f'{where}.shuffle_block_shards',
                                       minimum=1),
        prefetch=_check_bool(dataset.get('prefetch', True), f'{where}.prefetch'),
        num_canonical_nodes=None if dataset.get('num_canonical_nodes') is None else
        check_int(dataset['num_canonical_nodes'], f'{where}.num_canonical_nodes', minimum=1),
        require_manifest=_check_bool(dataset.get('require_manifest', True), f'{where}.require_manifest'),
        streaming_kwargs={key: dataset[key] for key in STREAMING_KEYS if key in dataset},
        collator_kwargs={key: check_int(dataset[key], f'{where}.{key}', minimum=0)
                         for key in ('eos_token_id', 'bos_token_id') if dataset.get(key) is not None},
    )
    if check_folders:
        _check_folders(streams, domains, where)
    return settings
