"""The long-tail stage through the engine: re-ranking (diversity, debias) and exploration per request, against
the functions of rec_engine.longtail applied by hand to the ranked candidates."""
from __future__ import annotations

import numpy as np
import pytest

from rec_engine.engine import Engine
from rec_engine.longtail import rerank

from serving_fixtures import trained  # noqa: F401 (fixture)

CTX = {"hour": 12.0, "device": "web"}


def _ranked(e: Engine, user, n: int):
    """Every retrieved candidate of ``user`` ranked by the CTR model: (ids, probs) best first."""
    full = e.recommend(user, k=n, context=CTX, n_candidates=n)
    real = full.ids >= 0
    return full.ids[real], full.scores[real]


@pytest.mark.parametrize("diversity,debias", [(0.3, 0.0), (0.0, 0.5), (0.4, 0.4), (1.0, 1.0)])
def test_rerank_through_the_engine_equals_rerank_of_the_ranked_candidates(trained, diversity, debias):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e:
        v = e._version
        n = v.n_candidates
        for user in (3, 11, 40):
            ids, probs = _ranked(e, user, n)
            vecs = np.asarray(v.retrieval.items)[ids]            # no text vectors: the collaborative ones
            exposure = v.popular[ids, 0].astype(np.float64)
            want = ids[rerank(probs.astype(np.float64), 10, vectors=vecs, exposure=exposure,
                              diversity=diversity, debias=debias)]
            got = e.recommend(user, k=10, context=CTX, diversity=diversity, debias=debias)
            np.testing.assert_array_equal(got.ids, want)
            # the scores stay the model's click probabilities of those items
            np.testing.assert_allclose(got.scores, probs[[ids.tolist().index(i) for i in want]], rtol=1e-6)
            assert "rerank_ms" in got.timings
        # 0 / 0 is the plain answer; engine defaults apply when the request says nothing
        plain = e.recommend(3, k=10, context=CTX)
        np.testing.assert_array_equal(e.recommend(3, k=10, context=CTX, diversity=0, debias=0).ids, plain.ids)
    with Engine.load(trained.bundle("pipe_a"), num_threads=1, debias=0.5) as e2:
        ids, probs = _ranked(e2, 3, e2._version.n_candidates)
        want = ids[rerank(probs.astype(np.float64), 10, exposure=e2._version.popular[ids, 0], debias=0.5)]
        np.testing.assert_array_equal(e2.recommend(3, k=10, context=CTX).ids, want)
        assert e2.recommend_batch([3], k=10, context=CTX)[0].ids.tolist() == want.tolist()


def test_debias_lowers_the_popularity_of_what_is_shown(trained):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e:
        pop = e._version.popular[:, 0]
        users = list(range(30))
        plain = np.mean([pop[e.recommend(u, k=10, context=CTX).ids].mean() for u in users])
        tail = np.mean([pop[e.recommend(u, k=10, context=CTX, debias=0.8).ids].mean() for u in users])
        assert tail < plain


def test_exploration_fills_a_bounded_share_with_rarely_shown_items_and_counts_feedback(trained, tmp_path):  # noqa: F811
    with Engine.load(trained.bundle("pipe_a"), num_threads=1, events=tmp_path / "ev.db", seed=0,
                     explore_max_impressions=3) as e:
        d = e._version.retrieval.items.shape[1]
        new = [70_000_000 + j for j in range(5)]
        e.add_items(new, vectors=np.full((5, d), -1.0, np.float32))   # never retrieved on their own merit
        n_old = e.n_items - 5
        plain = e.recommend(3, k=10, context=CTX)
        assert plain.explored is None and not set(plain.ids.tolist()) & set(range(n_old, n_old + 5))
        slots, shown_new = [], 0
        for j in range(60):
            rec = e.recommend(100 + j, k=10, context=CTX, explore=0.2)
            assert rec.explored is not None and len(rec.explored) == 10
            assert len(set(rec.ids.tolist())) == 10                   # no duplicates
            slots.append(int(rec.explored.sum()))
            shown_new += int(np.isin(rec.ids, np.arange(n_old, n_old + 5)).sum())
        assert np.mean(slots) == pytest.approx(2.0, abs=0.01)         # k * share, exactly 2 here
        assert shown_new > 0                                           # the new items got impressions
        ex = e._version.explorer
        imp = ex.impressions_of(np.arange(n_old, n_old + 5))
        assert imp.sum() == shown_new
        # an exploration item is one with fewer than 3 impressions when chosen: none is shown beyond 3 + k slots
        assert imp.max() <= 3
        # feedback counts as a click of the explorer
        rec = e.recommend(5, k=10, context=CTX, explore=0.5)
        item = rec.items[np.flatnonzero(rec.explored)[0]]
        before = ex.clicks[rec.ids[np.flatnonzero(rec.explored)[0]]]
        e.feedback(5, item, request_id=rec.request_id)
        assert ex.clicks[rec.ids[np.flatnonzero(rec.explored)[0]]] == before + 1
        # the impression logs which slots were exploration
        e.events.flush()
        last = [ev for ev in e.events.read(kinds=["impression"])][-1]
        assert last.attrs["explored"] == np.flatnonzero(rec.explored).tolist()
    # a restart fills the counts from the event store
    with Engine.load(trained.bundle("pipe_a"), num_threads=1, events=tmp_path / "ev.db", seed=0,
                     explore_max_impressions=3) as e2:
        ex2 = e2._explorer(e2._version)
        np.testing.assert_array_equal(ex2.impressions_of(np.arange(n_old, n_old + 5)), imp + np.isin(
            np.arange(n_old, n_old + 5), rec.ids).astype(int))


def test_long_tail_settings_bad_input(trained):  # noqa: F811
    with pytest.raises(ValueError, match="diversity"):
        Engine.load(trained.bundle("pipe_a"), diversity=1.5)
    with pytest.raises(ValueError, match="explore_max_impressions"):
        Engine.load(trained.bundle("pipe_a"), explore_max_impressions=0)
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e:
        with pytest.raises(ValueError, match="debias"):
            e.recommend(3, k=5, context=CTX, debias=-0.1)
        with pytest.raises(TypeError, match="explore"):
            e.recommend(3, k=5, context=CTX, explore="lots")


def test_long_tail_over_http(trained, tmp_path):  # noqa: F811
    from rec_engine.service import create_app
    from test_service import running

    with Engine.load(trained.bundle("pipe_a"), num_threads=1, events=tmp_path / "ev.db", seed=1) as e, \
            running(create_app(e)) as client:
        d = e._version.retrieval.items.shape[1]
        e.add_items([80_000_000], vectors=np.full((1, d), -1.0, np.float32))
        ids, probs = _ranked(e, 3, e._version.n_candidates)
        want = ids[rerank(probs.astype(np.float64), 10, vectors=np.asarray(e._version.retrieval.items)[ids],
                          exposure=e._version.popular[ids, 0], diversity=0.3, debias=0.3)]
        st, got = client.request("POST", "/recommend", {"user": 3, "k": 10, "context": CTX, "diversity": 0.3,
                                                        "debias": 0.3, "return_ids": True})
        assert st == 200 and got["ids"] == want.tolist() and "explored" not in got
        st, got = client.request("POST", "/recommend", {"user": 3, "k": 10, "context": CTX, "explore": 1.0})
        assert st == 200 and got["explored"] == list(range(10))          # every slot explored
        assert all(np.isfinite(got["scores"]))                           # the model scored them all
        for bad in ({"explore": 2}, {"diversity": -1}, {"debias": "x"}):
            assert client.request("POST", "/recommend", {"user": 3, **bad})[0] == 422
