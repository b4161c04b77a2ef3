"""Batched recommendation, the reduced-precision retrieval index, the precomputed cold-start fallback and the
bound ONNX path at large candidate counts: each against single calls, the exact scan or a brute-force
recomputation."""
from __future__ import annotations

import numpy as np
import pytest

import rec_engine
from rec_engine import topk
from rec_engine.bundle import open_bundle, write_pipeline
from rec_engine.engine import Engine
from rec_engine.keys import UnknownKeyError
from serving_fixtures import torch_two_stage

CONTEXTS = [{"hour": 9.0, "device": "android"}, {"hour": 23.0, "device": "ios"}, {}, {"device": "web"}, None]


def _same(batch, singles, rtol=1e-5, batched=True):
    assert len(batch) == len(singles)
    for b, s in zip(batch, singles):
        np.testing.assert_array_equal(b.ids, s.ids)
        np.testing.assert_array_equal(b.items, s.items)
        np.testing.assert_allclose(b.scores, s.scores, rtol=rtol, atol=1e-6)
        assert b.fallback == s.fallback and b.version == s.version and b.user == s.user
        assert b.timings.get("batch_size") == (len(batch) if batched else None)


def _screen_every_batch(e: Engine):
    """Makes the engine's float32 retrieval screen every batch of 4 users or more in bf16 (ItemIndex with
    copy=False), which by default only batches of 64 users over 65,536 items or more take."""
    r = e._version.retrieval
    r.screen_min_batch, r.screen_min_items = 4, 0
    return r


@pytest.mark.parametrize("bundle", ["pipe_a", "lightgcn"])
@pytest.mark.parametrize("index", [None, "int8", "screen"])
def test_batch_equals_single_calls(trained, rng, bundle, index):
    """Known users, unknown users (cold start), users with observed events, repeats, per-user contexts."""
    with Engine.load(trained.bundle(bundle), index=None if index == "screen" else index) as e:
        if index == "screen":
            r = _screen_every_batch(e)
        e.observe(3, [1, 2, 3])
        e.observe(50_000, [4, 5])                    # unknown to the model, known online (fold-in)
        users = [int(u) for u in rng.integers(0, 400, 40)] + [3, 50_000, 90_001, 90_002, 3]
        ctxs = [CONTEXTS[j % len(CONTEXTS)] for j in range(len(users))]
        for kw in (dict(), dict(exclude_seen=False), dict(exclude=[7, 8, 9]), dict(n_candidates=120)):
            k = int(rng.integers(1, 30))
            batch = e.recommend_batch(users, k, contexts=ctxs, **kw)
            singles = [e.recommend(u, k, context=c, **kw) for u, c in zip(users, ctxs)]
            _same(batch, singles)
            assert any(r.fallback for r in batch) and not all(r.fallback for r in batch)
        one_ctx = e.recommend_batch(users[:5], 10, context=CONTEXTS[0])
        _same(one_ctx, [e.recommend(u, 10, context=CONTEXTS[0]) for u in users[:5]])
        if index == "screen":     # the batches went through the screen (its norms: one per item)
            assert r._screen is not None and r._screen[1].norm.shape == (len(r.items),)
            assert not r._screen[1].copy and r.index is None
            bs = e.index["batch_screen"]      # reported: the threshold, the queries screened so far
            assert e.index["precision"] == "float32" and bs["min_batch"] == 4
            assert bs["queries"] >= 4 * (len(users) - 2) and bs["rescans"] <= bs["queries"]   # (2 cold-start users)


