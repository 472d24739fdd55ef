"""``/healthz`` and ``/readyz`` next to ``/metrics``, on the gateway's metrics port.

- ``/healthz`` (liveness): the process's event loop runs: a task of the gateway ticks every
  second and the answer is 503 once no tick came for :data:`LIVENESS_TIMEOUT_S`. A standby is
  alive. A supervisor restarts a process that fails it.
- ``/readyz`` (readiness): this gateway holds its region's lease and reached its region's Redis
  (renewing the lease) within the lease's TTL. 503 for a standby, while draining, and while the
  region's Redis does not answer.

Both answer with a small JSON object saying why. See the README, "Operating it", for Kubernetes.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
import msgspec
from prometheus_client import CollectorRegistry, make_wsgi_app

LIVENESS_TIMEOUT_S = 10.0
TICK_S = 1.0

StartResponse = Callable[..., Any]


class Health:
    """What the gateway tells the health endpoints; read from the HTTP server's threads."""

    def __init__(self, lease_ttl_ms: int) -> None:
        self.lease_ttl_s = lease_ttl_ms / 1000
        self.lease_held = False
        self.draining = False
        self._reached_at: float | None = None
        self._tick_at = time.monotonic()

    def tick(self) -> None:
        self._tick_at = time.monotonic()

    def reached(self) -> None:
        """The region's Redis answered (a lease taken or renewed)."""
        self._reached_at = time.monotonic()

    async def keep_ticking(self) -> None:
        while True:
            self.tick()
            await anyio.sleep(TICK_S)

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        silent_s = time.monotonic() - self._tick_at
        return silent_s < LIVENESS_TIMEOUT_S, {"event_loop_silent_seconds": round(silent_s, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        since = None if self._reached_at is None else time.monotonic() - self._reached_at
        redis_ok = since is not None and since < self.lease_ttl_s
        detail: dict[str, Any] = {
            "lease_held": self.lease_held,
            "redis_reached_seconds_ago": None if since is None else round(since, 3),
            "draining": self.draining,
        }
        return self.lease_held and redis_ok and not self.draining, detail


def health_app(health: Health, registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: ``/healthz``, ``/readyz``, and the metrics on every other path."""
    metrics_app = make_wsgi_app(registry)
    checks = {"/healthz": health.liveness, "/readyz": health.readiness}

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        ok, detail = check()
        body = msgspec.json.encode({"ok": ok, **detail}) + b"\n"
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json")])
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: probes every few seconds would drown the gateway's own lines."""


def serve_http(
    app: Callable[..., Iterable[bytes]], host: str, port: int
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``app`` on ``host:port`` from a daemon thread; raises OSError if it cannot bind."""
    server_class = _Server6 if ":" in host else _Server
    server = make_server(host, port, app, server_class, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="invalgw-http", daemon=True)
    thread.start()
    return server, thread
