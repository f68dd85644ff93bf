"""Samples/s of drp_multidomain vs a plain ``streaming.StreamingDataset`` on the same shards.

Both read the same per-domain MDS shards (``tokens: ndarray:int32``) with the same DataLoader
settings (workers, prefetch, batch size) and yield int64 token tensors; the plain dataset
mixes domains with fixed ``Stream(proportion=...)`` weights and its own shuffle, ours draws
domains with the counter-based mixture.

Local mode (default): page-cached local shards; the two are timed in alternating rounds in
one run (warm-up batches excluded, median of rounds). Last line: the ratio ours / plain.

    python bench/data_throughput.py --workers 2 --batch-size 16 --batches 300

Remote mode (``--remote``): the shards are uploaded to a real S3-compatible server on
127.0.0.1 (moto's server, ``pip install -e .[dev]``) behind a proxy that adds ``--latency-ms``
to every request; both datasets stream ``s3://`` into a fresh local cache per run, without
and with ``cache_limit``. Ours uses the shard-aware order (``shuffle_algo: shard_block``,
``--block-shards`` shards per block, next block prefetched); the plain dataset uses
streaming's ``py1br`` shuffle with the same block (``shuffle_block_size`` = block_shards x
samples per shard), so both keep the same randomness. Domain sizes follow the proportions, so
a run of most of an epoch reads each shard about once. Reported per run: samples/s after the
warm-up batches and the download amplification = bytes the server sent (shards and indexes)
/ bytes of the samples served. Last line: ratio ours / plain with cache_limit (goal >= 0.95).

    python bench/data_throughput.py --remote --workers 2 --batch-size 16 --latency-ms 50

Nodes (``--remote --nodes 1 2 4``): for each node count N, N simulated nodes (one process
each, one rank, their own cache and temporary directory: ``tests/simulated_nodes.py``)
stream together from the server, first a plain ``StreamingDataset`` (``py1br``, same block),
then ours (``shard_block`` with node shares, prefetch on), then ours with
``num_canonical_nodes: 1`` (one share: the order before node shares), each node reading
``--epoch-fraction`` of its part of one epoch. The server counts every node's GETs and bytes
apart (``LocalS3.client_environment``). Reported per N: bytes per node (mean and max) and in
total, and the download amplification = bytes sent / bytes of the samples the node's ranks
were served (per node: worst node; total: all nodes). Last line: the worst ratio of total
amplification ours / plain over the node counts (goal <= 1.05).

    python bench/data_throughput.py --remote --nodes 1 2 4 --latency-ms 5 --seq-len 256 --shard-bytes 65536

Each mode rewrites its part of the ``data_throughput`` section of docs/RESULTS.md; ``--nodes``
writes its own section, ``data_nodes``, at the end of the file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from streaming import MDSWriter, Stream, StreamingDataset
from torch.utils.data import DataLoader

from drp_foundry.data.multidomain_dataset import MultiDomainStreamingDataset, release_inherited_clients

PROPORTIONS = [0.5, 0.3, 0.2]
TESTS = Path(__file__).resolve().parents[1] / 'tests'


def test_support(name: str):
    """The local S3 server and the simulated-node environment live with the tests (tests/<name>.py, not
    shipped in the package): loaded from their files, as the tests load this bench."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


RESULTS = Path(__file__).resolve().parents[1] / 'docs' / 'RESULTS.md'
SECTION = 'data_throughput'
BUCKET = 'drp-bench'


def write_shards(root: Path, samples_per_domain: list[int], seq_len: int, shard_bytes: int = 1 << 22) -> list[str]:
    rng = np.random.default_rng(0)
    names = [f'domain{i}' for i in range(len(PROPORTIONS))]
    for name, count in zip(names, samples_per_domain):
        with MDSWriter(out=str(root / name / 'train'), columns={'tokens': 'ndarray:int32'},
                       size_limit=shard_bytes) as writer:
            for _ in range(count):
                writer.write({'tokens': rng.integers(0, 32000, size=seq_len).astype(np.int32)})
    return names


def collate_plain(samples: list[dict]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(s['tokens'].astype(np.int64)) for s in samples])


def collate_ours(samples: list[dict]) -> torch.Tensor:
    return torch.stack([s['input_ids'] for s in samples])


