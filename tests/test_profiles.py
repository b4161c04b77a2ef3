"""User profiles (rec_engine.profiles) against a brute-force recomputation from the raw events (a Python loop
summing w * 2**(-(now - t) / h) per tag, the decayed mean vectors, the counters) on seeded random event
streams: half-lives, kind and rating weights, rebases over long spans and huge jumps, min_events, TTL
eviction and the loader rebuild, the LRU cap, build() against observe() one by one, asof_features against
the serving path (bit-equal), explain against feature column 0, bad input, and 8 threads observing."""
from __future__ import annotations

import json
import math
import sys
import threading
from collections import defaultdict

import numpy as np
import pytest

from rec_engine.events import KINDS, Event, SqliteEventStore
from rec_engine.profiles import (FEATURE_NAMES, ItemInfo, ProfileConfig, Profiles, TagVocab, affinity_features,
                                 asof_features, default_rating_weight, events_arrays_from_store)

T0 = 1_700_000_000.0
DAY = 86400.0
KIND_POOL = np.array(["impression", "click", "click", "conversion", "rating"])


class Clock:
    """A settable wall clock for TTL / LRU."""

    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def make_items(rng, n_items=60, n_tags=15, dims=(("content", 6), ("collaborative", 3)), missing=0.1):
    tags = [[f"Tag {j}" for j in rng.choice(n_tags, rng.integers(0, 6), replace=False)] for _ in range(n_items)]
    vectors = {}
    for name, d in dims:
        v = rng.normal(size=(n_items, d)).astype(np.float32)
        v[rng.random(n_items) < missing] = 0.0            # items without a vector in this space
        vectors[name] = v
    return ItemInfo.from_tag_lists(tags, vectors), tags


def make_events(rng, n, n_users, n_items, span_s, t0=T0):
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)
    kinds = rng.choice(KIND_POOL, n)
    ts = t0 + np.sort(rng.uniform(0, span_s, n))
    values = np.where(kinds == "rating", rng.integers(0, 11, n) / 2.0, np.nan)
    return users, items, kinds, ts, values


def observe_all(prof, users, items, kinds, ts, values):
    for u, i, k, t, v in zip(users.tolist(), items.tolist(), kinds.tolist(), ts.tolist(), values.tolist()):
        prof.observe(u, i, k, t, None if math.isnan(v) else v)


# ---------------------------------------------------------------------------------------- reference
def ref_weight(cfg, kind, value):
    w = cfg.kind_weights.get(kind, 0.0)
    if kind == "rating" and cfg.rating_weight is not None:
        w *= float(np.asarray(cfg.rating_weight(np.array([value], dtype=np.float64)))[0])
    return w


def reference(events, info, tag_lists, cfg, now):
    """Brute force from the raw events of one user: (tags {str: affinity}, vectors {space: mean}, counts, first,
    last, n_pos)."""
    h = cfg.half_life_days * DAY
    tags = defaultdict(float)
    num = {s: np.zeros(v.shape[1]) for s, v in info.vectors.items()}
    den = {s: 0.0 for s in info.vectors}
    counts = defaultdict(int)
    n_pos = 0
    for item, kind, t, value in events:
        counts[kind] += 1
        w = ref_weight(cfg, kind, value)
        n_pos += w > 0
        if w == 0 or item < 0:
            continue
        d = 2.0 ** (-(now - t) / h)
        names = list(dict.fromkeys(" ".join(x.split()).casefold() for x in tag_lists[item]))
        for name in names:
            tags[name] += w * d / len(names)
        if w > 0:
            for s, v in info.vectors.items():
                if np.linalg.norm(v[item]) > 0:
                    num[s] += w * d * v[item].astype(np.float64)
                    den[s] += w * d
    vecs = {s: num[s] / den[s] for s in num if den[s] > 0}
    ts = [e[2] for e in events]
    return dict(tags), vecs, dict(counts), min(ts), max(ts), n_pos


