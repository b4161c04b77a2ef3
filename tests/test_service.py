"""The HTTP service through a real uvicorn server on localhost."""
from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the HTTP service needs the serve extra")
uvicorn = pytest.importorskip("uvicorn", reason="the HTTP service needs the serve extra")

from rec_engine.engine import Engine  # noqa: E402
from rec_engine.service import create_app  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}     # the write token: observe, feedback, swap, ...
MAX_BODY = 64 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int):
        self.port = port

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        h = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text


@contextlib.contextmanager
def running(app, **config):
    """``app`` served by uvicorn on a free localhost port, in a thread, for the duration of the block
    (``config``: more uvicorn.Config settings)."""
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                        **config))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield Client(port)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(trained):
    engine = Engine.load(trained.bundle("pipe_a"))
    with running(create_app(engine, token=TOKEN, max_body=MAX_BODY)) as client:
        yield client, engine
    engine.close()


CTX = {"hour": 9.0, "device": "android"}


def test_recommend_returns_the_engines_answer(server):
    client, engine = server
    status, body = client.request("POST", "/recommend", {"user": 12, "k": 5, "context": CTX})
    assert status == 200
    ref = engine.recommend(12, k=5, context=CTX)
    assert body["items"] == ref.items.tolist()
    assert body["scores"] == pytest.approx(ref.scores.tolist(), abs=1e-6)
    assert body["version"] == engine.version and body["fallback"] is False
    assert {"retrieval_ms", "ranking_ms", "total_ms"} <= set(body["timings"])


def test_observe_then_recommend_excludes_the_item(server):
    client, _ = server
    _, body = client.request("POST", "/recommend", {"user": 33, "k": 5, "context": CTX})
    top = body["items"][0]
    status, ob = client.request("POST", "/observe", {"user": 33, "items": [top]}, headers=AUTH)
    assert status == 200 and ob == {"user": 33, "observed": 1}
    _, again = client.request("POST", "/recommend", {"user": 33, "k": 5, "context": CTX})
    assert top not in again["items"]


def test_unknown_user_gets_the_fallback(server):
    client, _ = server
    status, body = client.request("POST", "/recommend", {"user": 123456, "k": 3})
    assert status == 200 and body["fallback"] is True and len(body["items"]) == 3


@pytest.mark.parametrize("payload, fragment", [
    ({"user": 1.5}, "user"),
    ({"user": 2**63}, "user"),
    ({"user": "x" * 2000}, "user"),
    ({"user": None}, "user"),
    ({"user": 1, "k": -2}, "k"),
    ({"user": 1, "k": 100000}, "k"),
    ({"user": 1, "colour": "red"}, "colour"),
    ({"k": 3}, "user"),
    ({"user": 1, "candidates": [1.5]}, "candidates"),
    ({"user": 1, "exclude": [[1]]}, "exclude"),
])
def test_wrong_types_get_422_naming_the_field(server, payload, fragment):
    client, _ = server
    status, body = client.request("POST", "/recommend", payload)
    assert status == 422 and fragment in body["detail"]


@pytest.mark.parametrize("payload, fragment", [
    ({"user": "12"}, "user must be an integer key"),
    ({"user": 1, "candidates": ["a"]}, "candidates: keys of this map are integers"),
    ({"user": 1, "exclude": [10**7]}, "exclude: unknown item key 10000000"),
])
def test_keys_of_the_wrong_type_or_unknown_items_get_400(server, payload, fragment):
    client, _ = server
    status, body = client.request("POST", "/recommend", payload)
    assert status == 400 and fragment in body["detail"]


def test_negative_integer_user_keys_are_keys_and_exclude_is_honoured(server):
    client, engine = server
    status, body = client.request("POST", "/recommend", {"user": -5, "k": 3})
    assert status == 200 and body["fallback"] is True
    _, first = client.request("POST", "/recommend", {"user": 12, "k": 3, "context": CTX, "return_ids": True})
    assert first["ids"] == first["items"]           # a bundle without key maps: the keys are the dense ids
    _, again = client.request("POST", "/recommend", {"user": 12, "k": 3, "context": CTX,
                                                     "exclude": first["items"][:2]})
    assert set(first["items"][:2]).isdisjoint(again["items"]) and again["items"][0] == first["items"][2]


def test_malformed_json_and_wrong_content(server):
    client, _ = server
    status, body = client.request("POST", "/recommend", raw=b'{"user": 1,')
    assert status == 422 and "JSON" in body["detail"]
    status, _ = client.request("POST", "/recommend", raw=b"[1, 2, 3]")
    assert status == 422


def test_engine_errors_become_400_with_the_message(server):
    client, _ = server
    status, body = client.request("POST", "/observe", {"user": 1, "items": [10**6]}, headers=AUTH)
    assert status == 400 and "unknown item key 1000000" in body["detail"]
    status, body = client.request("POST", "/recommend", {"user": 1, "context": {"colour": 1}})
    assert status == 400 and "colour" in body["detail"]


