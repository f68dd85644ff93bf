"""What data_prep wrote for each domain and split, and the check that the shards are still that.

``describe_split(folder)`` -> the record data_prep keeps in ``manifest.json`` under
``domains.<domain>.splits.<split>``: the sample count, the sha256 of ``index.json`` and, per
shard, its file name, size and sha1 (the hash MDS itself records in ``index.json`` when the
writer is given ``hashes=['sha1']``, which streaming's ``validate_hash='sha1'`` checks on download).

``check_split(root, domain, split)`` compares a data root with its manifest, naming the domain
and the file: ``index.json`` missing or rewritten (shards rebuilt with another tokenizer,
sequence length or seed), a shard missing, of another size (truncated), or, when the split is
small enough to read at once (``HASH_LIMIT_BYTES``), of other content. A manifest written
before these records has none: nothing is checked (rebuild to get them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from drp_foundry.data.manifest import ManifestError, read_manifest

__all__ = ['ShardIntegrityError', 'describe_split', 'check_split', 'HASH_LIMIT_BYTES']

HASH_LIMIT_BYTES = 256 << 20  # shards of a split up to this size are hashed in the pre-flight (sizes always)


class ShardIntegrityError(ValueError):
    """The shards differ from the manifest; the message names the domain, split and file."""


def _digest(path: Path, name: str) -> str:
    h = hashlib.new(name)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def describe_split(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    index = json.loads((folder / 'index.json').read_text())
    shards = []
    for shard in index['shards']:
        raw = shard['raw_data']
        path = folder / raw['basename']
        shards.append({'file': raw['basename'], 'bytes': path.stat().st_size, 'sha1': _digest(path, 'sha1')})
    return {'samples': int(sum(int(s.get('samples', 0)) for s in index['shards'])),
            'index_sha256': _digest(folder / 'index.json', 'sha256'), 'shards': shards}


def check_split(root: str | Path, domain: str, split: str) -> None:
    """Raise ``ShardIntegrityError`` when ``ROOT/<domain>/<split>`` is not what ``ROOT/manifest.json`` recorded."""
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except ManifestError:
        return  # the pre-flight's manifest check reports it
    if manifest is None:
        return
    record = (((manifest.get('domains') or {}).get(domain) or {}).get('splits') or {}).get(split)
    if not isinstance(record, dict):
        return
    folder = root / domain / split
    index = folder / 'index.json'
    fix = f'rebuild {root} with data_prep (--overwrite), or restore the files data_prep wrote'
    if not index.is_file():
        raise ShardIntegrityError(f"domain '{domain}' ({split}): {index} is missing; {fix}")
    if _digest(index, 'sha256') != record['index_sha256']:
        raise ShardIntegrityError(f"domain '{domain}' ({split}): {index} is not the one data_prep wrote "
                                  '(manifest.json records another index: shards rebuilt with another tokenizer, '
                                  f'sequence length or seed, or copied from another build); {fix}')
    total = 0
    for shard in record['shards']:
        path = folder / shard['file']
        if not path.is_file():
            raise ShardIntegrityError(f"domain '{domain}' ({split}): shard {path} is missing; {fix}")
        size = path.stat().st_size
        if size != shard['bytes']:
            raise ShardIntegrityError(f"domain '{domain}' ({split}): shard {path} is {size} bytes, manifest.json "
                                      f"records {shard['bytes']} ({'truncated' if size < shard['bytes'] else 'changed'}); "
                                      f'{fix}')
        total += size
    if total <= HASH_LIMIT_BYTES:
        for shard in record['shards']:
            path = folder / shard['file']
            if _digest(path, 'sha1') != shard['sha1']:
                raise ShardIntegrityError(f"domain '{domain}' ({split}): shard {path} has other content than "
                                          f'data_prep wrote (sha1 differs from manifest.json); {fix}')
