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

The section is checked by ``data/multidomain_config.validate_multidomain_config`` (the same
function the pre-flight check calls): proportions that do not sum to 1 (beyond 1e-3) or give a
domain no share are refused, not normalised.
The stream is infinite (a domain that runs out starts a reshuffled pass), so give
``max_duration`` in batches or tokens, not epochs. ``drop_last`` must stay true.

Eval: the ``drp_domain_evals`` eval-loader entry (``domain_eval_loaders.py``) stands for one ``drp_text``
(LLM-Foundry's ``text``, built under the streaming shm lock) eval loader per domain with ``label: <domain>``,
so Composer logs ``metrics/eval/<domain>/LanguageCrossEntropy``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from composer.core import DataSpec
from llmfoundry import registry
from llmfoundry.utils.registry_utils import construct_from_registry
from streaming import Stream
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from drp_foundry.data.multidomain_config import DATASET_KEYS, validate_multidomain_config
from drp_foundry.data.multidomain_dataset import MultiDomainStreamingDataset

__all__ = ['build_multidomain_dataloader', 'DomainTaggedCollator', 'DATASET_KEYS']


class DomainTaggedCollator:
    """Collate ``{'input_ids', 'domain_idx'}`` samples: the text collator on the tokens, plus ``domain_idx``."""

    def __init__(self, token_collator):
        self.token_collator = token_collator

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.token_collator([example['input_ids'] for example in examples])
        batch['domain_idx'] = torch.tensor([example['domain_idx'] for example in examples], dtype=torch.long)
        return batch


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
    settings = validate_multidomain_config(dataset, device_batch_size=device_batch_size, num_workers=num_workers,
                                           prefetch_factor=prefetch_factor, drop_last=drop_last)
    dataset = dict(dataset)
    multidomain = MultiDomainStreamingDataset(
        domain_names=settings.domains,
        streams=[Stream(**stream) for stream in settings.streams],
        proportions=settings.proportions,
        max_seq_len=settings.max_seq_len,
        device_batch_size=int(device_batch_size),
        shuffle_seed=settings.shuffle_seed,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        update_lag_batches=settings.update_lag_batches,
        token_encoding_type=settings.token_encoding_type,
        max_mixture_segments=settings.max_mixture_segments,
        streaming_kwargs=settings.streaming_kwargs,
        shuffle_algo=settings.shuffle_algo,
        shuffle_block_shards=settings.shuffle_block_shards,
        prefetch=settings.prefetch,
        num_canonical_nodes=settings.num_canonical_nodes,
    )

    multidomain.vocab_size = len(tokenizer)  # token ids beyond it are refused, naming the domain and shard
    manifest = Path(str(dataset.get('data_root') or '')) / 'manifest.json'
    if dataset.get('data_root') and not dataset.get('remote_root') and manifest.is_file():
        try:  # a data_prep build: every sample has its max_seq_len tokens
            multidomain.sample_length = int(json.loads(manifest.read_text())['settings']['max_seq_len'])
        except (ValueError, KeyError, TypeError):
            pass
    collator_dataset_cfg = dict(settings.collator_kwargs)
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
        pin_memory=pin_memory and torch.cuda.is_available(),  # pinning helps only a copy to a GPU (torch warns)
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
