"""Retrieval: the first stage. A user's scores over all items from a bundle, the best by exact top-k in C++.

One class per way a bundle scores a user's items:

- :class:`VectorRetrieval` (``mf``, ``lightgcn``, ``ngcf``, ``popularity``): stored user and item vectors.
  A LightGCN user with observed interactions gets its vector folded in
  (:class:`~rec_engine.graph.LightGCNFoldIn`): its layers are recomputed from its new neighbourhood with
  the core's pooling over the items' layers (propagated once from the stored layer-0 embeddings), which is
  one row of the propagation the model was trained with (item layers kept fixed).
- :class:`FilterRetrieval` (``gfcf``, ``bspm``): no user vector; a user's scores are the fitted graph filter
  (:class:`~rec_engine.graph_filter.GraphFilter`) applied to its item row (train + observed items), so new
  interactions count at once.
- :class:`SequentialRetrieval` (``sasrec``): the user vector is the ONNX encoder's output over the user's
  latest items, looked up in C++; observed items extend the history at once.
- :class:`ItemItemRetrieval` (``ease``): a user's scores are the sum of its items' rows (train + observed)
  of an item-item matrix (:class:`~rec_engine.item_item.ItemItemScorer`, the core's embedding bag), so
  new interactions count at once and a new user is scored like a known one.

Every class takes a :class:`UserState`: what the engine knows of the user for one request, in the
version's dense ids (the engine maps the user's own keys). Each class's :meth:`~_Retrieval.seen` gives the
user's seen items (training interactions plus observed ones), which the engine passes back as ``exclude``
unless told not to.
"""
from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numpy as np

from . import _core, kinds
from ._core import RecEngineError
from .bundle import Bundle, BundleError
from .graph import CsrMatrix, LightGCNFoldIn
from .graph_filter import GraphFilter
from .item_item import ItemItemScorer
from .sequential import SASRecScorer
from .topk import IdLists, ItemIndex, TopK, topk

# the kinds each class serves, read from the registry (rec_engine.kinds)
VECTOR_KINDS = kinds.names(family="graph")
FILTER_KINDS = kinds.names(family="filter")
SEQUENTIAL_KINDS = kinds.names(family="sequential")
ITEM_ITEM_KINDS = kinds.names(family="item_item")


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


def _within(ids, n: int | None):
    """``ids`` without those at or past ``n`` (items added to the catalogue after the table was read)."""
    if ids is None or n is None or not isinstance(ids, np.ndarray) or not len(ids) or ids.max() < n:
        return ids
    return ids[ids < n]


def _csr_lists(bundle: Bundle, indptr: str, ids: str) -> IdLists:
    return IdLists(bundle.array(indptr, mmap=True), bundle.array(ids, mmap=True))   # shared by server processes