def samples_per_second(loader: DataLoader, warmup: int, batches: int) -> float:
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    del iterator
    return batches * batch.shape[0] / elapsed


def write_results(mode: str, lines: list[str], section: str = SECTION,
                  title: str = '## Data loader throughput (`bench/data_throughput.py`)\n') -> None:
    """Rewrite this mode's block inside ``section`` of docs/RESULTS.md (a new section goes at the end)."""
    begin, end = f'<!-- BEGIN {section} -->', f'<!-- END {section} -->'
    text = RESULTS.read_text() if RESULTS.exists() else '# Measured results\n'
    if begin not in text:
        text = text.rstrip('\n') + f'\n\n{begin}\n{title}{end}\n'
    head, rest = text.split(begin, 1)
    body, tail = rest.split(end, 1)
    blocks = dict(re.findall(r'<!-- mode: (\w+) -->\n(.*?)<!-- /mode -->\n', body, flags=re.S))
    blocks[mode] = '\n'.join(lines) + '\n'
    new_body = '\n' + title + ''.join(f'<!-- mode: {m} -->\n{blocks[m]}<!-- /mode -->\n'
                                      for m in sorted(blocks))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(head + begin + new_body + end + tail)


def command_line() -> str:
    return ' '.join(['python bench/data_throughput.py', *sys.argv[1:]])


# ------------------------------------------------------------------------------------------- local
def run_local(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_shards(root, [args.samples_per_domain] * len(PROPORTIONS), args.seq_len)
        loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.workers, drop_last=True,
                             prefetch_factor=args.prefetch_factor if args.workers else None,
                             persistent_workers=False)
        plain = StreamingDataset(
            streams=[Stream(local=str(root / n), split='train', proportion=p) for n, p in zip(names, PROPORTIONS)],
            shuffle=True, batch_size=args.batch_size, shuffle_seed=17)
        ours = MultiDomainStreamingDataset(
            names, [Stream(local=str(root / n), split='train') for n in names], PROPORTIONS,
            max_seq_len=args.seq_len, device_batch_size=args.batch_size, num_workers=args.workers,
            prefetch_factor=args.prefetch_factor)
        rates: dict[str, list[float]] = {'plain': [], 'ours': []}
        for round_index in range(args.rounds):
            order = ['plain', 'ours'] if round_index % 2 == 0 else ['ours', 'plain']
            for name in order:
                dataset, collate = (plain, collate_plain) if name == 'plain' else (ours, collate_ours)
                loader = DataLoader(dataset, collate_fn=collate, **loader_kwargs)
                rates[name].append(samples_per_second(loader, args.warmup, args.batches))
            print(f'round {round_index}: plain {rates["plain"][-1]:.0f} samples/s, '
                  f'ours {rates["ours"][-1]:.0f} samples/s', flush=True)
        plain_rate, ours_rate = statistics.median(rates['plain']), statistics.median(rates['ours'])
        summary = (f'workers={args.workers} batch={args.batch_size} seq_len={args.seq_len}: '
                   f'plain StreamingDataset {plain_rate:.0f} samples/s, drp_multidomain {ours_rate:.0f} samples/s')
        ratio = f'throughput ratio drp_multidomain / StreamingDataset: {ours_rate / plain_rate:.3f}'
        print(summary)
        write_results('local', ['### Local shards (page cache)', '', f'`{command_line()}` '
                                f'(median of {args.rounds} alternating rounds; shared, loaded 2-core machine)',
                                '', f'- {summary}', f'- {ratio}'])
        print(ratio)


# ------------------------------------------------------------------------------------------ remote
def _worker_init(_worker_id: int) -> None:
    # the plain dataset's forked workers get fresh S3 clients too (see release_inherited_clients)
    info = torch.utils.data.get_worker_info()
    release_inherited_clients(info.dataset)


