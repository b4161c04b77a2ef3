"""The reference HTTP service: an ASGI app (FastAPI, pydantic validation, Prometheus metrics) over an Engine.

Endpoints::

    POST /recommend  {"user": "u-1", "k": 10, "exclude_seen": true, "exclude": [..], "candidates": [..],
                      "context": {..}, "return_ids": false}
    POST /observe    {"user": "u-1", "items": ["sku-3", "sku-4"], "kind": "click", "request_id": ".."}
    POST /feedback   {"user": "u-1", "item": "sku-3", "kind": "click"|"conversion"|"rating",
                      "request_id": "..", "value": 9.5}
    POST /swap       {"bundle": "/path/to/bundle"}     header "Authorization: Bearer <token>"
    POST /ab         {"bundle": "/path/to/candidate", "fraction": 0.1}   (token; bundle null: stop)
    POST /forget     {"user": "u-1"}                   (token) erase the user's events and online state
    POST /items      {"items": [{"key": "sku-new", "vector": [..] | "text": "..", "features": {..}}]}  (token)
    POST /items/remove {"items": ["sku-3"]}           (token) withdraw items: never returned again
    POST /similar_items {"item": "sku-3", "k": 10, "by": "collaborative" | "content" | "blend"}
    POST /similar_users {"user": "u-1", "k": 10}        users nearest by their vectors (people to follow)
    GET  /healthz
    GET  /metrics    Prometheus text: requests and errors per endpoint, latency histograms per stage, and
                     per model version: recommendations, items shown, feedback by kind, coverage, novelty

A ``/recommend`` answer carries its ``request_id``; feedback that passes it is tied to that impression
(and counted for the version that served it). Request bodies are never logged nor put in metrics.

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
import math
import inspect
import json
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from typing_extensions import Annotated

from ._core import RecEngineError
from .engine import Engine, Recommendation, version_tag
from .http_guard import OPEN_PATHS, WRITE_PATHS, Guard, bundle_under, protocol_class

MAX_ITEMS_PER_REQUEST = 10_000
MAX_KEY_LENGTH = 1024
# a user's or an item's own key: an integer within int64 or a string
Key = Union[Annotated[int, Field(ge=-2**63, lt=2**63)], Annotated[str, Field(max_length=MAX_KEY_LENGTH)]]
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SETTINGS_ENV = "REC_ENGINE_SERVE_SETTINGS"     # JSON settings the parent hands to its worker processes
ENGINE_ERRORS = (ValueError, TypeError, IndexError, RecEngineError)


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"user": 12, "k": 5,
                                                               "context": {"hour": 9.0, "device": "android"}}]})
    user: Key
    k: int = Field(default=10, ge=0, le=MAX_ITEMS_PER_REQUEST)
    exclude_seen: bool = True
    exclude: Optional[list[Key]] = Field(default=None, max_length=MAX_ITEMS_PER_REQUEST)
    candidates: Optional[list[Key]] = Field(default=None, max_length=MAX_ITEMS_PER_REQUEST)
    context: Optional[dict[str, Any]] = None
    n_candidates: Optional[int] = Field(default=None, ge=1, le=MAX_ITEMS_PER_REQUEST)
    return_ids: bool = False
    diversity: Optional[float] = Field(default=None, ge=0, le=1)
    debias: Optional[float] = Field(default=None, ge=0, le=1)
    explore: Optional[float] = Field(default=None, ge=0, le=1)
    explain: bool = False

    @field_validator("context")
    @classmethod
    def _finite_context(cls, context):
        """Context values are strings, booleans, finite numbers (below 1e300 in size) or lists of them."""
        for name, value in (context or {}).items():
            for x in (value if isinstance(value, list) else [value]):
                if isinstance(x, float) and not (math.isfinite(x) and abs(x) < 1e300):
                    raise ValueError(f"context[{name!r}] must be a finite number below 1e300 in size, got {x}")
                if not isinstance(x, (str, bool, int, float)) and x is not None:
                    raise ValueError(f"context[{name!r}] holds a {type(x).__name__}: values are strings, "
                                     f"numbers, booleans or lists of them")
        return context


FeedbackKind = Literal["click", "conversion", "rating"]
RequestId = Annotated[str, Field(min_length=1, max_length=128)]


class ObserveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"user": 12, "items": [3, 4], "kind": "click"}]})
    user: Key
    items: list[Key] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)
    kind: FeedbackKind = "click"
    request_id: Optional[RequestId] = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"user": 12, "item": 3, "kind": "rating", "value": 4.5}]})
    user: Key
    item: Key
    kind: FeedbackKind = "click"
    request_id: Optional[RequestId] = None
    value: Optional[Annotated[float, Field(allow_inf_nan=False)]] = None


class SimilarItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"item": 3, "k": 5}]})
    item: Key
    k: int = Field(default=10, ge=0, le=MAX_ITEMS_PER_REQUEST)
    by: Literal["collaborative", "content", "blend"] = "collaborative"
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    exclude: Optional[list[Key]] = Field(default=None, max_length=MAX_ITEMS_PER_REQUEST)


class SimilarUsersRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"user": 12, "k": 5}]})
    user: Key
    k: int = Field(default=10, ge=0, le=MAX_ITEMS_PER_REQUEST)


_F32_MAX = 3.4e38     # a vector's values must fit a float32 (larger ones would become inf)


class NewItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    key: Key
    vector: Optional[list[Annotated[float, Field(allow_inf_nan=False, ge=-_F32_MAX, le=_F32_MAX)]]] = Field(
        default=None, min_length=1, max_length=4096)
    text: Optional[str] = Field(default=None, max_length=100_000)
    features: Optional[dict[str, Any]] = None


class AddItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"items": [{"key": 100000}]}]})
    items: list[NewItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)

    @model_validator(mode="after")
    def _one_dimension(self):
        """The items' vectors are one table: the same length for all."""
        dims = {len(it.vector) for it in self.items if it.vector is not None}
        if len(dims) > 1:
            raise ValueError(f"items: the vectors have different lengths {sorted(dims)}; give one length for all")
        return self


class RemoveItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"items": [7]}]})
    items: list[Key] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


class ForgetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"user": 12}]})
    user: Key


class AbRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"bundle": "/srv/bundles/candidate", "fraction": 0.1}]})
    bundle: Optional[str] = Field(default=None, min_length=1)
    fraction: float = Field(default=0.0, ge=0.0, le=1.0)


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"bundle": "/srv/bundles/v2"}]})
    bundle: str = Field(min_length=1)


# ---- the published schema (/openapi.json): what every answer looks like
OutKey = Union[int, str]          # a key in an answer: the bundle's own, as stored
# a (name, weight) pair as a two-element array (no tuple schema: prefixItems is not read by every OpenAPI tool)
_Pair = Annotated[list[Union[str, float]], Field(min_length=2, max_length=2)]


class ErrorResponse(BaseModel):
    """Every error answer (4xx), whichever layer gives it: the message as a string."""
    detail: str


class RecommendResponse(BaseModel):
    user: OutKey
    items: list[OutKey]
    scores: list[float]
    version: str
    request_id: Optional[str]
    fallback: bool
    timings: dict[str, float]
    ids: Optional[list[int]] = Field(default=None, description="dense item ids (return_ids)")
    explored: Optional[list[int]] = Field(default=None, description="positions of explored items")
    explanations: Optional[list[list[_Pair]]] = Field(
        default=None, description="per item: (tag, contribution) pairs (explain)")


class ProfileResponse(BaseModel):
    user: OutKey
    now: float
    tags: list[_Pair]
    vectors: dict[str, list[float]]
    counts: dict[str, int]
    first_ts: float
    last_ts: float
    n_positive: int


class ObserveResponse(BaseModel):
    user: OutKey
    observed: int


class FeedbackResponse(BaseModel):
    user: OutKey
    kind: FeedbackKind


class SimilarItemsResponse(BaseModel):
    item: OutKey
    items: list[OutKey]
    scores: list[float]
    version: str


class SimilarUsersResponse(BaseModel):
    user: OutKey
    users: list[OutKey]
    scores: list[float]
    version: str


class ForgetResponse(BaseModel):
    user: OutKey
    events_erased: int


class AddItemsResponse(BaseModel):
    added: int
    items: int = Field(description="items in the catalogue now")


class RemoveItemsResponse(BaseModel):
    removed: int


class AbResponse(BaseModel):
    ab: Optional[dict[str, Any]] = Field(description="control, candidate and fraction; null: no A/B serving")
    version: str


class SwapResponse(BaseModel):
    version: str


class HealthResponse(BaseModel):
    status: Literal["ok"]
    version: str
    items: int
    pid: int
    ab: Optional[dict[str, Any]]


_ERRORS = {
    400: "a key of the wrong type, an unknown item, a value the model refuses, or a body that cannot be "
         "parsed (not UTF-8)",
    401: "a valid 'Authorization: Bearer <token>' header is required (the write token for writes; the read "
         "token, or the write token, for reads when the server has a read token)",
    403: "disabled: the server has no write token, or the bundle lies outside the server's bundle root",
    404: "no such profile (the user has fewer events than the profile minimum)",
    408: "the request body was not received in time (the connection is closed)",
    409: "refused: the server runs several worker processes",
    413: "the request body is larger than the server's limit",
    422: "the request is invalid (its fields, their types or ranges), or the bundle did not load",
    429: "rate limited: retry after the Retry-After header's seconds",
}
_GUARDED = (401, 408, 413, 429)   # the guard in front of the app may answer these on every route but /healthz