class _Retrieval:
    """What every retrieval class shares: the item matrix, the seen sets, and top-k."""

    kind: str
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

    index = None               # an ItemIndex (int8 / bf16) scanned instead of items, or None (exact float32)
    scans_vectors = True       # retrieval is a scan of items by a user vector (the families with an index)
    # Without an index, batches of this many users or more over a table of screen_min_items or more scan
    # through a bf16 screen without a copy (ItemIndex(copy=False): each panel converted as the scan reaches
    # it, exact ids and float32 scores; 4 bytes an item for its norms, built at load by the engine). 1M x
    # 64 MF items, 256 users: k = 500 101 -> 79 ms, k = 10 81 -> 57 ms; 64 users 24-33 -> 21-28 ms; 16 users
    # were slower than the float32 scan. 0 turns it off.
    screen_min_batch = 64
    screen_min_items = 65536
    _screen = None             # (the items the screen was built over, the screen or None when it cannot be)

    @property
    def items(self) -> np.ndarray:
        """The item vectors, float32 ``[n_items, d]`` (a table that grows online is assigned anew)."""
        return self._items

    @items.setter
    def items(self, value: np.ndarray) -> None:
        self._items = value
        if "_screen_lock" not in self.__dict__:
            self._screen_lock = threading.Lock()
        if self._screen is not None and not self._covers(self._screen, value):
            self._screen = None    # (a table that moved as it grew: the screen lets the old one go)

    @staticmethod
    def _covers(got, items) -> bool:
        """Whether the screen ``got`` was built over ``items`` or over rows that ``items`` extends in place."""
        return got is not None and (got[0] is items or (len(items) >= len(got[0]) > 0 and
                                                        np.shares_memory(items[:1], got[0][:1])))

    def screens_batches(self, n_queries: int) -> bool:
        """Whether a batch of ``n_queries`` over this table goes through the bf16 screen (vector families
        without an index, large enough batches and tables, a CPU with AVX512-BF16 at the SIMD level in use)."""
        return (self.index is None and self.scans_vectors and bool(self.screen_min_batch)
                and n_queries >= self.screen_min_batch and len(self.items) >= self.screen_min_items
                and _core.reduced_kernels("bf16"))

    def batch_screen(self, items: np.ndarray):
        """The bf16 screen over ``items`` (this retrieval's table; built at the first call, then kept while
        the table holds the same first rows), or None when it cannot be built (values that are not finite)."""
        got = self._screen
        if not self._covers(got, items):
            with self._screen_lock:
                got = self._screen
                if not self._covers(got, items):
                    try:
                        screen = ItemIndex(items, "bf16", copy=False)
                    except ValueError:   # (non-finite values: the float32 scan reports them)
                        screen = None
                    self._screen = got = (items, screen)
        return got[1]

    def set_index(self, index) -> None:
        """Scan ``index`` (an :class:`~rec_engine.topk.ItemIndex` over :attr:`items`, or None for the exact
        float32 scan) from now on. Vector families only; the others score users without a scan of vectors."""
        if index is not None and (index.items.shape != self.items.shape):
            raise ValueError(f"the index has shape {index.items.shape}, the items {self.items.shape}")
        self.index = index

    def retrieve(self, user: UserState, n: int, *, exclude=None, candidates=None,
                 num_threads: int | None = None) -> TopK | None:
        """The ``n`` best items for ``user`` (None when the model cannot describe the user)."""
        vec, known = self.user_vectors([user])
        if not known[0]:
            return None
        return self._topk(vec[0], n, exclude, candidates, num_threads)

    def _topk(self, q: np.ndarray, n: int, exclude, candidates, num_threads) -> TopK:
        """Top-``n`` of queries ``q`` (``[d]`` with ``exclude`` an id array, or ``[B, d]`` with a list of them)
        over the items: the float32 table, or the reduced-precision index, which covers the items it was built
        from; items added online since (catalogue.py) are scored exactly in float32 and merged."""
        items, index = self.items, self.index    # read once: items added online grow the table
        m = len(items)
        batch = q.ndim == 2

        def ex(lo: int, hi: int):                # the exclusions within [lo, hi), shifted to start at 0
            def cut(e):
                if e is None or not len(e):
                    return e
                e = np.asarray(e, np.int64)
                return e[(e >= lo) & (e < hi)] - lo if lo or e.max() >= hi else e
            if not batch:
                return cut(exclude)
            return None if exclude is None else IdLists.from_lists([cut(e) for e in exclude])

        if index is None and batch and candidates is None and self.screens_batches(len(q)):
            index = self.batch_screen(items)
        n0 = len(index.items) if index is not None else m
        if index is None or candidates is not None:   # the exact scorer (also what the index uses for candidates)
            return topk(q, items, n, exclude=ex(0, m), candidates=_within(candidates, m), num_threads=num_threads)
        head = topk(q, index, n, exclude=ex(0, n0), num_threads=num_threads)
        if m == n0:
            return head
        tail = topk(q, items[n0:m], n, exclude=ex(n0, m), num_threads=num_threads)
        ids = np.concatenate([head.ids, np.where(tail.ids >= 0, tail.ids + n0, -1)], axis=-1)
        scores = np.concatenate([head.scores, tail.scores], axis=-1)
        order = np.argsort(-scores, axis=-1, kind="stable")[..., :min(n, m)]   # ties: head (lower ids) first
        return TopK(np.take_along_axis(ids, order, -1), np.take_along_axis(scores, order, -1))

    def retrieve_batch(self, users: list[UserState], n: int, *, excludes: list | None = None,
                       num_threads: int | None = None) -> list[TopK | None]:
        """:meth:`retrieve` for several users (``excludes``: one id array per user, or None): the user
        vectors in one call, then one batched top-k over the known users."""
        vecs, known = self.user_vectors(users)
        rows = np.flatnonzero(known)
        out: list[TopK | None] = [None] * len(users)
        if not len(rows):
            return out
        res = self._topk(np.ascontiguousarray(vecs[rows]), n, None if excludes is None else
                         [excludes[j] for j in rows], None, num_threads)
        for r, j in enumerate(rows.tolist()):
            out[j] = TopK(res.ids[r], res.scores[r])
        return out


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
        self._fold_in: LightGCNFoldIn | None = None     # built at the first fold-in (LightGCN only)
        self._bundle = bundle
        self._fold_lock = threading.Lock()
        self._cache: dict = {}     # user key -> (stamp, folded-in vector)

    @property
    def folds_in(self) -> bool:
        return self.kind == "lightgcn"

    def prepare(self) -> None:
        """Build the fold-in (the items' layers, one propagation of the stored layer-0 embeddings) now, at load
        or swap, so that no request waits for it (LightGCN only; nothing for other kinds)."""
        if not self.folds_in:
            return
        with self._fold_lock:
            if self._fold_in is None:
                b, meta = self._bundle, self._bundle.meta
                try:
                    adj = CsrMatrix(b.array("adj_indptr"), b.array("adj_indices"), b.array("adj_data"),
                                    (self.n_users + self.n_items,) * 2)
                    self._fold_in = LightGCNFoldIn(adj, b.table("users_ego"), b.table("items_ego"),
                                                   int(meta["n_layers"]), meta.get("layer_weights"))
                except (ValueError, TypeError, KeyError, IndexError) as e:   # a malformed graph or meta
                    raise BundleError(f"bundle {b.path}: the fold-in graph is malformed: "
                                      f"{type(e).__name__}: {e}") from None

    def fold_in(self, user: int, items: np.ndarray) -> np.ndarray:
        """LightGCN vector of the user with dense id ``user`` (-1: a user the model does not know) whose
        items are ``items`` (train + observed): :meth:`rec_engine.graph.LightGCNFoldIn.user_vector`."""
        if self._fold_in is None:
            self.prepare()
        return self._fold_in.user_vector(user, items)

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
                    seen = self.seen(u)     # items added online (ids past the model's) have no graph node
                    hit = (u.stamp, self.fold_in(u.uid, seen[seen < self.n_items]))
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
        hist = [h[h < self.n_items] for h in (self.seen(u) for u in users)]   # items added online: no embedding
        known = np.array([len(h) > 0 for h in hist], bool)
        out = np.zeros((len(users), self.items.shape[1]), np.float32)
        if known.any():
            out[known] = self.scorer.user_vectors([h for h, k in zip(hist, known) if k])
        return out, known


