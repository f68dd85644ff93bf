"""A multi-domain streaming dataset whose mixture can be rewritten during training.

One ``streaming.StreamingDataset`` over all domains (one ``Stream`` per domain, local and
optional remote) is used only for random access by global sample id; the order is ours:

- Domain of global sample k: counter-based draw from ``(shuffle_seed, k)`` and the mixture q
  in force at k (``domain_sampling``). Node m of N reads the positions
  ``[m * G / N, (m + 1) * G / N)`` of each global batch of G samples, its local rank l every
  R-th of them from l (one node: the n-th sample of rank r is ``k = n * W + r``).
  It depends on nothing else: not on the number of workers, not on any RNG state.
- The sample read is the domain's ordinal-th entry of a keyed shuffle of that domain
  (a new shuffle for every pass; a domain that runs out starts its next pass, logged).
  Ordinals count all ranks, so ranks read disjoint samples. Two shuffles
  (``shuffle_algo``): ``full``, a keyed permutation of all the domain's samples, and
  ``shard_block``, shuffled shards cut into blocks of ``shuffle_block_shards`` shards with the
  samples shuffled inside each block (``domain_sampling.ShardBlockOrder``). Ordinals advance
  together on every rank and worker, so with ``shard_block`` all of them read from the same
  few blocks of each domain at a time; a background thread per worker downloads the next
  block's shards ahead of use through ``StreamingDataset.prepare_shard`` (which also evicts
  under ``cache_limit``, least recently used first) and keeps the shards of the blocks in use
  marked recent, so eviction takes shards no reader needs any more. ``auto`` (the default)
  picks ``shard_block`` when a stream has a ``remote`` and ``full`` for local data.
- Node shares (ours, ``shard_block`` only; ``node_shares``): the order is cut into
  ``num_canonical_nodes`` = P shares (default: the number of nodes), share g holding positions
  ``[g * G / P, (g + 1) * G / P)`` of every global batch; ordinals count draws per share and
  domain, and each share reads its own group of each domain's shards in every pass (groups
  disjoint, rotated between shares every pass). So a node downloads only its shares' shards
  and the ranks and workers of a node read from that node's blocks. The domain draws are
  those above, so the mixture q holds job-wide as without shares. The order depends on P and
  the global batch, not on the number of nodes: a resume on another node count is exact.
- ``set_proportions(q, at_batch)`` in the main process appends a segment
  ``(first k, q)`` to a table in shared memory that DataLoader workers (forked or spawned,
  persistent or not) read before producing each batch.

Update lag: a call ``set_proportions(q, at_batch=c)`` made after the training loop has
received batches ``0 .. c-1`` takes effect from global batch ``c + update_lag_batches``.
The default lag is ``num_workers * prefetch_factor`` (0 with ``num_workers == 0``): torch's
``_MultiProcessingDataLoaderIter`` sends ``prefetch_factor * num_workers`` batch requests
up front and one more each time it hands a batch to the loop, so when batch ``c - 1`` has
been handed out the requests sent are batches ``< c + num_workers * prefetch_factor``;
an IterableDataset worker only builds a batch once it holds its request. Batches before
the effective batch never see the change (the segment starts there), batches from it
always do. A larger explicit lag is allowed; the same explicit lag gives the same samples
for every ``num_workers``. Requires the DataLoader's default ``in_order=True``.

Start-up: the StreamingDataset is built under ``shm_lock.node_shm_lock`` (a node-wide lock held by the
local leader while every rank builds), so two jobs starting at once on one machine do not collide in
streaming's shared-memory prefix allocation.

Resumption: ``state_dict(num_samples, from_beginning)`` (called by Composer with the
global samples consumed) holds O(domains x P) numbers: the sample index, per-share per-domain
counts there, P, and the mixture segments from there on (including changes not yet in effect).
``load_state_dict`` restarts exactly there, for any worker count and any number of nodes
(P is taken from the checkpoint unless ``num_canonical_nodes`` is set: a different value is
refused).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from streaming.base.dataset import _ShardState
from torch.utils.data import IterableDataset, get_worker_info

from drp_foundry.data.domain_sampling import (
    domain_positions,
    draw_domains,
    validate_proportions,
)
from drp_foundry.data.multidomain_config import (
    SHUFFLE_ALGOS,
    TOKEN_ENCODING_TYPES,
    check_choice,
    check_domain_names,
    check_int,
    check_update_lag,
    indexed_samples,
)
from drp_foundry.data.node_shares import (
    NodeShardOrder,
    assign_share_ordinals,
    check_share_layout,
    count_share_domains,
    node_shares,
    rank_batch_positions,
    share_of_positions,
)
from drp_foundry.data.shm_lock import node_shm_lock

log = logging.getLogger(__name__)

__all__ = ['MultiDomainStreamingDataset', 'TOKEN_ENCODING_TYPES', 'STATE_VERSION', 'SHUFFLE_ALGOS',
           'release_inherited_clients']

# Blocks of one domain a reader needs at once: the one lagging workers still read, the one the
# frontier is in, and the next (prefetched). Sizes the cache_limit check.
_WINDOW_BLOCKS = 3

STATE_VERSION = 2  # 2: node shares (num_canonical_nodes, share_counts); 1 is read as one share


def _world_from_environment() -> tuple[int, int, int]:
    """(rank, world size, ranks per node); ranks per node from LOCAL_WORLD_SIZE (1 if unset, as streaming)."""
    local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_world_size
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)), local_world_size


def _count_indexed_samples(stream: Stream, domain: str) -> int | None:
    """Samples listed in a local ``index.json``; None when the index will come from the remote."""
    folder = os.path.join(stream.local, stream.split or '')
    count = indexed_samples(folder)
    if count is None and stream.remote is None:
        raise ValueError(
            f'domain {domain!r}: no MDS dataset at {folder} (missing index.json) and no remote '
            f'given. Point its `local` (or `data_root`/`split`) at a folder written by data_prep '
            f'or by LLM-Foundry convert_dataset_hf, or give a `remote`.')
    return count


class _SharedMixtureTable:
    """Mixture segments ``(start_k, q)`` and the resume point, in shared memory.

    The main process writes; workers read. Rows are written before ``count`` / ``version``
    are bumped, so a reader never uses a row that is not complete for the batch it builds.
    """

    def __init__(self, num_domains: int, capacity: int, num_shares: int = 1):
        self.capacity = capacity
        self.num_shares = num_shares
        self.starts = torch.zeros(capacity, dtype=torch.int64).share_memory_()
        self.proportions = torch.zeros(capacity, num_domains, dtype=torch.float64).share_memory_()
        # [count, version]
        self.header = torch.zeros(2, dtype=torch.int64).share_memory_()
        # [resume sample index, per-share per-domain counts at it (P x D)...]
        self.resume = torch.zeros(1 + num_shares * num_domains, dtype=torch.int64).share_memory_()

    def write_segments(self, starts: np.ndarray, proportions: np.ndarray) -> None:
        if len(starts) > self.capacity:
            raise RuntimeError(
                f'more than max_mixture_segments={self.capacity} mixture changes ahead of the '
                f'last resume point; raise `max_mixture_segments` in the dataset config.')
        n = len(starts)
        self.starts[:n] = torch.from_numpy(np.asarray(starts, dtype=np.int64))
        self.proportions[:n] = torch.from_numpy(np.asarray(proportions, dtype=np.float64))
        self.header[0] = n
        self.header[1] += 1

    def read_segments(self) -> tuple[int, np.ndarray, np.ndarray]:
        version = int(self.header[1])
        n = int(self.header[0])
        return version, self.starts[:n].numpy().copy(), self.proportions[:n].numpy().copy()

    def write_resume(self, sample_index: int, counts: np.ndarray) -> None:
        self.resume[0] = sample_index
        self.resume[1:] = torch.from_numpy(np.asarray(counts, dtype=np.int64).reshape(-1))

    def read_resume(self) -> tuple[int, np.ndarray]:
        values = self.resume.numpy().copy()
        return int(values[0]), values[1:].reshape(self.num_shares, -1)


def release_inherited_clients(dataset: StreamingDataset) -> None:
    """Drop the object-store clients a forked DataLoader worker inherited from its parent.

    The parent downloads each stream's ``index.json`` with a client whose keep-alive
    connections a forked worker would otherwise share with its siblings: two processes then
    read one socket and get each other's bytes (truncated shards). The downloader makes a new
    client on its next download.
    """
    for stream in dataset.streams:
        downloader = getattr(stream, '_downloader', None)
        if downloader is not None:
            downloader.clean_up()


class _ShardPrefetcher:
    """One background thread per worker: ``prepare_shard(id, blocking=False)`` for queued shards.

    Non-blocking: a shard another worker or rank of this node is already downloading is skipped
    (mosaicml-streaming's shared shard states coordinate them); a failed download is left to the
    reader, whose ``get_item`` downloads again and raises with streaming's message.
    """

    def __init__(self, dataset: StreamingDataset):
        self._dataset = dataset
        self._queue: deque[int] = deque()
        self._queued: set[int] = set()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name='drp-shard-prefetch', daemon=True)
        self._thread.start()

    def want(self, shard_ids: Sequence[int]) -> None:
        states = self._dataset._shard_states
        fresh = [int(i) for i in shard_ids if int(i) not in self._queued and states[int(i)] != _ShardState.LOCAL]
        if fresh:
            with self._wake:
                self._queue.extend(fresh)
                self._queued.update(fresh)
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
                shard_id = self._queue.popleft()
                self._queued.discard(shard_id)
            try:
                if self._dataset._shard_states[shard_id] != _ShardState.LOCAL:
                    self._dataset.prepare_shard(shard_id, blocking=False)
            except Exception as error:  # the reader downloads it again and reports
                log.debug('prefetch of shard %d failed: %s', shard_id, error)

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=60)


class MultiDomainStreamingDataset(IterableDataset):
    """Infinite multi-domain token stream with a mixture that can change during training.

    Yields ``{'input_ids': LongTensor[max_seq_len], 'domain_idx': int}``.

    Args:
        domain_names: one name per domain, the order of every proportion vector.
        streams: one ``streaming.Stream`` per domain (``local``, optional ``remote``, ``split``),
            holding MDS samples with a ``tokens`` column (``ndarray`` or legacy bytes).
        proportions: initial mixture q0 (sequence in domain order or ``{domain: q}``).
        max_seq_len: tokens kept per sample.
        device_batch_size: the DataLoader's batch size B on this rank.
        shuffle_seed: seed of the domain draws and of every per-domain shuffle.
        num_workers, prefetch_factor: those of the DataLoader (they fix the default lag).
        update_lag_batches: batches between ``set_proportions(q, at_batch=c)`` and the
            first batch drawn with q; None (or ``'auto'``) for ``num_workers * prefetch_factor``.
            An explicit value must be at least that bound.
        token_encoding_type: dtype of legacy ``tokens`` stored as bytes.
        rank, world_size: default from torch.distributed or the RANK / WORLD_SIZE env.
        local_world_size: ranks per node (they share one local cache); default LOCAL_WORLD_SIZE
            (1 if unset, as mosaicml-streaming). Nodes = world_size / local_world_size.
        max_mixture_segments: capacity of the shared table of pending mixture changes.
        streaming_kwargs: passed to ``StreamingDataset`` (``download_retry``, ``cache_limit``, ...).
        shuffle_algo: ``'full'`` (one keyed permutation of each domain per pass), ``'shard_block'``
            (shard-aware, for remote shards) or ``'auto'``: ``shard_block`` if any stream has a
            ``remote``, else ``full``.
        shuffle_block_shards: shards per block for ``shard_block`` (the randomness kept: samples
            are shuffled across that many shards at a time; the cache needs about
            ``3 * shuffle_block_shards`` shards per domain).
        prefetch: download the next block's shards in the background (``shard_block`` with a remote).
        num_canonical_nodes: (ours) the node shares P of the ``shard_block`` order
            (``node_shares``): each node reads only its shares' shards. The order depends on P,
            not on the number of nodes. None: the checkpoint's P on resume, else the number of
            nodes. Must divide the global batch.
    """

    def __init__(self,
                 domain_names: Sequence[str],
                 streams: Sequence[Stream],
                 proportions: Sequence[float] | Mapping[str, float],
                 max_seq_len: int,
                 device_batch_size: int,
                 shuffle_seed: int = 17,
                 num_workers: int = 0,
                 prefetch_factor: int | None = 2,
                 update_lag_batches: int | str | None = None,
                 token_encoding_type: str = 'int64',
                 rank: int | None = None,
                 world_size: int | None = None,
                 max_mixture_segments: int = 4096,
                 streaming_kwargs: Mapping[str, Any] | None = None,
                 shuffle_algo: str = 'auto',
                 shuffle_block_shards: int = 8,
                 prefetch: bool = True,
                 local_world_size: int | None = None,
                 num_canonical_nodes: int | None = None):
        super().__init__()
        self.domain_names = check_domain_names(domain_names, 'domains')
        if len(streams) != len(self.domain_names):
            raise ValueError(f'streams: got {len(streams)} streams for {len(self.domain_names)} domains.')
        initial = validate_proportions(proportions, self.domain_names, key='proportions')
        self.max_seq_len = check_int(max_seq_len, 'max_seq_len', minimum=1)
        self.device_batch_size = check_int(device_batch_size, 'device_batch_size', minimum=1)
        self.token_encoding_type = check_choice(token_encoding_type, 'token_encoding_type', TOKEN_ENCODING_TYPES)
        self.num_workers = check_int(num_workers, 'num_workers', minimum=0)
        self.shuffle_seed = int(shuffle_seed)
        self.prefetch_factor = int(prefetch_factor or 2) if self.num_workers > 0 else 0
        lag = check_update_lag(update_lag_batches, 'update_lag_batches', self.num_workers, prefetch_factor)
        self.update_lag_batches = self.num_workers * self.prefetch_factor if lag == 'auto' else int(lag)

        default_rank, default_world, default_local = _world_from_environment()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f'rank {self.rank} is outside world_size {self.world_size}.')
        self.local_world_size = default_local if local_world_size is None else int(local_world_size)
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(f'local_world_size {self.local_world_size} (LOCAL_WORLD_SIZE, ranks per node) does not '
                             f'divide world_size {self.world_size}; every node must run the same number of ranks.')
        self.num_nodes = self.world_size // self.local_world_size
        self.node_rank = self.rank // self.local_world_size
        self.global_batch_size = self.device_batch_size * self.world_size
        # positions of the global batch this rank reads (one node: rank, rank + W, ...)
        self._rank_positions = rank_batch_positions(self.rank, self.world_size, self.local_world_size,
                                                    self.device_batch_size)
        if num_canonical_nodes is not None:
            num_canonical_nodes = check_int(num_canonical_nodes, 'num_canonical_nodes', minimum=1)
        self._configured_canonical_nodes = num_canonical_nodes

        indexed = [_count_indexed_samples(stream, name) for stream, name in zip(streams, self.domain_names)]
        empty = [name for name, n in zip(self.domain_names, indexed) if n == 0]
        if empty:
            raise ValueError(f'domains {empty} have no samples in their MDS index; remove them from '
                             f'`domains` or rebuild their shards.')
        # streaming allocates its shared-memory prefix in __init__ (here, in the main process: DataLoader
        # workers get this object, forked or pickled, and attach to that prefix): under the node-wide lock
        with node_shm_lock():
            self._streams_dataset = StreamingDataset(streams=list(streams), shuffle=False,
                                                     batch_size=self.device_batch_size,
                                                     **dict(streaming_kwargs or {}))
        self.domain_sizes = self._streams_dataset.samples_per_stream.astype(np.int64).copy()
        self.domain_offsets = self._streams_dataset.sample_offset_per_stream.astype(np.int64).copy()
        self.shard_offsets = self._streams_dataset.shard_offset_per_stream.astype(np.int64).copy()
        self.domain_shards = self._streams_dataset.shards_per_stream.astype(np.int64).copy()
        self.has_remote = any(getattr(stream, 'remote', None) for stream in streams)
        self._max_mixture_segments = int(max_mixture_segments)
        self._setup_shuffle(shuffle_algo, shuffle_block_shards, bool(prefetch))

        # Main-process view of the mixture history (from the resume point on).
        self._segment_starts = np.zeros(1, dtype=np.int64)
        self._segment_proportions = initial[None, :].copy()
        self._origin_index = 0
        self._setup_shares(self.num_canonical_nodes)
        self._table.write_segments(self._segment_starts, self._segment_proportions)

    def _setup_shuffle(self, shuffle_algo: str, block_shards: int, prefetch: bool) -> None:
        shuffle_algo = check_choice(shuffle_algo, 'shuffle_algo', SHUFFLE_ALGOS)
        block_shards = check_int(block_shards, 'shuffle_block_shards', minimum=1)
        if shuffle_algo == 'auto':
            shuffle_algo = 'shard_block' if self.has_remote else 'full'
            log.info('shuffle_algo auto -> %s (%s)', shuffle_algo,
                     'a stream has a remote' if self.has_remote else 'all streams are local')
        self.shuffle_algo = shuffle_algo
        self.shuffle_block_shards = int(block_shards)
        self.prefetch = prefetch and self.has_remote and shuffle_algo == 'shard_block'
        if shuffle_algo == 'full':
            if self._configured_canonical_nodes not in (None, 1):
                log.warning('num_canonical_nodes=%d has no effect with shuffle_algo=full (every node reads from '
                            'every shard); it applies to shard_block.', self._configured_canonical_nodes)
            self.num_canonical_nodes = 1
        else:
            self.num_canonical_nodes = self._configured_canonical_nodes or self.num_nodes
        cache_limit = self._streams_dataset.cache_limit
        if cache_limit and self.has_remote:
            shards = self._streams_dataset.shards
            if shuffle_algo == 'full':
                log.warning('cache_limit=%d with shuffle_algo=full: consecutive samples come from any shard, so '
                            'shards are evicted and downloaded again many times per pass; set '
                            'shuffle_algo: shard_block (or auto) for remote data.', cache_limit)
            else:
                need = sum(stream.get_index_size() for stream in self._streams_dataset.streams)
                shares_read = len(node_shares(self.node_rank, self.num_nodes, self.num_canonical_nodes))
                for begin, count in zip(self.shard_offsets, self.domain_shards):
                    sizes = sorted((shards[i].get_max_size() for i in range(begin, begin + count)), reverse=True)
                    need += sum(sizes[:_WINDOW_BLOCKS * self.shuffle_block_shards * shares_read])
                if cache_limit < need:
                    log.warning('cache_limit=%d bytes is below the index files plus the shards the readers use at '
                                'once (about %d bytes: %d blocks of shuffle_block_shards=%d shards per domain and '
                                'node share read here); some shards will be '
                                'downloaded more than once per pass. Raise cache_limit or lower '
                                'shuffle_block_shards.', cache_limit, need, _WINDOW_BLOCKS,
                                self.shuffle_block_shards)

    def _setup_shares(self, num_canonical_nodes: int) -> None:
        """Node shares P: the per-domain orders, this node's shares, the counts and the shared table."""
        check_share_layout(self.global_batch_size, num_canonical_nodes, self.num_nodes)
        self.num_canonical_nodes = int(num_canonical_nodes)
        self._share_of_position = share_of_positions(self.global_batch_size, self.num_canonical_nodes)
        self._node_shares = node_shares(self.node_rank, self.num_nodes, self.num_canonical_nodes)
        self._block_orders: list[NodeShardOrder] = []
        if self.shuffle_algo == 'shard_block':
            per_shard = self._streams_dataset.samples_per_shard
            self._block_orders = [
                NodeShardOrder(self.shuffle_seed, d, per_shard[begin:begin + count], self.shuffle_block_shards,
                               num_shares=self.num_canonical_nodes)
                for d, (begin, count) in enumerate(zip(self.shard_offsets, self.domain_shards))]
            few = [name for name, count in zip(self.domain_names, self.domain_shards) if count < self.num_canonical_nodes]
            if few:
                log.warning('domains %s have fewer shards than the %d node shares (num_canonical_nodes): each of their '
                            'shards is split between up to ceil(P / shards) shares, so several nodes download it '
                            '(they read disjoint samples of it).', few, self.num_canonical_nodes)
            spread = self.num_nodes % self.num_canonical_nodes if self.num_nodes > self.num_canonical_nodes \
                else self.num_canonical_nodes % self.num_nodes
            if spread:
                log.warning('%d nodes do not divide num_canonical_nodes=%d evenly (nor the reverse): the order is '
                            'unchanged, but nodes read parts of neighbouring shares, so some shards are downloaded '
                            'by two nodes. Run on a number of nodes that divides num_canonical_nodes (or a '
                            'multiple of it).', self.num_nodes, self.num_canonical_nodes)
            elif self.num_nodes > self.num_canonical_nodes:
                log.warning('%d nodes but num_canonical_nodes=%d node shares: %d nodes read parts of each share and '
                            'each of them downloads that share\'s shards (the order is unchanged).', self.num_nodes,
                            self.num_canonical_nodes, self.num_nodes // self.num_canonical_nodes)
        shape = (self.num_canonical_nodes, len(self.domain_names))
        self._origin_counts = np.zeros(shape, dtype=np.int64)
        self._accounted_index = self._origin_index
        self._accounted_counts = self._origin_counts.copy()
        self._table = _SharedMixtureTable(len(self.domain_names), self._max_mixture_segments, self.num_canonical_nodes)
        self._table.write_resume(self._origin_index, self._origin_counts)

    # ------------------------------------------------------------------ scheduler contract
    @property
    def proportions(self) -> np.ndarray:
        """The latest mixture set (in force for new samples once its lag has passed)."""
        return self._segment_proportions[-1].copy()

    def set_proportions(self, proportions: Sequence[float] | Mapping[str, float] | np.ndarray,
                        at_batch: int) -> int:
        """Draw with mixture q from global batch ``at_batch + update_lag_batches`` on.

        Call on every rank with ``at_batch`` = batches consumed so far (Composer's
        ``state.timestamp.batch``). Under torch.distributed the mixture of rank 0 is
        broadcast, so all ranks switch to bit-identical values. Returns the effective batch.
        """
        q = validate_proportions(proportions, self.domain_names, key='set_proportions(p)')
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            payload = [q]
            torch.distributed.broadcast_object_list(payload, src=0)
            q = np.asarray(payload[0], dtype=np.float64)
        effective_batch = int(at_batch) + self.update_lag_batches
        start = effective_batch * self.global_batch_size
        if start < self._segment_starts[-1]:
            raise ValueError(
                f'set_proportions(at_batch={at_batch}) would take effect at sample {start}, before the '
                f'last change (sample {int(self._segment_starts[-1])}); at_batch must not decrease.')
        if start == self._segment_starts[-1]:
            self._segment_proportions[-1] = q
        else:
            self._segment_starts = np.append(self._segment_starts, start)
            self._segment_proportions = np.vstack([self._segment_proportions, q[None, :]])
        self._table.write_segments(self._segment_starts, self._segment_proportions)
        return effective_batch

    def samples_per_domain(self, at_batch: int) -> np.ndarray:
        """Samples drawn from each domain before global batch ``at_batch``, all ranks (T_i)."""
        return self._counts_at(int(at_batch) * self.global_batch_size)

    # ------------------------------------------------------------------ Composer resumption
    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict[str, Any]:
        """O(domains) state at ``num_samples`` global samples consumed (Composer's sample_in_epoch)."""
        sample_index = int(num_samples) if from_beginning else self._origin_index + int(num_samples)
        counts = self._counts_at(sample_index)
        share_counts = self._accounted_counts.copy()
        in_force = int(np.searchsorted(self._segment_starts, sample_index, side='right')) - 1
        starts = self._segment_starts[in_force:].copy()
        starts[0] = sample_index
        return {
            'version': STATE_VERSION,
            'domain_names': list(self.domain_names),
            'domain_sizes': self.domain_sizes.tolist(),
            'shuffle_seed': self.shuffle_seed,
            'sample_index': sample_index,
            'domain_counts': counts.tolist(),
            'segment_starts': starts.tolist(),
            'segment_proportions': self._segment_proportions[in_force:].tolist(),
            'shuffle_algo': self.shuffle_algo,
            'shuffle_block_shards': self.shuffle_block_shards,
            'domain_shards': self.domain_shards.tolist(),
            'num_canonical_nodes': self.num_canonical_nodes,
            'share_counts': share_counts.tolist(),
        }

    def load_state_dict(self, obj: Mapping[str, Any]) -> None:
        """Continue exactly where ``obj`` was taken (before iteration starts)."""
        if obj.get('version') not in (1, STATE_VERSION):
            raise ValueError(f'dataset state: version {obj.get("version")} is not 1 or {STATE_VERSION}; '
                             f'this checkpoint was written by another drp_multidomain version.')
        if list(obj['domain_names']) != self.domain_names:
            raise ValueError(f'dataset state: checkpoint domains {obj["domain_names"]} differ from the '
                             f'configured `domains` {self.domain_names}; use the same domains in the same order.')
        if list(obj['domain_sizes']) != self.domain_sizes.tolist():
            raise ValueError(f'dataset state: checkpoint domain sizes {obj["domain_sizes"]} differ from the '
                             f'data on disk {self.domain_sizes.tolist()}; resume on the same shards.')
        if int(obj['shuffle_seed']) != self.shuffle_seed:
            raise ValueError(f'dataset state: checkpoint shuffle_seed {obj["shuffle_seed"]} differs from '
                             f'the configured `shuffle_seed` {self.shuffle_seed}; set it back to resume exactly.')
        # Checkpoints from before shuffle_algo existed used the full shuffle.
        saved_algo = obj.get('shuffle_algo', 'full')
        if saved_algo != self.shuffle_algo:
            raise ValueError(f'dataset state: the checkpoint read samples with shuffle_algo={saved_algo!r} but this '
                             f'run resolves to {self.shuffle_algo!r} (auto picks shard_block when a stream has '
                             f'a remote); set train_loader.dataset.shuffle_algo: {saved_algo} to resume exactly.')
        if self.shuffle_algo == 'shard_block':
            if int(obj['shuffle_block_shards']) != self.shuffle_block_shards:
                raise ValueError(f'dataset state: checkpoint shuffle_block_shards {obj["shuffle_block_shards"]} '
                                 f'differs from the configured {self.shuffle_block_shards}; set it back to resume.')
            if list(obj['domain_shards']) != self.domain_shards.tolist():
                raise ValueError(f'dataset state: checkpoint shards per domain {obj["domain_shards"]} differ from '
                                 f'the data {self.domain_shards.tolist()}; the shard-aware order needs the same '
                                 f'shards (rewritten shards change it).')
        # version 1 predates node shares: its order is the one-share order
        saved_shares = int(obj.get('num_canonical_nodes', 1))
        if saved_shares != self.num_canonical_nodes:
            if self._configured_canonical_nodes is not None:
                raise ValueError(f'dataset state: the checkpoint\'s order has num_canonical_nodes={saved_shares} node '
                                 f'shares but train_loader.dataset.num_canonical_nodes is '
                                 f'{self._configured_canonical_nodes}; set it to {saved_shares} (or leave it unset: '
                                 f'a resume takes the checkpoint\'s) to resume exactly.')
            log.info('resuming with the checkpoint\'s num_canonical_nodes=%d node shares on %d nodes', saved_shares,
                     self.num_nodes)
            self._setup_shares(saved_shares)
        sample_index = int(obj['sample_index'])
        if sample_index % self.global_batch_size:
            raise ValueError(f'dataset state: {sample_index} samples consumed is not a whole number of global '
                             f'batches of {self.global_batch_size} (device_batch_size * world_size); keep the '
                             f'global batch size when resuming.')
        self._segment_starts = np.asarray(obj['segment_starts'], dtype=np.int64)
        self._segment_proportions = np.asarray(obj['segment_proportions'], dtype=np.float64)
        self._origin_index = sample_index
        self._origin_counts = np.asarray(obj.get('share_counts', [obj['domain_counts']]), dtype=np.int64).reshape(
            self.num_canonical_nodes, len(self.domain_names))
        self._accounted_index = sample_index
        self._accounted_counts = self._origin_counts.copy()
        self._table.write_segments(self._segment_starts, self._segment_proportions)
        self._table.write_resume(self._origin_index, self._origin_counts)

    def _counts_at(self, sample_index: int) -> np.ndarray:
        """Per-domain counts of all draws before ``sample_index`` (all shares); keeps the per-share counts."""
        if sample_index < self._origin_index:
            raise ValueError(f'sample {sample_index} is before the resume point {self._origin_index}; '
                             f'counts before it are not kept.')
        if sample_index < self._accounted_index:
            self._accounted_index, self._accounted_counts = self._origin_index, self._origin_counts.copy()
        counts = count_share_domains(self.shuffle_seed, self._segment_starts, self._segment_proportions,
                                     self._accounted_index, self._accounted_counts, sample_index,
                                     self.global_batch_size)
        self._log_new_passes(self._accounted_counts.sum(axis=0), counts.sum(axis=0))
        self._accounted_index, self._accounted_counts = sample_index, counts
        return counts.sum(axis=0)

    def _log_new_passes(self, counts_before: np.ndarray, counts_after: np.ndarray) -> None:
        passes_before = np.maximum(counts_before - 1, 0) // self.domain_sizes
        passes_after = np.maximum(counts_after - 1, 0) // self.domain_sizes
        for domain in np.flatnonzero(passes_after > passes_before):
            log.info('domain %r used all %d samples; now in reshuffled pass %d',
                     self.domain_names[domain], int(self.domain_sizes[domain]), int(passes_after[domain]) + 1)

    # ------------------------------------------------------------------ iteration
    def _decode_tokens(self, sample: Mapping[str, Any]) -> torch.Tensor:
        if 'tokens' not in sample:
            raise RuntimeError(f'MDS samples need a `tokens` column; got columns {sorted(sample)}.')
        tokens = sample['tokens']
        if not isinstance(tokens, np.ndarray):
            tokens = np.frombuffer(tokens, dtype=getattr(np, self.token_encoding_type))
        return torch.from_numpy(tokens[:self.max_seq_len].astype(np.int64))

    # set by the loader builder, None = not checked: the vocabulary bound of the token ids (len(tokenizer)),
    # and the length of every sample (a data_prep build's max_seq_len)
    vocab_size: int | None = None
    sample_length: int | None = None

    def _shard_file(self, sample_id: int) -> str:
        try:
            shard_id, _ = self._streams_dataset.spanner[sample_id]
            stream = self._streams_dataset.streams[self._streams_dataset.stream_per_shard[shard_id]]
            shard = self._streams_dataset.shards[shard_id]
            return os.path.join(stream.local, stream.split or '', shard.raw_data.basename)
        except Exception:  # the description only; never the reason of a failure
            return '?'

    def _checked_sample(self, domain: int, sample_id: int) -> torch.Tensor:
        """One sample's tokens; a shard that cannot give it, a wrong length or an id beyond the vocabulary
        raises naming the domain and the shard file (issue 28)."""
        name = self.domain_names[domain]
        try:
            tokens = self._decode_tokens(self._streams_dataset.get_item(sample_id))
        except (IndexError, ValueError, KeyError, OSError, RuntimeError) as err:
            raise RuntimeError(f'domain {name!r}: sample {sample_id - int(self.domain_offsets[domain])} cannot be '
                               f'read from {self._shard_file(sample_id)} ({err}); the shard is missing, short or '
                               'damaged: rebuild the data root with data_prep') from err
        if self.sample_length is not None and tokens.numel() != min(self.sample_length, self.max_seq_len):
            raise RuntimeError(f'domain {name!r}: a sample of {tokens.numel()} tokens in '
                               f'{self._shard_file(sample_id)}, but the data root was built with max_seq_len '
                               f'{self.sample_length} (manifest.json); the shards '
                               'were built with another sequence length: rebuild them or set max_seq_len')
        if self.vocab_size is not None and tokens.numel() and (int(tokens.max()) >= self.vocab_size
                                                              or int(tokens.min()) < 0):
            raise RuntimeError(f'domain {name!r}: token id {int(tokens.max())} in {self._shard_file(sample_id)} is '
                               f'beyond the tokenizer\'s {self.vocab_size} ids; the shards were tokenised with '
                               'another tokenizer: rebuild them with this one')
        return tokens

    def _positions(self, domain: int, ordinals: np.ndarray, share: int) -> np.ndarray:
        if self.shuffle_algo == 'shard_block':
            return self._block_orders[domain].positions(ordinals, share=share)
        return domain_positions(self.shuffle_seed, domain, ordinals, int(self.domain_sizes[domain]))

    def _window(self, prefetcher: _ShardPrefetcher, counts_before: np.ndarray, counts_after: np.ndarray,
                active: np.ndarray) -> None:
        """Per node share read here: queue the shards of the frontier's block and the next one; mark the
        window's shards recent. Counts are per share ``(P, D)``."""
        access_times = self._streams_dataset._shard_access_times
        states = self._streams_dataset._shard_states
        now = time.time_ns()
        for share in self._node_shares.tolist():
            for domain in np.flatnonzero(active | (counts_after[share] > counts_before[share])):
                order = self._block_orders[domain]
                first = order.block_of(int(counts_before[share, domain]), share=share)
                current = order.block_of(int(counts_after[share, domain]), share=share)
                upcoming = order.next_block(*current, share=share)
                offset = int(self.shard_offsets[domain])
                prefetcher.want(offset + np.concatenate([order.block_shards_of(*current, share=share),
                                                         order.block_shards_of(*upcoming, share=share)]))
                for block in {first, current, upcoming}:
                    for shard_id in offset + order.block_shards_of(*block, share=share):
                        if states[shard_id] == _ShardState.LOCAL:
                            access_times[shard_id] = now

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            release_inherited_clients(self._streams_dataset)
        prefetcher = _ShardPrefetcher(self._streams_dataset) if self.prefetch else None
        try:
            yield from self._iterate(prefetcher)
        finally:
            if prefetcher is not None:
                prefetcher.close()

    def _iterate(self, prefetcher: _ShardPrefetcher | None) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(
                f'the dataset was built for num_workers={self.num_workers} (its update lag depends on it) '
                f'but the DataLoader runs {info.num_workers} workers; pass the same num_workers to both.')
        cursor_index, counts = self._table.read_resume()
        first_batch = cursor_index // self.global_batch_size
        table_version, starts, proportions = -1, None, None
        local_batch = worker_id
        mine = self._rank_positions
        my_shares = self._share_of_position[mine]
        while True:
            version = int(self._table.header[1])
            if version != table_version:
                table_version, starts, proportions = self._table.read_segments()
            batch_begin = (first_batch + local_batch) * self.global_batch_size
            counts = count_share_domains(self.shuffle_seed, starts, proportions, cursor_index, counts, batch_begin,
                                         self.global_batch_size)
            domains = draw_domains(self.shuffle_seed, starts, proportions,
                                   batch_begin, batch_begin + self.global_batch_size)
            counts_before = counts
            ordinals, counts = assign_share_ordinals(domains, self._share_of_position, counts)
            cursor_index = batch_begin + self.global_batch_size
            if prefetcher is not None:
                segment = int(np.searchsorted(starts, cursor_index - 1, side='right')) - 1
                self._window(prefetcher, counts_before, counts, proportions[segment] > 0)
            my_domains, my_ordinals = domains[mine], ordinals[mine]
            sample_ids = np.empty(my_domains.size, dtype=np.int64)
            for domain, share in {(int(d), int(g)) for d, g in zip(my_domains, my_shares)}:
                hits = (my_domains == domain) & (my_shares == share)
                size = int(self.domain_sizes[domain])
                positions = self._positions(domain, my_ordinals[hits], share)
                sample_ids[hits] = self.domain_offsets[domain] + positions
                new_pass = my_ordinals[hits][(my_ordinals[hits] % size == 0) & (my_ordinals[hits] > 0)]
                for ordinal in new_pass:
                    log.info('domain %r: node share %d has read as many samples as the domain holds (%d); rank %d '
                             'starts its reshuffled round %d', self.domain_names[domain], share, size, self.rank,
                             int(ordinal // size) + 1)
            for domain, sample_id in zip(my_domains.tolist(), sample_ids.tolist()):
                yield {'input_ids': self._checked_sample(domain, sample_id), 'domain_idx': domain}
            local_batch += num_workers
