"""What stands between the network and the HTTP app: tokens, a per-client rate limit, the request body's size
and read deadline (an ASGI middleware, :class:`Guard`), and a deadline on a connection's request headers
(a uvicorn protocol, :func:`protocol_class`).

Policy (see the README's "Security" section):

- **Write endpoints** (``WRITE_PATHS``: observe, feedback, forget, swap, A/B, catalogue changes) need the
  write token (``Authorization: Bearer <token>``) when one is set. Without one, ``/observe`` and
  ``/feedback`` are open (a loopback development server) and the admin endpoints answer 403 (disabled).
- **Reads** (recommend, similar items and users, profiles, metrics) need the read token or the write token
  when a read token is set. ``/healthz`` and ``/openapi.json`` are always open.
- **Rate limit:** a token bucket per client address, ``rate`` requests a second with bursts of ``burst``;
  past it, 429 with ``Retry-After``. At most ``max_clients`` buckets are kept (least recently used dropped).
- **Body:** 413 past ``max_body`` bytes, announced (``Content-Length``) or not (chunked); 408 and the
  connection closed when the whole body has not arrived within ``body_timeout_s``. The body is read here and
  handed to the app whole, so a slow client never holds a worker thread.
- **Headers:** a connection that has not sent a complete request head within ``header_timeout_s`` of
  connecting (or of starting its next request) is closed (uvicorn has no such deadline of its own).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import threading
import time
from collections import OrderedDict

WRITE_PATHS = frozenset({"/observe", "/feedback", "/forget", "/swap", "/ab", "/items", "/items/remove"})
OPEN_PATHS = frozenset({"/healthz", "/openapi.json"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _bearer(scope) -> str | None:
    for k, v in scope["headers"]:
        if k == b"authorization":
            got = v.decode("latin-1").strip()
            return got[7:].strip() if got[:7].lower() == "bearer " else got
    return None


def _same(given: str | None, want: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), want.encode())


class RateLimiter:
    """Token buckets per client key: ``rate`` a second, up to ``burst`` at once. Thread-safe."""

    def __init__(self, rate: float, burst: float | None = None, max_clients: int = 65536):
        if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        burst = max(1.0, float(rate)) if burst is None else burst
        if not (isinstance(burst, (int, float)) and not isinstance(burst, bool) and math.isfinite(burst)
                and burst >= 1):
            raise ValueError(f"burst must be a finite number >= 1, got {burst!r}")
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise ValueError(f"max_clients must be an integer >= 1, got {max_clients!r}")
        self.rate, self.burst, self.max_clients = float(rate), float(burst), max_clients
        self._buckets: OrderedDict = OrderedDict()     # client -> (tokens, last refill time)
        self._lock = threading.Lock()

    def take(self, client, now: float | None = None) -> float:
        """Spend one token of ``client``: 0.0 if allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait

    def __len__(self) -> int:
        return len(self._buckets)


