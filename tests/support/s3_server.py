"""Real S3 endpoints on 127.0.0.1 for tests and benches (no pytest here, so benches can import it).

`MotoS3` runs moto's S3 HTTP server (in a thread, or in a subprocess when the client's own
CPU use must not slow the server down); `FaultProxy` sits between a client and the server,
counts the bytes served, and can throttle or cut connections in the middle of a body.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "modelserve-test",
    "AWS_SECRET_ACCESS_KEY": "modelserve-test-secret",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


class MotoS3:
    """moto's S3 server on a free 127.0.0.1 port; `endpoint_url` is what clients use."""

    def __init__(self, in_subprocess: bool = False, port: int | None = None):
        self.port = port or free_port()  # a stopped server's port: the same endpoint back (threaded: with its objects)
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._server: Any = None
        self._serving: threading.Thread | None = None
        if in_subprocess:
            command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
            self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:  # moto's ThreadedMotoServer, but polling for shutdown every 50 ms (its 0.5 s made each stop slow)
            from moto.server import DomainDispatcherApplication, create_backend_app
            from werkzeug.serving import make_server

            app = DomainDispatcherApplication(create_backend_app)
            self._server = make_server("127.0.0.1", self.port, app, threaded=True)
            self._serving = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
            self._serving.start()
        _wait_for_port(self.port)

    def client(self, endpoint_url: str | None = None, checksums: bool = True, **credentials: str) -> Any:
        """A boto3 client for this server; `checksums=False` uploads objects without a CRC (MD5 ETag only)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=credentials.get("key", TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"]),
            aws_secret_access_key=credentials.get("secret", TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]),
            config=Config(
                s3={"addressing_style": "path"},
                max_pool_connections=16,
                request_checksum_calculation="when_supported" if checksums else "when_required",
            ),
        )

    @contextmanager
    def require_auth(self) -> Iterator[None]:
        """Make the server check credentials (moto accepts any by default); unknown keys get 403."""
        self._set_auth_free_requests("0")
        try:
            yield
        finally:
            self._set_auth_free_requests("inf")

    def _set_auth_free_requests(self, count: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(request, timeout=10).read()

    def stop(self) -> None:
        if self._server is not None and self._serving is not None:
            self._server.shutdown()
            self._serving.join()  # werkzeug closes the socket as serve_forever returns: the port is free again
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class FaultProxy:
    """TCP proxy to `upstream_port` that counts response bytes and can throttle or cut connections.

    `cut_connections(after_bytes, count)` arms the next `count` new connections to be closed
    after `after_bytes` response bytes; `corrupt_connections(at_byte, count)` flips the byte at
    that response offset instead; `set_down(True)` drops every open connection and refuses new
    ones (an outage) until `set_down(False)`; `rate_bytes_per_s` throttles each connection.
    """

    def __init__(self, upstream_port: int, rate_bytes_per_s: float | None = None):
        self.upstream_port = upstream_port
        self.rate_bytes_per_s = rate_bytes_per_s
        self.bytes_served = 0
        self.connections = 0
        self._cut_after: int | None = None
        self._cuts_left = 0
        self._flip_at: int | None = None
        self._flips_left = 0
        self._down = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def cut_connections(self, after_bytes: int, count: int = 1) -> None:
        with self._lock:
            self._cut_after, self._cuts_left = after_bytes, count

    def corrupt_connections(self, at_byte: int, count: int = 1) -> None:
        with self._lock:
            self._flip_at, self._flips_left = at_byte, count

    def set_down(self, down: bool) -> None:
        with self._lock:
            self._down = down
            dropped = list(self._open) if down else []
        for connection in dropped:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served, self.connections = 0, 0

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._down:
                    client.close()
                    continue
                self.connections += 1
                cut_at = self._cut_after if self._cuts_left > 0 else None
                self._cuts_left = max(0, self._cuts_left - 1)
                flip_at = self._flip_at if self._flips_left > 0 else None
                self._flips_left = max(0, self._flips_left - 1)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True, cut_at, flip_at), daemon=True).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        is_response: bool,
        cut_at: int | None = None,
        flip_at: int | None = None,
    ) -> None:
        forwarded = 0
        started = time.monotonic()
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if flip_at is not None and forwarded <= flip_at < forwarded + len(data):
                    damaged = bytearray(data)
                    damaged[flip_at - forwarded] ^= 0xFF
                    data = bytes(damaged)
                if cut_at is not None and forwarded + len(data) >= cut_at:
                    self._count(cut_at - forwarded, is_response)
                    sink.sendall(data[: cut_at - forwarded])
                    break
                self._count(len(data), is_response)  # before sending: the client never sees it uncounted
                sink.sendall(data)
                forwarded += len(data)
                if is_response and self.rate_bytes_per_s:
                    ahead = forwarded / self.rate_bytes_per_s - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {source, sink}
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def _count(self, size: int, is_response: bool) -> None:
        if is_response:
            with self._lock:
                self.bytes_served += size


def use_test_credentials(monkeypatch: Any) -> None:
    """Give this process the test server's credentials and no endpoint of its own (a pytest MonkeyPatch)."""
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


def subprocess_env(endpoint_url: str, **extra: str) -> dict[str, str]:
    """Environment for a child process talking to the test S3 server."""
    env = {**os.environ, **TEST_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint_url, **extra}
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH", "")]))
    return env
