"""``DATA_ROOT/manifest.json``, the record data_prep writes last into a data root: the one reader of it, and
the tokenizer identity it stores.

Every tool that opens a data root reads the manifest here (the pre-flight, the dataset's shard checks,
the identity checks of one-shot calibration and the eval tools, data_prep itself when it rebuilds);
``docs/DESIGN.md`` ("Data on disk") lists its fields.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = 'manifest.json'


class ManifestError(ValueError):
    """The manifest exists but cannot be used; the message names the file and the fix."""


def read_manifest(data_root: str | Path) -> dict[str, Any] | None:
    """The parsed manifest of ``data_root``, or None when it has none. A file that is not a JSON object with
    ``domains`` and ``settings`` mappings raises ``ManifestError`` naming it."""
    path = Path(data_root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ManifestError(f'{path} is not valid JSON ({err}); rebuild the data root with drp-prepare-data') from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get('domains'), dict) \
            or not isinstance(manifest.get('settings'), dict):
        raise ManifestError(f'{path} lacks "domains"/"settings"; it is not a complete data_prep manifest '
                            '(rebuild the data root with drp-prepare-data)')
    return manifest


def tokenizer_identity(tokenizer) -> str:
    """SHA-256 of what fixes a tokenizer's ids: the model section (vocabulary, merges), the added tokens and
    the EOS id. Unlike a hash of its files, a copy re-saved elsewhere (an export) has the same identity."""
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        payload = {'model': spec.get('model'),
                   'added': sorted([t['id'], t['content']] for t in spec.get('added_tokens') or [])}
    else:
        payload = {'vocab': sorted(tokenizer.get_vocab().items())}
    payload['eos'] = tokenizer.eos_token_id
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
