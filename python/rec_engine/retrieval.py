"""Retrieval: the first stage. User vectors from a bundle, items by exact top-k in C++.

One class per way a bundle produces user vectors:

- :class:`VectorRetrieval` (``mf``, ``lightgcn``, ``ngcf``, ``popularity``): stored user and item vectors.
  A LightGCN user with observed interactions gets its vector folded in: its layers are recomputed from
  its new neighbourhood with the core's pooling over the items' stored layer embeddings, which is one
  row of the propagation the model was trained with (item layers kept fixed).
- :class:`FilterRetrieval` (``gfcf``): no user vector; a user's scores are the fitted graph filter applied
  to its item row (train + observed items), so new interactions count at once.
- :class:`SequentialRetrieval` (``sasrec``): the user vector is the ONNX encoder's output over the user's
  latest items, looked up in C++; observed items extend the history at once.

Every class takes a :class:`UserState`: what the engine knows of the user for one request, in the
version's dense ids (the engine maps the user's own keys). All exclude each user's seen items (training
interactions plus observed ones) unless told not to.
"""
from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numpy as np

from ._core import RecEngineError
from .bundle import Bundle, BundleError
from .embedding import EmbeddingTable
from .graph import CsrMatrix, apply_polynomial, spmm
from .sequential import SASRecScorer
from .topk import IdLists, TopK, topk

VECTOR_KINDS = ("mf", "lightgcn", "ngcf", "popularity")
FILTER_KINDS = ("gfcf", "bspm")
SEQUENTIAL_KINDS = ("sasrec",)


_NO_ITEMS = np.zeros(0, np.int64)
_NO_ITEMS.flags.writeable = False
_FOLD_CACHE_SIZE = 65536     # folded-in user vectors kept (emptied when full)


class UserState(NamedTuple):
    """A user as one model version sees it for one request.

    key : the user's own key (what caches are keyed by)
    uid : the user's dense id in the model, -1 when the model does not know the user
    observed : int64 dense ids of the items observed online (known to this version), oldest first
    stamp : changes whenever the user gets new events (0: never observed)
    """

    key: Any
    uid: int
    observed: np.ndarray = _NO_ITEMS
    stamp: int = 0


def _csr_lists(bundle: Bundle, indptr: str, ids: str) -> IdLists:
    return IdLists(bundle.array(indptr), bundle.array(ids))


