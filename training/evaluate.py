"""Evaluation protocols: all-item ranking with the core's top-k, sampled ranking, and CTR.

- :func:`evaluate_retrieval`: the LightGCN protocol. Every user with a test item ranks all items it did
  not train on, by :func:`rec_engine.topk` over the exported vectors, exactly as serving would;
  :func:`evaluate_recommender` is the same protocol for any model that ranks all items for a user
  (graph filters, item-item models).
- :func:`evaluate_sampled`: the SASRec protocol. The held-out item competes with 100 sampled items the
  user never interacted with; ties count against the model.
- :func:`evaluate_ctr`: AUC and log loss of predicted click probabilities.

Popularity baselines plug into the same protocols through :func:`popularity_vectors` and
:func:`popularity_score_fn`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rec_engine import IdLists, topk

from .data.containers import SequenceData
from .metrics import _cutoffs, auc, coverage, logloss, novelty, ranking_metrics, sampled_metrics

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def take_lists(lists: IdLists, rows: np.ndarray) -> IdLists:
    """The lists of ``rows`` (int64 [B]) as a new :class:`IdLists` of B lists, gathered without a loop."""
    starts = lists.indptr[rows]
    lengths = lists.indptr[rows + 1] - starts
    indptr = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    gather = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
    return IdLists(indptr, lists.ids[gather])


def _user_subset(users, n_users: int) -> np.ndarray:
    if users is None:
        return np.arange(n_users, dtype=np.int64)
    u = np.asarray(users)
    if u.ndim != 1 or (u.size and u.dtype.kind not in "iu"):
        raise TypeError(f"users must be a 1-D array of integer user ids, got shape {u.shape} ({u.dtype})")
    u = u.astype(np.int64)
    if u.size and (u.min() < 0 or u.max() >= n_users):
        raise IndexError(f"users must be in [0, {n_users}), got values in [{int(u.min())}, {int(u.max())}]")
    return np.unique(u)


def _as_lists(value, n_users: int, name: str) -> IdLists:
    lists = value if isinstance(value, IdLists) else IdLists.from_lists(list(value))
    if len(lists) != n_users:
        raise ValueError(f"{name} has {len(lists)} lists but there are {n_users} users (rows of user_vecs)")
    return lists


def evaluate_retrieval(user_vecs, item_vecs, train, test, ks: Sequence[int] = (20,), *,
                       batch_size: int = 4096, metric: str = "ip", item_counts=None,
                       users=None) -> dict[str, float]:
    """All-item top-k evaluation (LightGCN protocol) through :func:`rec_engine.topk`.

    Parameters
    ----------
    user_vecs : float32 array, shape (n_users, d)
    item_vecs : float32 array, shape (n_items, d)
    train, test : IdLists (or sequences of arrays) of ``n_users`` lists
        Training items are excluded from each user's ranking; test items are the relevant ones
        (``Interactions.by_user()`` gives both).
    ks : sequence of int
        Cut-offs; every user's list is ``max(ks)`` long (padded with -1 when fewer items are eligible).
    batch_size : int
        Users per top-k call.
    metric : {"ip", "cosine"}
    item_counts : int array, shape (n_items,), optional
        Training popularity; adds ``"novelty@k"``.
    users : int array, optional
        Evaluate only these users (those among them without a test item are still skipped).

    Returns
    -------
    dict: :func:`~rec_engine_train.metrics.ranking_metrics` keys, ``"coverage@k"`` (and
    ``"novelty@k"``) for every ``k``, and ``"users"``, the number of users evaluated.
    """
    user_vecs = np.asarray(user_vecs)
    item_vecs = np.asarray(item_vecs)
    if user_vecs.ndim != 2 or item_vecs.ndim != 2:
        raise ValueError(f"user_vecs and item_vecs must be 2-D, got shapes {user_vecs.shape} and {item_vecs.shape}")
    if item_vecs.dtype.kind in "iuf":      # convert once, not in every top-k call (topk rejects the rest)
        item_vecs = np.ascontiguousarray(item_vecs, dtype=np.float32)
    n_users, n_items = user_vecs.shape[0], item_vecs.shape[0]
    train = _as_lists(train, n_users, "train")
    test = _as_lists(test, n_users, "test")

    def recommend(rows: np.ndarray, k: int) -> np.ndarray:
        return topk(user_vecs[rows], item_vecs, k=k, metric=metric, exclude=take_lists(train, rows)).ids

    return evaluate_recommender(recommend, test, n_items, ks, batch_size=batch_size, item_counts=item_counts,
                                users=users)


def evaluate_recommender(recommend: Callable[[np.ndarray, int], np.ndarray], test, n_items: int,
                         ks: Sequence[int] = (20,), *, batch_size: int = 4096, item_counts=None,
                         users=None) -> dict[str, float]:
    """All-item top-k evaluation (LightGCN protocol) of any model that ranks all items for a user.

    Parameters
    ----------
    recommend : callable ``(users int64 [B], k) -> ids int64 [B, w]``, ``w <= k``
        Each user's best items first, its train items already left out, slots without an item -1.
    test : IdLists (or a sequence of arrays), one list per user: the relevant items
    n_items : int  catalogue size (for coverage)
    ks, batch_size, item_counts, users : as in :func:`evaluate_retrieval`

    Returns
    -------
    dict: :func:`~rec_engine_train.metrics.ranking_metrics` keys, ``"coverage@k"`` (and ``"novelty@k"``)
    for every ``k``, and ``"users"``, the number of users evaluated (those with a test item).
    """
    test = test if isinstance(test, IdLists) else IdLists.from_lists(list(test))
    n_users = len(test)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ks = _cutoffs(ks)
    k_max = max(ks)
    chosen = _user_subset(users, n_users)
    chosen = chosen[np.diff(test.indptr)[chosen] > 0]
    if chosen.size == 0:
        raise ValueError("no user (of those asked for) has a test item")
    ranked = np.full((chosen.size, k_max), -1, dtype=np.int64)
    for start in range(0, chosen.size, batch_size):
        rows = chosen[start:start + batch_size]
        ids = np.asarray(recommend(rows, k_max))
        if ids.ndim != 2 or ids.shape[0] != rows.size or ids.shape[1] > k_max:
            raise ValueError(f"recommend returned shape {ids.shape} for {rows.size} users and k={k_max}")
        ranked[start:start + rows.size, :ids.shape[1]] = ids
    out = ranking_metrics(ranked, take_lists(test, chosen), ks)
    for k in ks:
        out[f"coverage@{k}"] = coverage(ranked[:, :k], n_items)
        if item_counts is not None:
            out[f"novelty@{k}"] = novelty(ranked[:, :k], item_counts, n_users)
    out["users"] = int(chosen.size)
    return out


def popularity_vectors(item_counts, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors under which the inner product is an item's popularity, so that the most-popular baseline
    runs through :func:`evaluate_retrieval` unchanged.

    Returns
    -------
    user_vecs : float32 [n_users, 1], all ones
    item_vecs : float32 [n_items, 1], the counts (exact up to 2**24)
    """
    counts = np.asarray(item_counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iuf":
        raise ValueError(f"item_counts must be a 1-D numeric array, got shape {counts.shape} ({counts.dtype})")
    if not np.isfinite(counts).all():
        raise ValueError("item_counts must be finite")
    return np.ones((n_users, 1), np.float32), counts.astype(np.float32).reshape(-1, 1)


def sample_unseen(seen: IdLists, rows: np.ndarray, n_items: int, n: int,
                  rng: np.random.Generator) -> np.ndarray:
    """``n`` items per row drawn uniformly (with replacement) from the items the row has not seen.

    The j-th unseen item of a row with sorted distinct seen items ``s`` is ``j + #{i : s_i - i <= j}``,
    so a uniform ``j`` maps to a uniform unseen item by one sorted search over all rows at once: exact,
    with no rejection rounds however few items a user has left.

    Parameters
    ----------
    seen : IdLists
        Items each user interacted with.
    rows : int64 [B]
        The users to sample for.
    n_items, n : int
        Catalogue size and samples per row.
    rng : numpy Generator
        Consumed as ``B * n`` doubles in row order, so results do not depend on how users are batched.

    Returns
    -------
    int64 [B, n]
    """
    sub = take_lists(seen, rows)
    if sub.ids.size and (sub.ids.min() < 0 or sub.ids.max() >= n_items):
        raise ValueError(f"seen items must be in [0, {n_items})")
    span = n_items + 1
    list_rows = np.repeat(np.arange(rows.size, dtype=np.int64), np.diff(sub.indptr))
    keys = np.unique(list_rows * span + sub.ids)                 # sorted distinct (row, item)
    key_rows = keys // span
    n_seen = np.bincount(key_rows, minlength=rows.size)
    n_unseen = n_items - n_seen
    if np.any(n_unseen == 0):
        user = int(rows[np.flatnonzero(n_unseen == 0)[0]])
        raise ValueError(f"user {user} has interacted with every item: no negative can be sampled")
    first = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(n_seen, out=first[1:])
    shifted = key_rows * span + (keys % span) - (np.arange(keys.size) - first[key_rows])   # row*span + s_i - i
    j = np.minimum((rng.random((rows.size, n)) * n_unseen[:, None]).astype(np.int64), n_unseen[:, None] - 1)
    below = np.searchsorted(shifted, np.arange(rows.size)[:, None] * span + j, side="right") - first[:-1, None]
    return j + below


def evaluate_sampled(score_fn: ScoreFn, seq: SequenceData, split: str = "test", n_negatives: int = 100,
                     seed: int = 0, ks: Sequence[int] = (10,), users=None,
                     batch_size: int = 1024) -> dict[str, float]:
    """Sampled ranking (SASRec protocol): the held-out item against ``n_negatives`` unseen items.

    Parameters
    ----------
    score_fn : callable ``(users int64 [B], candidates int64 [B, 1 + n_negatives]) -> scores [B, 1 + n_negatives]``
        Column 0 of ``candidates`` is the target; the others are negatives drawn uniformly, with
        replacement, from the items the user never interacted with (``seq.seen("test")``).
    seq : SequenceData
    split : {"valid", "test"}
        Which held-out item is the target; users without one (-1) are skipped.
    n_negatives, seed : int
        Sampling; the same seed gives the same candidates whatever ``batch_size``.
    ks : sequence of int
    users : int array, optional
        Evaluate only these users.
    batch_size : int
        Users per ``score_fn`` call.

    Returns
    -------
    dict: :func:`~rec_engine_train.metrics.sampled_metrics` keys and ``"users"``.

    Notes
    -----
    The target's rank is the number of negatives scoring strictly higher plus the number tied with it,
    so ties count against the model and a constant scorer ranks every target last.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    if n_negatives < 1 or batch_size < 1:
        raise ValueError(f"n_negatives and batch_size must be >= 1, got {n_negatives} and {batch_size}")
    targets = np.asarray(seq.valid if split == "valid" else seq.test, dtype=np.int64)
    chosen = _user_subset(users, seq.n_users)
    chosen = chosen[targets[chosen] >= 0]
    if chosen.size == 0:
        raise ValueError(f"no user (of those asked for) has a {split} item")
    seen = seq.seen("test")
    rng = np.random.default_rng(seed)
    ranks = np.empty(chosen.size, dtype=np.int64)
    for start in range(0, chosen.size, batch_size):
        rows = chosen[start:start + batch_size]
        cands = np.concatenate([targets[rows, None], sample_unseen(seen, rows, seq.n_items, n_negatives, rng)], axis=1)
        scores = np.asarray(score_fn(rows, cands), dtype=np.float64)
        if scores.shape != cands.shape:
            raise ValueError(f"score_fn returned shape {scores.shape}, expected {cands.shape}")
        if np.isnan(scores).any():
            raise ValueError("score_fn returned NaN scores")
        ranks[start:start + rows.size] = np.count_nonzero(scores[:, 1:] >= scores[:, :1], axis=1)
    out = sampled_metrics(ranks, ks)
    out["users"] = int(chosen.size)
    return out


def popularity_score_fn(item_counts) -> ScoreFn:
    """A ``score_fn`` for :func:`evaluate_sampled` that scores every candidate by its training count."""
    counts = np.asarray(item_counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"item_counts must be 1-D, got shape {counts.shape}")

    def score(users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return counts[candidates]

    return score


def evaluate_ctr(labels, probs) -> dict[str, float]:
    """``{"auc", "logloss"}`` of predicted click probabilities against 0/1 labels."""
    return {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}
