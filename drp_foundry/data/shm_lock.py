"""A machine-wide lock around mosaicml-streaming's shared-memory prefix allocation.

Why: streaming 0.12 (``streaming/base/shared/prefix.py``, ``get_shm_prefix``, called from
``StreamingDataset.__init__``) lets every rank of a job scan ``/dev/shm`` for a free prefix on its own;
then the local leader registers the prefix and the other ranks check it. Another job on the machine
can take the prefix in between, and a rank stops with ``shared memory registered does not match local
leader`` (or the leader's registration fails). Upstream: mosaicml/streaming issues #901 and #824.

What: the ranks of a job on a node build their ``StreamingDataset`` while that node's local leader
holds an exclusive ``fcntl.flock`` on ``<tempfile.gettempdir()>/drp_foundry_streaming_shm.lock``::

    all ranks: try round (leaders: non-blocking flock; all_gather of the outcomes)
       -> every leader of the job holds its node's lock -> every rank builds -> barrier -> leaders release

Another job that uses this lock waits; a job that does not (a stock ``StreamingDataset`` built
elsewhere) is not held back. The allocation of one dataset completes inside its construction (the
leader registers, the others check, before ``__init__`` returns), so a lock per construction suffices.

Where the file lives: streaming keeps its own lock files (``000000_barrier_filelock``...) in
``tempfile.gettempdir()`` and its prefix scan reads them as part of a prefix's state, so processes that
see the same streaming state see the same lock (a simulated node with its own ``TMPDIR`` is another
machine for streaming and for this lock). The folder is machine-wide; the file is created readable by
all (``flock`` needs only a read descriptor), so the jobs of every user share it. A file we cannot open
(another user's, unreadable) makes us use ``drp_foundry_streaming_shm.<uid>.lock`` instead; when no
file can be locked, construction goes on without the lock (logged): the lock never fails a run.

Why it cannot deadlock: only local leaders take the lock (``RANK % LOCAL_WORLD_SIZE == 0``,
streaming's own leader), and never by waiting while holding: each round every leader *tries* its node's
lock, the job gathers the outcomes, and unless all leaders got theirs, those that did let go before the
next round. So a job never holds one node's lock while it waits for another's (two multi-node jobs on
the same nodes cannot hold each other's), and the holder's ranks are all inside construction, whose
only waits are on ranks of the same job. Waiting is bounded (``WAIT_LIMIT_S``, then build unlocked,
logged), so even a holder that hangs delays others, never stops them. Nested use in one thread (a
construction inside a locked one) takes nothing again.

Without ``torch.distributed`` initialised but with ``WORLD_SIZE > 1`` in the environment, streaming
starts a process group of its own for the construction; so do we (gloo, same variables), one
construction earlier, and end it after: streaming then uses ours, as it does a launcher's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator

import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ['LOCK_NAME', 'WAIT_LIMIT_S', 'NodeLock', 'lock_paths', 'node_shm_lock']

LOCK_NAME = 'drp_foundry_streaming_shm.lock'
WAIT_LIMIT_S = 900.0  # a construction takes seconds; past this the wait is a hung holder: go on unlocked
_POLL_S = (0.05, 0.25)  # random pause between tries: two waiting jobs do not retry in step

_thread = threading.local()
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def lock_paths() -> list[str]:
    """The machine-wide lock file, then this user's own (when the first cannot be opened)."""
    folder = tempfile.gettempdir()
    return [os.path.join(folder, LOCK_NAME), os.path.join(folder, f'drp_foundry_streaming_shm.{os.getuid()}.lock')]


def _open(path: str) -> int:
    # Open before create: in a sticky world-writable folder (/tmp) Linux refuses O_CREAT on another user's
    # file (fs.protected_regular) even where reading it is allowed.
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)