class _Retrieval:
    """What both kinds share: the item matrix, the seen sets, and top-k."""

    kind: str
    items: np.ndarray          # float32 [n_items, d]
    n_users: int
    n_items: int
    seen_lists: IdLists        # per known user

    def seen(self, user: UserState) -> np.ndarray:
        """The user's train items, then its observed ones (dense ids, repeats possible)."""
        base = self.seen_lists[user.uid] if 0 <= user.uid < self.n_users else _NO_ITEMS
        return base if not len(user.observed) else np.concatenate([base, user.observed])

    def user_vectors(self, users: list[UserState]) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [B, d] float32, known [B] bool)``; an unknown user (no vector) has a zero row."""
        raise NotImplementedError

    def retrieve(self, user: UserState, n: int, *, exclude=None, candidates=None,
                 num_threads: int | None = None) -> TopK | None:
        """The ``n`` best items for ``user`` (None when the model cannot describe the user)."""
        vec, known = self.user_vectors([user])
        if not known[0]:
            return None
        return topk(vec[0], self.items, n, exclude=exclude, candidates=candidates, num_threads=num_threads)


class VectorRetrieval(_Retrieval):
    def __init__(self, bundle: Bundle):
        self.kind = bundle.kind
        meta = bundle.meta
        self.items = np.ascontiguousarray(bundle.table("items").to_numpy() if bundle.table("items").dtype != "float32"
                                          else bundle.table("items").weights)
        self.users = bundle.table("users")
        self.n_users, self.n_items = int(meta["n_users"]), int(meta["n_items"])
        if self.users.rows != self.n_users or len(self.items) != self.n_items:
            raise BundleError(f"bundle {bundle.path}: table sizes do not match meta n_users/n_items")
        self.seen_lists = _csr_lists(bundle, "train_indptr", "train_items")
        self.item_counts = bundle.array("item_counts")
        self._fold = None
        self._bundle = bundle
        self._fold_lock = threading.Lock()
        self._cache: dict = {}     # user key -> (stamp, folded-in vector)

    @property
    def folds_in(self) -> bool:
        return self.kind == "lightgcn"

    def _fold_state(self):
        """Item layer embeddings 0..K-1 side by side ([n_items, K*d]) and item degrees, computed once."""
        with self._fold_lock:
            if self._fold is None:
                b, meta = self._bundle, self._bundle.meta
                adj = CsrMatrix(b.array("adj_indptr"), b.array("adj_indices"), b.array("adj_data"),
                                (self.n_users + self.n_items,) * 2)
                x = np.concatenate([b.table("users_ego").to_numpy(), b.table("items_ego").to_numpy()])
                layers = [x]
                for _ in range(int(meta["n_layers"]) - 1):
                    layers.append(spmm(adj, layers[-1]))
                stacked = np.ascontiguousarray(np.concatenate([lay[self.n_users:] for lay in layers], axis=1))
                weights = np.asarray(meta.get("layer_weights") or [1.0 / (int(meta["n_layers"]) + 1)] *
                                     (int(meta["n_layers"]) + 1), np.float32)
                self._fold = (EmbeddingTable(stacked), self.item_counts.astype(np.float64), weights,
                              b.table("users_ego"))
            return self._fold

    def fold_in(self, user: int, items: np.ndarray) -> np.ndarray:
        """LightGCN vector of the user with dense id ``user`` (-1: a user the model does not know) whose
        neighbourhood is ``items`` (train + observed): layer k+1 of the user is sum_i e_i^k / sqrt(d_u d_i)
        with the items' stored layers, d_u = |items| and d_i the item's degree counting the new edges;
        the result combines layers 0..K by the model's weights."""
        table, degrees, weights, ego = self._fold_state()
        items = np.unique(np.asarray(items, np.int64))
        known = self.seen_lists[user] if 0 <= user < self.n_users else _NO_ITEMS
        d_i = degrees[items] + ~np.isin(items, known)
        w = (1.0 / np.sqrt(len(items) * d_i)).astype(np.float32)
        k = len(weights) - 1
        d = table.dim // k
        hops = table.pool(items, np.array([0, len(items)], np.int64), w, mode="sum",
                          include_last_offset=True).reshape(k, d)
        e0 = ego.gather(np.array([user]))[0] if 0 <= user < self.n_users else np.zeros(d, np.float32)
        return (weights[0] * e0 + weights[1:] @ hops).astype(np.float32)

    def user_vectors(self, users):
        if self.kind == "popularity":
            return np.ones((len(users), 1), np.float32), np.ones(len(users), bool)
        uids = np.array([u.uid for u in users], np.int64)
        known = (uids >= 0) & (uids < self.n_users)
        out = np.zeros((len(users), self.items.shape[1]), np.float32)
        if known.any():
            out[known] = self.users.gather(uids[known])
        if self.folds_in:
            for j, u in enumerate(users):
                if u.stamp == 0 or not len(u.observed):
                    continue
                hit = self._cache.get(u.key)
                if hit is None or hit[0] != u.stamp:
                    hit = (u.stamp, self.fold_in(u.uid, self.seen(u)))
                    if len(self._cache) >= _FOLD_CACHE_SIZE:
                        self._cache.clear()
                    self._cache[u.key] = hit
                out[j] = hit[1]
                known[j] = True
        return out, known


class SequentialRetrieval(_Retrieval):
    def __init__(self, bundle: Bundle, session_options=None):
        self.kind = bundle.kind
        self.scorer = SASRecScorer(bundle, session_options, num_threads=1)
        self.items, self.n_items = self.scorer.items, self.scorer.n_items
        self.seen_lists = _csr_lists(bundle, "history_indptr", "history_items")
        self.n_users = len(self.seen_lists)
        self.item_counts = bundle.array("item_counts") if bundle.has("arrays/item_counts.npy") else None

    def user_vectors(self, users):
        """The encoder's output over each user's latest items (known history, then observed items)."""
        hist = [self.seen(u) for u in users]
        known = np.array([len(h) > 0 for h in hist], bool)
        out = np.zeros((len(users), self.items.shape[1]), np.float32)
        if known.any():
            out[known] = self.scorer.user_vectors([h for h, k in zip(hist, known) if k])
        return out, known


