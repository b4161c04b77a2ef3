"""The Engine: two-stage results against a slow PyTorch reference, feedback, fold-in, event log, swaps."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from rec_engine import propagate
from rec_engine.bundle import BundleError
from rec_engine.engine import Engine
from rec_engine.keys import UnknownKeyError
from rec_engine.graph import normalized_adjacency
from serving_fixtures import torch_two_stage

CTX = {"hour": 9.0, "device": "android"}


@pytest.fixture
def engine(trained):
    with Engine.load(trained.bundle("pipe_a")) as e:
        yield e


@pytest.mark.parametrize("user", [0, 7, 123, 399])
def test_two_stage_equals_torch_models_and_full_sort(engine, trained, user):
    rec = engine.recommend(user, k=10, context=CTX)
    ref_ids, ref_scores = torch_two_stage(trained, user, 10, 50, CTX)
    np.testing.assert_array_equal(rec.items, ref_ids)
    np.testing.assert_allclose(rec.scores, ref_scores, atol=1e-5)
    assert set(rec.timings) == {"retrieval_ms", "ranking_ms", "total_ms"}
    assert rec.version == engine.version and not rec.fallback


def test_retrieval_only_and_ranking_only_bundles(trained):
    from rec_engine_train.models.graph import final_embeddings

    with Engine.load(trained.bundle("lightgcn")) as e:
        rec = e.recommend(5, k=7)
    U, I = final_embeddings(trained.lightgcn.model)
    s = U[5].astype(np.float64) @ I.T
    s[trained.graph_data.train.by_user()[5]] = -np.inf
    np.testing.assert_array_equal(rec.items, np.lexsort((np.arange(len(s)), -s))[:7])
    assert "ranking_ms" not in rec.timings

    with Engine.load(trained.bundle("deepfm")) as e:
        cands = [3, 1, 4, 15, 9, 2, 6]
        rec = e.recommend(5, k=3, candidates=cands, context=CTX, exclude_seen=False)
        probs = e._version.ranking.score_candidates(5, np.array(cands), CTX)
    best = np.lexsort((cands, -probs))[:3]
    np.testing.assert_array_equal(rec.items, np.array(cands)[best])
    assert "retrieval_ms" not in rec.timings


def test_observed_item_disappears_and_stays_out(engine, trained):
    rec = engine.recommend(11, k=5, context=CTX)
    first = int(rec.items[0])
    engine.observe(11, [first])
    again = engine.recommend(11, k=5, context=CTX)
    assert first not in again.items.tolist()
    ref_ids, _ = torch_two_stage(trained, 11, 5, 50, CTX, seen_extra=[first])
    # the user's vector was folded in anew, so the candidates may differ; the seen item never comes back
    assert first not in ref_ids.tolist() and len(again.items) == 5


def test_fold_in_moves_the_user_vector_like_a_repropagation(trained):
    split = trained.graph_data
    with Engine.load(trained.bundle("lightgcn")) as e:
        retr = e._version.retrieval
        user = 21
        old = retr.users.gather(np.array([user]))[0]
        seen = set(split.train.by_user()[user].tolist())
        new_items = [i for i in np.argsort(-split.train.item_counts()) if i not in seen][:8]
        e.observe(user, new_items)
        folded = retr.user_vectors([e._version.user_state(user, e.online)])[0][0]
    # re-propagate the whole graph with the new edges, from the same layer-0 embeddings
    users = np.concatenate([split.train.users, np.full(len(new_items), user)])
    items = np.concatenate([split.train.items, np.asarray(new_items, np.int64)])
    adj = normalized_adjacency(users, items, split.train.n_users, split.train.n_items)
    from rec_engine.bundle import open_bundle
    b = open_bundle(trained.bundle("lightgcn"))
    ego = np.concatenate([b.table("users_ego").to_numpy(), b.table("items_ego").to_numpy()])
    reprop = propagate(adj, ego, int(b.meta["n_layers"]), np.asarray(b.meta["layer_weights"], np.float32))[user]
    move, want = folded - old, reprop - old
    cos = move @ want / (np.linalg.norm(move) * np.linalg.norm(want))
    assert cos > 0.95
    assert np.linalg.norm(folded - reprop) < 0.25 * np.linalg.norm(want)


def test_unknown_user_gets_popular_items_then_a_folded_in_vector(trained):
    with Engine.load(trained.bundle("lightgcn")) as e:
        rec = e.recommend(10_000, k=5)
        counts = trained.graph_data.train.item_counts()
        assert rec.fallback
        np.testing.assert_array_equal(rec.items, np.lexsort((np.arange(len(counts)), -counts))[:5])
        e.observe(10_000, [int(rec.items[0]), int(rec.items[1])])
        after = e.recommend(10_000, k=5)
        assert not after.fallback
        assert {int(rec.items[0]), int(rec.items[1])}.isdisjoint(after.items.tolist())


def test_event_store_survives_a_restart(trained, tmp_path):
    db = tmp_path / "events.db"
    events = [(1, [5, 6]), (2, [7]), (1, [8]), (10_001, [0, 1, 2])]
    with Engine.load(trained.bundle("pipe_a"), events=db) as e:
        for u, items in events:
            e.observe(u, items)
        before = e.recommend(1, k=20, context=CTX)
    with Engine.load(trained.bundle("pipe_a"), events=db) as e2:
        assert e2.online.n_events == sum(len(i) for _, i in events)
        np.testing.assert_array_equal(e2.online.items(1), [5, 6, 8])
        np.testing.assert_array_equal(e2.online.items(10_001), [0, 1, 2])
        after = e2.recommend(1, k=20, context=CTX)
        stored = list(e2.events.read(kinds=["click"]))
        shown = list(e2.events.read(kinds=["impression"]))
    np.testing.assert_array_equal(before.items, after.items)
    assert {5, 6, 8}.isdisjoint(after.items.tolist())
    assert [(ev.user, ev.item) for ev in stored] == [(u, i) for u, items in events for i in items]
    # each recommendation's impression: its request id, version, items and scores as returned
    assert [ev.request_id for ev in shown] == [before.request_id, after.request_id]
    assert shown[0].version == before.version and list(shown[0].items) == before.items.tolist()
    np.testing.assert_allclose(shown[0].scores, before.scores, rtol=1e-6)


def test_an_old_json_lines_log_is_imported_once_torn_last_line_and_all(trained, tmp_path):
    log = tmp_path / "events.jsonl"
    log.write_text('{"ts": 1.0, "user": 1, "items": [5, 6]}\n{"ts": 2.0, "user": 2, "items": [7]}\n{"ts": 3.0, "us')
    for _ in range(2):                      # the second load imports nothing again
        with Engine.load(trained.bundle("pipe_a"), event_log=log) as e:
            assert e.online.items(1) == (5, 6) and e.online.items(2) == (7,)
            assert e.events.count("click") == 3
    assert (tmp_path / "events.db").exists()


def test_feedback_kinds_forget_and_impression_sampling(trained, tmp_path):
    with Engine.load(trained.bundle("pipe_a"), events=tmp_path / "ev.db", impression_sample=0.0) as e:
        rec = e.recommend(3, k=5, context=CTX)
        assert isinstance(rec.request_id, str) and len(rec.request_id) == 32
        e.feedback(3, int(rec.items[0]), request_id=rec.request_id)
        e.feedback(3, int(rec.items[1]), kind="conversion", value=12.5, request_id=rec.request_id)
        e.feedback(3, int(rec.items[2]), kind="rating", value=4.0)
        with pytest.raises(ValueError, match="rating needs value"):
            e.feedback(3, int(rec.items[2]), kind="rating")
        with pytest.raises(ValueError, match="kind must be one of"):
            e.feedback(3, int(rec.items[2]), kind="impression")
        with pytest.raises(TypeError, match="request_id must be a string"):
            e.feedback(3, int(rec.items[2]), request_id=7)
        e.observe(4, [1, 2])
        assert e.events.count("impression") == 0                  # sampled out
        got = [(ev.kind, ev.item, ev.request_id, ev.value) for ev in e.events.read(user=3)]
        assert got == [("click", int(rec.items[0]), rec.request_id, None),
                       ("conversion", int(rec.items[1]), rec.request_id, 12.5),
                       ("rating", int(rec.items[2]), None, 4.0)]
        assert e.recommend(3, k=50, context=CTX).ids.tolist() != []
        assert set(rec.items[:3].tolist()).isdisjoint(e.recommend(3, k=50, context=CTX).items.tolist())
        assert e.forget(3) == 3
        assert e.online.items(3) is None and list(e.events.read(user=3)) == [] and e.events.count() == 2
        again = e.recommend(3, k=50, context=CTX)           # served as the model knows them, nothing excluded
        with Engine.load(trained.bundle("pipe_a")) as plain:
            np.testing.assert_array_equal(again.ids, plain.recommend(3, k=50, context=CTX).ids)


def test_swap_under_load_every_answer_from_one_version(trained):
    users = list(range(0, 400, 17))
    expected = {}
    for name in ("pipe_a", "pipe_b"):
        with Engine.load(trained.bundle(name)) as e:
            expected[e.version] = {u: e.recommend(u, k=10, context=CTX) for u in users}
    assert len(expected) == 2
    engine = Engine.load(trained.bundle("pipe_a"))
    stop = threading.Event()
    errors, answers = [], []

    def worker(seed):
        r = np.random.default_rng(seed)
        while not stop.is_set():
            u = int(r.choice(users))
            try:
                answers.append((u, engine.recommend(u, k=10, context=CTX)))
            except Exception as exc:   # noqa: BLE001 - any error fails the test below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            engine.swap(trained.bundle("pipe_b" if i % 2 == 0 else "pipe_a"))
    finally:
        stop.set()
        for t in threads:
            t.join()
        engine.close()
    assert not errors, errors[:3]
    assert len(answers) > 20
    seen_versions = set()
    for u, rec in answers:
        ref = expected[rec.version][u]
        np.testing.assert_array_equal(rec.items, ref.items)
        np.testing.assert_allclose(rec.scores, ref.scores, atol=1e-6)
        seen_versions.add(rec.version)
    assert seen_versions == set(expected)


def test_a_bundle_that_fails_to_load_leaves_the_old_one_serving(trained, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained.bundle("lightgcn_b"), broken)
    f = broken / "tables" / "items.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x55
    f.write_bytes(bytes(data))
    with Engine.load(trained.bundle("pipe_a")) as e:
        v = e.version
        before = e.recommend(3, k=5, context=CTX)
        with pytest.raises(BundleError, match="sha256"):
            e.swap(broken)
        with pytest.raises(BundleError, match="not a bundle directory"):
            e.swap(tmp_path / "nowhere")
        assert e.version == v
        np.testing.assert_array_equal(e.recommend(3, k=5, context=CTX).items, before.items)


def test_k_larger_than_what_is_left_pads_and_candidates_restrict(engine, trained):
    rec = engine.recommend(4, k=5, candidates=[1, 2, 3], context=CTX, exclude_seen=False)
    assert sorted(rec.items[:3].tolist()) == [1, 2, 3]
    assert rec.items[3:].tolist() == [-1, -1] and np.isneginf(rec.scores[3:]).all()
    assert engine.recommend(4, k=0).items.size == 0
    batch = engine.recommend_batch([1, 2, 3], k=4, context=CTX)
    assert [r.user for r in batch] == [1, 2, 3] and len({r.version for r in batch}) == 1


@pytest.mark.parametrize("call, exc, match", [
    (lambda e: e.recommend("7"), TypeError, "user must be an integer"),
    (lambda e: e.recommend(1, k=-3), ValueError, "k must be >= 0"),
    (lambda e: e.recommend(1, k=2.5), TypeError, "k must be an integer"),
    (lambda e: e.recommend(1, candidates=[1, 10**6]), UnknownKeyError, "candidates: unknown item key 1000000 "),
    (lambda e: e.recommend(1, candidates=[1.5]), TypeError, "candidates: keys of this map are integers"),
    (lambda e: e.recommend(1, exclude=["3"]), TypeError, "exclude: keys of this map are integers, got str"),
    (lambda e: e.recommend(1, context={"colour": "red"}), ValueError, "does not know: \\['colour'\\]"),
    (lambda e: e.observe(1, []), ValueError, "at least one item"),
    (lambda e: e.observe(1, [300]), UnknownKeyError, "items: unknown item key 300 "),
    (lambda e: e.observe(True, [3]), TypeError, "user must be an integer"),
])
def test_bad_requests_raise_clear_errors(engine, call, exc, match):
    with pytest.raises(exc, match=match):
        call(engine)
    assert engine.online.n_events == 0


def test_sasrec_retrieval_follows_the_history_and_observed_items(trained_sasrec):
    from rec_engine_train.models.sasrec import user_vectors

    res, seq, path = trained_sasrec
    user = 17
    history = np.concatenate([seq.train[user], [seq.valid[user]], [seq.test[user]]]).astype(np.int64)

    def reference(hist):
        vec = user_vectors(res.model, [hist])[0].astype(np.float64)
        items = res.model.item_emb.weight.detach().numpy()[1:].astype(np.float64)
        s = items @ vec
        s[hist] = -np.inf
        return np.lexsort((np.arange(len(s)), -s))[:10]

    with Engine.load(path) as e:
        np.testing.assert_array_equal(e.recommend(user, k=10).items, reference(history))
        new = [int(i) for i in e.recommend(user, k=3).items[:2]]
        e.observe(user, new)
        after = e.recommend(user, k=10)
        np.testing.assert_array_equal(after.items, reference(np.concatenate([history, new])))
        cold = e.recommend(5000, k=4)
        assert cold.fallback
        e.observe(5000, [3, 9])
        np.testing.assert_array_equal(e.recommend(5000, k=10).items, reference(np.array([3, 9])))


@pytest.mark.parametrize("sharpen, solver, steps, legacy_meta", [(0.0, "euler", 1, False), (0.3, "euler", 1, False),
                                                                 (0.3, "euler", 1, True), (1.5, "rk4", 2, False)])
def test_gfcf_bundle_is_served_and_folds_observed_items_in(trained, tmp_path, sharpen, solver, steps, legacy_meta):
    from rec_engine_train.export_gfcf import export_gfcf
    from rec_engine_train.models.gfcf import GFCF

    split = trained.graph_data
    model = GFCF(alpha=0.3, k_ideal=32, sharpen=sharpen, sharpen_solver=solver, sharpen_steps=steps,
                 svd="exact").fit(split.train)
    path = export_gfcf(model, tmp_path / "gfcf")
    if legacy_meta:          # a bundle written before meta.sharpen_poly: one Euler step of meta.sharpen
        manifest = path / "manifest.json"
        doc = json.loads(manifest.read_text())
        assert doc["meta"].pop("sharpen_poly") == [1.0, -sharpen]
        doc.pop("digest", None)          # nor a manifest digest
        manifest.write_text(json.dumps(doc))
    with Engine.load(path) as e:
        for u in (0, 9, 250):
            rec = e.recommend(u, k=10)
            ref = model.recommend(np.array([u]), k=10)
            np.testing.assert_array_equal(rec.items, np.asarray(ref.ids).reshape(-1))
            np.testing.assert_allclose(rec.scores, np.asarray(ref.scores).reshape(-1), atol=1e-5)
        new = [int(i) for i in e.recommend(9, k=3).items]
        e.observe(9, new)
        items = np.unique(np.concatenate([split.train.by_user()[9], new]))
        s = model.fold_in([items])[0].astype(np.float64)
        s[items] = -np.inf
        np.testing.assert_array_equal(e.recommend(9, k=10).items, np.lexsort((np.arange(len(s)), -s))[:10])
        assert e.recommend(10_000, k=3).fallback


def _full_rows(ranker, feats, user, cands, ctx):
    """The examples of (user, each candidate, context) as plain columns: the slow path's input."""
    cols = {}
    for name in ranker.schema.names:
        if name in ranker.item_fields:
            cols[name] = [feats["item"][name][i] for i in cands]
        elif name in ranker.user_fields and 0 <= user < len(next(iter(feats["user"].values()))):
            cols[name] = [feats["user"][name][user]] * len(cands)
        else:
            cols[name] = [ctx.get(name)] * len(cands)
    return ranker.schema.encode(cols)


