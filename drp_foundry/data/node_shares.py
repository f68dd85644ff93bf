"""Node shares of the shard-aware order (ours): every node downloads only its share of each domain.

The order of ``drp_multidomain`` (``domain_sampling``) draws the domain of every global sample
``k`` from ``(seed, k, mixture history)``. Without node shares every rank takes the next
ordinal of one domain-wide sequence, so every node reads (and downloads) every block. Here the
order is cut into P *node shares* (``num_canonical_nodes``, default: the number of nodes at
the first start), and each share reads its own part of each domain's shards.

Layout of a global batch of ``G = B * W`` samples (``W = N * R`` ranks, N nodes of R ranks):

- share g holds the positions ``[g * G / P, (g + 1) * G / P)`` of every global batch
  (``G % P == 0``). The share of sample k depends on ``(k mod G, G, P)`` only;
- node m reads the positions ``[m * G / N, (m + 1) * G / N)``, and its local rank l every R-th
  of them from l (with one node: ``k = n * W + r``, the layout without shares). When N divides
  P a node reads exactly P / N whole shares, so nodes read disjoint shares.

Domains are drawn as before (the same ``draw_domains``), so the mixture q holds job-wide
exactly as without shares, and every share also draws i.i.d. from q. What changes is the
sample a draw reads: the ordinal of a draw counts the earlier draws of its domain *in its
share* (``count_share_domains``, ``assign_share_ordinals``; resume state: P x D counts).

``NodeShardOrder`` maps (share, ordinal) of one domain to a sample. Passes come in cycles of P:
in cycle c the domain's shards are dealt, in a keyed random order, into P groups (round robin,
so the groups differ by at most one shard); share g's pass ``p = c * P + j`` reads group
``(g + j) mod P``, ordered like ``domain_sampling.ShardBlockOrder`` (the group's shards in a
keyed order, cut into blocks of ``block_shards`` shards, samples shuffled within a block). So:

- in every pass the P shares read P disjoint groups: no shard is read by two shares, and the
  shares' p-th passes together read every sample exactly once;
- every share reads every sample once per cycle (each group once), so no sample is favoured
  by where it was dealt, and a share's cycle is always N_d samples long;
- a domain with fewer shards S than shares P cannot give each share whole shards: each shard
  is cut into ``P // S`` or ``P // S + 1`` contiguous pieces, one group per piece. Each shard is
  then downloaded by up to ``ceil(P / S)`` nodes per pass, which read disjoint samples of it.
- with P = 1 it is exactly ``ShardBlockOrder`` (same keys), so one-node orders are unchanged.

Everything here is numpy on integers: no streaming, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from drp_foundry.data.domain_sampling import (
    _BLOCK_ORDER_SALT,
    _DEFAULT_CHUNK,
    _SHARD_ORDER_SALT,
    _seed_state,
    assign_ordinals,
    checked_shard_blocks,
    draw_domains,
    feistel_permute,
)

__all__ = [
    'NodeShardOrder',
    'check_share_layout',
    'share_of_positions',
    'rank_batch_positions',
    'node_shares',
    'count_share_domains',
    'assign_share_ordinals',
]

_PARTITION_SALT = 0x9A27


def check_share_layout(global_batch_size: int, num_shares: int, num_nodes: int,
                       key: str = 'num_canonical_nodes') -> None:
    """Refuse a share count that does not cut the global batch into equal parts (names ``key``)."""
    if int(num_shares) < 1:
        raise ValueError(f'{key}: must be >= 1, got {num_shares}.')
    if int(global_batch_size) % int(num_shares):
        raise ValueError(f'{key}={num_shares} node shares must divide the global batch of {global_batch_size} '
                         f'samples (device_batch_size * world_size); set {key} to a divisor of it, such as the '
                         f'number of nodes ({num_nodes}).')


def share_of_positions(global_batch_size: int, num_shares: int) -> np.ndarray:
    """Share of each position ``k mod G`` of a global batch: ``(k mod G) // (G / P)``."""
    return np.arange(int(global_batch_size), dtype=np.int64) // (int(global_batch_size) // int(num_shares))


