"""Node shares of the shard-aware order, on plain integers: partition, passes, layout, counts."""

from __future__ import annotations

import numpy as np
import pytest

from drp_foundry.data.domain_sampling import ShardBlockOrder, count_domains, draw_domains
from drp_foundry.data.node_shares import (
    NodeShardOrder,
    assign_share_ordinals,
    check_share_layout,
    count_share_domains,
    node_shares,
    rank_batch_positions,
    share_of_positions,
)

SIZES = [12, 12, 9, 12, 12, 12, 3, 12, 11, 7, 12]


def shard_of(sizes, positions):
    return np.searchsorted(np.cumsum(sizes), positions, side='right')


def test_one_share_is_exactly_the_shard_block_order():
    old = ShardBlockOrder(seed=5, domain_index=2, shard_sizes=SIZES, block_shards=3)
    new = NodeShardOrder(seed=5, domain_index=2, shard_sizes=SIZES, block_shards=3, num_shares=1)
    ordinals = np.arange(4 * old.num_samples)
    np.testing.assert_array_equal(new.positions(ordinals), old.positions(ordinals))
    for ordinal in range(0, 4 * old.num_samples, 7):
        block = old.block_of(ordinal)
        assert new.block_of(ordinal) == block
        assert new.next_block(*block) == old.next_block(*block)
        assert set(new.block_shards_of(*block).tolist()) == set(old.block_shards_of(*block).tolist())


@pytest.mark.parametrize('num_shares', [2, 3, 4])
def test_shares_read_disjoint_shards_and_every_sample_once_per_pass(num_shares):
    order = NodeShardOrder(seed=9, domain_index=0, shard_sizes=SIZES, block_shards=2, num_shares=num_shares)
    n = order.num_samples
    for pass_index in range(2 * num_shares + 1):  # over two cycles and into a third
        samples, shard_sets = [], []
        for share in range(num_shares):
            first, end = order.pass_span(pass_index, share)
            positions = order.positions(np.arange(first, end), share)
            samples.append(positions)
            shard_sets.append(set(shard_of(SIZES, positions).tolist()))
            assert shard_sets[-1] == set(order.pass_shards(pass_index, share).tolist())
        # the shares' pass p together: every sample of the domain exactly once
        assert sorted(np.concatenate(samples).tolist()) == list(range(n))
        # and no shard read by two shares
        for a in range(num_shares):
            for b in range(a + 1, num_shares):
                assert not shard_sets[a] & shard_sets[b], (pass_index, a, b)
        # groups are dealt round robin: they differ by at most one shard
        counts = [len(s) for s in shard_sets]
        assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize('num_shares', [2, 4])
def test_each_share_reads_every_sample_once_per_cycle_and_a_new_order_each_pass(num_shares):
    order = NodeShardOrder(seed=1, domain_index=3, shard_sizes=SIZES, block_shards=2, num_shares=num_shares)
    n = order.num_samples
    for share in range(num_shares):
        positions = order.positions(np.arange(3 * n), share)
        cycles = positions.reshape(3, n)
        for cycle in cycles:
            assert sorted(cycle.tolist()) == list(range(n))
        assert not np.array_equal(cycles[0], cycles[1])
        # pass spans tile the ordinals without gaps
        ends = [order.pass_span(p, share) for p in range(3 * num_shares)]
        assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[-1][1] == 3 * n
    # the share assignment itself changes from cycle to cycle
    first = [set(order.pass_shards(0, s).tolist()) for s in range(num_shares)]
    later = [set(order.pass_shards(num_shares, s).tolist()) for s in range(num_shares)]
    assert first != later


def test_blocks_bound_the_window_and_follow_each_other():
    order = NodeShardOrder(seed=3, domain_index=1, shard_sizes=SIZES, block_shards=2, num_shares=3)
    for share in range(3):
        ordinals = np.arange(3 * order.num_samples)
        positions = order.positions(ordinals, share)
        blocks = [order.block_of(o, share) for o in ordinals]
        for o in range(0, ordinals.size, 5):
            assert shard_of(SIZES, positions[o]) in order.block_shards_of(*blocks[o], share=share)
        for a, b in zip(blocks, blocks[1:]):
            assert b == a or b == order.next_block(*a, share=share)