class _PerUserRetrieval(_Retrieval):
    """A family that scores each user's items on its own (no user vector, so nothing to batch)."""

    scans_vectors = False

    def retrieve_batch(self, users, n, *, excludes=None, num_threads=None):
        return [self.retrieve(u, n, exclude=None if excludes is None else excludes[j], num_threads=num_threads)
                for j, u in enumerate(users)]

    def set_index(self, index) -> None:
        if index is not None:
            raise ValueError(f"{self.kind} scores users from their items: a reduced-precision index does not apply")


class FilterRetrieval(_PerUserRetrieval):
    """GF-CF / BSPM bundles (format: ``rec_engine_train.export_gfcf``): a user's scores are the fitted graph
    filter (:class:`~rec_engine.graph_filter.GraphFilter`) applied to its item row (train + observed
    items); a request touches only the rows of the user's items and of the users sharing them (a few
    thousand multiply-adds), one ``P`` product per degree of the sharpening polynomial, and one pass over
    the low-rank item factor."""

    def __init__(self, bundle: Bundle):
        meta = bundle.meta
        self.kind = bundle.kind
        self.n_users, self.n_items = int(meta["n_users"]), int(meta["n_items"])
        sharpen = float(meta.get("sharpen", 0.0))      # older bundles: one Euler step of size sharpen
        poly = meta.get("sharpen_poly", [1.0, -sharpen] if sharpen > 0 else [1.0])
        norm = CsrMatrix(bundle.array("norm_indptr"), bundle.array("norm_indices"), bundle.array("norm_data"),
                         (self.n_users, self.n_items))
        try:
            self.filter = GraphFilter(norm, bundle.table("items_lowrank_query"),
                                      bundle.table("items_lowrank").to_numpy(), float(meta["alpha"]), poly)
        except ValueError as e:
            raise BundleError(f"{bundle.path}: {e}") from None
        self.items = self.filter.items_lowrank
        self.seen_lists = _csr_lists(bundle, "train_indptr", "train_items")
        self.item_counts = bundle.array("item_counts")

    def retrieve(self, user, n, *, exclude=None, candidates=None, num_threads=None):
        items = self.seen(user)
        if len(items) == 0:
            return None
        s = self.filter.user_scores(items)
        return topk(np.ones(1, np.float32), s[:, None], n, exclude=exclude, candidates=candidates,
                    num_threads=num_threads)


