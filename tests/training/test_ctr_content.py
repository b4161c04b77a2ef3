"""Content features in the ranking model: one code path at training and at serving time. Training builds each
item's ``labels`` and ``content_*`` fields from its item content (ContentProjection of its text vector); the
serving ranker builds the same fields for an item added online from the same labels and text vector."""
from __future__ import annotations

import numpy as np
import pytest

from rec_engine.content import ContentProjection

pytest.importorskip("torch", reason="training needs torch (train extra)")


def _world(seed=0, n_users=120, n_items=50, c=24):
    from rec_engine_train.content_map import ItemContent
    from rec_engine_train.data.loaders import RatedInteractions

    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(n_items, c)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    has = np.ones(n_items, bool)
    has[[4, 9]] = False
    vec[~has] = 0
    genres = ["drama", "comedy", "horror", "sci-fi"]
    labels = [[genres[i % 4]] + ([genres[(i // 4) % 4]] if i % 3 == 0 else []) for i in range(n_items)]
    labels[9] = []
    taste = rng.normal(size=(n_users, c))
    n = 3000
    users, items = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    score = np.einsum("ij,ij->i", taste[users], vec[items]) + 0.3 * rng.normal(size=n)
    ratings = np.clip(np.round(3 + 2 * score), 1, 5).astype(np.float32)
    inter = RatedInteractions(users, items, n_users, n_items, timestamps=np.arange(n, dtype=np.int64) * 60,
                              keys={"user": np.array([f"u{i}" for i in range(n_users)], object),
                                    "item": np.array([f"m{i}" for i in range(n_items)], object)},
                              ratings=ratings)
    return inter, ItemContent(vec, has, {"encoder_model": "test"}, [""] * n_items, None, labels)


def test_projection_is_whitened_pca_of_the_fitted_vectors():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
    p = ContentProjection.fit(x, 5)
    z = p.project(x.astype(np.float32)).astype(np.float64)
    assert np.allclose(z.mean(0), 0, atol=1e-4)
    assert np.allclose(np.cov(z.T), np.eye(5), atol=1e-3)             # unit variance, uncorrelated
    # the axes span the top-5 principal subspace (NumPy's eigendecomposition of the covariance)
    w, v = np.linalg.eigh(np.cov((x - x.mean(0)).T))
    top = v[:, np.argsort(w)[::-1][:5]]
    q, _ = np.linalg.qr(p.axes.astype(np.float64))
    assert np.allclose(np.abs(np.linalg.svd(top.T @ q)[1]), 1, atol=1e-4)
    f = p.features(np.vstack([x[:2], np.zeros((1, 16))]).astype(np.float32), np.array([True, False, True]))
    assert f["content_0"][1] is None and f["content_0"][2] is None          # no text: missing
    assert f["content_3"][0] == pytest.approx(float(z[0, 3]), rel=1e-5)
    with pytest.raises(ValueError):
        ContentProjection.fit(x, 0)
    with pytest.raises(ValueError):
        p.project(np.zeros((2, 3), np.float32))


def test_ranker_builds_an_added_items_fields_as_training_built_them(tmp_path):
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import load_ranking
    from rec_engine_train import defaults, pipeline
    from rec_engine_train.data.ratings_ctr import ratings_ctr

    inter, content = _world()
    data = ratings_ctr(inter, content=content, content_dim=6, seed=0)
    assert {f"content_{j}" for j in range(6)} | {"labels"} <= set(data.schema.names)
    cfg = defaults.resolve_config("deepfm", data, {"epochs": 1}, {}, seed=0, num_threads=1, progress=False)
    result = pipeline.train("deepfm", data, cfg, log=lambda s: None)
    path = pipeline.export(result, data, tmp_path / "dfm")
    b = open_bundle(path)
    assert b.meta["content"]["fields"] == [f"content_{j}" for j in range(6)]
    ranker = load_ranking(b)
    n = ranker.n_items
    assert n == inter.n_items and ranker.content is not None
    probe = [0, 4, 9, int(data.extra["cold_items"][0])]      # with text, without text, without anything, cold
    ranker.add_items([{"item_id": i, "labels": content.labels[i]} for i in probe], content.vectors[probe])
    F = len(ranker.item_fields)
    pos = range(F)
    store = ranker.items.batch
    for j, i in enumerate(probe):
        for p in pos:
            a, b_ = store.offsets[i * F + p], store.offsets[i * F + p + 1]
            c, d = store.offsets[(n + j) * F + p], store.offsets[(n + j) * F + p + 1]
            assert np.array_equal(store.indices[a:b_], store.indices[c:d]), (i, ranker.item_fields[p])
            assert np.allclose(store.weights[a:b_], store.weights[c:d], rtol=1e-5, atol=1e-6), (i, ranker.item_fields[p])
    # an item without text has empty content bags; an item with text has one entry in each
    cpos = ranker.item_fields.index("content_0")
    assert store.offsets[4 * F + cpos + 1] == store.offsets[4 * F + cpos]
    assert store.offsets[0 * F + cpos + 1] - store.offsets[0 * F + cpos] == 1
    # scores: each added twin scores like the item itself
    s = ranker.score_candidates(3, np.array(probe + [n + j for j in range(len(probe))]))
    assert np.allclose(s[:len(probe)], s[len(probe):], rtol=1e-5)


def test_profile_features_are_computed_alike_at_training_and_serving_time(tmp_path):
    """Training computes each example's profile features as of its time (asof_features over the ratings);
    the engine computes them from the events it observed; the ranker scores a candidate with them exactly as
    the model scores the encoded example."""
    from rec_engine.bundle import open_bundle
    from rec_engine.engine import Engine
    from rec_engine.profiles import ItemInfo, ProfileConfig, asof_features
    from rec_engine_train import defaults, pipeline
    from rec_engine_train.data.ratings_ctr import ratings_ctr

    inter, content = _world(seed=3)
    data = ratings_ctr(inter, content=content, content_dim=4, seed=0, profiles=True)
    assert {"profile_tag_overlap", "profile_content_cosine"} <= set(data.schema.names)
    cfg = defaults.resolve_config("deepfm", data, {"epochs": 1}, {}, seed=0, num_threads=1, progress=False)
    result = pipeline.train("deepfm", data, cfg, log=lambda s: None)
    path = pipeline.export(result, data, tmp_path / "dfm")
    assert open_bundle(path).meta["pair_fields"] == ["profile_tag_overlap", "profile_content_cosine"]

    class Clock:
        t = 5e8

        def __call__(self):
            return self.t

    clock = Clock()
    rng = np.random.default_rng(0)
    user = "u7"
    evs = []
    with Engine.load(path, num_threads=1, events=tmp_path / "ev.db", clock=clock, profiles=True) as e:
        for j in range(12):
            clock.t += float(rng.uniform(1000, 200000))
            item = int(rng.integers(0, inter.n_items))
            value = float(rng.integers(1, 6))
            e.observe(user, [f"m{item}"], kind="rating", value=value)
            evs.append((item, clock.t, value))
        clock.t += 10.0
        cands = [f"m{i}" for i in range(inter.n_items)]
        rec = e.recommend(user, k=inter.n_items, candidates=cands, exclude_seen=False)
        got = dict(zip(rec.items.tolist(), rec.scores.tolist()))
        # training's computation of the same examples' features: the same events, examples at "now"
        info = ItemInfo.from_tag_lists(content.labels, {"content": content.vectors})
        items = np.array([i for i, _, _ in evs])
        feats = asof_features((np.zeros(len(evs), np.int64), items, np.full(len(evs), "rating", object),
                               np.array([t for _, t, _ in evs]), np.array([v for _, _, v in evs])),
                              (np.zeros(inter.n_items, np.int64), np.arange(inter.n_items),
                               np.full(inter.n_items, clock.t)), info, ProfileConfig())
        served = e._version.profiles.features(user, np.arange(inter.n_items))
        np.testing.assert_allclose(served[:, :2], feats[:, :2], rtol=1e-5, atol=1e-6)
        assert np.abs(feats[:, 0]).max() > 0 and np.abs(feats[:, 1]).max() > 0
        # the ranker's score of each candidate equals the model's score of the fully encoded example
        r = e._version.ranking
        uid = 7
        ent = data.extra["entity_features"]["item"]
        rows = [{"user_id": uid, **{k: (v[i] if not isinstance(v, np.ndarray) else v[i].item()) for k, v in ent.items()},
                 "profile_tag_overlap": float(feats[i, 0]), "profile_content_cosine": float(feats[i, 1])}
                for i in range(inter.n_items)]
        want = r.score_rows(rows)
        np.testing.assert_allclose([got[f"m{i}"] for i in range(inter.n_items)], want, rtol=1e-4, atol=1e-6)
