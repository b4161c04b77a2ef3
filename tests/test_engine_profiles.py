"""User profiles through the engine: built from the event store at load, updated by observe, served by
Engine.profile and GET /users/{key}/profile, explaining recommendations; against a brute-force recomputation
of the decayed tag affinities from the raw events."""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest

from rec_engine.engine import Engine
from rec_engine.profile_serving import version_tags

from serving_fixtures import trained  # noqa: F401 (fixture)

CTX = {"hour": 12.0, "device": "web"}
DAY = 86400.0


class Clock:
    def __init__(self, t=1.7e9):
        self.t = t

    def __call__(self):
        return self.t


def _brute(events, tags_of, now, half_life_days=14.0, weights=None):
    """Decayed tag affinities of one user's events [(item id, kind, ts)]: sum of w * 2^(-(now-t)/h) / m."""
    weights = weights or {"click": 1.0, "conversion": 3.0}
    h = half_life_days * DAY
    aff = defaultdict(float)
    for i, kind, t in events:
        tags = tags_of[i]
        for tag in tags:
            aff[tag] += weights[kind] * 2.0 ** (-(now - t) / h) / len(tags)
    return dict(aff)


def test_profiles_are_built_at_load_updated_online_and_match_a_brute_force_recomputation(trained, tmp_path):  # noqa: F811
    clock = Clock()
    rng = np.random.default_rng(0)
    path = trained.bundle("pipe_a")
    with Engine.load(path, num_threads=1, events=tmp_path / "ev.db", clock=clock, profiles=True) as e:
        v = e._version
        tags_of = version_tags(v)
        assert any(tags_of) and all(t.split("=")[0] != "item_id" for ts in tags_of for t in ts)
        n = v.n_items
        hist = defaultdict(list)
        for j in range(200):
            clock.t += rng.uniform(0, 2 * DAY)
            user = int(rng.integers(0, 5))
            item = int(rng.integers(0, n))
            kind = "click" if rng.random() < 0.8 else "conversion"
            e.observe(user, [item], kind=kind)
            hist[user].append((item, kind, clock.t))
        now = clock.t + 3 * DAY
        clock.t = now
        for user, evs in hist.items():
            p = e.profile(user, top=1000)
            want = _brute(evs, tags_of, now)
            got = {t: w for t, w in p["tags"]}
            pos = {t: w for t, w in want.items() if w > 1e-12}
            assert set(got) == set(pos)
            for t, w in pos.items():
                assert got[t] == pytest.approx(w, rel=1e-6)
            assert [w for _, w in p["tags"]] == sorted((w for _, w in p["tags"]), reverse=True)
            assert p["counts"]["click"] + p["counts"].get("conversion", 0) == len(evs)
            # the collaborative preference vector: the decayed weighted mean of the items' vectors
            wts = np.array([(1.0 if k == "click" else 3.0) * 2.0 ** (-(now - t) / (14 * DAY)) for _, k, t in evs])
            mean = (wts[:, None] * np.asarray(v.retrieval.items)[[i for i, _, _ in evs]]).sum(0) / wts.sum()
            np.testing.assert_allclose(p["vectors"]["collaborative"], mean, rtol=1e-4, atol=1e-6)
        assert e.profile(10**6) is None                       # no events: no profile
        before = {u: e.profile(u, top=1000) for u in hist}
    # a restart builds the same profiles in bulk from the store
    with Engine.load(path, num_threads=1, events=tmp_path / "ev.db", clock=clock, profiles=True) as e2:
        for u, p in before.items():
            q = e2.profile(u, top=1000)
            assert [t for t, _ in q["tags"]] == [t for t, _ in p["tags"]]
            np.testing.assert_allclose([w for _, w in q["tags"]], [w for _, w in p["tags"]], rtol=1e-5)
        # explanations: the user's tags that the item carries, contributions summing to the overlap feature
        rec = e2.recommend(0, k=10, context=CTX, explain=True)
        prof = {t for t, _ in e2.profile(0, top=10**6)["tags"]}
        tags_of = version_tags(e2._version)
        assert len(rec.explanations) == 10
        for i, ex in zip(rec.ids.tolist(), rec.explanations):
            assert {t for t, _ in ex} <= set(tags_of[i]) & prof
            assert [c for _, c in ex] == sorted((c for _, c in ex), reverse=True)
        feats = e2._version.profiles.features(0, rec.ids)
        full = e2._version.profiles.explain(0, rec.ids, top=None)
        np.testing.assert_allclose([sum(c for _, c in x) for x in full], feats[:, 0], rtol=1e-5, atol=1e-9)


def test_items_added_online_join_the_profiles(trained, tmp_path):  # noqa: F811
    clock = Clock()
    with Engine.load(trained.bundle("pipe_a"), num_threads=1, events=tmp_path / "ev.db", clock=clock,
                     profiles={"min_events": 1}) as e:
        d = e._version.retrieval.items.shape[1]
        e.add_items([90_000_001], vectors=np.ones((1, d), np.float32), features=[{"labels": ["noir", "harbour"]}])
        sp = e._version.profiles
        deadline = time.time() + 10
        while sp.items.n_items < e.n_items and time.time() < deadline:      # the background refresh
            time.sleep(0.01)
        assert sp.items.n_items == e.n_items
        e.observe(4, [90_000_001])
        tags = dict((t, w) for t, w in e.profile(4, top=100)["tags"])
        assert tags["noir"] == pytest.approx(0.5) and tags["harbour"] == pytest.approx(0.5)


def test_profiles_over_http_and_errors(trained, tmp_path):  # noqa: F811
    from rec_engine.service import create_app
    from test_service import running

    with Engine.load(trained.bundle("pipe_a"), num_threads=1, events=tmp_path / "ev.db", profiles=True) as e, \
            running(create_app(e)) as client:
        e.observe(2, [1, 2, 3, 4])
        st, got = client.request("GET", "/users/2/profile?top=3")
        assert st == 200 and got["user"] == 2 and 0 < len(got["tags"]) <= 3
        want = e.profile(2, top=3)["tags"]
        assert [t for t, _ in got["tags"]] == [t for t, _ in want]
        np.testing.assert_allclose([w for _, w in got["tags"]], [w for _, w in want], rtol=1e-6)
        assert client.request("GET", "/users/777777/profile")[0] == 404
        assert client.request("GET", "/users/abc/profile")[0] == 400           # int keys
        assert client.request("GET", "/users/2/profile?top=-1")[0] == 422
        st, rec = client.request("POST", "/recommend", {"user": 2, "k": 5, "context": CTX, "explain": True})
        assert st == 200 and len(rec["explanations"]) == len(rec["items"])
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as plain:
        with pytest.raises(Exception, match="profiles=True"):
            plain.profile(2)
    with pytest.raises(TypeError, match="profiles"):
        Engine.load(trained.bundle("pipe_a"), profiles="yes")
    with pytest.raises(ValueError):
        Engine.load(trained.bundle("pipe_a"), profiles={"half_life_days": -1})
