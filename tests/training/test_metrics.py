"""Metrics and evaluation protocols against hand-computed values and slow, obvious references."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rec_engine import IdLists
from rec_engine_train.data.containers import Interactions, SequenceData
from rec_engine_train.evaluate import (evaluate_ctr, evaluate_retrieval, evaluate_sampled,
                                       popularity_score_fn, popularity_vectors, sample_unseen)
from rec_engine_train.metrics import (auc, coverage, logloss, novelty, ranking_metrics,
                                      sampled_metrics)

L3 = 1.0 / math.log2(3)     # discount of rank 1
L4 = 1.0 / math.log2(4)     # rank 2
L5 = 1.0 / math.log2(5)     # rank 3


# ---------------------------------------------------------------- slow references

def reference_ranking(ranked, truth, ks):
    """Per-user Python sets, straight from the definitions."""
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "precision", "ndcg", "hr", "mrr")}
    n = 0
    for row, rel in zip(ranked, truth):
        rel = set(int(x) for x in rel)
        if not rel:
            continue
        n += 1
        for k in ks:
            ranks = [r for r, item in enumerate(row[:k]) if item >= 0 and int(item) in rel]
            sums[f"recall@{k}"] += len(ranks) / len(rel)
            sums[f"precision@{k}"] += len(ranks) / k
            dcg = sum(1.0 / math.log2(r + 2) for r in ranks)
            idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(rel), k)))
            sums[f"ndcg@{k}"] += dcg / idcg
            sums[f"hr@{k}"] += 1.0 if ranks else 0.0
            sums[f"mrr@{k}"] += 1.0 / (ranks[0] + 1) if ranks else 0.0
    return {key: v / n for key, v in sums.items()}


def brute_auc(labels, scores):
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def trapezoid_auc(labels, scores):
    """Area under the ROC polyline through the thresholds at each distinct score (ties give diagonals)."""
    thresholds = np.unique(scores)[::-1]
    tpr = [0.0] + [float(np.mean(scores[labels == 1] >= t)) for t in thresholds]
    fpr = [0.0] + [float(np.mean(scores[labels == 0] >= t)) for t in thresholds]
    return sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(thresholds)))


def random_ranked(rng, n_rows, width, n_items):
    ranked = np.stack([rng.permutation(n_items)[:width] for _ in range(n_rows)])
    cut = rng.integers(0, width + 1, size=n_rows)             # pad a random tail with -1
    ranked[np.arange(width)[None, :] >= cut[:, None]] = -1
    return ranked


# ---------------------------------------------------------------- ranking_metrics by hand

RANKED = np.array([[3, 1, 7, -1],       # truth {1, 7, 11}: hits at ranks 1, 2
                   [5, 2, 0, 4],        # no truth: skipped
                   [6, 8, 2, 9],        # truth {6, 9}: hits at ranks 0, 3
                   [0, 2, -1, -1]])     # truth {5}: no hit
TRUTH = [[1, 7, 11], [], [6, 9], [5]]


def test_ranking_metrics_match_hand_computed_values():
    got = ranking_metrics(RANKED, TRUTH, ks=(2, 4))
    expected = {
        "recall@2": (1 / 3 + 1 / 2 + 0) / 3,
        "precision@2": (1 / 2 + 1 / 2 + 0) / 3,
        "ndcg@2": (L3 / (1 + L3) + 1 / (1 + L3) + 0) / 3,
        "hr@2": (1 + 1 + 0) / 3,
        "mrr@2": (1 / 2 + 1 + 0) / 3,
        "recall@4": (2 / 3 + 1 + 0) / 3,
        "precision@4": (2 / 4 + 2 / 4 + 0) / 3,
        # row 0: DCG = 1/log2(3) + 1/log2(4), IDCG over min(3, 4) = 3 ranks; row 2: DCG = 1 + 1/log2(5)
        "ndcg@4": ((L3 + L4) / (1 + L3 + L4) + (1 + L5) / (1 + L3) + 0) / 3,
        "hr@4": (1 + 1 + 0) / 3,
        "mrr@4": (1 / 2 + 1 + 0) / 3,
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_two_user_example_recall_at_3():
    got = ranking_metrics([[0, 1, 2], [5, 4, 3]], [[1, 9], [3]], ks=(3,))
    assert got["recall@3"] == pytest.approx((1 / 2 + 1 / 1) / 2)
    assert got["ndcg@3"] == pytest.approx((L3 / (1 + L3) + L4 / 1) / 2)
    assert got["mrr@3"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_padding_is_not_an_item_and_precision_divides_by_k():
    got = ranking_metrics(np.array([[4, -1, -1]]), [[4]], ks=(1, 3))
    assert got["precision@3"] == pytest.approx(1 / 3)
    assert got["precision@1"] == 1.0 and got["recall@3"] == 1.0 and got["ndcg@3"] == 1.0


def test_padding_does_not_match_any_truth_of_the_previous_row():
    # keys are row * span + item: a -1 in row 1 would equal row 0's largest item without the mask
    got = ranking_metrics(np.array([[0, 1], [-1, -1]]), [[1], [0]], ks=(2,))
    assert got["hr@2"] == pytest.approx(0.5)


def test_rows_without_truth_are_skipped_not_counted_as_zero():
    keep = [0, 2, 3]
    with_empty = ranking_metrics(RANKED, TRUTH, ks=(2, 4))
    without = ranking_metrics(RANKED[keep], [TRUTH[i] for i in keep], ks=(2, 4))
    assert with_empty == without


def test_smaller_k_only_looks_at_the_first_k_columns():
    assert ranking_metrics(RANKED, TRUTH, ks=(2,)) == ranking_metrics(RANKED[:, :2], TRUTH, ks=(2,))


def test_duplicate_truth_items_count_once():
    assert ranking_metrics([[1, 2]], [[1, 1, 3]], ks=(2,))["recall@2"] == pytest.approx(1 / 2)


def test_idlists_and_list_truth_agree():
    assert ranking_metrics(RANKED, IdLists.from_lists(TRUTH), (4,)) == ranking_metrics(RANKED, TRUTH, (4,))


def test_ranking_metrics_match_set_reference_on_random_data():
    rng = np.random.default_rng(0)
    n_items = 60
    ranked = random_ranked(rng, 200, 15, n_items)
    truth = [rng.integers(0, n_items, size=rng.integers(0, 12)) for _ in range(200)]
    ks = (1, 5, 10, 15)
    got = ranking_metrics(ranked, truth, ks)
    ref = reference_ranking(ranked, truth, ks)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


@pytest.mark.parametrize("ranked, truth, ks, match", [
    ([[0, 1]], [[0]], (3,), "exceeds"),
    ([[0, 1]], [[0]], (0,), ">= 1"),
    ([[0, 1]], [[0], [1]], (1,), "2 lists but ranked has 1 rows"),
    ([[0, 0]], [[0]], (2,), "row 0 lists an item twice"),
    ([[0, -2]], [[0]], (2,), ">= 0 or -1"),
    ([[0, 1]], [[-3]], (2,), "negative item id"),
    ([[0, 1]], [[]], (2,), "no row has a relevant item"),
    ([0, 1], [[0]], (1,), "2 dimensions"),
])
def test_ranking_metrics_rejects_bad_input(ranked, truth, ks, match):
    with pytest.raises(ValueError, match=match):
        ranking_metrics(np.asarray(ranked), truth, ks)


def test_ranking_metrics_rejects_float_ids():
    with pytest.raises(TypeError, match="integer"):
        ranking_metrics(np.array([[0.0, 1.0]]), [[0]], (1,))


# ---------------------------------------------------------------- sampled_metrics

def test_sampled_metrics_match_hand_computed_values():
    got = sampled_metrics(np.array([0, 3, 12]), ks=(1, 10))
    assert got == pytest.approx({
        "hr@1": 1 / 3, "ndcg@1": 1 / 3,
        "hr@10": 2 / 3, "ndcg@10": (1 + L5 + 0) / 3,
        "mrr": (1 + 1 / 4 + 1 / 13) / 3,
    })


@pytest.mark.parametrize("ranks, match", [([], "empty"), ([0, -1], ">= 0")])
def test_sampled_metrics_rejects_bad_ranks(ranks, match):
    with pytest.raises(ValueError, match=match):
        sampled_metrics(np.asarray(ranks, dtype=np.int64))


# ---------------------------------------------------------------- auc / logloss

def test_auc_hand_computed_with_a_tie():
    # pairs (pos, neg): 0.9>0.3, 0.9>0.1, 0.3=0.3 (half), 0.3>0.1  ->  3.5 / 4
    assert auc([1, 0, 1, 0], [0.9, 0.3, 0.3, 0.1]) == pytest.approx(0.875)


def test_auc_matches_pairwise_count_and_roc_area_on_random_tied_scores():
    rng = np.random.default_rng(1)
    for n in (2, 7, 300):
        labels = np.r_[0, 1, rng.integers(0, 2, size=n - 2)]
        scores = rng.integers(0, 5, size=n).astype(np.float64)       # many ties
        assert auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)
        assert auc(labels, scores) == pytest.approx(trapezoid_auc(labels, scores), abs=1e-12)
        assert auc(labels, -scores) == pytest.approx(1 - auc(labels, scores), abs=1e-12)


def test_auc_of_perfect_and_constant_scores():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_logloss_hand_computed_and_clipped():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    # certain and wrong: clipped to eps = 1e-7, also for float32 input where 1 - 1e-7 rounds to 1
    assert logloss([0, 1], np.array([1.0, 0.0], np.float32)) == pytest.approx(-math.log(1e-7), rel=1e-9)


def test_logloss_matches_direct_formula_on_random_data():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=500)
    probs = rng.uniform(0.01, 0.99, size=500)
    direct = -np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
    assert logloss(labels, probs) == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("fn", [auc, logloss])
@pytest.mark.parametrize("labels, values, match", [
    ([0, 1, 1], [0.1, 0.2], r"labels \(3\) and (scores|probs) \(2\) differ in length"),
    ([0, 1], [0.1, np.nan], "NaN"),
    ([0, 2], [0.1, 0.2], "0 or 1"),
    ([], [], "empty"),
    ([[0, 1]], [[0.1, 0.2]], "1-D"),
])
def test_auc_and_logloss_reject_bad_input(fn, labels, values, match):
    with pytest.raises(ValueError, match=match):
        fn(np.asarray(labels), np.asarray(values))


def test_auc_rejects_a_single_class():
    with pytest.raises(ValueError, match="both classes.*3 positives and 0 negatives"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_logloss_rejects_probabilities_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        logloss([0, 1], [0.5, 1.5])


def test_evaluate_ctr_returns_auc_and_logloss():
    got = evaluate_ctr(np.array([1, 0, 1, 0]), np.array([0.9, 0.3, 0.3, 0.1]))
    assert got["auc"] == pytest.approx(0.875)
    assert got["logloss"] == pytest.approx(-(math.log(0.9) + math.log(0.7) + math.log(0.3) + math.log(0.9)) / 4)


# ---------------------------------------------------------------- coverage / novelty

def test_coverage_counts_distinct_items_ignoring_padding():
    assert coverage(np.array([[0, 1, -1], [1, 3, -1]]), 5) == pytest.approx(3 / 5)


def test_novelty_is_mean_self_information_with_zero_counts_as_one():
    counts = np.array([4, 1, 0, 2])
    # items 0, 1, 2: -log2(4/4) = 0, -log2(1/4) = 2, -log2(1/4) = 2 (count 0 taken as 1)
    assert novelty(np.array([[0, 1], [2, -1]]), counts, 4) == pytest.approx(4 / 3)


def test_coverage_and_novelty_reject_ids_outside_the_catalogue():
    with pytest.raises(ValueError, match="item 7 but the catalogue has 5"):
        coverage(np.array([[7]]), 5)
    with pytest.raises(ValueError, match="catalogue has 2"):
        novelty(np.array([[2]]), np.array([1, 1]), 3)
    with pytest.raises(ValueError, match="no item"):
        novelty(np.array([[-1]]), np.array([1, 1]), 3)


# ---------------------------------------------------------------- evaluate_retrieval

def brute_retrieval(user_vecs, item_vecs, train, test, ks, item_counts):
    """Full score matrix, train masked with -inf, stable argsort (ties: lower id first)."""
    n_users, n_items = user_vecs.shape[0], item_vecs.shape[0]
    scores = user_vecs.astype(np.float64) @ item_vecs.astype(np.float64).T
    for u in range(n_users):
        scores[u, train[u]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :max(ks)]
    ranked = np.where(np.take_along_axis(scores, order, axis=1) == -np.inf, -1, order)
    users = [u for u in range(n_users) if len(test[u])]
    ranked = ranked[users]
    out = reference_ranking(ranked, [test[u] for u in users], ks)
    for k in ks:
        items = ranked[:, :k][ranked[:, :k] >= 0]
        out[f"coverage@{k}"] = len(set(items.tolist())) / n_items
        out[f"novelty@{k}"] = float(np.mean([-math.log2(max(item_counts[i], 1) / n_users) for i in items]))
    out["users"] = len(users)
    return out


@pytest.fixture
def retrieval_problem():
    rng = np.random.default_rng(3)
    n_users, n_items, d = 37, 40, 6
    # small integer-valued vectors: exact float sums in every implementation, and many tied scores
    user_vecs = rng.integers(-3, 4, size=(n_users, d)).astype(np.float32)
    item_vecs = rng.integers(-3, 4, size=(n_items, d)).astype(np.float32)
    tr_u = rng.integers(0, n_users, size=300)
    tr_i = rng.integers(0, n_items, size=300)
    tr_u = np.r_[tr_u, np.zeros(32, np.int64)]           # user 0 trained on 32 items: fewer than k left
    tr_i = np.r_[tr_i, np.arange(32)]
    train = Interactions(tr_u, tr_i, n_users, n_items)
    te_u = rng.integers(0, n_users - 8, size=60)          # the last 8 users have no test item
    te_i = rng.integers(0, n_items, size=60)
    test = Interactions(np.r_[te_u, 0], np.r_[te_i, 35], n_users, n_items)
    return user_vecs, item_vecs, train, test


def test_evaluate_retrieval_matches_brute_force_ranking(retrieval_problem):
    user_vecs, item_vecs, train, test = retrieval_problem
    counts = train.item_counts()
    ks = (3, 10, 20)
    got = evaluate_retrieval(user_vecs, item_vecs, train.by_user(), test.by_user(), ks,
                             batch_size=7, item_counts=counts)
    ref = brute_retrieval(user_vecs, item_vecs, train.by_user(), test.by_user(), ks, counts)
    assert got.keys() == ref.keys()
    assert got["users"] == ref["users"] == len(np.unique(test.users))
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def test_evaluate_retrieval_does_not_depend_on_batch_size(retrieval_problem):
    user_vecs, item_vecs, train, test = retrieval_problem
    a = evaluate_retrieval(user_vecs, item_vecs, train.by_user(), test.by_user(), (5,), batch_size=1)
    b = evaluate_retrieval(user_vecs, item_vecs, train.by_user(), test.by_user(), (5,), batch_size=4096)
    assert a == b


def test_evaluate_retrieval_on_a_user_subset_equals_restricting_the_test(retrieval_problem):
    user_vecs, item_vecs, train, test = retrieval_problem
    subset = np.array([0, 3, 5, 8, 30, 36])               # 36 has no test item
    got = evaluate_retrieval(user_vecs, item_vecs, train.by_user(), test.by_user(), (10,), users=subset)
    lists = test.by_user()
    only = IdLists.from_lists([lists[u] if u in subset else [] for u in range(len(lists))])
    ref = evaluate_retrieval(user_vecs, item_vecs, train.by_user(), only, (10,))
    assert got == ref and got["users"] == sum(len(lists[u]) > 0 for u in subset)


def test_evaluate_retrieval_rejects_mismatched_lists(retrieval_problem):
    user_vecs, item_vecs, train, test = retrieval_problem
    with pytest.raises(ValueError, match="test has 3 lists but there are 37 users"):
        evaluate_retrieval(user_vecs, item_vecs, train.by_user(), [[0], [1], [2]])
    with pytest.raises(ValueError, match="no user"):
        evaluate_retrieval(user_vecs, item_vecs, train.by_user(), [[]] * 37)


def test_popularity_vectors_rank_items_by_count(retrieval_problem):
    _, _, train, test = retrieval_problem
    counts = train.item_counts()
    user_vecs, item_vecs = popularity_vectors(counts, train.n_users)
    assert user_vecs.shape == (train.n_users, 1) and item_vecs.shape == (train.n_items, 1)
    got = evaluate_retrieval(user_vecs, item_vecs, train.by_user(), test.by_user(), (10,))
    # reference: items sorted by count (descending, ties lower id first), train items removed
    by_count = np.argsort(-counts, kind="stable")
    tr, te = train.by_user(), test.by_user()
    users = [u for u in range(train.n_users) if len(te[u])]
    ranked = np.full((len(users), 10), -1)
    for row, u in enumerate(users):
        keep = by_count[~np.isin(by_count, tr[u])][:10]
        ranked[row, :keep.size] = keep
    ref = reference_ranking(ranked, [te[u] for u in users], (10,))
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


# ---------------------------------------------------------------- evaluate_sampled

@pytest.fixture
def sequences():
    rng = np.random.default_rng(4)
    n_users, n_items = 60, 300
    train, valid, test = [], np.full(n_users, -1), np.full(n_users, -1)
    for u in range(n_users):
        items = rng.choice(n_items, size=rng.integers(3, 40), replace=False)
        if u % 7 == 3:                    # too short: no valid / test item
            train.append(items[:1])
            continue
        train.append(items[:-2])
        valid[u], test[u] = items[-2], items[-1]
    return SequenceData(train, valid, test, n_items)


class Recorder:
    """A score_fn that records what it was asked, then scores with ``inner``."""

    def __init__(self, inner):
        self.inner, self.users, self.cands = inner, [], []

    def __call__(self, users, cands):
        self.users.append(users.copy())
        self.cands.append(cands.copy())
        return self.inner(users, cands)


def test_oracle_scorer_gets_perfect_hit_rate(sequences):
    target = sequences.test
    got = evaluate_sampled(lambda u, c: (c == target[u][:, None]).astype(np.float32), sequences, ks=(1, 10))
    assert got["hr@1"] == got["hr@10"] == got["ndcg@10"] == got["mrr"] == 1.0
    assert got["users"] == int(np.sum(target >= 0))


def test_constant_scorer_gets_no_credit_for_ties(sequences):
    got = evaluate_sampled(lambda u, c: np.zeros(c.shape), sequences, ks=(10,))
    assert got["hr@10"] == 0.0 and got["ndcg@10"] == 0.0
    assert got["mrr"] == pytest.approx(1 / 101)


def test_candidates_are_target_then_unseen_items(sequences):
    rec = Recorder(lambda u, c: np.zeros(c.shape))
    evaluate_sampled(rec, sequences, split="valid", n_negatives=50, batch_size=16)
    users, cands = np.concatenate(rec.users), np.concatenate(rec.cands)
    assert cands.shape == (users.size, 51) and cands.dtype == np.int64
    np.testing.assert_array_equal(users, np.flatnonzero(sequences.valid >= 0))
    np.testing.assert_array_equal(cands[:, 0], sequences.valid[users])
    seen = sequences.seen("test")
    for u, row in zip(users, cands):
        assert not set(row[1:].tolist()) & set(seen[u].tolist()), f"user {u} got a seen item as negative"
    assert cands.min() >= 0 and cands.max() < sequences.n_items


def test_sampling_is_seeded_and_independent_of_batch_size(sequences):
    def run(seed, batch_size):
        rec = Recorder(popularity_score_fn(np.arange(sequences.n_items)))
        out = evaluate_sampled(rec, sequences, seed=seed, batch_size=batch_size)
        return out, np.concatenate(rec.cands)

    a, cands_a = run(0, 1024)
    b, cands_b = run(0, 5)
    c, cands_c = run(1, 1024)
    assert a == b
    np.testing.assert_array_equal(cands_a, cands_b)
    assert not np.array_equal(cands_a, cands_c)


def test_popularity_scorer_ranks_match_a_per_user_count(sequences):
    counts = np.random.default_rng(5).integers(0, 4, size=sequences.n_items)   # many ties
    rec = Recorder(popularity_score_fn(counts))
    got = evaluate_sampled(rec, sequences, ks=(5, 10))
    ranks = [sum(counts[n] >= counts[row[0]] for n in row[1:]) for row in np.concatenate(rec.cands)]
    n = len(ranks)
    assert got["hr@10"] == pytest.approx(sum(r < 10 for r in ranks) / n)
    assert got["ndcg@5"] == pytest.approx(sum(1 / math.log2(r + 2) for r in ranks if r < 5) / n)
    assert got["mrr"] == pytest.approx(sum(1 / (r + 1) for r in ranks) / n)


def test_sample_unseen_is_uniform_over_the_few_unseen_items():
    n_items = 300
    unseen = {5, 17, 299}
    seen = IdLists.from_lists([[i for i in range(n_items) if i not in unseen], [0, 0, 1]])
    draws = sample_unseen(seen, np.array([0, 1]), n_items, 3000, np.random.default_rng(6))
    values, freq = np.unique(draws[0], return_counts=True)
    assert set(values.tolist()) == unseen
    assert np.all(np.abs(freq - 1000) < 150)                  # ~5 sigma for a binomial(3000, 1/3)
    assert draws[1].min() >= 2 and len(np.unique(draws[1])) == n_items - 2


def test_evaluate_sampled_rejects_bad_input(sequences):
    with pytest.raises(ValueError, match="split"):
        evaluate_sampled(lambda u, c: np.zeros(c.shape), sequences, split="train")
    with pytest.raises(ValueError, match=r"score_fn returned shape \(\d+, 100\), expected \(\d+, 101\)"):
        evaluate_sampled(lambda u, c: np.zeros((c.shape[0], 100)), sequences)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_sampled(lambda u, c: np.full(c.shape, np.nan), sequences)
    with pytest.raises(IndexError, match="users must be in"):
        evaluate_sampled(lambda u, c: np.zeros(c.shape), sequences, users=[0, 60])


def test_user_who_saw_every_item_cannot_be_sampled_for():
    seq = SequenceData([np.arange(1, 4)], np.array([0]), np.array([4]), n_items=5)
    with pytest.raises(ValueError, match="user 0 has interacted with every item"):
        evaluate_sampled(lambda u, c: np.zeros(c.shape), seq)