def ref_features(ref_tags, ref_vecs, info, tag_lists, item_ids):
    l1 = sum(abs(x) for x in ref_tags.values())
    out = np.zeros((len(item_ids), 3))
    for r, i in enumerate(item_ids):
        names = list(dict.fromkeys(" ".join(x.split()).casefold() for x in tag_lists[i]))
        if l1 > 0:
            out[r, 0] = sum(ref_tags.get(n, 0.0) / len(names) for n in names) / l1
        for col, s in ((1, "content"), (2, "collaborative")):
            p, x = ref_vecs.get(s), info.vectors[s][i].astype(np.float64)
            if p is not None and np.linalg.norm(x) > 0 and np.linalg.norm(p) > 0:
                out[r, col] = p @ x / (np.linalg.norm(p) * np.linalg.norm(x))
    return out


def user_events(users, items, kinds, ts, values, u):
    m = users == u
    return [(i, k, t, None if math.isnan(v) else v)
            for i, k, t, v in zip(items[m].tolist(), kinds[m].tolist(), ts[m].tolist(), values[m].tolist())]


def assert_matches_reference(prof, info, tag_lists, cfg, users, items, kinds, ts, values, now, *, rtol=1e-9):
    checked = 0
    for u in np.unique(users).tolist():
        ev = user_events(users, items, kinds, ts, values, u)
        r_tags, r_vecs, r_counts, r_first, r_last, r_pos = reference(ev, info, tag_lists, cfg, now)
        p = prof.profile(u, now=now, top=1000)
        if r_pos < cfg.min_events:
            assert p is None
            continue
        checked += 1
        scale = max([abs(x) for x in r_tags.values()] + [1e-300])
        want = sorted(((t, a) for t, a in r_tags.items() if a > rtol * scale), key=lambda x: -x[1])
        got = dict(p.tags)
        assert set(got) >= {t for t, _ in want}
        for t, a in want:
            assert got[t] == pytest.approx(a, rel=rtol, abs=1e-12 * scale)
        assert all(a > 0 for a in got.values())
        assert [a for _, a in p.tags] == sorted((a for _, a in p.tags), reverse=True)
        assert p.counts == r_counts
        assert (p.first_ts, p.last_ts, p.n_positive) == (r_first, r_last, r_pos)
        assert set(p.vectors) == set(r_vecs)
        for s, v in r_vecs.items():
            np.testing.assert_allclose(p.vectors[s], v, rtol=1e-4, atol=1e-5 * np.abs(v).max())
        cand = np.arange(info.n_items)
        np.testing.assert_allclose(prof.features(u, cand, now), ref_features(r_tags, r_vecs, info, tag_lists, cand),
                                   rtol=1e-4, atol=1e-5)
    return checked


# ---------------------------------------------------------------------------------------- decay and weights
@pytest.mark.parametrize("half_life_days", [0.25, 3.0, 365.0])
def test_observe_matches_brute_force_for_half_lives(half_life_days):
    rng = np.random.default_rng(int(half_life_days * 100))
    info, tag_lists = make_items(rng)
    cfg = ProfileConfig(half_life_days=half_life_days, min_events=2)
    prof = Profiles(info, cfg)
    ev = make_events(rng, 600, 12, info.n_items, span_s=40 * DAY)
    observe_all(prof, *ev)
    now = float(ev[3].max()) + 2 * DAY
    assert assert_matches_reference(prof, info, tag_lists, cfg, *ev, now) >= 8


def test_kind_weights_and_rating_weight_are_configurable():
    rng = np.random.default_rng(3)
    info, tag_lists = make_items(rng)
    ev = make_events(rng, 500, 8, info.n_items, span_s=10 * DAY)
    now = float(ev[3].max())
    for cfg in [ProfileConfig(kind_weights={"click": 2.0, "conversion": 0.5, "impression": 0.1, "rating": 2.0},
                              rating_weight=lambda v: np.where(v >= 4, 1.0, -2.0), min_events=1),
                ProfileConfig(rating_weight=None, min_events=1),
                ProfileConfig(kind_weights={"rating": 1.0}, min_events=1)]:      # only ratings count
        prof = Profiles(info, cfg)
        observe_all(prof, *ev)
        assert assert_matches_reference(prof, info, tag_lists, cfg, *ev, now) >= 1