def _doc(ok: type[BaseModel] | None, *codes: int) -> dict:
    """``responses=`` of a route: its 200 answer's model and, for each status, the error shape (a JSON
    object with a string ``detail``; explicit content, so a route whose 200 is not JSON keeps JSON errors)."""
    out: dict = {} if ok is None else {200: {"model": ok}}
    for code in sorted(set(codes)):
        out[code] = {"description": _ERRORS[code],
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        if code == 429:
            out[code]["headers"] = {"Retry-After": {"description": "seconds to wait", "required": True,
                                                    "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    return out


class _PrometheusText(Response):
    """/metrics: Prometheus' text exposition format (a string)."""
    media_type = CONTENT_TYPE_LATEST


def _publish_schema(app: FastAPI) -> None:
    """``app.openapi()`` made to agree with the answers: the string-detail error model in place of FastAPI's
    list-shaped 422 (our handler replaces it), the bearer scheme and ``security`` per operation (required on
    writes, optional on reads: needed when the server has a read token)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        doc["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer", "description": _ERRORS[401]}}
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                if path not in OPEN_PATHS:
                    op["security"] = [{"bearer": []}] if path in WRITE_PATHS else [{"bearer": []}, {}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


class _Counting:
    """Plain ASGI middleware that calls ``record(path, status, seconds)`` once per HTTP request, when its
    answer has been sent (500 when the app raised before answering); Starlette's ``@app.middleware("http")``
    would run the app in a task of its own and stream every answer through a copy."""

    def __init__(self, app, *, record):
        self.app, self.record = app, record

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            self.record(scope["path"], status[0], time.perf_counter() - t0)


class _Batch:
    """Requests collected under one key; the first one (the leader) runs the batch."""

    __slots__ = ("users", "contexts", "results", "closed", "done")

    def __init__(self):
        self.users: list = []
        self.contexts: list = []
        self.results: list = []      # per request: a Recommendation, or None (answer it with a single call)
        self.closed = False
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
    answered by ``engine.recommend`` directly, or by ``recommend_batch`` of one when the engine gives
    batches other threads than single calls (``batch_threads``: then it gets the batches' cores). Engines
    whose ``recommend_batch`` takes no per-user ``contexts`` get batches only when every request of the
    batch has the same context.

    ``idle_start`` (default): a request that finds no other request in the coalescer starts at once
    instead of waiting the window, since nothing could join it (one client pays no added wait); requests
    that arrive while others are in flight wait as above, but an open batch also starts as soon as no call
    of this coalescer is running any more: waiting on would leave the cores idle, and what the running
    calls' clients send next joins the next batch. So under load one call runs at a time with every core
    the engine gives batches (``Engine(batch_threads=...)``), each batch holding what came during the
    previous call, and no request waits longer than the window for its batch to start.

    ``linger_us`` (default: the window, at most 5 ms): after a call answers ``n`` requests, a batch that could
    start because nothing runs waits until ``n`` more requests have come in, or ``linger_us`` has passed since
    that answer: clients that wait for their answer before sending again (every HTTP client with a fixed number
    of connections) come back together, and then share a batch instead of taking turns one by one. A lone
    client's next request is the one awaited, so it starts at once; 0 turns this off.

    Thread-safe; it keeps no thread of its own (the callers' threads do the work). ``stats`` counts
    ``batches`` (batch calls), ``batched`` (requests answered by them), ``singles`` and ``fallbacks``
    (batches answered request by request after their call raised or could not be made).
    """

    def __init__(self, engine: Engine, *, window_us: int, max_batch: int = 32, on_batch=None,
                 idle_start: bool = True, linger_us: int | None = None):
        if isinstance(window_us, bool) or not isinstance(window_us, int) or window_us < 0:
            raise ValueError(f"window_us must be an integer >= 0, got {window_us!r}")
        if linger_us is None:
            linger_us = min(window_us, 5000)
        if isinstance(linger_us, bool) or not isinstance(linger_us, int) or linger_us < 0:
            raise ValueError(f"linger_us must be an integer >= 0, got {linger_us!r}")
        self.linger_s = linger_us / 1e6
        self._expect, self._expect_until = 0, 0.0    # requests awaited after the last answer, until when
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.engine, self.window_s, self.max_batch = engine, window_us / 1e6, max_batch
        self.on_batch = on_batch                     # called with each batch's size (metrics)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a call ends or a batch fills up
        self._open: dict = {}
        self.idle_start = bool(idle_start)
        self._running = 0                            # engine calls running (singles and batches)
        self.stats = {"batches": 0, "batched": 0, "singles": 0, "fallbacks": 0}
        # a lone request goes through recommend_batch too when the engine gives batches more threads
        nt, bt = getattr(engine, "num_threads", None), getattr(engine, "batch_threads", None)
        self._lone_batch = bt is not None and bt != nt
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
        return self._coalesced((k, exclude_seen, n_candidates), user, k, exclude_seen, n_candidates, context)

    def _coalesced(self, key, user, k, exclude_seen, n_candidates, context) -> Recommendation:
        with self._lock:
            if self._expect > 0:                     # one of the clients awaited after the last answer
                self._expect -= 1
                if self._expect == 0:
                    self._idle.notify_all()
            batch = self._open.get(key)
            leader = batch is None
            if leader:
                batch = self._open[key] = _Batch()
            slot = len(batch.users)
            batch.users.append(user)
            batch.contexts.append(context)
            if len(batch.users) >= self.max_batch:
                self._close(key, batch)
                self._idle.notify_all()
        if leader:
            with self._lock:
                self._wait_to_start(batch)
                self._close(key, batch)
                self._running += 1
            try:
                self._run(batch, k, exclude_seen, n_candidates)
            finally:   # (requests the batch did not answer are answered below, and counted there)
                # the answered clients are awaited before any of them can see its answer and come back
                self._ended(sum(r is not None for r in batch.results or ()))
                batch.done.set()
        else:
            batch.done.wait()
        rec = batch.results[slot]
        if rec is None:
            return self._single(user, k, exclude_seen, n_candidates, context, answered=1)
        return rec

    def _wait_to_start(self, batch: _Batch) -> None:
        """Holding the lock: waits until ``batch`` is full, the window has passed, or (``idle_start``) no call
        runs and no client answered within ``linger_us`` is still awaited."""
        now = time.monotonic()
        deadline = now + self.window_s
        while not batch.closed and now < deadline:
            until = deadline
            if self.idle_start and self._running == 0:
                if self._expect <= 0 or now >= self._expect_until:
                    return
                until = min(deadline, self._expect_until)
            self._idle.wait(until - now)
            now = time.monotonic()

    def _close(self, key, batch: _Batch) -> None:
        if not batch.closed:
            batch.closed = True
            if self._open.get(key) is batch:
                del self._open[key]

    def _ended(self, answered: int = 0) -> None:
        with self._lock:
            self._running -= 1
            if answered and self.linger_s > 0:
                now = time.monotonic()
                self._expect = (self._expect if now < self._expect_until else 0) + answered
                self._expect_until = now + self.linger_s
            if self._running == 0:
                self._idle.notify_all()

    def _single(self, user, k, exclude_seen, n_candidates, context, answered: int = 0) -> Recommendation:
        with self._lock:
            self.stats["singles"] += 1
            self._running += 1
        try:
            return self.engine.recommend(user, k, exclude_seen=exclude_seen, n_candidates=n_candidates,
                                         context=context)
        finally:
            self._ended(answered)

    def _run(self, batch: _Batch, k, exclude_seen, n_candidates) -> None:
        """Answer the closed ``batch`` (slot 0 is the leader's); never raises."""
        n = len(batch.users)
        results: list = [None] * n
        try:
            if n > 1 or self._lone_batch:
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
            batch.results = results          # (the leader then sets batch.done)


class _ServedMetrics:
    """Feedback metrics per model version in /metrics: recommendations, items shown, feedback events by kind
    (tied to the version through the request id of the answer they refer to, whose last 8 hex digits are the
    version's tag: :func:`~rec_engine.engine.version_tag`; no table of past answers is kept), coverage
    (distinct items shown / catalogue) and novelty (the shown items' mean self-information, -log2 of their
    share of the training interactions; its sum per version, so ``novelty_sum / items_shown`` is the mean).
    Label values are version ids only, never request data. Memory: one bool per item for each of the last
    ``keep_versions`` versions served, whatever the number of requests."""

    def __init__(self, engine: Engine, registry, keep_versions: int = 4):
        self.engine, self.keep_versions = engine, keep_versions
        self._lock = threading.Lock()
        self._tags: dict = {}                            # version tag -> version id
        self._seen: OrderedDict = OrderedDict()          # version id -> [bool array of items shown, how many]
        self.recs = Counter("rec_engine_recommendations", "Recommendations answered, by model version",
                            ["version"], registry=registry)
        self.items = Counter("rec_engine_items_shown", "Items returned by /recommend, by model version",
                             ["version"], registry=registry)
        self.events = Counter("rec_engine_feedback", "Feedback events by kind and the version that served "
                              "them ('unknown': no or a forgotten request id)", ["kind", "version"], registry=registry)
        self.coverage = Gauge("rec_engine_coverage", "Distinct items shown since start / items in the catalogue",
                              ["version"], registry=registry)
        self.novelty = Counter("rec_engine_novelty_bits", "Sum over shown items of -log2(item's share of "
                               "the training interactions)", ["version"], registry=registry)

    def shown(self, rec: Recommendation) -> None:
        ids = rec.ids[rec.ids >= 0]
        info = self.engine.served_item_info(rec.version)
        with self._lock:
            self._tags.setdefault(version_tag(rec.version), rec.version)
            if info is not None:
                got = self._seen.get(rec.version)
                if got is None or len(got[0]) < len(info):         # first answer, or items were added
                    grown = np.zeros(len(info), bool)
                    if got is not None:
                        grown[:len(got[0])] = got[0]
                    got = self._seen[rec.version] = [grown, int(grown.sum())]
                self._seen.move_to_end(rec.version)
                while len(self._seen) > self.keep_versions:
                    self._seen.popitem(last=False)
                got[1] += len(ids) - int(np.count_nonzero(got[0][ids]))      # ids of one answer are distinct
                got[0][ids] = True
                covered = got[1]
        self.recs.labels(rec.version).inc()
        self.items.labels(rec.version).inc(len(ids))
        if info is not None:
            self.coverage.labels(rec.version).set(covered / max(len(info), 1))
            bits = float(info[ids].sum())
            if math.isfinite(bits):
                self.novelty.labels(rec.version).inc(bits)

    def feedback(self, kind: str, request_id: str | None, n: int) -> None:
        with self._lock:
            version = self._tags.get(request_id[-8:], "unknown") if request_id is not None else "unknown"
        self.events.labels(kind, version).inc(n)


def create_app(engine: Engine, *, token: str | None = None, max_body: int = 1 << 20, coalesce_us: int = 0,
               max_batch: int = 32, swap_refusal: str | None = None, close_engine: bool = False,
               coalesce_idle_start: bool = True, read_token: str | None = None, rate_limit: float | None = None,
               rate_burst: float | None = None, body_timeout_s: float | None = 30.0,
               bundle_root: str | os.PathLike | None = None, coalesce_linger_us: int | None = None) -> FastAPI:
    """The ASGI app serving ``engine``.

    ``token`` (the write token) guards the write endpoints: observe, feedback, forget, swap, A/B and catalogue
    changes (no token: observe and feedback are open, the others off with 403; ``swap_refusal``: swap, A/B
    and catalogue changes always refused with 409 and that message). ``read_token``: reads need it (or the
    write token). ``rate_limit`` requests a second per client address (bursts of ``rate_burst``; 429 past
    it), ``max_body`` bytes and ``body_timeout_s`` seconds for a request body (413 / 408); see
    :mod:`rec_engine.http_guard`. ``bundle_root``: ``/swap`` and ``/ab`` load only bundles under it (None:
    anywhere, for an app built in-process; ``serve`` always sets one).

    ``coalesce_us > 0`` coalesces concurrent single ``/recommend`` requests into
    batches of up to ``max_batch`` (see :class:`Coalescer`; ``coalesce_idle_start`` and ``coalesce_linger_us``: its
    ``idle_start`` and ``linger_us``). ``close_engine``: close the engine when the server shuts down (the app owns
    it)."""
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
    served = _ServedMetrics(engine, registry)
    index_calls = Gauge("rec_engine_index_queries", "Queries the current version's int8 / bf16 index scanned, and "
                        "of those, the ones whose shortlist failed its exactness check and were scanned again",
                        ["kind"], registry=registry)
    coalescer = (Coalescer(engine, window_us=coalesce_us, max_batch=max_batch, on_batch=batch_size.observe,
                           idle_start=coalesce_idle_start, linger_us=coalesce_linger_us)
                 if coalesce_us > 0 else None)
    app.state.engine = engine
    app.state.registry = registry
    app.state.coalescer = coalescer

    app.add_middleware(Guard, token=token, read_token=read_token, max_body=max_body,     # inside the counting
                       body_timeout_s=body_timeout_s, rate=rate_limit, burst=rate_burst)   # middleware below

    def count(path: str, status: int, seconds: float) -> None:
        # the route's own path, never the request's: an unknown path must not make new time series
        endpoint = path if path in known_paths else "other"
        requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            errors.labels(endpoint).inc()
        latency.labels("http").observe(seconds)

    app.add_middleware(_Counting, record=count)

    known_paths: set = set()              # filled below, once every route is declared

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        msgs = ["/".join(str(p) for p in e.get("loc", ())) + ": " + e.get("msg", "") for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(msgs)}, status_code=422)

    def _bad(e: Exception) -> HTTPException:
        return HTTPException(400, detail=f"{type(e).__name__}: {e}")

    @app.post("/recommend", responses=_doc(RecommendResponse, 400, 422, *_GUARDED))
    def recommend(req: RecommendRequest):
        try:
            tail = {k: getattr(req, k) for k in ("diversity", "debias", "explore") if getattr(req, k) is not None}
            if req.explain:
                tail["explain"] = True
            if coalescer is not None and req.candidates is None and not req.exclude and not tail:
                rec = coalescer.recommend(req.user, req.k, exclude_seen=req.exclude_seen,
                                          n_candidates=req.n_candidates, context=req.context)
            else:
                rec = engine.recommend(req.user, req.k, exclude_seen=req.exclude_seen, exclude=req.exclude,
                                       candidates=req.candidates, context=req.context,
                                       n_candidates=req.n_candidates, **tail)
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        for stage in ("retrieval", "ranking", "total"):
            if f"{stage}_ms" in rec.timings:
                latency.labels(stage).observe(rec.timings[f"{stage}_ms"] / 1e3)
        served.shown(rec)
        keep = rec.ids >= 0
        out = {"user": rec.user, "items": rec.items[keep].tolist(), "scores": rec.scores[keep].tolist(),
               "version": rec.version, "request_id": rec.request_id, "fallback": rec.fallback,
               "timings": rec.timings}
        if req.return_ids:
            out["ids"] = rec.ids[keep].tolist()
        if rec.explored is not None:
            out["explored"] = np.flatnonzero(rec.explored[keep]).tolist()
        if rec.explanations is not None:
            out["explanations"] = [[[t, c] for t, c in ex] for ex, k_ in zip(rec.explanations, keep) if k_]
        # plain JSON types only: straight to the response, past FastAPI's jsonable_encoder (its walk over
        # every value, ~85 us a request on the event loop in bench_http's profile)
        return JSONResponse(out)

    @app.get("/users/{key}/profile", responses=_doc(ProfileResponse, 400, 404, 422, *_GUARDED))
    def user_profile(key: str, top: int = Query(default=10, ge=0, le=MAX_ITEMS_PER_REQUEST)):
        """The user's profile (the engine's ``profiles`` option): interest tags, preference vectors, counters."""
        user: Any = key
        if engine._version.user_keys.kind != "str":           # integer keys: the path's text must be one
            try:
                user = int(key)
            except ValueError:
                raise HTTPException(400, detail=f"TypeError: user keys are integers, got {key!r}") from None
        try:
            got = engine.profile(user, top=top)
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        if got is None:
            raise HTTPException(404, detail=f"no profile for user {key!r} (fewer events than the profile minimum)")
        return got

    @app.post("/observe", responses=_doc(ObserveResponse, 400, 422, *_GUARDED))
    def observe(req: ObserveRequest):
        try:
            engine.observe(req.user, req.items, kind=req.kind, request_id=req.request_id)
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        served.feedback(req.kind, req.request_id, len(req.items))
        return {"user": req.user, "observed": len(req.items)}

    @app.post("/feedback", responses=_doc(FeedbackResponse, 400, 422, *_GUARDED))
    def feedback(req: FeedbackRequest):
        try:
            engine.feedback(req.user, req.item, kind=req.kind, request_id=req.request_id, value=req.value)
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        served.feedback(req.kind, req.request_id, 1)
        return {"user": req.user, "kind": req.kind}

    def _neighbours(rec: Recommendation, name: str) -> dict:
        keep = rec.ids >= 0
        return {name: rec.items[keep].tolist(), "scores": rec.scores[keep].tolist(), "version": rec.version}

    @app.post("/similar_items", responses=_doc(SimilarItemsResponse, 400, 422, *_GUARDED))
    def similar_items(req: SimilarItemsRequest):
        try:
            rec = engine.similar_items(req.item, req.k, by=req.by, alpha=req.alpha, exclude=req.exclude)
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        return {"item": req.item, **_neighbours(rec, "items")}

    @app.post("/similar_users", responses=_doc(SimilarUsersResponse, 400, 422, *_GUARDED))
    def similar_users(req: SimilarUsersRequest):
        try:
            rec = engine.similar_users(req.user, req.k)
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        return {"user": req.user, **_neighbours(rec, "users")}

    def _enabled(what: str) -> None:
        """403 when the server has no write token (the guard has already checked the token when it has one)."""
        if token is None:
            raise HTTPException(403, detail=f"{what} over HTTP is disabled (start the server with a token)")

    def _under_root(bundle: str) -> str:
        if bundle_root is None:
            return bundle
        try:
            return bundle_under(bundle, bundle_root)
        except (PermissionError, ValueError) as e:
            raise HTTPException(403, detail=str(e)) from None

    @app.post("/forget", responses=_doc(ForgetResponse, 400, 403, 422, *_GUARDED))
    def forget(req: ForgetRequest):
        _enabled("forgetting users")
        try:
            n = engine.forget(req.user)
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        return {"user": req.user, "events_erased": n}

    @app.post("/items", responses=_doc(AddItemsResponse, 400, 403, 409, 422, *_GUARDED))
    def add_items(req: AddItemsRequest):
        if swap_refusal is not None:
            raise HTTPException(409, detail=swap_refusal)
        _enabled("changing the catalogue")
        with_vec = [it.vector is not None for it in req.items]
        with_text = [it.text is not None for it in req.items]
        if (any(with_vec) and not all(with_vec)) or (any(with_text) and not all(with_text)):
            raise HTTPException(422, detail="items: give a vector (or a text) for every item or for none")
        vectors = np.array([it.vector for it in req.items], np.float32) if all(with_vec) else None
        texts = [it.text for it in req.items] if all(with_text) else None
        try:
            ids = engine.add_items([it.key for it in req.items], vectors=vectors, text=texts,
                                   features=[it.features for it in req.items])
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        return {"added": len(ids), "items": engine.n_items}

    @app.post("/items/remove", responses=_doc(RemoveItemsResponse, 400, 403, 409, 422, *_GUARDED))
    def remove_items(req: RemoveItemsRequest):
        if swap_refusal is not None:
            raise HTTPException(409, detail=swap_refusal)
        _enabled("changing the catalogue")
        try:
            engine.remove_items(req.items)
        except ENGINE_ERRORS as e:
            raise _bad(e) from None
        return {"removed": len(req.items)}

    @app.post("/ab", responses=_doc(AbResponse, 400, 403, 409, 422, *_GUARDED))
    def ab(req: AbRequest):
        if swap_refusal is not None:
            raise HTTPException(409, detail=swap_refusal)
        _enabled("A/B serving")
        if req.bundle is None or req.fraction == 0:
            engine.clear_candidate()
            return {"ab": None, "version": engine.version}
        bundle = _under_root(req.bundle)
        try:
            engine.set_candidate(bundle, req.fraction)
        except Exception as e:      # noqa: BLE001 - any bundle that does not load (bad meta types, ONNX Runtime's
            # own errors on a corrupt model) is the request's fault: the serving version is untouched
            raise HTTPException(422, detail=f"candidate not loaded, still serving {engine.version}: "
                                            f"{type(e).__name__}: {e}") from None
        return {"ab": engine.ab, "version": engine.version}

    @app.post("/swap", responses=_doc(SwapResponse, 400, 403, 409, 422, *_GUARDED))
    def swap(req: SwapRequest):
        if swap_refusal is not None:
            raise HTTPException(409, detail=swap_refusal)
        _enabled("swapping")
        bundle = _under_root(req.bundle)
        try:
            version = engine.swap(bundle)
            trim_heap()                   # the old version's memory, freed in the server's many threads
        except Exception as e:      # noqa: BLE001 - as for /ab: whatever the new bundle does wrong, 422
            raise HTTPException(422, detail=f"swap failed, still serving {engine.version}: "
                                            f"{type(e).__name__}: {e}") from None
        return {"version": version}

    @app.get("/healthz", responses=_doc(HealthResponse))
    def healthz():
        return {"status": "ok", "version": engine.version, "items": engine.n_items, "pid": os.getpid(),
                "ab": engine.ab}

    @app.get("/metrics", response_class=_PrometheusText, responses=_doc(None, *_GUARDED))
    def metrics():
        info = engine.index
        if "queries" in info:   # (this process's; reset by a swap)
            index_calls.labels("scanned").set(info["queries"])
            index_calls.labels("rescanned").set(info["rescans"])
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    _publish_schema(app)
    known_paths.update(r.path for r in app.routes if hasattr(r, "path"))
    return app


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(n: int = 2) -> bool:
    """glibc's malloc makes up to 8 arenas per core for the server's threads, and memory freed in one (a
    swapped-out version's, a large request's) is rarely reused by the others: a long-running server's RSS
    creeps up. Cap them at ``n`` unless ``MALLOC_ARENA_MAX`` is set. True when glibc took the setting."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(-8, n))          # M_ARENA_MAX


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere nothing): after a swap."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


_MULTI_WORKER_SWAP = ("swapping over HTTP is off with several worker processes (a swap would reach one of "
                      "them): restart the server with the new bundle")


_PATH_OPTIONS = ("events", "candidate", "content_encoder")     # engine options that are paths, made absolute for the workers


def _app_from_env() -> FastAPI:
    """The app of one worker process: settings from the environment variable ``REC_ENGINE_SERVE_SETTINGS``
    (JSON, written by :func:`serve`), the engine loaded here, closed when the worker shuts down. The
    factory ``uvicorn.run("rec_engine.service:_app_from_env", factory=True, workers=N)`` calls."""
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: start workers with rec-engine serve --workers N")
    cfg = json.loads(raw)
    limit_malloc_arenas()
    options = dict(cfg.get("engine", {}))
    for old in ("event_log", "ort_threads", "num_threads", "index", "ranking_precision", "scan_memory"):
        if cfg.get(old) is not None:                 # settings written by earlier releases
            options.setdefault("events" if old == "event_log" else old, cfg[old])
    options.setdefault("scan_memory", "mmap")
    options.setdefault("num_threads", 1)
    engine = Engine.load(cfg["bundle"], **options)
    guard = {k: cfg[k] for k in _GUARD_OPTIONS if k in cfg}
    return create_app(engine, max_body=cfg.get("max_body", 1 << 20), coalesce_us=cfg.get("coalesce_us", 0),
                      max_batch=cfg.get("max_batch", 32), coalesce_linger_us=cfg.get("coalesce_linger_us"), swap_refusal=_MULTI_WORKER_SWAP, close_engine=True,
                      token=os.environ.get(cfg["token_env"]) if cfg.get("token_env") else None,
                      read_token=os.environ.get(cfg["read_token_env"]) if cfg.get("read_token_env") else None,
                      **guard)


_TOKEN_ENV, _READ_TOKEN_ENV = "REC_ENGINE_WORKER_TOKEN", "REC_ENGINE_WORKER_READ_TOKEN"
_GUARD_OPTIONS = ("rate_limit", "rate_burst", "body_timeout_s", "bundle_root")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def serve(bundle: str, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_body: int = 1 << 20, workers: int = 1, coalesce_us: int = 0, max_batch: int = 32,
          log_level: str = "info", read_token: str | None = None, rate_limit: float | None = None,
          rate_burst: float | None = None, body_timeout_s: float | None = 30.0, header_timeout_s: float = 10.0,
          bundle_root: str | os.PathLike | None = None, coalesce_linger_us: int | None = None,
          **engine_options) -> None:
    """Load ``bundle`` (or a model home: its ``CURRENT`` version) and serve it with uvicorn until interrupted.
    ``engine_options`` are :class:`~rec_engine.engine.Engine`'s (``events``, ``index``, ``num_threads``, ...);
    ``scan_memory`` defaults to ``"copy"`` for one worker, ``"mmap"`` for several, which then share the
    scanned table. With ``coalesce_us > 0``, ``batch_threads`` defaults to the available cores divided
    among the workers (the coalesced batches run one at a time per worker); ``coalesce_linger_us``: the
    :class:`Coalescer`'s ``linger_us`` (None: its default).

    ``workers=1``: one process (the engine loaded here). ``workers=N > 1``: uvicorn's multi-process mode,
    N spawned worker processes accepting on the socket this process binds; each builds its app with
    :func:`_app_from_env` (the tables are memory-mapped, so the workers share them through the page cache).
    With an event store, each worker reads at start what is stored and then follows what the others write
    (``follow_events_s``, default 0.2 s here), so an event observed by one worker reaches the others within
    that delay. ``/swap`` and ``/ab`` are refused with 409, since they would reach one worker: restart with
    the new bundle (or point the model home's ``CURRENT`` at it and restart).

    Security (:mod:`rec_engine.http_guard`): ``token`` guards the write endpoints, ``read_token`` the reads;
    ``rate_limit`` requests/s per client address; ``max_body`` / ``body_timeout_s`` bound a request body,
    ``header_timeout_s`` a request head. ``/swap`` and ``/ab`` load only bundles under ``bundle_root``
    (default: the directory that holds ``bundle``).
    """
    import uvicorn

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if isinstance(coalesce_us, bool) or not isinstance(coalesce_us, int) or coalesce_us < 0:
        raise ValueError(f"coalesce_us must be an integer >= 0, got {coalesce_us!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if coalesce_linger_us is not None and (isinstance(coalesce_linger_us, bool)
                                           or not isinstance(coalesce_linger_us, int) or coalesce_linger_us < 0):
        raise ValueError(f"coalesce_linger_us must be an integer >= 0, got {coalesce_linger_us!r}")
    opts = {k: v for k, v in engine_options.items() if v is not None}
    if coalesce_us > 0:     # coalesced batches run one at a time (see Coalescer): give them the workers' cores
        opts.setdefault("batch_threads", max(1, _cores() // workers))
    http = protocol_class(header_timeout_s)
    bundle_root = os.path.abspath(bundle_root if bundle_root is not None
                                  else os.path.dirname(os.path.abspath(os.fspath(bundle))))
    if not os.path.isdir(bundle_root):
        raise ValueError(f"bundle_root {bundle_root!r} is not a directory")
    guard = {"rate_limit": rate_limit, "rate_burst": rate_burst, "body_timeout_s": body_timeout_s,
             "bundle_root": bundle_root}
    Guard(None, token=token, read_token=read_token, max_body=max_body, body_timeout_s=body_timeout_s,
          rate=rate_limit, burst=rate_burst)          # a wrong setting fails here, before anything loads
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        import warnings
        warnings.warn(f"serving on {host} without a write token: anyone who reaches it can observe and "
                      f"give feedback (set REC_ENGINE_TOKEN)", stacklevel=2)
    if "event_log" in opts:
        opts.setdefault("events", opts.pop("event_log"))
    if workers == 1:
        limit_malloc_arenas()
        opts.setdefault("scan_memory", "copy")
        engine = Engine.load(bundle, **opts)
        try:
            app = create_app(engine, token=token, max_body=max_body, coalesce_us=coalesce_us, max_batch=max_batch,
                             read_token=read_token, coalesce_linger_us=coalesce_linger_us, **guard)
            uvicorn.run(app, host=host, port=port, log_level=log_level, http=http)
        finally:
            engine.close()
        return
    from .bundle import open_bundle
    from .versions import resolve

    Engine.check_options(**opts)               # a wrong option or path fails here, once, not in every worker
    open_bundle(resolve(bundle), verify=False)
    opts.setdefault("scan_memory", "mmap")
    if opts.get("events") is not None:
        opts.setdefault("follow_events_s", 0.2)
    for name in _PATH_OPTIONS:
        got = opts.get(name)
        if isinstance(got, (str, os.PathLike)) and not str(got).startswith(("redis://", "rediss://", "unix://")):
            opts[name] = os.path.abspath(got)
    for name, value in ((_TOKEN_ENV, token), (_READ_TOKEN_ENV, read_token)):    # tokens: never in the settings
        if value is not None:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
    os.environ[SETTINGS_ENV] = json.dumps({
        "bundle": os.path.abspath(bundle), "engine": opts, "max_body": max_body, "coalesce_us": coalesce_us,
        "max_batch": max_batch, "coalesce_linger_us": coalesce_linger_us, "token_env": _TOKEN_ENV, "read_token_env": _READ_TOKEN_ENV, **guard})
    uvicorn.run("rec_engine.service:_app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, http=http)
