"""Counter-based domain draws and per-domain shuffles: the pure math of the data mixture.

Global sample index ``k``: the n-th sample of rank r in a world of W ranks is
``k = n * W + r``, so global batch b covers ``k`` in ``[b * B * W, (b + 1) * B * W)``
(B = device batch size).

- Domain of sample k (spec §4 step 6, "sample domain i with probability q_i"): a uniform
  ``u_k`` from SplitMix64 of ``(seed, k)`` is mapped through the CDF of the mixture q in
  force at k. The mixture history is a list of segments ``(start_k, q)``. The draw is a
  pure function of ``(seed, k, history)``: no RNG state, no dependence on workers.
- Ordinal of sample k in its domain i: the number of earlier samples (all ranks) drawn from
  domain i, i.e. the scheduler's ``T_i`` before k.
- Sample read for ordinal o of domain i with N_i samples: pass ``o // N_i`` of that domain,
  position ``pi_{seed,i,pass}(o % N_i)`` where ``pi`` is a keyed bijection of ``[0, N_i)``
  (a Feistel network with cycle walking, O(1) memory). A domain that runs out starts a new
  pass with a fresh shuffle.
- Shard-aware alternative (``ShardBlockOrder``, for remote shards): pass p of a domain lists
  its shards in a keyed random order, cuts that list into blocks of ``block_shards``
  consecutive shards, and permutes the samples inside each block (keyed by seed, domain,
  pass, block). Ordinal o reads the ``(o % N_i)``-th entry of that sequence. It is still a
  bijection per pass (every sample once per pass, a new order each pass), but consecutive
  ordinals stay inside one block, so readers need only a bounded window of shards and the
  next block is known in advance (prefetchable). Given up: two samples can only be close
  in the order if their shards share a block; samples of one shard are all read within
  one block's span of ordinals.

Everything here is numpy on uint64 / int64 arrays and vectorised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from drp_foundry.mixtures import domain_mixture

__all__ = [
    'splitmix64',
    'uniform_draws',
    'draw_domains',
    'assign_ordinals',
    'count_domains',
    'feistel_permute',
    'domain_positions',
    'ShardBlockOrder',
    'validate_proportions',
]

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_FEISTEL_ROUNDS = 4
_DEFAULT_CHUNK = 1 << 20
_SHARD_ORDER_SALT = 0x5A4D
_BLOCK_ORDER_SALT = 0xB10C


def splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection of uint64), applied elementwise."""
    z = np.asarray(values, dtype=np.uint64).copy()
    z ^= z >> np.uint64(30)
    z *= _MIX_1
    z ^= z >> np.uint64(27)
    z *= _MIX_2
    z ^= z >> np.uint64(31)
    return z


def _seed_state(*parts: int) -> np.uint64:
    """A uint64 key from a tuple of non-negative ints (seed, domain, ...)."""
    state = np.zeros(1, dtype=np.uint64)
    for part in parts:
        state = splitmix64(state ^ np.uint64(int(part) & 0xFFFFFFFFFFFFFFFF)) + _GOLDEN_GAMMA
    return state[0]


