"""Ranking, sampled-ranking and CTR metrics, vectorized in NumPy.

Definitions follow the reference implementations of the papers the models come from:

- all-item ranking (LightGCN): recall, precision, NDCG with binary gains, hit rate and MRR at cut-offs,
  averaged over the users that have at least one relevant item;
- sampled ranking (SASRec): hit rate and NDCG of one target among sampled negatives, given its rank;
- CTR: ROC AUC (Mann-Whitney, ties averaged) and clipped log loss;
- catalogue coverage and novelty of recommendation lists.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rec_engine import IdLists


def _cutoffs(ks, width: int | None = None) -> tuple[int, ...]:
    ks = (ks,) if np.isscalar(ks) else tuple(ks)
    if not ks:
        raise ValueError("ks must hold at least one cut-off")
    out = []
    for k in ks:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"cut-offs must be integers, got {k!r}")
        if k < 1:
            raise ValueError(f"cut-offs must be >= 1, got {k}")
        if width is not None and k > width:
            raise ValueError(f"cut-off {k} exceeds the {width} ranked columns")
        out.append(int(k))
    return tuple(out)


def _int_array(x, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if a.size == 0 and a.dtype.kind == "f":
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer ids, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' if ndim > 1 else ''}, got shape {a.shape}")
    return a.astype(np.int64, copy=False)


def _as_lists(truth, n_rows: int, name: str = "truth") -> IdLists:
    lists = truth if isinstance(truth, IdLists) else IdLists.from_lists(list(truth))
    if len(lists) != n_rows:
        raise ValueError(f"{name} has {len(lists)} lists but ranked has {n_rows} rows")
    if lists.ids.size and lists.ids.min() < 0:
        raise ValueError(f"{name} holds a negative item id ({int(lists.ids.min())})")
    return lists


def _discounts(n: int) -> np.ndarray:
    """``1 / log2(r + 2)`` for 0-based ranks ``r = 0 .. n-1``, float64 [n]."""
    return 1.0 / np.log2(np.arange(n, dtype=np.float64) + 2.0)


def _hit_matrix(ranked, truth) -> tuple[np.ndarray, np.ndarray]:
    """Which ranked ids are relevant, found by one sorted search over ``(row, item)`` keys.

    Parameters
    ----------
    ranked : int array, shape (U, K)
        Item ids per row, best first; -1 marks an empty slot.
    truth : IdLists or sequence of U int arrays
        The relevant items of each row (duplicates count once).

    Returns
    -------
    hits : bool [U, K]
        ``hits[u, r]`` is True when ``ranked[u, r]`` is one of row ``u``'s relevant items.
    n_truth : int64 [U]
        Number of distinct relevant items per row.
    """
    ranked = _int_array(ranked, "ranked", 2)
    n_rows, width = ranked.shape
    lists = _as_lists(truth, n_rows)
    if ranked.size and ranked.min() < -1:
        raise ValueError(f"ranked ids must be >= 0 or -1 (padding), got {int(ranked.min())}")
    filled = np.sort(ranked, axis=1)
    repeated = ((filled[:, 1:] == filled[:, :-1]) & (filled[:, 1:] >= 0)).any(axis=1)
    if repeated.any():
        raise ValueError(f"ranked row {int(np.flatnonzero(repeated)[0])} lists an item twice")
    span = int(max(ranked.max(initial=-1), lists.ids.max(initial=-1))) + 1
    truth_rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(lists.indptr))
    keys = np.unique(truth_rows * span + lists.ids)           # sorted, one key per (row, item)
    n_truth = np.bincount(keys // max(span, 1), minlength=n_rows).astype(np.int64)
    if keys.size == 0:
        return np.zeros(ranked.shape, dtype=bool), n_truth
    query = np.arange(n_rows, dtype=np.int64)[:, None] * span + ranked
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return (ranked >= 0) & (keys[pos] == query), n_truth


def ranking_metrics(ranked, truth, ks: Sequence[int] = (20,)) -> dict[str, float]:
    """Top-k ranking metrics of ranked lists against sets of relevant items (LightGCN protocol).

    Parameters
    ----------
    ranked : int array, shape (U, K)
        Item ids per row, best first; -1 marks padding (no item). Ids within a row are distinct.
    truth : IdLists or sequence of U int arrays
        The relevant items of each row.
    ks : sequence of int
        Cut-offs, each ``1 <= k <= K``.

    Returns
    -------
    dict with ``"recall@k"``, ``"precision@k"``, ``"ndcg@k"``, ``"hr@k"``, ``"mrr@k"`` for every ``k``
    (Python floats), averaged over the rows with at least one relevant item; other rows are skipped.

    Notes
    -----
    With ``hits`` the relevant ranks ``r`` (0-based) among the first ``k``: recall = |hits| / |truth|,
    precision = |hits| / k, ndcg = sum 1/log2(r+2) / sum_{r < min(|truth|, k)} 1/log2(r+2),
    hr = [|hits| > 0], mrr = 1 / (first r + 1) (0 without a hit).

    Raises
    ------
    ValueError  wrong shapes, ids below -1, a repeated id in a row, ``k`` outside ``[1, K]``, or no row
    with a relevant item.
    """
    hits, n_truth = _hit_matrix(ranked, truth)
    ks = _cutoffs(ks, hits.shape[1])
    keep = n_truth > 0
    if not keep.any():
        raise ValueError("no row has a relevant item: the metrics are undefined")
    hits, n_truth = hits[keep], n_truth[keep]
    disc = _discounts(hits.shape[1])
    ideal = np.concatenate([[0.0], np.cumsum(disc)])
    out: dict[str, float] = {}
    for k in ks:
        h = hits[:, :k]
        n_hit = h.sum(axis=1)
        dcg = h @ disc[:k]
        idcg = ideal[np.minimum(n_truth, k)]
        first = np.argmax(h, axis=1)
        out[f"recall@{k}"] = float(np.mean(n_hit / n_truth))
        out[f"precision@{k}"] = float(np.mean(n_hit / k))
        out[f"ndcg@{k}"] = float(np.mean(dcg / idcg))
        out[f"hr@{k}"] = float(np.mean(n_hit > 0))
        out[f"mrr@{k}"] = float(np.mean(np.where(n_hit > 0, 1.0 / (first + 1.0), 0.0)))
    return out


def sampled_metrics(ranks, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """Hit rate, NDCG and MRR of one target per user, from its 0-based rank among its candidates.

    Parameters
    ----------
    ranks : int array, shape (U,)
        ``ranks[u]`` = number of candidates placed above user ``u``'s target (0 = first).
    ks : sequence of int
        Cut-offs.

    Returns
    -------
    dict: ``"hr@k"`` = mean(rank < k), ``"ndcg@k"`` = mean(1/log2(rank+2) if rank < k else 0) for every
    ``k``, and ``"mrr"`` = mean(1/(rank+1)).
    """
    r = _int_array(ranks, "ranks", 1)
    if r.size == 0:
        raise ValueError("ranks is empty: the metrics are undefined")
    if r.min() < 0:
        raise ValueError(f"ranks must be >= 0, got {int(r.min())}")
    out: dict[str, float] = {}
    gain = 1.0 / np.log2(r + 2.0)
    for k in _cutoffs(ks):
        inside = r < k
        out[f"hr@{k}"] = float(np.mean(inside))
        out[f"ndcg@{k}"] = float(np.mean(np.where(inside, gain, 0.0)))
    out["mrr"] = float(np.mean(1.0 / (r + 1.0)))
    return out


def _binary_pair(labels, values, name: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    v = np.asarray(values)
    if y.ndim != 1 or v.ndim != 1:
        raise ValueError(f"labels and {name} must be 1-D, got shapes {y.shape} and {v.shape}")
    if y.shape[0] != v.shape[0]:
        raise ValueError(f"labels ({y.shape[0]}) and {name} ({v.shape[0]}) differ in length")
    if y.shape[0] == 0:
        raise ValueError("labels is empty")
    if y.dtype.kind not in "biuf" or v.dtype.kind not in "biuf":
        raise TypeError(f"labels and {name} must be numeric, got {y.dtype} and {v.dtype}")
    y = y.astype(np.float64)
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    v = v.astype(np.float64)
    if np.isnan(v).any():
        raise ValueError(f"{name} contain NaN (at position {int(np.flatnonzero(np.isnan(v))[0])})")
    return y.astype(bool), v


def _average_ranks(values) -> np.ndarray:
    """1-based ranks of ``values`` (float64 [n]) with tied values sharing the mean of their ranks."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_v[1:] != sorted_v[:-1]]))
    ends = np.concatenate([starts[1:], [v.shape[0]]])
    group_rank = (starts + 1 + ends) / 2.0      # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(v.shape[0], dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def auc(labels, scores) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random negative
    (ties count one half), from average ranks (the Mann-Whitney U statistic).

    Parameters
    ----------
    labels : array, shape (n,), values 0/1 (bool, int or float)
    scores : array, shape (n,), real

    Raises
    ------
    ValueError  mismatched lengths, labels other than 0/1, NaN scores, or only one class present.
    """
    y, s = _binary_pair(labels, scores, "scores")
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes, got {n_pos} positives and {n_neg} negatives")
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, with probabilities clipped to ``[eps, 1 - eps]`` (in float64).

    Parameters
    ----------
    labels : array, shape (n,), values 0/1
    probs : array, shape (n,), probabilities in [0, 1]

    Raises
    ------
    ValueError  mismatched lengths, labels other than 0/1, NaN or probabilities outside [0, 1].
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    y, p = _binary_pair(labels, probs, "probs")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"probs must lie in [0, 1], got values in [{p.min()}, {p.max()}]")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def _ranked_items(ranked, n_items: int) -> np.ndarray:
    r = _int_array(ranked, "ranked", 2)
    ids = r[r >= 0]
    if r.size and r.min() < -1:
        raise ValueError(f"ranked ids must be >= 0 or -1 (padding), got {int(r.min())}")
    if ids.size and ids.max() >= n_items:
        raise ValueError(f"ranked holds item {int(ids.max())} but the catalogue has {n_items} items")
    return ids


def coverage(ranked, n_items: int) -> float:
    """Fraction of the ``n_items`` catalogue that appears in at least one ranked list (ignoring -1).

    Parameters
    ----------
    ranked : int array, shape (U, K)
    n_items : int, > 0
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    ids = _ranked_items(ranked, n_items)
    return float(np.count_nonzero(np.bincount(ids, minlength=n_items)) / n_items)


def novelty(ranked, item_counts, n_users: int) -> float:
    """Mean self-information ``-log2(count / n_users)`` of the recommended items (ignoring -1).

    Parameters
    ----------
    ranked : int array, shape (U, K)
    item_counts : int array, shape (n_items,)
        Training popularity of each item (users who interacted with it); a count of 0 is taken as 1.
    n_users : int
        Number of users the counts were taken over.

    Raises
    ------
    ValueError  no recommended item, negative counts, ids outside the catalogue.
    """
    counts = np.asarray(item_counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iuf":
        raise ValueError(f"item_counts must be a 1-D numeric array, got shape {counts.shape} ({counts.dtype})")
    if counts.size and counts.min() < 0:
        raise ValueError("item_counts must be >= 0")
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    ids = _ranked_items(ranked, counts.shape[0])
    if ids.size == 0:
        raise ValueError("ranked holds no item: novelty is undefined")
    c = np.maximum(counts[ids].astype(np.float64), 1.0)
    return float(np.mean(-np.log2(c / n_users)))