def test_bad_rating_pushes_tags_down():
    info = ItemInfo.from_tag_lists([["drama"], ["comedy"]])
    prof = Profiles(info, ProfileConfig(min_events=1))
    prof.observe("u", 0, "click", T0)
    prof.observe("u", 1, "click", T0)
    prof.observe("u", 0, "rating", T0, value=1.0)      # weight (1 - 2.5) / 2.5 = -0.6
    tags = dict(prof.profile("u", now=T0).tags)
    assert tags["comedy"] == pytest.approx(1.0) and tags["drama"] == pytest.approx(0.4)
    assert default_rating_weight(np.array([0.0, 2.5, 5.0, 9.0])).tolist() == [-1.0, 0.0, 1.0, 1.0]
    prof.observe("u", 0, "rating", T0, value=0.5)      # -0.8: drama negative, not shown, counted in features
    assert [t for t, _ in prof.profile("u", now=T0).tags] == ["comedy"]
    f = prof.features("u", [0, 1], now=T0)
    assert f[0, 0] == pytest.approx(-0.4 / 1.4) and f[1, 0] == pytest.approx(1.0 / 1.4)


def test_rebase_keeps_values_over_long_spans():
    rng = np.random.default_rng(5)
    info, tag_lists = make_items(rng)
    ev = make_events(rng, 400, 5, info.n_items, span_s=400 * DAY)      # 400 half-lives
    now = float(ev[3].max()) + 0.5 * DAY
    for bound in (2.0, 50.0):
        cfg = ProfileConfig(half_life_days=1.0, min_events=1, rebase_exponent=bound)
        prof = Profiles(info, cfg)
        observe_all(prof, *ev)
        assert prof.rebases >= 5                      # 400 half-lives over a bound of 2 or 50 per user
        assert assert_matches_reference(prof, info, tag_lists, cfg, *ev, now) == 5
    # a huge jump: 10^7 half-lives later, the old tags underflow to exactly 0, nothing overflows
    prof.observe(0, 1, "click", now + 1e7 * DAY)
    p = prof.profile(0, now=now + 1e7 * DAY, top=100)
    assert sorted(t for t, _ in p.tags) == sorted(" ".join(x.split()).casefold() for x in tag_lists[1])
    assert all(w == pytest.approx(1 / len(tag_lists[1])) for _, w in p.tags)
    f = prof.features(0, np.arange(info.n_items))
    assert np.isfinite(f).all() and np.abs(f).max() <= 1.0 + 1e-6
    # reading far after the last event decays to 0 without warnings (warnings are errors here)
    assert prof.profile(0, now=now + 1e9 * DAY).tags == []


# ---------------------------------------------------------------------------------------- memory bounds
def test_min_events_threshold_and_pending_replay():
    info, _ = make_items(np.random.default_rng(7))
    prof = Profiles(info, ProfileConfig(min_events=3))
    prof.observe("a", 1, "click", T0)
    prof.observe("a", 2, "impression", T0 + 1)
    prof.observe("a", 3, "rating", T0 + 2, value=1.0)          # negative: not toward the threshold
    prof.observe("a", -1, "impression", T0 + 3)
    prof.observe("a", 4, "conversion", T0 + 4)
    assert prof.profile("a") is None and "a" not in prof and prof.n_pending == 1
    assert prof.features("a", [1, 2]).tolist() == [[0, 0, 0], [0, 0, 0]]
    prof.observe("a", 5, "click", T0 + 5)                      # third positive event
    assert "a" in prof and prof.n_pending == 0
    full = Profiles(info, ProfileConfig(min_events=1))
    for i, k, t, v in [(1, "click", T0, None), (2, "impression", T0 + 1, None), (3, "rating", T0 + 2, 1.0),
                       (-1, "impression", T0 + 3, None), (4, "conversion", T0 + 4, None), (5, "click", T0 + 5, None)]:
        full.observe("a", i, k, t, v)
    a, b = prof.profile("a", now=T0 + 9, top=99), full.profile("a", now=T0 + 9, top=99)
    assert a.counts == b.counts == {"impression": 2, "click": 2, "rating": 1, "conversion": 1}
    assert [t for t, _ in a.tags] == [t for t, _ in b.tags]
    np.testing.assert_allclose([w for _, w in a.tags], [w for _, w in b.tags], rtol=1e-12)
    np.testing.assert_allclose(prof.features("a", np.arange(info.n_items)),
                               full.features("a", np.arange(info.n_items)), rtol=1e-6)