class FilterRetrieval(_Retrieval):
    """GF-CF bundles (format: ``rec_engine_train.export_gfcf``): the scores of a user with binary item
    row ``r`` are ``lin(r) + alpha * (r @ items_lowrank_query) @ items_lowrank^T`` with
    ``lin(r) = R~^T (R~ r^T)`` (then ``sum_j c_j lin P^j`` when sharpened, ``c = meta["sharpen_poly"]``). ``R~ r^T`` and ``R~^T y`` touch only the
    rows of the user's items and of the users sharing them, so a request costs a few thousand
    multiply-adds plus one pass over the low-rank item factors."""

    def __init__(self, bundle: Bundle):
        meta = bundle.meta
        self.kind = bundle.kind
        self.n_users, self.n_items = int(meta["n_users"]), int(meta["n_items"])
        self.alpha = float(meta["alpha"])
        sharpen = float(meta.get("sharpen", 0.0))      # older bundles: one Euler step of size sharpen
        self.sharpen_poly = np.asarray(meta.get("sharpen_poly", [1.0, -sharpen] if sharpen > 0 else [1.0]),
                                       np.float64)
        if self.sharpen_poly.ndim != 1 or self.sharpen_poly.size == 0 or not np.isfinite(self.sharpen_poly).all():
            raise BundleError(f"{bundle.path}: meta sharpen_poly must be a non-empty list of finite numbers")
        indptr, indices, data = bundle.array("norm_indptr"), bundle.array("norm_indices"), bundle.array("norm_data")
        self.norm = CsrMatrix(indptr, indices, data, (self.n_users, self.n_items))
        rows = np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(indptr))
        order = np.argsort(indices, kind="stable")                      # R~^T as CSR: items x users
        t_indptr = np.zeros(self.n_items + 1, np.int64)
        np.cumsum(np.bincount(indices, minlength=self.n_items), out=t_indptr[1:])
        self.norm_t = CsrMatrix(t_indptr, rows[order].astype(indices.dtype), data[order], (self.n_items, self.n_users))
        self.query = bundle.table("items_lowrank_query")
        self.items = np.ascontiguousarray(bundle.table("items_lowrank").to_numpy())
        self.seen_lists = _csr_lists(bundle, "train_indptr", "train_items")
        self.item_counts = bundle.array("item_counts")

    @staticmethod
    def _weighted_rows(m: CsrMatrix, rows: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
        """``sum_j weights[j] * m[rows[j]]`` as a dense float64 vector of ``size``."""
        starts = m.indptr[rows]
        lengths = m.indptr[rows + 1] - starts
        pos = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
        return np.bincount(m.indices[pos], weights=m.data[pos] * np.repeat(weights, lengths), minlength=size)

    def scores(self, items: np.ndarray) -> np.ndarray:
        """Scores of every item for a user whose (distinct) items are ``items``: float32 [n_items]."""
        y = self._weighted_rows(self.norm_t, items, np.ones(len(items)), self.n_users)      # R~ r^T
        users = np.flatnonzero(y)
        lin = self._weighted_rows(self.norm, users, y[users], self.n_items)                # R~^T y
        lin = apply_polynomial(self.sharpen_poly, self._apply_p, lin)
        q = self.query.pool(items, np.array([0, len(items)], np.int64), mode="sum", include_last_offset=True)[0]
        return (lin + self.alpha * (self.items @ q)).astype(np.float32)

    def _apply_p(self, x: np.ndarray) -> np.ndarray:
        """``P x = R~^T (R~ x)`` for a vector over items (float64 in and out, float32 products)."""
        return spmm(self.norm_t, spmm(self.norm, x[:, None].astype(np.float32)))[:, 0].astype(np.float64)

    def retrieve(self, user, n, *, exclude=None, candidates=None, num_threads=None):
        items = np.unique(self.seen(user))
        if len(items) == 0:
            return None
        s = self.scores(items)
        return topk(np.ones(1, np.float32), s[:, None], n, exclude=exclude, candidates=candidates,
                    num_threads=num_threads)


def load_retrieval(bundle: Bundle, session_options=None) -> _Retrieval:
    if bundle.kind in VECTOR_KINDS:
        return VectorRetrieval(bundle)
    if bundle.kind in FILTER_KINDS:
        return FilterRetrieval(bundle)
    if bundle.kind in SEQUENTIAL_KINDS:
        return SequentialRetrieval(bundle, session_options)
    raise RecEngineError(f"bundle {bundle.path} of kind {bundle.kind!r} is not a retrieval model "
                         f"({', '.join(VECTOR_KINDS + FILTER_KINDS + SEQUENTIAL_KINDS)})")
