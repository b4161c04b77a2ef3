"""The living catalogue: add_items / remove_items while serving, through restarts, swaps and threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from rec_engine.engine import Engine
from rec_engine.keys import UnknownKeyError

from serving_fixtures import trained  # noqa: F401 (fixture)

CTX = {"hour": 12.0, "device": "web"}
NEW = [10_000_001, 10_000_002, 10_000_003]


def _user_vec(e: Engine, user) -> np.ndarray:
    vec, known = e._version.retrieval.user_vectors([e._version.user_state(user, e.online)])
    assert known[0]
    return vec[0]


def test_added_items_are_retrieved_ranked_and_named_by_key(trained, tmp_path):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), events=tmp_path / "ev.db", num_threads=1) as e:
        n0 = e.n_items
        u = _user_vec(e, 3)
        vecs = np.stack([u * 50, u * 40, -u * 50]).astype(np.float32)
        feats = [{"category": 2, "brand": 5, "tags": [1, 2], "price": 30.0}, None, {"category": 1}]
        ids = e.add_items(NEW, vectors=vecs, features=feats)
        assert ids.tolist() == [n0, n0 + 1, n0 + 2] and e.n_items == n0 + 3
        # retrieval alone: the two new items aligned with the user's vector lead its scan
        top = e._version.retrieval.retrieve(e._version.user_state(3, e.online), 5).ids
        assert top[:2].tolist() == [n0, n0 + 1]
        rec = e.recommend(3, k=e.n_items, context=CTX, n_candidates=e.n_items)
        got = rec.items.tolist()
        assert NEW[0] in got and NEW[1] in got and NEW[2] in got
        # the ranking model scores a new item from its features exactly as a row of those values
        r = e._version.ranking
        cold = e.recommend(10**9, k=1, candidates=[NEW[0]], context=CTX)
        want = r.score_rows([{**CTX, **feats[0]}])[0]
        assert cold.items.tolist() == [NEW[0]] and cold.scores[0] == pytest.approx(want, rel=1e-5)
        # batch answers equal single ones with added items around
        batch = e.recommend_batch([3, 4, 5], k=20, context=CTX)
        for user, b in zip([3, 4, 5], batch):
            np.testing.assert_array_equal(b.ids, e.recommend(user, k=20, context=CTX).ids)
        # observed and similar
        e.observe(7, [NEW[2]])
        assert NEW[2] not in e.recommend(7, k=e.n_items, context=CTX, n_candidates=e.n_items).items.tolist()
        sim = e.similar_items(NEW[0], k=3)
        assert sim.items.tolist()[0] == NEW[1]       # the same direction: cosine 1


def test_removed_items_are_never_returned(trained, tmp_path):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), events=tmp_path / "ev.db", num_threads=1) as e:
        first = e.recommend(3, k=10, context=CTX).items.tolist()
        gone = first[:3]
        e.remove_items(gone)
        every = e.n_items
        assert not set(gone) & set(e.recommend(3, k=every, context=CTX, n_candidates=every).items.tolist())
        for b in e.recommend_batch([3, 4], k=every, context=CTX, n_candidates=every):
            assert not set(gone) & set(b.items.tolist())
        assert not set(gone) & set(e.recommend(3, k=10, candidates=gone + [1, 2], context=CTX).items.tolist())
        assert not set(gone) & set(e.recommend(10**9, k=every, context=CTX, n_candidates=every).items.tolist())
        assert not set(gone) & set(e.similar_items(gone[0], k=every - 1).items.tolist())
        with pytest.raises(UnknownKeyError, match="items: unknown item key 999999"):
            e.remove_items([first[5], 999999])
        assert first[5] in e.recommend(3, k=every, context=CTX, n_candidates=every).items.tolist()
        e.add_items([gone[0]])                       # held by the version: back, with its own vector
        assert gone[0] in e.recommend(3, k=every, context=CTX, n_candidates=every).items.tolist()
        e.add_items(gone[1:])                        # the last removed ones back: nothing is excluded
        assert len(e._version.removed_ids) == 0
        assert set(gone) <= set(e.recommend(3, k=every, context=CTX, n_candidates=every).items.tolist())


def test_the_catalogue_survives_a_restart_and_a_swap(trained, tmp_path):  # noqa: F811
    db = tmp_path / "ev.db"
    with Engine.load(trained.bundle("pipe_a"), events=db, num_threads=1) as e:
        u = _user_vec(e, 3)
        e.add_items(NEW[:2], vectors=np.stack([u * 50, u * 40]), features=[{"category": 2}, {"category": 3}])
        gone = e.recommend(3, k=5, context=CTX).items.tolist()[2:4]
        assert gone[0] not in NEW and gone[1] not in NEW
        e.remove_items(gone + [NEW[1]])
        before = e.recommend(3, k=30, context=CTX)
        assert NEW[0] in before.items.tolist() and NEW[1] not in before.items.tolist()
    with Engine.load(trained.bundle("pipe_a"), events=db, num_threads=1) as again:
        assert again.forget("") == 0                 # the catalogue's events belong to no user
        after = again.recommend(3, k=30, context=CTX)
        np.testing.assert_array_equal(after.items, before.items)
        np.testing.assert_allclose(after.scores, before.scores, rtol=1e-6)
        again.swap(trained.bundle("pipe_b"))                  # same item space size: carried over by key
        swapped = again.recommend(3, k=again.n_items, context=CTX, n_candidates=again.n_items).items.tolist()
        assert NEW[0] in swapped and NEW[1] not in swapped and not set(gone) & set(swapped)


def test_items_added_then_withdrawn_leave_nothing_behind_after_a_swap_or_restart(trained, tmp_path):  # noqa: F811
    db = tmp_path / "ev.db"
    with Engine.load(trained.bundle("pipe_a"), events=db, num_threads=1) as e:
        base = e.n_items
        u = _user_vec(e, 3)
        churn = [9_000_000 + i for i in range(300)]
        for i in range(0, 300, 30):                           # 300 new items come and go, 10 stay
            e.add_items(churn[i:i + 30], vectors=np.tile(u, (30, 1)) * (1 + np.arange(30)[:, None] / 30),
                        features=[{"category": 1}] * 30)
            e.remove_items(churn[i + 1:i + 30])
        kept = churn[::30]
        assert sorted(e.catalogue.added) == kept              # the withdrawn records are gone
        assert set(churn) - set(kept) <= e.catalogue.removed
        e.swap(trained.bundle("pipe_b"))
        assert e.n_items == base + len(kept)                  # the new version holds the live additions only
        shown = set(e.recommend(3, k=e.n_items, context=CTX, n_candidates=e.n_items).items.tolist())
        assert set(kept) <= shown and not (set(churn) - set(kept)) & shown
        e.add_items([churn[1]], vectors=u[None, :] * 3, features=[{"category": 2}])    # re-added: back
        assert churn[1] in e.recommend(3, k=e.n_items, context=CTX, n_candidates=e.n_items).items.tolist()
    with Engine.load(trained.bundle("pipe_a"), events=db, num_threads=1) as again:    # the replay agrees
        assert sorted(again.catalogue.added) == sorted(kept + [churn[1]])
        assert again.n_items == base + len(kept) + 1


def test_items_added_or_removed_while_a_swap_loads_reach_the_new_version(trained, monkeypatch):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e:
        u = _user_vec(e, 3)
        e.add_items([NEW[0]], vectors=u[None, :] * 50)
        load = e._load_version

        def slow_load(path):                       # what other threads do between the load and the switch
            v = load(path)
            e.add_items([NEW[1]], vectors=u[None, :] * 40)
            e.remove_items([NEW[0]])
            return v

        monkeypatch.setattr(e, "_load_version", slow_load)
        e.swap(trained.bundle("pipe_b"))
        every = e.recommend(3, k=e.n_items, context=CTX, n_candidates=e.n_items).items.tolist()
        assert NEW[1] in every and NEW[0] not in every
        e.observe(3, [NEW[1]])                     # the new version knows the item added during its load
        e.remove_items([NEW[1]])


def test_add_and_remove_while_eight_threads_recommend(trained):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e:
        every = e.n_items + 200
        u = _user_vec(e, 3)
        errors, leaks = [], []
        removed_at: dict = {}
        stop = threading.Event()
        lock = threading.Lock()

        def client(seed):
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                try:
                    with lock:
                        done = dict(removed_at)
                    rec = e.recommend(int(rng.integers(0, 50)), k=every, context=CTX, n_candidates=every)
                    bad = set(done) & set(rec.items.tolist())
                    if bad:
                        leaks.append(bad)
                except Exception as ex:       # noqa: BLE001 - the test collects every error
                    errors.append(ex)

        threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        try:
            for j in range(40):
                key = 20_000_000 + j
                e.add_items([key], vectors=(u * (1 + j % 3))[None, :])
                if j % 4 == 3:
                    e.remove_items([key, j])
                    with lock:
                        removed_at[key] = removed_at[j] = True
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[:3]
        assert not leaks, leaks[:3]


def test_add_items_bad_input(trained):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e:
        d = e._version.retrieval.items.shape[1]
        for call, exc, msg in [
            (lambda: e.add_items([NEW[0]]), ValueError, "no vector"),
            (lambda: e.add_items(["sku-x"], vectors=np.zeros((1, d))), TypeError, "integers"),
            (lambda: e.add_items([NEW[0]], vectors=np.zeros((1, d + 1))), ValueError, "shape"),
            (lambda: e.add_items([NEW[0]], vectors=np.full((1, d), np.nan)), ValueError, "finite"),
            (lambda: e.add_items([NEW[0], NEW[0]], vectors=np.zeros((2, d))), ValueError, "twice"),
            (lambda: e.add_items([], vectors=np.zeros((0, d))), ValueError, "at least one"),
            (lambda: e.add_items(NEW[0], vectors=np.zeros((1, d))), TypeError, "sequence"),
            (lambda: e.add_items([NEW[0]], vectors=np.zeros((1, d)), features={"a": 1}), TypeError, "one mapping"),
        ]:
            with pytest.raises(exc, match=msg):
                call()
        assert e.n_items == e._version.retrieval.n_items            # nothing was added


fastapi = pytest.importorskip("fastapi", reason="the HTTP service needs the serve extra")
from test_service import TOKEN, running  # noqa: E402

from rec_engine.service import create_app  # noqa: E402


def test_catalogue_over_http(trained):  # noqa: F811
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e, running(create_app(e, token=TOKEN)) as client:
        vec = (_user_vec(e, 3) * 50).tolist()
        body = {"items": [{"key": NEW[0], "vector": vec, "features": {"category": 2}}]}
        assert client.request("POST", "/items", body)[0] == 401
        st, got = client.request("POST", "/items", body, headers=auth)
        assert st == 200 and got["added"] == 1
        st, rec = client.request("POST", "/recommend", {"user": 3, "k": 50, "context": CTX})
        assert NEW[0] in rec["items"]                 # retrieved first, then ranked among the 50 candidates
        assert client.request("POST", "/items", {"items": [{"key": NEW[1], "vector": [1.0]}]}, headers=auth)[0] == 400
        assert client.request("POST", "/items", {"items": [{"key": NEW[1]}]}, headers=auth)[0] == 400   # no vector
        st, _ = client.request("POST", "/items/remove", {"items": [NEW[0]]}, headers=auth)
        assert st == 200
        st, rec = client.request("POST", "/recommend", {"user": 3, "k": 50, "context": CTX})
        assert NEW[0] not in rec["items"]
        assert client.request("POST", "/items/remove", {"items": [123456789]}, headers=auth)[0] == 400


@pytest.mark.parametrize("index", ["int8", "bf16"])
def test_a_reduced_precision_index_takes_added_items(trained, tmp_path, index):  # noqa: F811
    """Items added to an engine scanning an int8 / bf16 index are scored exactly in float32 beside it: the
    merged answer equals an exact scan of the grown table (the index re-scores its shortlist exactly)."""
    with Engine.load(trained.bundle("pipe_a"), events=tmp_path / "ev.db", num_threads=1, index=index) as e:
        r = e._version.retrieval
        assert r.index is not None
        n0 = e.n_items
        rng = np.random.default_rng(0)
        u = _user_vec(e, 3)
        vecs = np.vstack([u * 50, rng.normal(size=(40, len(u))) * np.abs(r.items).mean() * 3]).astype(np.float32)
        keys = [20_000_000 + j for j in range(len(vecs))]
        e.add_items(keys, vectors=vecs)
        assert e.n_items == n0 + len(vecs)
        table = np.asarray(r.items)
        for user in (3, 4, 5, 6):
            state = e._version.user_state(user, e.online)
            q = r.user_vectors([state])[0][0]
            seen = r.seen(state)
            got = r.retrieve(state, 30, exclude=seen)
            s = table @ q
            if seen is not None and len(seen):
                s[np.asarray(seen)] = -np.inf
            want = np.argsort(-s, kind="stable")[:30]
            np.testing.assert_allclose(got.scores, s[want], rtol=1e-5, atol=1e-5)
            assert len(set(got.ids.tolist()) & set(want.tolist())) >= 29
        assert r.retrieve(e._version.user_state(3, e.online), 1).ids.tolist() == [n0]
        # the batched path merges the same way
        states = [e._version.user_state(u_, e.online) for u_ in (3, 4)]
        for st, b in zip(states, r.retrieve_batch(states, 30)):
            np.testing.assert_array_equal(b.ids, r.retrieve(st, 30).ids)
        e.remove_items([keys[0]])
        assert keys[0] not in e.recommend(3, k=50, context=CTX).items.tolist()
