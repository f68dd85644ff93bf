"""One live training run per ``save_folder``: an exclusive lock the kernel drops when its holder dies.

``hold_run_lock(folder)`` takes ``fcntl.flock`` on ``FOLDER/.drp-run.lock`` and writes the holder
(pid, host, start time, command) into it. A second run on the same folder is refused with
``RunLockError`` naming the folder and the holder. A killed run (even ``kill -9``) cannot leave
the lock stuck: the kernel releases a flock with the last file descriptor of its process, and the
file's content is only a description, never read to decide. A run refused after taking the lock
(by its checks of the checkpoint it resumes) puts the earlier content back: no byte changes. The file is left in place (deleting
a lock file while another process waits on it would let two runs hold two different files).

Local folders only: a remote ``save_folder`` (``s3://``...) is not locked (said by the caller);
on a network file system ``flock`` holds across hosts only where the file system supports it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = '.drp-run.lock'

__all__ = ['LOCK_NAME', 'RunLockError', 'hold_run_lock', 'restore_holder', 'is_remote']


class RunLockError(RuntimeError):
    """Another live process holds the folder; the message names both."""


def is_remote(path: str) -> bool:
    return '://' in str(path)


def hold_run_lock(folder: str | os.PathLike, key: str = 'save_folder'):
    """Lock ``folder`` for this process's lifetime; returns the open lock file (keep a reference to it).

    Creates ``folder`` (and nothing else in it but the lock file). The file's earlier content is kept
    as ``handle.previous``: ``restore_holder(handle)`` puts it back when the run is refused after all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = open(path, 'a+')
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        try:
            described = json.loads(holder)
            who = (f"pid {described.get('pid')} on host {described.get('host')} (started "
                   f"{described.get('started')}: {described.get('command')})")
        except ValueError:
            who = 'another process'
        raise RunLockError(f'{key}: {folder} is in use by a live run, {who}; two runs on one save_folder overwrite '
                           'each other\'s checkpoints and metrics. Wait for it to end, stop it, or give this run '
                           f'another {key}') from None
    handle.seek(0)
    previous = handle.read()
    _write(handle, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                               'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'command': ' '.join(sys.argv)}) + '\n')
    return _Held(handle, previous)


def _write(handle, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()


class _Held:
    """The open, locked file (the lock lasts while it is open) and what it said before."""

    def __init__(self, handle, previous: str):
        self.handle, self.previous = handle, previous

    def close(self) -> None:
        self.handle.close()


def restore_holder(held: _Held) -> None:
    """Put the lock file's earlier content back (a run refused after taking the lock changes no byte)."""
    _write(held.handle, held.previous)
