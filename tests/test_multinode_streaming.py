"""Simulated nodes over a real S3-compatible server: each node downloads only its share of the shards.

Every node is a forked process with the environment Composer's launcher and mosaicml-streaming
read (WORLD_SIZE, RANK, LOCAL_WORLD_SIZE=1, LOCAL_RANK=0, NODE_RANK, MASTER_ADDR/PORT: streaming
itself joins a gloo group to build the dataset), its own local cache and temporary directory
(``tests/simulated_nodes.py``). The nodes of a job run together; the server counts each node's
GETs and bytes apart (boto3's ``AWS_SDK_UA_APP_ID``, ``LocalS3.client_environment``).
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import signal
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
from conftest import run_forked
from local_s3 import LocalS3
from simulated_nodes import enter_node
from streaming import MDSWriter, Stream
from tagged_batches import read_tagged_batches

from drp_foundry.data.domain_sampling import draw_domains
from drp_foundry.data.multidomain_dataset import MultiDomainStreamingDataset

# 8 samples per shard (size_limit 800 bytes): 16, 8 and 2 shards; 'tiny' has fewer shards than 4 nodes
DOMAIN_SIZES = {'arxiv': 128, 'book': 64, 'tiny': 16}
NAMES = list(DOMAIN_SIZES)
SAMPLES_PER_SHARD = 8
SEQ = 16
TAG = 100_000  # token value = domain * TAG + position in domain
BUCKET = 'drp-nodes'
BATCH = 4  # per node (one rank each)


@pytest.fixture(scope='module')
def local_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('mds')
    for d, (name, n) in enumerate(DOMAIN_SIZES.items()):
        with MDSWriter(out=str(root / name / 'train'), columns={'tokens': 'ndarray:int32'}, size_limit=800) as writer:
            for i in range(n):
                writer.write({'tokens': np.full(SEQ, d * TAG + i, dtype=np.int32)})
        index = json.loads((root / name / 'train' / 'index.json').read_text())
        assert [s['samples'] for s in index['shards']] == [SAMPLES_PER_SHARD] * (n // SAMPLES_PER_SHARD)
    return root


@pytest.fixture(scope='module')
def s3(local_root):
    with LocalS3(latency_s=0.0, max_seconds=900) as server:
        server.upload_folder(local_root, BUCKET, 'mds')
        with server.environment():
            yield server


def node_dataset(cache: Path, proportions, batch_size=BATCH, **kwargs) -> MultiDomainStreamingDataset:
    streams = [Stream(remote=f's3://{BUCKET}/mds/{name}', local=str(cache / name), split='train') for name in NAMES]
    return MultiDomainStreamingDataset(NAMES, streams, proportions, max_seq_len=SEQ, device_batch_size=batch_size,
                                       shuffle_block_shards=2, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def node_main(node: int, num_nodes: int, port: int, client: str, cache: str, out: str, job: dict) -> None:
    """One simulated node: build the dataset from the environment, read batches, save them (and a state)."""
    try:
        stack = open(out + '.stack', 'w')
        faulthandler.dump_traceback_later(150, exit=True, file=stack)  # a hang shows where, then fails
        enter_node(node, num_nodes, port, Path(cache).parent / f'{Path(cache).name}-tmp', client_id=client)
        dataset = node_dataset(Path(cache), job['proportions'], num_workers=job['num_workers'], **job['kwargs'])
        assert (dataset.rank, dataset.world_size, dataset.num_nodes, dataset.node_rank) == (node, num_nodes,
                                                                                           num_nodes, node)
        if job.get('state') is not None:
            dataset.load_state_dict(job['state'])
        batches = read_tagged_batches(dataset, job['num_batches'], job['num_workers'], job['changes'],
                                      first_batch=job['first_batch'], persistent_workers=False)
        np.save(out, batches)
        if job.get('state_at') is not None:
            state = dataset.state_dict(job['state_at'] * dataset.global_batch_size, from_beginning=True)
            Path(out + '.state.json').write_text(json.dumps(state))
        if job.get('kill'):
            os.kill(os.getpid(), signal.SIGKILL)  # the run dies past its last checkpoint
    except BaseException:
        Path(out + '.error').write_text(traceback.format_exc())
        raise


def run_job(tmp: Path, name: str, num_nodes: int, s3=None, caches: str | None = None, **job) -> dict:
    """Run ``num_nodes`` node processes together; per-node batches, states and (with ``s3``) shard fetches."""
    job = {'num_workers': 0, 'changes': {}, 'first_batch': 0, 'kwargs': {}, **job}
    outs = [str(tmp / f'{name}-node{m}.npy') for m in range(num_nodes)]
    cache_dirs = [str(tmp / f'{caches or name}-cache{m}') for m in range(num_nodes)]
    clients = [f'{tmp.name}-{name}-node{m}' for m in range(num_nodes)]  # unique in the module's server
    port = _free_port()
    exit_codes = run_forked(node_main, [(m, num_nodes, port, clients[m], cache_dirs[m], outs[m], job)
                                        for m in range(num_nodes)], timeout=180 * num_nodes)
    for exit_code, out in zip(exit_codes, outs):
        error = Path(out + '.error')
        assert not error.exists(), error.read_text()
        assert exit_code == (-signal.SIGKILL if job.get('kill') else 0), \
            f'exit code {exit_code}: {Path(out + ".stack").read_text()[-3000:]}'
    fetches, sent = [], []
    if s3 is not None:
        by_client = s3.stats()['by_client']
        for client in clients:
            counts = by_client.get(client, {'get_requests': {}, 'get_bytes': {}})
            fetches.append({path: n for path, n in counts['get_requests'].items() if re.search(r'shard\.\d+\.mds$', path)})
            sent.append({path: counts['get_bytes'][path] for path in fetches[-1]})
    batches = [np.load(out) for out in outs]
    states = [json.loads(Path(out + '.state.json').read_text()) for out in outs if Path(out + '.state.json').exists()]
    return {'batches': batches, 'states': states, 'fetches': fetches, 'bytes': sent,
            'global': np.concatenate(batches, axis=1)}  # node m holds positions [m * B, (m + 1) * B)


def one_domain_at_a_time(num_nodes: int) -> tuple[int, dict]:
    """Batches and mixture changes that read each domain exactly once, one domain after the other."""
    global_batch = BATCH * num_nodes
    ends = np.cumsum(list(DOMAIN_SIZES.values())) // global_batch
    changes = {int(ends[0]): [0.0, 1.0, 0.0], int(ends[1]): [0.0, 0.0, 1.0]}
    return int(ends[-1]), changes


@pytest.mark.parametrize('num_nodes', [2, 4])
def test_each_node_fetches_only_its_share_and_the_nodes_read_every_sample_once(s3, local_root, tmp_path, num_nodes):
    """One pass: the mixture reads each domain in turn, so every share ends its pass of each domain exactly.

    The prefetch thread is off here: it reads one block ahead, which at the end of a pass is the
    first block of the next pass, another node's shards in this one (the bench runs with it on).
    """
    num_batches, changes = one_domain_at_a_time(num_nodes)
    job = run_job(tmp_path, 'pass', num_nodes, s3=s3, proportions=[1.0, 0.0, 0.0], num_batches=num_batches,
                  changes=changes, kwargs={'prefetch': False})
    domains, tags = job['global'][..., 0].ravel(), job['global'][..., 1].ravel()
    np.testing.assert_array_equal(tags // TAG, domains)
    for d, (name, n) in enumerate(DOMAIN_SIZES.items()):  # union over nodes = every sample exactly once
        assert sorted((tags[domains == d] % TAG).tolist()) == list(range(n)), name
    all_shards = {f'/{BUCKET}/mds/{p.relative_to(local_root)}' for p in local_root.rglob('shard.*.mds')}
    shard_bytes = {f'/{BUCKET}/mds/{p.relative_to(local_root)}': p.stat().st_size for p in local_root.rglob('shard.*.mds')}
    per_node = [set(f) for f in job['fetches']]
    assert all(n == 1 for f in job["fetches"] for n in f.values()), [{p: n for p, n in f.items() if n > 1} for f in job["fetches"]]  # each node fetches a shard once
    assert set().union(*per_node) == all_shards
    for a in range(num_nodes):
        for b in range(a + 1, num_nodes):
            shared = per_node[a] & per_node[b]
            if num_nodes <= 2:
                assert not shared
            else:  # the only exception: 'tiny' has 2 shards for 4 nodes, each cut in 2 pieces
                assert all('/tiny/' in path for path in shared)
    readers = {path: sum(path in f for f in per_node) for path in all_shards}
    for path, count in readers.items():
        expected = -(-num_nodes // 2) if '/tiny/' in path and num_nodes > 2 else 1
        assert count == expected, (path, count)
    # bytes: each node its share, the total the data once (plus the split tiny shards)
    total = sum(shard_bytes.values())
    node_bytes = [sum(b.values()) for b in job['bytes']]
    tiny = sum(v for k, v in shard_bytes.items() if '/tiny/' in k)
    assert sum(node_bytes) == total + (tiny if num_nodes == 4 else 0)
    assert max(node_bytes) <= (total - tiny) / num_nodes + max(shard_bytes.values())

    if num_nodes == 2:  # the check can fail: with one share (the order before node shares) both fetch all
        single = run_job(tmp_path, 'one-share', num_nodes, s3=s3, proportions=[1.0, 0.0, 0.0],
                         num_batches=num_batches, changes=changes, kwargs={'prefetch': False, 'num_canonical_nodes': 1})
        shared = set(single['fetches'][0]) & set(single['fetches'][1])
        assert len(shared) > 0.8 * len(all_shards)


@pytest.mark.slow
@pytest.mark.parametrize('num_nodes', [2, 4])
def test_same_seed_same_order_mixture_job_wide_and_exact_resume_on_the_same_and_another_node_count(
        s3, tmp_path, num_nodes):
    proportions, changes, lag = [0.6, 0.3, 0.1], {3: [0.2, 0.5, 0.3]}, 4
    total, k = 10, 6
    common = dict(proportions=proportions, kwargs={'update_lag_batches': lag})
    full = run_job(tmp_path, 'full', num_nodes, num_batches=total, changes=changes, **common)
    # the mixture is drawn job-wide exactly as on one node: the domains are the pure schedule
    global_batch = BATCH * num_nodes
    effective = 3 + lag
    expected = draw_domains(17, np.array([0, effective * global_batch]), np.array([proportions, changes[3]]),
                            0, total * global_batch)
    np.testing.assert_array_equal(full['global'][..., 0].ravel(), expected)
    # nodes read disjoint samples within a pass: each node's first N_d / P reads of domain d (its pass 0;
    # the groups are equal here) are distinct from each other and from every other node's
    for d, (name, n) in enumerate(DOMAIN_SIZES.items()):
        first_pass = []
        for batches in full['batches']:
            tags = batches[..., 1].ravel()[batches[..., 0].ravel() == d]
            first_pass += (tags[:n // num_nodes] % TAG).tolist()
        assert first_pass and len(set(first_pass)) == len(first_pass), name

    # killed after batch k + 2, its last state at batch k; resumed on the same nodes (same caches), 2 workers
    head = run_job(tmp_path, 'head', num_nodes, num_batches=k + 2, changes=changes, state_at=k, kill=True, **common)
    np.testing.assert_array_equal(head['global'], full['global'][:k + 2])  # another run, same seed: same order
    states = head['states']
    assert len(states) == num_nodes and all(s == states[0] for s in states)  # every rank holds the same state
    assert states[0]['num_canonical_nodes'] == num_nodes
    assert len(states[0]['share_counts']) == num_nodes
    tail = run_job(tmp_path, 'tail', num_nodes, caches='head', num_batches=total - k, first_batch=k,
                   state=states[0], num_workers=2, **common)
    np.testing.assert_array_equal(np.concatenate([head['global'][:k], tail['global']]), full['global'])

    # on another number of nodes (same global batch) the checkpoint's num_canonical_nodes is kept: the
    # same global batches
    other = 4 if num_nodes == 2 else 2
    moved_kwargs = {'update_lag_batches': lag, 'batch_size': global_batch // other}
    moved = run_job(tmp_path, 'moved', other, num_batches=total - k, first_batch=k, state=states[0],
                    proportions=proportions, kwargs=moved_kwargs)
    np.testing.assert_array_equal(moved['global'], full['global'][k:])

    # setting num_canonical_nodes to another value than the checkpoint's is refused before reading
    refused = node_dataset(tmp_path / 'refused', proportions, rank=0, world_size=other, local_world_size=1,
                           num_canonical_nodes=other, **moved_kwargs)
    with pytest.raises(ValueError, match=f'num_canonical_nodes={num_nodes} node shares but '
                                         f'train_loader.dataset.num_canonical_nodes is {other}'):
        refused.load_state_dict(states[0])


def local_dataset(local_root: Path, rank: int, world_size: int, local_world_size: int, batch_size: int, **kwargs):
    streams = [Stream(local=str(local_root / name), split='train') for name in NAMES]
    return MultiDomainStreamingDataset(NAMES, streams, [0.6, 0.3, 0.1], max_seq_len=SEQ, device_batch_size=batch_size,
                                       shuffle_algo='shard_block', shuffle_block_shards=2, rank=rank,
                                       world_size=world_size, local_world_size=local_world_size, **kwargs)


def test_ranks_and_workers_of_a_node_split_its_share_and_the_order_depends_on_the_global_batch_only(local_root):
    """2 nodes x 2 ranks (batch 2) read the global batches of 2 nodes x 1 rank (batch 4); a node's ranks
    read only its share's shards."""
    num_batches = 12
    per_rank = [read_tagged_batches(local_dataset(local_root, r, 4, 2, 2, num_workers=w), num_batches, w)
                for r, w in [(0, 0), (1, 2), (2, 0), (3, 0)]]
    per_node = [read_tagged_batches(local_dataset(local_root, m, 2, 1, 4), num_batches) for m in range(2)]
    # node m's chunk of a global batch: its local rank l reads every 2nd position from l
    for node in range(2):
        chunk = np.empty((num_batches, 4, 2), dtype=np.int64)
        chunk[:, 0::2], chunk[:, 1::2] = per_rank[2 * node], per_rank[2 * node + 1]
        np.testing.assert_array_equal(chunk, per_node[node])
    # the shards each node's ranks read in the first pass of each domain: disjoint between nodes
    for d, (name, n) in enumerate(DOMAIN_SIZES.items()):
        shards = []
        for node in range(2):
            reads = np.concatenate([per_rank[2 * node + local].reshape(-1, 2) for local in range(2)])
            tags = reads[reads[:, 0] == d, 1]
            shards.append(set(((tags % TAG) // SAMPLES_PER_SHARD).tolist()))
        assert shards[0] and shards[1] and not shards[0] & shards[1], name


def test_a_version_1_state_resumes_as_one_share(local_root):
    """Checkpoints from before node shares hold no share keys: they resume with the one-share order."""
    first = local_dataset(local_root, 0, 1, 1, 8)
    head = read_tagged_batches(first, 5)
    state = first.state_dict(5 * 8, from_beginning=True)
    old = {key: value for key, value in state.items() if key not in ('num_canonical_nodes', 'share_counts')}
    old['version'] = 1
    uninterrupted = read_tagged_batches(local_dataset(local_root, 0, 1, 1, 8), 10)
    resumed = local_dataset(local_root, 0, 1, 1, 8)
    resumed.load_state_dict(old)
    tail = read_tagged_batches(resumed, 5, first_batch=5)
    np.testing.assert_array_equal(np.concatenate([head, tail]), uninterrupted)
    # on 2 nodes (global batch 8) it keeps one share rather than the 2 a fresh start would use
    on_two = local_dataset(local_root, 1, 2, 1, 4)
    assert on_two.num_canonical_nodes == 2
    on_two.load_state_dict(old)
    assert on_two.num_canonical_nodes == 1
    np.testing.assert_array_equal(read_tagged_batches(on_two, 5, first_batch=5), uninterrupted[5:, 4:])