def test_ttl_eviction_and_rebuild_from_loader_give_the_same_profile():
    rng = np.random.default_rng(11)
    info, tag_lists = make_items(rng)
    ev = make_events(rng, 300, 6, info.n_items, span_s=20 * DAY)
    clock = Clock(1000.0)
    cfg = ProfileConfig(min_events=2, ttl_s=60.0, evict_every=1)
    calls = []

    def loader(user):
        calls.append(user)
        m = ev[0] == user
        return ev[1][m], ev[2][m], ev[3][m], ev[4][m]

    prof = Profiles(info, cfg, loader=loader, clock=clock)
    prof.build(*ev)
    assert not calls
    now = float(ev[3].max())
    before = {u: prof.profile(u, now=now, top=100) for u in range(6)}
    feats = {u: prof.features(u, np.arange(info.n_items)) for u in range(6)}
    assert all(p is not None for p in before.values()) and len(prof) == 6
    clock.t += 30
    prof.profile(2, now=now)                                 # a read keeps user 2 alive
    clock.t += 40
    assert prof.evict() == 5 and prof.users() == [2]
    after = prof.profile(0, now=now, top=100)                 # rebuilt from the loader
    assert calls == [0] and 0 in prof
    assert [t for t, _ in after.tags] == [t for t, _ in before[0].tags]
    np.testing.assert_allclose([w for _, w in after.tags], [w for _, w in before[0].tags], rtol=1e-12)
    assert after.counts == before[0].counts
    np.testing.assert_allclose(prof.features(0, np.arange(info.n_items)), feats[0], rtol=1e-6, atol=1e-7)
    assert assert_matches_reference(prof, info, tag_lists, cfg, *ev, now) == 6
    # amortized eviction inside observe (evict_every=1): an idle user goes when another is observed
    clock.t += 1000
    prof.observe(1, 3, "click", now)
    assert 0 not in prof and 2 not in prof


def test_loader_rebuild_after_eviction_includes_events_observed_since():
    info, _ = make_items(np.random.default_rng(12))
    log = []                                  # the store: (user, item, kind, ts, value)
    clock = Clock()

    def loader(user):
        mine = [e[1:] for e in log if e[0] == user]
        if not mine:
            return np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0), np.zeros(0)
        items, kinds, ts, values = zip(*mine)
        return np.array(items), np.array(kinds), np.array(ts), np.array(values)

    prof = Profiles(info, ProfileConfig(min_events=1, ttl_s=10.0), loader=loader, clock=clock)

    def event(i, k, t):                      # the engine appends to the store, then observes
        log.append(("u", i, k, t, np.nan))
        prof.observe("u", i, k, t)

    for j in range(4):
        event(j, "click", T0 + j)
    clock.t = 100.0
    assert prof.evict() == 1 and len(prof) == 0
    event(7, "click", T0 + 10)                # observed while evicted: a partial profile
    p = prof.profile("u", now=T0 + 10)        # rebuilt from the log: all five clicks
    assert p.counts == {"click": 5} and prof.loads == 1
    assert prof.get("unknown-user") is None and prof.loads == 2
    assert prof.get("unknown-user") is None and prof.loads == 2       # the empty answer is remembered


def test_max_users_evicts_least_recently_used():
    info, _ = make_items(np.random.default_rng(13))
    prof = Profiles(info, ProfileConfig(min_events=1, max_users=3, ttl_s=None))
    for u in "abc":
        prof.observe(u, 1, "click", T0)
    prof.profile("a")                         # a is now the most recently used
    prof.observe("d", 2, "click", T0)
    assert prof.users() == ["c", "a", "d"] and "b" not in prof
    prof.observe("c", 2, "click", T0)
    prof.observe("e", 2, "click", T0)
    assert sorted(prof.users()) == ["c", "d", "e"]
    # build() keeps the users whose last event is latest
    prof.build(["old", "new", "mid", "older"], [1, 1, 1, 1], ["click"] * 4, [T0 + 1, T0 + 9, T0 + 5, T0])
    assert prof.users() == ["old", "mid", "new"]
    # pending users are capped too
    prof2 = Profiles(info, ProfileConfig(min_events=5, max_users=2))
    for u in range(10):
        prof2.observe(u, 1, "click", T0)
    assert prof2.n_pending == 2 and len(prof2) == 0