def remote_run(system: str, s3, names: list[str], args, cache_limit: int | None, work: Path,
               samples_per_shard: int, batches: int) -> dict[str, float]:
    cache = Path(tempfile.mkdtemp(prefix=f'{system}-', dir=work))
    remote = f's3://{BUCKET}/mds'
    s3.reset_stats()
    if system == 'plain':
        dataset = StreamingDataset(
            streams=[Stream(remote=f'{remote}/{n}', local=str(cache / n), split='train', proportion=p)
                     for n, p in zip(names, PROPORTIONS)],
            shuffle=True, shuffle_algo='py1br', shuffle_block_size=args.block_shards * samples_per_shard,
            batch_size=args.batch_size, shuffle_seed=17, cache_limit=cache_limit)
        collate, init = collate_plain, _worker_init
    else:
        dataset = MultiDomainStreamingDataset(
            names, [Stream(remote=f'{remote}/{n}', local=str(cache / n), split='train') for n in names],
            PROPORTIONS, max_seq_len=args.seq_len, device_batch_size=args.batch_size, num_workers=args.workers,
            prefetch_factor=args.prefetch_factor, shuffle_algo=system, shuffle_block_shards=args.block_shards,
            streaming_kwargs={'cache_limit': cache_limit} if cache_limit else None)
        collate, init = collate_ours, None
    loader = DataLoader(dataset, collate_fn=collate, batch_size=args.batch_size, num_workers=args.workers,
                        drop_last=True, prefetch_factor=args.prefetch_factor if args.workers else None,
                        persistent_workers=False, worker_init_fn=init if args.workers else None)
    iterator = iter(loader)
    served = 0
    for _ in range(args.warmup):
        served += next(iterator).shape[0]
    start = time.perf_counter()
    for _ in range(batches):
        served += next(iterator).shape[0]
    elapsed = time.perf_counter() - start
    del iterator, loader
    stats = s3.stats()
    fetched = sum(stats['get_bytes'].values())
    shard_gets = [n for path, n in stats['get_requests'].items() if re.search(r'shard\.\d+\.mds$', path)]
    del dataset
    shutil.rmtree(cache, ignore_errors=True)
    return {'rate': batches * args.batch_size / elapsed, 'amplification': fetched / (served * args.seq_len * 4),
            'max_fetches': max(shard_gets), 'seconds': elapsed}


