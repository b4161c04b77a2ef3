"""rec_engine.longtail: MMR against a brute-force loop, popularity debiasing, rerank, and Thompson-sampling
exploration (slot share, eligibility, click preference, blending, thread safety), and bad input."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from rec_engine.longtail import ThompsonExplorer, debias, mmr, rerank


# ------------------------------------------------------------------------------------------ references
def minmax(x):
    x = np.asarray(x, np.float64)
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


def unit_rows(v):
    v = np.asarray(v, np.float64)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 0)


def objective(rel, u, picked, i, lam):
    """Marginal relevance of candidate i given the picked ones (0 similarity term before any pick)."""
    pen = max((float(u[i] @ u[j]) for j in picked), default=0.0)
    return (1 - lam) * rel[i] - lam * pen


def reference_mmr(scores, vectors, k, lam):
    """The greedy loop written plainly: candidates visited best score first (lower index among equals), the
    first strictly better objective wins."""
    rel, u = minmax(scores), unit_rows(vectors)
    by_score = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    picked, values = [], []
    for _ in range(min(k, len(scores))):
        best, best_val = None, None
        for i in by_score:
            if i in picked:
                continue
            val = objective(rel, u, picked, i, lam)
            if best is None or val > best_val:
                best, best_val = i, val
        picked.append(best)
        values.append(best_val)
    return np.array(picked, np.int64), np.array(values)


def random_case(rng):
    n = int(rng.integers(1, 60))
    d = int(rng.choice([1, 2, 7, 16, 17]))
    k = int(rng.integers(0, n + 4))
    lam = float(rng.choice([0.0, 1.0, rng.random()]))
    scores = rng.normal(0, rng.choice([1e-3, 1, 100]), n) + rng.choice([0, 50])
    vectors = rng.normal(size=(n, d))
    vectors[rng.random(n) < 0.1] = 0.0                   # some zero vectors
    return scores, vectors, k, lam


# ------------------------------------------------------------------------------------------ MMR
def test_mmr_matches_the_brute_force_loop_on_random_float64_inputs():
    rng = np.random.default_rng(0)
    for _ in range(150):
        scores, vectors, k, lam = random_case(rng)
        order, values = mmr(scores, vectors, k, lam)
        ref_order, ref_values = reference_mmr(scores, vectors, k, lam)
        assert order.dtype == np.int64 and order.shape == (min(k, len(scores)),)
        np.testing.assert_array_equal(order, ref_order)
        np.testing.assert_allclose(values, ref_values, atol=1e-9)


def test_mmr_float32_vectors_pick_optimally_within_rounding():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scores, vectors, k, lam = random_case(rng)
        order, values = mmr(scores, vectors.astype(np.float32), k, lam)
        rel, u = minmax(scores), unit_rows(vectors.astype(np.float32))
        assert len(set(order.tolist())) == len(order) == min(k, len(scores))
        for t, j in enumerate(order.tolist()):
            picked = order[:t].tolist()
            best = max(objective(rel, u, picked, i, lam) for i in range(len(scores)) if i not in picked)
            assert objective(rel, u, picked, j, lam) >= best - 1e-5
            assert values[t] == pytest.approx(objective(rel, u, picked, j, lam), abs=1e-5)


def test_mmr_without_diversity_is_the_stable_top_k_by_score():
    rng = np.random.default_rng(2)
    for _ in range(50):
        n = int(rng.integers(1, 300))
        scores = rng.integers(0, 8, n).astype(np.float32)     # many ties
        k = int(rng.integers(0, n + 3))
        order, values = mmr(scores, rng.normal(size=(n, 5)), k, 0.0)
        np.testing.assert_array_equal(order, np.argsort(-scores, kind="stable")[:k])
        np.testing.assert_allclose(values, minmax(scores)[order])
        np.testing.assert_array_equal(rerank(scores, k), order)


def test_mmr_full_diversity_spreads_each_pick_as_far_as_possible():
    rng = np.random.default_rng(3)
    n, d = 80, 6
    scores, vectors = rng.normal(size=n), rng.normal(size=(n, d))
    order, _ = mmr(scores, vectors, 15, 1.0)
    np.testing.assert_array_equal(order, reference_mmr(scores, vectors, 15, 1.0)[0])
    u = unit_rows(vectors)
    assert order[0] == np.argmax(scores)                   # the first pick is the best item
    for t in range(1, len(order)):
        picked = order[:t]
        closeness = (u @ u[picked].T).max(axis=1)           # each candidate's max cosine to the picked ones
        free = np.setdiff1d(np.arange(n), picked)
        assert closeness[order[t]] == pytest.approx(closeness[free].min())


def test_mmr_diversity_covers_more_clusters_than_the_plain_top_k():
    # 4 clusters of identical vectors; cluster 0 holds the 10 best scores
    centres = np.eye(4)
    cluster = np.repeat(np.arange(4), 10)
    scores = np.concatenate([np.linspace(10, 9, 10), np.linspace(5, 4, 30)])
    vectors = centres[cluster]
    plain = rerank(scores, 4)
    diverse = rerank(scores, 4, vectors=vectors, diversity=0.5)
    assert len(set(cluster[plain])) == 1
    assert sorted(cluster[diverse]) == [0, 1, 2, 3]
    assert diverse[0] == 0


def test_mmr_zero_vectors_count_as_dissimilar_and_inputs_stay_untouched():
    scores = np.array([3.0, 2.0, 1.0])
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    before = vectors.copy()
    order, values = mmr(scores, vectors, 3, 0.9)
    np.testing.assert_array_equal(order, [0, 2, 1])          # the zero vector beats the duplicate of the first
    np.testing.assert_allclose(values, [0.1, 0.0, -0.9 + 0.1 * 0.5])
    np.testing.assert_array_equal(vectors, before)


def test_mmr_is_scale_free_in_the_scores():
    rng = np.random.default_rng(4)
    scores, vectors = rng.normal(size=50), rng.normal(size=(50, 8))
    a, _ = mmr(scores, vectors, 10, 0.4)
    b, _ = mmr(1000 * scores - 7, vectors, 10, 0.4)
    np.testing.assert_array_equal(a, b)


def test_mmr_of_nothing_and_of_k_zero():
    order, values = mmr(np.zeros(0), np.zeros((0, 4)), 5, 0.5)
    assert order.shape == values.shape == (0,)
    order, _ = mmr(np.ones(3), np.ones((3, 2)), 0, 0.5)
    assert order.shape == (0,)


# ------------------------------------------------------------------------------------------ debias
def test_debias_is_the_documented_formula_and_strength_zero_keeps_the_order():
    rng = np.random.default_rng(5)
    scores, exposure = rng.normal(size=40), rng.integers(0, 1000, 40)
    out = debias(scores, exposure, 0.3)
    np.testing.assert_allclose(out, minmax(scores) - 0.3 * minmax(np.log1p(exposure)))
    np.testing.assert_array_equal(np.argsort(-debias(scores, exposure, 0.0), kind="stable"),
                                  np.argsort(-scores, kind="stable"))
    np.testing.assert_array_equal(rerank(scores, 10, exposure=exposure), np.argsort(-scores, kind="stable")[:10])


def test_debias_is_monotone_in_score_and_antitone_in_exposure():
    rng = np.random.default_rng(6)
    exposure = rng.integers(0, 500, 30)
    scores = rng.normal(size=30)
    # same exposure, higher score -> higher value
    same = np.full(30, 7)
    out = debias(scores, same, 0.8)
    assert np.all(np.diff(out[np.argsort(scores)]) >= 0)
    # same score, more exposure -> lower value (strictly when exposures differ and strength > 0)
    flat = np.zeros(30)
    out = debias(flat, exposure, 0.5)
    order = np.argsort(exposure, kind="stable")
    assert np.all(np.diff(out[order]) <= 0)
    assert out[np.argmin(exposure)] > out[np.argmax(exposure)]


def test_stronger_debias_never_raises_the_top_k_popularity():
    rng = np.random.default_rng(7)
    for _ in range(30):
        scores, exposure = rng.normal(size=200), rng.zipf(1.5, 200).astype(float)
        pop = minmax(np.log1p(exposure))
        totals = [pop[rerank(scores, 20, exposure=exposure, debias=w)].sum() for w in np.linspace(0, 1, 11)]
        assert all(b <= a + 1e-12 for a, b in zip(totals, totals[1:]))
        assert totals[-1] < totals[0]


def test_rerank_debiases_then_diversifies():
    rng = np.random.default_rng(8)
    scores, exposure, vectors = rng.normal(size=100), rng.integers(0, 100, 100), rng.normal(size=(100, 5))
    got = rerank(scores, 10, vectors=vectors, exposure=exposure, diversity=0.3, debias=0.4)
    want, _ = reference_mmr(debias(scores, exposure, 0.4), vectors, 10, 0.3)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64


# ------------------------------------------------------------------------------------------ exploration
def test_the_mean_number_of_exploration_slots_is_k_times_share():
    ex = ThompsonExplorer(60)
    rng = np.random.default_rng(9)
    for k, share in [(10, 0.25), (20, 0.13), (7, 0.5), (3, 0.1)]:
        sizes = np.array([len(ex.choose(k, share, rng)) for _ in range(3000)])
        lo, hi = int(np.floor(k * share)), int(np.ceil(k * share))
        assert sizes.min() >= lo and sizes.max() <= hi
        assert abs(sizes.mean() - k * share) < 0.05
    assert all(len(ex.choose(10, 0.0, rng)) == 0 for _ in range(100))
    assert len(ex.choose(10, 1.0, rng)) == 10
    assert len(ex.choose(0, 1.0, rng)) == 0


def test_only_eligible_candidates_not_excluded_are_chosen_without_duplicates():
    n = 200
    rng = np.random.default_rng(10)
    ex = ThompsonExplorer.from_counts(rng.integers(0, 40, n), np.zeros(n, np.int64), max_impressions=20)
    imp = ex.impressions
    eligible = ex.eligible()
    np.testing.assert_array_equal(eligible, np.flatnonzero(imp < 20))
    np.testing.assert_array_equal(ex.eligible(5), np.flatnonzero(imp < 5))
    exclude = eligible[::2]
    candidates = np.arange(0, n, 3)
    allowed = set(np.intersect1d(eligible, candidates).tolist()) - set(exclude.tolist())
    for _ in range(300):
        got = ex.choose(10, 0.5, rng, exclude=exclude, candidates=candidates)
        assert len(set(got.tolist())) == len(got) == min(5, len(allowed))
        assert set(got.tolist()) <= allowed
    assert len(ex.choose(10, 1.0, rng, candidates=[])) == 0
    # a small pool bounds the slots
    assert len(ex.choose(10, 1.0, rng, candidates=eligible[:3])) == 3


def test_items_with_more_clicks_are_chosen_more_often():
    ex = ThompsonExplorer.build([0, 1, 2, 3], [40, 40, 40, 0], [2, 6, 14, 0], 4, max_impressions=100)
    rng = np.random.default_rng(11)
    hits = np.bincount(np.concatenate([ex.choose(1, 1.0, rng, exclude=[3]) for _ in range(3000)]), minlength=4)
    assert hits[3] == 0
    assert hits[2] > 2000 and hits[1] > hits[0]              # P(theta_2 largest) is about 0.97
    # item 3 has no data: a uniform draw, chosen often against a weak item
    hits = np.bincount(np.concatenate([ex.choose(1, 1.0, rng, candidates=[0, 3]) for _ in range(2000)]),
                       minlength=4)
    assert hits[3] > 1500


def test_fit_prior_uses_the_global_click_rate():
    ex = ThompsonExplorer.build(np.arange(10), 100, 5, 10)
    ex.fit_prior(20.0)
    assert ex.a0 == pytest.approx(1.0) and ex.b0 == pytest.approx(19.0)
    empty = ThompsonExplorer(3).fit_prior()
    assert (empty.a0, empty.b0) == (1.0, 1.0)


def test_build_adds_repeats_and_grow_keeps_the_counts():
    ex = ThompsonExplorer.build([1, 1, 4, 1], 1, [0, 1, 1, 0], 5)
    np.testing.assert_array_equal(ex.impressions, [0, 3, 0, 0, 1])
    np.testing.assert_array_equal(ex.clicks, [0, 1, 0, 0, 1])
    with pytest.raises(IndexError, match="grow"):
        ex.update([5], 1, 0)
    np.testing.assert_array_equal(ex.impressions, [0, 3, 0, 0, 1])    # nothing added on error
    ex.grow(100)
    ex.grow(50)                                              # never shrinks
    assert ex.n_items == 100
    ex.update([99, 5], [2, 3], [1, 0])
    imp = ex.impressions
    assert imp.shape == (100,) and imp[99] == 2 and imp[5] == 3 and imp[1] == 3 and imp.sum() == 9
    same = ThompsonExplorer.from_counts(ex.impressions, ex.clicks)
    np.testing.assert_array_equal(same.impressions, ex.impressions)
    np.testing.assert_array_equal(same.clicks, ex.clicks)


def test_update_from_8_threads_loses_nothing():
    ex = ThompsonExplorer(500)
    per_thread = [np.random.default_rng(100 + t).integers(0, 500, (200, 50)) for t in range(8)]
    start = threading.Barrier(8)

    def work(batches):
        start.wait()
        for ids in batches:
            ex.update(ids, 1, (ids % 3 == 0).astype(np.int64))
            ex.choose(10, 0.3, np.random.default_rng(int(ids[0])))

    threads = [threading.Thread(target=work, args=(b,)) for b in per_thread]
    for th in threads:
        th.start()
        ex.grow(500 + len(threads))                          # growth under load keeps every count
    for th in threads:
        th.join()
    ids = np.concatenate([b.ravel() for b in per_thread])
    np.testing.assert_array_equal(ex.impressions[:500], np.bincount(ids, minlength=500))
    np.testing.assert_array_equal(ex.clicks[:500], np.bincount(ids, weights=ids % 3 == 0, minlength=500))
    assert ex.impressions.sum() == 8 * 200 * 50


def test_blend_places_exploration_without_duplicates_and_keeps_the_ranked_order():
    rng = np.random.default_rng(12)
    ranked = np.arange(100, 130)
    positions = np.zeros(10)
    for _ in range(2000):
        explore = rng.choice(np.r_[100:103, 500:520], 4, replace=False)
        ids, mask = ThompsonExplorer.blend(ranked, explore, 10, rng)
        fresh = [e for e in explore.tolist() if e not in ranked[:10]]
        assert ids.shape == mask.shape == (10,)
        assert len(set(ids.tolist())) == 10
        assert ids[mask].tolist() == fresh                   # best draw first, those not ranked anyway
        assert ids[~mask].tolist() == [r for r in ranked.tolist() if r not in fresh][:10 - len(fresh)]
        positions += mask
    assert positions.min() > 0.5 * positions.mean()          # every slot gets exploration sometimes
    ids, mask = ThompsonExplorer.blend(np.arange(20), [100, 101], 10, rng, placement="even")
    assert np.flatnonzero(mask).tolist() == [3, 6]
    ids, mask = ThompsonExplorer.blend([1, 2, -1, -1], [7, 7, 8], 10, rng)
    assert sorted(ids.tolist()) == [1, 2, 7, 8] and mask.sum() == 2
    ids, mask = ThompsonExplorer.blend([1, 2, 3], [7, 8, 9, 10], 2, rng)
    assert mask.all() and ids.tolist() == [7, 8]


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, exc", [
    (lambda: mmr([1.0, 2.0], np.ones((2, 3)), 1, 1.5), ValueError),
    (lambda: mmr([1.0, 2.0], np.ones((2, 3)), 1, -0.1), ValueError),
    (lambda: mmr([1.0, 2.0], np.ones((2, 3)), 1, float("nan")), ValueError),
    (lambda: mmr([1.0, 2.0], np.ones((3, 3)), 1, 0.5), ValueError),
    (lambda: mmr([1.0, 2.0], np.ones(3), 1, 0.5), ValueError),
    (lambda: mmr([[1.0, 2.0]], np.ones((2, 3)), 1, 0.5), ValueError),
    (lambda: mmr([1.0, 2.0], np.ones((2, 3)), -1, 0.5), ValueError),
    (lambda: mmr([1.0, 2.0], np.ones((2, 3)), 1.0, 0.5), TypeError),
    (lambda: mmr([1.0, 2.0], np.ones((2, 3)), True, 0.5), TypeError),
    (lambda: mmr([1.0, 2.0], np.ones((2, 3)), 1, "0.5"), TypeError),
    (lambda: mmr(["a", "b"], np.ones((2, 3)), 1, 0.5), TypeError),
    (lambda: mmr([1.0, np.nan], np.ones((2, 3)), 1, 0.5), ValueError),
    (lambda: mmr([1.0, 2.0], np.array([[1.0, np.inf], [0, 1]]), 1, 0.5), ValueError),
    (lambda: debias([1.0, 2.0], [1, 2], 2.0), ValueError),
    (lambda: debias([1.0, 2.0], [1, 2, 3], 0.5), ValueError),
    (lambda: debias([1.0, 2.0], [1, -2], 0.5), ValueError),
    (lambda: debias([1.0, 2.0], ["1", "2"], 0.5), TypeError),
    (lambda: rerank([1.0, 2.0], 1, diversity=0.5), ValueError),
    (lambda: rerank([1.0, 2.0], 1, debias=0.5), ValueError),
    (lambda: rerank([1.0, 2.0], 1, exposure=[1, 2], debias=1.1), ValueError),
    (lambda: rerank([1.0, 2.0], 1, vectors=np.ones((3, 2))), ValueError),
    (lambda: rerank([1.0, 2.0], -2), ValueError),
    (lambda: ThompsonExplorer(-1), ValueError),
    (lambda: ThompsonExplorer(2.5), TypeError),
    (lambda: ThompsonExplorer(3, a0=0.0), ValueError),
    (lambda: ThompsonExplorer(3, max_impressions=0), ValueError),
    (lambda: ThompsonExplorer(3).choose(5, 1.5, np.random.default_rng()), ValueError),
    (lambda: ThompsonExplorer(3).choose(-1, 0.5, np.random.default_rng()), ValueError),
    (lambda: ThompsonExplorer(3).choose(5, 0.5, 42), TypeError),
    (lambda: ThompsonExplorer(3).choose(5, 0.5, np.random.default_rng(), exclude=[0.5]), TypeError),
    (lambda: ThompsonExplorer(3).update([0, 1], [1, 2, 3], 0), ValueError),
    (lambda: ThompsonExplorer(3).update([0, 1], 1, -1), ValueError),
    (lambda: ThompsonExplorer(3).update([0, 1], 1.0, 0), TypeError),
    (lambda: ThompsonExplorer(3).update([0.0, 1.0], 1, 0), TypeError),
    (lambda: ThompsonExplorer(3).update([-1], 1, 0), IndexError),
    (lambda: ThompsonExplorer.from_counts([1, 2], [1]), ValueError),
    (lambda: ThompsonExplorer.blend([1, 2], [3], 2, np.random.default_rng(), placement="top"), ValueError),
    (lambda: ThompsonExplorer.blend([1, 2], [3], -1, np.random.default_rng()), ValueError),
    (lambda: ThompsonExplorer.blend([1, 2], [3], 2, None), TypeError),
])
def test_bad_input_raises_a_clear_error(call, exc):
    with pytest.raises(exc):
        call()