# ---------------------------------------------------------------------------------------- bulk build
@pytest.mark.parametrize("seed", [0, 1])
def test_build_equals_observe_one_by_one(seed):
    rng = np.random.default_rng(100 + seed)
    info, tag_lists = make_items(rng)
    ev = make_events(rng, 1500, 40, info.n_items, span_s=60 * DAY)
    ev[0][:20] = 100 + np.arange(20) // 2                   # 10 users with 2 events: pending (min_events 4)
    users = np.array([f"user-{u}" for u in ev[0]]) if seed else ev[0]
    ev = (users,) + ev[1:]
    cfg = ProfileConfig(half_life_days=2.0, min_events=4)
    a, b = Profiles(info, cfg), Profiles(info, cfg)
    observe_all(a, *ev)
    assert b.build(*ev) == len(a) > 10
    assert sorted(a.users()) == sorted(b.users()) and a.n_pending == b.n_pending > 0
    now = float(ev[3].max()) + DAY
    for u in sorted(set(users.tolist())):
        pa, pb = a.profile(u, now=now, top=1000), b.profile(u, now=now, top=1000)
        if pa is None:
            assert pb is None
            continue
        assert pa.counts == pb.counts and (pa.first_ts, pa.last_ts, pa.n_positive) == (pb.first_ts, pb.last_ts,
                                                                                        pb.n_positive)
        da, db = dict(pa.tags), dict(pb.tags)
        big = {t for t, w in da.items() if w > 1e-9 * max(da.values())}
        assert big <= set(db)
        for t in big:
            assert db[t] == pytest.approx(da[t], rel=1e-9)
        for s in pa.vectors:
            np.testing.assert_allclose(pa.vectors[s], pb.vectors[s], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.features(u, np.arange(info.n_items)), b.features(u, np.arange(info.n_items)),
                                   rtol=1e-4, atol=1e-6)
    # a pending user built in bulk reaches its profile with the same events as one observed throughout
    pend = [u for u in sorted(set(users.tolist())) if a.profile(u) is None][0]
    for p in (a, b):
        for j in range(4):
            p.observe(pend, j, "conversion", now)
    np.testing.assert_allclose(a.features(pend, np.arange(info.n_items)),
                               b.features(pend, np.arange(info.n_items)), rtol=1e-4, atol=1e-6)
    # kind codes (int8 into KINDS) build the same as kind names
    c = Profiles(info, cfg)
    c.build(ev[0], ev[1], np.array([KINDS.index(k) for k in ev[2]], dtype=np.int8), ev[3], ev[4])
    for u in b.users()[:5]:
        assert c.profile(u, now=now).tags == b.profile(u, now=now).tags


def test_updates_after_build_and_compact_match_brute_force():
    """build() stores tags compact (arrays); an update turns them into a dict, compact() back, a rebase works on
    either form: after all of it the profile is the brute force of every event."""
    rng = np.random.default_rng(110)
    info, tag_lists = make_items(rng)
    ev = make_events(rng, 900, 12, info.n_items, span_s=20 * DAY)
    cfg = ProfileConfig(half_life_days=1.0, min_events=2, rebase_exponent=3.0)
    prof = Profiles(info, cfg)
    prof.build(*(a[:400] for a in ev))
    before = prof.nbytes()
    observe_all(prof, *(a[400:600] for a in ev))               # thaw: compact -> dict
    assert prof.nbytes() > before
    assert prof.compact() == len(prof) > 0 and prof.compact() == 0
    assert prof.nbytes() < before * 1.2
    observe_all(prof, *(a[600:] for a in ev))                  # spans 20 half-lives: rebases on both forms
    assert prof.rebases > 0
    now = float(ev[3].max())
    assert assert_matches_reference(prof, info, tag_lists, cfg, *ev, now) >= 10
    # a rebase of a compact profile: its next event comes 10 half-lives after the built ones
    late = (np.array([5, 5, 5, 5]), np.array([1, 2, 3, 4]), np.array(["click"] * 4),
            np.array([T0, T0 + 1, T0 + 2, T0 + 10 * DAY]), np.full(4, np.nan))
    prof.build(*(a[:3] for a in late))
    n = prof.rebases
    prof.observe(5, 4, "click", T0 + 10 * DAY)
    assert prof.rebases == n + 1
    assert_matches_reference(prof, info, tag_lists, cfg, *late, T0 + 10 * DAY)


