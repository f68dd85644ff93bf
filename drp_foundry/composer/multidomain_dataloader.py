"""LLM-Foundry dataloader ``drp_multidomain``: the multi-domain train stream, plus per-domain eval loaders.

Train loader (YAML; LLM-Foundry adds ``tokenizer`` and ``device_batch_size``)::

    train_loader:
      name: drp_multidomain
      dataset:
        data_root: /data/redpajama_mds     # DATA_ROOT/<domain>/<split>/ (docs/DESIGN.md)
        split: train
        remote_root: null                  # optional: remote DATA_ROOT, same layout
        streams: {}                        # optional per-domain {local, remote, split} overrides
        domains: [cc, c4, github, book, wiki, arxiv, stackexchange]
        proportions: [0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02]   # or {cc: 0.67, ...}
        max_seq_len: 4096
        shuffle_seed: 17
        update_lag_batches: auto           # num_workers * prefetch_factor; or an int >= that
        shuffle_algo: auto                 # shard_block if a stream has a remote, else full
        shuffle_block_shards: 8            # shard_block: shards shuffled together (cache ~3 blocks/domain)
        cache_limit: null                  # e.g. 200gb: local cache bound (streaming evicts LRU shards)
        eos_token_id: 2                    # optional: adds sequence_id like the `text` loader
      num_workers: 8
      prefetch_factor: 2
      persistent_workers: true
      pin_memory: true

Batches are LLM-Foundry ``text`` batches (``input_ids``, ``attention_mask``, ``labels``,
token counts) plus ``domain_idx`` (LongTensor[B], index into ``domains``); Composer's
``HuggingFaceModel.forward`` passes only the model's forward arguments, so the extra key is
harmless. The dataset (``dataloader.dataset``) is the scheduler's handle: ``domain_names``,
``proportions``, ``set_proportions(p, at_batch)``, ``samples_per_domain(at_batch)``.

Proportions that do not sum to 1 (beyond 1e-3) are refused, not normalised.
The stream is infinite (a domain that runs out starts a reshuffled pass), so give
``max_duration`` in batches or tokens, not epochs. ``drop_last`` must stay true.

Eval: ``domain_eval_loader_configs(data_root, domains, max_seq_len)`` expands to one stock
``text`` eval loader per domain with ``label: <domain>``, so Composer logs
``metrics/eval/<domain>/LanguageCrossEntropy``; put the list under ``eval_loaders``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from composer.core import DataSpec
from llmfoundry import registry
from llmfoundry.utils.registry_utils import construct_from_registry
from streaming import Stream
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from drp_foundry.data.multidomain_dataset import MultiDomainStreamingDataset

__all__ = ['build_multidomain_dataloader', 'domain_eval_loader_configs', 'DomainTaggedCollator',
           'DATASET_KEYS']

_STREAMING_KEYS = ('download_retry', 'download_timeout', 'validate_hash', 'keep_zip', 'cache_limit')
DATASET_KEYS = ('domains', 'proportions', 'max_seq_len', 'data_root', 'split', 'remote_root', 'streams',
                'shuffle_seed', 'update_lag_batches', 'token_encoding_type', 'eos_token_id',
                'bos_token_id', 'max_mixture_segments', 'shuffle_algo', 'shuffle_block_shards',
                'prefetch',
                'require_manifest',  # read by the pre-flight check only (config_checks): false accepts non-data_prep shards
                ) + _STREAMING_KEYS
_STREAM_KEYS = ('local', 'remote', 'split')


class DomainTaggedCollator:
    """Collate ``{'input_ids', 'domain_idx'}`` samples: the text collator on the tokens, plus ``domain_idx``."""

    def __init__(self, token_collator):
        self.token_collator = token_collator

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.token_collator([example['input_ids'] for example in examples])
        batch['domain_idx'] = torch.tensor([example['domain_idx'] for example in examples], dtype=torch.long)
        return batch


def _domain_streams(dataset: Mapping[str, Any], domains: list[str]) -> list[Stream]:
    overrides = dict(dataset.get('streams') or {})
    unknown = sorted(set(overrides) - set(domains))
    if unknown:
        raise ValueError(f'train_loader.dataset.streams names unknown domains {unknown}; '
                         f'the domains are {domains}.')
    data_root, remote_root = dataset.get('data_root'), dataset.get('remote_root')
    split = dataset.get('split', 'train')
    streams = []
    for domain in domains:
        stream_cfg = dict(overrides.get(domain) or {})
        bad = sorted(set(stream_cfg) - set(_STREAM_KEYS))
        if bad:
            raise ValueError(f'train_loader.dataset.streams.{domain}: unknown keys {bad}; allowed {_STREAM_KEYS}.')
        if 'local' not in stream_cfg:
            if data_root is None:
                raise ValueError(f'domain {domain!r} has no location: set train_loader.dataset.data_root '
                                 f'or train_loader.dataset.streams.{domain}.local.')
            stream_cfg['local'] = os.path.join(str(data_root), domain)
            if remote_root is not None and 'remote' not in stream_cfg:
                stream_cfg['remote'] = os.path.join(str(remote_root), domain)
        stream_cfg.setdefault('split', split)
        streams.append(Stream(**stream_cfg))
    return streams


def build_multidomain_dataloader(tokenizer: PreTrainedTokenizerBase | None,
                                 device_batch_size: int | float,
                                 dataset: dict[str, Any],
                                 drop_last: bool = True,
                                 num_workers: int = 0,
                                 pin_memory: bool = True,
                                 prefetch_factor: int | None = 2,
                                 persistent_workers: bool = True,
                                 timeout: float = 0) -> DataSpec:
    """Build the ``drp_multidomain`` train loader (registered in ``llmfoundry_dataloaders``)."""
    if tokenizer is None:
        raise ValueError('drp_multidomain needs the tokenizer (LLM-Foundry passes it from the `tokenizer` section).')
    if int(device_batch_size) != device_batch_size:
        raise ValueError(f'drp_multidomain needs an integer device batch size, got {device_batch_size}.')
    dataset = dict(dataset)
    unknown = sorted(set(dataset) - set(DATASET_KEYS))
    if unknown:
        raise ValueError(f'train_loader.dataset: unknown keys {unknown}; allowed keys are {list(DATASET_KEYS)}.')
    for key in ('domains', 'proportions', 'max_seq_len'):
        if dataset.get(key) is None:
            raise ValueError(f'train_loader.dataset.{key} is required.')
    domains = dataset['domains']
    if isinstance(domains, str) or not isinstance(domains, Sequence):
        raise ValueError(f'train_loader.dataset.domains must be a list of domain names, got {domains!r}.')
    domains = [str(name) for name in domains]
    if not drop_last:
        raise ValueError('train_loader.drop_last must be true: a global batch is a fixed block of samples.')

    multidomain = MultiDomainStreamingDataset(
        domain_names=domains,
        streams=_domain_streams(dataset, domains),
        proportions=dataset['proportions'],
        max_seq_len=int(dataset['max_seq_len']),
        device_batch_size=int(device_batch_size),
        shuffle_seed=int(dataset.get('shuffle_seed', 17)),
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        update_lag_batches=dataset.get('update_lag_batches', 'auto'),
        token_encoding_type=dataset.get('token_encoding_type', 'int64'),
        max_mixture_segments=int(dataset.get('max_mixture_segments', 4096)),
        streaming_kwargs={key: dataset[key] for key in _STREAMING_KEYS if key in dataset},
        shuffle_algo=str(dataset.get('shuffle_algo', 'auto')),
        shuffle_block_shards=int(dataset.get('shuffle_block_shards', 8)),
        prefetch=bool(dataset.get('prefetch', True)),
    )

    collator_dataset_cfg = {key: dataset[key] for key in ('eos_token_id', 'bos_token_id') if key in dataset}
    token_collator, _ = construct_from_registry(
        name='text_collator',
        registry=registry.collators,
        partial_function=False,
        kwargs={'dataloader_cfg': {'dataset': collator_dataset_cfg}, 'tokenizer': tokenizer,
                'dataset_batch_size': int(device_batch_size)},
    )
    multiprocess = num_workers > 0
    loader = DataLoader(
        multidomain,
        batch_size=int(device_batch_size),
        collate_fn=DomainTaggedCollator(token_collator),
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=(prefetch_factor or 2) if multiprocess else None,
        persistent_workers=persistent_workers and multiprocess,
        timeout=timeout if multiprocess else 0,
    )
    return construct_from_registry(
        name='data_spec',
        registry=registry.data_specs,
        partial_function=False,
        kwargs={'dl': loader, 'dataset_cfg': dataset},
    )


def domain_eval_loader_configs(data_root: str,
                               domains: Sequence[str],
                               max_seq_len: int,
                               split: str = 'eval',
                               remote_root: str | None = None,
                               num_workers: int = 0,
                               eos_token_id: int | None = None) -> list[dict[str, Any]]:
    """One LLM-Foundry ``text`` eval loader config per domain, labelled with the domain name.

    ``DATA_ROOT/<domain>/<split>/`` is read in order (no shuffle, no dropped tail). Use the
    list as ``eval_loaders`` in the train YAML (or pass it to ``build_eval_loaders``).
    """
    configs = []
    for domain in domains:
        local = os.path.join(str(data_root), domain)
        if remote_root is None and not os.path.isfile(os.path.join(local, split, 'index.json')):
            raise ValueError(f'eval data for domain {domain!r} not found at {os.path.join(local, split)}; '
                             f'run data_prep for it or fix data_root / split.')
        dataset_cfg: dict[str, Any] = {'local': local, 'split': split, 'shuffle': False,
                                       'max_seq_len': int(max_seq_len)}
        if remote_root is not None:
            dataset_cfg['remote'] = os.path.join(str(remote_root), domain)
        if eos_token_id is not None:
            dataset_cfg['eos_token_id'] = int(eos_token_id)
        multiprocess = num_workers > 0
        configs.append({
            'name': 'text',
            'label': domain,
            'dataset': dataset_cfg,
            'drop_last': False,
            'num_workers': num_workers,
            # torch refuses prefetch_factor / persistent_workers without worker processes.
            'prefetch_factor': 2 if multiprocess else None,
            'persistent_workers': multiprocess,
        })
    return configs