def _check_candidates_path(ranker, feats, n_users, n_items, contexts, rng):
    for ctx in contexts * 2:                          # twice: the second round hits the context cache
        for user in (0, n_users - 1, n_users + 5):
            for n in (1, 7, 64):
                cands = rng.integers(0, n_items, n)
                got = ranker.score_candidates(user, cands, ctx)
                batch = _full_rows(ranker, feats, user, cands, ctx)
                # the reference: the full examples pooled into new arrays and run with session.run (not the
                # IOBinding buffers the request paths use)
                want = 1 / (1 + np.exp(-ranker.logits(batch).astype(np.float64)))
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
                np.testing.assert_allclose(ranker(batch), want, rtol=0, atol=1e-6)


def test_candidate_scoring_equals_scoring_the_full_examples(trained, rng):
    """Feature stores with multi-valued and numeric fields (the general path), several contexts."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import load_ranking

    ranker = load_ranking(open_bundle(trained.bundle("deepfm")))
    feats = trained.ctr_data.extra["entity_features"]
    contexts = [CTX, {}, {"hour": 3.0}, {"device": "never-seen"}, {"hour": np.float32(7), "device": "ios"}]
    assert ranker.items.rows is None                  # multi-valued tags, numeric price: the general path
    _check_candidates_path(ranker, feats, 400, 300, contexts, rng)


def test_contexts_made_of_values_seen_in_other_contexts(trained, rng):
    """A context not seen whole whose field values were seen in other contexts is built from those fields'
    cached pieces: it scores as the full examples do, and its part equals the whole context encoded at once,
    for values of other types (1, 1.0, True and np.float32 each keyed apart), unseen values, missing fields
    and a guest user's fields."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import load_ranking

    ranker = load_ranking(open_bundle(trained.bundle("deepfm")))
    feats = trained.ctr_data.extra["entity_features"]
    seen = [{"hour": 3.0, "device": "ios"}, {"hour": 5, "device": "android"}]
    mixed = [{"hour": 5, "device": "ios"}, {"hour": 3.0, "device": "android"}, {"hour": True, "device": "ios"},
             {"hour": np.float32(3.0)}, {"device": "never-seen", "hour": 5}, {"hour": None, "device": "ios"},
             {"device": True, "hour": float("nan")}, {"device": 1, "hour": ""}, {"device": "True"}]
    _check_candidates_path(ranker, feats, 400, 300, seen + mixed, rng)
    dev, hour = ranker._field_cache["device"], ranker._field_cache["hour"]
    assert {(True, bool), (1, int), ("True", str), ("ios", str)} <= set(dev)
    assert {(3.0, float), (5, int), (True, bool)} <= set(hour)
    assert None in hour and not any(isinstance(k, tuple) and k[1] is float and k[0] != k[0] for k in hour)
    for ctx in mixed:
        for fields, cache in ((ranker.context_fields, ranker._ctx_cache), (ranker.user_fields, ranker._guest_cache)):
            part = cache.get(ranker._context_key(ctx))
            if part is None:      # (a known user's request does not encode the user fields)
                part = ranker._encode_part(ctx, fields, ranker._context_key(ctx), cache)
            rows, e, li = ranker._encode_fields(ctx, fields)
            assert (part[0] is None) == (rows is None)
            if rows is not None:
                np.testing.assert_array_equal(part[0], rows)
            np.testing.assert_array_equal(part[1], e)
            np.testing.assert_array_equal(part[2], li)
            assert not part[1].flags.writeable