@contextlib.contextmanager
def uploaded_shards(args, max_seconds: float):
    """The bench's MDS shards written to a temporary folder and uploaded to a fresh local S3 server: yields
    (server, shard root, an empty work folder, domain names, shard files, samples per shard, total samples)."""
    LocalS3 = test_support('local_s3').LocalS3
    total = args.samples_per_domain * len(PROPORTIONS)
    sizes = [int(round(total * p)) for p in PROPORTIONS]
    with tempfile.TemporaryDirectory() as tmp, LocalS3(latency_s=args.latency_ms / 1000, max_seconds=max_seconds) as s3:
        root, work = Path(tmp) / 'mds', Path(tmp) / 'work'
        work.mkdir()
        names = write_shards(root, sizes, args.seq_len, args.shard_bytes)
        shard_files = sorted(root.rglob('shard.*.mds'))
        samples_per_shard = max(1, (args.shard_bytes - 64) // (args.seq_len * 4 + 4))
        s3.upload_folder(root, BUCKET, 'mds')
        yield s3, root, work, names, shard_files, samples_per_shard, total


def run_remote(args) -> None:
    with uploaded_shards(args, max_seconds=3600) as (s3, root, work, names, shard_files, samples_per_shard, total):
        shard_size = max(p.stat().st_size for p in shard_files)
        index_bytes = sum(p.stat().st_size for p in root.rglob('index.json'))
        cache_limit = index_bytes + args.cache_shards * shard_size
        batches = int(args.epoch_fraction * total / args.batch_size) - args.warmup
        print(f'{total} samples of {args.seq_len} int32 tokens in {len(shard_files)} shards of <= {shard_size} bytes; '
              f'latency {args.latency_ms:g} ms/request; cache_limit {cache_limit} bytes = indexes + '
              f'{args.cache_shards} shards; {args.warmup} + {batches} batches of {args.batch_size} per run', flush=True)
        systems = ['plain', 'shard_block'] + (['full'] if args.with_full else [])
        results: dict[tuple[str, str], list[dict]] = {}
        with s3.environment():
            for label, limit in [('no cache_limit', None), ('cache_limit', cache_limit)]:
                for round_index in range(args.rounds):
                    order = systems if round_index % 2 == 0 else systems[::-1]
                    for system in order:
                        result = remote_run(system, s3, names, args, limit, work, samples_per_shard, batches)
                        results.setdefault((label, system), []).append(result)
                        print(f'{label:>14} round {round_index} {system:>11}: {result["rate"]:7.0f} samples/s, '
                              f'amplification {result["amplification"]:.3f}, max fetches/shard '
                              f'{result["max_fetches"]}, {result["seconds"]:.1f} s', flush=True)
        names_of = {'plain': 'StreamingDataset (py1br)', 'shard_block': 'drp_multidomain shard_block',
                    'full': 'drp_multidomain full shuffle'}
        table = ['| cache | dataset | samples/s (median) | download amplification | max fetches of a shard |',
                 '|---|---|---|---|---|']
        medians = {}
        for (label, system), runs in results.items():
            rate = statistics.median(r['rate'] for r in runs)
            amp = statistics.median(r['amplification'] for r in runs)
            medians[(label, system)] = (rate, amp)
            table.append(f'| {label} | {names_of[system]} | {rate:.0f} | {amp:.3f} | '
                         f'{max(r["max_fetches"] for r in runs)} |')
        lines = []
        for label in ('no cache_limit', 'cache_limit'):
            (plain_rate, plain_amp), (ours_rate, ours_amp) = medians[(label, 'plain')], medians[(label, 'shard_block')]
            lines.append(f'{label}: throughput ratio ours/StreamingDataset {ours_rate / plain_rate:.3f}; '
                         f'amplification ours {ours_amp:.3f} vs StreamingDataset {plain_amp:.3f} '
                         f'(ratio {ours_amp / plain_amp:.3f})')
        print('\n'.join(table))
        print('\n'.join(lines))
        last = (f'throughput ratio drp_multidomain / StreamingDataset (remote, cache_limit, '
                f'{args.latency_ms:g} ms latency): {medians[("cache_limit", "shard_block")][0] / medians[("cache_limit", "plain")][0]:.3f}')
        write_results('remote', [
            '### Remote shards (local moto S3 server + latency proxy)', '',
            f'`{command_line()}`', '',
            f'{total} samples of {args.seq_len} int32 tokens, {len(shard_files)} shards of <= {shard_size} bytes, '
            f'proportions {PROPORTIONS} (domain sizes in proportion), {args.workers} workers, batch {args.batch_size}, '
            f'{args.latency_ms:g} ms per request, block {args.block_shards} shards for both, cache_limit = indexes + '
            f'{args.cache_shards} shards ({cache_limit} bytes). Each run: fresh cache, {args.warmup} warm-up + '
            f'{batches} timed batches ({args.epoch_fraction:g} epoch); median of {args.rounds} alternating rounds. '
            f'Amplification = bytes sent by the server / bytes of samples served. The plain dataset keeps its '
            f'defaults otherwise (predownload 8 x batch per worker); both drop the S3 client a forked worker '
            f'inherits (`release_inherited_clients`: without it the plain dataset got connection resets here). '
            f'Shared, loaded 2-core machine.',
            '', *table, '', *[f'- {line}' for line in lines], f'- {last}'])
        print(last)


# ------------------------------------------------------------------------------------------- nodes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _node_main(system: str, node: int, num_nodes: int, port: int, client: str, work: str, names: list[str],
               args, samples_per_shard: int, batches: int, out: str) -> None:
    """One simulated node: stream ``batches`` batches of its part of the epoch, write what it was served."""
    try:
        node_dir = Path(work) / f'{client}'
        test_support('local_s3')  # simulated_nodes imports it by name
        test_support('simulated_nodes').enter_node(node, num_nodes, port, node_dir, client_id=client)
        remote = f's3://{BUCKET}/mds'
        if system == 'plain':
            dataset = StreamingDataset(
                streams=[Stream(remote=f'{remote}/{n}', local=str(node_dir / 'cache' / n), split='train', proportion=p)
                         for n, p in zip(names, PROPORTIONS)],
                shuffle=True, shuffle_algo='py1br', shuffle_block_size=args.block_shards * samples_per_shard,
                batch_size=args.batch_size, shuffle_seed=17)
            collate, init = collate_plain, _worker_init
        else:
            dataset = MultiDomainStreamingDataset(
                names, [Stream(remote=f'{remote}/{n}', local=str(node_dir / 'cache' / n), split='train') for n in names],
                PROPORTIONS, max_seq_len=args.seq_len, device_batch_size=args.batch_size, num_workers=args.workers,
                prefetch_factor=args.prefetch_factor, shuffle_algo='shard_block', shuffle_block_shards=args.block_shards,
                num_canonical_nodes=1 if system == 'one_share' else None)
            assert dataset.num_nodes == num_nodes
            assert dataset.num_canonical_nodes == (1 if system == 'one_share' else num_nodes)
            collate, init = collate_ours, None
        loader = DataLoader(dataset, collate_fn=collate, batch_size=args.batch_size, num_workers=args.workers,
                            drop_last=True, prefetch_factor=args.prefetch_factor if args.workers else None,
                            persistent_workers=False, worker_init_fn=init if args.workers else None)
        served, start = 0, time.perf_counter()
        iterator = iter(loader)
        for _ in range(batches):
            served += next(iterator).shape[0]
        elapsed = time.perf_counter() - start
        del iterator, loader
        Path(out).write_text(json.dumps({'served': served, 'seconds': elapsed}))
    except BaseException:
        Path(out + '.error').write_text(traceback.format_exc())
        raise


