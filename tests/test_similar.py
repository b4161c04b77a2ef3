"""similar_items / similar_users against a brute-force cosine over the model's vectors."""
from __future__ import annotations

import numpy as np
import pytest

from rec_engine.engine import Engine
from rec_engine.keys import UnknownKeyError

from serving_fixtures import trained  # noqa: F401 (fixture)

CTX = {"hour": 12.0, "device": "web"}


def _cosine_topk(table: np.ndarray, q: np.ndarray, k: int, drop: set) -> tuple[np.ndarray, np.ndarray]:
    t = table.astype(np.float64)
    t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-300)
    qq = q.astype(np.float64) / np.linalg.norm(q)
    s = t @ qq
    order = [i for i in np.lexsort((np.arange(len(s)), -s)) if i not in drop][:k]
    return np.array(order), s[order]


@pytest.fixture(scope="module")
def engine(trained):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e:
        yield e


def test_similar_items_match_brute_force_cosine(engine, trained):  # noqa: F811
    items = engine._version.retrieval.items
    rng = np.random.default_rng(0)
    for item in rng.choice(engine.n_items, 12, replace=False).tolist() + [0, engine.n_items - 1]:
        got = engine.similar_items(item, k=15)
        want_ids, want_s = _cosine_topk(items, items[item], 15, {item})
        assert item not in got.items.tolist()
        np.testing.assert_allclose(got.scores, want_s, rtol=1e-4, atol=1e-5)
        # equal up to near-ties in float32
        assert len(set(got.ids.tolist()) ^ set(want_ids.tolist())) <= 2
    batch = engine.similar_items([3, 7, 3], k=5, exclude=[1, 2])
    for q, rec in zip([3, 7, 3], batch):
        single = engine.similar_items(q, k=5, exclude=[1, 2])
        np.testing.assert_array_equal(rec.ids, single.ids)
        assert not {1, 2, q} & set(rec.items.tolist())
    assert engine.similar_items([], k=3) == []


def test_similar_users_match_brute_force_and_use_folded_in_vectors(trained, tmp_path):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e:
        r = e._version.retrieval
        users = r.users.to_numpy()
        for u in (0, 5, 123):
            got = e.similar_users(u, k=10)
            want_ids, want_s = _cosine_topk(users, users[u], 10, {u})
            np.testing.assert_allclose(got.scores, want_s, rtol=1e-4, atol=1e-5)
            assert u not in got.items.tolist() and len(set(got.ids.tolist()) ^ set(want_ids.tolist())) <= 2
        # a user the model does not know: none, until observed events fold it in
        with pytest.raises(UnknownKeyError, match="no vector for user 999999"):
            e.similar_users(999999)
        e.observe(999999, [4, 9, 17])
        vec, known = r.user_vectors([e._version.user_state(999999, e.online)])
        got = e.similar_users(999999, k=5)
        want_ids, want_s = _cosine_topk(users, vec[0], 5, set())
        np.testing.assert_allclose(got.scores, want_s, rtol=1e-4, atol=1e-5)


def test_similar_bad_input(engine):
    with pytest.raises(UnknownKeyError, match="items: unknown item key 10000000"):
        engine.similar_items(10_000_000)
    with pytest.raises(TypeError):
        engine.similar_items("sku-1")
    with pytest.raises(ValueError, match="k must be >= 0"):
        engine.similar_items(1, k=-1)
    with pytest.raises(TypeError):
        engine.similar_users(1.5)


fastapi = pytest.importorskip("fastapi", reason="the HTTP service needs the serve extra")
from test_service import running  # noqa: E402

from rec_engine.service import create_app  # noqa: E402


def test_similar_over_http(engine):
    with running(create_app(engine)) as client:
        st, body = client.request("POST", "/similar_items", {"item": 4, "k": 5, "exclude": [1]})
        rec = engine.similar_items(4, k=5, exclude=[1])
        assert st == 200 and body["items"] == rec.items.tolist()
        np.testing.assert_allclose(body["scores"], rec.scores, rtol=1e-6)
        st, body = client.request("POST", "/similar_users", {"user": 4, "k": 3})
        assert st == 200 and body["users"] == engine.similar_users(4, k=3).items.tolist()
        assert client.request("POST", "/similar_items", {"item": 10**9})[0] == 400
        assert client.request("POST", "/similar_users", {"user": 10**9})[0] == 400
        assert client.request("POST", "/similar_items", {"item": 1, "k": -2})[0] == 422
