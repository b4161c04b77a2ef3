"""The reference HTTP service: an ASGI app (FastAPI, pydantic validation, Prometheus metrics) over an Engine.

Endpoints::

    POST /recommend  {"user": "u-1", "k": 10, "exclude_seen": true, "exclude": [..], "candidates": [..],
                      "context": {..}, "return_ids": false}
    POST /observe    {"user": "u-1", "items": ["sku-3", "sku-4"]}
    POST /swap       {"bundle": "/path/to/bundle"}     header "Authorization: Bearer <token>"
    GET  /healthz
    GET  /metrics    Prometheus text: requests and errors per endpoint, latency histograms per stage

Handlers are plain functions, so the server runs them in its thread pool, off the event loop: the core
releases the GIL in its kernels and ONNX Runtime in its sessions, so requests really run in parallel.
Users and items are the bundle's own keys (JSON strings or integers, as in the training data); a key of
the other type, or an unknown item key, gets 400 naming it; an unknown user gets the cold-start answer.
Invalid requests get a 4xx answer with a message; bodies larger than ``max_body`` bytes get 413.
Run it with ``rec-engine serve BUNDLE --port P`` (needs the ``serve`` extra).

Coalescing (``coalesce_us > 0``): concurrent single ``/recommend`` requests that can share a batch (same
``k``, ``exclude_seen`` and ``n_candidates``, no ``candidates``, no ``exclude``) are collected by a
:class:`Coalescer` for at most ``coalesce_us`` microseconds (or until ``max_batch`` have come) and answered
by one ``engine.recommend_batch`` call; each request still gets its own answer, and a batch that raises is
answered request by request, so one bad request gets its own 4xx and the others succeed.

Several processes (``serve(..., workers=N)``): uvicorn's own multi-process mode, the parent binding the
socket and N spawned workers accepting on it, each building its app with :func:`_app_from_env` from the
settings the parent put in the environment. Each worker opens the bundle itself; the tables are memory-
mapped, so the workers share them through the page cache. Each worker has its own online state: it replays
the event log at start and appends to it, but what one worker observes the others see only after a restart.
"""
from __future__ import annotations

import contextlib
import hmac
import inspect
import json
import os
import threading
import time
from typing import Any, Optional, Union

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Annotated

from ._core import RecEngineError
from .engine import Engine, Recommendation

MAX_ITEMS_PER_REQUEST = 10_000
MAX_KEY_LENGTH = 1024
# a user's or an item's own key: an integer within int64 or a string
Key = Union[Annotated[int, Field(ge=-2**63, lt=2**63)], Annotated[str, Field(max_length=MAX_KEY_LENGTH)]]
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SETTINGS_ENV = "REC_ENGINE_SERVE_SETTINGS"     # JSON settings the parent hands to its worker processes
ENGINE_ERRORS = (ValueError, TypeError, IndexError, RecEngineError)


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: Key
    k: int = Field(default=10, ge=0, le=MAX_ITEMS_PER_REQUEST)
    exclude_seen: bool = True
    exclude: Optional[list[Key]] = Field(default=None, max_length=MAX_ITEMS_PER_REQUEST)
    candidates: Optional[list[Key]] = Field(default=None, max_length=MAX_ITEMS_PER_REQUEST)
    context: Optional[dict[str, Any]] = None
    n_candidates: Optional[int] = Field(default=None, ge=1, le=MAX_ITEMS_PER_REQUEST)
    return_ids: bool = False


class ObserveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: Key
    items: list[Key] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    bundle: str = Field(min_length=1)


class _Batch:
    """Requests collected under one key; the first one (the leader) runs the batch."""

    __slots__ = ("users", "contexts", "results", "closed", "full", "done")

    def __init__(self):
        self.users: list = []
        self.contexts: list = []
        self.results: list = []      # per request: a Recommendation, or None (answer it with a single call)
        self.closed = False
        self.full = threading.Event()
        self.done = threading.Event()