def nodes_run(system: str, num_nodes: int, s3, names: list[str], args, work: Path, samples_per_shard: int,
              total: int) -> dict:
    batches = int(args.epoch_fraction * total / (args.batch_size * num_nodes))
    port = _free_port()
    clients = [f'{system}-n{num_nodes}-node{m}' for m in range(num_nodes)]
    outs = [str(work / f'{client}.json') for client in clients]
    context = multiprocessing.get_context('fork')
    procs = [context.Process(target=_node_main, args=(system, m, num_nodes, port, clients[m], str(work), names, args,
                                                      samples_per_shard, batches, outs[m]))
             for m in range(num_nodes)]
    for proc in procs:
        proc.start()
    for proc, out in zip(procs, outs):
        proc.join(timeout=3000)
        if proc.exitcode != 0:
            error = Path(out + '.error')
            raise RuntimeError(error.read_text() if error.exists() else f'node exited with {proc.exitcode}')
    by_client = s3.stats()['by_client']
    sample_bytes = args.seq_len * 4
    nodes = []
    for client, out in zip(clients, outs):
        served = json.loads(Path(out).read_text())
        counts = by_client.get(client, {'get_bytes': {}, 'get_requests': {}})
        shard_gets = {path: n for path, n in counts['get_requests'].items() if re.search(r'shard\.\d+\.mds$', path)}
        fetched = sum(counts['get_bytes'].values())
        nodes.append({'bytes': fetched, 'served': served['served'], 'seconds': served['seconds'],
                      'amplification': fetched / (served['served'] * sample_bytes), 'shards': set(shard_gets),
                      'max_fetches': max(shard_gets.values(), default=0)})
    for client in clients:
        shutil.rmtree(work / client, ignore_errors=True)
    total_bytes = sum(n['bytes'] for n in nodes)
    shards_by_two = len(set.union(*[n['shards'] & m['shards'] for i, n in enumerate(nodes) for m in nodes[i + 1:]])) \
        if num_nodes > 1 else 0
    return {'nodes': nodes, 'total_bytes': total_bytes, 'shards_by_two': shards_by_two, 'batches': batches,
            'amplification': total_bytes / (sum(n['served'] for n in nodes) * sample_bytes)}


