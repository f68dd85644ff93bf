"""Simulated nodes on one machine, for tests and benches: the environment of node m of N.

A real multi-node job gives each node its own machine: its own local cache, ``/tmp`` and
``/dev/shm``. Simulated here by one process per node with

- the variables Composer's launcher sets and mosaicml-streaming reads (``WORLD_SIZE``,
  ``RANK``, ``LOCAL_WORLD_SIZE``, ``LOCAL_RANK``, ``NODE_RANK``, ``MASTER_ADDR``/``MASTER_PORT``:
  with ``WORLD_SIZE > 1`` streaming joins a gloo group itself while it builds a dataset, so the
  nodes of one job must start together);
- its own temporary directory, and in it a reservation of streaming's shared-memory prefixes:
  ``/dev/shm`` is shared on one machine, and every node is its own local leader, so two nodes
  would pick the same free prefix and collide. streaming skips a prefix whose file lock exists
  in the temporary directory; node m gets placeholder locks for every prefix not congruent to
  m modulo N, so the nodes pick disjoint prefixes, as if on separate machines;
- optionally a client id that ``local_s3.LocalS3`` counts apart (``AWS_SDK_UA_APP_ID``).

``enter_node`` is called first thing in the node's process (before any streaming dataset).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ['enter_node', 'node_environment']

_RESERVED_PREFIXES = 2048
_MAX_TMP_CHARS = 48  # multiprocessing adds about 40 characters of its own below it


def node_environment(node: int, num_nodes: int, master_port: int, ranks_per_node: int = 1,
                     local_rank: int = 0) -> dict[str, str]:
    """The launcher's variables for local rank ``local_rank`` of node ``node`` of ``num_nodes``."""
    return {'WORLD_SIZE': str(num_nodes * ranks_per_node), 'RANK': str(node * ranks_per_node + local_rank),
            'LOCAL_WORLD_SIZE': str(ranks_per_node), 'LOCAL_RANK': str(local_rank), 'NODE_RANK': str(node),
            'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(int(master_port))}


def enter_node(node: int, num_nodes: int, master_port: int, tmp_root: str | os.PathLike,
               client_id: str | None = None) -> Path:
    """Make this process node ``node`` of ``num_nodes`` (one rank); returns its temporary directory.

    The directory is ``tmp_root/node<m>-tmp`` when that path is short enough for the AF_UNIX sockets that
    multiprocessing (DataLoader workers) puts in it (108 bytes on Linux, with its own names after it);
    under a deep folder (pytest's ``tmp_path`` of a long test name) it is a short folder in the system
    temporary directory instead, named after ``tmp_root`` and removed when the node's process exits normally.
    """
    node_tmp = Path(tmp_root) / f'node{node}-tmp'
    if len(str(node_tmp)) > _MAX_TMP_CHARS:
        # the same folder for the same tmp_root: a node restarted after a kill finds its earlier run's locks there,
        # which is how streaming tells the killed run's shared memory from a live one
        digest = hashlib.sha1(str(Path(tmp_root).resolve()).encode()).hexdigest()[:12]
        node_tmp = Path(tempfile.gettempdir()) / f'drp-node{node}-{digest}'
        atexit.register(shutil.rmtree, node_tmp, True)
    node_tmp.mkdir(parents=True, exist_ok=True)
    for prefix in range(_RESERVED_PREFIXES):
        if prefix % num_nodes != node:
            for lock in ('barrier_filelock', 'cache_filelock'):
                (node_tmp / f'{prefix:06}_{lock}').touch()
    os.environ.update(node_environment(node, num_nodes, master_port), TMPDIR=str(node_tmp))
    tempfile.tempdir = str(node_tmp)  # gettempdir() caches its first answer
    if client_id is not None:
        from local_s3 import LocalS3

        os.environ.update(LocalS3.client_environment(client_id))
    return node_tmp