def test_huge_bodies_get_413(server):
    client, _ = server
    big = {"user": 1, "items": list(range(30000))}
    status, body = client.request("POST", "/observe", big, headers=AUTH)
    assert status == 413 and "larger than" in body["detail"]
    # without a Content-Length (chunked), the bound still holds
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    conn.putrequest("POST", "/observe")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Authorization", AUTH["Authorization"])
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b" " * 32768
    for _ in range(4):
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()


def test_swap_is_guarded_by_the_token(server, trained, tmp_path):
    client, engine = server
    before = engine.version
    status, _ = client.request("POST", "/swap", {"bundle": str(trained.bundle("pipe_b"))})
    assert status == 401
    status, _ = client.request("POST", "/swap", {"bundle": str(trained.bundle("pipe_b"))},
                               headers={"Authorization": "Bearer wrong"})
    assert status == 401 and engine.version == before
    status, body = client.request("POST", "/swap", {"bundle": str(tmp_path / "missing")},
                                  headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 422 and before in body["detail"] and engine.version == before
    status, body = client.request("POST", "/swap", {"bundle": str(trained.bundle("pipe_b"))},
                                  headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["version"] == engine.version != before
    _, h = client.request("GET", "/healthz")
    assert h["version"] == engine.version
    status, _ = client.request("POST", "/swap", {"bundle": str(trained.bundle("pipe_a"))},
                               headers={"Authorization": f"bearer  {TOKEN}"})    # the scheme in any case
    assert status == 200 and engine.version == before


def test_swap_without_a_configured_token_is_off(trained):
    with Engine.load(trained.bundle("lightgcn")) as engine, running(create_app(engine, token=None)) as client:
        before = engine.version
        status, body = client.request("POST", "/swap", {"bundle": str(trained.bundle("lightgcn_b"))},
                                      headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 403 and "disabled" in body["detail"] and engine.version == before


def test_healthz_and_metrics(server):
    client, engine = server
    status, body = client.request("GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["version"] == engine.version
    client.request("POST", "/recommend", {"user": 2, "k": 3, "context": CTX})
    client.request("POST", "/recommend", {"user": "bad"})
    status, text = client.request("GET", "/metrics")
    assert status == 200
    lines = text.splitlines()

    def value(prefix):
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith(prefix))

    assert value('rec_engine_requests_total{endpoint="/recommend",status="200"}') >= 1
    assert value('rec_engine_requests_total{endpoint="/recommend",status="422"}') >= 1
    assert value('rec_engine_errors_total{endpoint="/recommend"}') >= 1
    for stage in ("retrieval", "ranking", "total", "http"):
        assert value(f'rec_engine_latency_seconds_count{{stage="{stage}"}}') >= 1


def test_unknown_paths_do_not_grow_the_metrics(server):
    client, _ = server
    _, before = client.request("GET", "/metrics")
    for j in range(50):
        assert client.request("GET", f"/no/such/path/{j}")[0] == 404
    _, after = client.request("GET", "/metrics")
    series = [ln for ln in after.splitlines() if ln.startswith("rec_engine_") and "path/" in ln]
    assert series == []
    assert 'endpoint="other",status="404"' in after
    assert len(after.splitlines()) - len(before.splitlines()) <= 8      # one "other" series set, not 50


def test_chunked_requests_are_read_whole_and_bounded(server):
    client, engine = server

    def chunked(body: bytes, path="/recommend"):
        conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
        parts = [body[i:i + 7] for i in range(0, len(body), 7)]
        conn.request("POST", path, body=iter(parts), headers={"Content-Type": "application/json", **AUTH},
                     encode_chunked=True)
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read().decode())
        conn.close()
        return out

    st, body = chunked(json.dumps({"user": 2, "k": 3, "context": CTX}).encode())
    assert st == 200, body
    assert body["items"] == engine.recommend(2, k=3, context=CTX).items.tolist()
    st, body = chunked(json.dumps({"user": 2, "items": [1]}).encode(), "/observe")
    assert st == 200, body
    st, body = chunked(b'{"user": 2, "exclude": [' + b"1," * MAX_BODY + b'1]}')
    assert st == 413 and "larger than" in body["detail"]


@pytest.mark.parametrize("raw", [b'{"user": 2, "context": {"hour": NaN}}', b'{"user": 2, "context": {"hour": 1e308}}',
                                 b'{"user": 2, "context": {"hour": -Infinity}}',
                                 b'{"user": 2, "context": {"hour": {"nested": 1}}}'])
def test_non_finite_or_nested_context_values_get_422(server, raw):
    client, _ = server
    st, body = client.request("POST", "/recommend", raw=raw)
    assert st == 422 and "context" in body["detail"], body


# ---- the published schema (issue 18: it must agree with every answer; scripts/schemathesis.sh checks it live)
_DECLARED = {   # (method, path): the statuses each operation declares; 401/408/413/429 come from the guard
    ("post", "/recommend"): {200, 400, 422}, ("get", "/users/{key}/profile"): {200, 400, 404, 422},
    ("post", "/observe"): {200, 400, 422}, ("post", "/feedback"): {200, 400, 422},
    ("post", "/similar_items"): {200, 400, 422}, ("post", "/similar_users"): {200, 400, 422},
    ("post", "/forget"): {200, 400, 403, 422}, ("post", "/items"): {200, 400, 403, 409, 422},
    ("post", "/items/remove"): {200, 400, 403, 409, 422}, ("post", "/ab"): {200, 400, 403, 409, 422},
    ("post", "/swap"): {200, 400, 403, 409, 422}, ("get", "/metrics"): {200},
}


ERROR_REF = "#/components/schemas/ErrorResponse"


def test_openapi_declares_every_status_with_the_string_detail_shape(server):
    from prometheus_client import CONTENT_TYPE_LATEST

    client, _ = server
    status, doc = client.request("GET", "/openapi.json")
    assert status == 200
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas    # FastAPI's list shape
    assert schemas["ErrorResponse"]["properties"]["detail"]["type"] == "string"
    assert schemas["ErrorResponse"]["required"] == ["detail"]
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert bearer["type"] == "http" and bearer["scheme"] == "bearer"
    ops = {(m, p): op for p, methods in doc["paths"].items() for m, op in methods.items()}
    assert set(ops) == set(_DECLARED) | {("get", "/healthz")}
    assert set(ops[("get", "/healthz")]["responses"]) == {"200"}
    for key, want in _DECLARED.items():
        op = ops[key]
        assert {int(c) for c in op["responses"]} == want | {401, 408, 413, 429}, key
        for code, resp in op["responses"].items():
            if code != "200":
                assert resp["content"] == {"application/json": {"schema": {"$ref": ERROR_REF}}}
        assert op["responses"]["429"]["headers"]["Retry-After"]["required"] is True
        assert not any(p["name"].lower() == "authorization" for p in op.get("parameters", ())), key
        assert {"bearer": []} in op["security"]
        if key[1] != "/metrics":
            ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
            assert schemas[ref.rsplit("/", 1)[1]]["type"] == "object" and schemas[ref.rsplit("/", 1)[1]]["required"]
    metrics_200 = ops[("get", "/metrics")]["responses"]["200"]["content"]
    assert metrics_200 == {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}
    assert ops[("post", "/swap")]["security"] == [{"bearer": []}]


def test_answers_match_their_published_models(server):
    from rec_engine.service import (ErrorResponse, HealthResponse, ObserveResponse, RecommendResponse,
                                    SimilarItemsResponse)

    client, _ = server
    for path, body, model in (("/recommend", {"user": 5, "k": 4, "context": CTX, "return_ids": True},
                               RecommendResponse),
                              ("/recommend", {"user": 987654, "k": 2}, RecommendResponse),
                              ("/similar_items", {"item": 3, "k": 3}, SimilarItemsResponse),
                              ("/observe", {"user": 7, "items": [2]}, ObserveResponse)):
        status, got = client.request("POST", path, body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200, got
        model.model_validate(got)
    status, got = client.request("GET", "/healthz")
    assert status == 200
    HealthResponse.model_validate(got)
    status, got = client.request("POST", "/recommend", {"user": "x"})
    assert status == 400
    ErrorResponse.model_validate(got)


@pytest.mark.parametrize("path, raw, status, fragment", [
    # schemathesis: vectors of different lengths were a ValueError in numpy (500)
    ("/items", b'{"items": [{"key": 900001, "vector": [0.5]}, {"key": 900002, "vector": [1.0, 2.0]}]}', 422,
     "different lengths"),
    # a finite JSON number past float32's range would become inf in the vector table
    ("/items", b'{"items": [{"key": 900001, "vector": [-1.7976931348623157e+308]}]}', 422, "vector"),
    ("/items", b'{"items": [{"key": 900001, "vector": []}]}', 422, "vector"),
    # a body that is not UTF-8: FastAPI's own 400, declared on every operation with a body
    ("/swap", b'\xff\xfeS', 400, "parsing the body"),
    ("/ab", b'\xc3', 400, "parsing the body"),
    ("/recommend", b'\xff', 400, "parsing the body"),
])
def test_schemathesis_findings_get_a_documented_4xx_with_a_string_detail(server, path, raw, status, fragment):
    client, engine = server
    n_items = engine.n_items
    got_status, body = client.request("POST", path, raw=raw, headers={"Authorization": f"Bearer {TOKEN}"})
    assert got_status == status and isinstance(body["detail"], str) and fragment in body["detail"], body
    assert engine.n_items == n_items