def run_nodes(args) -> None:
    with uploaded_shards(args, max_seconds=7200) as (s3, root, work, names, shard_files, samples_per_shard, total):
        data_bytes = sum(p.stat().st_size for p in shard_files)
        print(f'{total} samples of {args.seq_len} int32 tokens in {len(shard_files)} shards ({data_bytes} bytes); '
              f'latency {args.latency_ms:g} ms/request; nodes {args.nodes}', flush=True)
        results = {}
        with s3.environment():
            for num_nodes in args.nodes:
                for system in ('plain', 'ours') + (('one_share',) if num_nodes > 1 else ()):
                    result = nodes_run(system, num_nodes, s3, names, args, work, samples_per_shard, total)
                    results[(num_nodes, system)] = result
                    per_node = [n['bytes'] for n in result['nodes']]
                    print(f'{num_nodes} nodes {system:>5}: total {result["total_bytes"]} bytes, per node '
                          f'{per_node}, amplification total {result["amplification"]:.3f}, worst node '
                          f'{max(n["amplification"] for n in result["nodes"]):.3f}, shards fetched by >= 2 nodes '
                          f'{result["shards_by_two"]}', flush=True)
        labels = {'plain': 'StreamingDataset (py1br)', 'ours': 'drp_multidomain shard_block + node shares',
                  'one_share': 'drp_multidomain shard_block, `num_canonical_nodes: 1` (the order before node shares)'}
        table = ['| nodes | dataset | bytes per node (mean / max) | bytes in total | amplification per node (worst) '
                 '| amplification in total | shards fetched by >= 2 nodes |', '|---|---|---|---|---|---|---|']
        ratios = []
        for num_nodes in args.nodes:
            for system in ('plain', 'ours', 'one_share'):
                if (num_nodes, system) not in results:
                    continue
                result = results[(num_nodes, system)]
                per_node = [n['bytes'] for n in result['nodes']]
                table.append(f'| {num_nodes} | {labels[system]} | {statistics.mean(per_node):.0f} / {max(per_node)} | '
                             f'{result["total_bytes"]} | {max(n["amplification"] for n in result["nodes"]):.3f} | '
                             f'{result["amplification"]:.3f} | {result["shards_by_two"]} |')
            ratios.append((num_nodes, results[(num_nodes, 'ours')]['amplification']
                           / results[(num_nodes, 'plain')]['amplification']))
        ratio_text = ', '.join(f'{n} nodes {r:.3f}' for n, r in ratios)
        last = (f'total download amplification ours / StreamingDataset: {ratio_text}; worst '
                f'{max(r for _, r in ratios):.3f} (goal <= 1.05)')
        print('\n'.join(table))
        print(last)
        write_results('nodes', [
            f'`{command_line()}`', '',
            f'{total} samples of {args.seq_len} int32 tokens in {len(shard_files)} shards ({data_bytes} bytes), '
            f'proportions {PROPORTIONS} (domain sizes in proportion), {args.workers} workers and batch '
            f'{args.batch_size} per node (one rank per node), block {args.block_shards} shards for both, no '
            f'cache_limit, {args.latency_ms:g} ms per request. N simulated nodes run together on one machine (own '
            f'process, cache and temporary directory each); each reads {args.epoch_fraction:g} of its part of an '
            f'epoch. Bytes = everything the server sent to that node (shards and index files), counted per node '
            f'by the proxy. Amplification = bytes sent / bytes of the samples the node was served (total: all '
            f'nodes). The `num_canonical_nodes: 1` rows are the order before node shares, where every node reads '
            f'every block. One run.',
            '', *table, '', f'- {last}'],
            section='data_nodes', title='## Many nodes, one copy: bytes per node (`bench/data_throughput.py --nodes`)\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--prefetch-factor', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--batches', type=int, default=300, help='local mode: timed batches per round')
    parser.add_argument('--warmup', type=int, default=20)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--seq-len', type=int, default=1024)
    parser.add_argument('--samples-per-domain', type=int, default=4000,
                        help='local: samples per domain; remote: mean samples per domain (sizes follow proportions)')
    parser.add_argument('--remote', action='store_true', help='stream from a local S3 server (moto) with latency')
    parser.add_argument('--latency-ms', type=float, default=50.0, help='remote: added per request')
    parser.add_argument('--shard-bytes', type=int, default=1 << 18, help='remote: MDS size_limit')
    parser.add_argument('--block-shards', type=int, default=2, help='remote: shards per shuffle block (both)')
    parser.add_argument('--cache-shards', type=int, default=24, help='remote: cache_limit = indexes + this many shards')
    parser.add_argument('--epoch-fraction', type=float, default=0.9, help='remote: samples read per run / dataset')
    parser.add_argument('--with-full', action='store_true', help='remote: also time our full shuffle (slow)')
    parser.add_argument('--nodes', type=int, nargs='+', default=None,
                        help='remote: simulated node counts (e.g. 1 2 4): bytes per node, ours vs StreamingDataset')
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    if args.nodes and not args.remote:
        parser.error('--nodes needs --remote')
    if args.remote and args.nodes:
        run_nodes(args)
    elif args.remote:
        run_remote(args)
    else:
        run_local(args)


if __name__ == '__main__':
    main()
