"""Files written all at once or not at all, and JSON lines read with their line numbers.

- ``atomic_folder(out)``: build a folder in a staging folder beside ``out``; it replaces ``out``
  only when the body finished. A failure (or a kill) midway leaves the old ``out`` as it was and
  no staging folder behind (a kill leaves one, which the next ``atomic_folder(out)`` removes).
- ``replace_folder(new, out)``: the swap itself, for a folder built elsewhere; the old ``out`` is
  deleted only once the new one is in place, and put back if the move fails.
- ``atomic_file(path)`` / ``atomic_write_text(path, text)``: the same for one file.
- ``read_jsonl(path)`` / ``iter_jsonl(lines, path)``: ``(line number, object)`` for each non-blank
  line; a line that is not a JSON object raises ``JSONLError`` naming ``path:line``.
  ``text_field(record, path, line)`` reads the ``text`` string of a corpus line the same way.

Pure standard library; used by data_prep, export, one-shot, the sources, the eval tools and the benches.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ['atomic_folder', 'replace_folder', 'atomic_file', 'atomic_write_text', 'JSONLError', 'iter_jsonl',
           'read_jsonl', 'text_field']


def _staging_prefix(out: Path) -> str:
    return f'.{out.name}.tmp-'


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; on a normal exit it becomes ``out`` (see module doc)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(_staging_prefix(out) + '*'):  # left by a killed writer of the same folder
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out), dir=out.parent))
    try:
        yield staging
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move folder ``new`` to ``out``; an existing ``out`` is removed only once the move succeeded."""
    new, out = Path(new), Path(out)
    previous = None
    if out.exists() or out.is_symlink():
        previous = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
        previous.rmdir()
        os.replace(out, previous)
    try:
        os.replace(new, out)
    except OSError:
        if previous is not None:
            os.replace(previous, out)
        raise
    if previous is not None:
        if previous.is_dir() and not previous.is_symlink():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            previous.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write it in the body and it replaces ``path`` on a normal exit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f'.{path.name}.tmp-', dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding='utf-8')


class JSONLError(ValueError):
    """A JSON-lines file with a bad line; the message starts with ``path:line``."""


def iter_jsonl(lines: Iterable[str], path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of ``lines`` (read from ``path``, named in errors)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise JSONLError(f'{path}:{number}: not valid JSON ({err.msg})') from None
        if not isinstance(record, dict):
            raise JSONLError(f'{path}:{number}: expected a JSON object, got {type(record).__name__}')
        yield number, record


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``iter_jsonl`` over a UTF-8 file."""
    with open(path, encoding='utf-8') as handle:
        yield from iter_jsonl(handle, path)


def text_field(record: dict[str, Any], path: str | os.PathLike, number: int, field: str = 'text') -> str:
    """The ``field`` string of one corpus line; a missing or non-string field raises ``JSONLError``."""
    if field not in record:
        raise JSONLError(f'{path}:{number}: JSON object without a "{field}" field; every line must look like '
                         f'{{"{field}": "..."}}')
    if not isinstance(record[field], str):
        raise JSONLError(f'{path}:{number}: "{field}" must be a string, got {type(record[field]).__name__}')
    return record[field]