class ItemItemRetrieval(_PerUserRetrieval):
    """EASE^R bundles (format: :mod:`rec_engine.item_item`): a user's scores are the sum of the rows of the
    item-item table of its distinct items (train + observed), one embedding-bag call of the core, then
    top-k over that score column; no user vector is stored, so a user the model does not know is scored
    the same way from its observed items."""

    def __init__(self, bundle: Bundle):
        self.kind = bundle.kind
        try:
            self.scorer = ItemItemScorer.from_bundle(bundle)
        except ValueError as e:
            raise BundleError(f"{bundle.path}: {e}") from None
        self.n_users, self.n_items = self.scorer.n_users, self.scorer.n_items
        self.seen_lists = self.scorer.seen_lists
        self.item_counts = self.scorer.item_counts

    def retrieve(self, user, n, *, exclude=None, candidates=None, num_threads=None):
        items = self.seen(user)
        if len(items) == 0:
            return None
        s = self.scorer.user_scores(items, num_threads=num_threads)
        return topk(np.ones(1, np.float32), s[:, None], n, exclude=exclude, candidates=candidates,
                    num_threads=num_threads)


def load_retrieval(bundle: Bundle, session_options=None) -> _Retrieval:
    """The retrieval model of ``bundle``, served by the class of its kind's family (rec_engine.kinds)."""
    serving = {"graph": VectorRetrieval, "filter": FilterRetrieval, "item_item": ItemItemRetrieval,
               "sequential": lambda b: SequentialRetrieval(b, session_options)}
    try:
        kind = kinds.get_kind(bundle.kind)
    except ValueError:
        kind = None
    if kind is None or kind.stage != "retrieval" or kind.family not in serving:
        raise RecEngineError(f"bundle {bundle.path} of kind {bundle.kind!r} is not a retrieval model "
                             f"({', '.join(k.name for k in kinds.kinds(stage='retrieval'))})")
    try:
        return serving[kind.family](bundle)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:   # a wrong meta or array
        raise BundleError(f"bundle {bundle.path} is malformed: {type(e).__name__}: {e}") from None


_RECALL_USERS = 256


def build_index(bundle: Bundle, precision: str, n: int, *, users: int = _RECALL_USERS, seed: int = 0,
                num_threads: int | None = None):
    """``(ItemIndex, meta)``: the ``precision`` index of a vector-family retrieval bundle's items, and its
    recall of the exact top ``n`` (the user's seen items excluded, as served) over ``users`` known users
    drawn at random: ``meta = {"precision", "recall", "recall_min", "recall_at", "recall_users"}``."""
    from .topk import ItemIndex

    r = load_retrieval(bundle)
    if isinstance(r, _PerUserRetrieval):
        raise ValueError(f"a {r.kind} bundle scores users from their items: a reduced-precision index does not apply")
    index = ItemIndex(r.items, precision, num_threads=num_threads)
    meta = {"precision": precision, "recall_at": int(min(n, r.n_items))}
    m = min(users, r.n_users)
    if m > 0:
        uids = np.sort(np.random.default_rng(seed).choice(r.n_users, m, replace=False))
        states = [UserState(int(u), int(u)) for u in uids]
        vecs, known = r.user_vectors(states)
        rows = np.flatnonzero(known)
        if len(rows):
            ex = IdLists.from_lists([r.seen(states[j]) for j in rows])
            q = np.ascontiguousarray(vecs[rows])
            exact = topk(q, r.items, n, exclude=ex, num_threads=num_threads).ids
            approx = topk(q, index, n, exclude=ex, num_threads=num_threads).ids
            recall = [len(np.intersect1d(a[a >= 0], b[b >= 0])) / max(1, int((a >= 0).sum()))
                      for a, b in zip(exact, approx)]
            meta.update(recall=float(np.mean(recall)), recall_min=float(np.min(recall)), recall_users=len(rows))
    return index, meta