def test_single_valued_stores_take_the_direct_path_with_the_same_scores(tmp_path, rng):
    from rec_engine.bundle import open_bundle
    from rec_engine.features import Schema
    from rec_engine.ranking import load_ranking
    from rec_engine_train.export_ctr import export_ctr
    from rec_engine_train.models.ctr import CtrModel

    n_users, n_items = 50, 80
    feats = {"user": {"user_id": np.arange(n_users), "age": rng.integers(0, 5, n_users)},
             "item": {"item_id": np.arange(n_items), "brand": rng.integers(0, 9, n_items)}}
    cols = {**{k: v for k, v in feats["user"].items()}, "device": rng.choice(["a", "b"], n_users)}
    cols_items = {k: np.resize(v, n_users) for k, v in feats["item"].items()}
    schema = Schema.fit({**cols, **cols_items}, hash_buckets=2)
    model = CtrModel("deepfm", schema, 8, {"mlp": [16]})
    ranker = load_ranking(open_bundle(export_ctr(model, tmp_path / "b", entity_features=feats)))
    assert ranker.items.rows is not None and ranker.users.rows is not None
    _check_candidates_path(ranker, feats, n_users, n_items, [{"device": "a"}, {"device": "zz"}, {}], rng)
    # batches on that path too, their chunks scored on two threads at once (one-thread sessions)
    from rec_engine.ranking import CtrRanker

    par = CtrRanker(open_bundle(tmp_path / "b"), batch_threads=2)
    users = [int(u) for u in rng.integers(0, n_users, 12)] + [n_users + 5]
    cands = [rng.integers(0, n_items, int(n)) for n in rng.integers(1, 60, len(users))]
    ctxs = [{"device": "a"}, {}, {"device": "zz"}] * 4 + [{}]
    for got, u, c, x in zip(par.score_candidates_batch(users, cands, ctxs, chunk_rows=50), users, cands, ctxs):
        np.testing.assert_allclose(got, ranker.score_candidates(u, c, x), rtol=1e-5, atol=1e-6)
    assert par._chunk_pool is not None


