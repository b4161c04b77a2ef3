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
"""
from __future__ import annotations

import hmac
import time
from typing import Any, Optional, Union

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Annotated

from ._core import RecEngineError
from .engine import Engine

MAX_ITEMS_PER_REQUEST = 10_000
MAX_KEY_LENGTH = 1024
# a user's or an item's own key: an integer within int64 or a string
Key = Union[Annotated[int, Field(ge=-2**63, lt=2**63)], Annotated[str, Field(max_length=MAX_KEY_LENGTH)]]
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: Key
    k: int = Field(default=10, ge=0, le=MAX_ITEMS_PER_REQUEST)
    exclude_seen: bool = True
    exclude: Optional[list[Key]] = Field(default=None, max_length=MAX_ITEMS_PER_REQUEST)
    candidates: Optional[list[Key]] = Field(default=None, max_length=MAX_ITEMS_PER_REQUEST)
    context: Optional[dict[str, Any]] = None
    return_ids: bool = False


class ObserveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user: Key
    items: list[Key] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    bundle: str = Field(min_length=1)


def create_app(engine: Engine, *, token: str | None = None, max_body: int = 1 << 20) -> FastAPI:
    """The ASGI app serving ``engine``. ``token`` guards ``/swap`` (no token: swapping over HTTP is off)."""
    app = FastAPI(title="rec_engine", docs_url=None, redoc_url=None)
    registry = CollectorRegistry()
    requests = Counter("rec_engine_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                       registry=registry)
    errors = Counter("rec_engine_errors", "Requests that failed, by endpoint", ["endpoint"], registry=registry)
    latency = Histogram("rec_engine_latency_seconds", "Latency by stage (retrieval, ranking, total, http)",
                        ["stage"], buckets=_BUCKETS, registry=registry)
    app.state.engine = engine
    app.state.registry = registry

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
            rec = engine.recommend(req.user, req.k, exclude_seen=req.exclude_seen, exclude=req.exclude,
                                   candidates=req.candidates, context=req.context)
        except (ValueError, TypeError, IndexError, RecEngineError) as e:
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
        except (ValueError, TypeError, IndexError, RecEngineError) as e:
            raise _bad(e) from None
        return {"user": req.user, "observed": len(req.items)}

    @app.post("/swap")
    def swap(req: SwapRequest, authorization: Optional[str] = Header(default=None)):
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
        return {"status": "ok", "version": engine.version, "items": engine.n_items}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(bundle: str, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          event_log: str | None = None, ort_threads: int = 1, num_threads: int | None = 1,
          max_body: int = 1 << 20) -> None:
    """Load ``bundle`` and serve it with uvicorn until interrupted."""
    import uvicorn

    engine = Engine.load(bundle, event_log=event_log, ort_threads=ort_threads, num_threads=num_threads)
    try:
        uvicorn.run(create_app(engine, token=token, max_body=max_body), host=host, port=port, log_level="info")
    finally:
        engine.close()