class NodeLock:
    """An exclusive ``flock`` on the first lock file of ``paths`` that can be opened (not reentrant).

    ``try_acquire`` returns False only while another open file holds the lock; True when this one holds
    it (``path`` names the file) or when no file can be locked at all (``path`` is None, logged once).
    """

    def __init__(self, paths: list[str] | None = None):
        self.paths = list(paths) if paths else lock_paths()
        self.path: str | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            raise RuntimeError(f'{self.path}: already held by this NodeLock')
        for path in self.paths:
            try:
                fd = _open(path)
            except OSError as err:  # another user's unreadable file, a read-only folder, ...
                _warn_once(f'open:{path}', 'streaming shm lock: cannot open %s (%s); trying the next lock file',
                           path, err)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as err:  # a file system without flock
                os.close(fd)
                _warn_once(f'flock:{path}', 'streaming shm lock: cannot lock %s (%s)', path, err)
                continue
            self._fd, self.path = fd, path
            return True
        _warn_once('none', 'streaming shm lock: no lock file usable in %s; building streaming datasets without '
                   'it (two jobs starting at once may collide in streaming\'s shared-memory prefixes)',
                   os.path.dirname(self.paths[0]))
        return True

    def acquire(self, wait_limit_s: float = WAIT_LIMIT_S) -> bool:
        """Try until held; False (logged) when ``wait_limit_s`` passed first."""
        deadline = time.monotonic() + wait_limit_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                _warn_limit(wait_limit_s)
                return False
            time.sleep(random.uniform(*_POLL_S))
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd, self.path = self._fd, None, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _warn_limit(wait_limit_s: float) -> None:
    log.warning('streaming shm lock: still held by another job after %.0f s; building streaming datasets without it',
                wait_limit_s)


def _is_local_leader() -> bool:
    """streaming's local leader: RANK % LOCAL_WORLD_SIZE == 0 (both from the environment, as streaming reads them)."""
    rank = int(os.environ.get('RANK', 0))
    return rank % max(1, int(os.environ.get('LOCAL_WORLD_SIZE', 1))) == 0


def _join_group_like_streaming() -> bool:
    """Start the process group streaming would start for this construction; True when we did."""
    if int(os.environ.get('WORLD_SIZE', 1)) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group(backend='gloo', rank=int(os.environ.get('RANK', 0)),
                            world_size=int(os.environ['WORLD_SIZE']))
    return True


def _acquire_as_a_job(lock: NodeLock, wait_limit_s: float) -> None:
    """Rounds until every local leader of the job holds its node's lock (or one's wait ran out)."""
    leader = _is_local_leader()
    deadline = time.monotonic() + wait_limit_s
    outcomes: list = [None] * dist.get_world_size()
    while True:
        got = lock.try_acquire() if leader else True
        dist.all_gather_object(outcomes, (got, time.monotonic() >= deadline))
        if all(g for g, _ in outcomes):
            return
        if any(expired for _, expired in outcomes):
            if leader:
                _warn_limit(wait_limit_s)
            return  # those that hold their node's lock keep it through the construction: harmless
        if got and lock.held:
            lock.release()  # all or nothing: never hold one node's lock while another node's leader waits
        time.sleep(random.uniform(*_POLL_S))


@contextlib.contextmanager
def node_shm_lock(wait_limit_s: float = WAIT_LIMIT_S) -> Iterator[None]:
    """Build streaming datasets inside: every rank of the job enters, the local leaders hold the lock.

    Every rank of a distributed job must enter (the entry and the exit are collective), as it must
    construct the dataset. Single process: this process holds the lock. See the module's docstring.
    """
    depth = getattr(_thread, 'depth', 0)
    if depth:  # inside a locked construction of this thread already
        _thread.depth = depth + 1
        try:
            yield
        finally:
            _thread.depth = depth
        return
    own_group = _join_group_like_streaming()
    lock = NodeLock()
    _thread.depth = 1
    try:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _acquire_as_a_job(lock, wait_limit_s)
            yield
            dist.barrier()  # every rank has built (and checked its prefix) before the leaders let go
        else:
            lock.acquire(wait_limit_s)
            yield
    finally:  # on an error no barrier: the other ranks may never arrive; the job is failing anyway
        lock.release()
        _thread.depth = 0
        if own_group:
            dist.destroy_process_group()