class Coalescer:
    """Answers concurrent single requests that can share a batch with one ``engine.recommend_batch`` call.

    A request that finds no open batch for its key ``(k, exclude_seen, n_candidates)`` opens one and leads
    it: it waits until ``max_batch`` requests have joined or ``window_us`` microseconds have passed since
    it came (whichever is first; this bounds the wait a request adds), closes the batch and calls
    ``engine.recommend_batch(users, k, exclude_seen=..., n_candidates=..., contexts=[...])``; the requests
    that joined wait for that call. Each request gets its own :class:`~rec_engine.engine.Recommendation`,
    the one ``engine.recommend`` would give. A batch whose call raises is answered request by request
    (each in its own thread), so an error belongs to the request that caused it. A lone request is
    answered by ``engine.recommend`` directly. Engines whose ``recommend_batch`` takes no per-user
    ``contexts`` get batches only when every request of the batch has the same context.

    ``idle_start`` (default): a request that finds no other request in the coalescer starts at once
    instead of waiting the window, since nothing could join it (one client pays no added wait); requests
    that arrive while others are in flight wait as above.

    Thread-safe; it keeps no thread of its own (the callers' threads do the work). ``stats`` counts
    ``batches`` (batch calls), ``batched`` (requests answered by them), ``singles`` and ``fallbacks``
    (batches answered request by request after their call raised or could not be made).
    """

    def __init__(self, engine: Engine, *, window_us: int, max_batch: int = 32, on_batch=None,
                 idle_start: bool = True):
        if isinstance(window_us, bool) or not isinstance(window_us, int) or window_us < 0:
            raise ValueError(f"window_us must be an integer >= 0, got {window_us!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.engine, self.window_s, self.max_batch = engine, window_us / 1e6, max_batch
        self.on_batch = on_batch                     # called with each batch's size (metrics)
        self._lock = threading.Lock()
        self._open: dict = {}
        self.idle_start = bool(idle_start)
        self._inflight = 0                           # requests inside recommend()
        self.stats = {"batches": 0, "batched": 0, "singles": 0, "fallbacks": 0}
        try:
            params = inspect.signature(engine.recommend_batch).parameters
            self.per_user_contexts = "contexts" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            self.per_user_contexts = False

    def recommend(self, user, k: int = 10, *, exclude_seen: bool = True, n_candidates: int | None = None,
                  context=None) -> Recommendation:
        """What ``engine.recommend(user, k, exclude_seen=..., n_candidates=..., context=...)`` returns."""
        if self.window_s == 0 or self.max_batch == 1:
            return self._single(user, k, exclude_seen, n_candidates, context)
        key = (k, exclude_seen, n_candidates)
        with self._lock:
            alone = self.idle_start and self._inflight == 0 and not self._open
            self._inflight += 1
        try:
            if alone:
                return self._single(user, k, exclude_seen, n_candidates, context)
            return self._coalesced(key, user, k, exclude_seen, n_candidates, context)
        finally:
            with self._lock:
                self._inflight -= 1

    def _coalesced(self, key, user, k, exclude_seen, n_candidates, context) -> Recommendation:
        with self._lock:
            batch = self._open.get(key)
            leader = batch is None
            if leader:
                batch = self._open[key] = _Batch()
            slot = len(batch.users)
            batch.users.append(user)
            batch.contexts.append(context)
            if len(batch.users) >= self.max_batch:
                self._close(key, batch)
                batch.full.set()
        if leader:
            batch.full.wait(self.window_s)
            with self._lock:
                self._close(key, batch)
            self._run(batch, k, exclude_seen, n_candidates)
        else:
            batch.done.wait()
        rec = batch.results[slot]
        if rec is None:
            return self._single(user, k, exclude_seen, n_candidates, context)
        return rec

    def _close(self, key, batch: _Batch) -> None:
        if not batch.closed:
            batch.closed = True
            if self._open.get(key) is batch:
                del self._open[key]

    def _single(self, user, k, exclude_seen, n_candidates, context) -> Recommendation:
        with self._lock:
            self.stats["singles"] += 1
        return self.engine.recommend(user, k, exclude_seen=exclude_seen, n_candidates=n_candidates,
                                     context=context)

    def _run(self, batch: _Batch, k, exclude_seen, n_candidates) -> None:
        """Answer the closed ``batch`` (slot 0 is the leader's); never raises."""
        n = len(batch.users)
        results: list = [None] * n
        try:
            if n > 1:
                if self.per_user_contexts:
                    opts = {"contexts": batch.contexts}
                elif all(c == batch.contexts[0] for c in batch.contexts):
                    opts = {"context": batch.contexts[0]}
                else:
                    opts = None
                if opts is not None:
                    try:
                        got = self.engine.recommend_batch(batch.users, k, exclude_seen=exclude_seen,
                                                          n_candidates=n_candidates, **opts)
                        if len(got) == n:
                            results = list(got)
                    except Exception:       # noqa: BLE001 - answered request by request below
                        pass
                with self._lock:
                    if results[0] is not None:
                        self.stats["batches"] += 1
                        self.stats["batched"] += n
                    else:
                        self.stats["fallbacks"] += 1
                if results[0] is not None and self.on_batch is not None:
                    self.on_batch(n)
        finally:
            batch.results = results
            batch.done.set()


def create_app(engine: Engine, *, token: str | None = None, max_body: int = 1 << 20, coalesce_us: int = 0,
               max_batch: int = 32, swap_refusal: str | None = None, close_engine: bool = False,
               coalesce_idle_start: bool = True) -> FastAPI:
    """The ASGI app serving ``engine``.

    ``token`` guards ``/swap`` (no token: swapping over HTTP is off; ``swap_refusal``: always refused with
    409 and that message). ``coalesce_us > 0`` coalesces concurrent single ``/recommend`` requests into
    batches of up to ``max_batch`` (see :class:`Coalescer`; ``coalesce_idle_start``: its ``idle_start``). ``close_engine``: close the engine when the
    server shuts down (the app owns it)."""
    lifespan = None
    if close_engine:
        @contextlib.asynccontextmanager
        async def lifespan(_app):
            try:
                yield
            finally:
                engine.close()
    app = FastAPI(title="rec_engine", docs_url=None, redoc_url=None, lifespan=lifespan)
    registry = CollectorRegistry()
    requests = Counter("rec_engine_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                       registry=registry)
    errors = Counter("rec_engine_errors", "Requests that failed, by endpoint", ["endpoint"], registry=registry)
    latency = Histogram("rec_engine_latency_seconds", "Latency by stage (retrieval, ranking, total, http)",
                        ["stage"], buckets=_BUCKETS, registry=registry)
    batch_size = Histogram("rec_engine_batch_size", "Requests answered by one coalesced recommend_batch call",
                           buckets=_BATCH_BUCKETS, registry=registry)
    coalescer = (Coalescer(engine, window_us=coalesce_us, max_batch=max_batch, on_batch=batch_size.observe,
                           idle_start=coalesce_idle_start)
                 if coalesce_us > 0 else None)
    app.state.engine = engine
    app.state.registry = registry
    app.state.coalescer = coalescer

    @app.middleware("http")
    async def bound_and_count(request: Request, call_next):
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            response = JSONResponse({"detail": f"request body larger than {max_body} bytes"}, status_code=413)
        elif length is None and request.method == "POST":
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body:
                    break
            if len(body) > max_body:
                response = JSONResponse({"detail": f"request body larger than {max_body} bytes"}, status_code=413)
            else:
                async def receive(b=body):
                    return {"type": "http.request", "body": b, "more_body": False}
                response = await call_next(Request(request.scope, receive))
        else:
            response = await call_next(request)
        endpoint = request.url.path
        requests.labels(endpoint, str(response.status_code)).inc()
        if response.status_code >= 400:
            errors.labels(endpoint).inc()
        latency.labels("http").observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        msgs = ["/".join(str(p) for p in e.get("loc", ())) + ": " + e.get("msg", "") for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(msgs)}, status_code=422)

    def _bad(e: Exception) -> HTTPException:
        return HTTPException(400, detail=f"{type(e).__name__}: {e}")

    @app.post("/recommend")
    def recommend(req: RecommendRequest):
        try:
            if coalescer is not None and req.candidates is None and not req.exclude:
                rec = coalescer.recommend(req.user, req.k, exclude_seen=req.exclude_seen,
                                          n_candidates=req.n_candidates, context=req.context)
            else:
                rec = engine.recommend(req.user, req.k, exclude_seen=req.exclude_seen, exclude=req.exclude,
                                       candidates=req.candidates, context=req.context,
                                       n_candidates=req.n_candidates)
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        for stage in ("retrieval", "ranking", "total"):
            if f"{stage}_ms" in rec.timings:
                latency.labels(stage).observe(rec.timings[f"{stage}_ms"] / 1e3)
        keep = rec.ids >= 0
        out = {"user": rec.user, "items": rec.items[keep].tolist(), "scores": rec.scores[keep].tolist(),
               "version": rec.version, "fallback": rec.fallback, "timings": rec.timings}
        if req.return_ids:
            out["ids"] = rec.ids[keep].tolist()
        return out

    @app.post("/observe")
    def observe(req: ObserveRequest):
        try:
            engine.observe(req.user, req.items)
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        return {"user": req.user, "observed": len(req.items)}

    @app.post("/swap")
    def swap(req: SwapRequest, authorization: Optional[str] = Header(default=None)):
        if swap_refusal is not None:
            raise HTTPException(409, detail=swap_refusal)
        if token is None:
            raise HTTPException(403, detail="swapping over HTTP is disabled (start the server with a token)")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, detail="a valid 'Authorization: Bearer <token>' header is required")
        try:
            version = engine.swap(req.bundle)
        except (OSError, ValueError, KeyError, RecEngineError) as e:
            raise HTTPException(422, detail=f"swap failed, still serving {engine.version}: {e}") from None
        return {"version": version}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "version": engine.version, "items": engine.n_items, "pid": os.getpid()}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