def test_bound_buffers_give_fresh_results_for_every_size_and_thread(trained, rng):
    """Small batches pool into per-thread input buffers bound to ONNX Runtime: each call's answer is its
    own (a later call does not change an earlier result), for sizes on both sides of the bound limit, from
    8 threads at once."""
    import threading

    from rec_engine import ctr_runner
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import load_ranking

    ranker = load_ranking(open_bundle(trained.bundle("deepfm")))
    runner = ranker.runner
    feats = trained.ctr_data.extra["entity_features"]
    assert runner._bind_rows == ctr_runner._BIND_MAX_ROWS          # a small model: the row limit applies
    sizes = [1, 2, 3, 5, 8, 13, 64, ctr_runner._BIND_MAX_ROWS, ctr_runner._BIND_MAX_ROWS + 1, 700, 1500]
    jobs = [(int(rng.integers(0, 400)), rng.integers(0, 300, n)) for n in sizes for _ in range(2)]
    batches = [_full_rows(ranker, feats, u, c, CTX) for u, c in jobs]
    want = [1 / (1 + np.exp(-ranker.logits(b).astype(np.float64))) for b in batches]
    first = [ranker(b) for b in batches]                   # kept while later calls reuse the buffers
    for got, w in zip(first, want):
        np.testing.assert_allclose(got, w, rtol=0, atol=1e-6)
    assert sorted(runner._tls.bound) == sorted(n for n in sizes if n <= ctr_runner._BIND_MAX_ROWS)   # a binding a size ...
    assert all(b[0].base is not None and np.shares_memory(b[0], runner._tls.buffers[0])         # ... over one buffer
               for b in runner._tls.bound.values())

    errors, barrier = [], threading.Barrier(8)

    def work(t):
        try:
            barrier.wait()
            for r in range(6):
                for j in (np.arange(len(jobs)) + t + r) % len(jobs):
                    u, c = jobs[j]
                    np.testing.assert_allclose(ranker(batches[j]), want[j], rtol=0, atol=1e-6)
                    np.testing.assert_allclose(ranker.score_candidates(u, c, CTX), want[j], rtol=0, atol=1e-6)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads) and not errors, errors
    # ONNX Runtime's public run_with_iobinding (the path taken when its binding internals differ) gives the same
    runner._run_io = runner.session.run_with_iobinding
    for b, w in list(zip(batches, want))[::3]:
        np.testing.assert_allclose(ranker(b), w, rtol=0, atol=1e-6)


def test_fold_in_is_set_up_at_load_not_on_the_first_request(trained):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e:
        r = e._version.retrieval
        assert r.folds_in and r._fold_in is not None          # built with the version, before any request
        e.swap(trained.bundle("pipe_b"))
        assert e._version.retrieval._fold_in is not None