@pytest.mark.parametrize('shards,num_shares', [(3, 4), (2, 4), (1, 2), (3, 8)])
def test_fewer_shards_than_shares_split_shards_between_at_most_ceil_p_over_s_shares(shards, num_shares):
    sizes = [10, 7, 12][:shards]
    order = NodeShardOrder(seed=4, domain_index=0, shard_sizes=sizes, block_shards=2, num_shares=num_shares)
    assert order.shards_shared
    n = order.num_samples
    for pass_index in range(2 * num_shares):
        readers = np.zeros(shards, dtype=np.int64)
        samples = []
        for share in range(num_shares):
            first, end = order.pass_span(pass_index, share)
            positions = order.positions(np.arange(first, end), share)
            samples.append(positions)
            readers[np.unique(shard_of(sizes, positions))] += 1
        assert sorted(np.concatenate(samples).tolist()) == list(range(n))  # still every sample once
        assert readers.max() <= -(-num_shares // shards)
    for share in range(num_shares):  # and every share still reads every sample once per cycle
        assert sorted(order.positions(np.arange(n), share).tolist()) == list(range(n))


def test_fewer_samples_than_shares_leaves_empty_passes_that_are_skipped():
    order = NodeShardOrder(seed=0, domain_index=0, shard_sizes=[2], block_shards=1, num_shares=4)
    for share in range(4):
        assert sorted(order.positions(np.arange(2), share).tolist()) == [0, 1]
        spans = [order.pass_span(p, share) for p in range(4)]
        assert sum(end - first for first, end in spans) == 2
        pass_index, block = order.block_of(0, share)
        following = order.next_block(pass_index, block, share)
        assert order.pass_span(following[0], share)[1] > order.pass_span(following[0], share)[0]


def test_the_order_is_a_pure_function_of_its_arguments():
    def make(seed):
        return NodeShardOrder(seed=seed, domain_index=1, shard_sizes=SIZES, block_shards=2, num_shares=2)

    a, b = make(7), make(7)
    ordinals = np.arange(500)
    b.positions(ordinals[::-1], 1)  # a different history of queries fills the caches differently
    np.testing.assert_array_equal(a.positions(ordinals, 1), b.positions(ordinals, 1))
    assert not np.array_equal(a.positions(ordinals, 1), make(8).positions(ordinals, 1))


def test_batch_layout_nodes_read_contiguous_chunks_and_ranks_interleave_inside():
    # 2 nodes x 2 ranks, device batch 3: global batch 12
    layout = [rank_batch_positions(r, world_size=4, local_world_size=2, device_batch_size=3) for r in range(4)]
    assert [p.tolist() for p in layout] == [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]]
    # one node: the interleaved layout k = n * W + r
    np.testing.assert_array_equal(rank_batch_positions(1, 4, 4, 3), [1, 5, 9])
    assert share_of_positions(12, 2).tolist() == [0] * 6 + [1] * 6
    assert node_shares(1, 2, 4).tolist() == [2, 3]  # N divides P: whole shares
    assert node_shares(1, 4, 2).tolist() == [0]  # P divides N: two nodes per share
    assert node_shares(1, 3, 2).tolist() == [0, 1]  # neither: the node straddles two shares
    check_share_layout(12, 4, 2)
    with pytest.raises(ValueError, match='num_canonical_nodes=5 node shares must divide the global batch of 12'):
        check_share_layout(12, 5, 2)


def test_share_counts_sum_to_the_domain_counts_and_ordinals_count_within_a_share():
    starts, proportions = np.array([0, 40]), np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    global_batch, shares = 8, 2
    counts = count_share_domains(11, starts, proportions, 0, np.zeros((shares, 3), dtype=np.int64), 96, global_batch,
                                 chunk=20)
    np.testing.assert_array_equal(counts.sum(axis=0), count_domains(11, starts, proportions, 0, np.zeros(3), 96))
    half = count_share_domains(11, starts, proportions, 0, np.zeros((shares, 3), dtype=np.int64), 48, global_batch)
    np.testing.assert_array_equal(
        count_share_domains(11, starts, proportions, 48, half, 96, global_batch), counts)
    domains = draw_domains(11, starts, proportions, 48, 56)
    share = share_of_positions(global_batch, shares)
    ordinals, after = assign_share_ordinals(domains, share, half)
    for j in range(8):
        earlier = np.sum((domains[:j] == domains[j]) & (share[:j] == share[j]))
        assert ordinals[j] == half[share[j], domains[j]] + earlier
    np.testing.assert_array_equal(after, count_share_domains(11, starts, proportions, 0, np.zeros((2, 3)), 56, 8))


def test_config_key_num_canonical_nodes_is_checked_with_the_section():
    from drp_foundry.data.multidomain_config import validate_multidomain_config

    section = {'data_root': '/data', 'remote_root': 's3://bucket/mds', 'domains': ['a', 'b'], 'proportions': [0.5, 0.5],
               'max_seq_len': 16}
    assert validate_multidomain_config(section, check_folders=False).num_canonical_nodes is None
    assert validate_multidomain_config({**section, 'num_canonical_nodes': 4},
                                       check_folders=False).num_canonical_nodes == 4
    with pytest.raises(ValueError, match=r'train_loader.dataset.num_canonical_nodes: must be >= 1'):
        validate_multidomain_config({**section, 'num_canonical_nodes': 0}, check_folders=False)