def test_best_first_is_the_lexsort_order_of_the_best_k(rng):
    """_best_first (the ranking's pick of a request's best k) equals np.lexsort((ids, -p))[:k]: score
    descending, equal scores by lower id, NaN last; random scores, many ties at the k-th one, NaN, k past
    the number of candidates, k = 0."""
    from rec_engine.engine import _best_first

    for trial in range(300):
        n = int(rng.integers(0, 700))
        ids = rng.permutation(10 * n + 1)[:n].astype(np.int64)
        p = rng.random(n).astype(np.float32)
        if trial % 3 == 1:
            p = np.round(p * 4) / 4           # a handful of values: ties everywhere, at the k-th one too
        if trial % 5 == 2 and n:
            p[rng.integers(0, n, max(1, n // 3))] = np.nan
        if trial % 7 == 3:
            p[:] = 0.5
        k = int(rng.integers(0, 30)) if trial % 2 else int(rng.integers(1, max(2, n + 5)))   # (small: the partition)
        got = _best_first(ids, p, k)
        want = np.lexsort((ids, -p))[:k]
        np.testing.assert_array_equal(ids[got], ids[want])
        np.testing.assert_array_equal(p[got], p[want])


def test_screened_batches_take_items_added_online(trained, tmp_path, rng):
    """Items added to a float32 engine while its batches are screened: the screen covers the rows it was built
    over and the new ones are scanned in float32 beside it (or it is built anew once the table has moved as it
    grew); every batch equals single calls and an exact scan of the grown table."""
    with Engine.load(trained.bundle("pipe_a"), events=tmp_path / "ev.db", num_threads=1) as e:
        r = _screen_every_batch(e)
        users = [int(u) for u in rng.integers(0, 400, 12)]
        e.recommend_batch(users, 10, context=CONTEXTS[0])
        first = r._screen[1] if r._screen else None
        d = r.items.shape[1]
        for step in range(3):
            n0 = e.n_items
            vecs = (rng.normal(size=(5 + 200 * step, d)) * np.abs(r.items).mean() * 4).astype(np.float32)
            feats = [{"category": int(rng.integers(0, 8)), "brand": int(rng.integers(0, 20)),
                      "price": float(rng.uniform(1, 90))} for _ in vecs]   # (distinct items: no tied scores)
            e.add_items([30_000_000 + 10_000 * step + j for j in range(len(vecs))], vectors=vecs, features=feats)
            assert e.n_items == n0 + len(vecs)
            # at once, not at the next batch: a screen over a buffer the table has moved out of is let go
            assert r._screen is None or np.shares_memory(r._screen[0][:1], r.items[:1])
            states = [e._version.user_state(u, e.online) for u in users]
            table = np.asarray(r.items)
            for st, b in zip(states, r.retrieve_batch(states, 30, excludes=[r.seen(st) for st in states])):
                s = table @ r.user_vectors([st])[0][0]
                s[np.asarray(r.seen(st))] = -np.inf
                np.testing.assert_allclose(b.scores, np.sort(s)[::-1][:30], rtol=1e-5, atol=1e-5)
                assert (b.ids >= n0).any() or step == 0
            batch = e.recommend_batch(users, 10, context=CONTEXTS[0])
            _same(batch, [e.recommend(u, 10, context=CONTEXTS[0]) for u in users])
            # the screen covers the first rows of the table in use, never a buffer the table has moved out of
            screen = r._screen[1]
            assert len(screen.items) <= len(r.items) and np.shares_memory(screen.items[:1], r.items[:1])
        assert first is not None and first.norm.shape == (300,)


def test_batch_with_candidates_and_the_sequential_family(trained, trained_sasrec, rng):
    with Engine.load(trained.bundle("pipe_a")) as e:
        cands = [int(i) for i in rng.choice(300, 40, replace=False)]
        users = [0, 5, 77, 12345]
        _same(e.recommend_batch(users, 10, candidates=cands, contexts=CONTEXTS[:4]),
              [e.recommend(u, 10, candidates=cands, context=c) for u, c in zip(users, CONTEXTS[:4])],
              batched=False)     # (candidates: answered user by user)
    _res, _seq, path = trained_sasrec
    with Engine.load(path) as e:
        e.observe(2, [10, 11])
        users = [int(u) for u in rng.integers(0, 300, 20)] + [2, 99_999]
        _same(e.recommend_batch(users, 15), [e.recommend(u, 15) for u in users])


def test_batch_argument_errors(trained):
    with Engine.load(trained.bundle("pipe_a")) as e:
        assert e.recommend_batch([], 10) == []
        with pytest.raises(ValueError, match="not both"):
            e.recommend_batch([1, 2], context={}, contexts=[{}, {}])
        with pytest.raises(ValueError, match="2 entries for 3 users"):
            e.recommend_batch([1, 2, 3], contexts=[{}, {}])
        with pytest.raises(TypeError, match=r"contexts\[1\]"):
            e.recommend_batch([1, 2], contexts=[{}, 5])
        with pytest.raises(TypeError, match="sequence of user keys"):
            e.recommend_batch("abc")
        with pytest.raises(TypeError, match="integer key"):
            e.recommend_batch([1, "x"])
        with pytest.raises(ValueError, match="k must be >= 0"):
            e.recommend_batch([1], -1)
        with pytest.raises(TypeError, match="unexpected keyword"):
            e.recommend_batch([1], 10, contxt={})
        with pytest.raises(UnknownKeyError):
            e.recommend_batch([1], 10, exclude=[10**9])
        with pytest.raises(ValueError, match="does not know"):
            e.recommend_batch([1, 2], 10, contexts=[{}, {"no_such_field": 1}])


def test_cold_start_order_is_the_popularity_top_k(trained, rng):
    """The precomputed order gives what top-k over the popularity column gives, with exclusions and ties."""
    with Engine.load(trained.bundle("lightgcn")) as e:
        v = e._version
        counts = rng.integers(0, 5, len(v.popular)).astype(np.float32)   # many ties
        v.popular = np.ascontiguousarray(counts[:, None])
        v._popular_order = None
        for n, n_ex in [(1, 0), (10, 0), (10, 20), (50, 3), (300, 10), (400, 0), (299, 299)]:
            ex = rng.choice(len(counts), n_ex, replace=True) if n_ex else None
            got = v.popular_items(n, ex)
            want = topk(np.ones(1, np.float32), v.popular, n, exclude=ex)
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_array_equal(got.scores, want.scores)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_pipeline_index_is_stored_memory_mapped_and_reported(trained, tmp_path, precision):
    path = write_pipeline(tmp_path / "p", retrieval=trained.bundle("lightgcn"), ranking=trained.bundle("deepfm"),
                          n_candidates=50, index=precision)
    meta = open_bundle(path).meta["index"]
    assert meta["precision"] == precision and meta["recall_at"] == 50 and meta["recall_users"] > 0
    assert meta["recall_min"] == meta["recall"] == 1.0        # the exact mode: every shortlist checked
    with Engine.load(path, scan_memory="mmap") as e:
        assert isinstance(e._version.retrieval.index.packed, np.memmap)       # the bundle's arrays, not rebuilt
        assert not e._version.retrieval.items.flags.writeable                 # a view of the read-only mapping
        mapped = e.recommend(3, 10, context=CONTEXTS[0])
    with Engine.load(path) as e, Engine.load(trained.bundle("pipe_a")) as exact:
        assert e.index == {**meta, "exact": True, "queries": 0, "rescans": 0}
        index = e._version.retrieval.index                                    # default: read into memory
        assert not isinstance(index.packed, np.memmap)
        assert not e._version.retrieval.items.flags.writeable       # the float32 items stay mapped (re-scoring only)
        assert exact._version.retrieval.items.flags.owndata          # a float32 scan: its table read in
        np.testing.assert_array_equal(index.packed, open_bundle(path).array(f"index_{precision}_packed"))
        copied = e.recommend(3, 10, context=CONTEXTS[0])
        np.testing.assert_array_equal(copied.ids, mapped.ids)
        np.testing.assert_array_equal(copied.scores, mapped.scores)
        for u in range(0, 400, 7):   # the same candidates as the float32 scan, so the same recommendations
            a, b = e.recommend(u, 10, context=CONTEXTS[0]), exact.recommend(u, 10, context=CONTEXTS[0])
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
        info = e.index
        assert info["queries"] >= 58 and 0 <= info["rescans"] <= info["queries"]
    with Engine.load(path, index="float32") as e:
        assert e.index == {"precision": "float32"} and e._version.retrieval.index is None
    other = "bf16" if precision == "int8" else "int8"
    with Engine.load(path, index=other) as e:      # another precision than stored: built at load
        assert e.index == {"precision": other, "exact": True, "queries": 0, "rescans": 0}
        assert e._version.retrieval.index.precision == other


def test_index_scores_are_exact_and_bad_settings_are_refused(trained, tmp_path):
    with Engine.load(trained.bundle("lightgcn"), index="int8") as e:
        items = e._version.retrieval.items
        users = e._version.retrieval.users.gather(np.arange(20))
        for u in range(20):
            rec = e.recommend(u, 10)
            np.testing.assert_allclose(rec.scores, items[rec.ids] @ users[u], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="index must be one of"):
        Engine.load(trained.bundle("lightgcn"), index="int4")
    with pytest.raises(ValueError, match="scan_memory must be"):
        Engine.load(trained.bundle("lightgcn"), scan_memory="disk")
    with pytest.raises(ValueError, match="index must be one of"):
        write_pipeline(tmp_path / "x", retrieval=trained.bundle("lightgcn"), index="fp8")
    with pytest.raises(ValueError, match="needs a retrieval stage"):
        write_pipeline(tmp_path / "y", ranking=trained.bundle("deepfm"), index="int8")


def test_large_candidate_count_through_the_engine_equals_the_torch_reference(trained):
    """290 candidates (above the former 256-row limit of the bound ONNX path) on the numeric-feature
    (general) path, and a second request of another size on the same thread."""
    ctx = {"hour": 9.0, "device": "android"}
    with Engine.load(trained.bundle("pipe_a")) as e:
        for user, n in ((0, 290), (7, 260), (0, 290)):
            rec = e.recommend(user, k=20, context=ctx, n_candidates=n)
            ref_ids, ref_scores = torch_two_stage(trained, user, 20, n, ctx)
            np.testing.assert_array_equal(rec.items, ref_ids)
            np.testing.assert_allclose(rec.scores, ref_scores, atol=1e-5)


def test_int8_ranking_is_stored_reported_and_close_to_float32(trained, tmp_path, rng):
    pytest.importorskip("onnx", reason="quantizing the ranking model needs the onnx package")
    path = write_pipeline(tmp_path / "p", retrieval=trained.bundle("lightgcn"), ranking=trained.bundle("deepfm"),
                          n_candidates=50, ranking_precision="int8")
    meta = open_bundle(path).meta["ranking"]
    assert meta["precision"] == "int8" and meta["users"] > 0 and meta["candidates"] == 50
    assert 0 < meta["max_abs_diff"] < 0.05 and meta["top_overlap"] >= 0.8
    with Engine.load(path) as e, Engine.load(trained.bundle("pipe_a")) as exact:
        assert e.ranking_info == meta and exact.ranking_info == {"precision": "float32"}
        for u in rng.integers(0, 400, 10).tolist():
            a, b = e.recommend(u, 10, context=CONTEXTS[0]), exact.recommend(u, 10, context=CONTEXTS[0])
            # the same candidates, scored by the int8 model: what the float32 model says of those items is close
            pa = exact._version.ranking.score_candidates(u, a.ids, CONTEXTS[0])
            np.testing.assert_allclose(a.scores, pa, atol=meta["max_abs_diff"] * 4 + 1e-3)
            assert len(set(a.ids.tolist()) & set(b.ids.tolist())) >= 7
        # activations are quantized per call (scales from the call's own values): a batch ranks near-ties
        # of its users slightly differently from single calls
        for b, one in zip(e.recommend_batch([1, 2, 3], 10, contexts=CONTEXTS[:3]),
                          [e.recommend(u, 10, context=c) for u, c in zip([1, 2, 3], CONTEXTS[:3])]):
            assert len(set(b.ids.tolist()) & set(one.ids.tolist())) >= 8
            np.testing.assert_allclose(np.sort(b.scores), np.sort(one.scores), atol=meta["max_abs_diff"] * 4 + 1e-3)
    with Engine.load(trained.bundle("pipe_a"), ranking_precision="int8") as e:    # quantized at load
        assert e.ranking_info == {"precision": "int8"}
        with Engine.load(path) as stored:
            np.testing.assert_allclose(e.recommend(5, 10, context=CONTEXTS[1]).scores,
                                       stored.recommend(5, 10, context=CONTEXTS[1]).scores, atol=1e-6)
    with Engine.load(path, ranking_precision="float32") as e:
        assert e.ranking_info == {"precision": "float32"}
    with pytest.raises(ValueError, match="ranking_precision must be"):
        Engine.load(path, ranking_precision="fp16")
    with pytest.raises(ValueError, match="needs a ranking stage"):
        write_pipeline(tmp_path / "q", retrieval=trained.bundle("lightgcn"), ranking_precision="int8")


@pytest.mark.parametrize("precision", ["bf16x3", "bf16"])
def test_tile_ranking_is_stored_reported_and_close_to_float32(trained, tmp_path, rng, precision):
    """ranking_precision="bf16x3" / "bf16": the dense part's products on AMX-BF16 tiles where this CPU has them
    (ranking_info["tiles"]), float32 where not; close to float32's probabilities; a batch answers as single calls
    (the same arithmetic a row wherever it is scored)."""
    pytest.importorskip("onnx", reason="the native dense part is read from the ONNX graph (serve extra)")
    tiles = rec_engine._core.amx_enabled()
    path = write_pipeline(tmp_path / "p", retrieval=trained.bundle("lightgcn"), ranking=trained.bundle("deepfm"),
                          n_candidates=50, ranking_precision=precision)
    meta = open_bundle(path).meta["ranking"]
    assert meta["precision"] == precision and meta["users"] > 0 and meta["candidates"] == 50
    assert meta["tiles"] == tiles
    bound = {"bf16x3": 1e-5, "bf16": 2e-2}[precision] if tiles else 0.0
    assert meta["max_abs_diff"] <= bound and meta["top_overlap"] >= (0.99 if precision == "bf16x3" else 0.8)
    with Engine.load(path) as e, Engine.load(trained.bundle("pipe_a")) as exact:
        assert e.ranking_info["precision"] == precision and e.ranking_info["tiles"] == tiles
        assert (e._version.ranking.runner.native is not None
                and e._version.ranking.runner.native.precision == precision)
        users = rng.integers(0, 400, 8).tolist()
        for u, c in zip(users, CONTEXTS * 2):
            a = e.recommend(u, 10, context=c)
            pa = exact._version.ranking.score_candidates(u, a.ids, c)    # float32 on the same items
            np.testing.assert_allclose(a.scores, pa, rtol=0, atol=bound * 4 + 1e-6)
            if not tiles:
                np.testing.assert_array_equal(a.ids, exact.recommend(u, 10, context=c).ids)
        ctxs = [CONTEXTS[j % 4] for j in range(len(users))]
        for b, u, c in zip(e.recommend_batch(users, 10, contexts=ctxs), users, ctxs):
            one = e.recommend(u, 10, context=c)
            np.testing.assert_array_equal(b.ids, one.ids)
            np.testing.assert_allclose(b.scores, one.scores, rtol=0, atol=1e-6)
    with Engine.load(trained.bundle("pipe_a"), ranking_precision=precision) as e:    # as an engine option
        assert e.ranking_info == {"precision": precision, "tiles": tiles}
    with Engine.load(path, ranking_precision="float32") as e:
        assert e.ranking_info == {"precision": "float32"}
        assert e._version.ranking.runner.native.precision == "float32"
    with pytest.raises(ValueError, match="needs a ranking stage"):
        write_pipeline(tmp_path / "q", retrieval=trained.bundle("lightgcn"), ranking_precision=precision)


def test_pipeline_command_and_serve_options(trained, tmp_path, capsys, monkeypatch):
    import json

    from rec_engine import cli

    out = tmp_path / "p"
    assert cli.main(["pipeline", "--retrieval", str(trained.bundle("lightgcn")), "--ranking",
                     str(trained.bundle("deepfm")), "--out", str(out), "--candidates", "40", "--index", "int8"]) == 0
    printed = capsys.readouterr().out
    meta = open_bundle(out).meta
    assert meta["n_candidates"] == 40 and meta["index"]["precision"] == "int8"
    assert f"recall of the exact top 40 over {meta['index']['recall_users']} users" in printed
    assert cli.main(["pipeline", "--ranking", str(trained.bundle("deepfm")), "--out", str(out)]) == 2   # exists
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", str(out), "--index", "int4"])
    pytest.importorskip("fastapi", reason="the app factory needs the serve extra")
    from rec_engine import service

    monkeypatch.setenv(service.SETTINGS_ENV, json.dumps({"bundle": str(out), "index": "bf16"}))
    app = service._app_from_env()
    assert app.state.engine.index["precision"] == "bf16" and app.state.engine.index["exact"]
    from fastapi.testclient import TestClient

    client = TestClient(app)
    assert client.post("/recommend", json={"user": 3, "k": 5}).status_code == 200
    text = client.get("/metrics").text
    assert 'rec_engine_index_queries{kind="scanned"} 1.0' in text and 'kind="rescanned"' in text
    app.state.engine.close()


def test_engine_threads_reach_the_ranker(trained):
    """Engine(num_threads=n): the request's top-k, its pooling and its dense part's row chunks on n threads;
    bad values are refused at construction, naming num_threads."""
    for nt, want in ((1, 1), (3, 3), (np.int64(2), 2), (None, rec_engine.default_num_threads())):
        with Engine.load(trained.bundle("pipe_a"), num_threads=nt) as e:
            ranker = e._version.ranking
            assert ranker.runner.request_threads == want and ranker._nt == want
    for bad, err in ((0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="num_threads"):
            Engine.load(trained.bundle("pipe_a"), num_threads=bad)