def rank_batch_positions(rank: int, world_size: int, local_world_size: int, device_batch_size: int) -> np.ndarray:
    """Positions in a global batch that ``rank`` reads, in its order (its device batch).

    Node ``rank // R`` reads the chunk ``[node * R * B, (node + 1) * R * B)``; local rank l reads
    every R-th position of the chunk from l. One node (R = W): positions ``r, r + W, ...``.
    """
    ranks_per_node = int(local_world_size)
    node, local_rank = divmod(int(rank), ranks_per_node)
    begin = node * ranks_per_node * int(device_batch_size)
    return begin + local_rank + ranks_per_node * np.arange(int(device_batch_size), dtype=np.int64)


def node_shares(node: int, num_nodes: int, num_shares: int) -> np.ndarray:
    """The shares whose positions node ``node`` of ``num_nodes`` reads (one or more)."""
    # positions [node * G / N, (node + 1) * G / N) against shares of G / P: in units of G / (N * P)
    first = int(node) * int(num_shares) // int(num_nodes)
    last = -(-(int(node) + 1) * int(num_shares) // int(num_nodes))  # ceil
    return np.arange(first, last, dtype=np.int64)


def count_share_domains(seed: int, segment_starts: np.ndarray, segment_proportions: np.ndarray,
                        k_begin: int, counts_before: np.ndarray, k_end: int, global_batch_size: int,
                        chunk: int = _DEFAULT_CHUNK) -> np.ndarray:
    """Per-share per-domain counts ``(P, D)`` of all draws ``k < k_end`` given those of ``k < k_begin``."""
    counts = np.array(counts_before, dtype=np.int64, copy=True)
    num_shares, num_domains = counts.shape
    share_width = int(global_batch_size) // num_shares
    for lo in range(int(k_begin), int(k_end), chunk):
        hi = min(lo + chunk, int(k_end))
        domains = draw_domains(seed, segment_starts, segment_proportions, lo, hi)
        shares = (np.arange(lo, hi, dtype=np.int64) % int(global_batch_size)) // share_width
        counts += np.bincount(shares * num_domains + domains,
                              minlength=num_shares * num_domains).reshape(num_shares, num_domains)
    return counts


def assign_share_ordinals(domains: np.ndarray, shares: np.ndarray,
                          counts_before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-(share, domain) ordinal of each draw, given the ``(P, D)`` counts before the first one."""
    counts = np.asarray(counts_before, dtype=np.int64)
    num_shares, num_domains = counts.shape
    ordinals, after = assign_ordinals(np.asarray(shares, dtype=np.int64) * num_domains + np.asarray(domains),
                                      counts.reshape(-1))
    return ordinals, after.reshape(num_shares, num_domains)


@dataclass(frozen=True)
class _Partition:
    """The pieces of one cycle (a piece: samples ``[begin, begin + size)`` of shard ``shard``) and P groups."""

    piece_shard: np.ndarray
    piece_begin: np.ndarray
    piece_size: np.ndarray
    groups: tuple[np.ndarray, ...]
    group_sizes: np.ndarray


@dataclass(frozen=True)
class _Layout:
    """One pass of one share: pieces in read order, their starts in the pass (+ end), block starts (+ end)."""

    order: np.ndarray
    order_starts: np.ndarray
    block_starts: np.ndarray


class NodeShardOrder:
    """Shard-aware order of one domain cut into ``num_shares`` node shares (see the module docstring).

    Args:
        seed: the shuffle seed; domain_index: the domain's index (part of every key).
        shard_sizes: samples in each of the domain's shards, in storage order (positions ``[0, N)``
            numbered shard after shard).
        block_shards: shards per block (>= 1).
        num_shares: P, the node shares (1: exactly ``ShardBlockOrder``).

    A pure function of its arguments; the caches only avoid recomputing layouts. Ordinals are
    per share: share g's o-th draw of this domain reads ``positions(o, share=g)``.
    """

    def __init__(self, seed: int, domain_index: int, shard_sizes: Sequence[int] | np.ndarray, block_shards: int,
                 num_shares: int = 1, cached_layouts: int = 64):
        self.seed, self.domain_index, self.shard_sizes, self.block_shards = checked_shard_blocks(
            seed, domain_index, shard_sizes, block_shards)
        if int(num_shares) != num_shares or int(num_shares) < 1:
            raise ValueError(f'num_canonical_nodes must be an integer >= 1, got {num_shares}.')
        self.num_shares = int(num_shares)
        self.num_shards = int(self.shard_sizes.size)
        self.num_samples = int(self.shard_sizes.sum())
        self.shard_starts = np.cumsum(self.shard_sizes) - self.shard_sizes
        self._cached = int(cached_layouts)
        self._partitions: dict[int, _Partition] = {}
        self._layouts: dict[tuple[int, int], _Layout] = {}
        if self.num_shares == 1:
            self._static = _Partition(np.arange(self.num_shards), self.shard_starts.copy(), self.shard_sizes.copy(),
                                      (np.arange(self.num_shards),), np.array([self.num_samples]))

    @property
    def shards_shared(self) -> bool:
        """True when the domain has fewer shards than shares, so some shards are split between shares."""
        return self.num_shards < self.num_shares

    # ------------------------------------------------------------------------------ layout
    def _remember(self, cache: dict, key, value, limit: int):
        if len(cache) >= limit:
            cache.pop(next(iter(cache)))
        cache[key] = value
        return value

    def _partition(self, cycle: int) -> _Partition:
        if self.num_shares == 1:
            return self._static
        partition = self._partitions.get(cycle)
        if partition is not None:
            return partition
        shares, shards = self.num_shares, self.num_shards
        key = _seed_state(self.seed, self.domain_index, cycle, shares, _PARTITION_SALT)
        dealt = feistel_permute(np.arange(shards, dtype=np.uint64), np.full(shards, key, dtype=np.uint64), shards)
        if shards >= shares:  # whole shards, round robin: group x gets dealt[x], dealt[x + P], ...
            groups = tuple(dealt[x::shares] for x in range(shares))
            piece_shard, piece_begin, piece_size = np.arange(shards), self.shard_starts, self.shard_sizes
        else:  # fewer shards than shares: cut each into P // S or P // S + 1 contiguous pieces
            pieces_per = np.full(shards, shares // shards, dtype=np.int64)
            pieces_per[:shares % shards] += 1
            piece_shard = np.repeat(dealt, pieces_per)
            first_piece = np.repeat(np.cumsum(pieces_per) - pieces_per, pieces_per)
            within = np.arange(shares, dtype=np.int64) - first_piece
            cuts = np.repeat(pieces_per, pieces_per)
            size = self.shard_sizes[piece_shard]
            lo, hi = size * within // cuts, size * (within + 1) // cuts
            piece_begin = self.shard_starts[piece_shard] + lo
            piece_size = hi - lo
            groups = tuple(np.array([x]) for x in range(shares))
        group_sizes = np.array([int(piece_size[g].sum()) for g in groups], dtype=np.int64)
        partition = _Partition(np.asarray(piece_shard), np.asarray(piece_begin), np.asarray(piece_size), groups,
                               group_sizes)
        return self._remember(self._partitions, cycle, partition, max(2, self._cached // max(1, shares)))

    def _group(self, share: int, pass_index: int) -> tuple[int, int]:
        """(cycle, group) that share ``share`` reads in its pass ``pass_index``."""
        cycle, step = divmod(int(pass_index), self.num_shares)
        return cycle, (int(share) + step) % self.num_shares

    def _layout(self, share: int, pass_index: int) -> tuple[_Partition, _Layout]:
        cycle, group = self._group(share, pass_index)
        partition = self._partition(cycle)
        layout = self._layouts.get((pass_index, group))
        if layout is None:
            pieces = partition.groups[group]
            count = pieces.size
            extra = () if self.num_shares == 1 else (self.num_shares, group)
            key = _seed_state(self.seed, self.domain_index, pass_index, _SHARD_ORDER_SALT, *extra)
            order = pieces[feistel_permute(np.arange(count, dtype=np.uint64), np.full(count, key, dtype=np.uint64),
                                           count)]
            order_starts = np.concatenate([[0], np.cumsum(partition.piece_size[order])]).astype(np.int64)
            block_starts = order_starts[np.append(np.arange(0, count, self.block_shards), count)]
            layout = self._remember(self._layouts, (pass_index, group), _Layout(order, order_starts, block_starts),
                                    self._cached)
        return partition, layout

    def _cycle_bounds(self, share: int, cycle: int) -> np.ndarray:
        """Start of each of the share's P passes in the cycle (relative to the cycle) + the cycle's end."""
        sizes = self._partition(cycle).group_sizes
        return np.concatenate([[0], np.cumsum(sizes[(int(share) + np.arange(self.num_shares)) % self.num_shares])])

    # ------------------------------------------------------------------------------ queries
    def pass_span(self, pass_index: int, share: int = 0) -> tuple[int, int]:
        """Ordinals ``[first, end)`` of share ``share`` that read its pass ``pass_index``."""
        cycle, step = divmod(int(pass_index), self.num_shares)
        bounds = self._cycle_bounds(share, cycle)
        base = cycle * self.num_samples
        return base + int(bounds[step]), base + int(bounds[step + 1])

    def _locate(self, ordinals: np.ndarray, share: int) -> tuple[np.ndarray, np.ndarray]:
        """(pass, offset in the pass) of each ordinal of share ``share``."""
        cycles, rest = np.divmod(np.asarray(ordinals, dtype=np.int64), self.num_samples)
        if self.num_shares == 1:
            return cycles, rest
        passes = np.empty_like(cycles)
        offsets = np.empty_like(rest)
        for cycle in np.unique(cycles):
            rows = cycles == cycle
            bounds = self._cycle_bounds(share, int(cycle))
            step = np.searchsorted(bounds, rest[rows], side='right') - 1
            passes[rows] = int(cycle) * self.num_shares + step
            offsets[rows] = rest[rows] - bounds[step]
        return passes, offsets

    def block_of(self, ordinal: int, share: int = 0) -> tuple[int, int]:
        """(pass, block) that ordinal ``ordinal`` of share ``share`` reads from."""
        passes, offsets = self._locate(np.array([int(ordinal)]), share)
        _, layout = self._layout(share, int(passes[0]))
        return int(passes[0]), int(np.searchsorted(layout.block_starts, offsets[0], side='right')) - 1

    def blocks_in_pass(self, pass_index: int, share: int = 0) -> int:
        _, layout = self._layout(share, pass_index)
        return int(layout.block_starts.size - 1)

    def next_block(self, pass_index: int, block: int, share: int = 0) -> tuple[int, int]:
        """The block read after ``block`` of pass ``pass_index`` (passes without samples skipped)."""
        if block + 1 < self.blocks_in_pass(pass_index, share):
            return pass_index, block + 1
        following = pass_index + 1
        while self.pass_span(following, share)[0] == self.pass_span(following, share)[1]:
            following += 1
        return following, 0

    def block_shards_of(self, pass_index: int, block: int, share: int = 0) -> np.ndarray:
        """The domain's shard indices (storage order) that ``block`` of the share's pass holds."""
        partition, layout = self._layout(share, pass_index)
        pieces = layout.order[block * self.block_shards:(block + 1) * self.block_shards]
        return np.unique(partition.piece_shard[pieces])

    def pass_shards(self, pass_index: int, share: int = 0) -> np.ndarray:
        """Every shard the share reads in its pass ``pass_index``."""
        partition, layout = self._layout(share, pass_index)
        return np.unique(partition.piece_shard[layout.order])

    def positions(self, ordinals: np.ndarray, share: int = 0) -> np.ndarray:
        """Sample position in ``[0, N)`` (storage order) for each ordinal of share ``share``."""
        ordinals = np.asarray(ordinals, dtype=np.int64)
        flat = ordinals.reshape(-1)
        out = np.empty(flat.size, dtype=np.int64)
        passes, offsets = self._locate(flat, share)
        extra = () if self.num_shares == 1 else (self.num_shares,)
        for pass_index in np.unique(passes):
            in_pass = np.flatnonzero(passes == pass_index)
            partition, layout = self._layout(share, int(pass_index))
            _, group = self._group(share, int(pass_index))
            block_starts, order_starts = layout.block_starts, layout.order_starts
            blocks = np.searchsorted(block_starts, offsets[in_pass], side='right') - 1
            for block in np.unique(blocks):
                rows = in_pass[blocks == block]
                begin, end = int(block_starts[block]), int(block_starts[block + 1])
                key = _seed_state(self.seed, self.domain_index, int(pass_index), int(block), _BLOCK_ORDER_SALT,
                                  *(extra + (group,) if extra else ()))
                within = feistel_permute((offsets[rows] - begin).astype(np.uint64),
                                         np.full(rows.size, key, dtype=np.uint64), end - begin)
                sequence = begin + within
                ordered_piece = np.searchsorted(order_starts, sequence, side='right') - 1
                piece = layout.order[ordered_piece]
                out[rows] = partition.piece_begin[piece] + (sequence - order_starts[ordered_piece])
        return out.reshape(ordinals.shape)