def test_build_accepts_mixed_key_types_without_conflating_them():
    info, _ = make_items(np.random.default_rng(14))
    prof = Profiles(info, ProfileConfig(min_events=1))
    prof.build([7, "7", 7], [1, 2, 3], ["click"] * 3, [T0] * 3)
    assert prof.profile(7).counts == {"click": 2} and prof.profile("7").counts == {"click": 1}


# ---------------------------------------------------------------------------------------- features
def test_asof_features_equal_serving_features():
    rng = np.random.default_rng(21)
    info, _ = make_items(rng)
    ev = make_events(rng, 800, 10, info.n_items, span_s=30 * DAY)
    ts = ev[3].copy()
    ts[100:110] = ts[100]                                    # ties: events at one instant
    ev = ev[:3] + (ts,) + ev[4:]
    n_x = 60
    x_users = rng.integers(0, 10, n_x)
    x_items = rng.integers(0, info.n_items, n_x)
    x_ts = rng.choice(ev[3], n_x) + rng.choice([0.0, 1.0], n_x)
    at = rng.choice(len(ev[3]), n_x // 2, replace=False)     # half exactly at an event of the same user
    x_users[:n_x // 2], x_ts[:n_x // 2] = ev[0][at], ev[3][at]
    cfg = ProfileConfig(half_life_days=3.0, min_events=3, rebase_exponent=3.0)
    got = asof_features(ev, (x_users, x_items, x_ts), info, cfg)
    assert got.dtype == np.float32 and got.shape == (n_x, 3)
    order = np.argsort(ev[3], kind="stable")
    nonzero = 0
    for r in range(n_x):
        serving = Profiles(info, cfg)                          # the serving path: observe what came before
        prefix = order[ev[3][order] < x_ts[r]]
        observe_all(serving, *(a[prefix] for a in ev))
        want = serving.features(int(x_users[r]), [int(x_items[r])], now=float(x_ts[r]))
        assert np.array_equal(got[r:r + 1], want), r
        nonzero += bool(want.any())
    assert nonzero >= n_x // 2


def test_explain_is_consistent_with_feature_column_0():
    rng = np.random.default_rng(22)
    info, _ = make_items(rng)
    prof = Profiles(info, ProfileConfig(min_events=1))
    observe_all(prof, *make_events(rng, 400, 3, info.n_items, span_s=10 * DAY))
    cand = np.arange(info.n_items)
    f = prof.features(1, cand)
    full = prof.explain(1, cand, top=None)
    top = prof.explain(1, cand, top=2)
    for i in cand:
        assert sum(c for _, c in full[i]) == pytest.approx(float(f[i, 0]), abs=1e-6)
        assert {t for t, _ in full[i]} <= set(info.tags_of(int(i)))
        assert [c for _, c in full[i]] == sorted((c for _, c in full[i]), reverse=True)
        assert top[i] == full[i][:2]
    assert np.abs(f[:, 0]).max() <= 1.0 and np.abs(f[:, 0]).max() > 0.05
    assert prof.explain("nobody", [1, 2]) == [[], []]


def test_affinity_features_of_unknown_user_and_missing_spaces():
    info = ItemInfo.from_tag_lists([["a"], ["b"]], {"content": np.eye(2, dtype=np.float32)})
    assert affinity_features(None, info, [0, 1]).tolist() == [[0, 0, 0], [0, 0, 0]]
    prof = Profiles(info, ProfileConfig(min_events=1))
    prof.observe(1, 0, "click", T0)
    f = prof.features(1, [0, 1])                              # no "collaborative" space: column 2 is 0
    assert f.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert FEATURE_NAMES == ("tag_overlap", "content_cosine", "collaborative_cosine")


# ---------------------------------------------------------------------------------------- reads and memory
def test_profile_read_top_json_and_memory():
    rng = np.random.default_rng(23)
    info, _ = make_items(rng)
    prof = Profiles(info, ProfileConfig(min_events=1))
    observe_all(prof, *make_events(rng, 300, 2, info.n_items, span_s=DAY))
    p = prof.profile(0, now=T0 + DAY, top=4)
    assert len(p.tags) == 4 and p.tags == sorted(p.tags, key=lambda x: -x[1])
    d = json.loads(json.dumps(p.to_dict()))
    assert d["tags"][0][0] == p.tags[0][0] and len(d["vectors"]["content"]) == 6
    assert prof.profile(0, now=T0 + DAY, top=0).tags == []
    assert prof.profile("nobody") is None
    small = prof.nbytes(0)
    assert 500 < small < 20_000
    assert prof.nbytes() >= prof.nbytes(0) + prof.nbytes(1)
    m = prof.memory()
    assert m["profiles"] == 2 and m["bytes_per_profile"] == pytest.approx((prof.nbytes(0) + prof.nbytes(1)) / 2)
    assert prof.forget(0) and not prof.forget(0) and prof.profile(0) is None


def test_tag_vocab_and_item_info():
    v = TagVocab(["Sci-Fi", " film  noir "])
    assert v.id("sci-fi") == 0 and v.id("Film Noir") == 1 and v.id("drama") == -1 and len(v) == 2
    info = ItemInfo.from_tag_lists([["Drama", "drama", "War"], []], vocab=v)
    assert info.tags_of(0) == ["drama", "war"] and info.tags_of(1) == [] and v.tags[:2] == ("sci-fi", "film noir")
    assert info.tag_weights.tolist() == [0.5, 0.5]
    assert ItemInfo.from_tag_lists([["a", "b"]], weighting="one").tag_weights.tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------- errors
def test_bad_input_errors():
    info, _ = make_items(np.random.default_rng(31), n_items=5)
    for bad in [dict(half_life_days=0), dict(half_life_days=math.inf), dict(min_events=0), dict(ttl_s=-1),
                dict(max_users=0), dict(kind_weights={"like": 1.0}), dict(rebase_exponent=2000.0),
                dict(kind_weights={"click": math.nan})]:
        with pytest.raises(ValueError):
            ProfileConfig(**bad)
    for bad in [dict(half_life_days="7"), dict(min_events=2.5), dict(kind_weights=[("click", 1)]),
                dict(rating_weight=3), dict(max_users=True)]:
        with pytest.raises(TypeError):
            ProfileConfig(**bad)
    prof = Profiles(info, ProfileConfig(min_events=1))
    with pytest.raises(IndexError):
        prof.observe("u", 5, "click", T0)
    with pytest.raises(IndexError):
        prof.observe("u", -2, "click", T0)
    with pytest.raises(TypeError):
        prof.observe("u", 1.0, "click", T0)
    with pytest.raises(TypeError):
        prof.observe("u", True, "click", T0)
    with pytest.raises(ValueError):
        prof.observe("u", 1, "like", T0)
    with pytest.raises(TypeError):
        prof.observe("u", 1, 1, T0)
    with pytest.raises(ValueError):
        prof.observe("u", 1, "rating", T0)                    # a rating needs its value
    with pytest.raises(TypeError):
        prof.observe("u", 1, "rating", T0, value="5")
    with pytest.raises(ValueError):
        prof.observe("u", 1, "click", math.nan)
    with pytest.raises(TypeError):
        prof.observe("u", 1, "click", "yesterday")
    with pytest.raises(TypeError):
        prof.observe(1.5, 1, "click", T0)
    assert len(prof) == 0 and prof.n_pending == 0                 # nothing changed by a bad call
    with pytest.raises(IndexError):
        prof.features("u", [0, 9])
    with pytest.raises(TypeError):
        prof.features("u", [0.5])
    with pytest.raises(IndexError):
        prof.build([1], [7], ["click"], [T0])
    with pytest.raises(ValueError):
        prof.build([1, 2], [1], ["click"], [T0])
    with pytest.raises(ValueError):
        prof.build([1], [1], ["rating"], [T0], [np.nan])
    with pytest.raises(ValueError):
        prof.build([1], [1], ["like"], [T0])
    with pytest.raises(TypeError):
        prof.build([1], [1], [1.5], [T0])
    with pytest.raises(TypeError):
        Profiles("items")
    with pytest.raises(TypeError):
        Profiles(info, {"min_events": 1})
    with pytest.raises(ValueError):
        ItemInfo([0, 2], [0, 0])                                  # a tag twice on one item
    with pytest.raises(ValueError):
        ItemInfo([0, 1], [0], [1.5])
    with pytest.raises(ValueError):
        ItemInfo([0, 1, 1], [0], vectors={"content": np.ones((3, 2))})
    with pytest.raises(TypeError):
        ItemInfo([0.0, 1.0], [0])
    with pytest.raises(ValueError):
        ItemInfo.from_tag_lists([["a"]], weighting="tfidf")
    with pytest.raises(TypeError):
        ItemInfo.from_tag_lists(["action"])                        # a str, not a list of tags
    with pytest.raises(IndexError):
        info.tags_of(99)
    bad_rw = Profiles(info, ProfileConfig(rating_weight=lambda v: np.array([np.nan])))
    with pytest.raises(ValueError):
        bad_rw.observe("u", 1, "rating", T0, value=3.0)
    with pytest.raises(ValueError):
        prof.set_items(ItemInfo.from_tag_lists([["a"]]))          # other vector spaces


# ---------------------------------------------------------------------------------------- threads
def test_concurrent_observe_from_8_threads_equals_sequential():
    rng = np.random.default_rng(41)
    info, _ = make_items(rng)
    ev = make_events(rng, 4000, 16, info.n_items, span_s=30 * DAY)
    cfg = ProfileConfig(min_events=2, rebase_exponent=4.0, ttl_s=None)
    seq, par = Profiles(info, cfg), Profiles(info, cfg)
    observe_all(seq, *ev)
    barrier = threading.Barrier(8)
    errors = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                          # switch threads often: races show up

    def work(t):
        try:
            barrier.wait()
            sl = slice(t, None, 8)
            observe_all(par, *(a[sl] for a in ev))
        except Exception as e:                      # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sys.setswitchinterval(switch)
    assert not errors
    now = float(ev[3].max())
    assert sorted(seq.users()) == sorted(par.users()) and len(seq) == 16
    for u in range(16):
        a, b = seq.profile(u, now=now, top=1000), par.profile(u, now=now, top=1000)
        assert a.counts == b.counts and a.n_positive == b.n_positive
        assert [t for t, _ in a.tags] == [t for t, _ in b.tags]
        np.testing.assert_allclose([w for _, w in a.tags], [w for _, w in b.tags], rtol=1e-9)
        np.testing.assert_allclose(seq.features(u, np.arange(info.n_items)), par.features(u, np.arange(info.n_items)),
                                   rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------- the event store
def test_events_arrays_from_store_build_and_loader(tmp_path):
    info, _ = make_items(np.random.default_rng(51), n_items=10)
    keys = [f"sku-{i}" for i in range(10)]
    lookup = {k: i for i, k in enumerate(keys)}
    events = [Event("click", "ann", "sku-1", ts=T0), Event("rating", "ann", "sku-2", ts=T0 + 1, value=5.0),
              Event("conversion", "ann", "sku-3", ts=T0 + 2, value=12.0), Event("click", "ann", "gone", ts=T0 + 3),
              Event("impression", "ann", items=("sku-1", "sku-4"), ts=T0 + 4), Event("click", 42, "sku-5", ts=T0 + 5)]
    with SqliteEventStore(tmp_path / "events.db") as store:
        store.append(events)
        ids_of = lambda ks: np.array([lookup.get(k, -1) for k in ks], dtype=np.int64)  # noqa: E731
        users, items, kinds, ts, values = events_arrays_from_store(store, ids_of, kinds=KINDS[:4])
        assert users.dtype == object and items.tolist() == [1, 2, 3, -1, 5]          # "gone" dropped
        assert [KINDS[k] for k in kinds] == ["click", "rating", "conversion", "impression", "click"]
        assert np.isnan(values[0]) and values[1] == 5.0
        prof = Profiles(info, ProfileConfig(min_events=1),
                        loader=lambda u: events_arrays_from_store(store, ids_of, user=u, kinds=KINDS[:4])[1:])
        prof.build(users, items, kinds, ts, values)
        p = prof.profile("ann", now=T0 + 5)
        assert p.counts == {"click": 1, "rating": 1, "conversion": 1, "impression": 1}
        prof.forget("ann")
        assert prof.profile("ann", now=T0 + 5).tags == p.tags                      # rebuilt by the loader
        only = events_arrays_from_store(store, ids_of, user=42)
        assert only[0].tolist() == [42] and only[1].tolist() == [5]
        assert events_arrays_from_store(store, ids_of, since=T0 + 100)[0].size == 0
