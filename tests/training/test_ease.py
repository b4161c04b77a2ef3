"""EASE^R: the closed form against NumPy, scores and top-k through the core's embedding bag against dense
X @ B (exclusion, fold-in of new items), the bundle, the memory refusal, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from rec_engine import EmbeddingTable, IdLists
from rec_engine.bundle import open_bundle
from rec_engine.item_item import ItemItemScorer
from rec_engine_train.data.containers import Interactions
from rec_engine_train.export_ease import export_ease
from rec_engine_train.models import ease as ease_mod
from rec_engine_train.models.ease import EASE, ease_matrix, memory_needed


@pytest.fixture(scope="module")
def data():
    """120 users x 47 items, with repeated events, and items 45, 46 never seen."""
    rng = np.random.default_rng(7)
    users = rng.integers(0, 120, 1500)
    items = np.minimum(rng.zipf(1.3, 1500) - 1, 44)
    return Interactions(users, items, 120, 47)


def dense_x(inter: Interactions) -> np.ndarray:
    x = np.zeros((inter.n_users, inter.n_items))
    x[inter.users, inter.items] = 1.0
    return x


def reference_b(x: np.ndarray, l2: float) -> np.ndarray:
    p = np.linalg.inv(x.T @ x + l2 * np.eye(x.shape[1]))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-6), ("float32", 1e-4)])
def test_closed_form_matches_numpy_and_solves_the_constrained_least_squares(data, dtype, tol):
    x = dense_x(data)
    b = ease_matrix(sp.csr_matrix(x), 30.0, dtype)
    ref = reference_b(x, 30.0)
    assert b.dtype == np.float32 and b.shape == (47, 47) and b.flags.c_contiguous
    np.testing.assert_allclose(b, ref, atol=tol * np.abs(ref).max())
    assert np.all(np.diag(b) == 0)
    # stationarity of ||X - XB||^2 + l2 ||B||^2 off the diagonal: ((X^T X + l2 I) B - X^T X)_ij = 0, i != j
    g = x.T @ x
    grad = (g + 30.0 * np.eye(47)) @ b.astype(np.float64) - g
    np.fill_diagonal(grad, 0.0)
    assert np.abs(grad).max() < 50 * tol * np.abs(g).max()
    assert np.all(b[:, 45:] == 0) and np.all(b[45:] == 0)          # unseen items neither give nor get score


def test_scores_and_top_k_are_dense_x_times_b_with_the_train_items_excluded(data):
    model = EASE(l2=10.0).fit(data)
    x = dense_x(data)
    ref = x @ model.B.astype(np.float64)
    np.testing.assert_allclose(model.scores(np.arange(120)), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.scores(3), ref[3], rtol=1e-5, atol=1e-5)
    top = model.recommend(np.arange(120), k=10)
    assert top.ids.shape == (120, 10)
    for u in range(120):
        seen = np.flatnonzero(x[u])
        masked = np.where(x[u] > 0, -np.inf, ref[u])
        order = np.lexsort((np.arange(47), -masked))[:10]          # best first, ties: lower id first
        ids = top.ids[u][top.ids[u] >= 0]
        assert not np.isin(ids, seen).any()
        np.testing.assert_allclose(top.scores[u][:len(ids)], masked[order][:len(ids)], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref[u][ids], masked[order][:len(ids)], rtol=1e-5, atol=1e-5)
        assert len(ids) == min(10, 47 - seen.size)
    one = model.recommend(5, k=4)
    assert one.ids.shape == (4,) and np.array_equal(one.ids, top.ids[5, :4])
    keep = model.recommend(np.array([5]), k=47, exclude_seen=False)
    assert np.isin(np.flatnonzero(x[5]), keep.ids[0]).all()


def test_fold_in_scores_a_user_with_new_items_through_the_same_matrix(data):
    model = EASE(l2=10.0).fit(data)
    scorer = model.scorer
    x = dense_x(data)
    known = scorer.seen_lists[4]
    new = np.array([40, 2, 2, 44])                                  # repeats count once
    items = np.concatenate([known, new])
    row = x[4].copy()
    row[new] = 1.0
    ref = row @ model.B.astype(np.float64)
    np.testing.assert_allclose(scorer.user_scores(items), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.fold_in([items, new])[0], ref, rtol=1e-5, atol=1e-5)
    top = scorer.recommend([items], k=5)
    assert not np.isin(top.ids[0], items).any()
    masked = np.where(row > 0, -np.inf, ref)
    np.testing.assert_allclose(top.scores[0], np.sort(masked)[::-1][:5], rtol=1e-5, atol=1e-5)
    fresh = scorer.recommend([np.array([7, 9])], k=3, exclude=None)   # a user the model never saw
    np.testing.assert_allclose(fresh.scores[0], np.sort(model.B[7].astype(np.float64) + model.B[9])[::-1][:3],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError, match="item id 47"):
        scorer.user_scores([1, 47])
    with pytest.raises(IndexError, match="outside"):
        scorer.recommend([np.array([-1])])


def test_bundle_answers_like_the_model_and_keeps_its_format(data, tmp_path):
    model = EASE(l2=10.0).fit(data)
    b = open_bundle(export_ease(model, tmp_path / "ease", metrics={"recall@20": 0.25}))
    assert b.kind == "ease" and b.table_names == ["item_item"]
    assert b.meta["n_users"] == 120 and b.meta["n_items"] == 47 and b.meta["l2"] == 10.0
    assert b.meta["metrics"]["recall@20"] == 0.25
    assert np.array_equal(b.array("item_counts"), data.item_counts())
    served = ItemItemScorer.from_bundle(b)
    users = np.arange(120)
    a, c = served.recommend_users(users, 10), model.recommend(users, 10)
    assert np.array_equal(a.ids, c.ids) and np.array_equal(a.scores, c.scores)
    half = ItemItemScorer.from_bundle(open_bundle(export_ease(model, tmp_path / "f16", table_dtype="float16")))
    assert half.table.dtype == "float16"
    np.testing.assert_allclose(half.scores(model.train_lists), model.fold_in(model.train_lists), atol=2e-3)
    with pytest.raises(TypeError, match="needs an EASE"):
        export_ease(object(), tmp_path / "x")
    with pytest.raises(RuntimeError, match="not fitted"):
        export_ease(EASE(), tmp_path / "x")


def test_a_catalogue_too_large_for_memory_is_refused_saying_what_it_needs(data, monkeypatch):
    assert memory_needed(10_000, "float64") == 12 * 10_000 ** 2 and memory_needed(10_000, "float32") == 4 * 10 ** 8
    with pytest.raises(ValueError, match=r"dense 47 x 47 item-item matrix: .* above max_items=40"):
        EASE(max_items=40).fit(data)
    monkeypatch.setattr(ease_mod, "available_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"needs a dense 47 x 47 .*only 0.0 GiB of memory is available "
                                         r"\(dtype=float32"):
        EASE().fit(data)
    EASE(max_items=47).fit(data)                               # an explicit bound replaces the memory check


@pytest.mark.parametrize("kwargs, message", [
    (dict(l2=0), "l2 must be a finite number > 0"),
    (dict(l2=float("nan")), "l2 must be a finite number > 0"),
    (dict(l2=True), "l2 must be a finite number > 0"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(max_items=0), "max_items must be an integer >= 1"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EASE(**kwargs)


def test_unfitted_or_empty_input_is_refused(data):
    with pytest.raises(RuntimeError, match="not fitted"):
        EASE().recommend(0)
    with pytest.raises(ValueError, match="no interactions"):
        EASE().fit(Interactions(np.zeros(0, np.int64), np.zeros(0, np.int64), 3, 4))
    with pytest.raises(TypeError, match="Interactions"):
        EASE().fit(dense_x(data))
    with pytest.raises(ValueError, match="square"):
        ItemItemScorer(EmbeddingTable(np.zeros((3, 4), np.float32)))
    with pytest.raises(IndexError, match="user id 120"):
        EASE(l2=10.0).fit(data).recommend([0, 120])
    with pytest.raises(ValueError, match="exclude has 1 lists for 2 users"):
        EASE(l2=10.0).fit(data).scorer.recommend(IdLists.from_lists([[1], [2]]), exclude=[[3]])


def test_served_by_the_retrieval_stage_from_train_and_observed_items(data, tmp_path):
    from rec_engine.retrieval import ItemItemRetrieval, UserState, load_retrieval

    model = EASE(l2=10.0).fit(data)
    r = load_retrieval(open_bundle(export_ease(model, tmp_path / "ease")))
    assert isinstance(r, ItemItemRetrieval) and (r.n_users, r.n_items) == (120, 47)
    b64 = model.B.astype(np.float64)
    x = dense_x(data)
    def row_of(items):
        return np.isin(np.arange(47), items).astype(float)

    for state, row in ((UserState("u4", 4), x[4]),
                       (UserState("u4", 4, np.array([40, 44, 40]), 2), np.maximum(x[4], row_of([40, 44]))),
                       (UserState("new", -1, np.array([7, 9]), 1), row_of([7, 9]))):
        seen = r.seen(state)
        assert set(seen.tolist()) == set(np.flatnonzero(row).tolist())
        top = r.retrieve(state, 5, exclude=seen)
        ref = np.where(row > 0, -np.inf, row @ b64)
        order = np.lexsort((np.arange(47), -ref))[:5]
        np.testing.assert_allclose(top.scores, ref[order], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ref[top.ids], ref[order], rtol=1e-5, atol=1e-6)
        cands = r.retrieve(state, 3, candidates=[1, 2, 3])
        assert set(cands.ids.tolist()) == {1, 2, 3}
    assert r.retrieve(UserState("nobody", -1), 5) is None          # nothing known: the engine's fallback


def test_the_engine_serves_an_ease_bundle_and_observed_items_count_at_once(data, tmp_path):
    from rec_engine.engine import Engine

    model = EASE(l2=10.0).fit(data)
    path = export_ease(model, tmp_path / "ease")
    b64 = model.B.astype(np.float64)
    with Engine.load(path) as e:
        rec = e.recommend(4, k=5)
        ref = model.recommend(4, k=5)
        np.testing.assert_array_equal(rec.ids, ref.ids)
        np.testing.assert_allclose(rec.scores, ref.scores, rtol=1e-6)
        new = [int(i) for i in rec.ids[:2]]
        e.observe(4, new)
        items = np.unique(np.concatenate([model.train_lists[4], new]))
        s = dense_x(data)[4]
        s[new] = 1.0
        s = s @ b64
        s[items] = -np.inf
        after = e.recommend(4, k=5)
        assert not np.isin(after.ids, items).any()
        np.testing.assert_allclose(after.scores, np.sort(s)[::-1][:5], rtol=1e-5, atol=1e-6)
        assert e.recommend(10_000, k=3).fallback