async def _answer(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware enforcing the module's policy in front of ``app``."""

    def __init__(self, app, *, token: str | None = None, read_token: str | None = None, max_body: int = 1 << 20,
                 body_timeout_s: float | None = 30.0, rate: float | None = None, burst: float | None = None,
                 max_clients: int = 65536):
        for name, value in (("token", token), ("read_token", read_token)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None")
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
            raise ValueError(f"max_body must be an integer >= 1, got {max_body!r}")
        if body_timeout_s is not None and not (isinstance(body_timeout_s, (int, float)) and body_timeout_s > 0
                                               and math.isfinite(body_timeout_s)):
            raise ValueError(f"body_timeout_s must be a finite number > 0 or None, got {body_timeout_s!r}")
        self.app, self.token, self.read_token = app, token, read_token
        self.max_body, self.body_timeout_s = max_body, body_timeout_s
        self.limiter = RateLimiter(rate, burst, max_clients) if rate is not None else None

    def refusal(self, scope) -> tuple[int, str] | None:
        """(status, message) when the request of ``scope`` (its path and headers) lacks a token it needs."""
        path = scope["path"]
        if path in OPEN_PATHS:
            return None
        given = _bearer(scope)
        if path in WRITE_PATHS:
            want = self.token if self.token is not None else self.read_token
            if want is not None and not _same(given, want):
                return 401, "a valid 'Authorization: Bearer <token>' header (the write token) is required"
        elif self.read_token is not None:
            if not (_same(given, self.read_token) or (self.token is not None and _same(given, self.token))):
                return 401, "a valid 'Authorization: Bearer <token>' header (the read token) is required"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.limiter is not None and scope["path"] not in OPEN_PATHS:
            client = (scope.get("client") or ("?", 0))[0]
            wait = self.limiter.take(client)
            if wait > 0:
                return await _answer(send, 429, f"rate limit of {self.limiter.rate:g} requests/s per client "
                                                f"exceeded; retry after {wait:.3f} s",
                                     [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
        refused = self.refusal(scope)
        if refused is not None:
            return await _answer(send, *refused, [(b"www-authenticate", b"Bearer")])
        if scope["method"] not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _answer(send, 413, f"request body larger than {self.max_body} bytes")
        chunks, size, more = [], 0, True
        deadline = None if self.body_timeout_s is None else time.monotonic() + self.body_timeout_s
        while more:                                     # the whole body, bounded in size and in time
            try:
                if deadline is None:
                    msg = await receive()
                else:
                    msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                return await _answer(send, 408, f"request body not received within {self.body_timeout_s:g} s",
                                     [(b"connection", b"close")])
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _answer(send, 413, f"request body larger than {self.max_body} bytes")
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()                      # afterwards: the client's disconnect, if any

        return await self.app(scope, replay, send)


_PROTOCOLS: dict = {}


def protocol_class(header_timeout_s: float = 10.0):
    """A uvicorn HTTP protocol class (uvicorn's own: httptools' when installed, else h11's) that closes a
    connection whose request head is not complete within ``header_timeout_s`` of its first byte, or of
    connecting. Classes are made once per timeout and are module attributes, so they pickle by name (uvicorn's
    worker processes receive them)."""
    if not (isinstance(header_timeout_s, (int, float)) and not isinstance(header_timeout_s, bool)
            and math.isfinite(header_timeout_s) and header_timeout_s > 0):
        raise ValueError(f"header_timeout_s must be a finite number > 0, got {header_timeout_s!r}")
    key = max(1, round(float(header_timeout_s) * 1000))          # milliseconds
    if key in _PROTOCOLS:
        return _PROTOCOLS[key]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        import httptools  # noqa: F401
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeaderDeadline(base):
        _header_timeout_s = key / 1000.0

        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(self._header_timeout_s, self._head_overdue)
            self._seen_cycle = None

        def _head_overdue(self):
            self._head_timer = None
            if self.cycle is self._seen_cycle or self.cycle is None:       # no new request head completed
                self.transport.close()

        def data_received(self, data):
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(self._header_timeout_s, self._head_overdue)
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._seen_cycle:     # a request head is complete
                self._seen_cycle = self.cycle
                if self._head_timer is not None:
                    self._head_timer.cancel()
                    self._head_timer = None

        def connection_lost(self, exc):
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    name = f"HeaderDeadline_{key}ms"
    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = name
    globals()[name] = HeaderDeadline
    _PROTOCOLS[key] = HeaderDeadline
    return HeaderDeadline


def __getattr__(name: str):
    """``HeaderDeadline_<N>ms`` classes are made on first use, also when a worker process unpickles one."""
    if name.startswith("HeaderDeadline_") and name.endswith("ms") and name[15:-2].isdigit():
        return protocol_class(int(name[15:-2]) / 1000.0)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bundle_under(path, root) -> str:
    """``path`` resolved (symlinks followed), if it lies under ``root``; else PermissionError."""
    real, top = os.path.realpath(os.fspath(path)), os.path.realpath(os.fspath(root))
    if os.path.commonpath([real, top]) != top:
        raise PermissionError(f"bundles are loaded only from under {top} (the server's bundle root); "
                              f"{os.fspath(path)!r} is not")
    return real