def uniform_draws(seed: int, sample_index: np.ndarray) -> np.ndarray:
    """``u_k`` in [0, 1) for each global sample index k: the k-th output of SplitMix64(seed)."""
    k = np.asarray(sample_index, dtype=np.uint64)
    state = _seed_state(seed) + (k + np.uint64(1)) * _GOLDEN_GAMMA
    return (splitmix64(state) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _segment_cdfs(segment_proportions: np.ndarray) -> np.ndarray:
    cumulative = np.cumsum(segment_proportions, axis=1)
    return cumulative / cumulative[:, -1:]


def draw_domains(seed: int, segment_starts: np.ndarray, segment_proportions: np.ndarray,
                 k_begin: int, k_end: int) -> np.ndarray:
    """Domain index of every global sample k in ``[k_begin, k_end)``.

    Args:
        seed: the shuffle seed.
        segment_starts: ``(S,)`` increasing first k of each mixture segment;
            ``segment_starts[0] <= k_begin``.
        segment_proportions: ``(S, D)`` mixture q of each segment (rows on the simplex).
        k_begin, k_end: the range of global sample indices.
    """
    segment_starts = np.asarray(segment_starts, dtype=np.int64)
    if k_end <= k_begin:
        return np.zeros(0, dtype=np.int64)
    if segment_starts.size == 0 or segment_starts[0] > k_begin:
        raise ValueError(f'no mixture segment covers sample index {k_begin}')
    cdfs = _segment_cdfs(np.asarray(segment_proportions, dtype=np.float64))
    k = np.arange(k_begin, k_end, dtype=np.int64)
    u = uniform_draws(seed, k)
    domains = np.empty(k.size, dtype=np.int64)
    first = np.searchsorted(segment_starts, k_begin, side='right') - 1
    last = np.searchsorted(segment_starts, k_end - 1, side='right') - 1
    for segment in range(first, last + 1):
        lo = max(int(segment_starts[segment]), k_begin) - k_begin
        hi = (int(segment_starts[segment + 1]) - k_begin) if segment < last else k.size
        domains[lo:hi] = np.searchsorted(cdfs[segment], u[lo:hi], side='right')
    # u < 1 and the CDF ends at exactly 1.0, so the index is always < D; clip for safety.
    return np.minimum(domains, cdfs.shape[1] - 1)


def assign_ordinals(domains: np.ndarray, counts_before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-domain ordinal of each draw given the counts before the first one.

    Returns ``(ordinals, counts_after)``: ``ordinals[j] = counts_before[d_j] + #{j' < j: d_j' = d_j}``.
    """
    counts = np.asarray(counts_before, dtype=np.int64).copy()
    ordinals = np.empty(domains.size, dtype=np.int64)
    for domain in range(counts.size):
        hits = np.flatnonzero(domains == domain)
        ordinals[hits] = counts[domain] + np.arange(hits.size, dtype=np.int64)
        counts[domain] += hits.size
    return ordinals, counts


def count_domains(seed: int, segment_starts: np.ndarray, segment_proportions: np.ndarray,
                  k_begin: int, counts_before: np.ndarray, k_end: int,
                  chunk: int = _DEFAULT_CHUNK) -> np.ndarray:
    """Per-domain counts of all draws ``k < k_end`` given the counts of draws ``k < k_begin``."""
    counts = np.asarray(counts_before, dtype=np.int64).copy()
    for lo in range(k_begin, k_end, chunk):
        domains = draw_domains(seed, segment_starts, segment_proportions, lo, min(lo + chunk, k_end))
        counts += np.bincount(domains, minlength=counts.size)
    return counts


def feistel_permute(values: np.ndarray, keys: np.ndarray, size: int) -> np.ndarray:
    """A keyed bijection of ``[0, size)`` applied to ``values`` (one key per value).

    A 4-round balanced Feistel network on the smallest even bit width covering ``size``,
    with cycle walking: outputs ``>= size`` are encrypted again until they fall in range
    (the width is < 4 * size, so a few rounds on average).
    """
    values = np.asarray(values, dtype=np.uint64)
    if size <= 1:
        return np.zeros(values.shape, dtype=np.int64)
    half_bits = max(1, (int(size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    round_offsets = np.arange(1, _FEISTEL_ROUNDS + 1, dtype=np.uint64) * _GOLDEN_GAMMA
    round_keys = [splitmix64(np.asarray(keys, dtype=np.uint64) + offset) for offset in round_offsets]

    def encrypt(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in round_keys:
            left, right = right, left ^ (splitmix64(right ^ key[rows]) & mask)
        return (left << shift) | right

    rows = np.arange(values.size)
    out = encrypt(values.ravel(), rows)
    outside = np.flatnonzero(out >= np.uint64(size))
    while outside.size:
        out[outside] = encrypt(out[outside], rows[outside])
        outside = outside[out[outside] >= np.uint64(size)]
    return out.astype(np.int64).reshape(values.shape)


def domain_positions(seed: int, domain_index: int, ordinals: np.ndarray, domain_size: int) -> np.ndarray:
    """Sample position inside domain ``domain_index`` for each per-domain ordinal.

    Ordinal o reads position ``pi_{seed, domain, o // N}(o % N)``: every pass over the
    domain is a fresh permutation, so every sample is used once per pass.
    """
    ordinals = np.asarray(ordinals, dtype=np.int64)
    passes = ordinals // domain_size
    domain_key = _seed_state(seed, domain_index)
    keys = splitmix64(np.uint64(domain_key) ^ splitmix64(passes.astype(np.uint64)))
    return feistel_permute((ordinals % domain_size).astype(np.uint64), keys, domain_size)


def checked_shard_blocks(seed: int, domain_index: int, shard_sizes: Sequence[int] | np.ndarray,
                         block_shards: int) -> tuple[int, int, np.ndarray, int]:
    """The arguments of a shard-block order (``ShardBlockOrder``, ``node_shares.NodeShardOrder``), checked."""
    sizes = np.asarray(shard_sizes, dtype=np.int64).reshape(-1)
    if sizes.size == 0 or np.any(sizes <= 0):
        raise ValueError(f'shard sizes must be positive, got {sizes.tolist()[:8]}...')
    if int(block_shards) != block_shards or int(block_shards) < 1:
        raise ValueError(f'shuffle_block_shards must be an integer >= 1, got {block_shards}.')
    return int(seed), int(domain_index), sizes, int(block_shards)


class ShardBlockOrder:
    """Shard-aware per-pass order of one domain: shuffled shards, cut into blocks, shuffled inside.

    Args:
        seed: the shuffle seed; domain_index: the domain's index (part of every key).
        shard_sizes: samples in each of the domain's shards, in storage order (the domain's
            positions are ``[0, N)`` numbered shard after shard).
        block_shards: shards per block (>= 1); the last block of a pass may have fewer.

    Pure function of its arguments (the layout cache only avoids recomputing it).
    """

    def __init__(self, seed: int, domain_index: int, shard_sizes: Sequence[int] | np.ndarray,
                 block_shards: int, cached_passes: int = 4):
        self.seed, self.domain_index, self.shard_sizes, self.block_shards = checked_shard_blocks(
            seed, domain_index, shard_sizes, block_shards)
        self.num_samples = int(self.shard_sizes.sum())
        self.shard_starts = np.cumsum(self.shard_sizes) - self.shard_sizes
        self.num_blocks = -(-self.shard_sizes.size // self.block_shards)
        self._cached_passes = int(cached_passes)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _layout(self, pass_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard order, start of each ordered shard in the pass sequence (+ end), start of each block (+ end))."""
        layout = self._layouts.get(pass_index)
        if layout is None:
            num_shards = self.shard_sizes.size
            key = _seed_state(self.seed, self.domain_index, pass_index, _SHARD_ORDER_SALT)
            order = feistel_permute(np.arange(num_shards, dtype=np.uint64),
                                    np.full(num_shards, key, dtype=np.uint64), num_shards)
            order_starts = np.concatenate([[0], np.cumsum(self.shard_sizes[order])]).astype(np.int64)
            block_starts = order_starts[np.append(np.arange(0, num_shards, self.block_shards), num_shards)]
            layout = (order, order_starts, block_starts)
            if len(self._layouts) >= self._cached_passes:
                self._layouts.pop(min(self._layouts))
            self._layouts[pass_index] = layout
        return layout

    def block_of(self, ordinal: int) -> tuple[int, int]:
        """(pass, block) that per-domain ordinal ``ordinal`` reads from."""
        pass_index, offset = divmod(int(ordinal), self.num_samples)
        _, _, block_starts = self._layout(pass_index)
        return pass_index, int(np.searchsorted(block_starts, offset, side='right')) - 1

    def next_block(self, pass_index: int, block: int) -> tuple[int, int]:
        return (pass_index, block + 1) if block + 1 < self.num_blocks else (pass_index + 1, 0)

    def block_shards_of(self, pass_index: int, block: int) -> np.ndarray:
        """The domain's shard indices (storage order) in ``block`` of pass ``pass_index``."""
        order, _, _ = self._layout(pass_index)
        return order[block * self.block_shards:(block + 1) * self.block_shards].copy()

    def positions(self, ordinals: np.ndarray) -> np.ndarray:
        """Sample position in ``[0, N)`` (shard after shard, storage order) for each per-domain ordinal."""
        ordinals = np.asarray(ordinals, dtype=np.int64)
        flat = ordinals.reshape(-1)
        out = np.empty(flat.size, dtype=np.int64)
        passes, offsets = np.divmod(flat, self.num_samples)
        for pass_index in np.unique(passes):
            in_pass = np.flatnonzero(passes == pass_index)
            order, order_starts, block_starts = self._layout(int(pass_index))
            blocks = np.searchsorted(block_starts, offsets[in_pass], side='right') - 1
            for block in np.unique(blocks):
                rows = in_pass[blocks == block]
                begin, end = int(block_starts[block]), int(block_starts[block + 1])
                key = _seed_state(self.seed, self.domain_index, int(pass_index), int(block), _BLOCK_ORDER_SALT)
                within = feistel_permute((offsets[rows] - begin).astype(np.uint64),
                                         np.full(rows.size, key, dtype=np.uint64), end - begin)
                sequence = begin + within
                ordered_shard = np.searchsorted(order_starts, sequence, side='right') - 1
                out[rows] = self.shard_starts[order[ordered_shard]] + (sequence - order_starts[ordered_shard])
        return out.reshape(ordinals.shape)


def validate_proportions(proportions: Sequence[float] | Mapping[str, float] | np.ndarray,
                         domain_names: Sequence[str], key: str = 'proportions', positive: bool = False) -> np.ndarray:
    """Check a mixture and return it as a float64 array in ``domain_names`` order.

    Accepted: a sequence in domain order, or a mapping ``{domain: proportion}`` naming every
    domain exactly once. Refused (ValueError naming ``key``): wrong length, unknown or missing
    domain names, non-finite or negative entries (zeros too with ``positive``), all zeros, a sum
    further than 1e-3 from 1 (we refuse rather than normalise silently, so a typo cannot
    reweight the mixture). A sum within 1e-3 of 1 is renormalised exactly (rounding from the
    scheduler). The checks are ``drp_foundry.mixtures.domain_mixture``.
    """
    return domain_mixture(proportions, domain_names, key, positive=positive)
