"""drp_multidomain over a real S3-compatible server (moto, on 127.0.0.1): shard-aware order, cache_limit, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from local_s3 import LocalS3
from streaming import MDSWriter, Stream
from tagged_batches import read_tagged_batches

from drp_foundry.data.domain_sampling import ShardBlockOrder
from drp_foundry.data.multidomain_dataset import MultiDomainStreamingDataset
from drp_foundry.data.node_shares import NodeShardOrder

DOMAIN_SIZES = {'arxiv': 260, 'book': 200, 'wiki': 140}
NAMES = list(DOMAIN_SIZES)
SEQ = 16
TAG = 100_000  # token value = domain * TAG + position in domain
SHARD_BYTES = 1024  # ~12 samples per shard: 50 shards in all
BUCKET = 'drp-test'


@pytest.fixture(scope='module')
def local_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('mds')
    for d, (name, n) in enumerate(DOMAIN_SIZES.items()):
        with MDSWriter(out=str(root / name / 'train'), columns={'tokens': 'ndarray:int32'},
                       size_limit=SHARD_BYTES) as writer:
            for i in range(n):
                writer.write({'tokens': np.full(SEQ, d * TAG + i, dtype=np.int32)})
    return root


@pytest.fixture(scope='module')
def s3(local_root):
    """One moto server + latency proxy for the module, stopped at its end."""
    with LocalS3(latency_s=0.002, max_seconds=600) as server:
        server.upload_folder(local_root, BUCKET, 'mds')
        with server.environment():
            yield server


def remote_dataset(tmp_path: Path, cache: str, num_workers=0, batch_size=8, proportions=(0.45, 0.33, 0.22),
                   **kwargs) -> MultiDomainStreamingDataset:
    streams = [Stream(remote=f's3://{BUCKET}/mds/{name}', local=str(tmp_path / cache / name), split='train')
               for name in NAMES]
    return MultiDomainStreamingDataset(NAMES, streams, proportions, max_seq_len=SEQ, device_batch_size=batch_size,
                                       num_workers=num_workers, **kwargs)


def run(dataset, num_batches, num_workers=0, first_batch=0, changes=None):
    """(domain_idx, sample tag) per batch; workers are not kept between passes here."""
    return read_tagged_batches(dataset, num_batches, num_workers, changes, first_batch=first_batch,
                               persistent_workers=False)


def shard_fetches(stats: dict, prefix: str) -> dict[str, int]:
    """GETs per shard file (``.../<domain>/train/shard.NNNNN.mds``) under ``prefix``."""
    return {path: n for path, n in stats['get_requests'].items()
            if path.startswith(prefix) and re.search(r'shard\.\d+\.mds$', path)}


def uses_per_shard(order: NodeShardOrder, frontier: int) -> np.ndarray:
    """Per shard: in how many passes its block is at or before the block after ``frontier`` (read or prefetched)."""
    last_pass, last_block = order.next_block(*order.block_of(frontier))
    uses = np.zeros(order.shard_sizes.size, dtype=np.int64)
    for pass_index in range(last_pass + 1):
        blocks = range(order.blocks_in_pass(pass_index) if pass_index < last_pass else last_block + 1)
        for block in blocks:
            uses[order.block_shards_of(pass_index, block)] += 1
    return uses


def test_block_order_is_a_fresh_bijection_per_pass_inside_a_window_of_shards():
    sizes = [12, 12, 9, 12, 12, 12, 3, 12, 11]
    order = ShardBlockOrder(seed=3, domain_index=1, shard_sizes=sizes, block_shards=2)
    n = order.num_samples
    positions = order.positions(np.arange(3 * n))
    passes = positions.reshape(3, n)
    for p in passes:
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(passes[0], passes[1])
    shard_of = np.searchsorted(np.cumsum(sizes), positions, side='right')
    # ordinals inside one block read only that block's shards, and consecutive blocks follow
    for ordinal in range(0, 3 * n, 5):
        block = order.block_of(ordinal)
        assert shard_of[ordinal] in order.block_shards_of(*block)
    blocks = [order.block_of(o) for o in range(3 * n)]
    for a, b in zip(blocks, blocks[1:]):
        assert b == a or b == order.next_block(*a)
    # any window of 12 consecutive ordinals touches at most 2 blocks = 4 shards
    for start in range(0, 3 * n - 12):
        assert len(set(shard_of[start:start + 12])) <= 4


def test_small_cache_limit_finishes_and_fetches_each_shard_once_per_pass(s3, local_root, tmp_path):
    block_shards = 2
    shard_size = max(p.stat().st_size for p in local_root.rglob('shard.*.mds'))
    total = sum(p.stat().st_size for p in local_root.rglob('shard.*.mds'))
    index_bytes = sum(p.stat().st_size for p in local_root.rglob('index.json'))  # counted in the cache
    # room for 24 of the 50 shards; the readers' window is 3 domains * 3 blocks * 2 shards = 18
    cache_limit = index_bytes + 24 * shard_size
    assert cache_limit - index_bytes < 0.5 * total
    s3.reset_stats()
    dataset = remote_dataset(tmp_path, 'cache', num_workers=2, shuffle_block_shards=block_shards,
                             streaming_kwargs={'cache_limit': cache_limit})
    assert dataset.shuffle_algo == 'shard_block'  # auto, with remotes
    num_batches = 75  # one pass: 600 samples
    batches = run(dataset, num_batches, num_workers=2)
    domains, tags = batches[..., 0].ravel(), batches[..., 1].ravel()
    np.testing.assert_array_equal(tags // TAG, domains)
    fetches = shard_fetches(s3.stats(), f'/{BUCKET}/mds/')
    # the furthest any worker got: the batches in flight past the last one consumed
    frontier = dataset.samples_per_domain(num_batches + 2 * 2 + 1)
    for d, name in enumerate(NAMES):
        allowed = uses_per_shard(dataset._block_orders[d], int(frontier[d]))
        mine = {int(re.search(r'shard\.(\d+)\.mds$', path).group(1)): n
                for path, n in fetches.items() if f'/{name}/' in path}
        assert mine and all(n <= allowed[shard] for shard, n in mine.items()), (name, mine, allowed)


def test_full_shuffle_with_the_same_cache_limit_fetches_shards_many_times(s3, local_root, tmp_path):
    """The problem the shard-aware order solves (and proof the fetch count above can fail)."""
    shard_size = max(p.stat().st_size for p in local_root.rglob('shard.*.mds'))
    s3.reset_stats()
    index_bytes = sum(p.stat().st_size for p in local_root.rglob('index.json'))
    dataset = remote_dataset(tmp_path, 'cache_full', shuffle_algo='full',
                             streaming_kwargs={'cache_limit': index_bytes + 24 * shard_size})
    run(dataset, 20)  # 160 samples, a quarter of the data
    fetches = shard_fetches(s3.stats(), f'/{BUCKET}/mds/')
    assert max(fetches.values()) >= 3 and sum(fetches.values()) > 1.5 * len(fetches)


def test_remote_resume_continues_with_the_uninterrupted_samples_and_matches_the_local_copy(
        s3, local_root, tmp_path):
    changes = {3: [0.2, 0.2, 0.6], 9: [0.6, 0.1, 0.3]}
    k, total = 8, 16
    uninterrupted = run(remote_dataset(tmp_path, 'a', update_lag_batches=4, shuffle_block_shards=3), total,
                        changes=changes)

    first = remote_dataset(tmp_path, 'b', num_workers=2, update_lag_batches=4, shuffle_block_shards=3)
    head = run(first, k, num_workers=2, changes={c: q for c, q in changes.items() if c < k})
    state = first.state_dict(num_samples=k * first.global_batch_size, from_beginning=True)
    json.dumps(state)
    assert state['shuffle_algo'] == 'shard_block' and state['shuffle_block_shards'] == 3

    resumed = remote_dataset(tmp_path, 'c', num_workers=2, update_lag_batches=4, shuffle_block_shards=3)
    resumed.load_state_dict(state)
    tail = run(resumed, total - k, num_workers=2, first_batch=k, changes={c: q for c, q in changes.items() if c >= k})
    np.testing.assert_array_equal(np.concatenate([head, tail]), uninterrupted)

    # the order depends on seed and mixture history, not on where the shards live
    local = MultiDomainStreamingDataset(NAMES, [Stream(local=str(local_root / n), split='train') for n in NAMES],
                                        (0.45, 0.33, 0.22), max_seq_len=SEQ, device_batch_size=8,
                                        update_lag_batches=4, shuffle_algo='shard_block', shuffle_block_shards=3)
    np.testing.assert_array_equal(run(local, total, changes=changes), uninterrupted)

    # a checkpoint of the shard-aware order is refused by a run that resolves to the full shuffle
    other = remote_dataset(tmp_path, 'd', update_lag_batches=4, shuffle_algo='full')
    with pytest.raises(ValueError, match='shuffle_algo'):
        other.load_state_dict(state)


def test_yaml_builder_streams_remote_root_with_cache_limit_and_refuses_a_bad_shuffle_algo(
        s3, local_root, tmp_path, tiny_tokenizer):
    from drp_foundry.composer.multidomain_dataloader import build_multidomain_dataloader

    # the builder checks token ids against the tokenizer (512 ids): this data keeps its tags below that
    vocab_tag = 100
    root = tmp_path / 'mds-in-vocab'
    for d, (name, n) in enumerate(DOMAIN_SIZES.items()):
        with MDSWriter(out=str(root / name / 'train'), columns={'tokens': 'ndarray:int32'},
                       size_limit=SHARD_BYTES) as writer:
            for i in range(n):
                writer.write({'tokens': np.full(SEQ, d * vocab_tag + i % vocab_tag, dtype=np.int32)})
    s3.upload_folder(root, BUCKET, 'mds-in-vocab')
    shard_size = max(p.stat().st_size for p in root.rglob('shard.*.mds'))
    index_bytes = sum(p.stat().st_size for p in root.rglob('index.json'))
    dataset_cfg = {'data_root': str(tmp_path / 'cache'), 'remote_root': f's3://{BUCKET}/mds-in-vocab', 'domains': NAMES,
                   'proportions': [0.4, 0.4, 0.2], 'max_seq_len': SEQ, 'shuffle_block_shards': 2,
                   'cache_limit': index_bytes + 24 * shard_size}
    spec = build_multidomain_dataloader(tiny_tokenizer, 4, dataset_cfg, num_workers=0)
    dataset = spec.dataloader.dataset
    assert dataset.has_remote and dataset.shuffle_algo == 'shard_block' and dataset.shuffle_block_shards == 2
    iterator = iter(spec.dataloader)
    for _ in range(3):
        batch = next(iterator)
        np.testing.assert_array_equal(batch['input_ids'][:, 0] // vocab_tag, batch['domain_idx'])
    del iterator
    with pytest.raises(ValueError, match='shuffle_algo'):
        build_multidomain_dataloader(tiny_tokenizer, 4, {**dataset_cfg, 'data_root': str(tmp_path / 'cache2'),
                                                         'shuffle_algo': 'py1e'}, num_workers=0)
