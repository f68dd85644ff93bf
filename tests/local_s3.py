"""A local S3-compatible object store for tests and benches (test support, not shipped): moto's server
behind a latency proxy.

``LocalS3`` starts one child process (``python tests/local_s3.py``, this file) that runs

- moto's S3 server (``moto.server.ThreadedMotoServer``, from the ``moto[server]`` package),
- an HTTP proxy in front of it that waits ``latency_s`` before forwarding each request (a
  stand-in for the round trip to a real object store) and counts, per object path, the GET
  requests and the response bytes,

both bound to 127.0.0.1 only, on free ports. mosaicml-streaming reads ``s3://`` through boto3
and honours ``S3_ENDPOINT_URL``: point it at ``LocalS3.endpoint`` (the proxy). Uploads go to
moto directly (``LocalS3.upload_folder``), so they are neither slowed nor counted.

The child exits when the parent closes its stdin (parent gone), on ``stop()``, or after
``max_seconds`` at the latest; ``stop()`` waits a bounded time, then kills it.

    with LocalS3(latency_s=0.02) as s3:
        s3.upload_folder(local_mds_root, 'bucket', 'prefix')
        with s3.environment():        # S3_ENDPOINT_URL + dummy credentials
            ...  # Stream(remote='s3://bucket/prefix/<domain>', local=cache, ...)
        s3.stats()                     # {'get_requests': {path: n}, 'get_bytes': {path: bytes},
                                       #  'by_client': {app id: {'get_requests': ..., 'get_bytes': ...}}}

Per-client counts: boto3 puts ``AWS_SDK_UA_APP_ID`` into its User-Agent as ``app/<id>``; the
proxy also counts GETs and bytes per such id (``LocalS3.client_environment(id)``), so processes
that simulate nodes on one machine are counted apart while they run together.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ['LocalS3', 'S3_ENVIRONMENT']

LOOPBACK = '127.0.0.1'
S3_ENVIRONMENT = {
    'AWS_ACCESS_KEY_ID': 'testing',
    'AWS_SECRET_ACCESS_KEY': 'testing',
    'AWS_SESSION_TOKEN': 'testing',
    'AWS_DEFAULT_REGION': 'us-east-1',
}
_STATS_PATH = '/__drp_proxy__/stats'
_RESET_PATH = '/__drp_proxy__/reset'
_APP_ID = re.compile(r'(?:^|\s)app/(\S+)')
_HOP_HEADERS = {'connection', 'keep-alive', 'transfer-encoding', 'proxy-connection', 'te', 'upgrade'}


# ---------------------------------------------------------------------------------------- child side
class _ProxyState:
    def __init__(self, latency_s: float):
        self.latency_s = latency_s
        self.lock = threading.Lock()
        self.get_requests: dict[str, int] = defaultdict(int)
        self.get_bytes: dict[str, int] = defaultdict(int)
        self.by_client: dict[str, dict[str, dict[str, int]]] = {}
        self.requests = 0

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {'latency_s': self.latency_s, 'requests': self.requests,
                    'get_requests': dict(self.get_requests), 'get_bytes': dict(self.get_bytes),
                    'by_client': {app: {key: dict(counts) for key, counts in client.items()}
                                  for app, client in self.by_client.items()}}

    def reset(self) -> None:
        with self.lock:
            self.get_requests.clear()
            self.get_bytes.clear()
            self.by_client.clear()
            self.requests = 0


class _ProxyServer(ThreadingHTTPServer):
    # Every DataLoader worker, prefetch thread and reader opens its own connection; the default
    # listen backlog of 5 refuses some of them on a loaded machine.
    request_queue_size = 256


def _make_handler(state: _ProxyState, upstream: tuple[str, int]):
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args) -> None:  # quiet
            pass

        def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
            self.send_response(status)
            for key, value in headers or []:
                self.send_header(key, value)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(body)

        def _control(self) -> bool:
            path = self.path.split('?', 1)[0]
            if path == _STATS_PATH:
                self._reply(200, json.dumps(state.snapshot()).encode(), [('Content-Type', 'application/json')])
            elif path == _RESET_PATH:
                state.reset()
                self._reply(200, b'{}')
            else:
                return False
            return True

        def _forward(self) -> None:
            if self._control():
                return
            length = int(self.headers.get('Content-Length') or 0)
            body = self.rfile.read(length) if length else None
            if state.latency_s > 0:
                time.sleep(state.latency_s)
            connection = getattr(local, 'connection', None)
            if connection is None:
                connection = local.connection = http.client.HTTPConnection(*upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            except (http.client.HTTPException, OSError):
                connection.close()
                local.connection = None
                raise
            if self.command == 'GET':
                path = self.path.split('?', 1)[0]
                with state.lock:
                    state.requests += 1
                    state.get_requests[path] += 1
                    state.get_bytes[path] += len(payload)
                    app = _APP_ID.search(self.headers.get('User-Agent') or '')
                    if app:
                        client = state.by_client.setdefault(app.group(1), {'get_requests': defaultdict(int),
                                                                            'get_bytes': defaultdict(int)})
                        client['get_requests'][path] += 1
                        client['get_bytes'][path] += len(payload)
            else:
                with state.lock:
                    state.requests += 1
            self.send_response(response.status)
            for key, value in response.getheaders():
                # HEAD keeps the object's Content-Length (boto3 sizes its download from it).
                if key.lower() not in _HOP_HEADERS and (key.lower() != 'content-length' or self.command == 'HEAD'):
                    self.send_header(key, value)
            if self.command != 'HEAD':
                self.send_header('Content-Length', str(len(payload)))
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


def _serve(latency_s: float, max_seconds: float) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger('werkzeug').setLevel(logging.ERROR)  # no access log on stderr
    moto_server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    moto_server.start()
    upstream = moto_server.get_host_and_port()
    state = _ProxyState(latency_s)
    proxy = _ProxyServer((LOOPBACK, 0), _make_handler(state, upstream))
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    print(f'READY {proxy.server_address[1]} {upstream[1]}', flush=True)

    done = threading.Event()
    # The parent holds our stdin: EOF means it is gone (or called stop()).
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait(timeout=max_seconds)
    proxy.shutdown()
    moto_server.stop()


# --------------------------------------------------------------------------------------- parent side
class LocalS3:
    """moto's S3 server + a latency proxy in a child process on 127.0.0.1 (see the module doc)."""

    def __init__(self, latency_s: float = 0.0, max_seconds: float = 1800.0, start_timeout_s: float = 60.0):
        self.latency_s = float(latency_s)
        self.max_seconds = float(max_seconds)
        self.start_timeout_s = float(start_timeout_s)
        self._process: subprocess.Popen | None = None
        self.proxy_port = self.moto_port = 0

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> LocalS3:
        command = [sys.executable, str(Path(__file__).resolve()), '--latency-s', str(self.latency_s),
                   '--max-seconds', str(self.max_seconds)]
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')])))
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         env=env)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self._process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.start_timeout_s)
        if not line or not line[0].startswith('READY'):
            self.stop()
            raise RuntimeError(f'the local S3 server did not start within {self.start_timeout_s:.0f} s '
                               f'(got {line[0] if line else "nothing"!r}); is `moto[server]` installed '
                               f'(pip install -e .[dev])?')
        _, proxy_port, moto_port = line[0].split()
        self.proxy_port, self.moto_port = int(proxy_port), int(moto_port)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            process.stdin.close()
        # stdin EOF ends it, unless a forked child still holds the pipe: then terminate, then kill.
        for end in (None, process.terminate, process.kill):
            if end is not None:
                end()
            try:
                process.wait(timeout=timeout_s / 3)
                break
            except subprocess.TimeoutExpired:
                continue
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # access ------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The proxy's URL (slowed and counted): what ``S3_ENDPOINT_URL`` should be."""
        return f'http://{LOOPBACK}:{self.proxy_port}'

    @property
    def direct_endpoint(self) -> str:
        """moto's own URL (neither slowed nor counted)."""
        return f'http://{LOOPBACK}:{self.moto_port}'

    @staticmethod
    def client_environment(client_id: str) -> dict[str, str]:
        """Environment that makes boto3 (in this process or a child) count as ``client_id`` in ``stats()``."""
        if not re.fullmatch(r'[A-Za-z0-9_.-]+', client_id):
            raise ValueError(f'client id {client_id!r}: use letters, digits, "_", "." or "-".')
        return {'AWS_SDK_UA_APP_ID': client_id}

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """Set ``S3_ENDPOINT_URL`` (the proxy) and dummy AWS credentials; restore on exit."""
        values = dict(S3_ENVIRONMENT, S3_ENDPOINT_URL=self.endpoint)
        saved = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def client(self, direct: bool = True):
        import boto3

        return boto3.client('s3', endpoint_url=self.direct_endpoint if direct else self.endpoint,
                            aws_access_key_id='testing', aws_secret_access_key='testing',
                            region_name='us-east-1')

    def upload_folder(self, folder: str | os.PathLike, bucket: str, prefix: str) -> int:
        """Upload every file under ``folder`` to ``s3://bucket/prefix/...`` (creates the bucket); returns bytes."""
        client = self.client(direct=True)
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        total = 0
        folder = Path(folder)
        for path in sorted(p for p in folder.rglob('*') if p.is_file()):
            key = f'{prefix.strip("/")}/{path.relative_to(folder).as_posix()}'.lstrip('/')
            client.upload_file(str(path), bucket, key)
            total += path.stat().st_size
        return total

    def _control(self, path: str) -> bytes:
        connection = http.client.HTTPConnection(LOOPBACK, self.proxy_port, timeout=30)
        try:
            connection.request('GET', path)
            return connection.getresponse().read()
        finally:
            connection.close()

    def stats(self) -> dict[str, Any]:
        """GET requests and response bytes per object path (``/bucket/key``) since start or reset."""
        return json.loads(self._control(_STATS_PATH))

    def reset_stats(self) -> None:
        self._control(_RESET_PATH)


def main() -> None:
    parser = argparse.ArgumentParser(description='moto S3 server + latency proxy on 127.0.0.1 (child of LocalS3)')
    parser.add_argument('--latency-s', type=float, default=0.0)
    parser.add_argument('--max-seconds', type=float, default=1800.0)
    args = parser.parse_args()
    _serve(args.latency_s, args.max_seconds)


if __name__ == '__main__':
    main()