_MULTI_WORKER_SWAP = ("swapping over HTTP is off with several worker processes (a swap would reach one of "
                      "them): restart the server with the new bundle")


def _app_from_env() -> FastAPI:
    """The app of one worker process: settings from the environment variable ``REC_ENGINE_SERVE_SETTINGS``
    (JSON, written by :func:`serve`), the engine loaded here, closed when the worker shuts down. The
    factory ``uvicorn.run("rec_engine.service:_app_from_env", factory=True, workers=N)`` calls."""
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: start workers with rec-engine serve --workers N")
    cfg = json.loads(raw)
    engine = Engine.load(cfg["bundle"], event_log=cfg.get("event_log"), ort_threads=cfg.get("ort_threads", 1),
                         num_threads=cfg.get("num_threads", 1), index=cfg.get("index"),
                         ranking_precision=cfg.get("ranking_precision"), scan_memory=cfg.get("scan_memory", "mmap"))
    return create_app(engine, max_body=cfg.get("max_body", 1 << 20), coalesce_us=cfg.get("coalesce_us", 0),
                      max_batch=cfg.get("max_batch", 32), swap_refusal=_MULTI_WORKER_SWAP, close_engine=True)


def serve(bundle: str, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          event_log: str | None = None, ort_threads: int = 1, num_threads: int | None = 1,
          max_body: int = 1 << 20, workers: int = 1, coalesce_us: int = 0, max_batch: int = 32,
          log_level: str = "info", index: str | None = None, ranking_precision: str | None = None,
          scan_memory: str | None = None) -> None:
    """Load ``bundle`` and serve it with uvicorn until interrupted (``index``, ``ranking_precision``,
    ``scan_memory``: the :class:`~rec_engine.engine.Engine` options of those names; ``scan_memory`` defaults
    to ``"copy"`` for one worker, ``"mmap"`` for several, which then share the scanned table).

    ``workers=1``: one process (the engine loaded here). ``workers=N > 1``: uvicorn's multi-process mode,
    N spawned worker processes accepting on the socket this process binds; each builds its app with
    :func:`_app_from_env` (the tables are memory-mapped, so the workers share them through the page cache;
    each keeps its own online state, replaying and appending to ``event_log``; ``/swap`` is refused with 409,
    since it would reach one worker: restart with the new bundle).
    """
    import uvicorn

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if isinstance(coalesce_us, bool) or not isinstance(coalesce_us, int) or coalesce_us < 0:
        raise ValueError(f"coalesce_us must be an integer >= 0, got {coalesce_us!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if workers == 1:
        engine = Engine.load(bundle, event_log=event_log, ort_threads=ort_threads, num_threads=num_threads,
                             index=index, ranking_precision=ranking_precision, scan_memory=scan_memory or "copy")
        try:
            app = create_app(engine, token=token, max_body=max_body, coalesce_us=coalesce_us, max_batch=max_batch)
            uvicorn.run(app, host=host, port=port, log_level=log_level)
        finally:
            engine.close()
        return
    from .bundle import INDEX_PRECISIONS, open_bundle

    open_bundle(bundle, verify=False)          # a wrong path fails here, once, not in every worker
    if index is not None and index not in INDEX_PRECISIONS:
        raise ValueError(f"index must be one of {INDEX_PRECISIONS}, got {index!r}")
    if scan_memory not in (None, "copy", "mmap"):
        raise ValueError(f"scan_memory must be 'copy' or 'mmap', got {scan_memory!r}")
    if ranking_precision not in (None, "float32", "int8"):
        raise ValueError(f"ranking_precision must be 'float32' or 'int8', got {ranking_precision!r}")
    os.environ[SETTINGS_ENV] = json.dumps({
        "bundle": os.path.abspath(bundle), "event_log": None if event_log is None else os.path.abspath(event_log),
        "ort_threads": ort_threads, "num_threads": num_threads, "max_body": max_body, "coalesce_us": coalesce_us,
        "max_batch": max_batch, "index": index, "ranking_precision": ranking_precision,
        "scan_memory": scan_memory or "mmap"})
    uvicorn.run("rec_engine.service:_app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level)
